"""Public API of the fused per-token log-probabilities (with entropy) and of the fused argmax.

Post-training (GRPO/PPO, DPO/KTO, SFT metrics) needs per token the log-probability of the chosen token, often the
entropy at a sampling temperature, and the greedy prediction: all exact, from the output layer's hidden states and
weight, without the N x V logits.
"""

from __future__ import annotations

import torch

from ._common import check_bool, check_number, check_options, prepare_inputs
from .cross_entropy import _resolve_backend
from .ops import _posttrain_library  # noqa: F401  (registers torch.ops.largevocab.linear_log_probs / _argmax)
from .ops._library import is_strict


def check_temperature(temperature) -> float:
    """``temperature`` as a float; raises ``TypeError``/``ValueError`` naming the value unless it is finite and > 0."""
    return check_number("temperature", temperature, low_inclusive=False)


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    shift: int = 0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probability of ``targets`` (and the entropy) under ``softmax(hidden @ weight.T + bias)``.

    Shapes: ``hidden`` (..., D), ``weight`` (V, D), ``bias`` (V,) or None, ``targets`` (...) integer with
    hidden's leading shape. Returns ``logp``, or ``(logp, entropy)`` with ``return_entropy=True``: shaped like
    ``targets``, float32 (float64 for float64 inputs), 0.0 at ignored positions. Both are differentiable w.r.t.
    ``hidden``, ``weight`` and ``bias`` for any upstream gradient (per-token advantages, masks, sequence sums).
    The logits are accumulated in float32 and never stored (O(N) saved for backward: the LSE and the entropy).

    Torch equivalent::

        s = (hidden @ weight.T + bias).float()
        s = softcap * torch.tanh(s / softcap)          # if softcap is given
        s = s / temperature
        logp = s.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        entropy = -(s.softmax(-1) * s.log_softmax(-1)).sum(-1)

    then both set to 0 where ``targets == ignore_index``.

    Options:
        temperature: > 0; the logits are divided by it after the soft cap (the sampling temperature of GRPO).
        softcap: logits become ``softcap * tanh(logits / softcap)`` (Gemma 2/3).
        shift: row ``t`` of ``hidden`` is scored against ``targets[..., t + shift]`` (``shift=1``: the causal-LM
            shift, without copying ``hidden``); the last ``shift`` positions are ignored (0).
        ignore_index: positions whose target equals it are 0 in both outputs and get no gradient.
        backend: ``"triton"`` (fused kernels, CUDA tensors), ``"torch"`` (chunked PyTorch, any device) or
            ``"auto"``. Under ``torch.use_deterministic_algorithms(True)`` the Triton backend's backward runs the
            torch backend's chunked, atomic-free backward (bit-reproducible).

    ``hidden``, ``weight`` and ``bias`` share one dtype; under ``torch.autocast`` they are cast to the autocast
    dtype first, as ``F.linear`` would.
    """
    temperature = check_temperature(temperature)
    check_bool("return_entropy", return_entropy)
    check_options(ignore_index=ignore_index, reduction="none", label_smoothing=0.0, z_loss=0.0, softcap=softcap,
                  shift=shift, backend=backend)
    inputs = prepare_inputs(hidden, weight, targets, bias, ignore_index=ignore_index, shift=shift)
    h, w, b = inputs.hidden, inputs.weight, inputs.bias
    logp, entropy, _ = torch.ops.largevocab.linear_log_probs(
        h, w, b, inputs.targets, ignore_index, float(softcap) if softcap is not None else None, temperature,
        return_entropy, _resolve_backend(backend, h.device), is_strict(),
    )
    logp = logp.reshape(inputs.target_shape)
    if return_entropy:
        return logp, entropy.reshape(inputs.target_shape)
    return logp


def linear_argmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Row argmax ids of ``hidden @ weight.T + bias`` (after the soft cap) without the logits: greedy predictions.

    Shapes: ``hidden`` (..., D), ``weight`` (V, D), ``bias`` (V,) or None; returns int64 ids of shape ``(...)``.
    Torch equivalent: ``torch.argmax(softcap(hidden @ weight.T + bias).float(), dim=-1)``: ties go to the
    smallest id and a NaN logit counts as the largest. With float16/bfloat16 inputs the torch backend ranks the
    logits rounded to that dtype (as ``F.linear`` returns them), the Triton backend their float32 accumulation: a
    row whose two largest logits lie within one 16-bit rounding may get either. Not differentiable.
    Token accuracy: ``(linear_argmax(h, W) == y)``.
    ``backend`` as in :func:`linear_log_probs`.
    """
    check_options(ignore_index=-100, reduction="none", label_smoothing=0.0, z_loss=0.0, softcap=softcap, shift=0,
                  backend=backend)
    if isinstance(hidden, torch.Tensor) and hidden.dim() >= 1:
        # The ids need no targets; these only let prepare_inputs check and flatten hidden, weight and bias.
        dummy_targets = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
    else:
        dummy_targets = torch.zeros((), dtype=torch.long)  # prepare_inputs rejects this hidden with a clear error
    inputs = prepare_inputs(hidden, weight, dummy_targets, bias, ignore_index=-100, shift=0)
    h, w, b = inputs.hidden, inputs.weight, inputs.bias
    ids = torch.ops.largevocab.linear_argmax(
        h.detach(), w.detach(), b.detach() if b is not None else None, float(softcap) if softcap is not None else None,
        _resolve_backend(backend, h.device),
    )
    return ids.reshape(inputs.target_shape)
