"""The fused losses as ``torch.library`` custom ops: opaque, shape-known graph nodes for ``torch.compile``.

Why custom ops: Dynamo and AOTAutograd see each fused computation as one node with a fake (meta) implementation,
which gives output shapes and dtypes without running it, and a registered autograd formula. A compiled model then
traces with no graph break, and meta-device inputs work too (FSDP's meta-device initialisation, shape inference).

What stays inside the ops: everything that depends on tensor *values* — range checks of targets and indices, the
number of non-ignored rows (SCE's default bucket sizes), random draws. Under ``torch.compile`` an op still runs
eagerly at run time, so compiled results are bit-identical to eager ones, random draws from the global generator
included. The Triton kernels are launched inside these ops rather than through ``torch.library.triton_op``: their
launcher falls back to smaller configurations on ``OutOfResources`` and remembers what fitted per device, host logic
that Inductor's tracing of a ``triton_op`` cannot express.

Value checks (:func:`check_targets`), by mode. ``strict`` (what the public functions pass in eager mode) raises
``ValueError`` naming the value at once. Non-strict (traced by ``torch.compile``): on the CPU it raises at once too
(reading a CPU tensor costs no device sync); on CUDA it never syncs: nothing is read out of bounds, the rows with a
bad value get a NaN loss and NaN gradients, and the ``ValueError`` naming the value is raised by the next largevocab
op that runs after the GPU has finished that step (or by :func:`raise_pending_errors`).

The random-draw ops take their ``torch.Generator`` through :func:`use_generator` (custom-op schemas have no
generator type); ``torch.compile`` cannot trace a generator object, so under compile only ``generator=None`` (the
global generator, seeded by ``torch.manual_seed``) is accepted.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch

from .._common import CEOptions, acc_dtype
from . import torch_ce

LIBRARY = "largevocab"
# Deferred CUDA checks waiting for their copy to the host; beyond this many the oldest is waited for, so a
# loop that never lets the GPU catch up still reports within a bounded delay.
MAX_PENDING_CHECKS = 64

_state = threading.local()


# ------------------------------------------------------------------------------------------------ value checks


class _PendingChecks:
    """CUDA value checks whose verdict is copied to pinned host memory without a sync, read once ready."""

    def __init__(self) -> None:
        self.items: list = []

    def add(self, bad: torch.Tensor, values: torch.Tensor, message: str) -> None:
        first = torch.argmax(bad.to(torch.int8))
        verdict = torch.stack([bad.any().to(torch.int64), values.reshape(-1)[first].to(torch.int64)])
        host = torch.empty(2, dtype=torch.int64, pin_memory=True)
        host.copy_(verdict, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.items.append((event, host, message))
        if len(self.items) > MAX_PENDING_CHECKS:
            self.items[0][0].synchronize()

    def raise_ready(self, wait: bool = False) -> None:
        pending, self.items = self.items, []
        for i, (event, host, message) in enumerate(pending):
            if wait:
                event.synchronize()
            elif not event.query():
                self.items.extend(pending[i:])
                return
            if host[0]:
                self.items.extend(pending[i + 1:])
                raise ValueError(message.format(int(host[1])) + " (in an earlier call: reported without a sync)")


_PENDING = _PendingChecks()


def raise_pending_errors() -> None:
    """Wait for the deferred CUDA value checks of earlier calls (see the module docstring) and raise the first
    failure as ``ValueError``. A no-op on the CPU and when nothing failed."""
    _PENDING.raise_ready(wait=True)


def check_values(bad: torch.Tensor, values: torch.Tensor, message: str, strict: bool) -> torch.Tensor | None:
    """Raise ``ValueError(message.format(first bad value))`` if any ``bad``; returns None when checked here, or
    (non-strict CUDA) ``bad`` itself, whose rows the caller must poison with NaN."""
    _PENDING.raise_ready()
    if strict or bad.device.type != "cuda":
        if bad.numel() and bool(bad.any()):
            raise ValueError(message.format(values.reshape(-1)[bad.reshape(-1)][0].item()))
        return None
    _PENDING.add(bad, values, message)
    return bad


def _target_masks(targets: torch.Tensor, vocab: int, ignore_index: int):
    valid = targets != ignore_index
    return valid, valid & ((targets < 0) | (targets >= vocab))


def _safe_targets(targets, valid, bad):
    if bad is not None:
        valid = valid & ~bad
    return torch.where(valid, targets, torch.zeros_like(targets)), valid, bad


def check_targets(targets: torch.Tensor, vocab: int, ignore_index: int, strict: bool):
    """``(safe, valid, bad)`` for int64 ``targets`` (N,): ``valid`` marks rows that count, ``safe`` holds their
    targets and 0 elsewhere (so every gather is in range), ``bad`` is None or (non-strict CUDA) the rows whose
    target was out of range, to be poisoned with NaN by the caller."""
    valid, out_of_range = _target_masks(targets, vocab, ignore_index)
    bad = check_values(
        out_of_range, targets, f"targets must be in [0, V={vocab}) or equal ignore_index={ignore_index}; found {{}}",
        strict,
    )
    return _safe_targets(targets, valid, bad)


def rechecked_targets(targets: torch.Tensor, vocab: int, ignore_index: int):
    """The ``(safe, valid, bad)`` of :func:`check_targets` again, in a backward pass: the forward already raised
    for a bad target wherever it could, so what is left (a non-strict CUDA call) is only poisoned."""
    valid, out_of_range = _target_masks(targets, vocab, ignore_index)
    return _safe_targets(targets, valid, out_of_range if targets.device.type == "cuda" else None)


def poison(values: torch.Tensor, bad: torch.Tensor | None, per_row: bool) -> torch.Tensor:
    """``values`` times NaN where ``bad`` (per row), or everywhere if any row is bad (a reduced value)."""
    if bad is None:
        return values
    flag = bad if per_row else bad.any()
    return values * torch.where(flag, math.nan, 1.0).to(values.dtype)


def without_autocast(impl):
    """Run a custom op's implementation with autocast off: the public functions cast the inputs as ``F.linear``
    would before calling the op, and inside it the float32 accumulations (dW, the logits of 16-bit inputs, the
    backward GEMMs, which run under autocast too when ``backward()`` is called inside an autocast block) must keep
    the dtypes they were written for."""

    @functools.wraps(impl)
    def run(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return impl(*args, **kwargs)
        return impl(*args, **kwargs)

    return run


def is_strict() -> bool:
    """Value checks raise at once in eager mode; under torch.compile they must not sync (see the module doc)."""
    return not torch.compiler.is_compiling()


# ------------------------------------------------------------------------------------------------ generators


def use_generator(generator: torch.Generator | None):
    """A context in which the random-draw ops use ``generator`` (None: the global generator). Eager mode only for a
    generator: torch.compile cannot trace one."""
    if generator is None:
        return contextlib.nullcontext()
    if torch.compiler.is_compiling():
        raise ValueError(
            "torch.compile cannot trace a torch.Generator: pass generator=None under torch.compile (the draws then "
            "use the global generator, seeded by torch.manual_seed, exactly as in eager mode)"
        )
    return _generator_context(generator)


@contextlib.contextmanager
def _generator_context(generator: torch.Generator):
    previous = getattr(_state, "generator", None)
    _state.generator = generator
    try:
        yield
    finally:
        _state.generator = previous


def current_generator() -> torch.Generator | None:
    return getattr(_state, "generator", None)


# ------------------------------------------------------------------------------ exact linear + cross-entropy


def _empty_like_rows(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0)


def _ce_outputs_fake(hidden, weight, bias, reduction, precompute):
    n, acc = hidden.shape[0], acc_dtype(hidden.dtype)
    loss = hidden.new_empty((n,) if reduction == "none" else (), dtype=acc)
    lse = hidden.new_empty((n,), dtype=acc)
    dh = torch.empty_like(hidden) if precompute[0] else _empty_like_rows(hidden)
    dw = torch.empty_like(weight) if precompute[1] else _empty_like_rows(weight)
    db = torch.empty_like(bias) if precompute[2] else _empty_like_rows(weight)
    return loss, lse, dh, dw, db


def _token_grad(g_loss, valid, reduction: str):
    """Per-token upstream gradient of the loss from the gradient of the (reduced) output."""
    if g_loss is None:
        return None
    if reduction == "none":
        return g_loss
    g = g_loss.expand(valid.shape)
    if reduction == "mean":
        g = g / valid.sum().clamp(min=1).to(g.dtype)
    return g


def _reduce(loss, valid, reduction: str):
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    # Mean over non-ignored tokens; 0 (with zero gradients) when all are ignored, instead of torch's NaN.
    return total / valid.sum().clamp(min=1).to(total.dtype)


def _ce_backend(backend: str, hidden: torch.Tensor) -> str:
    # The kernels need at least one row and one column of D; the chunked torch code handles the empty cases.
    if backend == "triton" and (hidden.shape[0] == 0 or hidden.shape[1] == 0):
        return "torch"
    return backend


@torch.library.custom_op(f"{LIBRARY}::linear_cross_entropy", mutates_args=())
@without_autocast
def linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, softcap: float | None,
    filter_eps: float | None, backend: str, precompute: list[bool], strict: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse, dh, dw, db)``: the reduced (or per-token) loss, the per-token LSE, and, where ``precompute``
    asks (torch backend, scalar reductions), the gradients for a unit upstream gradient (empty otherwise)."""
    opts = CEOptions(label_smoothing, z_loss, softcap, filter_eps)
    safe, valid, bad = check_targets(targets, weight.shape[0], ignore_index, strict)
    backend = _ce_backend(backend, hidden)
    grads = (None, None, None)
    if any(precompute):
        g = _token_grad(torch.ones((), dtype=acc_dtype(hidden.dtype), device=hidden.device), valid, reduction)
        loss, lse, *grads = torch_ce.forward(hidden, weight, bias, safe, valid, opts, g=g.contiguous(),
                                             needs=tuple(precompute))
        grads = [poison(t, bad, per_row=False) if t is not None else None for t in grads]
    elif backend == "triton":
        from . import triton_ce

        loss, lse = triton_ce.forward(hidden, weight, bias, safe, valid, opts)
    else:
        loss, lse, *_ = torch_ce.forward(hidden, weight, bias, safe, valid, opts)
    loss = _reduce(poison(loss, bad, per_row=True), valid, reduction)
    dh, dw, db = (t if t is not None else _empty_like_rows(ref)
                  for t, ref in zip(grads, (hidden, weight, weight), strict=True))
    return loss, lse, dh, dw, db


@linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, reduction, label_smoothing, z_loss, softcap, filter_eps,
      backend, precompute, strict):
    return _ce_outputs_fake(hidden, weight, bias, reduction, precompute)


def _ce_setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, ignore_index, reduction, label_smoothing, z_loss, softcap, filter_eps,
     backend, precompute, strict) = inputs
    _, lse, dh, dw, db = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, dh, dw, db)
    ctx.mark_non_differentiable(dh, dw, db)
    ctx.set_materialize_grads(False)
    ctx.opts = CEOptions(label_smoothing, z_loss, softcap, filter_eps)
    ctx.config = (ignore_index, reduction, backend, any(precompute), strict)


def _grads_or_empty(grads, refs):
    return tuple(t if t is not None else _empty_like_rows(ref) for t, ref in zip(grads, refs, strict=True))


@torch.library.custom_op(f"{LIBRARY}::linear_cross_entropy_backward", mutates_args=())
@without_autocast
def linear_cross_entropy_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, lse: torch.Tensor,
    grad_tokens: torch.Tensor | None, grad_lse: torch.Tensor | None, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: float | None, filter_eps: float | None, backend: str, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dh, dw, db)`` (empty where not needed) for per-token upstream gradients of the loss and of the LSE;
    recomputes the logits. An op of its own so that torch.compile's backward graph does not trace the kernels."""
    opts = CEOptions(label_smoothing, z_loss, softcap, filter_eps)
    safe, valid, bad = rechecked_targets(targets, weight.shape[0], ignore_index)
    if grad_tokens is not None:
        grad_tokens = poison(grad_tokens.to(lse.dtype), bad, per_row=True).contiguous()
    if _ce_backend(backend, hidden) == "triton":
        from . import triton_ce

        grads = triton_ce.backward(hidden, weight, bias, safe, valid, lse, opts, grad_tokens, grad_lse, tuple(needs))
    else:
        grads = torch_ce.backward(hidden, weight, bias, safe, valid, opts, grad_tokens, grad_lse, tuple(needs))
    return _grads_or_empty(grads, (hidden, weight, weight))


@linear_cross_entropy_backward_op.register_fake
def _(hidden, weight, bias, targets, lse, grad_tokens, grad_lse, ignore_index, label_smoothing, z_loss, softcap,
      filter_eps, backend, needs):
    grads = (torch.empty_like(hidden), torch.empty_like(weight), torch.empty_like(bias) if bias is not None else None)
    return _grads_or_empty([t if need else None for t, need in zip(grads, needs, strict=True)],
                           (hidden, weight, weight))


def _ce_backward(ctx, g_loss, g_lse, *_):
    hidden, weight, bias, targets, lse, dh, dw, db = ctx.saved_tensors
    ignore_index, reduction, backend, precomputed, strict = ctx.config
    needs = tuple(ctx.needs_input_grad[:3])
    if g_loss is None and g_lse is None:
        return (None,) * 13
    if precomputed and g_lse is None:
        # The forward already applied the backward GEMMs for a unit upstream gradient of the scalar loss.
        scaled = [t * g_loss.to(t.dtype) if need else None for t, need in zip((dh, dw, db), needs, strict=True)]
        return (*scaled, *(None,) * 10)
    valid = targets != ignore_index
    g = _token_grad(g_loss, valid, reduction)
    opts = ctx.opts
    grads = torch.ops.largevocab.linear_cross_entropy_backward(
        hidden, weight, bias, targets, lse, g, g_lse, ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap,
        opts.filter_eps, backend, list(needs),
    )
    return (*(t if need else None for t, need in zip(grads, needs, strict=True)), *(None,) * 10)


linear_cross_entropy_op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


# ------------------------------------------------------------------------------------ Scalable Cross-Entropy


@torch.library.custom_op(f"{LIBRARY}::sce_select", mutates_args=())
@without_autocast
def sce_select_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, n_buckets: int | None,
    bucket_size_x: int | None, bucket_size_y: int, mix_x: bool, strict: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, cols, safe_targets, valid, bad)``: SCE's bucket rows (G, b_x) and items (G, b_y), with the sizes
    that depend on the number of non-ignored rows resolved here (see ``largevocab.scalable``)."""
    from ..scalable import select_buckets

    safe, valid, bad = check_targets(targets, weight.shape[0], ignore_index, strict)
    rows, cols = select_buckets(hidden, weight, valid, n_buckets, bucket_size_x, bucket_size_y, mix_x,
                                current_generator())
    return rows, cols, safe, valid, bad if bad is not None else torch.zeros_like(valid)


@sce_select_op.register_fake
def _(hidden, weight, targets, ignore_index, n_buckets, bucket_size_x, bucket_size_y, mix_x, strict):
    ctx = torch.library.get_ctx()
    # The default number of buckets and every b_x depend on how many rows are not ignored: unbacked sizes.
    n_b = n_buckets if n_buckets is not None else ctx.new_dynamic_size()
    b_x = ctx.new_dynamic_size()
    b_y = min(bucket_size_y, weight.shape[0])
    index = dict(dtype=torch.long, device=hidden.device)
    n = targets.shape[0]
    flags = dict(dtype=torch.bool, device=hidden.device)
    return (torch.empty((n_b, b_x), **index), torch.empty((n_b, b_y), **index), torch.empty((n,), **index),
            torch.empty((n,), **flags), torch.empty((n,), **flags))


def _sce_backend(backend: str, rows: torch.Tensor, cols: torch.Tensor, hidden: torch.Tensor):
    return "torch" if backend == "triton" and (rows.numel() == 0 or cols.numel() == 0 or hidden.shape[1] == 0) \
        else backend


def _sce_module(backend: str):
    if backend == "triton":
        from . import triton_sce

        return triton_sce
    from . import torch_sce

    return torch_sce


@torch.library.custom_op(f"{LIBRARY}::bucket_lse", mutates_args=())
@without_autocast
def bucket_lse_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                  cols: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse (G, R), positive (N,))`` of ``largevocab.ops.torch_sce.forward``."""
    if weight.shape[0] == 0:  # an empty vocabulary-parallel shard: no item, no positive
        acc = acc_dtype(hidden.dtype)
        return torch.full(rows.shape, -math.inf, dtype=acc, device=hidden.device), hidden.new_zeros(
            targets.shape, dtype=acc)
    return _sce_module(_sce_backend(backend, rows, cols, hidden)).forward(hidden, weight, targets, rows, cols)


@bucket_lse_op.register_fake
def _(hidden, weight, targets, rows, cols, backend):
    acc = acc_dtype(hidden.dtype)
    return hidden.new_empty(rows.shape, dtype=acc), hidden.new_empty(targets.shape, dtype=acc)


def _bucket_lse_setup_context(ctx, inputs, output):
    hidden, weight, targets, rows, cols, backend = inputs
    ctx.save_for_backward(hidden, weight, targets, rows, cols, output[0])
    ctx.backend = backend
    ctx.set_materialize_grads(False)


@torch.library.custom_op(f"{LIBRARY}::bucket_lse_backward", mutates_args=())
@without_autocast
def bucket_lse_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
    lse: torch.Tensor, grad_lse: torch.Tensor | None, grad_positive: torch.Tensor | None, backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh, dw)`` of :func:`bucket_lse_op` (empty where not needed), recomputing the bucket logits."""
    if weight.shape[0] == 0:
        grads = (torch.zeros_like(hidden), torch.zeros_like(weight))
        return _grads_or_empty([t if need else None for t, need in zip(grads, needs, strict=True)], (hidden, weight))
    module = _sce_module(_sce_backend(backend, rows, cols, hidden))
    grads = module.backward(hidden, weight, targets, rows, cols, lse, grad_lse, grad_positive, tuple(needs))
    return _grads_or_empty(grads, (hidden, weight))


@bucket_lse_backward_op.register_fake
def _(hidden, weight, targets, rows, cols, lse, grad_lse, grad_positive, backend, needs):
    grads = (torch.empty_like(hidden), torch.empty_like(weight))
    return _grads_or_empty([t if need else None for t, need in zip(grads, needs, strict=True)], (hidden, weight))


def _bucket_lse_backward(ctx, grad_lse, grad_positive):
    hidden, weight, targets, rows, cols, lse = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:2])
    if grad_lse is None and grad_positive is None:
        return (None,) * 6
    dh, dw = torch.ops.largevocab.bucket_lse_backward(hidden, weight, targets, rows, cols, lse, grad_lse,
                                                      grad_positive, ctx.backend, list(needs))
    return (dh if needs[0] else None), (dw if needs[1] else None), None, None, None, None


bucket_lse_op.register_autograd(_bucket_lse_backward, setup_context=_bucket_lse_setup_context)
