"""Scalable Cross-Entropy (SCE; Mezentsev, Gusak, Oseledets, Frolov, RecSys 2024, arXiv 2409.18721).

A softmax over a MIPS-selected subset of the catalogue: random bucket vectors pick, per bucket, the rows and the
items with the largest inner products with them, and each row's loss is a cross-entropy against the hard negatives
of the buckets that picked it. This follows the authors' reference (``SASRec.sce_forward`` in
AIRI-Institute/Scalable-SASRec) step for step, but never materialises the n_buckets x V selection scores (chunked
running top-k) nor the n_buckets x b_x x b_y bucket logits (fused gather kernel, recomputed in backward).
"""

from __future__ import annotations

import math

import torch

from . import parallel
from ._common import check_options, meta_loss, prepare_inputs
from .cross_entropy import _resolve_backend
from .ops._library import is_strict, poison, use_generator

# Paper/reference defaults: n_buckets = bucket_size_x = int(2 * sqrt(rows)).
BUCKETS_PER_SQRT_ROW = 2.0
# The reference grid searches 64...4096 items per bucket; 256 is the middle of that grid on a log scale. The
# quality/memory trade-off is data dependent: tune it like the paper does. (SASRec on ML-1M, 60 epochs: 256 ended
# 1.0% below full CE in NDCG@10, 1024 1.2% above; benchmarks/results/sasrec_summary_2026-11-23.md.)
DEFAULT_BUCKET_SIZE_Y = 256
# Item scores are computed this many (bucket x item) elements at a time (16 MiB in float32): small next to the
# (V, D) gradient any method needs, large enough that each chunk is one efficient GEMM.
SELECTION_CHUNK_ELEMENTS = 1 << 22


def _check_size(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def bucket_vectors(hidden: torch.Tensor, valid: torch.Tensor, n_buckets: int, mix_x: bool,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Random bucket directions (n_buckets, D), float32 (float64 for float64 inputs), no gradient.

    ``mix_x=False``: ``d**-0.25 * N(0, 1)``. ``mix_x=True``: ``Omega.T @ X`` with ``Omega ~ d**-0.25 * N(0, 1)`` of
    shape (N, n_buckets) over the non-ignored rows of ``hidden`` (the paper's remedy for bucket collapse).
    """
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    n_rows, dim = hidden.shape
    scale = dim**-0.25
    with torch.no_grad():
        if not mix_x:
            return torch.randn(n_buckets, dim, generator=generator, device=hidden.device, dtype=acc).mul_(scale)
        omega = torch.randn(n_rows, n_buckets, generator=generator, device=hidden.device, dtype=acc).mul_(scale)
        omega.mul_(valid.unsqueeze(1))
        return omega.T @ hidden.detach().to(acc)


def select_rows(hidden: torch.Tensor, valid: torch.Tensor, buckets: torch.Tensor, bucket_size_x: int) -> torch.Tensor:
    """(n_buckets, bucket_size_x) indices of the rows with the largest ``<bucket, x>``; ignored rows never."""
    with torch.no_grad():
        scores = buckets @ hidden.detach().to(buckets.dtype).T
        scores.masked_fill_(~valid.unsqueeze(0), float("-inf"))
        return scores.topk(bucket_size_x, dim=1).indices


def select_items(weight: torch.Tensor, buckets: torch.Tensor, bucket_size_y: int,
                 chunk: int | None = None) -> torch.Tensor:
    """(n_buckets, bucket_size_y) indices of the items with the largest ``<bucket, w>``, by a running top-k over
    vocabulary chunks: peak memory O(n_buckets * (bucket_size_y + chunk)) instead of n_buckets * V."""
    return top_items(weight, buckets, bucket_size_y, chunk)[1]


def top_items(weight: torch.Tensor, buckets: torch.Tensor, bucket_size_y: int, chunk: int | None = None,
              offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, ids)`` (n_buckets, min(bucket_size_y, V)) of :func:`select_items`; ids are ``offset + row``."""
    n_buckets = buckets.shape[0]
    if chunk is None:
        chunk = max(bucket_size_y, SELECTION_CHUNK_ELEMENTS // n_buckets)
    best_scores = buckets.new_empty((n_buckets, 0))
    best_items = torch.empty((n_buckets, 0), dtype=torch.long, device=weight.device)
    with torch.no_grad():
        for start in range(0, weight.shape[0], chunk):
            scores = buckets @ weight[start:start + chunk].detach().to(buckets.dtype).T
            items = torch.arange(offset + start, offset + start + scores.shape[1],
                                 device=weight.device).expand(n_buckets, -1)
            scores = torch.cat([best_scores, scores], dim=1)
            items = torch.cat([best_items, items], dim=1)
            top = scores.topk(min(bucket_size_y, scores.shape[1]), dim=1)
            best_scores, best_items = top.values, items.gather(1, top.indices)
    return best_scores, best_items


def bucket_plan(hidden, valid, n_buckets, bucket_size_x, bucket_size_y, vocab, mix_x, generator):
    """``(buckets, rows, b_y)``: the bucket vectors (G, D), their rows (G, b_x) and the items per bucket.

    Sizes: ``n_buckets`` and ``bucket_size_x`` default to ``int(2 * sqrt(m))`` for m non-ignored rows (one host
    read of m); ``b_x <= m`` and ``b_y <= V``. With m = 0 there are no rows to choose (b_x = 0).
    """
    n_valid = int(valid.sum())
    default = max(1, int(BUCKETS_PER_SQRT_ROW * math.sqrt(n_valid)))
    b_x = min(bucket_size_x or default, n_valid)
    buckets = bucket_vectors(hidden, valid, n_buckets or default, mix_x, generator)
    return buckets, select_rows(hidden, valid, buckets, b_x), min(bucket_size_y, vocab)


def select_buckets(hidden, weight, valid, n_buckets, bucket_size_x, bucket_size_y, mix_x, generator):
    """Bucket rows (G, b_x) and items (G, b_y) of one SCE call (runs inside ``largevocab::sce_select``)."""
    buckets, rows, b_y = bucket_plan(hidden, valid, n_buckets, bucket_size_x, bucket_size_y, weight.shape[0], mix_x,
                                     generator)
    return rows, select_items(weight, buckets, b_y)


def sce_from_selection(hidden, weight, targets, valid, rows, cols, *, reduction: str, backend: str):
    """SCE given the buckets' rows (n_b, b_x) and items (n_b, b_y); returns (reduced loss, per-row loss (N,)).

    Per bucket and row: ``CE = logsumexp([z+, z_negatives]) - z+`` where the negatives are the bucket's items other
    than the row's target; a row's loss is the max over the buckets that chose it, 0 for rows no bucket chose.
    ``targets`` must be in [0, V) at every row (ignored rows are never chosen).
    """
    lse_negatives, positive = torch.ops.largevocab.bucket_lse(hidden, weight, targets, rows, cols, backend)
    return reduce_buckets(lse_negatives, positive, rows, reduction)


def reduce_buckets(lse_negatives, positive, rows, reduction: str):
    """``(reduced loss, per-row loss (N,))`` from each bucket row's negatives' LSE (n_b, b_x) and the positives
    (N,): a row's loss is the max over the buckets that chose it of ``logaddexp(lse, z+) - z+``."""
    chosen_positive = positive[rows]
    bucket_ce = torch.logaddexp(lse_negatives, chosen_positive) - chosen_positive
    flat_rows = rows.reshape(-1)
    n_rows = positive.shape[0]
    row_loss = bucket_ce.new_zeros(n_rows).scatter_reduce(0, flat_rows, bucket_ce.reshape(-1), "amax",
                                                         include_self=False)
    if reduction == "none":
        return row_loss, row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total, row_loss
    covered = torch.zeros(n_rows, dtype=torch.bool, device=positive.device).index_fill_(0, flat_rows, True)
    return total / covered.sum().clamp(min=1).to(total.dtype), row_loss


def _check_sce_options(n_buckets, bucket_size_x, bucket_size_y, mix_x, generator) -> None:
    _check_size("n_buckets", n_buckets)
    _check_size("bucket_size_x", bucket_size_x)
    _check_size("bucket_size_y", bucket_size_y, allow_none=False)
    if not isinstance(mix_x, bool):
        raise TypeError(f"mix_x must be a bool, got {type(mix_x).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def scalable_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    n_buckets: int | None = None,
    bucket_size_x: int | None = None,
    bucket_size_y: int = DEFAULT_BUCKET_SIZE_Y,
    mix_x: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Scalable Cross-Entropy of ``hidden @ weight.T`` against ``targets``: a cross-entropy over hard negatives.

    Shapes: ``hidden`` (..., D), ``weight`` (V, D), ``targets`` (...) integer. With ``m`` non-ignored rows:

    1. ``z+_i = <x_i, W[y_i]>`` for every row (with gradient).
    2. ``n_buckets`` random bucket vectors ``B`` (no gradient, fresh each call; see :func:`bucket_vectors`).
    3. Bucket k takes the ``bucket_size_x`` non-ignored rows and ``bucket_size_y`` items with the largest
       ``<B_k, x>`` and ``<B_k, w>``.
    4. For each chosen row, ``CE = logsumexp([z+_i, <x_i, W[j]> for the bucket's items j != y_i]) - z+_i``.
    5. A row's loss is the max over the buckets that chose it. ``"mean"``: mean over rows chosen at least once
       (rows never chosen contribute nothing this step); ``"sum"``: their sum; ``"none"``: per row, shape of
       ``targets``, 0 for ignored or unchosen rows.

    Defaults: ``n_buckets = bucket_size_x = int(2 * sqrt(m))`` (the reference grid), ``bucket_size_y = 256``.
    Sizes larger than what exists are clamped: ``bucket_size_x <= m``, ``bucket_size_y <= V``; ``n_buckets`` may
    not exceed the number of rows N. With one bucket covering every row and item, this is exactly
    ``F.cross_entropy(hidden @ weight.T, targets)``.

    Torch equivalent (materialising, for given bucket indices ``rows`` (n_b, b_x) and ``cols`` (n_b, b_y))::

        logits = (hidden[rows] @ weight[cols].mT).masked_fill(cols[:, None] == targets[rows][..., None], -inf)
        pos = (hidden * weight[targets]).sum(-1)[rows]
        ce = torch.cat([pos[..., None], logits], -1).logsumexp(-1) - pos
        loss_per_row = zeros(N).scatter_reduce(0, rows.flatten(), ce.flatten(), "amax", include_self=False)

    ``generator`` (on ``hidden``'s device) makes the bucket draw reproducible; ``None`` draws from the global
    generator (the only choice under ``torch.compile``, where results equal eager ones for the same seed).
    ``backend``: ``"triton"`` (fused gather kernel), ``"torch"`` (chunked over buckets), ``"auto"``. The loss is
    float32 (float64 for float64 inputs). Under ``torch.autocast`` the inputs are cast as ``F.linear`` would.
    The number of non-ignored rows is read on the host once per call (the default sizes depend on it).
    ``process_group`` (or a ``DTensor`` weight): vocabulary parallelism as in
    :func:`largevocab.linear_cross_entropy`; each rank picks its shard's top items per bucket and the top
    ``bucket_size_y`` of all ranks' is kept, so with the same generator state on every rank the loss equals the
    unsharded one (see :mod:`largevocab.parallel`).
    """
    check_options(ignore_index=ignore_index, reduction=reduction, label_smoothing=0.0, z_loss=0.0, softcap=None,
                  shift=0, backend=backend)
    _check_sce_options(n_buckets, bucket_size_x, bucket_size_y, mix_x, generator)
    hidden, weight, _, targets, shard = parallel.resolve(weight, None, process_group, hidden=hidden, targets=targets)
    inputs = prepare_inputs(hidden, weight, targets, None, ignore_index=ignore_index, shift=0,
                            allow_empty_vocab=shard is not None)
    h, w = inputs.hidden, inputs.weight
    if n_buckets is not None and n_buckets > max(1, h.shape[0]):
        raise ValueError(f"n_buckets must be <= the number of rows N = {h.shape[0]}, got {n_buckets}")
    if h.device.type == "meta":
        return meta_loss(h, w, reduction, inputs.target_shape)
    resolved = _resolve_backend(backend, h.device)
    with use_generator(generator):
        if shard is not None:
            loss, per_row, bad = parallel.scalable_cross_entropy(
                h, w, inputs.targets, shard, n_buckets=n_buckets, bucket_size_x=bucket_size_x,
                bucket_size_y=bucket_size_y, mix_x=mix_x, ignore_index=ignore_index, reduction=reduction,
                backend=resolved, strict=is_strict())
        else:
            rows, cols, safe, valid, bad = torch.ops.largevocab.sce_select(
                h.detach(), w.detach(), inputs.targets, ignore_index, n_buckets, bucket_size_x, bucket_size_y, mix_x,
                is_strict(),
            )
            loss, per_row = sce_from_selection(h, w, safe, valid, rows, cols, reduction=reduction, backend=resolved)
    if reduction == "none":
        return poison(per_row, bad, per_row=True).reshape(inputs.target_shape)
    return poison(loss, bad, per_row=False)


class ScalableCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`scalable_cross_entropy`: ``ScalableCrossEntropyLoss(**options)(hidden, weight, targets)``.

    Holds no parameters; the item table ``weight`` (V, D) is passed at call time (tied embeddings work).
    """

    def __init__(
        self,
        *,
        n_buckets: int | None = None,
        bucket_size_x: int | None = None,
        bucket_size_y: int = DEFAULT_BUCKET_SIZE_Y,
        mix_x: bool = True,
        ignore_index: int = -100,
        reduction: str = "mean",
        generator: torch.Generator | None = None,
        backend: str = "auto",
        process_group=None,
    ) -> None:
        super().__init__()
        check_options(ignore_index=ignore_index, reduction=reduction, label_smoothing=0.0, z_loss=0.0,
                      softcap=None, shift=0, backend=backend)
        _check_sce_options(n_buckets, bucket_size_x, bucket_size_y, mix_x, generator)
        self.options = dict(n_buckets=n_buckets, bucket_size_x=bucket_size_x, bucket_size_y=bucket_size_y,
                            mix_x=mix_x, ignore_index=ignore_index, reduction=reduction, generator=generator,
                            backend=backend, process_group=process_group)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return scalable_cross_entropy(hidden, weight, targets, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k not in ("generator", "process_group"))
