"""Pure-PyTorch backend of the exact linear + cross-entropy: chunked over tokens, never O(N x V).

Runs on any device. For each chunk of rows it computes the (rows, V) logits with one GEMM, reduces them to the
per-token log-sum-exp, target logit and logit sum, and, when gradients are wanted in the same call, turns the chunk
into ``d loss / d logits`` and applies the two backward GEMMs at once (dH = dZ @ W, dW += dZ^T @ H): 3 GEMMs per
row, as eager PyTorch needs, instead of recomputing the logits in backward (4). The elementwise work on a chunk runs
on blocks of rows small enough to stay in cache, so its several passes (max, exp, sum, scale) cost about one pass
over memory. Peak extra memory is one chunk of logits (``CHUNK_ELEMENTS``) plus float32 dW when asked.

Two entry points, used by the custom op of :mod:`largevocab.ops._library`:

* :func:`forward` — per-token loss and LSE, and optionally the gradients for a given per-token upstream weight
  ``g`` (the op knows it at forward time for ``reduction="mean"``/``"sum"``: 1 / n_valid or 1);
* :func:`backward` — the gradients for arbitrary per-token upstream gradients of the loss and of the LSE
  (``reduction="none"``, a gradient through the returned LSE): recomputes the logits.

It is also the test oracle of the Triton kernels: both compute the quantities described in
``largevocab.cross_entropy``, with the non-finite cases of the materialised computation (see
:func:`largevocab._common.combine_loss`).
"""

from __future__ import annotations

import math

import torch

from .._common import CEOptions, acc_dtype, combine_loss

# Rows per chunk are chosen so one chunk's logits hold about this many elements (256 MiB in float32). The backward
# GEMM dW += dZ^T @ H reads and writes all of dW once per chunk, so fewer, larger chunks are faster (measured on a
# 2-core CPU at V = 131k, D = 256: 512-row chunks 1.3x faster per row than 128-row ones); at LLM vocabularies
# this is still a few percent of the materialised logits.
CHUNK_ELEMENTS = 1 << 26
# The elementwise passes over a chunk (soft cap, max, exp, sum, scale) run on blocks of rows holding about this many
# elements (4 MiB in float32), which stay in a CPU's L2/L3 cache between passes.
CACHE_BLOCK_ELEMENTS = 1 << 20
# 16-bit weights are converted to float32 this many rows at a time to accumulate the logits in float32 (a float16
# GEMM would round, and overflow above 65504, in its output).
CONVERT_ROWS = 1 << 14


def default_chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


_acc_dtype = acc_dtype  # kept for the other chunked backends that import it from here


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            softcap: float | None = None) -> torch.Tensor:
    """(rows, V) logits ``h @ W.T + b`` accumulated and returned in the accumulation dtype, soft-capped if asked."""
    acc = acc_dtype(h.dtype)
    if weight.dtype == acc:
        z = h @ weight.T
    else:
        h32 = h.to(acc)
        z = torch.empty((h.shape[0], weight.shape[0]), dtype=acc, device=h.device)
        for v0 in range(0, weight.shape[0], CONVERT_ROWS):
            torch.mm(h32, weight[v0:v0 + CONVERT_ROWS].to(acc).T, out=z[:, v0:v0 + CONVERT_ROWS])
    if bias is not None:
        z += bias.to(acc)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _block_rows(vocab: int) -> int:
    return max(1, CACHE_BLOCK_ELEMENTS // vocab)


def _stats_and_grad(s, targets, valid, opts: CEOptions, g, gl):
    """Reduce a block of raw logits ``s`` (rows, V) in place; returns (loss, lse), and with ``g`` (per-token
    upstream gradient of the loss, 0 at ignored rows) overwrites ``s`` with d(g . loss + gl . lse) / d z.

    Non-finite logits behave as in the materialised computation: a +inf logit makes lse +inf and the loss and the
    row's gradient NaN (``F.cross_entropy``'s log-softmax); a row of -inf gives lse -inf and NaN.
    """
    cap_grad = None
    if opts.softcap is not None:
        s.div_(opts.softcap).tanh_()
        if g is not None:
            cap_grad = 1.0 - s.square()
        s.mul_(opts.softcap)
    target_logit = s.gather(1, targets.unsqueeze(1)).squeeze(1)
    logit_sum = s.sum(dim=1) if opts.label_smoothing else None
    row_max = s.amax(dim=1)
    # Shifting an infinite row by its max would give inf - inf = NaN; shifting by 0 yields torch.logsumexp's
    # +inf / -inf for such rows instead.
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    sum_exp = s.sub_(shift.unsqueeze(1)).exp_().sum(dim=1)
    lse = sum_exp.log().add_(shift)
    loss = combine_loss(lse, target_logit, logit_sum, valid, opts, s.shape[1])
    if g is None:
        return loss, lse
    # d loss_n / d s_v = a_n p_v - (1 - eps) [v = y_n] - eps / V with a_n = 1 + 2 z lse_n; p_v = exp_v / sum_exp.
    coef = g * (1.0 + 2.0 * opts.z_loss * lse) if opts.z_loss else g
    if gl is not None:
        coef = coef + gl
    scale = coef / sum_exp
    # A +inf logit: the materialised loss gradient is NaN for the whole row (its log-softmax is NaN). The LSE's own
    # gradient, gl * exp(s - lse), is then NaN only at the +inf entries, as torch.logsumexp's: left as computed.
    scale = torch.where((lse == math.inf) & (g != 0), torch.full_like(scale, math.nan), scale)
    ds = s.mul_(scale.unsqueeze(1))
    rows = torch.arange(ds.shape[0], device=ds.device)
    ds[rows, targets] -= g * (1.0 - opts.label_smoothing)
    if opts.label_smoothing:
        ds.sub_((g * (opts.label_smoothing / ds.shape[1])).unsqueeze(1))
    if cap_grad is not None:
        ds.mul_(cap_grad)
    return loss, lse


def _chunk(h, weight, bias, targets, valid, opts, g, gl, needs, dh_out, dw, db):
    """Loss and LSE of one chunk of rows; with ``g``, also writes dH rows into ``dh_out`` and adds to dw / db."""
    s = _logits(h, weight, bias)
    loss = torch.empty(s.shape[0], dtype=s.dtype, device=s.device)
    lse = torch.empty_like(loss)
    step = _block_rows(s.shape[1])
    for r0 in range(0, s.shape[0], step):
        r = slice(r0, r0 + step)
        loss[r], lse[r] = _stats_and_grad(
            s[r], targets[r], valid[r], opts, g[r] if g is not None else None, gl[r] if gl is not None else None
        )
    if g is not None:
        need_h, need_w, need_b = needs
        if need_h:
            dh_out.copy_(s.to(weight.dtype) @ weight)
        if need_w:
            dw.addmm_(s.T, h.to(dw.dtype))
        if need_b:
            db += s.sum(dim=0)
    return loss, lse


def _grad_buffers(hidden, weight, needs):
    need_h, need_w, need_b = needs
    acc = acc_dtype(hidden.dtype)
    dh = torch.empty_like(hidden) if need_h else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    return dh, dw, db


def _run(hidden, weight, bias, targets, valid, opts, g, gl, needs, chunk_rows):
    n_rows = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    loss = torch.empty(n_rows, dtype=acc, device=hidden.device)
    lse = torch.empty(n_rows, dtype=acc, device=hidden.device)
    dh, dw, db = (None, None, None)
    if g is not None:
        g = torch.where(valid, g, torch.zeros_like(g))
        dh, dw, db = _grad_buffers(hidden, weight, needs)
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0])
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, start + chunk_rows)
        loss[rows], lse[rows] = _chunk(
            hidden[rows], weight, bias, targets[rows], valid[rows], opts,
            g[rows] if g is not None else None, gl[rows] if gl is not None else None, needs,
            dh[rows] if dh is not None else None, dw, db,
        )
    if dw is not None:
        dw = dw.to(weight.dtype)
    if db is not None:
        db = db.to(bias.dtype)
    return loss, lse, dh, dw, db


def forward(hidden, weight, bias, targets, valid, opts: CEOptions, g=None, needs=(False, False, False),
            chunk_rows: int | None = None):
    """Per-token ``(loss, lse, dh, dw, db)`` of ``hidden`` (N, D) against ``weight`` (V, D).

    ``loss``/``lse`` are (N,) in the accumulation dtype; ``targets`` (N,) must be in [0, V) at every row (ignored
    rows may hold any in-range id), ``valid`` (N,) marks the rows that count. With ``g`` (N,), the per-token
    upstream gradient of the loss, the gradients named by ``needs`` = (dH, dW, dbias) are computed in the same pass
    (in the input dtypes; None where not needed); without it they are None.
    """
    return _run(hidden, weight, bias, targets, valid, opts, g, None, needs, chunk_rows)


def backward(hidden, weight, bias, targets, valid, opts: CEOptions, g, gl, needs, chunk_rows: int | None = None):
    """``(dh, dw, db)`` for per-token upstream gradients ``g`` of the loss and ``gl`` of the LSE (either may be
    None), recomputing the logits chunk by chunk."""
    if g is None:
        g = torch.zeros(hidden.shape[0], dtype=acc_dtype(hidden.dtype), device=hidden.device)
    _, _, dh, dw, db = _run(hidden, weight, bias, targets, valid, opts, g, gl, needs, chunk_rows)
    return dh, dw, db
