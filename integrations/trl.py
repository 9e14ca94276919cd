"""One call makes TRL's trainers compute their per-token log-probs, entropies and distillation losses with largevocab.

    from largevocab.integrations.trl import patch
    handle = patch()                   # before or after the trainers are built
    GRPOTrainer(...).train()           # policy and reference log-probs/entropies: lv.linear_log_probs
    handle.undo()                      # TRL's own functions again

How it works (TRL 1.16): every trainer that scores tokens (GRPO, RLOO, DPO, KTO, SFT) wraps its models with
``trl.trainer.utils.add_fused_lm_head``, whose forward hands the backbone's hidden states and the LM head to
``trl.trainer.utils._ChunkedLogProbFunction.apply``; ``DistillationTrainer`` hands both models' hidden states and
heads to ``trl.trainer.distillation_trainer.ChunkedDivergenceFunction.apply``. ``patch`` replaces those two names
with stand-ins of the same signature and outputs built on :func:`largevocab.linear_log_probs`,
:func:`largevocab.linear_argmax` and :func:`largevocab.linear_distillation_loss`; TRL's masking, reductions,
losses and metrics run unchanged. What the stand-ins cannot compute exactly they hand back to TRL's function, with a
warning naming the reason once per reason: a non-positive ``logit_scale``, a mean logit under a soft cap, a
distillation model with a logit scale or soft cap, DeepSpeed ZeRO-3 partitioned heads (TRL's backward re-gathers
them; largevocab's does not).

``GKDTrainer`` (``trl.experimental.gkd``) is not patched: its ``compute_loss`` calls both models' full forward and
takes ``outputs.logits``, so there is no seam between the hidden states and the loss. :func:`gkd_loss` is the
recipe: the same loss from the backbones' hidden states, for a ``compute_loss`` override (see the README).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

import largevocab as lv
from largevocab._common import BACKENDS
from largevocab.distillation import distillation_loss_and_entropy

# The per-token outputs TRL's fused head can be asked for, in the order its function returns them.
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _warn_once(seen: set, reason: str) -> None:
    if reason not in seen:
        seen.add(reason)
        warnings.warn(f"largevocab.integrations.trl: {reason}; using TRL's own function for these calls",
                      stacklevel=3)


def _zero3(*params) -> bool:
    return any(p is not None and hasattr(p, "ds_id") for p in params)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """What TRL's functions multiply in: the autocast dtype, else the hidden states' dtype."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def _like_hidden(hidden, weight, bias):
    """Without autocast TRL casts the head to the hidden states' dtype (e.g. ``cast_lm_head_to_fp32``); so do we,
    differentiably. Under autocast largevocab casts everything itself."""
    if torch.is_autocast_enabled(hidden.device.type) or weight.dtype == hidden.dtype:
        return weight, bias
    return weight.to(hidden.dtype), bias.to(hidden.dtype) if bias is not None else None


@dataclass
class _LogProbHead:
    """Stands in for TRL's ``ChunkedLogProbFunction``: ``apply`` takes its arguments and returns its 5-tuple
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` (None for outputs not asked for)."""

    original: object
    backend: str = "auto"
    warned: set = field(default_factory=set)

    def _unsupported(self, weight, bias, softcap, logit_scale, outputs) -> str | None:
        if not (isinstance(logit_scale, (int, float)) and logit_scale > 0 and math.isfinite(logit_scale)):
            return f"logit_scale={logit_scale!r} cannot be folded into the temperature"
        if softcap is not None and "mean_logits" in outputs:
            return "the mean soft-capped logit has no fused form (DPO/KTO's logits/* metrics)"
        if _zero3(weight, bias):
            return "the LM head is partitioned by DeepSpeed ZeRO-3"
        return None

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OPTIONAL_OUTPUTS):
        reason = self._unsupported(weight, bias, final_logit_softcapping, logit_scale, outputs)
        if reason is not None:
            _warn_once(self.warned, reason)
            return self.original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                       final_logit_softcapping, logit_scale, outputs)
        # TRL's logits are softcap(scale * z) / T = softcap'(z) / T' with softcap' = softcap / scale, T' = T / scale.
        scale = float(logit_scale)
        temp = temperature / scale
        cap = final_logit_softcapping / scale if final_logit_softcapping is not None else None
        weight, bias = _like_hidden(hidden, weight, bias)
        opts = dict(bias=bias, softcap=cap, backend=self.backend)
        want_entropy = "entropy" in outputs
        result = lv.linear_log_probs(hidden, weight, targets, temperature=temp, return_entropy=want_entropy, **opts)
        logp, entropy = result if want_entropy else (result, None)
        log_sum_sq = mean_logits = is_top1 = None
        with torch.no_grad():
            if "log_sum_sq_probs" in outputs:
                # log sum_v p_v^2 = LSE(2s) - 2 LSE(s) = 2 log p_y(T) - log p_y(T / 2) for any token y.
                half = lv.linear_log_probs(hidden.detach(), weight.detach(), targets, temperature=temp / 2.0,
                                           **{**opts, "bias": bias.detach() if bias is not None else None})
                log_sum_sq = 2.0 * logp.detach() - half
            if "mean_logits" in outputs:  # no soft cap here: the mean of z is h . mean(W) + mean(b)
                mean_w = torch.mean(weight.detach(), dim=0, dtype=torch.float32)
                mean_logits = hidden.detach().to(_compute_dtype(hidden)).float() @ mean_w
                if bias is not None:
                    mean_logits += torch.mean(bias.detach(), dtype=torch.float32)
                mean_logits *= scale / temperature
            if "is_top1" in outputs:
                ids = lv.linear_argmax(hidden, weight, bias=bias, softcap=cap, backend=self.backend)
                is_top1 = ids == targets
        return logp, entropy, log_sum_sq, mean_logits, is_top1


@dataclass
class _DivergenceHead:
    """Stands in for TRL's ``ChunkedDivergenceFunction``: ``apply`` takes its arguments and returns its
    ``(per-token divergence, per-token student entropy)``. TRL's ``beta``: 0 forward KL(teacher || student),
    1 reverse KL, else the generalised JSD with mixture ``beta p_teacher + (1 - beta) p_student``."""

    original: object
    backend: str = "auto"
    warned: set = field(default_factory=set)

    def apply(self, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, beta,
              temperature=1.0, student_logit_scale=1.0, student_final_logit_softcapping=None, teacher_logit_scale=1.0,
              teacher_final_logit_softcapping=None):
        args = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, beta,
                temperature, student_logit_scale, student_final_logit_softcapping, teacher_logit_scale,
                teacher_final_logit_softcapping)
        reason = None
        if student_logit_scale != 1.0 or teacher_logit_scale != 1.0:
            reason = "linear_distillation_loss has no per-model logit scale"
        elif student_final_logit_softcapping is not None or teacher_final_logit_softcapping is not None:
            reason = "linear_distillation_loss has no per-model soft cap"
        elif _zero3(student_weight, student_bias, teacher_weight, teacher_bias):
            reason = "an LM head is partitioned by DeepSpeed ZeRO-3"
        if reason is not None:
            _warn_once(self.warned, reason)
            return self.original.apply(*args)
        kind = "forward_kl" if beta == 0.0 else "reverse_kl" if beta == 1.0 else "jsd"
        student_weight, student_bias = _like_hidden(student_hidden, student_weight, student_bias)
        # The teacher (no gradient) is multiplied in the student's dtype, as largevocab needs one dtype.
        dtype = student_hidden.dtype
        teacher_hidden = teacher_hidden.to(dtype)
        teacher_weight = teacher_weight.to(dtype)
        teacher_bias = teacher_bias.to(dtype) if teacher_bias is not None else None
        return distillation_loss_and_entropy(
            student_hidden, student_weight, teacher_hidden, teacher_weight, None, kind=kind,
            beta=beta if kind == "jsd" else 0.5, temperature=temperature, student_bias=student_bias,
            teacher_bias=teacher_bias, reduction="none", backend=self.backend, entropy=True,
        )


@dataclass
class TRLPatch:
    """What :func:`patch` replaced; :meth:`undo` puts TRL's functions back."""

    log_probs: _LogProbHead
    divergence: _DivergenceHead

    def undo(self) -> None:
        from trl.trainer import distillation_trainer, utils

        if utils._ChunkedLogProbFunction is self.log_probs:
            utils._ChunkedLogProbFunction = self.log_probs.original
        if distillation_trainer.ChunkedDivergenceFunction is self.divergence:
            distillation_trainer.ChunkedDivergenceFunction = self.divergence.original


def patch(*, backend: str = "auto") -> TRLPatch:
    """Route TRL's fused LM head (GRPO, RLOO, DPO, KTO, SFT: per-token log-probs, entropy, token accuracy) and
    DistillationTrainer's divergence through largevocab. Idempotent: a second call returns the active patch."""
    from trl.trainer import distillation_trainer, utils

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    current = utils._ChunkedLogProbFunction
    if isinstance(current, _LogProbHead) and isinstance(distillation_trainer.ChunkedDivergenceFunction,
                                                        _DivergenceHead):
        return TRLPatch(current, distillation_trainer.ChunkedDivergenceFunction)
    handle = TRLPatch(_LogProbHead(current, backend), _DivergenceHead(distillation_trainer.ChunkedDivergenceFunction,
                                                                      backend))
    utils._ChunkedLogProbFunction = handle.log_probs
    distillation_trainer.ChunkedDivergenceFunction = handle.divergence
    return handle


def gkd_loss(trainer, model, inputs, num_items_in_batch=None) -> torch.Tensor:
    """``GKDTrainer.compute_loss``'s loss without either model's logits: both backbones' last hidden states and
    :func:`largevocab.linear_distillation_loss` (``trainer.beta``: 0 forward KL, 1 reverse KL, else the JSD; GKD
    applies no temperature to this loss). Positions whose shifted label is -100 do not count; the sum is divided
    by ``num_items_in_batch`` when given, else by the counted positions (GKD's ``batchmean``).

    For one process: the student's backbone is called directly, not through a DDP/FSDP wrapper (use TRL's
    DistillationTrainer, patched by :func:`patch`, for distributed runs). Models with a logit scale or soft cap
    are refused (GKD's loss takes their transformed logits; this function has no transform).
    """
    student = trainer.accelerator.unwrap_model(model)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    for m in (student, teacher):
        config = m.config.get_text_config()
        if any(getattr(config, k, None) not in (None, 1.0) for k in ("final_logit_softcapping", "logit_scale",
                                                                       "logits_scaling", "output_multiplier")):
            raise ValueError(f"gkd_loss: {type(m).__name__} transforms its logits (scale or soft cap)")
    batch = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    hidden_s = student.base_model(**batch).last_hidden_state[:, :-1]
    trainer.teacher_model.eval()
    with torch.no_grad():
        hidden_t = teacher.base_model(**batch).last_hidden_state[:, :-1]
    labels = inputs["labels"][:, 1:]
    beta = trainer.beta
    kind = "forward_kl" if beta == 0 else "reverse_kl" if beta == 1 else "jsd"
    head_s, head_t = student.get_output_embeddings(), teacher.get_output_embeddings()
    total = lv.linear_distillation_loss(
        hidden_s, head_s.weight, hidden_t.to(hidden_s.dtype), head_t.weight.to(hidden_s.dtype), labels, kind=kind,
        beta=beta if kind == "jsd" else 0.5, student_bias=head_s.bias,
        teacher_bias=head_t.bias.to(hidden_s.dtype) if head_t.bias is not None else None, reduction="sum")
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device)
    return total / (labels != -100).sum().clamp(min=1)
