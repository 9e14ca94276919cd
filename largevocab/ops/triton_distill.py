"""Triton backend of the fused distillation losses: neither the student's nor the teacher's logits reach memory.

Each program owns BLOCK_N rows and one slice of the vocabulary and builds the student's and the teacher's logit
tiles on chip with ``triton_ce._logits_tile`` (each with its own hidden size D_S / D_T). Pass structure, with
2·N·V·(D_S + D_T) FLOPs per pass over both heads:

* forward KL and reverse KL: one forward pass. A KL needs the normalised probabilities of both models, but it
  splits into online statistics: ``KL(p_t || p_s) = sum_v p_t,v (x_t,v - x_s,v) - log Z_t + log Z_s`` with
  ``x = logit - running shift`` (each model's running max), rescaled when a max moves; every term is bounded by
  the logits' range, never their size, so nothing cancels.
* JSD: two forward passes. The mixture ``m = beta p_t + (1 - beta) p_s`` sits inside a log elementwise, so both
  LSEs must be known first (pass 1: the two online LSEs), then pass 2 sums ``p log(p / m)`` for both models and
  keeps ``KL(p_s || m)`` for backward.
* backward: one pass (both tiles again, then dH = dZ @ W_S and dW_S = dZ^T @ H_S: 2·N·V·(D_S + D_T) + 4·N·V·D_S);
  the teacher gets no gradient. Under ``torch.use_deterministic_algorithms(True)`` the torch backend's chunked
  backward runs instead (no atomics).

Forward merges the slices in O(N * splits) with torch. Non-finite logits as in ``torch_distill``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import triton
import triton.language as tl

from . import torch_distill, triton_ce
from ._launch import launch
from .torch_distill import DistillOptions
from .triton_ce import INTERPRET, PARAM_SOFTCAP, _constexprs, _logits_tile, _rows_contiguous, _scatter_tile_grads

# Slots of the per-call scalar tensor (accumulation dtype); slot 0 is triton_ce's PARAM_SOFTCAP (unused: no cap).
PARAM_INV_TEMPERATURE = tl.constexpr(1)
PARAM_LOG_BETA = tl.constexpr(2)
PARAM_LOG_ONE_MINUS_BETA = tl.constexpr(3)
PARAM_ONE_MINUS_BETA = tl.constexpr(4)
_N_PARAMS = 5
KIND_IDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
# Planes of the forward's partial results: student shift, sum, teacher shift, sum, KL accumulator, entropy acc.
_PLANES = 6


@triton.jit
def _shift_of(m):
    """The running shift: the max, or 0 while it is infinite (triton_ce's convention)."""
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def _both_tiles(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, param_ptr, offs_n, offs_v, N, V, DS, DT,
    stride_hs, stride_ws, stride_ht, stride_wt,
    HAS_S_BIAS: tl.constexpr, HAS_T_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Student and teacher logit tiles divided by the temperature."""
    inv_t = tl.load(param_ptr + PARAM_INV_TEMPERATURE)
    s = _logits_tile(
        hs_ptr, ws_ptr, bs_ptr, offs_n, offs_v, N, V, DS, stride_hs, stride_ws, param_ptr,
        HAS_S_BIAS, False, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
    ) * inv_t
    t = _logits_tile(
        ht_ptr, wt_ptr, bt_ptr, offs_n, offs_v, N, V, DT, stride_ht, stride_wt, param_ptr,
        HAS_T_BIAS, False, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
    ) * inv_t
    return s, t


@triton.jit
def _log_probs_of(s, t, norm_ptr, offs_n, mask_n, N):
    """log p_s and log p_t of a tile as (x - c) - log sum with each row's normaliser from norm[4, N]: exact to
    the rounding of x - c, as torch.log_softmax."""
    c_s = tl.load(norm_ptr + offs_n, mask=mask_n, other=0.0)
    sum_s = tl.load(norm_ptr + N + offs_n, mask=mask_n, other=0.0)
    c_t = tl.load(norm_ptr + 2 * N + offs_n, mask=mask_n, other=0.0)
    sum_t = tl.load(norm_ptr + 3 * N + offs_n, mask=mask_n, other=0.0)
    return (s - c_s[:, None]) - sum_s[:, None], (t - c_t[:, None]) - sum_t[:, None]


@triton.jit
def _log_mixture(log_s, log_t, param_ptr):
    """log(beta p_t + (1 - beta) p_s), elementwise; -inf where both are 0."""
    a = log_t + tl.load(param_ptr + PARAM_LOG_BETA)
    b = log_s + tl.load(param_ptr + PARAM_LOG_ONE_MINUS_BETA)
    top = tl.maximum(a, b)
    top = tl.where(top == float("-inf"), 0.0, top)
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def _distill_fwd_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, part_ptr, param_ptr, N, V, DS, DT,
    stride_hs, stride_ws, stride_ht, stride_wt, v_per_split,
    HAS_S_BIAS: tl.constexpr, HAS_T_BIAS: tl.constexpr, KIND: tl.constexpr, HAS_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per (row block, vocabulary slice): both models' (shift, sum of exp), the KL accumulator
    sum e^(x_w) (x_w - x_o) (w the weighting model: teacher for forward KL, student for reverse KL) and the
    student's entropy accumulator sum e^(x_s) x_s -> part[6, S, N]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m_s = tl.full((BLOCK_N,), float("-inf"), dtype=ACC_DTYPE)
    m_t = tl.full((BLOCK_N,), float("-inf"), dtype=ACC_DTYPE)
    c_s = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    c_t = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    sum_s = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    sum_t = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    kl_acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    ent_acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        s, t = _both_tiles(
            hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, param_ptr, offs_n, offs_v, N, v_hi, DS, DT,
            stride_hs, stride_ws, stride_ht, stride_wt,
            HAS_S_BIAS, HAS_T_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
        )
        in_vocab = (offs_v < v_hi)[None, :]
        m_s = tl.maximum(m_s, tl.max(tl.where(in_vocab, s, float("-inf")), axis=1))
        m_t = tl.maximum(m_t, tl.max(tl.where(in_vocab, t, float("-inf")), axis=1))
        c_s_new = _shift_of(m_s)
        c_t_new = _shift_of(m_t)
        delta_s = c_s - c_s_new
        delta_t = c_t - c_t_new
        alpha_s = tl.exp(delta_s)
        alpha_t = tl.exp(delta_t)
        # Columns past the slice read zero logits: finite x, weight e = 0.
        x_s = s - c_s_new[:, None]
        x_t = t - c_t_new[:, None]
        e_s = tl.where(in_vocab, tl.exp(x_s), 0.0)
        e_t = tl.where(in_vocab, tl.exp(x_t), 0.0)
        # Each accumulator moves to the new shifts: times alpha of its weighting model, plus that model's sum times
        # the change of (x_w - x_o). A token of zero weight (a -inf logit) adds 0, not 0 * inf.
        if KIND == FORWARD_KL:
            kl_acc = alpha_t * (kl_acc + sum_t * (delta_t - delta_s)) + tl.sum(
                e_t * tl.where(e_t > 0.0, x_t - x_s, 0.0), axis=1)
        elif KIND == REVERSE_KL:
            kl_acc = alpha_s * (kl_acc + sum_s * (delta_s - delta_t)) + tl.sum(
                e_s * tl.where(e_s > 0.0, x_s - x_t, 0.0), axis=1)
        if HAS_ENTROPY:
            ent_acc = alpha_s * (ent_acc + sum_s * delta_s) + tl.sum(e_s * tl.where(e_s > 0.0, x_s, 0.0), axis=1)
        sum_s = sum_s * alpha_s + tl.sum(e_s, axis=1)
        sum_t = sum_t * alpha_t + tl.sum(e_t, axis=1)
        c_s = c_s_new
        c_t = c_t_new
    out = part_ptr + pid_s.to(tl.int64) * N + offs_n
    plane = n_splits.to(tl.int64) * N
    tl.store(out, c_s, mask=mask_n)
    tl.store(out + plane, sum_s, mask=mask_n)
    tl.store(out + 2 * plane, c_t, mask=mask_n)
    tl.store(out + 3 * plane, sum_t, mask=mask_n)
    tl.store(out + 4 * plane, kl_acc, mask=mask_n)
    tl.store(out + 5 * plane, ent_acc, mask=mask_n)


@triton.jit
def _jsd_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, norm_ptr, part_ptr, param_ptr, N, V, DS, DT,
    stride_hs, stride_ws, stride_ht, stride_wt, v_per_split,
    HAS_S_BIAS: tl.constexpr, HAS_T_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """JSD's second pass, per (row block, slice): KL(p_t || m) and KL(p_s || m) partial sums -> part[2, S, N]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    kl_t = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    kl_s = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        s, t = _both_tiles(
            hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, param_ptr, offs_n, offs_v, N, v_hi, DS, DT,
            stride_hs, stride_ws, stride_ht, stride_wt,
            HAS_S_BIAS, HAS_T_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
        )
        in_vocab = (offs_v < v_hi)[None, :]
        log_s, log_t = _log_probs_of(s, t, norm_ptr, offs_n, mask_n, N)
        log_m = _log_mixture(log_s, log_t, param_ptr)
        p_s = tl.where(in_vocab, tl.exp(log_s), 0.0)
        p_t = tl.where(in_vocab, tl.exp(log_t), 0.0)
        kl_t += tl.sum(p_t * tl.where(p_t > 0.0, log_t - log_m, 0.0), axis=1)
        kl_s += tl.sum(p_s * tl.where(p_s > 0.0, log_s - log_m, 0.0), axis=1)
    out = part_ptr + pid_s.to(tl.int64) * N + offs_n
    plane = n_splits.to(tl.int64) * N
    tl.store(out, kl_t, mask=mask_n)
    tl.store(out + plane, kl_s, mask=mask_n)


@triton.jit
def _distill_bwd_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, norm_ptr, aux_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
    param_ptr, N, V, DS, DT, stride_hs, stride_ws, stride_ht, stride_wt,
    HAS_S_BIAS: tl.constexpr, HAS_T_BIAS: tl.constexpr, KIND: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One tile per program: d(g . divergence) / d z_S, scattered into the student's dH, dW, dbias (atomics).

    forward KL: p_s - p_t; reverse KL: p_s (log p_s - log p_t - KL); JSD: (1 - beta) p_s (log p_s / m - KL(p_s || m))
    (``aux`` holds the per-row KL), all times g / T.
    """
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    s, t = _both_tiles(
        hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, param_ptr, offs_n, offs_v, N, V, DS, DT,
        stride_hs, stride_ws, stride_ht, stride_wt,
        HAS_S_BIAS, HAS_T_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
    )
    live = mask_n[:, None] & mask_v[None, :]
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
    log_s, log_t = _log_probs_of(s, t, norm_ptr, offs_n, mask_n, N)
    p_s = tl.where(live, tl.exp(log_s), 0.0)
    if KIND == FORWARD_KL:
        d = p_s - tl.where(live, tl.exp(log_t), 0.0)
    else:
        aux = tl.load(aux_ptr + offs_n, mask=mask_n, other=0.0)
        log_ref = log_t  # reverse KL: log p_s - log p_t; JSD: log p_s - log m
        if KIND != REVERSE_KL:
            log_ref = _log_mixture(log_s, log_t, param_ptr)
        # A token the student cannot emit (p_s = 0) gets no gradient, not 0 * inf.
        d = p_s * (tl.where(p_s > 0.0, log_s - log_ref, 0.0) - aux[:, None])
        if KIND != REVERSE_KL:
            d = d * tl.load(param_ptr + PARAM_ONE_MINUS_BETA)
    ds = d * (g * tl.load(param_ptr + PARAM_INV_TEMPERATURE))[:, None]
    # A NaN upstream gradient (the launcher's mark of a row with a non-finite LSE) spreads over its whole row.
    ds = tl.where((g != g)[:, None], float("nan"), ds)
    # An ignored row (g = 0) stays 0 even if its logits are NaN.
    ds = tl.where(live & (g != 0.0)[:, None], ds, 0.0)
    if NEED_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(ds, axis=0), mask=mask_v)
    _scatter_tile_grads(
        ds, hs_ptr, ws_ptr, dh_ptr, dw_ptr, offs_n, offs_v, mask_n, mask_v, DS, stride_hs, stride_ws,
        NEED_DH, NEED_DW, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
    )


# ----------------------------------------------------------------------------------------------- launchers


# The forward kernels hold two (BLOCK_N x BLOCK_V) logit tiles and their online statistics at once: with triton_ce's
# 128 x 128 tensor-core tile they spilled 264-608 B on sm_90 (triton 3.9, benchmarks/kernel_resources.py); half as
# many columns keep them in registers. Chosen from compiles alone, not timings.
FORWARD_MAX_COLUMNS = 64


def _config(dtype: torch.dtype, backward: bool):
    """triton_ce's tiles, with at most FORWARD_MAX_COLUMNS columns in the forward kernels."""
    cfg = triton_ce._config(dtype, backward)
    if not backward and not INTERPRET and cfg.BLOCK_V > FORWARD_MAX_COLUMNS:
        cfg = replace(cfg, BLOCK_V=FORWARD_MAX_COLUMNS)
    return cfg


def _params(opts: DistillOptions, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    values = [0.0] * _N_PARAMS
    values[PARAM_SOFTCAP] = 1.0
    values[PARAM_INV_TEMPERATURE] = 1.0 / opts.temperature
    values[PARAM_LOG_BETA] = math.log(opts.beta)
    values[PARAM_LOG_ONE_MINUS_BETA] = math.log1p(-opts.beta)
    values[PARAM_ONE_MINUS_BETA] = 1.0 - opts.beta
    return torch.tensor(values, dtype=dtype, device=device)


def _merge(shift, sums):
    """Common shift, total sum of exp and per-slice scale of (S, N) slices of an online LSE."""
    top = shift.max(dim=0).values  # every shift is finite
    scale = torch.exp(shift - top)
    return top, (sums * scale).sum(dim=0), scale


def _heads(student, teacher):
    """Pointers, sizes and flags shared by every launch: the student's and the teacher's head."""
    (hs, ws, bs), (ht, wt, bt) = student, teacher
    return (
        (hs, ws, bs if bs is not None else hs, ht, wt, bt if bt is not None else ht),
        (hs.shape[0], ws.shape[0], hs.shape[1], ht.shape[1], hs.stride(0), ws.stride(0), ht.stride(0),
         wt.stride(0)),
        dict(HAS_S_BIAS=bs is not None, HAS_T_BIAS=bt is not None, **_constexprs(hs)),
    )


def _forward(student, teacher, opts: DistillOptions, splits: int | None):
    """Per-token (divergence, student entropy, norm (4, N), aux) before masking; norm (both models' softmax
    normalisers (c, log sum e^(x - c))) and aux are what backward needs."""
    hs, ws, _ = student
    n_rows, vocab = hs.shape[0], ws.shape[0]
    cfg = _config(hs.dtype, backward=False)
    acc = torch.float64 if hs.dtype == torch.float64 else torch.float32
    params = _params(opts, acc, hs.device)
    pointers, sizes, flags = _heads(student, teacher)
    n_blocks = triton.cdiv(n_rows, cfg.BLOCK_N)
    if splits is None:
        splits = triton_ce._num_splits(n_blocks, vocab, cfg.BLOCK_V, hs.device)
    v_per_split = triton.cdiv(triton.cdiv(vocab, splits), cfg.BLOCK_V) * cfg.BLOCK_V
    splits = triton.cdiv(vocab, v_per_split)
    part = torch.empty((_PLANES, splits, n_rows), dtype=acc, device=hs.device)
    launch(
        _distill_fwd_kernel, (n_blocks, splits), cfg, hs.device, *pointers, part, params, *sizes, v_per_split,
        KIND=KIND_IDS[opts.kind], HAS_ENTROPY=opts.entropy, **flags,
    )
    c_s, sum_s, c_t, sum_t, kl_acc, ent_acc = part.unbind(0)
    top_s, total_s, scale_s = _merge(c_s, sum_s)
    top_t, total_t, scale_t = _merge(c_t, sum_t)
    log_s, log_t = total_s.log(), total_t.log()
    norm = torch.stack([top_s, log_s, top_t, log_t])
    # Each slice's accumulator moves to the common shifts as in the kernel's loop.
    move_s, move_t = c_s - top_s, c_t - top_t
    ent = (log_s - (scale_s * (ent_acc + sum_s * move_s)).sum(dim=0) / total_s if opts.entropy
           else torch.zeros_like(log_s))
    if opts.kind == "forward_kl":
        kl = (scale_t * (kl_acc + sum_t * (move_t - move_s))).sum(dim=0) / total_t - log_t + log_s
        return kl, ent, norm, kl
    if opts.kind == "reverse_kl":
        kl = (scale_s * (kl_acc + sum_s * (move_s - move_t))).sum(dim=0) / total_s - log_s + log_t
        return kl, ent, norm, kl
    jsd_part = torch.empty((2, splits, n_rows), dtype=acc, device=hs.device)
    launch(
        _jsd_kernel, (n_blocks, splits), cfg, hs.device, *pointers, norm, jsd_part, params, *sizes, v_per_split,
        **flags,
    )
    kl_t, kl_s = jsd_part.sum(dim=1).unbind(0)
    return opts.beta * kl_t + (1.0 - opts.beta) * kl_s, ent, norm, kl_s


def _backward(student, teacher, norm, aux, g, opts: DistillOptions, needs):
    """The student's (dH, dW, dbias) as float32/float64 buffers (None where not needed)."""
    need_h, need_w, need_b = needs
    hs, ws, _ = student
    n_rows, vocab = hs.shape[0], ws.shape[0]
    cfg = _config(hs.dtype, backward=True)
    acc = norm.dtype
    pointers, sizes, flags = _heads(student, teacher)
    dh = torch.zeros((n_rows, hs.shape[1]), dtype=acc, device=hs.device) if need_h else None
    dw = torch.zeros((vocab, hs.shape[1]), dtype=acc, device=hs.device) if need_w else None
    db = torch.zeros((vocab,), dtype=acc, device=hs.device) if need_b else None
    dummy = aux
    n_blocks = triton.cdiv(n_rows, cfg.BLOCK_N)
    launch(
        _distill_bwd_kernel, lambda c: (triton.cdiv(vocab, c.BLOCK_V), n_blocks), cfg, hs.device,
        *pointers, norm, aux, g, dh if need_h else dummy, dw if need_w else dummy, db if need_b else dummy,
        _params(opts, acc, hs.device), *sizes,
        KIND=KIND_IDS[opts.kind], NEED_DH=need_h, NEED_DW=need_w, NEED_DB=need_b, **flags,
    )
    return dh, dw, db


# ------------------------------------------------------------------------------ entry points of the op layer


def _contiguous(hidden, weight, bias):
    return _rows_contiguous(hidden), _rows_contiguous(weight), bias.contiguous() if bias is not None else None


def forward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, valid,
            opts: DistillOptions, splits: int | None = None):
    """Per-token ``(divergence, entropy, norm, aux)``: the divergence and the student's entropy (N,) (zeros unless
    ``opts.entropy``) are 0 where ``valid`` is False; ``norm`` (4, N) and ``aux`` (N,) are what ``backward`` needs.
    ``splits`` overrides how many vocabulary slices the kernels use (tests cover the merge)."""
    student = _contiguous(student_hidden, student_weight, student_bias)
    teacher = _contiguous(teacher_hidden, teacher_weight, teacher_bias)
    div, ent, norm, aux = _forward(student, teacher, opts, splits)
    div = torch.where(torch.isfinite(norm.sum(dim=0)), div, torch.full_like(div, math.nan))
    zeros = torch.zeros_like(div)
    return torch.where(valid, div, zeros), torch.where(valid, ent, zeros), norm, aux


def backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, valid,
             norm, aux, opts: DistillOptions, g, needs):
    """The student's ``(dh, dw, db)`` in the input dtypes for the per-token upstream gradient ``g`` (N,); atomics,
    or under ``torch.use_deterministic_algorithms(True)`` the torch backend's chunked backward (bit-reproducible)."""
    if torch.are_deterministic_algorithms_enabled():
        return torch_distill.backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
                                      teacher_bias, valid, opts, g, needs)
    student = _contiguous(student_hidden, student_weight, student_bias)
    teacher = _contiguous(teacher_hidden, teacher_weight, teacher_bias)
    g = torch.where(valid, g.to(norm.dtype), torch.zeros_like(aux))
    # A counted row whose LSE is not finite gets the materialised NaN gradient.
    bad = valid & ~torch.isfinite(norm.sum(dim=0))
    g = torch.where(bad, torch.full_like(g, math.nan), g).contiguous()
    dh, dw, db = _backward(student, teacher, norm.contiguous(), aux.contiguous(), g, opts, needs)
    hs, ws, bs = student
    return (
        dh.to(hs.dtype) if dh is not None else None,
        dw.to(ws.dtype) if dw is not None else None,
        db.to(bs.dtype) if db is not None else None,
    )
