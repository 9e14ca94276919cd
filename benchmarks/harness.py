"""Pieces shared by the benchmark scripts: timing, one process per measurement, device/library facts, CSV."""

from __future__ import annotations

import csv
import json
import os
import platform
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


def run_worker(script: str, args: list[str]) -> tuple[dict | None, str]:
    """Run ``python script *args`` in a fresh process (its own peak memory); its last stdout line is a JSON row."""
    env = {**os.environ, **STABLE_RSS_ENV}
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return None, (proc.stderr.strip().splitlines() or ["failed"])[-1]
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
