"""One call makes a Hugging Face causal LM train with a largevocab loss, never building the logits.

    from largevocab.integrations.hf import patch
    handle = patch(model)              # or patch(LlamaForCausalLM): models created afterwards are patched too
    loss = model(input_ids, labels=labels).loss      # fused: outputs.logits is None
    handle.undo()                      # the original forward again, exactly

How it works, for every ``*ForCausalLM`` with the canonical layout (decoder -> final hidden states -> output
embeddings -> optional logit transform -> ``loss_function``): when labels are given in training, the original
forward runs with ``labels=None`` while the output-embedding module (``lm_head``) is asked, inside its own
``__call__`` (so its hooks run: FSDP/ZeRO-3 gathers, PEFT, ...), to compute the fused loss from the hidden states
and its weight and to return an empty (B, T, 0) placeholder in place of the logits. Everything else in the
original forward runs as written: attention masks, caches, ``**kwargs``, MoE router auxiliary losses (added to the
loss with the model's ``router_aux_loss_coef``, as transformers does). The only per-family facts are the logit
transforms between the head and the loss, held in ``LOGIT_TRANSFORMS``; the forward's source is checked at patch
time so a model that transforms its logits in a way the table does not know gets an error, not a wrong loss.

Semantics kept from transformers' ``ForCausalLMLoss``: labels shifted inside (``shift_labels`` used when given),
``ignore_index`` (default -100), ``num_items_in_batch`` (sum / num_items_in_batch, so gradient accumulation matches
one big batch), ``logits_to_keep`` (the last positions' targets are used). Tested with transformers 5.23.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import largevocab as lv

IGNORE_INDEX = -100
RESERVED_OPTIONS = ("reduction", "shift", "softcap", "bias", "ignore_index")
_PATCH_MARK = "_largevocab_original_forward"


class UnsupportedModelError(ValueError):
    """The model does not follow the layout the generic patch relies on (the message says what differs)."""


@dataclass(frozen=True)
class LogitTransform:
    """A per-family transform applied to the logits between the output embeddings and the loss."""

    marker: str  # text in the forward's source that identifies it
    multiplier: Callable[[torch.nn.Module], float] | None = None  # logits *= multiplier(model)
    softcap: Callable[[torch.nn.Module], float | None] | None = None  # logits = c * tanh(logits / c)


LOGIT_TRANSFORMS = (
    # Gemma 2 / Gemma 3: final-logit soft capping.
    LogitTransform("final_logit_softcapping", softcap=lambda m: m.config.final_logit_softcapping),
    # Cohere / Cohere 2: logits multiplied by logit_scale.
    LogitTransform("logit_scale", multiplier=lambda m: m.logit_scale),
    # Granite family: logits divided by logits_scaling.
    LogitTransform("logits_scaling", multiplier=lambda m: 1.0 / m.config.logits_scaling),
)
# Statements on the logits that change nothing the loss sees.
_NEUTRAL_LOGIT_LINES = (re.compile(r"logits\s*=\s*logits\.float\(\)"), re.compile(r"torch\.tanh\(logits\)"))


def _loss_cce(hidden, weight, targets, *, bias, softcap, reduction, ignore_index, options):
    return lv.linear_cross_entropy(hidden, weight, targets, bias=bias, softcap=softcap, reduction=reduction,
                                   ignore_index=ignore_index, **options)


def _approximate(function_name: str):
    def loss(hidden, weight, targets, *, bias, softcap, reduction, ignore_index, options):
        if bias is not None or softcap is not None:
            raise UnsupportedModelError(
                f"loss={function_name!r} supports neither an lm_head bias nor logit soft-capping; use loss='cce'")
        function = getattr(lv, function_name, None)
        if function is None:
            raise ValueError(f"this largevocab has no {function_name}")
        return function(hidden, weight, targets, reduction=reduction, ignore_index=ignore_index, **options)

    return loss


LOSSES = {
    "cce": _loss_cce,
    "sce": _approximate("scalable_cross_entropy"),
    "sampled": _approximate("sampled_cross_entropy"),
}


@dataclass(frozen=True)
class _Settings:
    loss: str
    options: dict
    fused_in_eval: bool


def _head_attribute(model_cls: type) -> str:
    """Name of the output-embedding attribute the class's forward calls (``lm_head`` nearly everywhere)."""
    source = inspect.getsource(model_cls.forward)
    for name in ("lm_head", "embed_out", "output"):
        if re.search(rf"self\.{name}\(", source):
            return name
    raise UnsupportedModelError(
        f"{model_cls.__name__}.forward does not call self.lm_head(...): it does not follow the canonical causal-LM "
        "layout the patch relies on")


def _check_layout(model_cls: type) -> list[LogitTransform]:
    """The transforms the class applies between its head and its loss; raises for anything unknown."""
    if not callable(getattr(model_cls, "forward", None)):
        raise UnsupportedModelError(f"{model_cls.__name__} has no forward")
    params = inspect.signature(model_cls.forward).parameters
    missing = [p for p in ("labels", "logits_to_keep") if p not in params]
    if missing:
        raise UnsupportedModelError(
            f"{model_cls.__name__}.forward has no {', '.join(missing)} argument: not a canonical transformers causal "
            "LM (transformers >= 4.50 layout)")
    head = _head_attribute(model_cls)
    source = inspect.getsource(model_cls.forward)
    after_head = source.split(f"self.{head}(", 1)[1].splitlines()[1:]
    transforms = []
    for line in after_head:
        if "loss" in line:
            break
        code = line.split("#", 1)[0].strip()
        if not re.match(r"logits\s*(=|\*=|/=|\+=)", code) or any(p.search(code) for p in _NEUTRAL_LOGIT_LINES):
            continue
        known = [t for t in LOGIT_TRANSFORMS if t.marker in code]
        if not known:
            raise UnsupportedModelError(
                f"{model_cls.__name__} transforms its logits with `{code}`, which largevocab's patch does not know; "
                "a fused loss would silently differ, so the model is not patched")
        transforms.extend(t for t in known if t not in transforms)
    return transforms


def _targets(labels: torch.Tensor, kwargs: dict, ignore_index: int, positions: int) -> torch.Tensor:
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    # logits_to_keep=k scores only the last k positions: keep their targets.
    return shift_labels[..., -positions:] if shift_labels.shape[-1] != positions else shift_labels


def _fused_loss(model, settings: _Settings, transforms, hidden, head, labels, kwargs):
    ignore_index = kwargs.get("ignore_index", IGNORE_INDEX)
    targets = _targets(labels, kwargs, ignore_index, hidden.shape[-2]).to(hidden.device)
    softcap = None
    for transform in transforms:
        if transform.multiplier is not None:
            hidden = hidden * transform.multiplier(model)  # (h @ W.T) * a == (a * h) @ W.T
        if transform.softcap is not None:
            softcap = transform.softcap(model)
    num_items = kwargs.get("num_items_in_batch")
    loss = LOSSES[settings.loss](
        hidden, head.weight, targets, bias=head.bias, softcap=softcap,
        reduction="sum" if num_items is not None else "mean", ignore_index=ignore_index, options=settings.options,
    )
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return loss


def _as_keywords(signature: inspect.Signature, self, args: tuple, kwargs: dict) -> dict:
    """All arguments of a forward call by name, so labels passed positionally are found too."""
    bound = signature.bind_partial(self, *args, **kwargs).arguments
    named = {k: v for k, v in bound.items() if signature.parameters[k].kind != inspect.Parameter.VAR_KEYWORD}
    for name, param in signature.parameters.items():
        if param.kind == inspect.Parameter.VAR_KEYWORD:
            named.update(bound.get(name, {}))
    named.pop(next(iter(signature.parameters)))  # self
    return named


def _make_forward(original: Callable, settings: _Settings, transforms: list[LogitTransform], head_name: str):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        if not (self.training or settings.fused_in_eval):
            return original(self, *args, **kwargs)
        kwargs = _as_keywords(signature, self, args, kwargs)
        labels = kwargs.get("labels")
        if labels is None:
            return original(self, **kwargs)
        head = getattr(self, head_name)
        if not isinstance(head, torch.nn.Linear):
            raise UnsupportedModelError(
                f"{type(self).__name__}.{head_name} is a {type(head).__name__}, not nn.Linear: the fused loss needs "
                "its weight (V, D); merge adapters on the output layer before patching")
        return_dict = kwargs.pop("return_dict", None)
        kwargs["labels"] = None
        captured = {}

        def head_forward(hidden):
            captured["loss"] = _fused_loss(self, settings, transforms, hidden, head, labels, kwargs)
            return hidden.new_empty(*hidden.shape[:-1], 0)  # no vocabulary axis: nothing downstream is materialised

        head.forward = head_forward
        try:
            outputs = original(self, return_dict=True, **kwargs)
        finally:
            del head.forward
        loss = captured["loss"]
        aux_loss = getattr(outputs, "aux_loss", None)
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        fields = {k: v for k, v in outputs.items() if k != "logits"}
        outputs = type(outputs)(**{**fields, "loss": loss})
        return outputs.to_tuple() if return_dict is False else outputs

    setattr(forward, _PATCH_MARK, original)
    return forward


@dataclass
class PatchHandle:
    """Returned by :func:`patch`; ``undo()`` restores the original forward of the patched class or instance."""

    target: object
    original: Callable
    on_class: bool

    def undo(self) -> None:
        if self.on_class:
            self.target.forward = self.original
        elif "forward" in vars(self.target):
            del self.target.forward


def patch(model_or_class, loss: str = "cce", *, fused_in_eval: bool = False, **options) -> PatchHandle:
    """Make a transformers causal LM (instance or class) compute its training loss with a largevocab loss.

    Args:
        model_or_class: a ``*ForCausalLM`` instance, or its class (instances created afterwards are patched too).
        loss: ``"cce"`` (exact fused cross-entropy, :func:`largevocab.linear_cross_entropy`), ``"sce"`` (Scalable
            Cross-Entropy) or ``"sampled"`` (sampled softmax).
        fused_in_eval: also use the fused loss in eval mode with labels (then ``logits`` is None there too); by
            default eval keeps the original path so ``compute_metrics`` gets logits.
        options: keyword options of the chosen loss (e.g. ``filter_eps=...``, ``backend=...``, ``z_loss=...``,
            ``bucket_size_y=...``); the reduction, shift, soft cap, bias and ignore_index come from the model.

    With labels in training mode, ``outputs.loss`` is the fused loss and ``outputs.logits`` is None; without labels
    (generation, inference) the model runs exactly as before. Patching again replaces the settings; the handle's
    ``undo()`` restores the original forward. Raises :class:`UnsupportedModelError` for a model whose head or
    logit transforms the patch cannot reproduce.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {loss!r}")
    reserved = [k for k in options if k in RESERVED_OPTIONS]
    if reserved:
        raise ValueError(f"options {reserved} are set by the patch from the model; do not pass them")
    if loss == "cce":
        lv.LinearCrossEntropyLoss(**options)  # validates the options now rather than at the first step
    on_class = isinstance(model_or_class, type)
    model_cls = model_or_class if on_class else type(model_or_class)
    if not (on_class and issubclass(model_cls, torch.nn.Module)) and not isinstance(model_or_class, torch.nn.Module):
        raise TypeError(f"patch expects a transformers model or model class, got {model_or_class!r}")
    transforms = _check_layout(model_cls)
    head_name = _head_attribute(model_cls)
    if not on_class and loss != "cce":
        head = getattr(model_or_class, head_name)
        softcaps = [t.softcap(model_or_class) for t in transforms if t.softcap is not None]
        if getattr(head, "bias", None) is not None or any(c is not None for c in softcaps):
            raise UnsupportedModelError(
                f"loss={loss!r} supports neither an lm_head bias nor logit soft-capping, which "
                f"{model_cls.__name__} uses; use loss='cce'")
    current = model_or_class.forward if on_class else vars(model_or_class).get("forward", model_cls.forward)
    current = getattr(current, "__func__", current)
    original = getattr(current, _PATCH_MARK, current)
    settings = _Settings(loss, dict(options), fused_in_eval)
    forward = _make_forward(original, settings, transforms, head_name)
    if on_class:
        model_cls.forward = forward
    else:
        model_or_class.forward = types.MethodType(forward, model_or_class)
    return PatchHandle(model_or_class, original, on_class)
