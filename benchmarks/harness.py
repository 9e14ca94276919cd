"""Pieces shared by the benchmark scripts: timing, one process per measurement, device/library facts, CSV."""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

from largevocab.profiling import STABLE_RSS_ENV, device_name  # noqa: F401  (device_name: re-exported)


def time_ms(fn, device: str, repeats: int) -> float:
    """Median milliseconds of ``fn()`` after one warm-up (``triton.testing.do_bench`` on CUDA)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(100, repeats * 20), return_mode="median")
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "largevocab", "cut_cross_entropy", "liger_kernel", "transformers"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        out[name] = getattr(module, "__version__", "installed")
    return out


# A raised exception's own line ("ValueError: ...", "[rank1]: RuntimeError: ..."), as opposed to a launcher's.
_EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|Interrupt)\b.*")
_LAUNCHER_ERROR = "torch.distributed.elastic"


def failure_reason(stderr: str) -> str:
    """The line of a failed worker's stderr that says why: the first exception a worker raised (under
    ``torch.distributed.run`` the launcher's own ChildFailedError and its box of ``=`` come after it), else the last
    line that is not decoration."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if _EXCEPTION_LINE.match(line) and _LAUNCHER_ERROR not in line:
            return line
    return next((line for line in reversed(lines) if line.strip("=-")), "failed")


def run_worker(script: str, args: list[str], echo_failure: bool = False) -> tuple[dict | None, str]:
    """Run ``python script *args`` in a fresh process (its own peak memory); its last stdout line is a JSON row.
    On failure: ``(None, failure_reason(stderr))``, and with ``echo_failure`` the worker's whole stderr goes to
    ours (for failures that are never expected, where the line alone would not be enough to act on)."""
    env = {**os.environ, **STABLE_RSS_ENV}
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        if echo_failure:
            print(f"worker {script} {' '.join(args)} exited with {proc.returncode}:\n{proc.stderr}", file=sys.stderr,
                  flush=True)
        return None, failure_reason(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def append_csv(rows: list[dict], path: str | None) -> None:
    """Append ``rows`` to the CSV at ``path``; rows with other columns than the file's (another task's) rewrite
    the file under the union of both, atomically, instead of appending lines that do not match its header."""
    if not path or not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old = list(reader)
            header = list(reader.fieldnames or [])
        if header == columns:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=columns).writerows(rows)
            return
        columns, rows = list(dict.fromkeys(header + columns)), old + rows
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
