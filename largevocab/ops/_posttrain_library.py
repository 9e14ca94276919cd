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
from . import torch_distill, torch_log_probs
from ._library import LIBRARY, _reduce, _token_grad, check_targets, poison, rechecked_targets
from .torch_distill import DistillOptions
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
    """``(logp, entropy, norm)``: per token (N,), ``entropy`` zeros unless asked for; ``norm`` (2, N), each row's
    softmax normaliser ``(c, log sum e^(s - c))``, is for backward."""
    opts = LogProbOptions(softcap, temperature, entropy)
    safe, valid, bad = check_targets(targets, weight.shape[0], ignore_index, strict)
    with torch.autocast(hidden.device.type, enabled=False):
        logp, ent, norm = _log_probs_module(_backend(backend, hidden)).forward(hidden, weight, bias, safe, valid,
                                                                               opts)
    return poison(logp, bad, per_row=True), poison(ent, bad, per_row=True), norm


@linear_log_probs_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, softcap, temperature, entropy, backend, strict):
    n, acc = hidden.shape[0], acc_dtype(hidden.dtype)
    return hidden.new_empty((n,), dtype=acc), hidden.new_empty((n,), dtype=acc), hidden.new_empty((2, n), dtype=acc)


def _log_probs_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, softcap, temperature, entropy, backend, strict = inputs
    _, ent, norm = output
    ctx.save_for_backward(hidden, weight, bias, targets, norm, ent)
    ctx.mark_non_differentiable(norm)
    if not entropy:
        ctx.mark_non_differentiable(ent)
    ctx.set_materialize_grads(False)
    ctx.opts = LogProbOptions(softcap, temperature, entropy)
    ctx.config = (ignore_index, backend)


def _log_probs_backward(ctx, g_logp, g_ent, _g_norm):
    hidden, weight, bias, targets, norm, ent = ctx.saved_tensors
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
    g_logp, g_ent = (poison(g.to(norm.dtype), bad, per_row=True) if g is not None else None for g in (g_logp, g_ent))
    with torch.autocast(hidden.device.type, enabled=False):
        grads = _log_probs_module(_backend(backend, hidden)).backward(
            hidden, weight, bias, safe, valid, norm, ent, ctx.opts, g_logp, g_ent, needs)
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


# -------------------------------------------------------------------------------------------- distillation


def _distill_module(backend: str):
    if backend == "triton":
        from . import triton_distill

        return triton_distill
    return torch_distill


def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


@torch.library.custom_op(f"{LIBRARY}::linear_distillation_loss", mutates_args=())
def linear_distillation_op(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None,
    valid: torch.Tensor, kind: str, beta: float, temperature: float, reduction: str, entropy: bool, backend: str,
    precompute: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, entropy, norm, aux, dh, dw, db)``: the reduced (or per-token) divergence, the student's per-token
    entropy (zeros unless asked), what the Triton backward needs (both softmax normalisers (4, N), a per-row KL),
    and where ``precompute`` asks (torch backend, scalar reductions) the student's gradients for a unit upstream
    gradient (empty otherwise)."""
    opts = DistillOptions(kind, beta, temperature, entropy)
    heads = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
    grads = (None, None, None)
    with torch.autocast(student_hidden.device.type, enabled=False):
        if any(precompute):
            g = _token_grad(torch.ones((), dtype=acc_dtype(student_hidden.dtype), device=student_hidden.device),
                            valid, reduction)
            div, ent, norm, aux, grads = torch_distill.forward(*heads, valid, opts, g=g.contiguous(),
                                                               needs=tuple(precompute))
        elif _backend(backend, student_hidden) == "triton":
            from . import triton_distill

            div, ent, norm, aux = triton_distill.forward(*heads, valid, opts)
        else:
            div, ent, norm, aux, _ = torch_distill.forward(*heads, valid, opts)
    dh, dw, db = (t if t is not None else _empty(ref)
                  for t, ref in zip(grads, (student_hidden, student_weight, student_weight), strict=True))
    return _reduce(div, valid, reduction), ent, norm, aux, dh, dw, db


@linear_distillation_op.register_fake
def _(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, valid, kind, beta,
      temperature, reduction, entropy, backend, precompute):
    n, acc = student_hidden.shape[0], acc_dtype(student_hidden.dtype)
    loss = student_hidden.new_empty((n,) if reduction == "none" else (), dtype=acc)
    ent, aux = student_hidden.new_empty((n,), dtype=acc), student_hidden.new_empty((n,), dtype=acc)
    norm = student_hidden.new_empty((4, n), dtype=acc)
    grads = [torch.empty_like(t) if asked else _empty(ref) for t, ref, asked in zip(
        (student_hidden, student_weight, student_bias if student_bias is not None else student_weight),
        (student_hidden, student_weight, student_weight), precompute, strict=True)]
    return loss, ent, norm, aux, *grads


def _distill_setup_context(ctx, inputs, output):
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, valid, kind, beta,
     temperature, reduction, entropy, backend, precompute) = inputs
    _, ent, norm, aux, dh, dw, db = output
    ctx.save_for_backward(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                          valid, norm, aux, dh, dw, db)
    ctx.mark_non_differentiable(ent, norm, aux, dh, dw, db)
    ctx.set_materialize_grads(False)
    ctx.opts = DistillOptions(kind, beta, temperature, entropy)
    ctx.config = (reduction, backend, any(precompute))


def _distill_backward(ctx, g_loss, *_):
    (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, valid, norm, aux, dh,
     dw, db) = ctx.saved_tensors
    reduction, backend, precomputed = ctx.config
    needs = tuple(ctx.needs_input_grad[:3])
    rest = (None,) * 11  # the teacher (no gradient by definition) and the options
    if g_loss is None:
        return (None,) * 3 + rest
    if precomputed:
        # The forward already applied the backward GEMMs for a unit upstream gradient of the scalar loss.
        return (*(t * g_loss.to(t.dtype) if need else None for t, need in zip((dh, dw, db), needs, strict=True)),
                *rest)
    heads = (student_hidden, student_weight, student_bias)
    if student_hidden.device.type == "meta":
        return (*(torch.empty_like(t) if need else None for t, need in zip(heads, needs, strict=True)), *rest)
    g = _token_grad(g_loss, valid, reduction).to(norm.dtype).contiguous()
    teacher = (teacher_hidden, teacher_weight, teacher_bias)
    with torch.autocast(student_hidden.device.type, enabled=False):
        if _backend(backend, student_hidden) == "triton":
            from . import triton_distill

            grads = triton_distill.backward(*heads, *teacher, valid, norm, aux, ctx.opts, g, needs)
        else:
            grads = torch_distill.backward(*heads, *teacher, valid, ctx.opts, g, needs)
    return (*grads, *rest)


linear_distillation_op.register_autograd(_distill_backward, setup_context=_distill_setup_context)
