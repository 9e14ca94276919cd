"""The lowest training loss a popularity-only model reaches under SASRec's (g)BCE: one score per item, the same for
every user. A run whose training loss sits at this floor has learned the items' popularity and nothing else.

    python benchmarks/sasrec_popularity_floor.py --data ../shared/data/rec/ml-1m.txt --max-len 200 \
        --setting 1:0 --setting 256:0.75 --setting 256:0

With K negatives per position drawn uniformly (with replacement) from the V items, the positive weighted by beta
(gBCE's ``beta`` for t; 1 for BCE) and item i the target at a fraction q_i of the training positions, the expected
loss per logit of item scores s (the loss of ``integrations/sasrec/losses.py``, averaged over positions) is::

    L(s) = (beta * sum_i q_i softplus(-s_i) + (K / V) * sum_i softplus(s_i)) / (1 + K)

Each term is convex in its s_i and is smallest where ``beta q_i sigmoid(-s_i) = (K / V) sigmoid(s_i)``, i.e.
``s_i = log(beta q_i V / K)`` (items never a target: s_i -> -inf, contributing 0). The positions are those of
``TrainBatches`` (each history's last ``max_len`` transitions), so q is exactly what one epoch trains on.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from largevocab.integrations.sasrec.data import TrainBatches, leave_one_out, read_sasrec_txt
from largevocab.integrations.sasrec.losses import gbce_beta


def target_frequencies(histories, num_items: int, max_len: int) -> np.ndarray:
    """q (num_items,): the fraction of training positions whose target is item i (ids 1..num_items)."""
    batches = TrainBatches(histories, max_len=max_len, batch_size=len(histories))
    _, targets = batches.collate(batches.histories)
    counts = np.bincount(targets.numpy().ravel(), minlength=num_items + 1)[1:]  # id 0 is padding
    return counts / counts.sum()


def popularity_floor(q: np.ndarray, num_negatives: int, beta: float) -> float:
    """min over per-item scores s of L(s) above, per logit."""
    v, k = len(q), num_negatives
    seen = q > 0
    s = np.log(beta * q[seen] * v / k)
    positive = beta * float((q[seen] * np.logaddexp(0.0, -s)).sum())
    negative = k / v * float(np.logaddexp(0.0, s).sum())
    return (positive + negative) / (1 + k)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a SASRec-format file (user item per line)")
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--setting", action="append", default=None,
                        help="K:t (negatives : gBCE t; t = 0 is BCE), repeatable (default 1:0 and 256:0.75)")
    args = parser.parse_args(argv)
    split = leave_one_out(read_sasrec_txt(args.data))
    q = target_frequencies(split.train, split.num_items, args.max_len)
    print(f"{args.data}: {split.num_items} items, {len(q.nonzero()[0])} of them targets, window {args.max_len}")
    for setting in args.setting or ["1:0", "256:0.75"]:
        k_text, t_text = setting.split(":")
        k, t = int(k_text), float(t_text)
        beta = gbce_beta(k, split.num_items, t)
        print(f"K = {k:4d}, t = {t:.2f} (beta = {beta:.4f}): popularity-only floor {popularity_floor(q, k, beta):.5f} "
              f"per logit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
