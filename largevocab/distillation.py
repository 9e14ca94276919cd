"""Public API of the fused distillation losses: a divergence between a student's and a teacher's softmax over the
whole vocabulary, from both models' hidden states and output layers, without either N x V logits tensor."""

from __future__ import annotations

import torch

from ._common import check_number, check_options, prepare_inputs
from .cross_entropy import _resolve_backend
from .log_probs import check_temperature
from .ops import _posttrain_library  # noqa: F401  (registers torch.ops.largevocab.linear_distillation_loss)
from .ops.torch_distill import KINDS


def _check_beta(beta) -> float:
    beta = check_number("beta", beta, low_inclusive=False, high=1.0)
    if beta >= 1.0:
        raise ValueError(f"beta must be a float in (0, 1), got {beta!r}")
    return beta


def _prepare(name: str, hidden, weight, targets, bias, ignore_index):
    """prepare_inputs for one model, its errors prefixed with the model's name."""
    try:
        return prepare_inputs(hidden, weight, targets, bias, ignore_index=ignore_index, shift=0)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None


def distillation_loss_and_entropy(
    student_hidden, student_weight, teacher_hidden, teacher_weight, targets=None, *, kind="forward_kl", beta=0.5,
    temperature=1.0, student_bias=None, teacher_bias=None, ignore_index=-100, reduction="mean", backend="auto",
    entropy: bool = False,
):
    """:func:`linear_distillation_loss` and, with ``entropy=True``, the student's per-token entropy of
    ``softmax(s / T)`` (shaped like the tokens, 0 at ignored positions, no gradient) from the same passes; else
    None. Trainers that log the student's entropy (TRL's DistillationTrainer) use it."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    beta = _check_beta(beta)
    temperature = check_temperature(temperature)
    check_options(ignore_index=ignore_index, reduction=reduction, label_smoothing=0.0, z_loss=0.0, softcap=None,
                  shift=0, backend=backend)
    named = {"student_hidden": student_hidden, "student_weight": student_weight, "teacher_hidden": teacher_hidden,
             "teacher_weight": teacher_weight}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if student_weight.dim() == 2 and teacher_weight.dim() == 2 and student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"teacher_weight has V = {teacher_weight.shape[0]} rows and student_weight V = {student_weight.shape[0]}:"
            " the student and the teacher must share one vocabulary"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} must have "
            "the same leading (token) shape"
        )
    mask_targets = targets
    if targets is None and student_hidden.dim() >= 1:
        mask_targets = torch.zeros(student_hidden.shape[:-1], dtype=torch.long, device=student_hidden.device)
    student = _prepare("student", student_hidden, student_weight, mask_targets, student_bias, ignore_index)
    teacher = _prepare("teacher", teacher_hidden, teacher_weight, mask_targets, teacher_bias, ignore_index)
    if student.hidden.dtype != teacher.hidden.dtype:
        raise TypeError(
            f"the student ({student.hidden.dtype}) and the teacher ({teacher.hidden.dtype}) must have the same dtype "
            "(under torch.autocast both are cast to the autocast dtype)"
        )
    if student.hidden.device != teacher.hidden.device:
        raise ValueError(f"the student ({student.hidden.device}) and the teacher ({teacher.hidden.device}) must be "
                         "on the same device")
    valid = student.valid if targets is not None else torch.ones_like(student.valid)
    h = student.hidden
    resolved = _resolve_backend(backend, h.device)
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and t is not None and t.requires_grad for t in (h, student.weight, student.bias)]
    # The torch backend applies the backward GEMMs during the forward when the upstream gradient is one scalar.
    precompute = needs if resolved == "torch" and reduction != "none" else [False] * 3
    loss, ent, *_ = torch.ops.largevocab.linear_distillation_loss(
        h, student.weight, student.bias, teacher.hidden.detach(), teacher.weight.detach(),
        teacher.bias.detach() if teacher.bias is not None else None, valid, kind, beta, temperature, reduction,
        entropy, resolved, precompute,
    )
    if reduction == "none":
        loss = loss.reshape(student.target_shape)
    return loss, (ent.reshape(student.target_shape) if entropy else None)


def linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Divergence between the student's and the teacher's next-token distributions, fused with both output layers.

    Shapes: ``student_hidden`` (..., D_S), ``student_weight`` (V, D_S), ``teacher_hidden`` (..., D_T) with the
    same leading shape, ``teacher_weight`` (V, D_T) (D_T may differ from D_S; V may not), biases (V,) or None,
    ``targets`` (...) integer or None: only compared with ``ignore_index`` to choose the positions that count
    (all of them when None). With ``p_S = softmax(s_S / T)`` and ``p_T = softmax(s_T / T)`` over the vocabulary:

    * ``"forward_kl"``: KL(p_T || p_S);  ``"reverse_kl"``: KL(p_S || p_T);
    * ``"jsd"``: beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S, 0 < beta < 1
      (TRL GKD's generalised JSD).

    Returns the ``"mean"`` over counted positions (0.0 with zero gradients when none count), the ``"sum"``, or
    per token (``"none"``: shaped like the tokens, 0 at ignored positions); float32 (float64 for float64 inputs).
    Gradients flow to the student only (the teacher is treated as detached). Neither N x V logits tensor is stored;
    passes over both heads: 1 forward + 1 backward for the KLs, 2 + 1 for the JSD (Triton), one fused pass per
    chunk of rows with ``"mean"``/``"sum"`` (torch backend).

    Torch equivalent (TRL's ``generalized_jsd_loss`` for ``"jsd"``)::

        log_s = ((student_hidden @ student_weight.T + student_bias).float() / T).log_softmax(-1)
        log_t = ((teacher_hidden @ teacher_weight.T + teacher_bias).float() / T).log_softmax(-1).detach()
        forward_kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
        reverse_kl = F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1)

    except that a token of probability 0 under the weighting distribution (a -inf logit) adds 0, not NaN.
    ``backend`` as in :func:`largevocab.linear_cross_entropy`; all four tensors share one dtype (under
    ``torch.autocast`` they are cast to the autocast dtype first, as ``F.linear`` would).
    """
    loss, _ = distillation_loss_and_entropy(
        student_hidden, student_weight, teacher_hidden, teacher_weight, targets, kind=kind, beta=beta,
        temperature=temperature, student_bias=student_bias, teacher_bias=teacher_bias, ignore_index=ignore_index,
        reduction=reduction, backend=backend,
    )
    return loss
