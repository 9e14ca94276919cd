"""Lazy logits: a tensor that stands for ``head(hidden)`` followed by the elementwise ops the model applied to it.

A :class:`LazyLogits` has the shape, dtype and device the real logits would have, and no values (its storage is
one NaN, expanded, so a value read that ever bypassed ``__torch_function__`` would show as NaN, not as a plausible
number). Every torch function or tensor method called on it reaches :meth:`LazyLogits.__torch_function__`, which
does one of four things:

- metadata (``shape``, ``dtype``, ``device``, ``dim()`` ...): answered from the placeholder;
- ops on the rows (indexing, ``view``/``reshape`` keeping the vocabulary last, ``flatten``, ``transpose``, ...):
  applied to the hidden states, which gives a new lazy tensor (the rows of ``head(h)[idx]`` are ``head(h[idx])``);
- elementwise ops the fused loss can express (``* s``, ``/ s``, ``+ c``, ``- c``, negation, ``tanh``, casts,
  vocabulary slices, ``detach``): recorded on a tape, in order, with the exact call so they can be replayed;
- ops the fused core computes (``F.cross_entropy``, ``logsumexp`` and ``argmax`` over the vocabulary): served by
  the source (the output layer) without building the logits.

Anything else materialises the real logits (the head's own forward, then the tape replayed call by call, so the
values are exactly the unpatched ones) and runs the op on them, with a one-time warning, or raises when the patch
was made with ``materialize="error"``. In-place ops other than the recordable ones, and any in-place op on a lazy
tensor that shares its rows with another (a view), raise: they cannot be reproduced faithfully. The handlers live
in ``_ops.py``.

Autograd. The placeholder's ``requires_grad`` is the real logits' (grad mode on and the hidden states, weight or bias
requiring a gradient at the head; then each op's operands and grad mode, ``detach`` clearing it), so frameworks
that act on module outputs by their autograd state see what they would see on real logits, and a fused loss has a
graph exactly when the unpatched one would. A ``detach`` is recorded where it happened: the hidden states, weight,
bias and tensor operands before it get no gradient, operands after it do. The fused loss never passes through the
placeholder, so nothing that acts on the logits' gradient can be honoured: a gradient hook on lazy logits raises
(except FSDP's pre-backward hook, which the request's answer gets too, see ``_head.py``), and so does lazy logits
returned by a custom ``autograd.Function`` (its backward would be skipped), except DeepSpeed ZeRO-3's, which passes
every module output through a Function whose forward is ``detach`` and whose backward is the identity plus a
parameter gather (the answer gets that Function too): there the ``detach`` its forward recorded is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

_SELF = object()  # stands for the lazy tensor in a recorded call


class UnsupportedModelError(ValueError):
    """The model (or an op it applies to its logits) cannot be reproduced by the fused loss; the message says why."""


@dataclass(frozen=True, eq=False)
class TapeOp:
    """One recorded call: ``effects`` say what it does to the logits, in order, as ``(kind, value)`` with kind in
    scale, add, tanh, cast, vocab, detach; ``func(*args, **kwargs)`` (the lazy tensor as ``_SELF``) replays it."""

    effects: tuple
    func: Callable
    args: tuple
    kwargs: dict

    def replay(self, x: torch.Tensor) -> torch.Tensor:
        args = tuple(x if a is _SELF else a for a in self.args)
        return self.func(*args, **self.kwargs)


@dataclass
class FusedForm:
    """The tape as ``logits = post * tanh(scale * z + add)`` (or ``scale * z + add`` without tanh), where
    ``z = hidden @ W[vocab].T + b[vocab]``."""

    scale: object = 1.0  # number or 0-dim tensor
    add: object = None  # None, number, 0-dim tensor or (V,) tensor over the current vocabulary
    tanh: bool = False
    post: float = 1.0
    vocab: range | None = None
    detached: bool = False  # a detach came after the head: hidden, weight and bias get no gradient

    def inputs(self, hidden, weight, bias):
        """``(hidden', weight', bias', softcap)`` such that the fused core's logits equal the tape's."""
        if self.detached:
            hidden, weight = hidden.detach(), weight.detach()
            bias = bias.detach() if bias is not None else None
        vocab = self.vocab
        if vocab is not None and vocab != range(weight.shape[0]):
            weight = weight[vocab.start:vocab.stop:vocab.step]
            bias = bias[vocab.start:vocab.stop:vocab.step] if bias is not None else None
        # post * tanh(u) == C * tanh(z' / C) with C = |post| and z' = post * u (tanh is odd).
        factor = self.post if self.tanh else 1.0
        k = _mul(factor, self.scale)
        if bias is not None:
            bias = bias * k if not _is_one(k) else bias
        if self.add is not None:
            add = _mul(factor, self.add)
            if not torch.is_tensor(add):
                add = torch.full((weight.shape[0],), float(add), dtype=weight.dtype, device=weight.device)
            add = add.to(weight.dtype).expand(weight.shape[0])
            bias = add if bias is None else bias + add
        if not _is_one(k):
            hidden = hidden * (k.to(hidden.dtype) if torch.is_tensor(k) else k)
        softcap = abs(self.post) if self.tanh else None
        return hidden, weight, bias, softcap


def replay(tape: tuple[TapeOp, ...], logits: torch.Tensor) -> torch.Tensor:
    """The recorded calls applied to real logits of the lazy tensor's rows, one by one (the unpatched values).

    A call recorded on logits of another shape (``x + v.view(1, 1, V)`` before the model flattened the rows) can
    broadcast to leading unit dimensions here: those are dropped again."""
    rows = logits.shape[:-1]
    for op in tape:
        logits = op.replay(logits)
    return logits.reshape(*rows, logits.shape[-1])


def _detach(x):
    return x.detach() if torch.is_tensor(x) else x


def _is_one(x) -> bool:
    return not torch.is_tensor(x) and x == 1


def _mul(a, b):
    if _is_one(a):
        return b
    if _is_one(b):
        return a
    return a * b


def fused_form(tape: tuple[TapeOp, ...], vocab_size: int) -> FusedForm | None:
    """The tape in the form the fused core computes, or None when it has none (then the logits are materialised)."""
    form = FusedForm(vocab=range(vocab_size))
    for kind, value in (effect for op in tape for effect in op.effects):
        if kind == "scale":
            if form.tanh:
                if torch.is_tensor(value):
                    return None  # the soft cap must be a number
                form.post = form.post * value
            else:
                form.scale = _mul(form.scale, value)
                form.add = None if form.add is None else _mul(form.add, value)
        elif kind == "add":
            if form.tanh:
                return None
            form.add = value if form.add is None else form.add + value
        elif kind == "tanh":
            if form.tanh:
                return None
            form.tanh = True
        elif kind == "vocab":
            form.vocab = form.vocab[value]
            if torch.is_tensor(form.add) and form.add.ndim == 1:
                form.add = form.add[value]
        elif kind == "detach":  # what came before gets no gradient; tensor operands after it still do
            form.detached = True
            form.scale = _detach(form.scale)
            form.add = _detach(form.add)
    if form.tanh and (form.post == 0 or not math.isfinite(form.post)):
        return None
    return form


# ---------------------------------------------------------------------------------------------------------------
# The tensor subclass.


class LazyLogits(torch.Tensor):
    """(..., V) logits ``tape(head(hidden))`` that are never computed unless an op needs their values.

    Attributes (all set by :func:`make_lazy`): ``_lv_source`` (the output layer's request handle),
    ``_lv_hidden`` (..., D), ``_lv_tape`` (recorded ops), ``_lv_vocab`` (current vocabulary size),
    ``_lv_rows_full`` (rows are all of the source's rows, in order), ``_lv_aliased`` (shares rows with another
    lazy tensor, so in-place ops are refused), ``_lv_requires_grad`` (the real logits' ``requires_grad``, also the
    placeholder's outside torch.compile), ``_lv_node`` (the node of an identity Function accounted for).
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if (handler is None and getattr(func, "__name__", None) == "__get__"
                and getattr(func.__self__, "__name__", None) not in _VALUE_ATTRS):
            handler = _metadata  # shape, dtype, device, is_mkldnn, ... (Dynamo reads many of them)
        if handler is None and _is_predicate(func):
            handler = _metadata  # is_inference(), is_conj(), is_contiguous(), ... (fake-tensor conversion asks)
        if handler is not _metadata:
            _settle_all(args, kwargs)
        if handler is not None:
            result = handler(func, args, kwargs)
            if result is not NotImplemented:
                return result
        name = getattr(func, "__name__", repr(func))
        if name == "__get__":
            name = f"the attribute {getattr(func.__self__, '__name__', func.__self__)}"
        if name.endswith("_") and not name.endswith("__") or name.startswith("__i") or name == "__setitem__":
            raise UnsupportedModelError(
                f"in-place {name} on lazy logits cannot be reproduced by the fused loss: compute it out of place, "
                "or undo the largevocab patch for this model")
        return _materialise_and_call(func, args, kwargs, name)

    def __repr__(self, *, tensor_contents=None):
        ops = [kind for op in self._lv_tape for kind, _ in op.effects]
        return f"LazyLogits(shape={tuple(self.shape)}, dtype={self.dtype}, ops={ops})"


def _is_predicate(func) -> bool:
    name = getattr(func, "__name__", "")
    return name.startswith(("is_", "_is_")) and name != "is_nonzero"  # is_nonzero reads the value


def make_lazy(source, hidden: torch.Tensor, tape: tuple, vocab: int, dtype: torch.dtype, rows_full: bool,
              requires_grad: bool):
    """A lazy tensor of shape ``hidden.shape[:-1] + (vocab,)``; ``requires_grad``: the real logits' flag.

    Its values are one NaN seen through zero strides. Outside torch.compile it is a leaf and no view (FSDP2 warns
    about modules returning views, as in-place ops on them drop its hooks); Dynamo traces neither ``set_`` nor
    ``_make_subclass``, so there it is an expanded view without autograd state (the attribute alone carries it)."""
    shape = (*hidden.shape[:-1], vocab)
    if torch.compiler.is_compiling():
        lazy = torch.full((), math.nan, dtype=dtype, device=hidden.device).expand(*shape).as_subclass(LazyLogits)
    else:
        storage = torch.full((1,), math.nan, dtype=dtype, device=hidden.device).untyped_storage()
        nan = torch.empty(0, dtype=dtype, device=hidden.device).set_(storage, 0, shape, (0,) * len(shape))
        lazy = torch.Tensor._make_subclass(LazyLogits, nan, requires_grad)
        if requires_grad:
            _guard(lazy)
    lazy._lv_source = source
    lazy._lv_hidden = hidden
    lazy._lv_tape = tape
    lazy._lv_vocab = vocab
    lazy._lv_rows_full = rows_full
    lazy._lv_aliased = False
    lazy._lv_requires_grad = requires_grad
    lazy._lv_node = None  # the autograd node of an identity Function already accounted for (see _settle)
    return lazy


def _operands_need_grad(op) -> bool:
    """Whether the op's result depends differentiably on a tensor operand (a learnable scale or addend; not the
    tensor ``type_as`` / ``to`` take their dtype from)."""
    return op is not None and any(torch.is_tensor(v) and v.requires_grad for _, v in op.effects)


def _derive(lazy, *, hidden=None, op=None, dtype=None, vocab=None, rows_full=True, view=False):
    detach = op is not None and op.effects == (("detach", None),)
    requires_grad = torch.is_grad_enabled() and not detach and (lazy._lv_requires_grad or _operands_need_grad(op))
    child = make_lazy(
        lazy._lv_source, lazy._lv_hidden if hidden is None else hidden,
        lazy._lv_tape + ((op,) if op is not None else ()), lazy._lv_vocab if vocab is None else vocab,
        lazy.dtype if dtype is None else dtype, lazy._lv_rows_full and rows_full, requires_grad)
    if view:
        lazy._lv_aliased = child._lv_aliased = True
    return child


def _record_inplace(lazy, op):
    if lazy._lv_aliased:
        raise UnsupportedModelError(
            "an in-place op on lazy logits that share their rows with a view cannot be reproduced; compute it out "
            "of place")
    lazy._lv_tape = lazy._lv_tape + (op,)
    if torch.is_grad_enabled() and not lazy._lv_requires_grad and _operands_need_grad(op):
        lazy._lv_requires_grad = True
        if not torch.compiler.is_compiling():
            with torch._C.DisableTorchFunctionSubclass():
                lazy.requires_grad_()
            _guard(lazy)
    return lazy


def _guard(lazy) -> None:
    """Make a gradient that reaches the placeholder raise: the fused loss never passes through it, so one that does
    came through something the patch did not see (a custom Function whose forward materialised the logits, ...) and
    would be lost."""
    with torch._C.DisableTorchFunctionSubclass():
        lazy.register_hook(_gradient_reached_placeholder)


def _gradient_reached_placeholder(grad):
    raise UnsupportedModelError(
        "a gradient reached lazy logits: the model differentiated through its logits in a way the fused loss could "
        "not see (e.g. a custom autograd Function that computed them), so that gradient would be lost; undo the "
        "largevocab patch for this model")


# ---------------------------------------------------------------------------------------------------------------
# Autograd Functions that returned lazy logits.

# DeepSpeed ZeRO-3 applies these to every module's outputs and inputs: forward ``x.detach()``, backward the identity
# (plus gathering or releasing the module's parameters, which the request's answer gets too).
_IDENTITY_FUNCTIONS = {("deepspeed.runtime.zero.parameter_offload", "PreBackwardFunctionForModule"),
                       ("deepspeed.runtime.zero.parameter_offload", "PostBackwardFunctionModule")}


def _settle(lazy) -> None:
    """Account for an autograd Function that returned ``lazy``: autograd attached its output to the Function's node
    (so the placeholder has a ``grad_fn``), after its forward ran on a lazy tensor and recorded what it did."""
    if torch.compiler.is_compiling():
        return
    with torch._C.DisableTorchFunctionSubclass():
        node = lazy.grad_fn
    if node is None or node is lazy._lv_node:
        return
    cls = getattr(node, "_forward_cls", None)
    key = (getattr(cls, "__module__", None), getattr(cls, "__name__", None))
    if key in _IDENTITY_FUNCTIONS and lazy._lv_tape and lazy._lv_tape[-1].effects == (("detach", None),):
        lazy._lv_tape = lazy._lv_tape[:-1]  # the Function's detach: autograd re-attached its output
        lazy._lv_requires_grad = True
        lazy._lv_node = node
        return
    name = getattr(cls, "__qualname__", type(node).__name__)
    raise UnsupportedModelError(
        f"the autograd Function {name} was applied to the logits: the fused loss computes no gradient of the logits, "
        "so its backward would be skipped; apply it elsewhere, or undo the largevocab patch for this model")


def _settle_all(args, kwargs) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, LazyLogits):
            _settle(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, LazyLogits):
                    _settle(item)


def _materialise_and_call(func, args, kwargs, name):
    def real(x):
        if isinstance(x, LazyLogits):
            return x._lv_source.materialise(x, name)
        if isinstance(x, (list, tuple)):
            return type(x)(real(v) for v in x)
        return x

    return func(*real(args), **{k: real(v) for k, v in kwargs.items()})


# ---------------------------------------------------------------------------------------------------------------
# Handlers: each returns a result, or NotImplemented to materialise.

_HANDLERS: dict[Callable, Callable] = {}
_VALUE_ATTRS = {"data", "real", "imag", "T", "mT", "H", "mH"}  # attributes that carry the values: materialised


def _handles(*funcs):
    def register(handler):
        for f in funcs:
            _HANDLERS[f] = handler
        return handler

    return register


T = torch.Tensor


@_handles(T.size, T.dim, T.ndimension, T.numel, T.nelement, T.__len__, T.is_floating_point, T.is_complex,
          T.element_size, T.get_device, T.stride, T.storage_offset, T.untyped_storage, T.data_ptr, T.dim_order)
def _metadata(func, args, kwargs):
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


from . import _ops  # noqa: E402, F401 - registers the handlers of row, elementwise and fused ops
