"""Pure-PyTorch backend of the exact linear + cross-entropy: chunked over tokens, recomputed in backward.

Runs on any device. Peak extra memory is O(chunk * V) for the logits of one chunk of rows (plus a float32
accumulator for dW when the inputs are float16/bfloat16), never O(N * V). It is also the test oracle of the
Triton kernels: both compute the same per-token quantities, described in ``largevocab.cross_entropy``.
"""

from __future__ import annotations

import torch

from .._common import CEOptions, combine_loss

# Rows per chunk are chosen so one chunk's logits hold about this many elements (128 MiB in float32): large
# enough that the chunk's GEMM runs near full speed (measured on CPU: 128 rows cost 1.3x the time per row of 4096),
# small enough that peak memory stays a few percent of the materialised logits at LLM vocabulary sizes.
CHUNK_ELEMENTS = 1 << 25


def default_chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None):
    """(rows, V) logits in the accumulation dtype, after the bias and the soft cap."""
    z = h @ weight.T
    z = z.to(_acc_dtype(h.dtype))
    if bias is not None:
        z += bias.to(z.dtype)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def per_token_loss(
    s: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, opts: CEOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and log-sum-exp of rows of final logits ``s`` (rows, V); loss is 0 where ``valid`` is False.

    Overwrites ``s``: the log-sum-exp is taken in place, which on CPU costs a third of ``torch.logsumexp``.
    """
    target_logit = s.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    logit_sum = s.sum(dim=-1) if opts.label_smoothing else None
    row_max = s.amax(dim=-1)
    # Subtracting an infinite row max would give inf - inf = NaN; shifting by 0 instead yields torch.logsumexp's
    # +inf / -inf for such rows.
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    lse = s.sub_(row_max.unsqueeze(1)).exp_().sum(dim=-1).log_().add_(row_max)
    return combine_loss(lse, target_logit, logit_sum, valid, opts, s.shape[1]), lse


def logit_grad(
    s: torch.Tensor,
    lse: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    opts: CEOptions,
) -> torch.Tensor:
    """d(sum_n g_n loss_n + gl_n lse_n) / d z for final logits ``s``; overwrites ``s``."""
    g = torch.where(valid, grad_loss, torch.zeros_like(grad_loss))
    coef = g * (1.0 + 2.0 * opts.z_loss * lse) if opts.z_loss else g
    if grad_lse is not None:
        coef = coef + grad_lse
    ds = s.sub_(lse.unsqueeze(1)).exp_().mul_(coef.unsqueeze(1))
    if opts.label_smoothing:
        ds.sub_((g * (opts.label_smoothing / ds.shape[1])).unsqueeze(1))
    rows = torch.arange(ds.shape[0], device=ds.device)
    ds[rows, targets.clamp(min=0)] -= g * (1.0 - opts.label_smoothing)
    return ds


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, valid, opts: CEOptions, chunk_rows: int):
        n_rows = hidden.shape[0]
        acc = _acc_dtype(hidden.dtype)
        loss = torch.empty(n_rows, dtype=acc, device=hidden.device)
        lse = torch.empty(n_rows, dtype=acc, device=hidden.device)
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            s = _logits(hidden[rows], weight, bias, opts.softcap)
            loss[rows], lse[rows] = per_token_loss(s, targets[rows], valid[rows], opts)
        ctx.save_for_backward(hidden, weight, bias, targets, valid, lse)
        ctx.opts, ctx.chunk_rows = opts, chunk_rows
        ctx.set_materialize_grads(False)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, bias, targets, valid, lse = ctx.saved_tensors
        opts, chunk_rows = ctx.opts, ctx.chunk_rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_loss is None:
            grad_loss = torch.zeros_like(lse)
        acc = lse.dtype
        grad_h = torch.empty_like(hidden) if need_h else None
        low_precision = weight.dtype != acc
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows]
            s = _logits(h, weight, bias, opts.softcap)
            cap_grad = None
            if opts.softcap is not None:
                cap_grad = 1.0 - (s / opts.softcap).square()
            gl = grad_lse[rows] if grad_lse is not None else None
            dz = logit_grad(s, lse[rows], targets[rows], valid[rows], grad_loss[rows], gl, opts)
            if cap_grad is not None:
                dz.mul_(cap_grad)
            if need_h:
                grad_h[rows] = dz.to(hidden.dtype) @ weight
            if need_w:
                grad_w.addmm_(dz.T, h.to(acc))
            if need_b:
                grad_b += dz.sum(dim=0)
        if need_w and low_precision:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def torch_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    valid: torch.Tensor,
    opts: CEOptions,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(loss, lse)`` of ``hidden`` (N, D) against ``weight`` (V, D): both (N,), float32/float64.

    Equivalent to ``F.cross_entropy(softcap(hidden @ weight.T + bias), targets, reduction="none", ...)`` plus the
    z-loss term, computed ``chunk_rows`` rows at a time. ``filter_eps`` is ignored here: gradients are exact.
    """
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0])
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, valid, opts, chunk_rows)
