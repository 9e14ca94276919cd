"""``patch(model)``: the model's forward, run with lazy logits whenever it is given labels in training."""

from __future__ import annotations

import functools
import inspect
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import largevocab as lv

from ._head import (
    _ACTIVE,
    Source,
    _probe,
    effective_linear,
    install_head,
    is_peft_wrapper,
    original_forward,
    output_dtype,
    uninstall_head,
    warn_once,
)
from ._lazy import LazyLogits, UnsupportedModelError

RESERVED_OPTIONS = ("reduction", "shift", "softcap", "bias", "ignore_index", "label_smoothing")
_PATCH_MARK = "_largevocab_original_forward"
_WARNED: set = set()
LAST_REPORT: list = [None]  # the last fused forward's Report (tests read it)


@dataclass(frozen=True)
class Report:
    """What one fused forward did: output-layer calls fused, ops served by the fused core, ops materialised."""

    model: str
    head_calls: int
    served: tuple[str, ...]
    materialised: tuple[str, ...]
    not_fused: str | None


@dataclass(frozen=True)
class Settings:
    loss: str
    options: dict
    fused_in_eval: bool
    materialize: str

    def approximate(self, hidden, weight, targets, *, bias, softcap, reduction, ignore_index, label_smoothing):
        if bias is not None or softcap is not None or label_smoothing:
            raise UnsupportedModelError(
                f"loss={self.loss!r} supports no output-layer bias, logit soft cap, additive logit term or label "
                "smoothing, which this model's loss uses; use loss='cce'")
        function = lv.scalable_cross_entropy if self.loss == "sce" else lv.sampled_cross_entropy
        return function(hidden, weight, targets, reduction=reduction, ignore_index=ignore_index, **self.options)


def _unwrap_head(module):
    """The module under FSDP1 / activation-checkpoint wrappers, where the forward to replace lives."""
    for name in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module"):
        while hasattr(module, name) and isinstance(getattr(module, name), torch.nn.Module):
            module = getattr(module, name)
    return module


def _own_output_layer(model):
    getter = getattr(model, "get_output_embeddings", None)
    caller = getter() if callable(getter) else None
    return caller if isinstance(caller, torch.nn.Module) else None


def output_layer(model, check: bool = True):
    """``(caller, head)``: the module the model calls for its logits, and the one under its wrappers.

    A model without one of its own that wraps exactly one model with one (a VLM calling its inner causal LM without
    labels and computing the loss on its logits) uses that one. ``check``: refuse a head without a (V, D) weight;
    the patched forward does not check (``Context.new_lazy`` does, inside the head's call), as reading the weight
    outside the head's own call makes DeepSpeed ZeRO-3 gather it for the whole model's forward and backward."""
    caller = _own_output_layer(model)
    if caller is None:
        nested = {id(c): c for c in (_own_output_layer(m) for m in model.children()) if c is not None}
        caller = next(iter(nested.values())) if len(nested) == 1 else None
    if caller is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no output layer (get_output_embeddings() returned None, and no single "
            "submodule has one): there is no linear head to fuse with the loss")
    head = _unwrap_head(caller)
    if check and effective_linear(head) is None and not is_peft_wrapper(head):
        raise UnsupportedModelError(
            f"{type(model).__name__}'s output layer is a {type(head).__name__}, whose forward is not a linear "
            "layer's (hidden @ W.T + b): the fused loss needs its (V, D) weight")
    return caller, head


class Context:
    """One fused forward: the model, its output layer, and what happened to the logits."""

    def __init__(self, model, settings: Settings):
        self.model = model
        self.settings = settings
        self.caller, self.head = output_layer(model, check=False)
        self.sources: list[Source] = []
        self.per_token: list = []  # (source, per-token loss, targets, ignore_index) of each served cross-entropy
        self.materialised: list[str] = []
        self.not_fused: str | None = None
        self.want_per_token = False  # TRL's SFT protocol reads the per-token losses

    def new_lazy(self, module, hidden):
        weights = effective_linear(module)
        if weights is None:
            self.not_fused = f"{type(module).__name__} has no (V, D) weight in its current state"
            warn_once(_WARNED, ("head", type(self.model).__name__, type(module).__name__),
                      f"largevocab: {type(self.model).__name__}'s output layer ({type(module).__name__}) cannot be "
                      "fused in its current state (e.g. LoRA with dropout or a variant): its logits are computed as "
                      "usual (correct, not memory-saving)")
            return original_forward(module)(hidden)
        if is_peft_wrapper(module):
            _probe(module, hidden, *weights)
        source = Source(self, self.caller, module, weights[0].shape[0])
        self.sources.append(source)
        return source.lazy(hidden, output_dtype(hidden, weights[0]), weights)

    def on_materialise(self, op_name: str) -> None:
        self.materialised.append(op_name)
        name = type(self.model).__name__
        message = (f"{name} applies {op_name} to its logits, which the fused loss does not compute, so the logits "
                   "were materialised (correct, not memory-saving)")
        if self.settings.materialize == "error":
            raise UnsupportedModelError(f"{message}; patch(..., materialize='warn') allows it")
        warn_once(_WARNED, ("materialise", name, op_name), f"largevocab: {message}")

    def finish(self, outputs):
        name = type(self.model).__name__
        if not self.sources and self.not_fused is None:
            self.not_fused = "the forward never called its output layer"
            warn_once(_WARNED, ("unused", name),
                      f"largevocab: {name} computed its logits without calling its output layer "
                      f"({type(self.caller).__name__}), so the patch had no effect on it (loss unchanged, memory not "
                      "saved)")
        LAST_REPORT[0] = Report(name, len(self.sources), tuple(s for src in self.sources for s in src.served),
                                tuple(self.materialised), self.not_fused)
        return _drop_lazy(outputs)


def _drop_lazy(outputs):
    """The outputs with every lazy tensor replaced by None (``outputs.logits`` is None when fused)."""
    if isinstance(outputs, LazyLogits):
        return None
    if isinstance(outputs, tuple) and not hasattr(outputs, "_fields"):
        return tuple(_drop_lazy(v) for v in outputs)
    if (hasattr(outputs, "keys") and hasattr(outputs, "to_tuple")  # a transformers ModelOutput
            and any(isinstance(v, LazyLogits) for v in outputs.values())):
        return type(outputs)(**{k: (None if isinstance(v, LazyLogits) else v) for k, v in outputs.items()})
    return outputs


def labels_position(model_cls: type) -> int | None:
    """Index of ``labels`` among the positional arguments of the class's forward (after self), or None."""
    params = list(inspect.signature(model_cls.forward).parameters.values())[1:]
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if "labels" not in [p.name for p in params] and not any(p.kind == p.VAR_KEYWORD for p in params):
        raise UnsupportedModelError(f"{model_cls.__name__}.forward takes no labels: it computes no loss to fuse")
    return positional.index("labels") if "labels" in positional else None


def run_fused(model, call, args, kwargs, settings: Settings, heads: weakref.WeakSet, per_token: bool = False):
    """``call(*args, **kwargs)`` (the model's own forward) with its output layer returning lazy logits.

    Returns ``(outputs with lazy tensors dropped, context)``."""
    context = Context(model, settings)
    context.want_per_token = per_token
    if install_head(context.head):
        heads.add(context.head)
    _ACTIVE.append(context)
    try:
        outputs = call(*args, **kwargs)
    finally:
        _ACTIVE.pop()
    return context.finish(outputs), context


def _make_forward(call_original: Callable, labels_at: int | None, settings: Settings, heads: weakref.WeakSet,
                  previous):
    """The patched forward. ``call_original(self, *args, **kwargs)`` runs the forward that was there before."""

    @functools.wraps(call_original)
    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels")
        if labels is None and labels_at is not None and len(args) > labels_at:
            labels = args[labels_at]
        if labels is None or not (self.training or settings.fused_in_eval):
            return call_original(self, *args, **kwargs)
        return run_fused(self, functools.partial(call_original, self), args, kwargs, settings, heads)[0]

    setattr(forward, _PATCH_MARK, call_original)
    forward._lv_heads = heads
    forward._lv_settings = settings
    forward._lv_previous = previous  # the instance-level forward the first patch replaced (None: the class's)
    return forward


@dataclass
class PatchHandle:
    """Returned by :func:`patch`; ``undo()`` restores the forward and the output layers' forwards."""

    target: object
    original: Callable
    on_class: bool
    heads: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    previous: object = None  # instance patch: the instance-level forward to put back (None: delete ours)

    def undo(self) -> None:
        if self.on_class:
            self.target.forward = self.original
        elif self.previous is not None:
            self.target.forward = self.previous
        elif "forward" in vars(self.target):
            del self.target.forward
        for head in list(self.heads):
            uninstall_head(head)
        self.heads.clear()


def _unwrap_model(model):
    """The transformers model under PEFT, DDP and FSDP1 wrappers (the one whose forward takes the labels)."""
    while True:
        if hasattr(model, "get_base_model") and type(model).__module__.startswith("peft"):
            model = model.get_base_model()
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_fsdp_wrapped_module"):
            model = model._fsdp_wrapped_module
        else:
            return model


def patched_forward(target, on_class: bool):
    """The largevocab forward currently installed on the class or instance, or None."""
    current = vars(target).get("forward") if not on_class else target.__dict__.get("forward")
    current = getattr(current, "__func__", current)
    return current if hasattr(current, _PATCH_MARK) else None


def make_settings(loss, options, fused_in_eval, materialize) -> Settings:
    if loss not in ("cce", "sce", "sampled"):
        raise ValueError(f"loss must be one of ('cce', 'sce', 'sampled'), got {loss!r}")
    if materialize not in ("warn", "error"):
        raise ValueError(f"materialize must be 'warn' or 'error', got {materialize!r}")
    reserved = [k for k in options if k in RESERVED_OPTIONS]
    if reserved:
        raise ValueError(f"options {reserved} are set by the patch from the model; do not pass them")
    if loss == "cce":
        lv.LinearCrossEntropyLoss(**options)  # validates the options now rather than at the first step
    return Settings(loss, dict(options), fused_in_eval, materialize)


def patch_model(model_or_class, settings: Settings) -> PatchHandle:
    on_class = isinstance(model_or_class, type)
    if not (issubclass(model_or_class, torch.nn.Module) if on_class else isinstance(model_or_class, torch.nn.Module)):
        raise TypeError(f"patch expects a transformers model or model class, got {model_or_class!r}")
    target = model_or_class if on_class else _unwrap_model(model_or_class)
    model_cls = target if on_class else type(target)
    if not on_class:
        output_layer(target)  # refuses a model without a linear head now, not at the first step
    labels_at = labels_position(model_cls)
    if not on_class:
        from ._trl import trl_fused_forward

        trl = trl_fused_forward(target)
        if trl is not None:
            return trl.patch(target, settings)
    ours = patched_forward(target, on_class)
    if ours is not None:
        call_original, heads, previous = getattr(ours, _PATCH_MARK), ours._lv_heads, ours._lv_previous
    elif on_class:
        call_original, heads, previous = model_cls.__dict__.get("forward", model_cls.forward), weakref.WeakSet(), None
    else:
        previous = vars(target).get("forward")  # e.g. accelerate's hook wrapper: keep it under ours
        heads = weakref.WeakSet()
        if previous is None:
            call_original = model_cls.forward
        else:
            call_original = functools.wraps(model_cls.forward)(lambda self, *a, _p=previous, **k: _p(*a, **k))
    forward = _make_forward(call_original, labels_at, settings, heads, previous)
    if on_class:
        target.forward = forward
        return PatchHandle(target, call_original, True, heads)
    target.forward = types.MethodType(forward, target)
    return PatchHandle(target, call_original, False, heads, previous)
