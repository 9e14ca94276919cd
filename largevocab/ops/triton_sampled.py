"""Triton backend of the sampled cross-entropy ("CCE-"): the N x (1 + K) sampled logits never reach global memory.

Two kernel families, chosen by the shape of the negatives:

* per-row negatives (N, K): there is no reuse of a gathered ``W`` row across rows, so the work is a batched
  gather + dot product, bound by memory bandwidth. A program owns BLOCK_N rows, walks K in BLOCK_K chunks,
  gathers ``W[neg]`` as a (BLOCK_N, BLOCK_K, BLOCK_D) block per D chunk and reduces over D in fp32 (fp64 for
  fp64 inputs); tensor cores cannot help, so the blocks are small enough to live in registers.
* shared negatives (K,): every row scores the same K rows of ``W``, so a (BLOCK_N, BLOCK_K) tile is a real GEMM
  (``tl.dot``, tensor cores on GPU) of hidden rows against gathered weight rows.

Forward keeps an online log-sum-exp that starts at the positive logit, so it is finite even when every negative of
a row is masked as an accidental hit; K may be split over programs (merged in O(N * splits) with torch). Only the
per-row LSE is saved. Backward recomputes the logits, forms ``ds = g * softmax`` (``g * (p - 1)`` at the
positive) and accumulates dW into a float32/float64 buffer with ``tl.atomic_add`` (duplicate indices, within a
tile or across programs, accumulate correctly); per-row dH is written by the program that owns the rows, shared
dH is accumulated with atomics like ``triton_ce``'s backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import triton
import triton.language as tl

from ._launch import launch
from .torch_sampled import row_grad, sampled_loss
from .triton_ce import (
    _LOW_PRECISION,
    FMA_BLOCK_COLUMNS,
    FMA_BLOCK_D,
    FMA_BLOCK_ROWS,
    FMA_WARPS,
    INTERPRET,
    PROGRAMS_PER_SM,
    _constexprs,
    _logits_tile,
    _lse_of,
    _online_lse,
    _rows_contiguous,
    _scatter_tile_grads,
    uses_fma,
)

# Planes of the forward's partial results part[PLANES, splits, N].
# Constexpr instances because the kernels read them (the compiler rejects plain global ints; the interpreter
# does not).
PART_LSE = tl.constexpr(0)
PART_POSITIVE = tl.constexpr(1)
PLANES = 2


@triton.jit
def _positive_logit(h_ptr, w_ptr, offs_n, tgt, N, D, stride_hn, stride_wv, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """<h_n, W[y_n]> for the block's rows, (BLOCK_N,), accumulated in ACC_DTYPE; rows past N give 0."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + tgt.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask = mask_n[:, None] & (d[None, :] < D)
        h = tl.load(h_rows + d[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        w = tl.load(w_rows + d[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        acc += tl.sum(h * w, axis=1)
    return acc


@triton.jit
def _adjust_logits(s, neg, kmask, offs_n, tgt, N, corr_ptr, stride_corr,
                   HAS_CORR: tl.constexpr, REMOVE_HITS: tl.constexpr):
    """Subtract log(K q(item)) and set dead entries (past K or N, accidental hits) to -inf.

    ``neg``/``kmask`` are (BLOCK_N, BLOCK_K) for per-row negatives or (1, BLOCK_K) for shared ones.
    """
    if HAS_CORR:
        s -= tl.load(corr_ptr + neg * stride_corr, mask=kmask, other=0.0)
    keep = kmask & (offs_n < N)[:, None]
    if REMOVE_HITS:
        keep = keep & (neg != tgt[:, None])
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _rows_logits(h_ptr, w_ptr, offs_n, neg, live, N, D, stride_hn, stride_wv, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(BLOCK_N, BLOCK_K) tile <h_n, W[neg_nk]> by a 3-D gather per D chunk; dead entries read zeros."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + neg.to(tl.int64)[:, :, None] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask_d = d < D
        h = tl.load(h_rows + d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(ACC_DTYPE)
        w = tl.load(w_rows + d[None, None, :], mask=live[:, :, None] & mask_d[None, None, :], other=0.0)
        acc += tl.sum(h[:, None, :] * w.to(ACC_DTYPE), axis=2)
    return acc


@triton.jit
def _sampled_fwd_kernel(
    h_ptr, w_ptr, tgt_ptr, neg_ptr, corr_ptr, part_ptr, N, V, K, D, stride_hn, stride_wv, stride_corr, k_per_split,
    SHARED: tl.constexpr, HAS_CORR: tl.constexpr, REMOVE_HITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per (row block, slice of K): the slice's log-sum-exp over its negatives (slice 0: and the positive) and the
    positive logit -> part[PLANES, S, N]. A slice whose negatives are all masked has lse -inf, which the merge
    (torch.logsumexp) ignores; slice 0 always holds the positive, so a row's lse is never -inf from masking."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=0)
    s_pos = _positive_logit(h_ptr, w_ptr, offs_n, tgt, N, D, stride_hn, stride_wv, BLOCK_N, BLOCK_D, ACC_DTYPE)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=ACC_DTYPE)
    sum_exp = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    m, sum_exp = _online_lse(m, sum_exp, tl.where(pid_s == 0, s_pos, float("-inf"))[:, None])
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    neg_rows = neg_ptr + offs_n.to(tl.int64)[:, None] * K
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if SHARED:
            kmask = offs_k < k_hi
            # Padding lanes index item V, which _logits_tile treats as out of range (reads zeros).
            neg = tl.load(neg_ptr + offs_k, mask=kmask, other=V)
            s = _logits_tile(h_ptr, w_ptr, h_ptr, offs_n, neg, N, V, D, stride_hn, stride_wv, h_ptr,
                             False, False, BLOCK_N, BLOCK_K, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION)
            s = _adjust_logits(s, neg[None, :], kmask[None, :], offs_n, tgt, N, corr_ptr, stride_corr,
                               HAS_CORR, REMOVE_HITS)
        else:
            live = mask_n[:, None] & (offs_k < k_hi)[None, :]
            neg = tl.load(neg_rows + offs_k[None, :], mask=live, other=0)
            s = _rows_logits(h_ptr, w_ptr, offs_n, neg, live, N, D, stride_hn, stride_wv,
                             BLOCK_N, BLOCK_K, BLOCK_D, ACC_DTYPE)
            s = _adjust_logits(s, neg, live, offs_n, tgt, N, corr_ptr, stride_corr, HAS_CORR, REMOVE_HITS)
        m, sum_exp = _online_lse(m, sum_exp, s)

    out = part_ptr + pid_s.to(tl.int64) * N + offs_n
    plane = tl.num_programs(1).to(tl.int64) * N
    tl.store(out + PART_LSE * plane, _lse_of(m, sum_exp), mask=mask_n)
    tl.store(out + PART_POSITIVE * plane, s_pos, mask=mask_n)


@triton.jit
def _positive_grad(h_ptr, w_ptr, dh_ptr, dw_ptr, offs_n, tgt, ds_pos, N, D, stride_hn, stride_wv,
                   ATOMIC_DH: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
                   BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """dH_n (+)= ds_pos_n W[y_n] and dW[y_n] += ds_pos_n h_n; dH is stored (first write) unless ATOMIC_DH."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + tgt.to(tl.int64)[:, None] * stride_wv
    dh_rows = dh_ptr + offs_n.to(tl.int64)[:, None] * D
    dw_rows = dw_ptr + tgt.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask = mask_n[:, None] & (d[None, :] < D)
        if NEED_DH:
            w = tl.load(w_rows + d[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            if ATOMIC_DH:
                tl.atomic_add(dh_rows + d[None, :], ds_pos[:, None] * w, mask=mask)
            else:
                tl.store(dh_rows + d[None, :], ds_pos[:, None] * w, mask=mask)
        if NEED_DW:
            h = tl.load(h_rows + d[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            tl.atomic_add(dw_rows + d[None, :], ds_pos[:, None] * h, mask=mask)


@triton.jit
def _rows_bwd_kernel(
    h_ptr, w_ptr, tgt_ptr, neg_ptr, corr_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr,
    N, V, K, D, stride_hn, stride_wv, stride_corr,
    HAS_CORR: tl.constexpr, REMOVE_HITS: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Per-row negatives: a program owns BLOCK_N rows of dH (no atomics there) and scatters dW with atomics."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=0)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
    s_pos = _positive_logit(h_ptr, w_ptr, offs_n, tgt, N, D, stride_hn, stride_wv, BLOCK_N, BLOCK_D, ACC_DTYPE)
    ds_pos = g * (tl.exp(s_pos - lse) - 1.0)
    _positive_grad(h_ptr, w_ptr, dh_ptr, dw_ptr, offs_n, tgt, ds_pos, N, D, stride_hn, stride_wv,
                   False, NEED_DH, NEED_DW, BLOCK_D, ACC_DTYPE)

    offs_d = tl.arange(0, BLOCK_D)
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    dh_rows = dh_ptr + offs_n.to(tl.int64)[:, None] * D
    neg_rows = neg_ptr + offs_n.to(tl.int64)[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        live = mask_n[:, None] & (offs_k < K)[None, :]
        neg = tl.load(neg_rows + offs_k[None, :], mask=live, other=0)
        s = _rows_logits(h_ptr, w_ptr, offs_n, neg, live, N, D, stride_hn, stride_wv,
                         BLOCK_N, BLOCK_K, BLOCK_D, ACC_DTYPE)
        s = _adjust_logits(s, neg, live, offs_n, tgt, N, corr_ptr, stride_corr, HAS_CORR, REMOVE_HITS)
        ds = g[:, None] * tl.exp(s - lse[:, None])  # masked (-inf) entries give exactly 0
        w_rows = w_ptr + neg.to(tl.int64)[:, :, None] * stride_wv
        dw_rows = dw_ptr + neg.to(tl.int64)[:, :, None] * D
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            mask_d = d < D
            mask_nd = mask_n[:, None] & mask_d[None, :]
            if NEED_DH:
                w = tl.load(w_rows + d[None, None, :], mask=live[:, :, None] & mask_d[None, None, :], other=0.0)
                # The read-modify-write of dH may map an element to a different thread than the previous
                # iteration's store did: the barrier makes that store visible to the whole program first.
                tl.debug_barrier()
                dh = tl.load(dh_rows + d[None, :], mask=mask_nd, other=0.0)
                dh += tl.sum(ds[:, :, None] * w.to(ACC_DTYPE), axis=1)
                tl.store(dh_rows + d[None, :], dh, mask=mask_nd)
            if NEED_DW:
                h = tl.load(h_rows + d[None, :], mask=mask_nd, other=0.0).to(ACC_DTYPE)
                tl.atomic_add(dw_rows + d[None, None, :], ds[:, :, None] * h[:, None, :],
                              mask=live[:, :, None] & mask_d[None, None, :])


@triton.jit
def _shared_bwd_kernel(
    h_ptr, w_ptr, tgt_ptr, neg_ptr, corr_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr,
    N, V, K, D, stride_hn, stride_wv, stride_corr,
    HAS_CORR: tl.constexpr, REMOVE_HITS: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Shared negatives: one (BLOCK_N x BLOCK_K) tile per program, dH and dW accumulated with atomics.

    The programs of the first K block also add the positive's terms for their rows.
    """
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    kmask = offs_k < K
    tgt = tl.load(tgt_ptr + offs_n, mask=mask_n, other=0)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
    if pid_k == 0:
        s_pos = _positive_logit(h_ptr, w_ptr, offs_n, tgt, N, D, stride_hn, stride_wv, BLOCK_N, BLOCK_D, ACC_DTYPE)
        ds_pos = g * (tl.exp(s_pos - lse) - 1.0)
        _positive_grad(h_ptr, w_ptr, dh_ptr, dw_ptr, offs_n, tgt, ds_pos, N, D, stride_hn, stride_wv,
                       True, NEED_DH, NEED_DW, BLOCK_D, ACC_DTYPE)

    neg = tl.load(neg_ptr + offs_k, mask=kmask, other=V)
    s = _logits_tile(h_ptr, w_ptr, h_ptr, offs_n, neg, N, V, D, stride_hn, stride_wv, h_ptr,
                     False, False, BLOCK_N, BLOCK_K, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION)
    s = _adjust_logits(s, neg[None, :], kmask[None, :], offs_n, tgt, N, corr_ptr, stride_corr,
                       HAS_CORR, REMOVE_HITS)
    ds = g[:, None] * tl.exp(s - lse[:, None])
    _scatter_tile_grads(
        ds, h_ptr, w_ptr, dh_ptr, dw_ptr, offs_n, neg, mask_n, kmask, D, stride_hn, stride_wv,
        NEED_DH, NEED_DW, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
    )


# ----------------------------------------------------------------------------------------------- launchers

@dataclass(frozen=True)
class _LaunchConfig:
    COLUMNS: ClassVar[str] = "BLOCK_K"  # the tile axis the shared-memory fallback may narrow
    BLOCK_N: int
    BLOCK_K: int
    BLOCK_D: int
    num_warps: int = 4
    num_stages: int = 2


# The interpreter costs ~2 ms per program per loop step, so it gets large blocks; BLOCK_K and BLOCK_D stay small
# enough that tests with K > BLOCK_K and D > BLOCK_D walk those loops more than once. The per-row block is 3-D and
# the interpreter computes masked lanes too, so its blocks are smaller: padding would dominate at test sizes.
_INTERPRET_ROWS = _LaunchConfig(BLOCK_N=32, BLOCK_K=64, BLOCK_D=32)
_INTERPRET_SHARED = _LaunchConfig(BLOCK_N=128, BLOCK_K=128, BLOCK_D=64)
# Per-row negatives: the (BLOCK_N, BLOCK_K, BLOCK_D) gathered block lives in registers and has no reuse (the
# kernel is bandwidth bound, tensor cores cannot help): 16 x 32 x 32 = 16k elements over 8 warps is 64 registers
# per thread. float64 halves BLOCK_N for the same register budget.
_ROWS = _LaunchConfig(BLOCK_N=16, BLOCK_K=32, BLOCK_D=32, num_warps=8, num_stages=2)
_ROWS_FP64 = _LaunchConfig(BLOCK_N=8, BLOCK_K=32, BLOCK_D=32, num_warps=8, num_stages=2)
# Shared negatives: a GEMM tile like triton_ce's (128 x 128 with tensor cores, its smaller tile on FMA units,
# deeper pipelining in forward).
_SHARED_FP64 = _LaunchConfig(BLOCK_N=32, BLOCK_K=32, BLOCK_D=32, num_warps=4, num_stages=2)


def _config(dtype: torch.dtype, shared: bool, backward: bool) -> _LaunchConfig:
    if INTERPRET:
        return _INTERPRET_SHARED if shared else _INTERPRET_ROWS
    if not shared:
        return _ROWS_FP64 if dtype == torch.float64 else _ROWS
    if dtype == torch.float64:
        return _SHARED_FP64
    stages = 3 if backward else 4
    if uses_fma(dtype):
        return _LaunchConfig(BLOCK_N=FMA_BLOCK_ROWS, BLOCK_K=FMA_BLOCK_COLUMNS, BLOCK_D=FMA_BLOCK_D,
                             num_warps=FMA_WARPS, num_stages=stages)
    block_d = 64 if dtype in _LOW_PRECISION else 32
    return _LaunchConfig(BLOCK_N=128, BLOCK_K=128, BLOCK_D=block_d, num_warps=8, num_stages=stages)


def _num_splits(n_row_blocks: int, k_blocks: int, device: torch.device) -> int:
    """Slices of K in the forward: enough programs to fill the GPU when there are few row blocks."""
    if INTERPRET:
        return min(2, k_blocks)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, n_row_blocks), k_blocks))


def _forward(hidden, weight, targets, negatives, correction, remove_hits: bool, splits: int | None = None):
    """Per-row (lse, positive logit) in the accumulation dtype."""
    n_rows, dim = hidden.shape
    shared = negatives.dim() == 1
    k = negatives.shape[-1]
    cfg = _config(hidden.dtype, shared, backward=False)
    n_blocks = triton.cdiv(n_rows, cfg.BLOCK_N)
    k_blocks = max(1, triton.cdiv(k, cfg.BLOCK_K))
    if splits is None:
        splits = _num_splits(n_blocks, k_blocks, hidden.device)
    splits = max(1, min(splits, k_blocks))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), cfg.BLOCK_K) * cfg.BLOCK_K
    splits = triton.cdiv(k, k_per_split) if k else 1
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    part = torch.empty((PLANES, splits, n_rows), dtype=acc, device=hidden.device)
    launch(
        _sampled_fwd_kernel, (n_blocks, splits), cfg, hidden.device,
        hidden, weight, targets, negatives, correction if correction is not None else part, part,
        n_rows, weight.shape[0], k, dim, hidden.stride(0), weight.stride(0),
        correction.stride(0) if correction is not None else 0, k_per_split,
        SHARED=shared, HAS_CORR=correction is not None, REMOVE_HITS=remove_hits, **_constexprs(hidden),
    )
    # torch.logsumexp keeps the non-finite cases of a materialised log-sum-exp (+inf, -inf, NaN) in the merge.
    lse = torch.logsumexp(part[PART_LSE.value], dim=0)
    return lse, part[PART_POSITIVE.value, 0]


def _backward(hidden, weight, targets, negatives, correction, remove_hits: bool, lse, g, needs):
    """(dH, dW) as float32/float64 buffers (None where not needed)."""
    need_h, need_w = needs
    n_rows, dim = hidden.shape
    shared = negatives.dim() == 1
    k = negatives.shape[-1]
    cfg = _config(hidden.dtype, shared, backward=True)
    acc = lse.dtype
    dh = None
    if need_h:
        # Per-row dH is fully written by the program owning the rows; shared dH is accumulated with atomics.
        alloc = torch.zeros if shared else torch.empty
        dh = alloc((n_rows, dim), dtype=acc, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=acc, device=hidden.device) if need_w else None
    args = (
        hidden, weight, targets, negatives, correction if correction is not None else lse, lse, g,
        dh if need_h else lse, dw if need_w else lse,
        n_rows, weight.shape[0], k, dim, hidden.stride(0), weight.stride(0),
        correction.stride(0) if correction is not None else 0,
    )
    flags = dict(HAS_CORR=correction is not None, REMOVE_HITS=remove_hits, NEED_DH=need_h, NEED_DW=need_w)
    n_blocks = triton.cdiv(n_rows, cfg.BLOCK_N)
    if shared:
        # At least one K block so that the positive's terms (added by the first K block) exist when K = 0.
        launch(_shared_bwd_kernel, lambda c: (max(1, triton.cdiv(k, c.BLOCK_K)), n_blocks), cfg, hidden.device,
               *args, **flags, **_constexprs(hidden))
    else:
        launch(_rows_bwd_kernel, (n_blocks,), cfg, hidden.device, *args, **flags,
               ACC_DTYPE=_constexprs(hidden)["ACC_DTYPE"])
    return dh, dw


# ------------------------------------------------------------------------------ entry points of the op layer


def forward(hidden, weight, targets, valid, negatives, correction, remove_hits: bool, splits: int | None = None):
    """Per-row ``(loss, lse)`` (N,); same contract as ``largevocab.ops.torch_sampled.forward``. ``splits``
    overrides how many slices of K the forward uses (tests use it to cover the merge)."""
    hidden, weight = _rows_contiguous(hidden), _rows_contiguous(weight)
    lse, s_pos = _forward(hidden, weight, targets.contiguous(), negatives.contiguous(), correction, remove_hits,
                          splits)
    return sampled_loss(lse, s_pos, valid), lse


def backward(hidden, weight, targets, valid, negatives, correction, remove_hits: bool, lse, grad_loss, needs):
    """``(dh, dw)`` in the input dtypes (None where not needed) for the per-row upstream gradient ``grad_loss``."""
    hidden, weight = _rows_contiguous(hidden), _rows_contiguous(weight)
    g = row_grad(grad_loss, valid, lse).contiguous()
    dh, dw = _backward(hidden, weight, targets.contiguous(), negatives.contiguous(), correction, remove_hits, lse,
                       g, needs)
    return (dh.to(hidden.dtype) if dh is not None else None, dw.to(weight.dtype) if dw is not None else None)
