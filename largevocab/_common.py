"""Options, constants and input preparation shared by every backend of the exact fused cross-entropy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")

# filter_eps="auto": a tile is skipped when every |d loss / d logit| in it is below eps(dtype) / 32.
# Such an entry changes a gradient element by less than 1/32 of the rounding step of the output dtype
# per unit of |W_v| (resp. |h_n|), the same threshold CCE's authors found loss-neutral in training.
AUTO_FILTER_DIVISOR = 32.0


@dataclass(frozen=True)
class CEOptions:
    """The loss definition a backend computes per token (see ``linear_cross_entropy``)."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    filter_eps: float | None = None


@dataclass
class PreparedInputs:
    """Flattened, validated inputs: ``hidden`` (N, D), ``weight`` (V, D), ``bias`` (V,) or None, ``targets`` (N,)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    valid: torch.Tensor
    target_shape: torch.Size


def combine_loss(
    lse: torch.Tensor,
    target_logit: torch.Tensor,
    logit_sum: torch.Tensor | None,
    valid: torch.Tensor,
    opts: CEOptions,
    vocab: int,
) -> torch.Tensor:
    """Per-token loss from per-token reductions of the final logits ``s`` (rows, V).

    ``lse - (1 - eps) * s[y] - eps / V * sum_v s[v] + z_loss * lse**2``; 0 where ``valid`` is False.
    This is torch's label-smoothed cross-entropy plus PaLM's z-loss.
    """
    loss = lse - (1.0 - opts.label_smoothing) * target_logit
    if opts.label_smoothing:
        loss = loss - (opts.label_smoothing / vocab) * logit_sum
    if opts.z_loss:
        loss = loss + opts.z_loss * lse.square()
    return torch.where(valid, loss, torch.zeros_like(loss))


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def resolve_filter_eps(filter_eps: float | str | None, dtype: torch.dtype) -> float | None:
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"filter_eps must be None, a float > 0 or 'auto', got {filter_eps!r}")
        return torch.finfo(dtype).eps / AUTO_FILTER_DIVISOR
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)):
        raise TypeError(f"filter_eps must be None, a float or 'auto', got {type(filter_eps).__name__}")
    if not (filter_eps > 0.0 and math.isfinite(filter_eps)):
        raise ValueError(f"filter_eps must be a finite float > 0, got {filter_eps}")
    return float(filter_eps)


def check_options(
    *,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    shift: int,
    backend: str,
) -> None:
    """Validate the scalar options; raises ``ValueError``/``TypeError`` naming the bad value."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(shift, bool) or not isinstance(shift, int):
        raise TypeError(f"shift must be an int, got {type(shift).__name__}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not isinstance(z_loss, (int, float)) or not (z_loss >= 0.0 and math.isfinite(z_loss)):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and (
        not isinstance(softcap, (int, float)) or not (softcap > 0.0 and math.isfinite(softcap))
    ):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")


def prepare_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    ignore_index: int,
    shift: int,
) -> PreparedInputs:
    """Check shapes/dtypes/ranges and flatten to 2-D without copying ``hidden`` when it is contiguous.

    ``shift`` is applied to the targets only: row ``t`` of ``hidden`` is scored against ``targets[..., t + shift]``
    and the last ``shift`` positions of every sequence are ignored, so the (large) hidden states are never copied.
    """
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, D), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (..., D), got a scalar")
    vocab, dim = weight.shape
    if vocab == 0:
        raise ValueError("weight has V = 0 rows: the vocabulary must not be empty")
    if hidden.shape[-1] != dim:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal weight's D ({dim}); "
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError(
            f"hidden ({hidden.device}), weight ({weight.device}) and targets ({targets.device}) "
            "must be on the same device"
        )
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must have shape (V,) = ({vocab},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias ({bias.dtype}) and weight ({weight.dtype}) must have the same dtype")
        if bias.device != weight.device:
            raise ValueError(f"bias ({bias.device}) and weight ({weight.device}) must be on the same device")

    target_shape = targets.shape
    if shift:
        if targets.dim() == 0:
            raise ValueError("shift > 0 needs targets with a sequence dimension, got a scalar")
        seq_len = targets.shape[-1]
        if shift >= seq_len:
            raise ValueError(f"shift must be < the sequence length {seq_len}, got {shift}")
        pad = torch.full((*targets.shape[:-1], shift), ignore_index, dtype=targets.dtype, device=targets.device)
        targets = torch.cat([targets[..., shift:], pad], dim=-1)

    targets = targets.reshape(-1).long()
    valid = targets != ignore_index
    if targets.numel():
        bad = valid & ((targets < 0) | (targets >= vocab))
        # One host sync: an out-of-range target would otherwise read out of bounds inside the kernels.
        if bool(bad.any()):
            first = targets[bad][0].item()
            raise ValueError(
                f"targets must be in [0, V={vocab}) or equal ignore_index={ignore_index}; found {first}"
            )

    hidden = hidden.reshape(-1, dim)
    return PreparedInputs(hidden, weight, bias, targets, valid, target_shape)
