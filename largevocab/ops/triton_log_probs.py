"""Triton backend of the fused per-token log-probabilities, entropy and argmax: the logits never reach memory.

Forward: like ``triton_ce``'s, each program owns BLOCK_N rows and one slice of the vocabulary, builds logit tiles
on chip with ``triton_ce._logits_tile`` (bias and soft cap included), divides by the temperature, and keeps an
online log-sum-exp, the target logit and, for the entropy, ``sum e^x x`` with ``x = s - running max`` (rescaled
when the max moves, so the entropy never subtracts two logit-sized numbers). Slices merge in O(N * splits) with
torch; the LSE and the entropy (O(N)) are saved for backward.

Backward recomputes each tile, forms ``d (g_logp logp + g_ent entropy) / d logits`` on chip and scatters
dH/dW/dbias with ``triton_ce._scatter_tile_grads`` (float32 atomics). Under
``torch.use_deterministic_algorithms(True)`` it runs the torch backend's chunked backward instead, which has no
atomics. The argmax kernel keeps a running (max, first index) per row and slice, merged with torch.

Non-finite logits follow ``largevocab.ops.torch_log_probs`` (and ``triton_ce``'s convention of shifting by 0
while a running max is infinite): +inf or NaN in a row gives NaN, a -inf logit is a token of probability 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import torch_log_probs, triton_ce
from ._launch import launch
from .torch_log_probs import LogProbOptions
from .triton_ce import PARAM_SOFTCAP, _constexprs, _logits_tile, _rows_contiguous, _scatter_tile_grads

# Slots of the per-call scalar tensor (accumulation dtype). Slot 0 must stay triton_ce's PARAM_SOFTCAP: it is what
# _logits_tile reads.
PARAM_INV_TEMPERATURE = tl.constexpr(1)
_N_PARAMS = 2
# Planes of the forward's partial results: running max, sum of exp, entropy accumulator, target logit.
_PLANES = 4


@triton.jit
def _logp_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, part_ptr, param_ptr, N, V, D, stride_hn, stride_wv, v_per_split,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per (row block, vocabulary slice): shift c, sum e^x, sum e^x x (x = s - c) and s[y] -> part[4, S, N].

    c is the running max, or 0 while that is infinite (a slice of -inf keeps sum 0; a +inf logit makes it +inf).
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
    inv_t = tl.load(param_ptr + PARAM_INV_TEMPERATURE)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=ACC_DTYPE)
    shift = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    sum_exp = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    ent_acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    tgt_logit = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        s = _logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, v_hi, D, stride_hn, stride_wv, param_ptr,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
        ) * inv_t
        in_vocab = (offs_v < v_hi)[None, :]
        m = tl.maximum(m, tl.max(tl.where(in_vocab, s, float("-inf")), axis=1))
        shift_new = tl.where(tl.abs(m) == float("inf"), 0.0, m)
        alpha = tl.exp(shift - shift_new)
        x = tl.where(in_vocab, s - shift_new[:, None], float("-inf"))
        e = tl.exp(x)
        if HAS_ENTROPY:
            # sum e^x x moves to the new shift: times alpha, plus (old - new shift) * sum_exp. A -inf logit
            # (e = 0) adds 0 log 0 = 0.
            ent_acc = alpha * (ent_acc + (shift - shift_new) * sum_exp) + tl.sum(e * tl.where(e > 0.0, x, 0.0), 1)
        sum_exp = sum_exp * alpha + tl.sum(e, axis=1)
        shift = shift_new
        tgt_logit += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], s, 0.0), axis=1)

    out = part_ptr + pid_s.to(tl.int64) * N + offs_n
    plane = n_splits.to(tl.int64) * N
    tl.store(out, shift, mask=mask_n)
    tl.store(out + plane, sum_exp, mask=mask_n)
    tl.store(out + 2 * plane, ent_acc, mask=mask_n)
    tl.store(out + 3 * plane, tgt_logit, mask=mask_n)


@triton.jit
def _logp_grad_tile(
    s, offs_n, offs_v, N, V, tgt_ptr, norm_ptr, ent_ptr, glp_ptr, gent_ptr, param_ptr,
    HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr,
):
    """d (g_logp logp + g_ent entropy) / d z of a tile of capped logits ``s`` (before the temperature).

    With t = s / T and log p = (t - c) - log sum (the row's normaliser at norm[0 / 1, n]):
    d/dt = g_logp ([v == y] - p) - g_ent p (log p + entropy); then times 1/T and the soft cap's 1 - tanh^2.
    """
    inv_t = tl.load(param_ptr + PARAM_INV_TEMPERATURE)
    mask_n = offs_n < N
    live = (offs_v < V)[None, :] & mask_n[:, None]
    shift = tl.load(norm_ptr + offs_n, mask=mask_n, other=0.0)
    log_sum = tl.load(norm_ptr + N + offs_n, mask=mask_n, other=0.0)
    log_p = (s * inv_t - shift[:, None]) - log_sum[:, None]
    p = tl.where(live, tl.exp(log_p), 0.0)
    ds = tl.zeros_like(s)
    if HAS_GRAD_LOGP:
        g = tl.load(glp_ptr + offs_n, mask=mask_n, other=0.0)
        tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
        ds += g[:, None] * (tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0) - p)
    row_nan = offs_n < 0  # all False
    row_live = offs_n < 0  # rows with a gradient: an ignored row (g = 0) stays 0 even if its logits are NaN
    if HAS_GRAD_LOGP:
        row_nan = row_nan | (g != g)
        row_live = row_live | (g != 0.0)
    if HAS_GRAD_ENT:
        g_ent = tl.load(gent_ptr + offs_n, mask=mask_n, other=0.0)
        ent = tl.load(ent_ptr + offs_n, mask=mask_n, other=0.0)
        # A -inf logit (p = 0, log p = -inf) gets no gradient rather than 0 * inf.
        ds -= g_ent[:, None] * p * (tl.where(p > 0.0, log_p, 0.0) + ent[:, None])
        row_nan = row_nan | (g_ent != g_ent)
        row_live = row_live | (g_ent != 0.0)
    # A NaN upstream gradient (the launcher's mark of a row with a non-finite lse) spreads over its whole row.
    ds = tl.where(row_nan[:, None], float("nan"), ds)
    ds = tl.where(live & row_live[:, None], ds, 0.0) * inv_t
    if HAS_SOFTCAP:
        t = s / tl.load(param_ptr + PARAM_SOFTCAP)
        ds = ds * (1.0 - t * t)
    return ds


@triton.jit
def _logp_bwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, norm_ptr, ent_ptr, glp_ptr, gent_ptr, dh_ptr, dw_ptr, db_ptr,
    param_ptr, N, V, D, stride_hn, stride_wv,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One tile per program; dH, dW, dbias accumulated with atomics."""
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    s = _logits_tile(
        h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D, stride_hn, stride_wv, param_ptr,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
    )
    dz = _logp_grad_tile(
        s, offs_n, offs_v, N, V, tgt_ptr, norm_ptr, ent_ptr, glp_ptr, gent_ptr, param_ptr,
        HAS_SOFTCAP, HAS_GRAD_LOGP, HAS_GRAD_ENT,
    )
    mask_n = offs_n < N
    mask_v = offs_v < V
    if NEED_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v)
    _scatter_tile_grads(
        dz, h_ptr, w_ptr, dh_ptr, dw_ptr, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv,
        NEED_DH, NEED_DW, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
    )


@triton.jit
def _argmax_kernel(
    h_ptr, w_ptr, b_ptr, val_ptr, idx_ptr, param_ptr, N, V, D, stride_hn, stride_wv, v_per_split,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per (row block, vocabulary slice): (max, first id of the max) -> val[S, N], idx[S, N]; a NaN wins."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    best = tl.full((BLOCK_N,), float("-inf"), dtype=ACC_DTYPE)
    best_idx = tl.full((BLOCK_N,), V, dtype=tl.int32)  # V: nothing seen yet
    nan_idx = tl.full((BLOCK_N,), V, dtype=tl.int32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        s = _logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, v_hi, D, stride_hn, stride_wv, param_ptr,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
        )
        in_vocab = (offs_v < v_hi)[None, :]
        is_nan = in_vocab & (s != s)
        nan_idx = tl.minimum(nan_idx, tl.min(tl.where(is_nan, offs_v[None, :], V), axis=1))
        s = tl.where(in_vocab & (s == s), s, float("-inf"))
        tile_max = tl.max(s, axis=1)
        tile_idx = tl.min(tl.where(in_vocab & (s == tile_max[:, None]), offs_v[None, :], V), axis=1)
        # Strictly greater: an earlier (smaller) id keeps a tie; the first tile is always taken, even at -inf.
        better = (tile_max > best) | (best_idx == V)
        best_idx = tl.where(better, tile_idx, best_idx)
        best = tl.where(better, tile_max, best)
    has_nan = nan_idx < V
    out = pid_s.to(tl.int64) * N + offs_n
    tl.store(val_ptr + out, tl.where(has_nan, float("nan"), best), mask=mask_n)
    tl.store(idx_ptr + out, tl.where(has_nan, nan_idx, best_idx), mask=mask_n)


# ----------------------------------------------------------------------------------------------- launchers


def _config(dtype: torch.dtype, backward: bool):
    """triton_ce's tiles: the same _logits_tile / _scatter_tile_grads loops, a few more registers per row."""
    return triton_ce._config(dtype, backward)


def _params(softcap: float | None, temperature: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    values = [0.0] * _N_PARAMS
    values[PARAM_SOFTCAP] = softcap or 1.0
    values[PARAM_INV_TEMPERATURE] = 1.0 / temperature
    return torch.tensor(values, dtype=dtype, device=device)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split_grid(n_rows: int, vocab: int, cfg, device, splits: int | None):
    n_blocks = triton.cdiv(n_rows, cfg.BLOCK_N)
    if splits is None:
        splits = triton_ce._num_splits(n_blocks, vocab, cfg.BLOCK_V, device)
    v_per_split = triton.cdiv(triton.cdiv(vocab, splits), cfg.BLOCK_V) * cfg.BLOCK_V
    return n_blocks, triton.cdiv(vocab, v_per_split), v_per_split


def _forward(hidden, weight, bias, targets, opts: LogProbOptions, splits: int | None = None):
    """Per-token (s[y] - c, norm (2, N) = (c, log sum e^(s - c)), entropy) of the final logits; entropy is zeros
    unless ``opts.entropy``."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    cfg = _config(hidden.dtype, backward=False)
    n_blocks, splits, v_per_split = _split_grid(n_rows, vocab, cfg, hidden.device, splits)
    acc = _acc(hidden.dtype)
    part = torch.empty((_PLANES, splits, n_rows), dtype=acc, device=hidden.device)
    launch(
        _logp_fwd_kernel, (n_blocks, splits), cfg, hidden.device,
        hidden, weight, bias if bias is not None else hidden, targets, part,
        _params(opts.softcap, opts.temperature, acc, hidden.device),
        n_rows, vocab, dim, hidden.stride(0), weight.stride(0), v_per_split,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None, HAS_ENTROPY=opts.entropy,
        **_constexprs(hidden),
    )
    shift, sum_exp, ent_acc, tgt_logit = part.unbind(0)
    top = shift.max(dim=0).values  # every shift is finite
    scale = torch.exp(shift - top)
    total = (sum_exp * scale).sum(dim=0)
    log_total = total.log()
    if opts.entropy:
        # Each slice's sum e^x x moves from its shift to the common one: times scale, plus the shift difference
        # times its sum of exp.
        ent = log_total - (scale * (ent_acc + (shift - top) * sum_exp)).sum(dim=0) / total
    else:
        ent = torch.zeros_like(top)
    return tgt_logit.sum(dim=0) - top, torch.stack([top, log_total]), ent


def _backward(hidden, weight, bias, targets, norm, ent, g_logp, g_ent, opts: LogProbOptions, needs):
    """(dH, dW, dbias) as float32/float64 buffers (None where not needed)."""
    need_h, need_w, need_b = needs
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    cfg = _config(hidden.dtype, backward=True)
    acc = norm.dtype
    dh = torch.zeros((n_rows, dim), dtype=acc, device=hidden.device) if need_h else None
    dw = torch.zeros((vocab, dim), dtype=acc, device=hidden.device) if need_w else None
    db = torch.zeros((vocab,), dtype=acc, device=hidden.device) if need_b else None
    dummy = ent
    n_blocks = triton.cdiv(n_rows, cfg.BLOCK_N)
    launch(
        _logp_bwd_kernel, lambda c: (triton.cdiv(vocab, c.BLOCK_V), n_blocks), cfg, hidden.device,
        hidden, weight, bias if bias is not None else dummy, targets, norm, ent,
        g_logp if g_logp is not None else dummy, g_ent if g_ent is not None else dummy,
        dh if need_h else dummy, dw if need_w else dummy, db if need_b else dummy,
        _params(opts.softcap, opts.temperature, acc, hidden.device),
        n_rows, vocab, dim, hidden.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None,
        HAS_GRAD_LOGP=g_logp is not None, HAS_GRAD_ENT=g_ent is not None,
        NEED_DH=need_h, NEED_DW=need_w, NEED_DB=need_b, **_constexprs(hidden),
    )
    return dh, dw, db


# ------------------------------------------------------------------------------ entry points of the op layer


def _contiguous(hidden, weight, bias):
    return _rows_contiguous(hidden), _rows_contiguous(weight), bias.contiguous() if bias is not None else None


def forward(hidden, weight, bias, targets, valid, opts: LogProbOptions, splits: int | None = None):
    """Per-token ``(logp, entropy, norm)``: the contract of ``torch_log_probs.forward``; ``splits`` overrides how
    many vocabulary slices the kernel uses (tests cover the merge)."""
    hidden, weight, bias = _contiguous(hidden, weight, bias)
    target_rel, norm, ent = _forward(hidden, weight, bias, targets.contiguous(), opts, splits)
    return torch_log_probs.finish(target_rel, norm, ent, valid)


def backward(hidden, weight, bias, targets, valid, norm, ent, opts: LogProbOptions, g_logp, g_ent, needs):
    """``(dh, dw, db)``: the contract of ``torch_log_probs.backward``; atomics, or under
    ``torch.use_deterministic_algorithms(True)`` that chunked torch backward itself (bit-reproducible)."""
    if torch.are_deterministic_algorithms_enabled():
        return torch_log_probs.backward(hidden, weight, bias, targets, valid, norm, ent, opts, g_logp, g_ent, needs)
    if g_logp is None and g_ent is None:
        return tuple(torch.zeros_like(t) if need and t is not None else None
                     for t, need in zip((hidden, weight, bias), needs, strict=True))
    hidden, weight, bias = _contiguous(hidden, weight, bias)
    # Ignored rows get no gradient; a counted row whose lse is not finite gets NaN (the materialised gradient).
    bad_row = valid & ~torch.isfinite(norm[0] + norm[1])

    def per_token(g):
        if g is None:
            return None
        g = torch.where(valid, g.to(norm.dtype), torch.zeros_like(ent))
        return torch.where(bad_row, torch.full_like(g, math.nan), g).contiguous()

    dh, dw, db = _backward(hidden, weight, bias, targets.contiguous(), norm.contiguous(), ent.contiguous(),
                           per_token(g_logp),
                           per_token(g_ent), opts, needs)
    return (
        dh.to(hidden.dtype) if dh is not None else None,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )


def argmax(hidden, weight, bias, softcap: float | None, splits: int | None = None) -> torch.Tensor:
    """Row argmax ids (N,) int64 of ``softcap(hidden @ weight.T + bias)``, as ``torch.argmax`` picks them."""
    hidden, weight, bias = _contiguous(hidden, weight, bias)
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    cfg = _config(hidden.dtype, backward=False)
    n_blocks, splits, v_per_split = _split_grid(n_rows, vocab, cfg, hidden.device, splits)
    acc = _acc(hidden.dtype)
    vals = torch.empty((splits, n_rows), dtype=acc, device=hidden.device)
    idx = torch.empty((splits, n_rows), dtype=torch.int32, device=hidden.device)
    launch(
        _argmax_kernel, (n_blocks, splits), cfg, hidden.device,
        hidden, weight, bias if bias is not None else hidden, vals, idx, _params(softcap, 1.0, acc, hidden.device),
        n_rows, vocab, dim, hidden.stride(0), weight.stride(0), v_per_split,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, **_constexprs(hidden),
    )
    # Slices in vocabulary order: a NaN anywhere wins (its first id), else the max, ties to the smallest id.
    nan = torch.isnan(vals)
    best = torch.where(nan, torch.full_like(vals, math.inf), vals).max(dim=0).values
    eligible = torch.where(nan.any(dim=0), nan, vals == best)
    return torch.where(eligible, idx, torch.full_like(idx, vocab)).amin(dim=0).long()
