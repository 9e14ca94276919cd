"""Pure-PyTorch backend of the fused distillation losses (forward KL, reverse KL, generalised JSD): chunked.

Per chunk of rows, two GEMMs give the student's and the teacher's logits (``CHUNK_ELEMENTS`` each, never N x V);
a chunk holds whole rows, so every per-token quantity (both LSEs, the divergence, its gradient) comes out of one
pass over the chunk, elementwise on cache-sized blocks. With ``log_s = log_softmax(s / T)``,
``log_t = log_softmax(t / T)`` and the mixture ``log_m = logaddexp(log(1 - beta) + log_s, log(beta) + log_t)``::

    forward_kl = sum p_t (log_t - log_s)        d / d(s/T) = p_s - p_t
    reverse_kl = sum p_s (log_s - log_t)        d / d(s/T) = p_s (log_s - log_t - reverse_kl)
    jsd = beta KL(p_t || m) + (1 - beta) KL(p_s || m)
                                                d / d(s/T) = (1 - beta) p_s (log_s - log_m - KL(p_s || m))

(the JSD's gradient: d jsd / d p_s,v = (1 - beta) log(p_s,v / m_v), the other terms cancel). The teacher gets no
gradient. When the upstream gradient per token is known at forward time (a scalar ``mean``/``sum`` loss) the
gradient GEMMs run in the same pass: 2 + 2 GEMMs per row (student + teacher logits, dH and dW) instead of 2 + 4.
It is also the oracle of the Triton kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._common import acc_dtype
from .torch_ce import CHUNK_ELEMENTS, _logits
from .torch_log_probs import LOG_ZERO, block_rows

KINDS = ("forward_kl", "reverse_kl", "jsd")


@dataclass(frozen=True)
class DistillOptions:
    """The divergence of ``linear_distillation_loss``; ``entropy`` also returns the student's entropy (no
    gradient), for trainers that log it."""

    kind: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    entropy: bool = False


def default_chunk_rows(vocab: int) -> int:
    # Two (rows, V) logit buffers live at once: each gets half of torch_ce's chunk.
    return max(1, CHUNK_ELEMENTS // (2 * vocab))


def _log_softmax_(x: torch.Tensor):
    """Row-wise log-softmax in place as ``(x - c) - log sum e^(x - c)``, c the row max (0 where infinite), exact to
    the rounding of ``x - c`` like ``torch.log_softmax``; returns ``(x, p, c, log sum)`` with the probabilities
    ``p = e^(x - c) / sum`` (one exp per entry, accurate to 2 ulp, where ``exp(log p)`` would carry the rounding
    of ``log p``). A row holding +inf or NaN, or only -inf, is NaN (the materialised semantics)."""
    row_max = x.amax(dim=1)
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    x = x.sub_(shift.unsqueeze(1))
    p = x.exp()
    sum_e = p.sum(dim=1, keepdim=True)
    log_sum = sum_e.log()
    return x.sub_(log_sum), p.div_(sum_e), shift, log_sum.squeeze(1)


def _dot(p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sum_v p_v d_v per row, no (rows, V) temporary. ``vecdot`` sums like ``torch.sum``; a batched BLAS dot
    (``bmm``) accumulates serially and was biased by 2.5e-5 relative at V = 131,072 in float32."""
    return torch.linalg.vecdot(p, d)


def _xlogy_sum(p: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(sum_v p_v d_v per row, every d finite)``, where p_v = 0 contributes 0 even if d_v is infinite (0 log 0 =
    0); NaN stays NaN. A finite dot means no 0 * inf happened (that would be NaN): on the CPU the masked sum is only
    computed for a block with an infinite d (-inf logits); elsewhere the check would be a host sync per block, so
    the masked sum is always taken."""
    fast = _dot(p, d)
    if fast.device.type == "cpu" and bool(torch.isfinite(fast).all()):
        return fast, True
    return torch.where(p == 0, torch.zeros_like(d), p * d).sum(dim=1), False


def _times_p(p: torch.Tensor, d: torch.Tensor, finite: bool) -> torch.Tensor:
    """p * d in place into ``d``, 0 where p = 0 (a token the student cannot emit gets no gradient); the mask is
    needed only where d may be infinite."""
    d = d.mul_(p)
    return d if finite else d.masked_fill_(p == 0, 0.0)


def _block(s, t, opts: DistillOptions, g, valid):
    """``(divergence, student entropy or None, norm (4, rows), aux)`` of one block of raw logits (norm: both
    models' softmax normalisers ``(c, log sum e^(x - c))``; aux: the per-row KL that the gradient subtracts, see
    ``triton_distill``); with ``g`` (per-token upstream gradient of
    the divergence) overwrites ``s`` with d(sum g . divergence) / d s, 0 at rows not ``valid``. Overwrites ``t``.

    Non-finite logits: a row whose student or teacher LSE is not finite (+inf, NaN, all -inf) is NaN, value and
    gradient, as materialised; -inf logits elsewhere are tokens of probability 0 (0 log 0 = 0).
    """
    inv_t = 1.0 / opts.temperature
    if inv_t != 1.0:
        s, t = s.mul_(inv_t), t.mul_(inv_t)
    log_s, p_s, c_s, sum_s = _log_softmax_(s)
    log_t, p_t, c_t, sum_t = _log_softmax_(t)
    norm = torch.stack([c_s, sum_s, c_t, sum_t])
    bad = ~torch.isfinite(norm.sum(dim=0))
    entropy = None
    if opts.kind == "forward_kl":
        if opts.entropy:
            entropy = -_xlogy_sum(p_s, log_s)[0]
        div, finite = _xlogy_sum(p_t, log_t.sub_(log_s))
        grad = p_s.sub_(p_t) if g is not None else None
    elif opts.kind == "reverse_kl":
        if opts.entropy:
            entropy = -_xlogy_sum(p_s, log_s)[0]
        diff = log_s.sub_(log_t)
        div, finite = _xlogy_sum(p_s, diff)
        grad = _times_p(p_s, diff.sub_(div.unsqueeze(1)), finite) if g is not None else None
    else:
        # The JSD is bounded: clamped at LOG_ZERO, log p of a probability-0 token (a -inf logit, or one that
        # underflows) is finite and its p exactly 0, so every product below is 0 there without a mask; the mixture
        # comes from the probabilities (1 log per entry, accurate to a few eps where logaddexp of the log-probs
        # would carry their rounding).
        beta = opts.beta
        log_s.clamp_(min=LOG_ZERO)
        log_t.clamp_(min=LOG_ZERO)
        if opts.entropy:
            entropy = -_dot(p_s, log_s)
        log_m = torch.lerp(p_s, p_t, beta).log_().clamp_(min=LOG_ZERO)
        kl_t = _dot(p_t, log_t.sub_(log_m))
        diff = log_s.sub_(log_m)
        kl_s = _dot(p_s, diff)
        div = beta * kl_t + (1.0 - beta) * kl_s
        grad = diff.sub_(kl_s.unsqueeze(1)).mul_(p_s) if g is not None else None
        inv_t *= 1.0 - beta
    div = torch.where(bad, torch.full_like(div, math.nan), div)
    aux = kl_s if opts.kind == "jsd" else div
    if grad is not None:
        scale = torch.where(bad, torch.full_like(g, math.nan), g * inv_t)
        scale = torch.where(valid, scale, torch.zeros_like(scale))
        s.copy_(grad.mul_(scale.unsqueeze(1)))
    return div, entropy, norm, aux


def _run(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, valid,
         opts: DistillOptions, g, needs, chunk_rows):
    n_rows, vocab = student_hidden.shape[0], student_weight.shape[0]
    acc = acc_dtype(student_hidden.dtype)
    div = torch.empty(n_rows, dtype=acc, device=student_hidden.device)
    ent = torch.zeros_like(div)
    norm = torch.empty((4, n_rows), dtype=acc, device=div.device)
    aux = torch.empty_like(div)
    need_h, need_w, need_b = needs if g is not None else (False, False, False)
    dh = torch.zeros_like(student_hidden) if need_h else None
    dw = torch.zeros(student_weight.shape, dtype=acc, device=student_weight.device) if need_w else None
    db = torch.zeros(vocab, dtype=acc, device=student_weight.device) if need_b else None
    chunk_rows = chunk_rows or default_chunk_rows(vocab)
    step = block_rows(vocab)
    if g is not None:
        # Ignored rows get zero gradient; zeroed inputs keep it zero where their logits are not finite (0 * NaN).
        student_hidden = torch.where(valid.unsqueeze(1), student_hidden, torch.zeros_like(student_hidden))
        teacher_hidden = torch.where(valid.unsqueeze(1), teacher_hidden, torch.zeros_like(teacher_hidden))
    for start in range(0, n_rows, chunk_rows):
        h = student_hidden[start:start + chunk_rows]
        s = _logits(h, student_weight, student_bias)
        t = _logits(teacher_hidden[start:start + chunk_rows], teacher_weight, teacher_bias)
        for r0 in range(0, s.shape[0], step):
            r = slice(r0, r0 + step)
            rows = slice(start + r0, start + r0 + s[r].shape[0])
            div[rows], block_ent, norm[:, rows], aux[rows] = _block(
                s[r], t[r], opts, g[rows] if g is not None else None, valid[rows])
            if block_ent is not None:
                ent[rows] = block_ent
        if need_h:
            dh[start:start + chunk_rows] = s.to(student_weight.dtype) @ student_weight
        if need_w:
            dw.addmm_(s.T, h.to(acc))
        if need_b:
            db += s.sum(dim=0)
        del s, t  # before the next chunk's logits exist, or two chunks of each are held at once
    grads = (dh, dw.to(student_weight.dtype) if need_w else None, db.to(student_bias.dtype) if need_b else None)
    return div, ent, norm, aux, grads


def forward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, valid,
            opts: DistillOptions, g=None, needs=(False, False, False), chunk_rows: int | None = None):
    """Per-token ``(divergence, entropy, norm, aux, (dh, dw, db))``, float32/float64.

    The divergence and the student's entropy (N,) (zeros unless ``opts.entropy``) are 0 where ``valid`` is False;
    ``norm`` (4, N) (both models' softmax normalisers) and ``aux`` (N,) are what the Triton backward needs. With
    ``g`` (N,), the per-token upstream gradient of the divergence, the student gradients named by ``needs`` are
    computed in the same pass (input dtypes; None where not needed).
    """
    div, ent, norm, aux, grads = _run(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                      teacher_bias, valid, opts, g, needs, chunk_rows)
    zeros = torch.zeros_like(div)
    return torch.where(valid, div, zeros), torch.where(valid, ent, zeros), norm, aux, grads


def backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, valid,
             opts: DistillOptions, g, needs, chunk_rows: int | None = None):
    """``(dh, dw, db)`` of the student for the per-token upstream gradient ``g`` (N,), recomputing the logits.
    Bit-reproducible; the Triton backend calls it in deterministic mode."""
    return _run(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, valid,
                opts, g, needs, chunk_rows)[-1]
