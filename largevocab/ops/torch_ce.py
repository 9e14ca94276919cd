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

When the recompute path is used: forward-only calls (no input needs a gradient), ``reduction="none"`` (per-token
upstream weights that one scalar cannot apply) and ``linear_cross_entropy_with_lse`` (its LSE may receive a
gradient of its own). Memory: the fused path allocates the same dH / float32 dW buffers a backward would, only at
the end of the forward instead of at the start of the backward; for a loss that is the last op before
``backward()`` (the usual training step) the peak is the same. A program that keeps several such losses alive
before one backward holds one dW per loss in the meantime; ``reduction="none"`` followed by its own ``.sum()``
keeps the recompute path's profile there.

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


def _stats_and_grad(s, targets, valid, opts: CEOptions, g, gl, owned=None, lse_ext=None):
    """Reduce a block of raw logits ``s`` (rows, V) in place; returns (loss, lse, target logit, logit sum or None),
    and with ``g`` (per-token upstream gradient of the loss, 0 at ignored rows) overwrites ``s`` with
    d(g . loss + gl . lse) / d z.

    For one shard of a vocabulary (:mod:`largevocab.parallel`): ``owned`` marks the rows whose target lies in this
    shard (the others get target logit 0 and no one-hot term), and ``lse_ext`` is the whole vocabulary's LSE, which
    the softmax of the gradient uses instead of the shard's own.

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
    if owned is not None:
        target_logit = torch.where(owned, target_logit, torch.zeros_like(target_logit))
    logit_sum = s.sum(dim=1) if opts.label_smoothing else None
    row_max = s.amax(dim=1)
    # Shifting an infinite row by its max would give inf - inf = NaN; shifting by 0 yields torch.logsumexp's
    # +inf / -inf for such rows instead.
    shift = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    sum_exp = s.sub_(shift.unsqueeze(1)).exp_().sum(dim=1)
    lse = sum_exp.log().add_(shift)
    loss = combine_loss(lse, target_logit, logit_sum, valid, opts, s.shape[1])
    if g is None:
        return loss, lse, target_logit, logit_sum
    lse_p = lse if lse_ext is None else lse_ext
    # d loss_n / d s_v = a_n p_v - (1 - eps) [v = y_n] - eps / V with a_n = 1 + 2 z lse_n; p_v = exp_v / sum_exp.
    coef = g * (1.0 + 2.0 * opts.z_loss * lse_p) if opts.z_loss else g
    if gl is not None:
        coef = coef + gl
    # p_v = exp(s_v - shift) * exp(shift - lse_p); for the block's own LSE that is exp_v / sum_exp.
    scale = coef / sum_exp if lse_ext is None else coef * torch.exp(shift - lse_ext)
    # A +inf logit: the materialised loss gradient is NaN for the whole row (its log-softmax is NaN). The LSE's own
    # gradient, gl * exp(s - lse), is then NaN only at the +inf entries, as torch.logsumexp's: left as computed.
    scale = torch.where((lse_p == math.inf) & (g != 0), torch.full_like(scale, math.nan), scale)
    ds = s.mul_(scale.unsqueeze(1))
    rows = torch.arange(ds.shape[0], device=ds.device)
    g_target = g if owned is None else torch.where(owned, g, torch.zeros_like(g))
    ds[rows, targets] -= g_target * (1.0 - opts.label_smoothing)
    if opts.label_smoothing:
        ds.sub_((g * (opts.label_smoothing / (opts.smoothing_vocab or ds.shape[1]))).unsqueeze(1))
    if cap_grad is not None:
        ds.mul_(cap_grad)
    return loss, lse, target_logit, logit_sum


def _chunk(h, weight, bias, targets, valid, opts, g, gl, needs, dh_out, dw, db, owned=None, lse_ext=None):
    """Per-token (loss, lse, target logit, logit sum) of one chunk of rows; with ``g``, also writes dH rows into
    ``dh_out`` and adds to dw / db."""
    s = _logits(h, weight, bias)
    n = s.shape[0]
    loss, lse, tgt = (torch.empty(n, dtype=s.dtype, device=s.device) for _ in range(3))
    lsum = torch.empty(n, dtype=s.dtype, device=s.device) if opts.label_smoothing else None
    step = _block_rows(s.shape[1])
    for r0 in range(0, n, step):
        r = slice(r0, r0 + step)

        def part(t, r=r):
            return t[r] if t is not None else None

        loss[r], lse[r], tgt[r], block_sum = _stats_and_grad(
            s[r], targets[r], valid[r], opts, part(g), part(gl), part(owned), part(lse_ext))
        if lsum is not None:
            lsum[r] = block_sum
    if g is not None:
        need_h, need_w, need_b = needs
        if need_h:
            dh_out.copy_(s.to(weight.dtype) @ weight)
        if need_w:
            dw.addmm_(s.T, h.to(dw.dtype))
        if need_b:
            db += s.sum(dim=0)
    return loss, lse, tgt, lsum


def _grad_buffers(hidden, weight, needs):
    need_h, need_w, need_b = needs
    acc = acc_dtype(hidden.dtype)
    dh = torch.empty_like(hidden) if need_h else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    return dh, dw, db


def _run(hidden, weight, bias, targets, valid, opts, g, gl, needs, chunk_rows, owned=None, lse_ext=None):
    n_rows = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    loss, lse, tgt = (torch.empty(n_rows, dtype=acc, device=hidden.device) for _ in range(3))
    lsum = torch.empty(n_rows, dtype=acc, device=hidden.device) if opts.label_smoothing else None
    dh, dw, db = (None, None, None)
    if g is not None:
        g = torch.where(valid, g, torch.zeros_like(g))
        dh, dw, db = _grad_buffers(hidden, weight, needs)
    chunk_rows = chunk_rows or default_chunk_rows(weight.shape[0])
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, start + chunk_rows)

        def part(t, rows=rows):
            return t[rows] if t is not None else None

        loss[rows], lse[rows], tgt[rows], chunk_sum = _chunk(
            hidden[rows], weight, bias, targets[rows], valid[rows], opts, part(g), part(gl), needs, part(dh), dw, db,
            part(owned), part(lse_ext),
        )
        if lsum is not None:
            lsum[rows] = chunk_sum
    if dw is not None:
        dw = dw.to(weight.dtype)
    if db is not None:
        db = db.to(bias.dtype)
    return (loss, lse, tgt, lsum), (dh, dw, db)


def forward(hidden, weight, bias, targets, valid, opts: CEOptions, g=None, needs=(False, False, False),
            chunk_rows: int | None = None):
    """Per-token ``(loss, lse, dh, dw, db)`` of ``hidden`` (N, D) against ``weight`` (V, D).

    ``loss``/``lse`` are (N,) in the accumulation dtype; ``targets`` (N,) must be in [0, V) at every row (ignored
    rows may hold any in-range id), ``valid`` (N,) marks the rows that count. With ``g`` (N,), the per-token
    upstream gradient of the loss, the gradients named by ``needs`` = (dH, dW, dbias) are computed in the same pass
    (in the input dtypes; None where not needed); without it they are None.
    """
    (loss, lse, _, _), grads = _run(hidden, weight, bias, targets, valid, opts, g, None, needs, chunk_rows)
    return (loss, lse, *grads)


def stats(hidden, weight, bias, targets, owned, opts: CEOptions, chunk_rows: int | None = None):
    """Per-token ``(lse, target logit, logit sum or None)`` of one vocabulary shard (``owned``: rows whose target,
    a local id, is in it; the others get target logit 0)."""
    valid = torch.ones_like(owned)
    (_, lse, tgt, lsum), _ = _run(hidden, weight, bias, targets, valid, opts, None, None, (False,) * 3, chunk_rows,
                                  owned)
    return lse, tgt, lsum


def backward(hidden, weight, bias, targets, valid, opts: CEOptions, g, gl, needs, chunk_rows: int | None = None,
             owned=None, lse_ext=None):
    """``(dh, dw, db)`` for per-token upstream gradients ``g`` of the loss and ``gl`` of the LSE (either may be
    None), recomputing the logits chunk by chunk. ``owned``/``lse_ext``: see :func:`_stats_and_grad`."""
    if g is None:
        g = torch.zeros(hidden.shape[0], dtype=acc_dtype(hidden.dtype), device=hidden.device)
    _, grads = _run(hidden, weight, bias, targets, valid, opts, g, gl, needs, chunk_rows, owned, lse_ext)
    return grads
