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
tensor that shares its rows with another (a view), raise: they cannot be reproduced faithfully.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    detached: bool = False

    def inputs(self, hidden, weight, bias):
        """``(hidden', weight', bias', softcap)`` such that the fused core's logits equal the tape's."""
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
        elif kind == "detach":
            form.detached = True
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
    lazy tensor, so in-place ops are refused).
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


def make_lazy(source, hidden: torch.Tensor, tape: tuple, vocab: int, dtype: torch.dtype, rows_full: bool):
    """A lazy tensor of shape ``hidden.shape[:-1] + (vocab,)``."""
    placeholder = torch.full((), math.nan, dtype=dtype, device=hidden.device).expand(*hidden.shape[:-1], vocab)
    lazy = placeholder.as_subclass(LazyLogits)
    lazy._lv_source = source
    lazy._lv_hidden = hidden
    lazy._lv_tape = tape
    lazy._lv_vocab = vocab
    lazy._lv_rows_full = rows_full
    lazy._lv_aliased = False
    return lazy


def _derive(lazy, *, hidden=None, op=None, dtype=None, vocab=None, rows_full=True, view=False):
    child = make_lazy(
        lazy._lv_source, lazy._lv_hidden if hidden is None else hidden,
        lazy._lv_tape + ((op,) if op is not None else ()), lazy._lv_vocab if vocab is None else vocab,
        lazy.dtype if dtype is None else dtype, lazy._lv_rows_full and rows_full)
    if view:
        lazy._lv_aliased = child._lv_aliased = True
    return child


def _record_inplace(lazy, op):
    if lazy._lv_aliased:
        raise UnsupportedModelError(
            "an in-place op on lazy logits that share their rows with a view cannot be reproduced; compute it out "
            "of place")
    lazy._lv_tape = lazy._lv_tape + (op,)
    return lazy


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


def _dim(lazy, d: int, extra: int = 0) -> int:
    n = lazy.ndim + extra
    if not -n <= d < n:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-n}, {n - 1}], but got {d})")
    return d % n


def _prod(values) -> int:
    total = 1
    for v in values:
        total = total * v
    return total


def _sizes(args) -> tuple:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else tuple(args)


@_handles(T.view, T.reshape, torch.reshape)
def _reshape(func, args, kwargs):
    lazy, sizes = args[0], _sizes(args[1:] or (kwargs.get("shape"),))
    if not sizes or not all(isinstance(s, (numbers.Integral, torch.SymInt)) for s in sizes):
        return NotImplemented  # e.g. view(dtype)
    sizes = list(sizes)
    if -1 in sizes:
        known = _prod([s for s in sizes if s != -1])
        sizes[sizes.index(-1)] = lazy.numel() // known if known else 0
    if _prod(sizes) != lazy.numel() or sizes[-1] != lazy._lv_vocab:
        return NotImplemented
    hidden = lazy._lv_hidden
    return _derive(lazy, hidden=hidden.reshape(*sizes[:-1], hidden.shape[-1]), view=True)


@_handles(T.flatten, torch.flatten)
def _flatten(func, args, kwargs):
    lazy = args[0]
    start = _dim(lazy, args[1] if len(args) > 1 else kwargs.get("start_dim", 0))
    end = _dim(lazy, args[2] if len(args) > 2 else kwargs.get("end_dim", -1))
    last = lazy.ndim - 1
    if end == last and start != last:
        return NotImplemented
    return _derive(lazy, hidden=lazy._lv_hidden.flatten(start, end), view=True)


@_handles(T.unflatten, torch.unflatten)
def _unflatten(func, args, kwargs):
    lazy, dim, sizes = args[0], _dim(args[0], args[1]), args[2]
    if dim == lazy.ndim - 1:
        return NotImplemented
    return _derive(lazy, hidden=lazy._lv_hidden.unflatten(dim, sizes), view=True)


@_handles(T.unsqueeze, torch.unsqueeze)
def _unsqueeze(func, args, kwargs):
    lazy = args[0]
    dim = _dim(lazy, args[1] if len(args) > 1 else kwargs["dim"], extra=1)
    if dim == lazy.ndim:
        return NotImplemented
    return _derive(lazy, hidden=lazy._lv_hidden.unsqueeze(dim), view=True)


@_handles(T.squeeze, torch.squeeze)
def _squeeze(func, args, kwargs):
    lazy = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    last = lazy.ndim - 1
    dims = range(lazy.ndim) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    dims = [d for d in (_dim(lazy, d) for d in dims) if lazy.shape[d] == 1]
    if last in dims:
        return NotImplemented
    return _derive(lazy, hidden=lazy._lv_hidden.squeeze(tuple(dims)) if dims else lazy._lv_hidden, view=True)


@_handles(T.transpose, torch.transpose, T.swapaxes, T.swapdims, torch.swapaxes, torch.swapdims)
def _transpose(func, args, kwargs):
    lazy = args[0]
    d0, d1 = _dim(lazy, args[1]), _dim(lazy, args[2])
    last = lazy.ndim - 1
    if d0 != d1 and last in (d0, d1):
        return NotImplemented
    return _derive(lazy, hidden=lazy._lv_hidden.transpose(d0, d1), view=True)


@_handles(T.permute, torch.permute)
def _permute(func, args, kwargs):
    lazy = args[0]
    dims = [_dim(lazy, d) for d in _sizes(args[1:] or (kwargs.get("dims"),))]
    if dims[-1] != lazy.ndim - 1:
        return NotImplemented
    return _derive(lazy, hidden=lazy._lv_hidden.permute(*dims), view=True)


@_handles(T.contiguous)
def _contiguous(func, args, kwargs):
    return args[0]  # real logits are contiguous: torch returns the tensor itself


@_handles(T.clone, torch.clone)
def _clone(func, args, kwargs):
    return _derive(args[0])


@_handles(T.detach, torch.detach)
def _detach(func, args, kwargs):
    lazy = args[0]
    return _derive(lazy, op=TapeOp((("detach", None),), func, (_SELF,), {}), view=True)


@_handles(T.split, torch.split, T.chunk, torch.chunk, T.unbind, torch.unbind, T.tensor_split, torch.tensor_split)
def _split(func, args, kwargs):
    lazy = args[0]
    kwargs = dict(kwargs)
    dim_pos = 1 if func in (T.unbind, torch.unbind) else 2
    dim = args[dim_pos] if len(args) > dim_pos else kwargs.pop("dim", 0)
    dim = _dim(lazy, dim)
    if dim == lazy.ndim - 1:
        return NotImplemented
    parts = func(lazy._lv_hidden, *args[1:dim_pos], dim, **kwargs)
    return tuple(_derive(lazy, hidden=h, rows_full=False, view=True) for h in parts)


def _cast(lazy, func, args, kwargs, dtype, device=None):
    if device is not None and torch.device(device) != lazy.device:
        return NotImplemented
    if dtype is None or dtype == lazy.dtype:
        return lazy
    if not dtype.is_floating_point:
        return NotImplemented
    return _derive(lazy, op=TapeOp((("cast", dtype),), func, (_SELF, *args[1:]), kwargs), dtype=dtype)


_CAST_METHODS = {T.float: torch.float32, T.double: torch.float64, T.half: torch.float16, T.bfloat16: torch.bfloat16}


@_handles(*_CAST_METHODS)
def _cast_method(func, args, kwargs):
    return _cast(args[0], func, args, kwargs, _CAST_METHODS[func])


@_handles(T.to)
def _to(func, args, kwargs):
    if any(isinstance(a, LazyLogits) for a in args[1:]):
        return NotImplemented
    if len(args) > 1 and torch.is_tensor(args[1]):
        return _cast(args[0], func, args, kwargs, args[1].dtype, args[1].device)
    device, dtype, _, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
    if kwargs.get("copy"):
        return NotImplemented
    return _cast(args[0], func, args, kwargs, dtype, device)


@_handles(T.type_as)
def _type_as(func, args, kwargs):
    return _cast(args[0], func, args, kwargs, args[1].dtype, args[1].device)


@_handles(T.type)
def _type(func, args, kwargs):
    dtype = args[1] if len(args) > 1 else kwargs.get("dtype")
    return _cast(args[0], func, args, kwargs, dtype) if isinstance(dtype, torch.dtype) else NotImplemented


@_handles(T.__getitem__)
def _getitem(func, args, kwargs):
    lazy, index = args
    entries = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(e, (bool, LazyLogits)) for e in entries) or sum(e is Ellipsis for e in entries) > 1:
        return NotImplemented

    def width(e):
        if e is None:
            return 0
        if torch.is_tensor(e) and e.dtype in (torch.bool, torch.uint8):
            return e.ndim
        return 1

    if Ellipsis in entries:
        at = entries.index(Ellipsis)
        fill = lazy.ndim - sum(width(e) for e in entries if e is not Ellipsis)
        entries[at:at + 1] = [slice(None)] * fill
    leading, dim, vocab = [], 0, slice(None)
    for e in entries:
        if dim == lazy.ndim - 1 and e is not None:
            if not isinstance(e, slice):
                return NotImplemented
            vocab = e
            dim += 1
            continue
        if dim >= lazy.ndim or dim + width(e) > lazy.ndim - 1:
            return NotImplemented  # reaches past the vocabulary, or a mask over it
        leading.append(e)
        dim += width(e)
    hidden = lazy._lv_hidden[(*leading, slice(None))] if leading else lazy._lv_hidden
    full = all(isinstance(e, slice) and e == slice(None) for e in leading)
    if vocab == slice(None):
        return _derive(lazy, hidden=hidden, rows_full=full, view=True)
    size = len(range(lazy._lv_vocab)[vocab])
    if vocab.step is not None and vocab.step < 1:
        return NotImplemented
    op = TapeOp((("vocab", vocab),), T.__getitem__, (_SELF, (Ellipsis, vocab)), {})
    return _derive(lazy, hidden=hidden, op=op, vocab=size, rows_full=full, view=True)


# Elementwise ops the fused form can express.


def _as_scalar(x):
    """x as a scale or addend the fused form can take: a real number or a 0-dim tensor, else None."""
    if isinstance(x, (bool, LazyLogits)):
        return None
    if isinstance(x, numbers.Real):
        return x
    if torch.is_tensor(x) and x.numel() == 1 and x.ndim == 0 and not x.is_complex():
        return x
    return None


def _as_addend(lazy, x):
    """x as an addend: a scalar, or a (V,) vector when x broadcasts over the rows only."""
    scalar = _as_scalar(x)
    if scalar is not None:
        return scalar
    if (torch.is_tensor(x) and not isinstance(x, LazyLogits) and x.ndim > 0 and not x.is_complex()
            and x.shape[-1] == lazy._lv_vocab and all(s == 1 for s in x.shape[:-1])):
        return x.reshape(-1)
    return None


_FLOAT_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _result_dtype(lazy, other, inplace: bool):
    """torch's type promotion for ``lazy OP other`` (written out: Dynamo cannot trace torch.result_type)."""
    if inplace or not torch.is_tensor(other) or other.ndim == 0 or not other.dtype.is_floating_point:
        return lazy.dtype  # numbers and 0-dim tensors of the same category do not promote a float tensor
    a, b = lazy.dtype, other.dtype
    if a == b:
        return a
    if _FLOAT_RANK.get(a) == _FLOAT_RANK.get(b) == 1:
        return torch.float32
    return a if _FLOAT_RANK.get(a, 0) >= _FLOAT_RANK.get(b, 0) else b


def _binary(func, args, kwargs, kind, *, inplace=False, divide=False, subtract=False, reflected=False):
    """``lazy * s``, ``lazy / s``, ``lazy + alpha * c``, ``lazy - alpha * c``, ``c - alpha * lazy`` and the
    commuted forms. ``reflected``: the op computes ``other OP lazy`` although the lazy tensor comes first
    (``__rsub__``, ``torch.rsub``)."""
    if len(args) != 2 or set(kwargs) - {"alpha", "rounding_mode"} or kwargs.get("rounding_mode") is not None:
        return NotImplemented
    positions = [i for i, a in enumerate(args) if isinstance(a, LazyLogits)]
    if len(positions) != 1:
        return NotImplemented
    lazy, other = args[positions[0]], args[1 - positions[0]]
    lazy_first = positions[0] == 0 and not reflected
    if kind == "scale":
        value = _as_scalar(other)
        if value is None or (divide and not lazy_first):
            return NotImplemented
        if divide:
            value = value.reciprocal() if torch.is_tensor(value) else 1.0 / value
        effects = (("scale", value),)
    else:
        value = _as_addend(lazy, other)
        if value is None:
            return NotImplemented
        sign = -kwargs.get("alpha", 1) if subtract else kwargs.get("alpha", 1)
        if lazy_first:
            effects = (("add", value * sign if sign != 1 else value),)
        else:
            effects = ((("scale", sign),) if sign != 1 else ()) + (("add", value),)
    dtype = _result_dtype(lazy, other, inplace)
    if dtype is None:
        return NotImplemented
    op = TapeOp(effects, func, tuple(_SELF if a is lazy else a for a in args), kwargs)
    if inplace:
        return _record_inplace(lazy, op)
    extra = other.ndim - lazy.ndim if torch.is_tensor(other) else 0
    if extra > 0:  # broadcasting against (1, ..., 1, V) adds leading unit dimensions
        hidden = lazy._lv_hidden.reshape((1,) * extra + tuple(lazy._lv_hidden.shape))
        return _derive(lazy, hidden=hidden, op=op, dtype=dtype)
    return _derive(lazy, op=op, dtype=dtype)


def _register_binary(funcs, kind, **flags):
    for f in funcs:
        _HANDLERS[f] = lambda func, args, kwargs, _kind=kind, _flags=flags: _binary(func, args, kwargs, _kind,
                                                                                    **_flags)


_register_binary([T.mul, T.__mul__, T.__rmul__, torch.mul, torch.multiply, T.multiply], "scale")
_register_binary([T.mul_, T.__imul__, T.multiply_], "scale", inplace=True)
_register_binary([T.div, T.__truediv__, T.__div__, torch.div, torch.divide, torch.true_divide, T.divide,
                  T.true_divide], "scale", divide=True)
_register_binary([T.div_, T.__itruediv__, T.divide_, T.true_divide_], "scale", divide=True, inplace=True)
_register_binary([T.add, T.__add__, T.__radd__, torch.add], "add")
_register_binary([T.add_, T.__iadd__], "add", inplace=True)
_register_binary([T.sub, T.__sub__, torch.sub, torch.subtract, T.subtract], "add", subtract=True)
_register_binary([T.sub_, T.__isub__, T.subtract_], "add", subtract=True, inplace=True)
_register_binary([T.__rsub__, torch.rsub], "add", subtract=True, reflected=True)


def _unary(func, args, kwargs, effect, *, inplace=False):
    if len(args) != 1 or kwargs:
        return NotImplemented
    op = TapeOp((effect,), func, (_SELF,), {})
    return _record_inplace(args[0], op) if inplace else _derive(args[0], op=op)


for _f in (T.neg, T.__neg__, torch.neg, torch.negative, T.negative):
    _HANDLERS[_f] = lambda func, args, kwargs: _unary(func, args, kwargs, ("scale", -1))
for _f in (T.neg_, T.negative_):
    _HANDLERS[_f] = lambda func, args, kwargs: _unary(func, args, kwargs, ("scale", -1), inplace=True)
for _f in (T.tanh, torch.tanh):
    _HANDLERS[_f] = lambda func, args, kwargs: _unary(func, args, kwargs, ("tanh", None))
_HANDLERS[T.tanh_] = lambda func, args, kwargs: _unary(func, args, kwargs, ("tanh", None), inplace=True)
_HANDLERS[torch.tanh_] = _HANDLERS[T.tanh_]


# ---------------------------------------------------------------------------------------------------------------
# Ops the fused core computes.


def _bind(args, kwargs, names, defaults):
    values = dict(zip(names, args, strict=False))
    for name in names[len(args):]:
        values[name] = kwargs.get(name, defaults.get(name))
    return values


_CE_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")


@_handles(F.cross_entropy)
def _cross_entropy(func, args, kwargs):
    a = _bind(args, kwargs, _CE_ARGS, dict(ignore_index=-100, reduction="mean", label_smoothing=0.0))
    lazy, target = a["input"], a["target"]
    if (not isinstance(lazy, LazyLogits) or isinstance(target, LazyLogits) or a["weight"] is not None
            or a["size_average"] is not None or a["reduce"] is not None or lazy.ndim != 2
            or not torch.is_tensor(target) or target.dtype not in (torch.int64, torch.int32)
            or tuple(target.shape) != tuple(lazy.shape[:1]) or a["reduction"] not in ("mean", "sum", "none")):
        return NotImplemented
    return lazy._lv_source.cross_entropy(lazy, target, int(a["ignore_index"]), float(a["label_smoothing"]),
                                         a["reduction"])


def _last_dim(lazy, dim) -> bool:
    if isinstance(dim, (list, tuple)):
        if len(dim) != 1:
            return False
        dim = dim[0]
    return isinstance(dim, int) and _dim(lazy, dim) == lazy.ndim - 1


@_handles(torch.logsumexp, T.logsumexp)
def _logsumexp(func, args, kwargs):
    a = _bind(args, kwargs, ("input", "dim", "keepdim"), dict(keepdim=False))
    lazy = a["input"]
    if not isinstance(lazy, LazyLogits) or not _last_dim(lazy, a["dim"]) or "out" in kwargs:
        return NotImplemented
    lse = lazy._lv_source.logsumexp(lazy)
    return lse.unsqueeze(-1) if a["keepdim"] else lse


@_handles(torch.argmax, T.argmax)
def _argmax(func, args, kwargs):
    a = _bind(args, kwargs, ("input", "dim", "keepdim"), dict(keepdim=False))
    lazy = a["input"]
    if not isinstance(lazy, LazyLogits) or a["dim"] is None or not _last_dim(lazy, a["dim"]) or "out" in kwargs:
        return NotImplemented
    index = lazy._lv_source.argmax(lazy)
    return index.unsqueeze(-1) if a["keepdim"] else index
