"""Public API of the exact fused linear + cross-entropy."""

from __future__ import annotations

import torch

from ._common import CEOptions, check_options, prepare_inputs, resolve_filter_eps
from .ops.torch_ce import torch_linear_cross_entropy


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
    """Under torch.autocast, cast like the F.linear this replaces would (to the autocast dtype)."""
    device_type = hidden.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return hidden, weight, bias


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`linear_cross_entropy`, and also returns the per-token log-sum-exp of the final logits.

    Returns ``(loss, lse)``: ``loss`` as for :func:`linear_cross_entropy`; ``lse`` has the shape of ``targets``
    (float32, float64 for float64 inputs) and is defined for every position, ignored ones included
    (with ``shift``, position ``t`` is the LSE of row ``t`` of ``hidden``). ``lse`` is differentiable:
    ``d lse_n / d logits_n = softmax(logits_n)``. When ``lse`` receives a gradient, gradient filtering is off.
    """
    check_options(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, shift=shift, backend=backend,
    )
    inputs = prepare_inputs(hidden, weight, targets, bias, ignore_index=ignore_index, shift=shift)
    h, w, b = _autocast(inputs.hidden, inputs.weight, inputs.bias)
    opts = CEOptions(
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        softcap=float(softcap) if softcap is not None else None,
        filter_eps=resolve_filter_eps(filter_eps, h.dtype),
    )
    acc_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    if h.shape[0] == 0:
        # Keep the graph connected so backward yields zero gradients of the right shapes.
        loss = (h.sum() * 0.0 + w.sum() * 0.0).to(acc_dtype)
        if b is not None:
            loss = loss + b.sum() * 0.0
        lse = h.new_zeros(inputs.target_shape, dtype=acc_dtype)
        return (loss if reduction != "none" else h.new_zeros(inputs.target_shape, dtype=acc_dtype)), lse
    resolved = _resolve_backend(backend, h.device)
    with torch.autocast(h.device.type, enabled=False):
        if resolved == "triton":
            from .ops.triton_ce import triton_linear_cross_entropy

            loss, lse = triton_linear_cross_entropy(h, w, b, inputs.targets, inputs.valid, opts)
        else:
            loss, lse = torch_linear_cross_entropy(h, w, b, inputs.targets, inputs.valid, opts)
    lse = lse.reshape(inputs.target_shape)
    if reduction == "none":
        return loss.reshape(inputs.target_shape), lse
    total = loss.sum()
    if reduction == "sum":
        return total, lse
    # Mean over non-ignored tokens; 0 (with zero gradients) when all are ignored, instead of torch's NaN.
    return total / inputs.valid.sum().clamp(min=1).to(total.dtype), lse


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

    Backward is deterministic (bit-identical across runs) under ``torch.use_deterministic_algorithms(True)``;
    otherwise the Triton backend accumulates dH/dW with atomics.
    """
    loss, _ = linear_cross_entropy_with_lse(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, shift=shift, filter_eps=filter_eps,
        backend=backend,
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
            softcap=softcap, shift=shift, filter_eps=filter_eps, backend=backend,
        )

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return linear_cross_entropy(hidden, weight, targets, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
