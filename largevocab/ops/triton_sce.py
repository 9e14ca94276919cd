"""Triton bucketed log-sum-exp for Scalable Cross-Entropy: gathered rows x gathered items, never materialised.

Bucket g pairs R rows of ``hidden`` (indices ``rows[g]``) with C items of ``weight`` (indices ``cols[g]``). The
forward builds each (BLOCK_R x BLOCK_C) logit tile on chip from rows gathered by index (tensor cores on GPU) and
keeps an online log-sum-exp over the bucket's items, the row's own target masked to -inf. Backward recomputes the
tiles and scatters ``ds @ W`` into dH and ``ds^T @ X`` into dW with float32 atomics, so rows and items selected by
several buckets accumulate correctly. Same interpreter conventions as ``triton_ce`` (upcast 16-bit tiles, one
fixed configuration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import triton
import triton.language as tl

from ._launch import launch
from .torch_sce import add_positive_grad, positive_logits
from .triton_ce import (
    FMA_BLOCK_COLUMNS,
    FMA_BLOCK_D,
    FMA_BLOCK_ROWS,
    FMA_WARPS,
    INTERPRET,
    _constexprs,
    _logits_tile,
    _lse_of,
    _online_lse,
    _rows_contiguous,
    _scatter_tile_grads,
    uses_fma,
)


@triton.jit
def _bucket_lse_fwd_kernel(
    h_ptr, w_ptr, tgt_ptr, rows_ptr, cols_ptr, lse_ptr, N, V, D, R, C, stride_hn, stride_wv,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """lse[g, r] over the items of bucket g that are not row r's target; -inf when all are."""
    g = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    # Padding lanes index row N / item V, which _logits_tile treats as out of range (reads zeros).
    row = tl.load(rows_ptr + g * R + offs_r, mask=mask_r, other=N)
    tgt = tl.load(tgt_ptr + row, mask=mask_r, other=-1)
    m = tl.full((BLOCK_R,), float("-inf"), dtype=ACC_DTYPE)
    sum_exp = tl.zeros((BLOCK_R,), dtype=ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        col = tl.load(cols_ptr + g * C + offs_c, mask=mask_c, other=V)
        s = _logits_tile(
            h_ptr, w_ptr, h_ptr, row, col, N, V, D, stride_hn, stride_wv, h_ptr,
            False, False, BLOCK_R, BLOCK_C, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
        )
        # Padding lanes and absent items (id V: held by another rank) are not live, nor is the row's target.
        live = (col < V)[None, :] & (col[None, :] != tgt[:, None])
        # A row that has seen only masked items keeps lse -inf; a +inf logit gives +inf (torch.logsumexp's values).
        m, sum_exp = _online_lse(m, sum_exp, tl.where(live, s, float("-inf")))
    tl.store(lse_ptr + g * R + offs_r, _lse_of(m, sum_exp), mask=mask_r)


@triton.jit
def _bucket_lse_bwd_kernel(
    h_ptr, w_ptr, tgt_ptr, rows_ptr, cols_ptr, lse_ptr, glse_ptr, dh_ptr, dw_ptr,
    N, V, D, R, C, stride_hn, stride_wv,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (bucket, row block, item block) tile: ds = g * softmax, scattered into dH rows and dW rows."""
    g = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = offs_r < R
    mask_c = offs_c < C
    row = tl.load(rows_ptr + g * R + offs_r, mask=mask_r, other=N)
    col = tl.load(cols_ptr + g * C + offs_c, mask=mask_c, other=V)
    tgt = tl.load(tgt_ptr + row, mask=mask_r, other=-1)
    lse = tl.load(lse_ptr + g * R + offs_r, mask=mask_r, other=float("-inf"))
    glse = tl.load(glse_ptr + g * R + offs_r, mask=mask_r, other=0.0)
    s = _logits_tile(
        h_ptr, w_ptr, h_ptr, row, col, N, V, D, stride_hn, stride_wv, h_ptr,
        False, False, BLOCK_R, BLOCK_C, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
    )
    present = col < V  # padding lanes and absent items (id V) are never read or written
    live = present[None, :] & (col[None, :] != tgt[:, None]) & (lse > float("-inf"))[:, None]
    lse_safe = tl.where(lse > float("-inf"), lse, 0.0)
    ds = tl.where(live, tl.exp(s - lse_safe[:, None]), 0.0) * glse[:, None]
    _scatter_tile_grads(
        ds, h_ptr, w_ptr, dh_ptr, dw_ptr, row, col, mask_r, present, D, stride_hn, stride_wv,
        NEED_DH, NEED_DW, BLOCK_D, ACC_DTYPE, UPCAST, DOT_PRECISION,
    )


# ----------------------------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class _LaunchConfig:
    COLUMNS: ClassVar[str] = "BLOCK_C"  # the tile axis the shared-memory fallback may narrow
    BLOCK_R: int
    BLOCK_C: int
    BLOCK_D: int
    num_warps: int = 4
    num_stages: int = 2


# Buckets are small (b_x ~ 2 sqrt(N) rows): 64-row tiles waste little on ragged buckets.
_INTERPRET_CONFIG = _LaunchConfig(BLOCK_R=64, BLOCK_C=256, BLOCK_D=64)


def _config(dtype: torch.dtype) -> _LaunchConfig:
    if INTERPRET:
        return _INTERPRET_CONFIG
    if dtype == torch.float64:
        return _LaunchConfig(BLOCK_R=32, BLOCK_C=32, BLOCK_D=32)
    if uses_fma(dtype):
        return _LaunchConfig(BLOCK_R=FMA_BLOCK_ROWS, BLOCK_C=FMA_BLOCK_COLUMNS, BLOCK_D=FMA_BLOCK_D,
                             num_warps=FMA_WARPS, num_stages=3)
    return _LaunchConfig(BLOCK_R=64, BLOCK_C=128, BLOCK_D=64 if dtype in (torch.float16, torch.bfloat16) else 32,
                         num_warps=4, num_stages=3)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------ entry points of the op layer


def forward(hidden, weight, targets, rows, cols):
    """Same contract as ``largevocab.ops.torch_sce.forward``: ``(lse (G, R), positive (N,))``."""
    hidden, weight = _rows_contiguous(hidden), _rows_contiguous(weight)
    targets, rows, cols = targets.contiguous(), rows.contiguous(), cols.contiguous()
    n_buckets, r = rows.shape
    c = cols.shape[1]
    cfg = _config(hidden.dtype)
    lse = torch.empty(rows.shape, dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    launch(
        _bucket_lse_fwd_kernel, (n_buckets, triton.cdiv(r, cfg.BLOCK_R)), cfg, hidden.device,
        hidden, weight, targets, rows, cols, lse, hidden.shape[0], weight.shape[0], hidden.shape[1], r, c,
        hidden.stride(0), weight.stride(0), **_constexprs(hidden),
    )
    return lse, positive_logits(hidden, weight, targets)


def backward(hidden, weight, targets, rows, cols, lse, grad_lse, grad_positive, needs):
    """Same contract as ``largevocab.ops.torch_sce.backward``; dH and dW accumulate with float32 atomics."""
    hidden, weight = _rows_contiguous(hidden), _rows_contiguous(weight)
    targets, rows, cols = targets.contiguous(), rows.contiguous(), cols.contiguous()
    need_h, need_w = needs
    n_buckets, r = rows.shape
    c = cols.shape[1]
    cfg = _config(hidden.dtype)
    dh = torch.zeros(hidden.shape, dtype=lse.dtype, device=hidden.device) if need_h else lse
    dw = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else lse
    if grad_positive is not None:
        add_positive_grad(dh if need_h else None, dw if need_w else None, hidden, weight, targets,
                          grad_positive.to(lse.dtype))
    if grad_lse is not None:
        launch(
            _bucket_lse_bwd_kernel,
            lambda config: (n_buckets, triton.cdiv(r, config.BLOCK_R), triton.cdiv(c, config.BLOCK_C)),
            cfg, hidden.device,
            hidden, weight, targets, rows, cols, lse, grad_lse.to(lse.dtype).contiguous(), dh, dw,
            hidden.shape[0], weight.shape[0], hidden.shape[1], r, c, hidden.stride(0), weight.stride(0),
            NEED_DH=need_h, NEED_DW=need_w, **_constexprs(hidden),
        )
    return (dh.to(hidden.dtype) if need_h else None, dw.to(weight.dtype) if need_w else None)
