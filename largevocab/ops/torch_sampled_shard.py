"""One vocabulary shard's part of the sampled cross-entropy (pure PyTorch, chunked over rows).

In the vocabulary-parallel form (:mod:`largevocab.parallel`) the negatives are drawn once for the whole vocabulary
and each rank scores those it holds. Per row this shard contributes ``lse_r``, the log-sum-exp of its entries —
the positive if it holds the target, and the negatives it holds — and ``pos_r``, the positive logit where it holds
the target (0 elsewhere). The loss is ``logsumexp_r(lse_r) - sum_r(pos_r)``. Local ids equal to ``V_r`` mark
targets and negatives held by another rank: they read no row and are -inf in the softmax. The chunking and the
logit formula are :mod:`largevocab.ops.torch_sampled`'s.
"""

from __future__ import annotations

import math

import torch

from .torch_sampled import _acc_dtype, _chunk_logits, default_chunk_rows


def _chunk(hidden, weight, targets, owned, negatives, correction, remove_hits, rows, w_shared):
    vocab = weight.shape[0]
    shared = negatives.dim() == 1
    h, y = hidden[rows], targets[rows]
    neg = negatives if shared else negatives[rows]
    w_neg = w_shared if shared else weight[neg.clamp(max=vocab - 1)]
    w_pos = weight[y.clamp(max=vocab - 1)]
    s_pos, s_neg = _chunk_logits(h, w_pos, w_neg, neg, y, correction, remove_hits)
    absent = (neg >= vocab) if not shared else (neg >= vocab).unsqueeze(0)
    s_neg = s_neg.masked_fill(absent, -math.inf)
    s_pos = torch.where(owned[rows], s_pos, torch.full_like(s_pos, -math.inf))
    return h, y, neg, w_pos, w_neg, s_pos, s_neg


def forward(hidden, weight, targets, owned, negatives, correction, remove_hits: bool, chunk_rows: int | None = None):
    """``(lse_r, pos_r)`` (N,) of this shard (see the module docstring); ``correction`` has V_r + 1 entries
    (the last, for absent items, is never used)."""
    n_rows = hidden.shape[0]
    acc = _acc_dtype(hidden.dtype)
    lse = torch.full((n_rows,), -math.inf, dtype=acc, device=hidden.device)
    pos = torch.zeros(n_rows, dtype=acc, device=hidden.device)
    if weight.shape[0] == 0:
        return lse, pos
    shared = negatives.dim() == 1
    chunk_rows = chunk_rows or default_chunk_rows(negatives.shape[-1], hidden.shape[1], shared)
    w_shared = weight[negatives.clamp(max=weight.shape[0] - 1)] if shared else None
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, start + chunk_rows)
        *gathered, s_pos, s_neg = _chunk(hidden, weight, targets, owned, negatives, correction, remove_hits, rows,
                                         w_shared)
        lse[rows] = torch.logsumexp(torch.cat([s_pos.unsqueeze(1), s_neg], dim=1), dim=1)
        pos[rows] = torch.where(owned[rows], s_pos, torch.zeros_like(s_pos))
        # Before the next chunk's exist (gathered holds this chunk's weight rows), or two chunks are held at once.
        del gathered, s_neg
    return lse, pos


def backward(hidden, weight, targets, owned, negatives, correction, remove_hits: bool, lse, grad_lse, grad_pos,
             needs, chunk_rows: int | None = None):
    """``(dh, dw)`` of this shard's ``(lse_r, pos_r)`` for their upstream gradients (None where not needed);
    entries of a -inf ``lse_r`` (nothing held) get none."""
    need_h, need_w = needs
    acc = lse.dtype
    grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    if weight.shape[0] == 0:
        return (grad_h.to(hidden.dtype) if need_h else None), (grad_w.to(weight.dtype) if need_w else None)
    vocab = weight.shape[0]
    shared = negatives.dim() == 1
    chunk_rows = chunk_rows or default_chunk_rows(negatives.shape[-1], hidden.shape[1], shared)
    w_shared = weight[negatives.clamp(max=vocab - 1)] if shared else None
    grad_w_shared = torch.zeros(w_shared.shape, dtype=acc, device=weight.device) if shared and need_w else None
    g_lse = grad_lse.to(acc) if grad_lse is not None else torch.zeros_like(lse)
    g_pos = grad_pos.to(acc) if grad_pos is not None else torch.zeros_like(lse)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        h, y, neg, w_pos, w_neg, s_pos, s_neg = _chunk(hidden, weight, targets, owned, negatives, correction,
                                                        remove_hits, rows, w_shared)
        row_lse = lse[rows]
        live = row_lse > -math.inf
        shift = torch.where(live, row_lse, torch.zeros_like(row_lse))
        g = torch.where(live, g_lse[rows], torch.zeros_like(row_lse))
        ds_neg = s_neg.sub_(shift.unsqueeze(1)).exp_().mul_(g.unsqueeze(1))  # absent and masked entries: 0
        ds_pos = g * torch.exp(s_pos - shift) + torch.where(owned[rows], g_pos[rows], torch.zeros_like(g))
        if need_h:
            dh = (ds_neg.to(hidden.dtype) @ w_neg) if shared else torch.bmm(
                ds_neg.to(hidden.dtype).unsqueeze(1), w_neg).squeeze(1)
            grad_h[rows] = dh.to(acc) + ds_pos.unsqueeze(1) * w_pos.to(acc)
        if need_w:
            h_acc = h.to(acc)
            if shared:
                grad_w_shared.addmm_(ds_neg.T, h_acc)
            else:
                contrib = ds_neg.unsqueeze(2) * h_acc.unsqueeze(1)
                grad_w.index_add_(0, neg.clamp(max=vocab - 1).reshape(-1), contrib.reshape(-1, h.shape[1]))
            grad_w.index_add_(0, y.clamp(max=vocab - 1), ds_pos.unsqueeze(1) * h_acc)
        # Before the next chunk's buffers exist (ds_neg is a view of s_neg).
        del s_neg, ds_neg, w_neg
        dh = contrib = None
    if need_w and shared:
        grad_w.index_add_(0, negatives.clamp(max=vocab - 1), grad_w_shared)
    return (grad_h.to(hidden.dtype) if need_h else None), (grad_w.to(weight.dtype) if need_w else None)
