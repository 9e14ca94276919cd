"""Triton backend of the exact linear + cross-entropy ("cut CE"): the N x V logits never reach global memory.

Forward: each program owns BLOCK_N rows and one slice of the vocabulary; it builds logit tiles on chip
(fp32 accumulation over D), keeps an online log-sum-exp, the target logit and (for label smoothing) the sum of
the logits. The slices are merged in O(N * splits) with torch. Only the per-token LSE is saved for backward.

Backward recomputes each tile, turns it into d loss / d logits on chip and accumulates dH = dZ @ W,
dW = dZ^T @ H and dbias = sum_n dZ into float32 buffers, either with atomics from one fused kernel (default)
or, under ``torch.use_deterministic_algorithms(True)``, with two kernels in which every program owns its output
rows and walks the other axis in a fixed order (bit-identical across runs, one extra recompute of the logits).

Under ``TRITON_INTERPRET=1`` (CPU) the same kernels run with one fixed configuration and float16/bfloat16 tiles
upcast to float32, because the interpreter's low-precision arithmetic is wrong.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import triton
import triton.language as tl

from .._common import CEOptions, combine_loss
from ._launch import launch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Triton 3.6's interpreter turns a loop bound into a Python int with int(array of one element), which NumPy 2.4
# rejects; Triton 3.7 squeezes the array first. GPU compiles are unaffected.
_INTERPRETER_NUMPY_LIMIT = {(3, 6): (2, 4)}


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = (int(re.match(r"\d+", part).group()) for part in version.split(".")[:2])
    return major, minor


def interpreter_problem(triton_version: str = triton.__version__, numpy_version: str | None = None) -> str | None:
    """Why Triton's CPU interpreter cannot run these kernels with the installed packages, or None."""
    import numpy

    numpy_version = numpy_version or numpy.__version__
    limit = _INTERPRETER_NUMPY_LIMIT.get(_major_minor(triton_version))
    if limit is None or _major_minor(numpy_version) < limit:
        return None
    return (
        f"Triton {triton_version}'s CPU interpreter (TRITON_INTERPRET=1) fails with NumPy {numpy_version}: "
        f"install 'numpy<{limit[0]}.{limit[1]}' or triton>=3.7, or use backend='torch' on the CPU"
    )


_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Slots of the per-call scalar tensor: passed in the accumulation dtype because Triton's scalar arguments are
# float32, which would round e.g. 1 - label_smoothing in float64 gradchecks. Globals read inside kernels must be
# constexpr instances: the compiler rejects an annotated int (the interpreter does not).
PARAM_SOFTCAP = tl.constexpr(0)
PARAM_ONE_MINUS_EPS = tl.constexpr(1)
PARAM_EPS_OVER_V = tl.constexpr(2)
PARAM_FILTER_EPS = tl.constexpr(3)
# The forward splits the vocabulary so that at least this many programs per SM keep the GPU busy at small N.
PROGRAMS_PER_SM = 2
# |x| below which _tanh uses its series: there the exponential form loses up to 3 bits to cancellation (1/8 gives
# exp(1/4) + 1 = 2.28, 1 - 2/2.28 = 0.12), while the series' first omitted term, 21844/6081075 x**13, is < 1e-12 x.
TANH_SERIES_BOUND = tl.constexpr(0.125)


@triton.jit
def _tanh(x):
    """tanh(x) to a few ulp in float32 and float64, saturating to +-1 at +-inf (libdevice's tanh is not available
    under the interpreter).

    ``1 - 2 / (exp(2|x|) + 1)`` cancels for small |x|: its absolute error is ~eps, so ``softcap * tanh(s /
    softcap)`` was off by ~eps * softcap (0.9 % of the loss at softcap = 1e6). Below ``TANH_SERIES_BOUND`` the odd
    Taylor series up to x**11 is used instead (truncation error below 1e-13 relative); above it the exponential
    form is within ~8 ulp.
    """
    a = tl.abs(x)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (
        62.0 / 2835.0 + x2 * (-1382.0 / 155925.0))))))
    exp_form = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    exp_form = tl.where(x < 0, -exp_form, exp_form)
    return tl.where(a < TANH_SERIES_BOUND, series, exp_form)


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D, stride_hn, stride_wv, param_ptr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """softcap(H[offs_n] @ W[offs_v]^T + b[offs_v]) as a (BLOCK_N, BLOCK_V) tile; rows/cols past N/V read zeros."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_v = offs_v < V
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask_d = d[None, :] < D
        h = tl.load(h_rows + d[None, :], mask=mask_n[:, None] & mask_d, other=0.0)
        w = tl.load(w_rows + d[None, :], mask=mask_v[:, None] & mask_d, other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_SOFTCAP:
        softcap = tl.load(param_ptr + PARAM_SOFTCAP)
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _online_lse(m, sum_exp, s):
    """Fold a (rows, cols) tile into a running (max, sum of exp relative to the safe shift).

    The shift is the running max, or 0 while it is infinite: a row that has seen only -inf keeps sum 0, and a row
    with a +inf logit gets sum +inf, so ``shift + log(sum)`` is torch.logsumexp's -inf / +inf there instead of the
    NaN of inf - inf.
    """
    m_new = tl.maximum(m, tl.max(s, axis=1))
    shift_old = tl.where(tl.abs(m) == float("inf"), 0.0, m)
    shift_new = tl.where(tl.abs(m_new) == float("inf"), 0.0, m_new)
    sum_exp = sum_exp * tl.exp(shift_old - shift_new) + tl.sum(tl.exp(s - shift_new[:, None]), axis=1)
    return m_new, sum_exp


@triton.jit
def _lse_of(m, sum_exp):
    return tl.where(tl.abs(m) == float("inf"), 0.0, m) + tl.log(sum_exp)


@triton.jit
def _ce_fwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, part_ptr, param_ptr, N, V, D, stride_hn, stride_wv, v_per_split,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per (row block, vocabulary slice): the slice's log-sum-exp, target logit and logit sum -> part[3, S, N]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=ACC_DTYPE)
    sum_exp = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    tgt_logit = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    logit_sum = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        s = _logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, v_hi, D, stride_hn, stride_wv, param_ptr,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
        )
        in_vocab = (offs_v < v_hi)[None, :]
        m, sum_exp = _online_lse(m, sum_exp, tl.where(in_vocab, s, float("-inf")))
        tgt_logit += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], s, 0.0), axis=1)
        if HAS_SMOOTHING:
            logit_sum += tl.sum(tl.where(in_vocab, s, 0.0), axis=1)

    out = part_ptr + pid_s.to(tl.int64) * N + offs_n
    plane = n_splits.to(tl.int64) * N
    tl.store(out, _lse_of(m, sum_exp), mask=mask_n)
    tl.store(out + plane, tgt_logit, mask=mask_n)
    if HAS_SMOOTHING:
        tl.store(out + 2 * plane, logit_sum, mask=mask_n)


@triton.jit
def _grad_tile(
    s, offs_n, offs_v, N, V, tgt_ptr, lse_ptr, a_ptr, g_ptr, gl_ptr, param_ptr,
    HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, FILTER: tl.constexpr,
):
    """d loss / d logits of a tile, and whether it is kept by the gradient filter.

    delta = a_n * p - (1 - eps) * [v == y_n] - eps / V is d loss_n / d s_nv with a_n = 1 + 2 z lse_n; the tile
    is skipped when |delta| < filter_eps everywhere (rows with zero upstream gradient excluded).
    """
    one_minus_eps = tl.load(param_ptr + PARAM_ONE_MINUS_EPS)
    eps_over_v = tl.load(param_ptr + PARAM_EPS_OVER_V)
    mask_n = offs_n < N
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    a = tl.load(a_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
    live = (offs_v < V)[None, :] & mask_n[:, None]
    p = tl.where(live, tl.exp(s - lse[:, None]), 0.0)
    onehot = offs_v[None, :] == tgt[:, None]
    delta = tl.where(live, a[:, None] * p - tl.where(onehot, one_minus_eps, 0.0) - eps_over_v, 0.0)
    keep = True
    if FILTER:
        # Rows without upstream gradient cannot keep a tile alive.
        counted = tl.where((g != 0.0)[:, None], tl.abs(delta), 0.0)
        keep = tl.max(tl.max(counted, axis=1), axis=0) >= tl.load(param_ptr + PARAM_FILTER_EPS)
    # g * delta, not a mask on g: a NaN logit gives a NaN gradient even where g = 0, as autograd's 0 * NaN does.
    ds = g[:, None] * delta
    if HAS_GRAD_LSE:
        gl = tl.load(gl_ptr + offs_n, mask=mask_n, other=0.0)
        ds += gl[:, None] * p
    if HAS_SOFTCAP:
        t = s / tl.load(param_ptr + PARAM_SOFTCAP)
        ds = ds * (1.0 - t * t)
    return ds, keep


@triton.jit
def _scatter_tile_grads(
    ds, h_ptr, w_ptr, dh_ptr, dw_ptr, h_idx, w_idx, mask_n, mask_v, D, stride_hn, stride_wv,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dH[h_idx] += ds @ W[w_idx] and dW[w_idx] += ds^T @ H[h_idx] with atomics, D walked in BLOCK_D chunks.

    ``ds`` is a (BLOCK_N, BLOCK_V) tile of d loss / d logits; ``h_idx``/``w_idx`` index its rows of H and W
    (contiguous blocks or gathered indices alike, so duplicates accumulate); dH and dW have row stride D.
    """
    if not UPCAST:
        ds = ds.to(h_ptr.dtype.element_ty)  # the tensor-core operand dtype
    offs_d = tl.arange(0, BLOCK_D)
    h_rows = h_idx.to(tl.int64)[:, None]
    w_rows = w_idx.to(tl.int64)[:, None]
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask_d = d[None, :] < D
        if NEED_DH:
            w = tl.load(w_ptr + w_rows * stride_wv + d[None, :], mask=mask_v[:, None] & mask_d, other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(ds, w, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            tl.atomic_add(dh_ptr + h_rows * D + d[None, :], dh, mask=mask_n[:, None] & mask_d)
        if NEED_DW:
            h = tl.load(h_ptr + h_rows * stride_hn + d[None, :], mask=mask_n[:, None] & mask_d, other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(ds), h, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            tl.atomic_add(dw_ptr + w_rows * D + d[None, :], dw, mask=mask_v[:, None] & mask_d)


@triton.jit
def _vocab_block(order_ptr, start, V, BLOCK_V: tl.constexpr, SORTED: tl.constexpr):
    """Vocabulary ids of the block at ``start``: the positions themselves, or with SORTED the ids at those positions
    of the backward's visiting order (padding lanes get V, which every load and store masks out)."""
    pos = start + tl.arange(0, BLOCK_V)
    if SORTED:
        # Both branches must return int32 for the compiler; ids are < V < 2^31, and callers widen before scaling.
        return tl.load(order_ptr + pos, mask=pos < V, other=V).to(tl.int32)
    return pos


@triton.jit
def _ce_bwd_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, a_ptr, g_ptr, gl_ptr, dh_ptr, dw_ptr, db_ptr,
    param_ptr, order_ptr, N, V, D, stride_hn, stride_wv,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, FILTER: tl.constexpr,
    SORTED: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One tile per program; dH, dW, dbias accumulated with float32 atomics (fast, not bit-reproducible)."""
    pid_v = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = _vocab_block(order_ptr, pid_v * BLOCK_V, V, BLOCK_V, SORTED)
    s = _logits_tile(
        h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D, stride_hn, stride_wv, param_ptr,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
    )
    dz, keep = _grad_tile(
        s, offs_n, offs_v, N, V, tgt_ptr, lse_ptr, a_ptr, g_ptr, gl_ptr, param_ptr,
        HAS_SOFTCAP, HAS_GRAD_LSE, FILTER,
    )
    if keep:
        mask_n = offs_n < N
        mask_v = offs_v < V
        if NEED_DB:
            tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v)
        _scatter_tile_grads(
            dz, h_ptr, w_ptr, dh_ptr, dw_ptr, offs_n, offs_v, mask_n, mask_v, D, stride_hn, stride_wv,
            NEED_DH, NEED_DW, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
        )


@triton.jit
def _ce_bwd_dh_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, a_ptr, g_ptr, gl_ptr, dh_ptr,
    param_ptr, order_ptr, N, V, D, stride_hn, stride_wv,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, FILTER: tl.constexpr,
    SORTED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Deterministic dH: a program owns BLOCK_N rows of dH and walks the vocabulary in order."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    dh_rows = dh_ptr + offs_n.to(tl.int64)[:, None] * D
    for v0 in range(0, V, BLOCK_V):
        offs_v = _vocab_block(order_ptr, v0, V, BLOCK_V, SORTED)
        s = _logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D, stride_hn, stride_wv, param_ptr,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
        )
        dz, keep = _grad_tile(
            s, offs_n, offs_v, N, V, tgt_ptr, lse_ptr, a_ptr, g_ptr, gl_ptr, param_ptr,
            HAS_SOFTCAP, HAS_GRAD_LSE, FILTER,
        )
        if keep:
            # A new name: the compiler forbids changing a variable's dtype inside a runtime branch.
            dz_op = dz if UPCAST else dz.to(h_ptr.dtype.element_ty)
            w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_wv
            mask_v = offs_v < V
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                mask = mask_n[:, None] & (d[None, :] < D)
                w = tl.load(w_rows + d[None, :], mask=mask_v[:, None] & (d[None, :] < D), other=0.0)
                if UPCAST:
                    w = w.to(tl.float32)
                dh = tl.load(dh_rows + d[None, :], mask=mask, other=0.0)
                dh += tl.dot(dz_op, w, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
                tl.store(dh_rows + d[None, :], dh, mask=mask)


@triton.jit
def _ce_bwd_dw_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, a_ptr, g_ptr, gl_ptr, dw_ptr, db_ptr,
    param_ptr, order_ptr, N, V, D, stride_hn, stride_wv,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, FILTER: tl.constexpr,
    SORTED: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Deterministic dW and/or dbias: a program owns BLOCK_V rows of dW (and dbias) and walks the tokens in order.

    Each of dW and dbias is touched only when asked for: the launcher passes a small placeholder for the other.
    """
    pid_v = tl.program_id(0)
    offs_v = _vocab_block(order_ptr, pid_v * BLOCK_V, V, BLOCK_V, SORTED)
    mask_v = offs_v < V
    offs_d = tl.arange(0, BLOCK_D)
    dw_rows = dw_ptr + offs_v.to(tl.int64)[:, None] * D
    db = tl.zeros((BLOCK_V,), dtype=ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D, stride_hn, stride_wv, param_ptr,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
        )
        dz, keep = _grad_tile(
            s, offs_n, offs_v, N, V, tgt_ptr, lse_ptr, a_ptr, g_ptr, gl_ptr, param_ptr,
            HAS_SOFTCAP, HAS_GRAD_LSE, FILTER,
        )
        if keep:
            if NEED_DB:
                db += tl.sum(dz, axis=0)
            dz_op = dz if UPCAST else dz.to(h_ptr.dtype.element_ty)
            h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
            mask_n = offs_n < N
            if NEED_DW:
                for d0 in range(0, D, BLOCK_D):
                    d = d0 + offs_d
                    mask = mask_v[:, None] & (d[None, :] < D)
                    h = tl.load(h_rows + d[None, :], mask=mask_n[:, None] & (d[None, :] < D), other=0.0)
                    if UPCAST:
                        h = h.to(tl.float32)
                    dw = tl.load(dw_rows + d[None, :], mask=mask, other=0.0)
                    dw += tl.dot(tl.trans(dz_op), h, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
                    tl.store(dw_rows + d[None, :], dw, mask=mask)
    if NEED_DB:
        tl.store(db_ptr + offs_v, db, mask=mask_v)


# ----------------------------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class _LaunchConfig:
    COLUMNS: ClassVar[str] = "BLOCK_V"  # the tile axis the shared-memory fallback may narrow
    BLOCK_N: int
    BLOCK_V: int
    BLOCK_D: int
    num_warps: int = 4
    num_stages: int = 2


# The interpreter costs ~2 ms per program per loop step, so it gets large tiles; BLOCK_D stays small enough
# that tests with D > BLOCK_D walk the D loop more than once.
_INTERPRET_CONFIG = _LaunchConfig(BLOCK_N=128, BLOCK_V=512, BLOCK_D=64)


def uses_fma(dtype: torch.dtype) -> bool:
    """True when float32 tiles multiply on FMA units: IEEE float32, torch's default for CUDA matmuls.

    float32 inputs follow torch's own matmul setting, so "exact" means what F.linear would compute: TF32 tensor
    cores only when ``torch.backends.cuda.matmul.allow_tf32`` is on.
    """
    return dtype == torch.float32 and not INTERPRET and not torch.backends.cuda.matmul.allow_tf32


# IEEE float32 on FMA units. There the 128 x 128 tensor-core tile spilled in every kernel, and the deterministic
# dW kernel compiled to 32 registers with a 7.5-7.9 KB stack (sm_90, triton 3.7 and 3.9 alike). Of the tiles
# tried (128 x 64, 64 x 128, 128 x 32, 64 x 64; D steps of 16 and 32; 4 and 8 warps) two compiled without
# spills in every kernel on sm_90: 128 x 32 x 32 and this 64 x 64 x 16, both with 8 warps
# (benchmarks/kernel_resources.py). 64 x 64 loads a fifth less per output and spilled least on sm_80 and with
# triton 3.6 (at most 24 B). Chosen from compiles alone, not timings. triton_sampled and triton_sce use the same
# tile on FMA units.
FMA_BLOCK_ROWS, FMA_BLOCK_COLUMNS, FMA_BLOCK_D, FMA_WARPS = 64, 64, 16, 8
_FMA_CONFIG = _LaunchConfig(BLOCK_N=FMA_BLOCK_ROWS, BLOCK_V=FMA_BLOCK_COLUMNS, BLOCK_D=FMA_BLOCK_D,
                            num_warps=FMA_WARPS)


def _config(dtype: torch.dtype, backward: bool) -> _LaunchConfig:
    if INTERPRET:
        return _INTERPRET_CONFIG
    if dtype == torch.float64:
        return _LaunchConfig(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=2)
    stages = 3 if backward else 4
    if uses_fma(dtype):
        return replace(_FMA_CONFIG, num_stages=stages)
    block_d = 64 if dtype in _LOW_PRECISION else 32
    return _LaunchConfig(BLOCK_N=128, BLOCK_V=128, BLOCK_D=block_d, num_warps=8, num_stages=stages)


def _constexprs(hidden: torch.Tensor) -> dict:
    dtype = hidden.dtype
    tf32 = dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32  # see uses_fma
    precision = "tf32" if tf32 else "ieee"
    return {
        "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
        "UPCAST": INTERPRET and dtype in _LOW_PRECISION,
        "DOT_PRECISION": precision,
    }


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Rows may be strided (stride(0) is passed to the kernels); elements within a row must be adjacent."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _num_splits(n_row_blocks: int, vocab: int, block_v: int, device: torch.device) -> int:
    if INTERPRET:
        return min(2, triton.cdiv(vocab, block_v))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, n_row_blocks), triton.cdiv(vocab, block_v)))


def _params(opts: CEOptions, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    values = [0.0] * 4
    values[PARAM_SOFTCAP] = opts.softcap or 1.0
    values[PARAM_ONE_MINUS_EPS] = 1.0 - opts.label_smoothing
    values[PARAM_EPS_OVER_V] = opts.label_smoothing / (opts.smoothing_vocab or vocab)
    values[PARAM_FILTER_EPS] = opts.filter_eps or 0.0
    return torch.tensor(values, dtype=dtype, device=device)


def _forward(hidden, weight, bias, targets, opts: CEOptions, splits: int | None = None):
    """Per-token (lse, target logit, logit sum or None) of the final logits, in the accumulation dtype."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    cfg = _config(hidden.dtype, backward=False)
    consts = _constexprs(hidden)
    n_blocks = triton.cdiv(n_rows, cfg.BLOCK_N)
    if splits is None:
        splits = _num_splits(n_blocks, vocab, cfg.BLOCK_V, hidden.device)
    v_per_split = triton.cdiv(triton.cdiv(vocab, splits), cfg.BLOCK_V) * cfg.BLOCK_V
    splits = triton.cdiv(vocab, v_per_split)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    part = torch.empty((3, splits, n_rows), dtype=acc, device=hidden.device)
    launch(
        _ce_fwd_kernel, (n_blocks, splits), cfg, hidden.device,
        hidden, weight, bias if bias is not None else hidden, targets, part, _params(opts, vocab, acc, hidden.device),
        n_rows, vocab, dim, hidden.stride(0), weight.stride(0), v_per_split,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None, HAS_SMOOTHING=opts.label_smoothing > 0,
        **consts,
    )
    split_lse, tgt_logit, logit_sum = part.unbind(0)
    # torch.logsumexp keeps the non-finite cases of a materialised log-sum-exp (+inf, -inf, NaN) in the merge.
    lse = torch.logsumexp(split_lse, dim=0)
    return lse, tgt_logit.sum(dim=0), (logit_sum.sum(dim=0) if opts.label_smoothing else None)


def _vocab_order(targets: torch.Tensor, g: torch.Tensor, vocab: int) -> torch.Tensor:
    """The order in which the filtered backward visits the vocabulary: most frequent targets first.

    A tile can only be skipped if none of its rows has its target in it, so gathering the batch's targets into
    the first blocks (CCE's vocabulary sorting, with target counts as the key) leaves the other tiles holding only
    small softmax entries, which the filter then drops. Any order gives the same exact gradient for kept tiles.
    """
    counts = torch.bincount(targets[g != 0], minlength=vocab)
    return torch.argsort(counts, descending=True, stable=True)


def _backward(hidden, weight, bias, targets, lse, a, g, gl, opts: CEOptions, needs, deterministic: bool):
    """(dH, dW, dbias) as float32/float64 buffers (None where not needed)."""
    need_h, need_w, need_b = needs
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    cfg = _config(hidden.dtype, backward=True)
    consts = _constexprs(hidden)
    acc = lse.dtype
    dh = torch.zeros((n_rows, dim), dtype=acc, device=hidden.device) if need_h else None
    dw = torch.zeros((vocab, dim), dtype=acc, device=hidden.device) if need_w else None
    db = torch.zeros((vocab,), dtype=acc, device=hidden.device) if need_b else None
    dummy = lse
    common = (
        hidden, weight, bias if bias is not None else dummy, targets, lse, a, g, gl if gl is not None else dummy,
    )
    filtering = opts.filter_eps is not None and gl is None
    order = _vocab_order(targets, g, vocab) if filtering else None
    scalars = (
        _params(opts, vocab, acc, hidden.device), order if order is not None else targets,
        n_rows, vocab, dim, hidden.stride(0), weight.stride(0),
    )
    flags = dict(
        HAS_BIAS=bias is not None, HAS_SOFTCAP=opts.softcap is not None, HAS_GRAD_LSE=gl is not None,
        FILTER=filtering, SORTED=order is not None, **consts,
    )
    n_blocks = triton.cdiv(n_rows, cfg.BLOCK_N)
    device = hidden.device

    def v_blocks(c):
        return triton.cdiv(vocab, c.BLOCK_V)

    if deterministic:
        if need_h:
            launch(_ce_bwd_dh_kernel, (n_blocks,), cfg, device, *common, dh, *scalars, **flags)
        if need_w or need_b:
            launch(
                _ce_bwd_dw_kernel, lambda c: (v_blocks(c),), cfg, device,
                *common, dw if need_w else dummy, db if need_b else dummy, *scalars, NEED_DW=need_w, NEED_DB=need_b,
                **flags,
            )
    else:
        launch(
            _ce_bwd_kernel, lambda c: (v_blocks(c), n_blocks), cfg, device,
            *common, dh if need_h else dummy, dw if need_w else dummy, db if need_b else dummy, *scalars,
            NEED_DH=need_h, NEED_DW=need_w, NEED_DB=need_b, **flags,
        )
    return dh, dw, db


# ------------------------------------------------------------------------------ entry points of the op layer


def forward(hidden, weight, bias, targets, valid, opts: CEOptions, splits: int | None = None):
    """Per-token ``(loss, lse)`` of ``hidden`` (N, D) against ``weight`` (V, D): both (N,), float32/float64.

    Same contract as ``largevocab.ops.torch_ce.forward`` without gradients (the Triton backward recomputes the
    logits tile by tile); ``splits`` overrides how many vocabulary slices the forward uses (tests cover the merge).
    """
    hidden, weight = _rows_contiguous(hidden), _rows_contiguous(weight)
    bias = bias.contiguous() if bias is not None else None
    lse, tgt_logit, logit_sum = _forward(hidden, weight, bias, targets.contiguous(), opts, splits)
    return combine_loss(lse, tgt_logit, logit_sum, valid, opts, weight.shape[0]), lse


def backward(hidden, weight, bias, targets, valid, lse, opts: CEOptions, g, gl, needs):
    """``(dh, dw, db)`` in the input dtypes (None where ``needs`` says so) for per-token upstream gradients ``g`` of
    the loss and ``gl`` of the LSE (either may be None). Deterministic under
    ``torch.use_deterministic_algorithms(True)``, atomics otherwise."""
    hidden, weight = _rows_contiguous(hidden), _rows_contiguous(weight)
    bias = bias.contiguous() if bias is not None else None
    if g is None:
        g = torch.zeros_like(lse)
    g = torch.where(valid, g.to(lse.dtype), torch.zeros_like(lse)).contiguous()
    # A row holding a +inf logit has lse = +inf. The materialised loss gradient of such a row is NaN everywhere
    # (its log-softmax is NaN): a NaN coefficient a_n makes every delta of the row NaN, as there. The LSE's own
    # gradient, gl * exp(s - lse), is NaN only at the +inf entries, as torch.logsumexp's is.
    a = 1.0 + 2.0 * opts.z_loss * lse
    a = torch.where(lse == math.inf, torch.full_like(a, math.nan), a).contiguous()
    gl = gl.to(lse.dtype).contiguous() if gl is not None else None
    dh, dw, db = _backward(hidden, weight, bias, targets.contiguous(), lse, a, g, gl, opts, needs,
                           torch.are_deterministic_algorithms_enabled())
    return (
        dh.to(hidden.dtype) if dh is not None else None,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )
