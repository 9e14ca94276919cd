"""Large-catalogue losses (recommender scale): full CE, exact fused CE, SCE and sampled CE, one training step each.

    python benchmarks/bench_catalogue.py --device cpu --n 4096 --v 262144 --d 64
    python benchmarks/bench_catalogue.py --device cuda --n 65536 --v 1000000,10000000 --d 64,256

Each (provider, shape) runs in its own process: forward + backward of the loss alone, median time after a warm-up
and the peak memory above the inputs (CUDA allocator, or the process's RSS on CPU). A provider that runs out of
memory is reported as skipped with the reason; the size of the float32 logits it would need is in the CSV
(``logits_bytes``) so the comparison is never guessed.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date

import torch
import torch.nn.functional as F

import largevocab as lv
from largevocab.profiling import PeakMemory

from harness import append_csv, device_name, run_worker, time_ms, versions

PROVIDERS = ("full_ce", "lv_ce", "lv_sce", "lv_sampled", "lv_sampled_shared")
SEED = 0
SAMPLED_NEGATIVES = 512
WARMUP_ROWS = 8


def make_inputs(n, v, d, dtype, device):
    gen = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) * d**-0.5).to(device=device, dtype=dtype).requires_grad_()
    # Recommender-like skew: item popularity follows a Zipf law.
    popularity = 1.0 / torch.arange(1, v + 1, dtype=torch.float64)
    targets = torch.multinomial(popularity, n, replacement=True, generator=gen).to(device)
    return hidden, weight, targets


def build(provider: str, backend: str):
    if provider == "full_ce":
        return lambda h, w, y: F.cross_entropy((h @ w.T).float(), y)
    if provider == "lv_ce":
        return lambda h, w, y: lv.linear_cross_entropy(h, w, y, backend=backend)
    if provider == "lv_sce":
        gen = torch.Generator(device="cuda" if backend == "triton" else "cpu").manual_seed(SEED)
        return lambda h, w, y: lv.scalable_cross_entropy(h, w, y, generator=gen, backend=backend)
    if provider in ("lv_sampled", "lv_sampled_shared"):
        shared = provider == "lv_sampled_shared"
        gen = torch.Generator(device="cuda" if backend == "triton" else "cpu").manual_seed(SEED)
        return lambda h, w, y: lv.sampled_cross_entropy(h, w, y, num_negatives=SAMPLED_NEGATIVES,
                                                        shared_negatives=shared, generator=gen, backend=backend)
    raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")


def worker(args) -> dict:
    dtype = getattr(torch, args.dtype)
    hidden, weight, targets = make_inputs(args.n, args.v, args.d, dtype, args.device)
    fn = build(args.provider, "triton" if args.device == "cuda" else "torch")

    def step():
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, targets)
        loss.backward()
        return loss

    # Warm up on a few rows only: one-time initialisation is not the loss's memory, and a full-size warm-up would
    # leave freed blocks in the CPU allocator that the measured step reuses without raising the RSS.
    fn(hidden[:WARMUP_ROWS], weight, targets[:WARMUP_ROWS]).backward()
    hidden.grad = weight.grad = None
    with PeakMemory(args.device) as memory:
        loss = step()
    return {"provider": args.provider, "ms": time_ms(step, args.device, args.repeats),
            "peak_extra_bytes": memory.extra_bytes, "loss": float(loss)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", default="262144", help="comma-separated catalogue sizes")
    parser.add_argument("--d", default="64", help="comma-separated hidden sizes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="CSV to append to")
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.provider:  # worker process
        args.v, args.d = int(args.v), int(args.d)
        import json

        print(json.dumps(worker(args)))
        return 0

    rows = []
    for v in (int(x) for x in args.v.split(",")):
        for d in (int(x) for x in args.d.split(",")):
            meta = {"date": date.today().isoformat(), "device": device_name(args.device), "n": args.n, "v": v,
                    "d": d, "dtype": args.dtype, "logits_bytes": 4 * args.n * v, "versions": str(versions())}
            for provider in args.providers.split(","):
                result, reason = run_worker(__file__, [
                    "--device", args.device, "--n", str(args.n), "--v", str(v), "--d", str(d), "--dtype", args.dtype,
                    "--repeats", str(args.repeats), "--provider", provider])
                if result is None:
                    print(f"V={v:>9} D={d:>4} {provider:>18}  skipped: {reason}", flush=True)
                    continue
                rows.append({**meta, **result})
                print(f"V={v:>9} D={d:>4} {provider:>18}  {result['ms']:10.1f} ms  peak extra "
                      f"{result['peak_extra_bytes'] / 2**20:9.1f} MiB  loss {result['loss']:.4f}", flush=True)
    append_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
