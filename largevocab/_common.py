"""Options, constants and input preparation shared by every loss and backend.

Validation is split by what it needs:

* options and tensor metadata (types, shapes, dtypes, devices, layouts) are checked on the host in Python, which
  costs nothing and traces under ``torch.compile`` (Dynamo turns the checks into guards);
* values inside tensors (targets in ``[0, V)``, explicit negatives, item counts) are checked by
  :func:`check_targets` / :func:`check_indices`, inside the custom ops of :mod:`largevocab.ops._library`, so that
  they never cost a graph break. What they do on a bad value is described in :func:`check_targets`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# filter_eps="auto": a tile is skipped when every |d loss / d logit| in it is below eps(dtype) / 32.
# Such an entry changes a gradient element by less than 1/32 of the rounding step of the output dtype
# per unit of |W_v| (resp. |h_n|), the same threshold CCE's authors found loss-neutral in training.
AUTO_FILTER_DIVISOR = 32.0
# Soft caps are applied in float32 for float16/bfloat16/float32 inputs: a larger cap would overflow there.
FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class CEOptions:
    """The loss definition a backend computes per token (see ``linear_cross_entropy``)."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    filter_eps: float | None = None
    # The V of label smoothing's eps / V: the whole vocabulary's size when a backend sees one shard of it.
    smoothing_vocab: int | None = None


@dataclass
class PreparedInputs:
    """Flattened, validated inputs: ``hidden`` (N, D), ``weight`` (V, D), ``bias`` (V,) or None, ``targets`` (N,)
    int64 and ``valid`` (N,) bool (``targets != ignore_index``). ``target_shape`` is the caller's target shape.

    Target *values* are not checked here (that needs the tensor's contents): the losses check them inside their
    custom ops with :func:`check_targets`.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    valid: torch.Tensor
    target_shape: torch.Size


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype logits are accumulated in (and losses returned in): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def meta_loss(hidden: torch.Tensor, weight: torch.Tensor, reduction: str, target_shape) -> torch.Tensor:
    """The loss's shape and dtype on the meta device, for losses whose intermediate sizes depend on tensor values
    (SCE's buckets, in-batch negatives), which meta tensors do not have; differentiable w.r.t. both inputs."""
    anchor = (hidden.sum() + weight.sum()).to(acc_dtype(hidden.dtype)) * 0.0
    return anchor if reduction != "none" else anchor.expand(target_shape)


def combine_loss(
    lse: torch.Tensor,
    target_logit: torch.Tensor,
    logit_sum: torch.Tensor | None,
    valid: torch.Tensor,
    opts: CEOptions,
    vocab: int,
) -> torch.Tensor:
    """Per-token loss from per-token reductions of the final logits ``s`` (rows, V).

    ``lse - (1 - eps) * s[y] - eps / V * sum_v s[v] + z_loss * lse**2``; 0 where ``valid`` is False. This is
    torch's label-smoothed cross-entropy plus PaLM's z-loss, including its non-finite cases: a row holding a +inf
    logit has lse = +inf, where ``F.cross_entropy`` (a log-softmax) gives NaN, so such rows are NaN here too.
    """
    loss = lse - (1.0 - opts.label_smoothing) * target_logit
    if opts.label_smoothing:
        loss = loss - (opts.label_smoothing / (opts.smoothing_vocab or vocab)) * logit_sum
    if opts.z_loss:
        loss = loss + opts.z_loss * lse.square()
    loss = torch.where(lse == math.inf, torch.full_like(loss, math.nan), loss)
    return torch.where(valid, loss, torch.zeros_like(loss))


def check_float(name: str, t) -> None:
    """``t`` must be a dense (strided) floating-point tensor of a supported dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; call .to_dense() first")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_int_tensor(name: str, t) -> None:
    """``t`` must be a dense integer tensor (not bool, not floating point)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def check_number(name: str, value, *, low: float = 0.0, high: float | None = None, low_inclusive: bool = True,
                 allow_none: bool = False) -> float | None:
    """A real number (not a bool) in the given range, as a float; raises naming the value otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "None or a float" if allow_none else "a float"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    value = float(value)
    above = value >= low if low_inclusive else value > low
    if not (above and math.isfinite(value) and (high is None or value <= high)):
        bounds = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be a finite float {bounds}, got {value!r}")
    return value


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def resolve_filter_eps(filter_eps: float | str | None, dtype: torch.dtype) -> float | None:
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str):
        if filter_eps != "auto":
            raise ValueError(f"filter_eps must be None, a float > 0 or 'auto', got {filter_eps!r}")
        return torch.finfo(dtype).eps / AUTO_FILTER_DIVISOR
    return check_number("filter_eps", filter_eps, low_inclusive=False)


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
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if isinstance(shift, bool) or not isinstance(shift, int):
        raise TypeError(f"shift must be an int, got {type(shift).__name__}")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    check_number("label_smoothing", label_smoothing, high=1.0)
    check_number("z_loss", z_loss)
    # The cap is applied in the accumulation dtype; a cap beyond float32's range would turn into inf there.
    check_number("softcap", softcap, low=0.0, low_inclusive=False, high=FLOAT32_MAX, allow_none=True)


def autocast_inputs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Under ``torch.autocast``, cast as the ``F.linear`` this replaces would: every floating-point operand except
    float64 goes to the autocast dtype (so bf16 activations with fp32 master weights become one bf16 product)."""
    device_type = hidden.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t):
            return t.to(dtype) if t is not None and t.dtype != torch.float64 else t

        hidden, weight, bias = cast(hidden), cast(weight), cast(bias)
    return hidden, weight, bias


def shift_targets(targets: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
    """``targets[..., t + shift]`` at position t, ``ignore_index`` at the last ``shift`` positions; int64."""
    targets = targets.long()  # pad in int64: a narrower dtype could not hold every ignore_index
    if not shift:
        return targets
    if targets.dim() == 0:
        raise ValueError("shift > 0 needs targets with a sequence dimension, got a scalar")
    seq_len = targets.shape[-1]
    if shift >= seq_len:
        raise ValueError(f"shift must be < the sequence length {seq_len}, got {shift}")
    pad = torch.full((*targets.shape[:-1], shift), ignore_index, dtype=torch.long, device=targets.device)
    return torch.cat([targets[..., shift:], pad], dim=-1)


def prepare_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    ignore_index: int,
    shift: int,
    allow_empty_vocab: bool = False,
) -> PreparedInputs:
    """Check types, shapes, dtypes and devices, cast under autocast, and flatten to 2-D without copying ``hidden``
    when its rows are contiguous.

    ``shift`` is applied to the targets only: row ``t`` of ``hidden`` is scored against ``targets[..., t + shift]``
    and the last ``shift`` positions of every sequence are ignored, so the (large) hidden states are never copied.
    ``allow_empty_vocab``: ``weight`` is one rank's block of a sharded vocabulary, which may hold no rows.
    Autocast is applied before the dtype check, as ``F.linear`` would cast first and then multiply.
    """
    check_float("hidden", hidden)
    check_float("weight", weight)
    check_int_tensor("targets", targets)
    if bias is not None:
        check_float("bias", bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, D), got shape {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (..., D), got a scalar")
    vocab, dim = weight.shape
    if vocab == 0 and not allow_empty_vocab:  # a vocabulary-parallel shard may be empty, a whole vocabulary not
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
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape (V,) = ({vocab},), got {tuple(bias.shape)}")
    devices = {"hidden": hidden.device, "weight": weight.device, "targets": targets.device}
    if bias is not None:
        devices["bias"] = bias.device
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} ({v})" for k, v in devices.items())
        raise ValueError(f"{listed} must be on the same device")
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias ({bias.dtype}) and weight ({weight.dtype}) must have the same dtype")

    target_shape = targets.shape
    targets = shift_targets(targets, shift, ignore_index).reshape(-1)
    valid = targets != ignore_index
    hidden = hidden.reshape(targets.shape[0], dim)  # not (-1, D): D may be 0
    return PreparedInputs(hidden, weight, bias, targets, valid, target_shape)
