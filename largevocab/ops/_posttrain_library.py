"""The post-training ops (log-probs with entropy, argmax, distillation) as ``torch.library`` custom ops.

The same pattern as :mod:`largevocab.ops._library`: one opaque node per fused computation with a fake (meta)
implementation and a registered autograd formula, so ``torch.compile(fullgraph=True)`` traces them without a
graph break; target values are checked inside the ops with ``_library.check_targets`` (strict in eager mode).
Autocast is switched off inside the ops: the public functions have already cast the inputs as ``F.linear`` would,
and the chunked GEMMs must run in the dtypes they were given.
"""

from __future__ import annotations

import torch

from .._common import acc_dtype
from . import torch_log_probs
from ._library import LIBRARY, check_targets, poison, rechecked_targets
from .torch_log_probs import LogProbOptions


def _backend(backend: str, hidden: torch.Tensor) -> str:
    # The kernels need at least one row and one column of D; the chunked torch code handles the empty cases.
    if backend == "triton" and (hidden.shape[0] == 0 or hidden.shape[1] == 0):
        return "torch"
    return backend


def _log_probs_module(backend: str):
    if backend == "triton":
        from . import triton_log_probs

        return triton_log_probs
    return torch_log_probs


# ---------------------------------------------------------------------------------- log-probs and entropy


@torch.library.custom_op(f"{LIBRARY}::linear_log_probs", mutates_args=())
def linear_log_probs_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    ignore_index: int, softcap: float | None, temperature: float, entropy: bool, backend: str, strict: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp, entropy, lse)`` per token (N,); ``entropy`` is zeros unless asked for, ``lse`` is for backward."""
    opts = LogProbOptions(softcap, temperature, entropy)
    safe, valid, bad = check_targets(targets, weight.shape[0], ignore_index, strict)
    with torch.autocast(hidden.device.type, enabled=False):
        logp, ent, lse = _log_probs_module(_backend(backend, hidden)).forward(hidden, weight, bias, safe, valid, opts)
    return poison(logp, bad, per_row=True), poison(ent, bad, per_row=True), lse


@linear_log_probs_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, softcap, temperature, entropy, backend, strict):
    n, acc = hidden.shape[0], acc_dtype(hidden.dtype)
    return tuple(hidden.new_empty((n,), dtype=acc) for _ in range(3))


def _log_probs_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, softcap, temperature, entropy, backend, strict = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
    ctx.mark_non_differentiable(lse)
    if not entropy:
        ctx.mark_non_differentiable(ent)
    ctx.set_materialize_grads(False)
    ctx.opts = LogProbOptions(softcap, temperature, entropy)
    ctx.config = (ignore_index, backend)


def _log_probs_backward(ctx, g_logp, g_ent, _g_lse):
    hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
    ignore_index, backend = ctx.config
    needs = tuple(ctx.needs_input_grad[:3])
    rest = (None,) * 7
    g_ent = g_ent if ctx.opts.entropy else None
    if g_logp is None and g_ent is None:
        return (None,) * 3 + rest
    if hidden.device.type == "meta":
        grads = (hidden, weight, bias)
        return (*(torch.empty_like(t) if need else None for t, need in zip(grads, needs, strict=True)), *rest)
    safe, valid, bad = rechecked_targets(targets, weight.shape[0], ignore_index)
    g_logp, g_ent = (poison(g.to(lse.dtype), bad, per_row=True) if g is not None else None for g in (g_logp, g_ent))
    grads = _log_probs_module(_backend(backend, hidden)).backward(
        hidden, weight, bias, safe, valid, lse, ent, ctx.opts, g_logp, g_ent, needs)
    return (*grads, *rest)


linear_log_probs_op.register_autograd(_log_probs_backward, setup_context=_log_probs_setup_context)


# ---------------------------------------------------------------------------------------------------- argmax


@torch.library.custom_op(f"{LIBRARY}::linear_argmax", mutates_args=())
def linear_argmax_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
                     backend: str) -> torch.Tensor:
    """Row argmax ids (N,) int64; not differentiable (the public function passes detached tensors)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _log_probs_module(_backend(backend, hidden)).argmax(hidden, weight, bias, softcap)


@linear_argmax_op.register_fake
def _(hidden, weight, bias, softcap, backend):
    return hidden.new_empty((hidden.shape[0],), dtype=torch.long)
