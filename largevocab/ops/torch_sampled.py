"""Pure-PyTorch backend of the sampled cross-entropy: chunked over rows, recomputed in backward.

Runs on any device. Per-row negatives gather ``W[neg]`` for one chunk of rows at a time (``chunk x K x D``
elements, the dominant buffer, sized by ``CHUNK_ELEMENTS``); shared negatives gather ``W[neg]`` once (K x D) and
score a chunk with one GEMM (``chunk x K`` logits). Nothing of size N x K is kept between chunks: only the per-row
log-sum-exp is saved for backward. It is also the test oracle of the Triton kernels; the loss is defined in
``largevocab.sampled``.
"""

from __future__ import annotations

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


class _ChunkedSampledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, valid, negatives, correction, remove_hits: bool, chunk_rows: int):
        n_rows = hidden.shape[0]
        shared = negatives.dim() == 1
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
            # The positive is always finite, so every row's log-sum-exp is too (no all -inf row).
            lse[rows] = torch.logsumexp(torch.cat([s_pos.unsqueeze(1), s_neg], dim=1), dim=1)
            pos[rows] = s_pos
        loss = torch.where(valid, lse - pos, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, targets, valid, negatives, correction, lse)
        ctx.remove_hits, ctx.chunk_rows = remove_hits, chunk_rows
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, targets, valid, negatives, correction, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        shared = negatives.dim() == 1
        acc = lse.dtype
        g_all = torch.where(valid, grad_loss.to(acc), torch.zeros_like(lse))
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        w_shared = weight[negatives] if shared else None
        # Shared negatives: dW of the K gathered rows is a GEMM accumulated over chunks, scattered once at the end.
        grad_w_shared = torch.zeros(w_shared.shape, dtype=acc, device=weight.device) if shared and need_w else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h, y, g = hidden[rows], targets[rows], g_all[rows]
            neg = negatives if shared else negatives[rows]
            w_neg = w_shared if shared else weight[neg]
            w_pos = weight[y]
            s_pos, s_neg = _chunk_logits(h, w_pos, w_neg, neg, y, correction, ctx.remove_hits)
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
        if need_w and shared:
            grad_w.index_add_(0, negatives, grad_w_shared)  # duplicates in the shared set accumulate
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def torch_sampled_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    negatives: torch.Tensor,
    correction: torch.Tensor | None,
    remove_accidental_hits: bool,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-row sampled loss (N,), float32 (float64 for float64 inputs), 0 where ``valid`` is False.

    ``hidden`` (N, D), ``weight`` (V, D), ``targets`` (N,) in [0, V) (ignored rows may hold any valid index),
    ``negatives`` (N, K) per row or (K,) shared, int64 in [0, V); ``correction`` (V,) is ``log(K * q(item))``
    in the accumulation dtype (subtracted from each negative's logit) or None. ``chunk_rows`` overrides the
    chunk size (tests use it to show chunking is invisible).
    """
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(negatives.shape[-1], hidden.shape[1], negatives.dim() == 1)
    return _ChunkedSampledCrossEntropy.apply(
        hidden, weight, targets, valid, negatives, correction, remove_accidental_hits, chunk_rows
    )
