"""Sampled cross-entropy: time and peak extra memory of each provider, per-row and shared negatives.

    python benchmarks/bench_sampled.py --device cpu --n 2048 --k 256 --v 100000 --d 128 --dtype float32
    python benchmarks/bench_sampled.py --device cuda --n 16384 --k 1024 --v 1000000 --d 256 --dtype bfloat16

Providers: ``torch_materialised`` gathers ``W[neg]`` for every row and materialises the N x (1 + K) sampled logits
(what a plain PyTorch sampled softmax does), ``lv_torch`` and ``lv_triton`` are ``largevocab.sampled`` backends.
All score the same explicit negatives (uniform, with logQ correction and accidental-hit removal), drawn once with a
fixed seed, so sampling itself is not timed. Every provider runs in a fresh subprocess so that its peak memory is
its own (``largevocab.profiling.PeakMemory``: on CUDA the allocator's peak above the inputs, on CPU the process's
peak RSS). Time is the median over repeats after one warm-up (``triton.testing.do_bench`` on CUDA). The loss
error is against the torch backend in float64. Results go to a long-format CSV (one row per provider x layout x
mode) with the device, the date and library versions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import date

import torch
import torch.nn.functional as F

from largevocab.profiling import PeakMemory

from harness import append_csv, device_name, run_worker, time_ms, versions

PROVIDERS = ("torch_materialised", "lv_torch", "lv_triton")
LAYOUTS = ("rows", "shared")
MODES = ("forward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED = 0
WARMUP_ROWS = 8


def make_inputs(n, k, v, d, dtype, device, layout):
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    hidden = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(v, d, generator=gen) * d**-0.5).to(device=device, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    negatives = torch.randint(0, v, (k,) if layout == "shared" else (n, k), generator=gen).to(device)
    return hidden, weight, targets, negatives


def _materialised(h, w, y, neg):
    """Plain PyTorch: the (N, K, D) gather (per row) and the (N, 1 + K) logits exist in full."""
    vocab, k = w.shape[0], neg.shape[-1]
    pos = (h * w[y]).sum(-1).float()
    if neg.dim() == 1:
        z = (h @ w[neg].T).float()
        neg = neg.expand(len(y), -1)
    else:
        z = torch.bmm(w[neg], h.unsqueeze(2)).squeeze(2).float()
    z = (z + (math.log(vocab) - math.log(k))).masked_fill(neg == y[:, None], float("-inf"))
    logits = torch.cat([pos[:, None], z], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(y))


def build(provider: str):
    """The loss ``(hidden, weight, targets, negatives) -> scalar`` of one provider."""
    from largevocab.sampled import sampled_cross_entropy

    if provider == "torch_materialised":
        return _materialised
    if provider in ("lv_torch", "lv_triton"):
        backend = provider.removeprefix("lv_")
        return lambda h, w, y, neg: sampled_cross_entropy(h, w, y, negatives=neg, backend=backend)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def worker(args) -> dict:
    """Measure one provider, layout and mode in this (fresh) process; returns a result row."""
    device, dtype = args.device, DTYPES[args.dtype]
    hidden, weight, targets, negatives = make_inputs(args.n, args.k, args.v, args.d, dtype, device, args.layout)
    fn = build(args.provider)
    # Lazy one-time initialisation (BLAS workspaces, kernel compilation for a tiny shape) is not the loss's memory.
    weight.requires_grad_(True)
    warm_neg = negatives if args.layout == "shared" else negatives[:WARMUP_ROWS]
    fn(hidden[:WARMUP_ROWS], weight, targets[:WARMUP_ROWS], warm_neg).backward()
    weight.grad = None
    hidden.requires_grad_(args.mode != "forward")
    weight.requires_grad_(args.mode != "forward")

    def forward():
        with torch.no_grad():
            return fn(hidden, weight, targets, negatives)

    def forward_backward():
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, targets, negatives)
        loss.backward()
        return loss

    step = forward if args.mode == "forward" else forward_backward
    with PeakMemory(device) as memory:
        loss = step()
    return {"provider": args.provider, "layout": args.layout, "mode": args.mode,
            "ms": time_ms(step, device, args.repeats), "peak_extra_bytes": int(memory.extra_bytes),
            "loss": float(loss)}


def float64_reference(args, layout) -> float:
    from largevocab.sampled import sampled_cross_entropy

    hidden, weight, targets, negatives = make_inputs(args.n, args.k, args.v, args.d, DTYPES[args.dtype], "cpu",
                                                     layout)
    return float(sampled_cross_entropy(hidden.double(), weight.double(), targets, negatives=negatives,
                                       backend="torch"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=2048, help="rows (tokens or users)")
    parser.add_argument("--k", type=int, default=256, help="negatives per row (per-row) or in the shared set")
    parser.add_argument("--v", type=int, default=100_000, help="items")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--providers", default=None, help="comma-separated subset of " + ",".join(PROVIDERS))
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of " + ",".join(LAYOUTS))
    parser.add_argument("--modes", default="forward+backward", help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="CSV to append to")
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.provider:  # worker process
        print(json.dumps(worker(args)))
        return 0

    providers = args.providers.split(",") if args.providers else [
        p for p in PROVIDERS if args.device == "cuda" or p != "lv_triton"]
    meta = {"date": date.today().isoformat(), "device": device_name(args.device), "n": args.n, "k": args.k,
            "v": args.v, "d": args.d, "dtype": args.dtype, "versions": json.dumps(versions())}
    rows = []
    for layout in args.layouts.split(","):
        ref = float64_reference(args, layout)
        for provider in providers:
            for mode in args.modes.split(","):
                result, reason = run_worker(__file__, [
                    "--device", args.device, "--n", str(args.n), "--k", str(args.k), "--v", str(args.v),
                    "--d", str(args.d), "--dtype", args.dtype, "--repeats", str(args.repeats),
                    "--provider", provider, "--layout", layout, "--mode", mode])
                if result is None:
                    print(f"{provider:>18} {layout:>6} {mode:>17}  skipped: {reason}", flush=True)
                    continue
                row = {**meta, **result}
                row["loss_abs_error"] = abs(row["loss"] - ref)
                rows.append(row)
                print(f"{provider:>18} {layout:>6} {mode:>17}  {row['ms']:10.2f} ms  peak extra "
                      f"{row['peak_extra_bytes'] / 2**20:9.1f} MiB  |loss err| {row['loss_abs_error']:.2e}",
                      flush=True)
    append_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
