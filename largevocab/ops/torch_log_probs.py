"""Pure-PyTorch backend of the fused per-token log-probabilities, entropy and argmax: chunked over tokens.

The same chunking as ``torch_ce``: one GEMM per chunk of rows gives that chunk's logits (``CHUNK_ELEMENTS``, never
N x V), whose elementwise passes run on cache-sized blocks of rows. The upstream gradients of the log-probs are
per token and only known in backward (GRPO's come from the ratio exp(logp - old logp)), so backward recomputes the
logits: 4 GEMM passes per training step where eager PyTorch needs 3.

Per token, for final logits ``s = softcap(hidden @ weight.T + bias) / temperature`` and ``p = softmax(s)``::

    lse = logsumexp(s)         logp = s[y] - lse              entropy = -sum_v p_v log p_v
    d logp / d s_v = [v == y] - p_v                           d entropy / d s_v = -p_v (log p_v + entropy)

The softmax normaliser is kept per row as ``(c, log sum_v e^(s_v - c))`` with c the row max, never as one number
``lse``: ``log p = (s - c) - log sum`` is then exact to the rounding of ``s - c``, as in ``torch.log_softmax``,
whereas ``s - lse`` would carry lse's rounding (eps * |lse|, 4e-6 at logits of 60 in float32) into every entry.

Non-finite logits as in the materialised computation (``log_softmax``): a row holding +inf or NaN gives NaN
outputs and gradients. A -inf logit (a token masked out through the bias) is a token of probability 0: it adds
0 to the entropy (0 log 0 = 0) instead of the materialised formula's NaN, and gets no gradient.
It is also the oracle of the Triton kernels and their deterministic backward (``backward`` is shared).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._common import acc_dtype
from .torch_ce import CACHE_BLOCK_ELEMENTS, _logits, default_chunk_rows

# log p of a token of probability 0 (a -inf logit) is clamped to this: e^x underflows to exactly 0 from -104 in
# float32 and -745 in float64, so nothing changes for finite logits, while p log p becomes 0 (not 0 * -inf) and a
# per-row coefficient times log p cannot overflow.
LOG_ZERO = -1000.0


@dataclass(frozen=True)
class LogProbOptions:
    """The logit transform of ``linear_log_probs`` and whether the entropy is wanted."""

    softcap: float | None = None
    temperature: float = 1.0
    entropy: bool = False


def block_rows(vocab: int) -> int:
    """Rows of one elementwise block: its (rows, V) temporaries stay in a CPU's cache between passes."""
    return max(1, CACHE_BLOCK_ELEMENTS // vocab)


def final_logits(h, weight, bias, softcap: float | None, temperature: float, cap_grad: bool = False):
    """``(softcap(h @ W.T + b) / T, 1 - tanh^2 or None)``: (rows, V) in the accumulation dtype.

    The first scale (1 / softcap, or 1 / T without a cap) is applied to ``h`` and ``b`` before the GEMM rather than
    as an elementwise pass over the (rows, V) logits; the soft cap's derivative is returned only with ``cap_grad``.
    """
    acc = acc_dtype(h.dtype)
    scale = 1.0 / softcap if softcap is not None else 1.0 / temperature
    if scale != 1.0:
        h = h.to(acc) * scale
        bias = bias.to(acc) * scale if bias is not None else None
    z = _logits(h, weight, bias)
    grad = None
    if softcap is not None:
        z.tanh_()
        if cap_grad:
            grad = 1.0 - z.square()
        z.mul_(softcap / temperature)
    return z, grad


def _block_stats(s: torch.Tensor, targets: torch.Tensor, entropy: bool):
    """``(s[y] - c, c, log sum e^(s - c), entropy or None)`` of a block of final logits ``s`` (c: the row max, or
    0 where that is infinite); overwrites ``s``.

    The entropy is ``log sum e^x - sum e^x x / sum e^x`` with ``x = s - max s <= 0``: no cancellation between lse
    and E[s], both of the size of the logits.
    """
    target_logit = s.gather(1, targets.unsqueeze(1)).squeeze(1)
    row_max = s.amax(dim=1)
    # An infinite row max would give inf - inf = NaN; shifting by 0 keeps torch.logsumexp's +inf / -inf.
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    x = s.sub_(shift.unsqueeze(1))
    if not entropy:
        return target_logit - shift, shift, x.exp_().sum(dim=1).log_(), None
    # A -inf logit: e^x is still 0 and e^x x is 0, not 0 * -inf (0 log 0 = 0).
    x.clamp_(min=LOG_ZERO)
    e = x.exp()
    sum_e = e.sum(dim=1)
    log_sum = sum_e.log()
    # Summed like torch.sum: a batched BLAS dot (bmm) accumulates serially, biased by 2.5e-5 at V = 131,072.
    e_dot_x = torch.linalg.vecdot(e, x)
    return target_logit - shift, shift, log_sum, log_sum - e_dot_x / sum_e


def forward(hidden, weight, bias, targets, valid, opts: LogProbOptions, chunk_rows: int | None = None):
    """Per-token ``(logp, entropy, norm)`` of ``hidden`` (N, D) against ``weight`` (V, D), float32/64.

    ``targets`` (N,) must be in [0, V) at every row (ignored rows may hold any in-range id); ``valid`` marks the
    rows that count: ``logp`` and ``entropy`` (N,) are 0 elsewhere. ``entropy`` is all zeros unless
    ``opts.entropy``. ``norm`` (2, N) is each row's softmax normaliser ``(c, log sum e^(s - c))``, which backward
    needs (lse = c + log sum).
    """
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    target_rel = torch.empty(n_rows, dtype=acc, device=hidden.device)
    norm = torch.empty((2, n_rows), dtype=acc, device=hidden.device)
    ent = torch.zeros_like(target_rel)
    chunk_rows = chunk_rows or default_chunk_rows(vocab)
    step = block_rows(vocab)
    for start in range(0, n_rows, chunk_rows):
        z, _ = final_logits(hidden[start:start + chunk_rows], weight, bias, opts.softcap, opts.temperature)
        for r0 in range(0, z.shape[0], step):
            r = slice(r0, r0 + step)
            rows = slice(start + r0, start + r0 + z[r].shape[0])
            target_rel[rows], norm[0, rows], norm[1, rows], block_ent = _block_stats(z[r], targets[rows],
                                                                                      opts.entropy)
            if block_ent is not None:
                ent[rows] = block_ent
        del z  # before the next chunk's logits exist, or two chunks are held at once
    return finish(target_rel, norm, ent, valid)


def finish(target_rel, norm, ent, valid):
    """``(logp, entropy, norm)`` from ``s[y] - c`` and the normaliser: 0 at rows not ``valid``; NaN where a +inf
    logit makes the sum infinite (the materialised log-softmax of such a row is NaN)."""
    zeros = torch.zeros_like(target_rel)
    log_sum = norm[1]
    logp = torch.where(log_sum == math.inf, torch.full_like(log_sum, math.nan), target_rel - log_sum)
    return torch.where(valid, logp, zeros), torch.where(valid, ent, zeros), norm


def _block_grad(s, shift, log_sum, ent, targets, g_logp, g_ent, inv_t):
    """Overwrite a block of final logits ``s`` with d(sum g_logp logp + g_ent entropy) / d(s T) (None: no
    gradient); with t = s and p = softmax(t): -p (g_ent (log p + entropy) + g_logp) + g_logp [v == y], over T.

    The per-row coefficients carry 1 / T, and a NaN coefficient (backward's mark of a row with a non-finite lse)
    makes its whole row NaN, so no extra pass over the block is needed for either.
    """
    log_p = s.sub_(shift.unsqueeze(1)).sub_(log_sum.unsqueeze(1))
    if g_ent is None:
        ds = log_p.exp_().mul_((-inv_t * g_logp).unsqueeze(1))
    else:
        # A -inf logit: p = 0 and log p = -inf; clamped, p log p is 0 instead of 0 * -inf.
        p = log_p.clamp_(min=LOG_ZERO).exp()
        offset = g_ent * ent + (g_logp if g_logp is not None else 0.0)
        ds = log_p.mul_((-inv_t * g_ent).unsqueeze(1)).add_((-inv_t * offset).unsqueeze(1)).mul_(p)
    if g_logp is not None:
        rows = torch.arange(ds.shape[0], device=ds.device)
        ds[rows, targets] += inv_t * g_logp
    return ds


def backward(hidden, weight, bias, targets, valid, norm, ent, opts: LogProbOptions, g_logp, g_ent, needs,
             chunk_rows: int | None = None):
    """``(dh, dw, db)`` of ``sum g_logp * logp + g_ent * entropy`` in the input dtypes (None where ``needs`` says
    so), recomputing the logits chunk by chunk. ``g_logp``/``g_ent`` (N,) may be None (no gradient). Bit-
    reproducible (no atomics, a fixed order): the Triton backend calls it in deterministic mode."""
    need_h, need_w, need_b = needs
    acc = norm.dtype
    vocab = weight.shape[0]
    lse = norm[0] + norm[1]
    # Ignored rows get no gradient; a counted row whose lse is not finite gets NaN (the materialised gradient).
    bad_row = valid & ~torch.isfinite(lse)

    def per_token(g):
        if g is None:
            return None
        g = torch.where(valid, g.to(acc), torch.zeros_like(lse))
        return torch.where(bad_row, torch.full_like(g, math.nan), g)

    g_logp, g_ent = per_token(g_logp), per_token(g_ent)
    # Ignored rows get zero gradient; zeroed inputs keep it zero where their logits are not finite (0 * NaN).
    hidden = torch.where(valid.unsqueeze(1), hidden, torch.zeros_like(hidden))
    dh = torch.zeros_like(hidden) if need_h else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    db = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
    if g_logp is not None or g_ent is not None:
        chunk_rows = chunk_rows or default_chunk_rows(vocab)
        step = block_rows(vocab)
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]
            z, cap_grad = final_logits(h, weight, bias, opts.softcap, opts.temperature, cap_grad=True)
            for r0 in range(0, z.shape[0], step):
                r = slice(r0, r0 + step)
                rows = slice(start + r0, start + r0 + z[r].shape[0])
                ds = _block_grad(z[r], norm[0, rows], norm[1, rows], ent[rows], targets[rows],
                                 g_logp[rows] if g_logp is not None else None,
                                 g_ent[rows] if g_ent is not None else None, 1.0 / opts.temperature)
                if cap_grad is not None:
                    ds.mul_(cap_grad[r])
            if need_h:
                dh[start:start + chunk_rows] = z.to(weight.dtype) @ weight
            if need_w:
                dw.addmm_(z.T, h.to(acc))
            if need_b:
                db += z.sum(dim=0)
            del z, ds, cap_grad  # before the next chunk's logits exist (ds is a view of z)
    return (
        dh,
        dw.to(weight.dtype) if need_w else None,
        db.to(bias.dtype) if need_b else None,
    )


def argmax(hidden, weight, bias, softcap: float | None, chunk_rows: int | None = None) -> torch.Tensor:
    """Row argmax ids (N,) int64 of ``softcap(hidden @ weight.T + bias)``, by ``torch.argmax``'s rule: ties go to
    the smallest id and a NaN logit counts as the largest."""
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0])
    out = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        z, _ = final_logits(hidden[start:start + chunk_rows], weight, bias, softcap, 1.0)
        out[start:start + chunk_rows] = z.argmax(dim=-1)
        del z
    return out
