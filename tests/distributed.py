"""Run a function on N gloo ranks spawned from a test, with a timeout so that a hang fails instead of blocking.

    results = run_ranks(worker, world_size=2, args=(...))   # worker(rank, world_size, *args) -> picklable

``worker`` must be importable by name (a module-level function of a test module or helper). Each rank gets a CPU
gloo process group (``torch.distributed`` default group) whose collectives time out after ``timeout`` seconds, so a
rank waiting for a peer that raised fails too. An exception on any rank is re-raised in the test with every rank's
traceback. Results come back in rank order. The ranks see torchrun's variables (``RANK``, ``WORLD_SIZE``,
``MASTER_PORT`` ...), so libraries that read them (accelerate, DeepSpeed) find the group.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback

import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, timeout, fn, args, queue):
    import torch
    import torch.distributed as dist

    # The launcher variables torchrun sets: accelerate and DeepSpeed read them.
    os.environ.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            queue.put((rank, "ok", fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 -- reported to the test, whatever it was
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world_size: int, args=(), timeout: float = DEFAULT_TIMEOUT_S):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, timeout, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout + 60)
            (results if status == "ok" else errors)[rank] = value
    except Exception as exc:  # queue.Empty: some rank never reported
        raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(results) - set(errors))} did not finish "
                           f"within {timeout + 60} s; errors so far: {errors}") from exc
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [results[r] for r in range(world_size)]
