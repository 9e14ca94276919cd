"""Pure-PyTorch backend of the sampled cross-entropy: chunked over rows, recomputed in backward.

Runs on any device. Per-row negatives gather ``W[neg]`` for one chunk of rows at a time (``chunk x K x D``
elements, the dominant buffer, sized by ``CHUNK_ELEMENTS``); shared negatives gather ``W[neg]`` once (K x D) and
score a chunk with one GEMM (``chunk x K`` logits). Nothing of size N x K is kept between chunks: only the per-row
log-sum-exp is saved for backward (by the op ``largevocab::sampled_cross_entropy``, which recomputes the logits in
backward). It is also the test oracle of the Triton kernels; the loss is defined in ``largevocab.sampled``.
"""

from __future__ import annotations

import math

import torch

from .torch_ce import CHUNK_ELEMENTS, _acc_dtype


def default_chunk_rows(num_negatives: int, dim: int, shared: bool) -> int:
    """Rows per chunk so that the chunk's largest buffer holds about ``CHUNK_ELEMENTS`` elements."""
    per_row = num_negatives if shared else num_negatives * dim
    return max(1, CHUNK_ELEMENTS // max(1, per_row))


def _chunk_logits(h, w_pos, w_neg, neg, targets, correction, remove_hits):
    """Positive logits (c,) and corrected, hit-masked negative logits (c, K), in the accumulation dtype.

    ``w_neg`` is (c, K, D) for per-row negatives, (K, D) for shared ones. The products run in the input dtype,
    as the materialised ``hidden @ weight.T`` would; the positive is a row-wise dot in the accumulation dtype.
    """
    acc = _acc_dtype(h.dtype)
    s_pos = (h.to(acc) * w_pos.to(acc)).sum(dim=-1)
    if w_neg.dim() == 3:
        s_neg = torch.bmm(w_neg, h.unsqueeze(2)).squeeze(2).to(acc)
        neg_rows = neg
    else:
        s_neg = (h @ w_neg.T).to(acc)
        neg_rows = neg.unsqueeze(0)
    if correction is not None:
        s_neg = s_neg - correction[neg_rows]
    if remove_hits:
        s_neg = s_neg.masked_fill(neg_rows == targets.unsqueeze(1), float("-inf"))
    return s_pos, s_neg


def sampled_loss(lse: torch.Tensor, s_pos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``lse - s_pos`` per row, 0 where not ``valid``; NaN where lse is +inf, as the materialised
    ``F.cross_entropy`` over ``[s_pos, negatives]`` gives (its log-softmax is NaN when a logit is +inf)."""
    loss = torch.where(lse == math.inf, torch.full_like(lse, math.nan), lse - s_pos)
    return torch.where(valid, loss, torch.zeros_like(loss))


def row_grad(grad_loss: torch.Tensor | None, valid: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Per-row upstream gradient in the accumulation dtype: 0 at ignored rows, NaN (for the whole row, as the
    materialised gradient) where a +inf logit made lse +inf and the row has a gradient."""
    if grad_loss is None:
        return torch.zeros_like(lse)
    g = torch.where(valid, grad_loss.to(lse.dtype), torch.zeros_like(lse))
    return torch.where((lse == math.inf) & (g != 0), torch.full_like(g, math.nan), g)


def forward(hidden, weight, targets, valid, negatives, correction, remove_hits: bool, chunk_rows: int | None = None):
    """Per-row ``(loss, lse)`` (N,), float32 (float64 for float64 inputs); loss 0 where ``valid`` is False.

    ``hidden`` (N, D), ``weight`` (V, D), ``targets`` (N,) in [0, V) (ignored rows may hold any valid index),
    ``negatives`` (N, K) per row or (K,) shared, int64 in [0, V); ``correction`` (V,) is ``log(K * q(item))``
    in the accumulation dtype (subtracted from each negative's logit) or None. ``chunk_rows`` overrides the
    chunk size (tests use it to show chunking is invisible).
    """
    n_rows = hidden.shape[0]
    shared = negatives.dim() == 1
    chunk_rows = chunk_rows or default_chunk_rows(negatives.shape[-1], hidden.shape[1], shared)
    acc = _acc_dtype(hidden.dtype)
    lse = torch.empty(n_rows, dtype=acc, device=hidden.device)
    pos = torch.empty(n_rows, dtype=acc, device=hidden.device)
    w_shared = weight[negatives] if shared else None
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, start + chunk_rows)
        neg = negatives if shared else negatives[rows]
        w_neg = w_shared if shared else weight[neg]
        s_pos, s_neg = _chunk_logits(
            hidden[rows], weight[targets[rows]], w_neg, neg, targets[rows], correction, remove_hits
        )
        # The positive is in every row's softmax, so masking never leaves a row of -inf.
        lse[rows] = torch.logsumexp(torch.cat([s_pos.unsqueeze(1), s_neg], dim=1), dim=1)
        pos[rows] = s_pos
        del s_neg, w_neg  # before the next chunk's exist, or two chunks are held at once
    return sampled_loss(lse, pos, valid), lse


def backward(hidden, weight, targets, valid, negatives, correction, remove_hits: bool, lse, grad_loss, needs,
             chunk_rows: int | None = None):
    """``(dh, dw)`` in the input dtypes (None where not needed) for the per-row upstream gradient ``grad_loss``,
    recomputing the sampled logits chunk by chunk."""
    need_h, need_w = needs
    shared = negatives.dim() == 1
    chunk_rows = chunk_rows or default_chunk_rows(negatives.shape[-1], hidden.shape[1], shared)
    acc = lse.dtype
    g_all = row_grad(grad_loss, valid, lse)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    w_shared = weight[negatives] if shared else None
    # Shared negatives: dW of the K gathered rows is a GEMM accumulated over chunks, scattered once at the end.
    grad_w_shared = torch.zeros(w_shared.shape, dtype=acc, device=weight.device) if shared and need_w else None
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        h, y, g = hidden[rows], targets[rows], g_all[rows]
        neg = negatives if shared else negatives[rows]
        w_neg = w_shared if shared else weight[neg]
        w_pos = weight[y]
        s_pos, s_neg = _chunk_logits(h, w_pos, w_neg, neg, y, correction, remove_hits)
        row_lse = lse[rows].unsqueeze(1)
        ds_neg = s_neg.sub_(row_lse).exp_().mul_(g.unsqueeze(1))  # masked (-inf) negatives get exactly 0
        ds_pos = g * (torch.exp(s_pos - lse[rows]) - 1.0)
        if need_h:
            if shared:
                dh = (ds_neg.to(hidden.dtype) @ w_neg).to(acc)
            else:
                dh = torch.bmm(ds_neg.to(hidden.dtype).unsqueeze(1), w_neg).squeeze(1).to(acc)
            grad_h[rows] = dh.add_(ds_pos.unsqueeze(1) * w_pos.to(acc))
        if need_w:
            h_acc = h.to(acc)
            if shared:
                grad_w_shared.addmm_(ds_neg.T, h_acc)
            else:
                contrib = ds_neg.unsqueeze(2) * h_acc.unsqueeze(1)
                grad_w.index_add_(0, neg.reshape(-1), contrib.reshape(-1, h.shape[1]))
            grad_w.index_add_(0, y, ds_pos.unsqueeze(1) * h_acc)
        # Before the next chunk's buffers exist (ds_neg is a view of s_neg).
        del s_neg, ds_neg, w_neg
        dh = contrib = None
    if need_w and shared:
        grad_w.index_add_(0, negatives, grad_w_shared)  # duplicates in the shared set accumulate
    if need_w:
        grad_w = grad_w.to(weight.dtype)
    return grad_h, grad_w
