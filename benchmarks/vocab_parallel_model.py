"""A paper model (not a measurement) of vocabulary parallelism: memory per rank and communication per step.

    python benchmarks/vocab_parallel_model.py            # the README's tables (markdown)

Scenarios: (a) 8 x H100 with a 100M-item catalogue (SASRec-style, D = 64 or 256), (b) a 256k-vocabulary 70B-class
LM at tensor parallelism 8 (D = 8192). Assumptions, stated so that they can be checked:

* State per table element: fp32 training keeps weight, gradient and Adam's two moments in fp32 (16 B); bf16 mixed
  precision keeps a bf16 weight and gradient plus fp32 master weight and moments (2 + 2 + 4 + 4 + 4 = 16 B). Both
  are 16 B; bf16 halves what the loss reads (weight) and writes (gradient).
* Logits avoided: the (N, V) logits an unfused head materialises, and their gradient (same size), in fp32 for the
  softmax; per rank with a vocabulary-parallel but unfused head, (N, V / W).
* Bytes each rank sends per step, ring algorithms: all-reduce of S bytes ``2 (W - 1) / W * S``, all-gather of s
  bytes per rank ``(W - 1) * s``, reduce-scatter of S ``(W - 1) / W * S``. The loss's collectives are those of
  ``largevocab.parallel`` (exact CE: 3N fp32 forward, N x D dH backward in the hidden states' dtype).
* (a) uses ``integrations/sasrec/sharded.py``'s layout (the vocabulary group is the data-parallel group): ids
  all-gathered, lookup reduce-scattered and its gradient all-gathered, hidden states all-gathered, plus the loss.
* FLOPs: exact CE costs 3 GEMMs of 2 N (V / W) D per rank (forward, dH, dW); SCE's selection 2 n_b (V / W) D with
  ``n_b = 2 sqrt(N)`` bucket vectors, its bucket softmax being small at these sizes.
"""

from __future__ import annotations

import argparse
import math

STATE_BYTES = 16  # weight + gradient + Adam m, v (fp32), or bf16 weight/gradient + fp32 master/m/v
FP32 = 4


def ring_all_reduce(size: float, world: int) -> float:
    return 2 * (world - 1) / world * size


def ring_all_gather(per_rank: float, world: int) -> float:
    return (world - 1) * per_rank


def ring_reduce_scatter(size: float, world: int) -> float:
    return (world - 1) / world * size


def head(vocab: int, dim: int, world: int, n: int, hidden_bytes: int) -> dict:
    """Memory and the loss's communication for one (V, D) output layer sharded over ``world`` ranks, N rows."""
    elements = vocab * dim
    return {
        "table_bytes": elements * STATE_BYTES,
        "rank_bytes": elements / world * STATE_BYTES,
        "logit_bytes": 2 * n * vocab * FP32,
        "rank_logit_bytes": 2 * n * vocab / world * FP32,
        "loss_sent": ring_all_reduce(3 * n * FP32, world) + ring_all_reduce(n * dim * hidden_bytes, world),
        "ce_flops_per_rank": 3 * 2 * n * (vocab / world) * dim,
        "sce_select_flops_per_rank": 2 * int(2 * math.sqrt(n)) * (vocab / world) * dim,
    }


def sasrec_layout_sent(n: int, dim: int, world: int, p: int = FP32) -> float:
    """The lookup and gathers of the sharded SASRec layout on top of the loss (n positions in the global batch)."""
    full = n * dim * p
    return (ring_all_gather(8 * n / world, world) + ring_reduce_scatter(full, world)
            + ring_all_gather(full / world, world) + ring_all_gather(full / world, world))


def fmt(x: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.0f} B"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=65536, help="rows (positions / tokens) per step")
    args = parser.parse_args(argv)
    n = args.n
    print(f"(a) 8 ranks, 100M items, N = {n:,} positions per step (the global batch), fp32 hidden states\n")
    print("| D | table + grad + Adam, whole | per rank | logits + grad avoided, whole / per rank | "
          "sent per rank per step: loss | + lookup and gathers | exact CE / SCE-selection FLOPs per rank |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for dim in (64, 256):
        h = head(100_000_000, dim, 8, n, FP32)
        print(f"| {dim} | {fmt(h['table_bytes'])} | {fmt(h['rank_bytes'])} | {fmt(h['logit_bytes'])} / "
              f"{fmt(h['rank_logit_bytes'])} | {fmt(h['loss_sent'])} | {fmt(sasrec_layout_sent(n, dim, 8))} | "
              f"{h['ce_flops_per_rank']:.3g} / {h['sce_select_flops_per_rank']:.3g} |")
    replicated = ring_all_reduce(100_000_000 * 64 * FP32, 8)
    print(f"\nFor comparison, DDP over a replicated 100M x 64 fp32 table all-reduces its dense gradient: "
          f"{fmt(replicated)} sent per rank per step.\n")
    print(f"(b) 256,000-token vocabulary, D = 8192, TP = 8, N = {n:,} tokens per step of the TP group\n")
    print("| dH dtype | head + grad + Adam, whole | per rank | logits + grad avoided, whole / per rank | "
          "loss sent per rank per step | exact CE FLOPs per rank |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, p in (("bf16", 2), ("fp32", 4)):
        h = head(256_000, 8192, 8, n, p)
        print(f"| {name} | {fmt(h['table_bytes'])} | {fmt(h['rank_bytes'])} | {fmt(h['logit_bytes'])} / "
              f"{fmt(h['rank_logit_bytes'])} | {fmt(h['loss_sent'])} | {h['ce_flops_per_rank']:.3g} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
