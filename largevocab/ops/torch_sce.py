"""Pure-PyTorch bucketed log-sum-exp for Scalable Cross-Entropy: chunked over buckets, recomputed in backward.

For G buckets, each pairing R rows of ``hidden`` with C rows (items) of ``weight`` by index, it computes
``lse[g, r] = logsumexp_c(<hidden[rows[g, r]], weight[cols[g, c]]>)`` over the items that are not that row's
target (those are masked to -inf, so a row whose every candidate is its target gets -inf; so is an item id equal
to V, which marks an item held by another rank in the vocabulary-parallel form), and every row's
positive logit ``<hidden[n], weight[targets[n]]>``. Both come from one op (``largevocab::bucket_lse``) so that
backward builds a single (V, D) gradient buffer (two would each materialise one, and autograd would add them).
Peak extra memory is O(chunk * R * C) logits plus the gathered rows of one chunk of buckets, never all G * R * C
at once; backward recomputes the logits.
"""

from __future__ import annotations

import torch

# Buckets per chunk are chosen so one chunk's logits hold about this many elements (16 MiB in float32). The
# chunk's exp and mask temporaries scale with it; at 16 MiB a batched matmul is still efficient on CPU (measured on
# the SASRec ML-1M shape, 20k rows x 283 buckets x 256 items: 0.88 s and 100 MiB peak vs 0.90 s and 191 MiB at
# 64 MiB chunks).
CHUNK_ELEMENTS = 1 << 22


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bucket_logits(hidden, weight, targets, rows, cols):
    """Masked logits (g, R, C) of a chunk of buckets in the accumulation dtype, the gathered operands and the
    clamped item ids (an item id V is absent: -inf, as the row's own target is)."""
    vocab = weight.shape[0]
    items = cols.clamp(max=vocab - 1)
    xg = hidden[rows]  # (g, R, D)
    wg = weight[items]  # (g, C, D)
    logits = torch.bmm(xg, wg.transpose(1, 2)).to(_acc_dtype(hidden.dtype))
    dead = (cols.unsqueeze(1) == targets[rows].unsqueeze(2)) | (cols >= vocab).unsqueeze(1)
    return logits.masked_fill_(dead, float("-inf")), xg, wg, items


def positive_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``<hidden[n], weight[targets[n]]>`` (N,) in the accumulation dtype; ``targets`` in [0, V] (a target V, not
    in this block of the vocabulary, reads row V - 1: its caller masks it)."""
    acc = _acc_dtype(hidden.dtype)
    return (hidden.to(acc) * weight[targets.clamp(max=weight.shape[0] - 1)].to(acc)).sum(dim=-1)


def add_positive_grad(grad_h, grad_w, hidden, weight, targets, grad_positive) -> None:
    """Accumulate the gradient of :func:`positive_logits` into the float32/float64 buffers (None = not needed)."""
    items = targets.clamp(max=weight.shape[0] - 1)
    g = grad_positive.unsqueeze(1)
    if grad_h is not None:
        grad_h.add_(g * weight[items].to(grad_h.dtype))
    if grad_w is not None:
        grad_w.index_add_(0, items, g * hidden.to(grad_w.dtype))


def _chunk_buckets(rows: torch.Tensor, cols: torch.Tensor, chunk_buckets: int | None) -> int:
    return chunk_buckets or max(1, CHUNK_ELEMENTS // max(1, rows.shape[1] * cols.shape[1]))


def forward(hidden, weight, targets, rows, cols, chunk_buckets: int | None = None):
    """``(lse, positive)``: ``lse`` (G, R) over each bucket's items with targets masked, and ``positive`` (N,).

    ``hidden`` (N, D), ``weight`` (V, D), ``targets`` (N,) in [0, V), ``rows`` (G, R) and ``cols`` (G, C) int64
    indices. Torch equivalent: ``(hidden[rows] @ weight[cols].mT).masked_fill(cols[:, None] ==
    targets[rows][..., None], -inf).logsumexp(-1)`` and ``(hidden * weight[targets]).sum(-1)``, computed
    ``chunk_buckets`` buckets at a time.
    """
    chunk = _chunk_buckets(rows, cols, chunk_buckets)
    lse = torch.empty(rows.shape, dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    for start in range(0, rows.shape[0], chunk):
        part = slice(start, start + chunk)
        logits, _, _, _ = _bucket_logits(hidden, weight, targets, rows[part], cols[part])
        lse[part] = torch.logsumexp(logits, dim=-1)
        del logits  # before the next chunk's logits exist, or two chunks are held at once
    return lse, positive_logits(hidden, weight, targets)


def backward(hidden, weight, targets, rows, cols, lse, grad_lse, grad_positive, needs,
             chunk_buckets: int | None = None):
    """``(dh, dw)`` in the input dtypes (None where not needed) for upstream gradients of ``lse`` and ``positive``
    (either may be None), recomputing the bucket logits chunk by chunk. Both come from one pass so that a single
    (V, D) buffer is built."""
    need_h, need_w = needs
    acc = lse.dtype
    grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    if grad_positive is not None:
        add_positive_grad(grad_h, grad_w, hidden, weight, targets, grad_positive.to(acc))
    if grad_lse is not None:
        chunk = _chunk_buckets(rows, cols, chunk_buckets)
        for start in range(0, rows.shape[0], chunk):
            part = slice(start, start + chunk)
            logits, xg, wg, items = _bucket_logits(hidden, weight, targets, rows[part], cols[part])
            # A bucket row with every candidate masked has lse = -inf and no gradient (not NaN). A +inf logit
            # gives lse = +inf and, as torch.logsumexp's gradient, NaN at that entry and 0 elsewhere.
            live = (lse[part] > float("-inf")).unsqueeze(-1)
            shift = torch.where(live, lse[part].unsqueeze(-1), torch.zeros_like(logits[..., :1]))
            ds = logits.sub_(shift).exp_().mul_(grad_lse[part].unsqueeze(-1).to(acc) * live)
            if need_h:
                dx = torch.bmm(ds, wg.to(acc))
                grad_h.index_add_(0, rows[part].reshape(-1), dx.reshape(-1, hidden.shape[1]))
            if need_w:
                dw = torch.bmm(ds.transpose(1, 2), xg.to(acc))
                grad_w.index_add_(0, items.reshape(-1), dw.reshape(-1, weight.shape[1]))  # absent items add 0
            # Before the next chunk's buffers exist (ds is a view of logits).
            del logits, ds, xg, wg, items
            dx = dw = None
    return (grad_h.to(hidden.dtype) if need_h else None, grad_w.to(weight.dtype) if need_w else None)
