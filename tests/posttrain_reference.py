"""Float64 references of the post-training family on materialised logits (log-probs, entropy, argmax, KL, JSD)."""

import torch
import torch.nn.functional as F

from reference import shifted_targets


def final_logits(hidden, weight, bias=None, *, softcap=None, temperature=1.0, dtype=torch.float64):
    """The issue's torch equivalent: ``(h @ W.T + b)`` in ``dtype``, then float, soft cap, temperature."""
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    logits = logits.double() if dtype == torch.float64 else logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def log_probs(hidden, weight, targets, *, bias=None, temperature=1.0, softcap=None, shift=0, ignore_index=-100,
              return_entropy=False, dtype=torch.float64):
    s = final_logits(hidden, weight, bias, softcap=softcap, temperature=temperature, dtype=dtype)
    y = shifted_targets(targets, shift, ignore_index)
    valid = y != ignore_index
    log_sm = s.log_softmax(-1)
    logp = log_sm.gather(-1, torch.where(valid, y, 0)[..., None])[..., 0]
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(s.softmax(-1) * log_sm).sum(-1)
    return logp, torch.where(valid, entropy, torch.zeros_like(entropy))


def argmax(hidden, weight, *, bias=None, softcap=None, dtype=torch.float64):
    return final_logits(hidden, weight, bias, softcap=softcap, dtype=dtype).argmax(-1)


def divergence(student_logits, teacher_logits, kind, beta=0.5, temperature=1.0):
    """Per-token KL/JSD as TRL's GKD writes it, over the last dimension (teacher detached)."""
    log_s = (student_logits / temperature).log_softmax(-1)
    log_t = (teacher_logits.detach() / temperature).log_softmax(-1)
    if kind == "forward_kl":
        return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
    if kind == "reverse_kl":
        return F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1)
    beta_t = torch.tensor(beta, dtype=log_s.dtype)
    log_m = torch.logsumexp(torch.stack([log_s + torch.log1p(-beta_t), log_t + torch.log(beta_t)]), dim=0)
    kl_t = F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets=None, *,
                      kind="forward_kl", beta=0.5, temperature=1.0, student_bias=None, teacher_bias=None,
                      ignore_index=-100, reduction="mean", dtype=torch.float64):
    s = final_logits(student_hidden, student_weight, student_bias, dtype=dtype)
    t = final_logits(teacher_hidden, teacher_weight, teacher_bias, dtype=dtype)
    per_token = divergence(s, t, kind, beta, temperature)
    valid = torch.ones_like(per_token, dtype=torch.bool) if targets is None else targets != ignore_index
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum().clamp(min=1)
