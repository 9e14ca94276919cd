"""Float64 reference of the losses: materialised logits and torch's own F.cross_entropy."""

import torch
import torch.nn.functional as F


def shifted_targets(targets, shift, ignore_index):
    if not shift:
        return targets
    pad = torch.full((*targets.shape[:-1], shift), ignore_index, dtype=targets.dtype, device=targets.device)
    return torch.cat([targets[..., shift:], pad], dim=-1)


def reference_loss_and_lse(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean",
                           label_smoothing=0.0, z_loss=0.0, softcap=None, shift=0, dtype=torch.float64):
    """Materialise the logits in ``dtype`` (float64 for the oracle) and apply F.cross_entropy."""
    h, w = hidden.to(dtype), weight.to(dtype)
    logits = h @ w.T
    if bias is not None:
        logits = logits + bias.to(dtype)
    logits = logits.double() if dtype == torch.float64 else logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    y = shifted_targets(targets, shift, ignore_index).reshape(-1)
    flat = logits.reshape(-1, weight.shape[0])
    per_token = F.cross_entropy(flat, y, ignore_index=ignore_index, reduction="none",
                                label_smoothing=label_smoothing)
    lse = torch.logsumexp(flat, dim=-1)
    valid = y != ignore_index
    if z_loss:
        per_token = per_token + torch.where(valid, z_loss * lse.square(), torch.zeros_like(lse))
    lse = lse.reshape(targets.shape)
    if reduction == "none":
        return per_token.reshape(targets.shape), lse
    if reduction == "sum":
        return per_token.sum(), lse
    return per_token.sum() / valid.sum().clamp(min=1), lse


def reference_loss(*args, **kwargs):
    return reference_loss_and_lse(*args, **kwargs)[0]


def reference_sampled_loss(hidden, weight, targets, negatives, *, item_counts=None, logq_correction=True,
                           remove_accidental_hits=True, ignore_index=-100, reduction="mean", dtype=torch.float64):
    """Materialise the (N, 1 + K) sampled logits in ``dtype`` (float64 for the oracle) and apply F.cross_entropy."""
    vocab, dim = weight.shape
    h, w = hidden.reshape(-1, dim).to(dtype), weight.to(dtype)
    y = targets.reshape(-1)
    valid = y != ignore_index
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    up = torch.float64 if dtype == torch.float64 else torch.float32
    pos = (h * w[y_safe]).sum(-1).to(up)
    if negatives.dim() == 1:
        z = (h @ w[negatives].T).to(up)
        neg = negatives.expand(len(y), -1)
    else:
        neg = negatives.reshape(len(y), negatives.shape[-1])
        z = torch.einsum("nd,nkd->nk", h, w[neg]).to(up)
    k = neg.shape[1]
    if logq_correction:
        q = item_counts.double() / item_counts.sum() if item_counts is not None else torch.full((vocab,), 1 / vocab,
                                                                                                dtype=torch.float64)
        z = z - torch.log(k * q[neg]).to(up)
    if remove_accidental_hits:
        z = z.masked_fill(neg == y_safe[:, None], float("-inf"))
    logits = torch.cat([pos[:, None], z], dim=1)
    per_row = F.cross_entropy(logits, torch.zeros_like(y), reduction="none")
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row.reshape(targets.shape)
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / valid.sum().clamp(min=1)


def reference_sce_from_selection(hidden, weight, targets, rows, cols, reduction="mean", dtype=torch.float64):
    """SCE for given bucket rows (G, R) and items (G, C) on materialised bucket logits (the docstring's equivalent)."""
    h, w = hidden.to(dtype), weight.to(dtype)
    y = targets.clamp(min=0)
    logits = (h[rows] @ w[cols].mT).masked_fill(cols[:, None, :] == y[rows][..., None], float("-inf"))
    pos = (h * w[y]).sum(-1)[rows]
    ce = torch.cat([pos[..., None], logits], -1).logsumexp(-1) - pos
    per_row = h.new_zeros(h.shape[0]).scatter_reduce(0, rows.flatten(), ce.flatten(), "amax", include_self=False)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    covered = torch.zeros(h.shape[0], dtype=torch.bool).index_fill_(0, rows.flatten(), True)
    return per_row.sum() / covered.sum().clamp(min=1)
