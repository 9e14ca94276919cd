"""A one-minute demonstration: full cross-entropy against largevocab's fused loss on an LM-head-sized problem.

Both compute the same loss and gradients; the fused loss never holds the N x V logits, so its peak memory is a
fraction of the full loss's. Each loss is measured in its own subprocess so the peaks do not mix.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from .cross_entropy import linear_cross_entropy
from .profiling import PeakMemory

LOSSES = ("full", "largevocab")


def _inputs(n: int, v: int, d: int, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) * d**-0.5).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    return hidden, weight, targets


def measure(loss: str, n: int, v: int, d: int, device: str, seed: int = 0) -> dict:
    """Forward + backward of one loss: value, gradient checksums, seconds and peak extra bytes."""
    hidden, weight, targets = _inputs(n, v, d, device, seed)
    if loss == "full":
        fn = lambda: F.cross_entropy(hidden @ weight.T, targets)  # noqa: E731
    elif loss == "largevocab":
        fn = lambda: linear_cross_entropy(hidden, weight, targets)  # noqa: E731
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    start = time.perf_counter()
    with PeakMemory(device) as memory:
        value = fn()
        value.backward()
    seconds = time.perf_counter() - start
    return {"loss": loss, "value": value.item(), "grad_hidden_norm": hidden.grad.norm().item(),
            "grad_weight_norm": weight.grad.norm().item(), "seconds": seconds,
            "peak_extra_mib": memory.extra_bytes / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="largevocab demo", description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096, help="N: tokens in the batch")
    parser.add_argument("--vocab", type=int, default=50257, help="V: vocabulary size (GPT-2's by default)")
    parser.add_argument("--dim", type=int, default=256, help="D: hidden size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", choices=LOSSES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.tokens, args.vocab, args.dim, args.device)))
        return 0

    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"N={args.tokens} tokens, V={args.vocab}, D={args.dim} on {args.device}: "
          f"the float32 logits alone are {logits_mib:.0f} MiB")
    results = []
    for loss in LOSSES:
        cmd = [sys.executable, "-m", "largevocab", "demo", "--tokens", str(args.tokens), "--vocab", str(args.vocab),
               "--dim", str(args.dim), "--device", args.device, "--worker", loss]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'loss':>12} {'value':>12} {'|dH|':>10} {'|dW|':>10} {'seconds':>8} {'peak MiB':>9}")
    for r in results:
        print(f"{r['loss']:>12} {r['value']:12.6f} {r['grad_hidden_norm']:10.5f} {r['grad_weight_norm']:10.5f} "
              f"{r['seconds']:8.2f} {r['peak_extra_mib']:9.1f}")
    full, ours = results
    same = abs(full["value"] - ours["value"]) <= 1e-4 * abs(full["value"])
    print(f"same loss: {same}; largevocab used {ours['peak_extra_mib'] / max(full['peak_extra_mib'], 1e-9):.0%} "
          "of the full loss's peak memory")
    return 0 if same else 1
