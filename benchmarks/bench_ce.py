"""Exact linear + cross-entropy: time and peak extra memory of each provider against full (materialised) CE.

    python benchmarks/bench_ce.py --device cpu --n 4096 --v 131072 --d 256 --dtype float32
    python benchmarks/bench_ce.py --device cuda --n 8192 --v 256000 --d 2304 --dtype bfloat16   # Gemma-2-2B head

Every provider runs in a fresh subprocess so that its peak memory is its own: on CUDA the allocator's peak above
the inputs, on CPU the process's peak RSS above what it held once the inputs existed. Time is the median over
repeats after one warm-up (``triton.testing.do_bench`` on CUDA). The loss error is against a float64 chunked
computation (the torch backend in float64, itself tested against ``F.cross_entropy`` on float64 logits).
Results go to a long-format CSV (one row per provider x mode) with the device and library versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date

import torch
import torch.nn.functional as F

from largevocab.profiling import PeakMemory

from harness import append_csv, device_name, run_worker, time_ms, versions

PROVIDERS = ("torch_eager", "torch_compile", "torch_native", "cce_apple", "liger", "lv_torch", "lv_triton",
             "lv_triton_filtered", "lv_sce", "lv_sampled", "lv_sampled_shared")
# Approximate losses are measured beside the exact ones; their "loss error" is their gap to exact CE.
APPROXIMATE = ("lv_sce", "lv_sampled", "lv_sampled_shared")
SAMPLED_NEGATIVES = 1024
MODES = ("forward", "backward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED = 0
WARMUP_ROWS = 8


def make_inputs(n, v, d, dtype, device):
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    hidden = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(v, d, generator=gen) * d**-0.5).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    return hidden, weight, targets


def _eager(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y)


def build(provider: str, device: str):
    """The loss function ``(hidden, weight, targets) -> scalar`` of one provider, or raise ImportError."""
    import largevocab as lv

    if provider == "torch_eager":
        return _eager
    if provider == "torch_compile":
        return torch.compile(_eager)
    if provider == "torch_native":
        if not hasattr(F, "linear_cross_entropy"):
            raise ImportError("torch.nn.functional.linear_cross_entropy needs torch >= 2.13")
        return lambda h, w, y: F.linear_cross_entropy(h, w, y)
    if provider == "cce_apple":
        from cut_cross_entropy import linear_cross_entropy as cce

        return lambda h, w, y: cce(h, w, y)
    if provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()
        return lambda h, w, y: loss(w, h, y)
    if provider == "lv_torch":
        return lambda h, w, y: lv.linear_cross_entropy(h, w, y, backend="torch")
    if provider == "lv_triton":
        return lambda h, w, y: lv.linear_cross_entropy(h, w, y, backend="triton")
    if provider == "lv_triton_filtered":
        return lambda h, w, y: lv.linear_cross_entropy(h, w, y, backend="triton", filter_eps="auto")
    if provider == "lv_sce":
        gen = torch.Generator(device=device).manual_seed(SEED)
        return lambda h, w, y: lv.scalable_cross_entropy(h, w, y, generator=gen)
    if provider in ("lv_sampled", "lv_sampled_shared"):
        gen = torch.Generator(device=device).manual_seed(SEED)
        shared = provider == "lv_sampled_shared"
        return lambda h, w, y: lv.sampled_cross_entropy(h, w, y, num_negatives=SAMPLED_NEGATIVES,
                                                        shared_negatives=shared, generator=gen)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def worker(args) -> dict:
    """Measure one provider in one mode in this (fresh) process; returns a result row."""
    device, dtype = args.device, DTYPES[args.dtype]
    hidden, weight, targets = make_inputs(args.n, args.v, args.d, dtype, device)
    fn = build(args.provider, device)
    # Lazy one-time initialisation (BLAS workspaces, kernel compilation for a tiny shape) is not the loss's memory.
    weight.requires_grad_(True)
    fn(hidden[:WARMUP_ROWS], weight, targets[:WARMUP_ROWS]).backward()
    weight.grad = None
    hidden.requires_grad_(args.mode != "forward")
    weight.requires_grad_(args.mode != "forward")

    def forward():
        with torch.no_grad():
            return fn(hidden, weight, targets)

    def forward_backward():
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, targets)
        loss.backward()
        return loss

    if args.mode == "backward":
        def step():
            hidden.grad = weight.grad = None
            loss = fn(hidden, weight, targets)
            start = time.perf_counter()
            loss.backward()
            return time.perf_counter() - start
    else:
        step = forward if args.mode == "forward" else forward_backward

    with PeakMemory(device) as memory:
        loss = (forward if args.mode == "forward" else forward_backward)()
    peak = memory.extra_bytes
    if args.mode == "backward" and device != "cuda":
        step()
        ms = statistics.median(step() * 1e3 for _ in range(args.repeats))
    elif args.mode == "backward":
        fwd = time_ms(forward_backward, device, args.repeats)
        ms = fwd - time_ms(lambda: fn(hidden, weight, targets), device, args.repeats)
    else:
        ms = time_ms(step, device, args.repeats)
    return {"provider": args.provider, "mode": args.mode, "ms": ms, "peak_extra_bytes": int(peak),
            "loss": float(loss)}


def float64_reference(args) -> float:
    import largevocab as lv

    hidden, weight, targets = make_inputs(args.n, args.v, args.d, DTYPES[args.dtype], "cpu")
    return float(lv.linear_cross_entropy(hidden.double(), weight.double(), targets, backend="torch"))


def floors(n, v, d, dtype) -> dict:
    """FLOPs of the exact fused algorithm (2NVD forward, 6NVD backward with recompute) and the bytes it must move."""
    elem = torch.finfo(DTYPES[dtype]).bits // 8
    return {"flops_forward": 2 * n * v * d, "flops_forward+backward": 8 * n * v * d,
            "bytes_min_forward+backward": elem * 2 * (n * d + v * d), "bytes_dh_plus_dw": elem * (n * d + v * d)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", default="4096", help="token count(s), comma-separated for a sweep")
    parser.add_argument("--v", default="131072", help="vocabulary size(s), comma-separated for a sweep")
    parser.add_argument("--d", default="256", help="hidden size(s), comma-separated for a sweep")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--providers", default=None, help="comma-separated subset of " + ",".join(PROVIDERS))
    parser.add_argument("--modes", default="forward+backward", help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="CSV to append to")
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.provider:  # worker process
        args.n, args.v, args.d = int(args.n), int(args.v), int(args.d)
        print(json.dumps(worker(args)))
        return 0

    rows = []
    for n in args.n.split(","):
        for v in args.v.split(","):
            for d in args.d.split(","):
                shape = argparse.Namespace(**{**vars(args), "n": int(n), "v": int(v), "d": int(d)})
                rows += measure_shape(shape)
    append_csv(rows, args.out)
    return 0


def measure_shape(args) -> list[dict]:
    """Every provider x mode at one (N, V, D); prints a line per measurement and returns the rows."""
    providers = args.providers.split(",") if args.providers else [
        p for p in PROVIDERS if args.device == "cuda" or not p.startswith(("lv_triton", "cce", "liger"))]
    modes = args.modes.split(",")
    ref = float64_reference(args)
    meta = {"date": date.today().isoformat(), "device": device_name(args.device), "n": args.n, "v": args.v,
            "d": args.d, "dtype": args.dtype, **floors(args.n, args.v, args.d, args.dtype),
            "versions": json.dumps(versions())}
    print(f"N={args.n} V={args.v} D={args.d} {args.dtype} on {meta['device']}", flush=True)
    rows = []
    for provider in providers:
        for mode in modes:
            result, reason = run_worker(__file__, [
                "--device", args.device, "--n", str(args.n), "--v", str(args.v), "--d", str(args.d), "--dtype",
                args.dtype, "--repeats", str(args.repeats), "--provider", provider, "--mode", mode])
            if result is None:
                print(f"{provider:>20} {mode:>17}  skipped: {reason}", flush=True)
                continue
            row = {**meta, **result, "approximate": provider in APPROXIMATE}
            row["loss_abs_error"] = abs(row["loss"] - ref)
            row["tflops_exact_algorithm"] = (
                row["flops_forward+backward"] / (row["ms"] * 1e-3) / 1e12 if mode == "forward+backward" else ""
            )
            rows.append(row)
            print(f"{provider:>20} {mode:>17}  {row['ms']:10.1f} ms  peak extra "
                  f"{row['peak_extra_bytes'] / 2**20:9.1f} MiB  |loss err| {row['loss_abs_error']:.2e}", flush=True)
    mib = 2**20
    print(f"floor: {meta['flops_forward+backward'] / 1e9:.1f} GFLOP (8NVD), "
          f"{meta['bytes_min_forward+backward'] / mib:.1f} MiB moved, "
          f"dH + dW = {meta['bytes_dh_plus_dw'] / mib:.1f} MiB")
    return rows


if __name__ == "__main__":
    sys.exit(main())
