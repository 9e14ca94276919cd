"""The handlers of :class:`LazyLogits`: row ops, recordable elementwise ops and the ops the fused core computes.

Each handler takes ``(func, args, kwargs)`` and returns the result, or ``NotImplemented`` to have the logits
materialised (see ``_lazy.py`` for the rules).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from ._lazy import _HANDLERS, _SELF, LazyLogits, TapeOp, UnsupportedModelError, _derive, _handles, _record_inplace

T = torch.Tensor


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


def _is_fsdp_pre_backward(hook) -> bool:
    """FSDP2's ``FSDPState._pre_backward`` or FSDP1's ``partial(_pre_backward_hook, ...)``: hooks that gather a
    module's parameters before its backward, which the request's answer gets as well (see ``_head.py``)."""
    func = getattr(hook, "func", hook)  # functools.partial
    func = getattr(func, "__func__", func)  # bound method
    return (getattr(func, "__module__", "").startswith("torch.distributed.fsdp.")
            and getattr(func, "__name__", None) in ("_pre_backward", "_pre_backward_hook"))


@_handles(T.register_hook)
def _register_hook(func, args, kwargs):
    hook = args[1] if len(args) > 1 else kwargs.get("hook")
    if not _is_fsdp_pre_backward(hook):
        raise UnsupportedModelError(
            f"a gradient hook ({getattr(hook, '__qualname__', type(hook).__name__)}) on lazy logits would never run: "
            "the fused loss computes no gradient of the logits; register it elsewhere, or undo the largevocab patch "
            "for this model")
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)  # on the placeholder, where it never fires


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
