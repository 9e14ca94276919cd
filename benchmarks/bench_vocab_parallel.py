"""Vocabulary-parallel losses on CPU gloo ranks: per-rank peak memory, time per step and communication per step.

    python benchmarks/bench_vocab_parallel.py --ranks 1,2,4 --losses ce,sce --v 1000000,4000000 --n 8192 --d 64
    python benchmarks/bench_vocab_parallel.py --smoke          # tiny sizes, what the test suite runs

Each (loss, V, ranks) runs in fresh processes started by ``torch.distributed.run`` (one process per rank, gloo, one
thread each, ``STABLE_RSS_ENV`` so the RSS peak is repeatable). Every rank holds rows ``[lo, hi)`` of a (V, D)
float32 weight (``torch.chunk``'s split) whose values depend only on the row index, so the loss is the same at every
rank count; ``hidden`` (N, D, requires grad) and the targets are the same on every rank (the layout of
:mod:`largevocab.parallel`). One step is the loss forward + backward with ``process_group=`` (dH all-reduced, dW of
the shard); ``ce`` is :func:`largevocab.linear_cross_entropy`, ``sce`` :func:`largevocab.scalable_cross_entropy`
(default buckets, one seeded generator per step, identical on every rank).

Per rank and step, measured:

* ``peak_extra_bytes``: the process's peak RSS above what it held before its shard was allocated (so it includes the
  shard, its gradient and the loss's workspace); ``state_bytes`` is shard + gradient exactly.
* ``ms``: median wall time of a step after one warm-up step, with a barrier before each step; the slowest rank's.
* ``payload_bytes``: the bytes of the tensors this rank hands to ``torch.distributed`` collectives (counted by
  wrapping them); ``floor_bytes``: what the :mod:`largevocab.parallel` docstring says they are (ce: ``3N p + N D p``;
  sce: ``n_b b_y (p + 8) + 2 n_b b_x p + N p + N D p``), of which ``nd_floor_bytes`` = ``3N p + N D p`` is the
  O(N) + O(N D) part; ``sent_bytes``: what this rank actually wrote to its sockets (``/proc/self/io`` ``wchar``
  over the step: gloo's TCP transport writes with ``write``/``writev``), next to ``ring_bytes``, what ring
  algorithms send for those payloads (all-reduce ``2 (W - 1) / W``, all-gather ``W - 1`` times the input).

Results go to a CSV with the device, the date, the load average at the start and library versions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
from datetime import date

import torch
import torch.distributed as dist

from largevocab.profiling import PeakMemory

from harness import append_csv, device_name, run_worker, versions

LOSSES = ("ce", "sce")
# Failures of the processes' sockets or rendezvous (gloo's TCP pairs, the TCPStore), not of a loss: a run that
# hits one is started again once, saying so. Any other failure is reported as it is.
# Launch and teardown failures retried once. A rank aborting at exit ("terminate called without an active
# exception", seen in CI and once here in the full suite, after both ranks had produced their rows) is gloo's
# teardown, not the measurement; a real crash aborts again on the retry and still fails.
TRANSPORT_FAILURE = re.compile(r"Connection (reset|refused|closed)|Broken pipe|EADDRINUSE|[Aa]ddress already in use|"
                               r"DistNetworkError|DistStoreError|Socket Timeout|Signal 6 \(SIGABRT\)")
SEED = 0
WEIGHT_BLOCK_ROWS = 4096  # rows of the table built at a time (float64 temporaries of 4096 x D)
SMOKE = dict(ranks="2", losses="ce,sce", v="3000", n="256", d="16", repeats=1)
# Collectives the losses (and their first-use shape exchange) call; the byte factor a ring algorithm sends per rank.
COLLECTIVES = {"all_reduce": lambda w: 2 * (w - 1) / w, "all_gather": lambda w: w - 1,
               "all_gather_single": lambda w: w - 1, "all_gather_into_tensor": lambda w: w - 1,
               "reduce_scatter_single": lambda w: (w - 1) / w, "reduce_scatter_tensor": lambda w: (w - 1) / w,
               "broadcast": lambda w: 1.0, "gather": lambda w: 1.0}


class CollectiveCounter:
    """Wraps ``torch.distributed``'s collectives to count the bytes of the tensors this rank passes in."""

    def __init__(self, world: int) -> None:
        self.world, self.payload, self.ring, self.calls, self.active = world, 0, 0.0, 0, False
        for name, factor in COLLECTIVES.items():
            setattr(dist, name, self._wrap(getattr(dist, name), name, factor))

    def _wrap(self, fn, name, factor):
        def counted(*args, **kwargs):
            if self.active:
                tensor = args[1] if name.startswith(("all_gather", "reduce_scatter")) and len(args) > 1 else args[0]
                nbytes = tensor.numel() * tensor.element_size()
                self.payload += nbytes
                self.ring += factor(self.world) * nbytes
                self.calls += 1
            return fn(*args, **kwargs)

        return counted


def _sent_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def weight_rows(lo: int, hi: int, d: int) -> torch.Tensor:
    """Rows [lo, hi) of a (V, d) float32 table whose entries depend only on (row, column): the same at any split.
    Filled in blocks, so that its float64 temporaries (inside the memory measurement) stay small."""
    out = torch.empty(hi - lo, d)
    cols = torch.arange(d, dtype=torch.float64)[None, :] * 1.3247179572
    for start in range(lo, hi, WEIGHT_BLOCK_ROWS):
        stop = min(start + WEIGHT_BLOCK_ROWS, hi)
        rows = torch.arange(start, stop, dtype=torch.float64)[:, None] * 0.7548776662
        out[start - lo:stop - lo] = torch.sin(rows + cols) * d**-0.5
    return out


def sce_sizes(n: int, v: int) -> tuple[int, int, int]:
    """(n_b, b_x, b_y) of SCE's defaults for n non-ignored rows (see largevocab.scalable.bucket_plan)."""
    from largevocab.scalable import BUCKETS_PER_SQRT_ROW, DEFAULT_BUCKET_SIZE_Y

    default = max(1, int(BUCKETS_PER_SQRT_ROW * math.sqrt(n)))
    return default, min(default, n), min(DEFAULT_BUCKET_SIZE_Y, v)


def floors(loss: str, n: int, v: int, d: int, p: int = 4) -> tuple[int, int]:
    """(docstring floor, its O(N) + O(N D) part) of one call's payload bytes per rank."""
    nd = 3 * n * p + n * d * p
    if loss == "ce":
        return nd, nd
    n_b, b_x, b_y = sce_sizes(n, v)
    return n_b * b_y * (p + 8) + 2 * n_b * b_x * p + n * p + n * d * p, nd


def worker(args) -> dict | None:
    import largevocab as lv

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)
    counter = CollectiveCounter(world)
    gen = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(args.n, args.d, generator=gen).requires_grad_()
    targets = torch.randint(0, args.v, (args.n,), generator=gen)
    chunk = -(-args.v // world)
    lo, hi = min(rank * chunk, args.v), min((rank + 1) * chunk, args.v)
    group = dist.group.WORLD

    def loss_of(weight):
        if args.loss == "ce":
            return lv.linear_cross_entropy(hidden, weight, targets, process_group=group)
        return lv.scalable_cross_entropy(hidden, weight, targets, generator=torch.Generator().manual_seed(SEED),
                                         process_group=group)

    # Imports, op registration, thread pools and gloo's buffers come with the first call, whatever the size: one
    # step on a one-row-per-rank table first, outside the measurement.
    tiny = weight_rows(rank, rank + 1, args.d).requires_grad_()
    lv.linear_cross_entropy(hidden, tiny, targets % world, process_group=group).backward()
    lv.scalable_cross_entropy(hidden, tiny, targets % world, process_group=group).backward()
    times, payload, ring, sent = [], [], [], []
    with PeakMemory("cpu") as memory:
        weight = weight_rows(lo, hi, args.d).requires_grad_()
        for step in range(1 + args.repeats):  # step 0: warm-up (first-use shape exchange, lazy allocations)
            hidden.grad, weight.grad = None, None
            dist.barrier()
            counter.payload, counter.ring, counter.active = 0, 0.0, step > 0
            before, start = _sent_bytes(), time.perf_counter()
            loss = loss_of(weight)
            loss.backward()
            elapsed, after = time.perf_counter() - start, _sent_bytes()
            counter.active = False
            if step > 0:
                times.append(elapsed * 1e3)
                payload.append(counter.payload)
                ring.append(counter.ring)
                sent.append(after - before)
        state_bytes = weight.nbytes + weight.grad.nbytes
    row = {"rank": rank, "rows": hi - lo, "ms": statistics.median(times), "peak_extra_bytes": memory.extra_bytes,
           "state_bytes": state_bytes, "payload_bytes": max(payload), "ring_bytes": max(ring),
           "sent_bytes": max(sent), "loss": loss.item(), "rss_bytes": _rss_bytes()}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    dist.barrier()  # no rank tears gloo down while another is still in a collective
    dist.destroy_process_group()
    if rank != 0:
        return None
    floor, nd_floor = floors(args.loss, args.n, args.v, args.d)
    return {"loss": args.loss, "v": args.v, "n": args.n, "d": args.d, "ranks": world,
            "rows_per_rank": max(r["rows"] for r in rows), "ms": max(r["ms"] for r in rows),
            "peak_extra_bytes": max(r["peak_extra_bytes"] for r in rows),
            "state_bytes": max(r["state_bytes"] for r in rows),
            "payload_bytes": max(r["payload_bytes"] for r in rows), "floor_bytes": floor, "nd_floor_bytes": nd_floor,
            "ring_bytes": int(max(r["ring_bytes"] for r in rows)), "sent_bytes": max(r["sent_bytes"] for r in rows),
            "loss_value": rows[0]["loss"], "losses_agree": len({r["loss"] for r in rows}) == 1,
            "per_rank": json.dumps([{k: r[k] for k in ("ms", "peak_extra_bytes", "sent_bytes")} for r in rows])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--v", default="1000000,4000000", help="vocabulary sizes, comma separated")
    parser.add_argument("--n", default="8192", help="rows per step; one per loss (ce,sce order) or one for both")
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite's run)")
    parser.add_argument("--out", default=None, help="CSV to append to")
    parser.add_argument("--worker-spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_spec:
        row = worker(argparse.Namespace(**json.loads(args.worker_spec)))
        if row is not None:
            print(json.dumps(row), flush=True)
        return 0
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.d = int(SMOKE["d"])
    losses = args.losses.split(",")
    ns = args.n.split(",")
    n_of = dict(zip(losses, ns if len(ns) == len(losses) else ns * len(losses), strict=True))
    load = os.getloadavg()[0]
    rows = []
    script = os.path.abspath(__file__)
    for loss in losses:
        if loss not in LOSSES:
            print(f"unknown loss {loss!r}; choose from {LOSSES}", file=sys.stderr)
            return 2
        for v in args.v.split(","):
            for ranks in args.ranks.split(","):
                # One JSON argument: torch.distributed.run would take abbreviations such as --v for its own options.
                spec = json.dumps(dict(loss=loss, v=int(v), n=int(n_of[loss]), d=args.d, repeats=args.repeats,
                                       threads=args.threads))
                launcher = ["torch.distributed.run", "--standalone", "--nproc_per_node", ranks, script,
                            "--worker-spec", spec]
                result, reason = run_worker("-m", launcher, echo_failure=True)
                if result is None and TRANSPORT_FAILURE.search(reason):
                    print(f"{loss:>4} V={v:>8} ranks={ranks}: launch failed ({reason}); retrying once", flush=True)
                    result, reason = run_worker("-m", launcher, echo_failure=True)
                if result is None:
                    print(f"{loss:>4} V={v:>8} ranks={ranks}: failed: {reason}", flush=True)
                    continue
                row = {"date": date.today().isoformat(), "device": device_name("cpu"), "backend": "gloo",
                       "threads_per_rank": args.threads, "load_avg_1min": round(load, 2),
                       "versions": json.dumps(versions()), **result}
                rows.append(row)
                mib = 2.0**20
                print(f"{loss:>4} V={int(v):>8} N={int(n_of[loss]):>5} ranks={ranks}: {row['ms']:10.1f} ms/step  "
                      f"peak {row['peak_extra_bytes'] / mib:8.1f} MiB (shard+grad {row['state_bytes'] / mib:7.1f})  "
                      f"payload {row['payload_bytes'] / 1e6:7.3f} MB (floor {row['floor_bytes'] / 1e6:7.3f}, "
                      f"N+ND {row['nd_floor_bytes'] / 1e6:7.3f})  sent {row['sent_bytes'] / 1e6:7.3f} MB "
                      f"(ring {row['ring_bytes'] / 1e6:7.3f})  loss {row['loss_value']:.6f}", flush=True)
    append_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
