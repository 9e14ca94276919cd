"""Public API of the exact fused linear + cross-entropy."""

from __future__ import annotations

import torch

from . import parallel
from ._common import autocast_inputs, check_options, prepare_inputs, resolve_filter_eps
from .ops._library import is_strict


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package, which is not installed")
        from .ops.triton_ce import INTERPRET, interpreter_problem

        if device.type != "cuda" and not INTERPRET:
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}); use backend='torch' or 'auto' on this device, "
                "or set TRITON_INTERPRET=1 before importing largevocab to run the kernels on the CPU interpreter"
            )
        if device.type != "cuda" and (problem := interpreter_problem()):
            raise RuntimeError(problem)
    return backend


def _autocast(hidden, weight, bias):
    """Under torch.autocast, cast like the F.linear this replaces would (see ``_common.autocast_inputs``)."""
    return autocast_inputs(hidden, weight, bias)


def _linear_cross_entropy(hidden, weight, targets, *, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                          shift, filter_eps, backend, process_group, lse_wanted: bool):
    check_options(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, shift=shift, backend=backend,
    )
    hidden, weight, bias, targets, shard = parallel.resolve(weight, bias, process_group, hidden=hidden,
                                                            targets=targets)
    inputs = prepare_inputs(hidden, weight, targets, bias, ignore_index=ignore_index, shift=shift,
                            allow_empty_vocab=shard is not None)
    h, w, b = inputs.hidden, inputs.weight, inputs.bias
    filter_eps = resolve_filter_eps(filter_eps, h.dtype)
    resolved = _resolve_backend(backend, h.device)
    if shard is not None:
        loss, lse = parallel.linear_cross_entropy(
            h, w, b, inputs.targets, shard, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, backend=resolved, strict=is_strict(),
        )
        lse = lse.reshape(inputs.target_shape)
        return (loss.reshape(inputs.target_shape) if reduction == "none" else loss), lse
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and h.requires_grad, grad_on and w.requires_grad, grad_on and b is not None and b.requires_grad]
    # The torch backend applies the backward GEMMs during the forward when the upstream gradient is one scalar
    # (3 GEMMs instead of 4): not for "none" (per-token upstream gradients) nor when the LSE is returned (it may
    # receive a gradient of its own); those recompute the logits in backward.
    precompute = needs if resolved == "torch" and reduction != "none" and not lse_wanted else [False] * 3
    loss, lse, *_ = torch.ops.largevocab.linear_cross_entropy(
        h, w, b, inputs.targets, ignore_index, reduction, float(label_smoothing), float(z_loss),
        float(softcap) if softcap is not None else None, filter_eps, resolved, precompute, is_strict(),
    )
    lse = lse.reshape(inputs.target_shape)
    return (loss.reshape(inputs.target_shape) if reduction == "none" else loss), lse


def linear_cross_entropy_with_lse(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: int = 0,
    filter_eps: float | str | None = None,
    backend: str = "auto",
    process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`linear_cross_entropy`, and also returns the per-token log-sum-exp of the final logits.

    Returns ``(loss, lse)``: ``loss`` as for :func:`linear_cross_entropy`; ``lse`` has the shape of ``targets``
    (float32, float64 for float64 inputs) and is defined for every position, ignored ones included
    (with ``shift``, position ``t`` is the LSE of row ``t`` of ``hidden``). ``lse`` is differentiable:
    ``d lse_n / d logits_n = softmax(logits_n)``. When ``lse`` receives a gradient, gradient filtering is off.
    Torch equivalent: ``torch.logsumexp(logits, -1)`` beside the loss.
    """
    return _linear_cross_entropy(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, shift=shift, filter_eps=filter_eps,
        backend=backend, process_group=process_group, lse_wanted=True,
    )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    shift: int = 0,
    filter_eps: float | str | None = None,
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` without materialising the logits.

    Shapes: ``hidden`` (..., D), ``weight`` (V, D), ``bias`` (V,) or None, ``targets`` (...) integer, same leading
    shape as ``hidden``. Returns a scalar for ``reduction="mean"``/``"sum"`` and a tensor shaped like ``targets``
    for ``"none"`` (0 at ignored positions). The loss is float32 for float16/bfloat16/float32 inputs (float64 for
    float64); the logits are accumulated in float32 and never stored. ``hidden``, ``weight`` and ``bias`` must share
    one dtype; under ``torch.autocast`` they are cast to the autocast dtype first, as ``F.linear`` would.

    Torch equivalent (with ``softcap=None``, ``z_loss=0``, ``shift=0``)::

        logits = (hidden @ weight.T + bias).float()
        F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                        reduction=reduction, label_smoothing=label_smoothing)

    except that ``"mean"`` over zero non-ignored targets is 0.0 (torch gives NaN) and ``"none"`` keeps the shape
    of ``targets``.

    Options:
        ignore_index: targets equal to it contribute no loss and no gradient.
        reduction: ``"mean"`` over non-ignored targets, ``"sum"``, or ``"none"``.
        label_smoothing: in [0, 1], torch's semantics: ``(1 - eps) * CE + eps * mean_v(-log_softmax)``.
        z_loss: adds ``z_loss * lse**2`` per non-ignored token (PaLM), ``lse = logsumexp(logits)``.
        softcap: logits become ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2/3).
        shift: row ``t`` of ``hidden`` predicts ``targets[..., t + shift]`` (``shift=1`` is the causal-LM shift,
            done without copying ``hidden``); the last ``shift`` positions are ignored and, for ``"none"``,
            are 0.
        filter_eps: None (exact). A float or ``"auto"`` (``finfo(dtype).eps / 32``) lets the Triton backward
            skip each (BLOCK_N x BLOCK_V) tile in which every ``|d loss_n / d logit_nv|`` is below it
            (CCE's gradient filtering; the vocabulary is visited most-frequent-target first so that targets share
            few tiles). The loss is still exact; the gradients change by at most
            ``|dH_n| <= |g_n| * filter_eps * sum_{v skipped} |W_v|`` and
            ``|dW_v| <= filter_eps * sum_{n skipped} |g_n| * |h_n|`` (``g_n`` the upstream gradient of token n,
            times ``1 - (s/softcap)**2 <= 1`` with a soft cap). The torch backend ignores it (exact gradients).
        backend: ``"triton"`` (fused kernels, CUDA tensors), ``"torch"`` (chunked pure PyTorch: O(chunk x V)
            extra memory, any device) or ``"auto"`` (triton for CUDA tensors, torch otherwise).
        process_group: vocabulary parallelism: ``weight``/``bias`` are this rank's contiguous block of rows, ordered
            by rank (sizes may differ), ``hidden`` and the global ``targets`` are the same on every rank; the loss
            is the whole vocabulary's, ``hidden.grad`` the full gradient. A ``DTensor`` weight sharded ``Shard(0)``
            on a 1-D mesh needs no group. See :mod:`largevocab.parallel` (gradient filtering is off there).

    Backward is deterministic (bit-identical across runs) under ``torch.use_deterministic_algorithms(True)``;
    otherwise the Triton backend accumulates dH/dW with atomics.
    """
    loss, _ = _linear_cross_entropy(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, shift=shift, filter_eps=filter_eps,
        backend=backend, process_group=process_group, lse_wanted=False,
    )
    return loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`linear_cross_entropy`: ``LinearCrossEntropyLoss(**options)(hidden, weight, targets)``.

    Holds no parameters: the output layer's ``weight`` (V, D) and optional ``bias`` (V,) are passed at call time,
    so a tied or factorised embedding can feed it. Torch equivalent:
    ``nn.CrossEntropyLoss(...)(F.linear(hidden, weight, bias).flatten(0, -2), targets.flatten())``.
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        shift: int = 0,
        filter_eps: float | str | None = None,
        backend: str = "auto",
        process_group=None,
    ) -> None:
        super().__init__()
        check_options(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, shift=shift, backend=backend,
        )
        if filter_eps is not None:
            resolve_filter_eps(filter_eps, torch.float32)
        self.options = dict(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, shift=shift, filter_eps=filter_eps, backend=backend, process_group=process_group,
        )

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, targets, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "process_group")
