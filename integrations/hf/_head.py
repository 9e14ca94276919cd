"""The output layer's side of the patch: lazy logits come out of it, and every value they need is computed in it.

Each value a lazy tensor needs (a cross-entropy, a log-sum-exp, an argmax, or the real logits) is computed by
calling the output layer again, through its own ``__call__``, with an opaque :class:`Request` as its input. Its
hooks run around the computation as around any forward: FSDP2, FSDP and DeepSpeed ZeRO-3 gather the weight before
it, and they find the tensors of the :class:`Answer` (a tuple) and put their pre-backward hooks or Functions on
them, so the weight is gathered again when the fused backward runs. The request object is no tensor and no
container, so those frameworks pass it through untouched.
"""

from __future__ import annotations

import functools
import sys
import warnings

import torch
import torch.nn.functional as F

import largevocab as lv

from ._lazy import LazyLogits, UnsupportedModelError, fused_form, make_lazy, replay

IGNORE_INDEX = -100
STATS_CHUNK_BYTES = 64 << 20  # logits of one chunk of rows when the helper below materialises them in pieces
_ACTIVE: list = []  # the fused forwards in progress (innermost last)


def current_context():
    return _ACTIVE[-1] if _ACTIVE else None


class Request:
    """What the output layer is asked to compute instead of its forward: ``run(module, hidden)``.

    The layer is called as ``layer(request, hidden)``: the hidden states pass through its input hooks as in its own
    forward (FSDP2 casts them and puts its post-backward Function on them; ZeRO-3 counts them to release the weight
    after the layer's backward), and ``run`` gets what the hooks made of them."""

    __slots__ = ("run",)

    def __init__(self, run):
        self.run = run


class Answer(tuple):
    """A request's result, ``(value,)``. A tuple, so FSDP2, FSDP and ZeRO-3 find (and hook) the tensors in it, and
    rebuild it as an Answer; a user's forward hook that edits the layer's output fails on it (or returns another
    type, refused) instead of editing a loss."""

    __slots__ = ()

    @property
    def value(self):
        return self[0]

    def _edited(self, *args, **kwargs):
        raise TypeError("a forward hook computed with the output of the output layer during a fused request (an "
                        "Answer, not logits): hooks that change the output layer's output cannot be fused")

    __add__ = __radd__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = __sub__ = __rsub__ = _edited


# ---------------------------------------------------------------------------------------------------------------
# The (V, D) weight and (V,) bias a head computes with.


def _peft_types():
    if "peft" not in sys.modules:
        return None, None
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.utils.other import ModulesToSaveWrapper

    return LoraLinear, ModulesToSaveWrapper


def is_peft_wrapper(module) -> bool:
    lora, to_save = _peft_types()
    return lora is not None and isinstance(module, (lora, to_save))


def effective_linear(module):
    """``(weight (V, D), bias (V,) or None)`` with ``module(x) == F.linear(x, weight, bias)``, or None.

    An ``nn.Linear`` whose class keeps ``nn.Linear.forward``; PEFT's ``ModulesToSaveWrapper`` (the active copy);
    PEFT's LoRA ``Linear`` without variants (DoRA, aLoRA, ...) or training-mode dropout: ``W + scale * B @ A``, built
    as a (V, D) tensor so autograd routes the gradients to W, A and B.
    """
    lora, to_save = _peft_types()
    if to_save is not None and isinstance(module, to_save):
        if module.disable_adapters or any(a not in module._adapters for a in module.active_adapters):
            return effective_linear(module.original_module)
        return effective_linear(module.modules_to_save[module.active_adapters[0]])
    if lora is not None and type(module) is lora:
        return _lora_linear(module)
    if isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward:
        return module.weight, module.bias
    return None


def _lora_linear(module):
    base = effective_linear(module.base_layer)
    if base is None or (module.disable_adapters and module.merged):
        return None  # the forward would unmerge first: let it run
    if module.disable_adapters or module.merged:
        return base
    weight, bias = base
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        dropout = module.lora_dropout[name]
        if name in getattr(module, "lora_variant", {}) or (module.training and getattr(dropout, "p", 0) > 0):
            return None
        a, b = module.lora_A[name], module.lora_B[name]
        scaling = module.scaling[name]
        weight = weight + (b.weight @ a.weight).to(weight.dtype) * scaling
        if b.bias is not None:
            bias = b.bias * scaling if bias is None else bias + b.bias * scaling
    return weight, bias


def original_forward(module):
    """The head's forward as it was before the patch (an instance-level wrapper such as accelerate's included)."""
    previous = module.__dict__.get("_lv_previous_forward")
    return previous if previous is not None else type(module).forward.__get__(module)


def _probe(module, hidden, weight, bias):
    """Once per head and adapter state: the built weight reproduces the wrapper's own forward on one row."""
    key = (tuple(getattr(module, "active_adapters", ())), getattr(module, "merged", None),
           getattr(module, "disable_adapters", None), module.training)
    if torch.compiler.is_compiling() or module.__dict__.get("_lv_probed") == key:
        return
    with torch.no_grad():
        row = hidden.reshape(-1, hidden.shape[-1])[:1]
        want = original_forward(module)(row).float()
        got = F.linear(row, weight, bias).float()
    tol = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 3e-2
    if not torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item()):
        raise UnsupportedModelError(
            f"the (V, D) weight built for {type(module).__name__} does not reproduce its forward (max difference "
            f"{(got - want).abs().max().item():.3g}); this PEFT version computes it differently, so the model is not "
            "fused")
    module.__dict__["_lv_probed"] = key


# ---------------------------------------------------------------------------------------------------------------
# Installing the head forward.


def install_head(module) -> bool:
    """Make ``module`` answer requests and, inside a fused forward, return lazy logits. False if already done."""
    if module.__dict__.get("_lv_installed"):
        return False
    module.__dict__["_lv_previous_forward"] = module.__dict__.get("forward")
    # A partial, not a bound method: Dynamo looks bound methods up on the instance by their name.
    module.forward = functools.partial(_head_forward, module)
    module.__dict__["_lv_installed"] = True
    return True


def uninstall_head(module) -> None:
    if not module.__dict__.pop("_lv_installed", False):
        return
    previous = module.__dict__.pop("_lv_previous_forward", None)
    del module.forward
    if previous is not None:
        module.forward = previous
    module.__dict__.pop("_lv_probed", None)


def _head_forward(self, *args, **kwargs):
    if len(args) == 2 and not kwargs and isinstance(args[0], Request):
        return Answer((args[0].run(self, args[1]),))
    context = current_context()
    if (context is None or context.head is not self or len(args) != 1 or kwargs or not torch.is_tensor(args[0])
            or isinstance(args[0], LazyLogits)):
        return original_forward(self)(*args, **kwargs)
    return context.new_lazy(self, args[0])


def output_dtype(hidden, weight) -> torch.dtype:
    device = hidden.device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Serving the lazy logits.


def _grad_enabled(lazy) -> bool:
    """Whether a loss on the lazy logits gets a graph: as on the real logits, grad mode and their requires_grad
    (which parts get a gradient is the fused form's business: see ``FusedForm.detached``)."""
    return torch.is_grad_enabled() and lazy._lv_requires_grad


class Source:
    """One call of the output layer in a fused forward; its lazy logits get their values through it."""

    def __init__(self, context, caller, module, vocab: int):
        self.context = context
        self.caller = caller
        self.module = module
        self.vocab = vocab
        self.served: list[str] = []

    def lazy(self, hidden, dtype, weights):
        requires_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, *weights))
        return make_lazy(self, hidden, (), self.vocab, dtype, rows_full=True, requires_grad=requires_grad)

    def _request(self, lazy, run):
        answer = self.caller(Request(run), lazy._lv_hidden)
        if not isinstance(answer, Answer):
            raise UnsupportedModelError(
                f"a forward hook on {type(self.caller).__name__} replaced the answer of a fused request with a "
                f"{type(answer).__name__}: hooks that change the output layer's output cannot be fused")
        return answer.value

    def _fused(self, module, lazy, hidden):
        """``(hidden', weight', bias', softcap)`` for the lazy tensor (rows ``hidden``), or None when it has no fused
        form."""
        form = fused_form(lazy._lv_tape, self.vocab)
        weights = effective_linear(module)
        if form is None or weights is None:
            return None
        return form.inputs(hidden, *weights)

    def cross_entropy(self, lazy, target, ignore_index, label_smoothing, reduction):
        settings = self.context.settings
        per_token = self.context.want_per_token and settings.loss == "cce"
        grad = _grad_enabled(lazy)

        def run(module, hidden):
            fused = self._fused(module, lazy, hidden)
            if fused is None:
                return None
            hidden, weight, bias, softcap = fused
            with torch.set_grad_enabled(grad):
                if settings.loss != "cce":
                    return settings.approximate(hidden, weight, target, bias=bias, softcap=softcap,
                                                reduction=reduction, ignore_index=ignore_index,
                                                label_smoothing=label_smoothing)
                # A scalar reduction lets the torch backend apply the backward GEMMs during the forward.
                return lv.linear_cross_entropy(
                    hidden, weight, target, bias=bias, softcap=softcap, ignore_index=ignore_index,
                    reduction="none" if per_token or reduction == "none" else "sum",
                    label_smoothing=label_smoothing, **settings.options)

        loss = self._request(lazy, run)
        if loss is None:
            return self._torch(F.cross_entropy, lazy, "cross_entropy", target, ignore_index=ignore_index,
                               reduction=reduction, label_smoothing=label_smoothing)
        self.served.append("cross_entropy")
        if settings.loss == "cce":
            if per_token:
                self.context.per_token.append((lazy, loss, target, ignore_index))
            if reduction != "none":
                loss = loss.sum() if loss.ndim else loss
                if reduction == "mean":  # torch's mean: 0 / 0 = NaN when every target is ignored
                    loss = loss / (target != ignore_index).sum()
        return loss.to(lazy.dtype)

    def logsumexp(self, lazy):
        grad = _grad_enabled(lazy)

        def run(module, hidden):
            fused = self._fused(module, lazy, hidden)
            if fused is None:
                return None
            hidden, weight, bias, softcap = fused
            targets = torch.full(hidden.shape[:-1], IGNORE_INDEX, dtype=torch.long, device=hidden.device)
            with torch.set_grad_enabled(grad):
                return lv.linear_cross_entropy_with_lse(hidden, weight, targets, bias=bias, softcap=softcap,
                                                        reduction="sum", **self.context.settings.options)[1]

        lse = self._request(lazy, run)
        if lse is None:
            return self._torch(torch.logsumexp, lazy, "logsumexp", -1)
        self.served.append("logsumexp")
        return lse.to(lazy.dtype)

    def argmax(self, lazy):
        def run(module, hidden):
            fused = self._fused(module, lazy, hidden)
            if fused is not None:
                hidden, weight, bias, softcap = fused
                return lv.linear_argmax(hidden, weight, bias=bias, softcap=softcap)
            return chunked_rows(module, lazy, hidden, lambda logits: logits.argmax(-1))[0]

        self.served.append("argmax")
        return self._request(lazy, run)

    def materialise(self, lazy, op_name):
        self.context.on_materialise(op_name)

        def run(module, hidden):
            logits = replay(lazy._lv_tape, original_forward(module)(hidden))
            # An op recorded without grad mode replays with it; the lazy tensor's flag is the real logits'.
            return logits if lazy._lv_requires_grad or not logits.requires_grad else logits.detach()

        return self._request(lazy, run)

    def _torch(self, func, lazy, name, *args, **kwargs):
        return func(self.materialise(lazy, name), *args, **kwargs)


def chunked_rows(module, lazy, hidden, *functions):
    """``functions`` applied to the lazy tensor's real logits (rows ``hidden``), rows in chunks of
    ``STATS_CHUNK_BYTES``, no grad.

    The chunks come from the head's own forward and the replayed tape, so the values are the unpatched ones.
    Returns one tensor per function, shaped like the rows.
    """
    rows = hidden.reshape(-1, hidden.shape[-1])
    step = max(1, STATS_CHUNK_BYTES // (4 * max(lazy._lv_vocab, 1)))
    forward = original_forward(module)
    outputs = [[] for _ in functions]
    with torch.no_grad():
        for start in range(0, rows.shape[0], step):
            logits = replay(lazy._lv_tape, forward(rows[start:start + step]))
            for out, function in zip(outputs, functions, strict=True):
                out.append(function(logits))
    return [torch.cat(out).reshape(hidden.shape[:-1]) if out else hidden.new_empty(hidden.shape[:-1])
            for out in outputs]


def warn_once(registry: set, key, message: str) -> None:
    if key not in registry:
        registry.add(key)
        warnings.warn(message, stacklevel=4)
