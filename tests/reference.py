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
