"""LazyLogits: every op a model can write on its logits is reproduced exactly (fused or materialised) or refused.

A toy model applies a *program* of logit ops, each drawn from several written forms, and a loss *ending*; hypothesis
composes them. Patched and unpatched losses and gradients (hidden states, head weight and bias, learnable scale and
additive parameters) must agree, in float64, and the patched run must have fused the ops the core computes."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from largevocab.integrations.hf import LAST_REPORT, UnsupportedModelError, patch
from largevocab.integrations.hf._patch import _WARNED

B, T, D, V = 2, 5, 8, 13
CAP = 2.5


def _scale(form):
    return {
        "mul": lambda m, x: x * 1.7, "rmul": lambda m, x: 0.6 * x, "method": lambda m, x: x.mul(1.3),
        "torch": lambda m, x: torch.mul(x, torch.tensor(0.8, dtype=x.dtype)), "div": lambda m, x: x / 3.0,
        "divide": lambda m, x: torch.div(x, 2.0), "neg": lambda m, x: -x, "param": lambda m, x: x * m.scale,
        "param_div": lambda m, x: x / m.scale, "inplace": lambda m, x: x.clone().mul_(1.5),
        "inplace_div": lambda m, x: _idiv(x.clone(), 2.0),
    }[form]


def _idiv(x, s):
    x /= s
    return x


def _add(form):
    return {
        "add": lambda m, x: x + 0.75, "radd": lambda m, x: -1.5 + x, "sub": lambda m, x: x - 2.0,
        "rsub": lambda m, x: 3.0 - x, "vector": lambda m, x: x + m.extra, "vector_sub": lambda m, x: x.sub(m.extra),
        "alpha": lambda m, x: torch.add(x, m.extra, alpha=2.0), "rsub_torch": lambda m, x: torch.rsub(x, 1.0),
        "sub_tensor": lambda m, x: torch.sub(torch.tensor(0.5, dtype=x.dtype), x),
        "row_vector": lambda m, x: x + m.extra.view(1, 1, -1),
    }[form]


def _softcap(form):
    return {
        "cap_tanh": lambda m, x: CAP * torch.tanh(x / CAP), "tanh_cap": lambda m, x: torch.tanh(x / CAP) * CAP,
        "chained": lambda m, x: x.div(CAP).tanh().mul(CAP), "functional": lambda m, x: F.tanh(x / CAP) * CAP,
        "inplace": lambda m, x: _inplace_cap(x), "negative": lambda m, x: -CAP * torch.tanh(x / CAP),
        "reciprocal": lambda m, x: torch.tanh(x * (1 / CAP)) * CAP,
    }[form]


def _inplace_cap(x):
    x = x / CAP
    x.tanh_()
    return x * CAP


def _cast(form):
    return {
        "float": lambda m, x: x.float(), "to": lambda m, x: x.to(torch.float64), "double": lambda m, x: x.double(),
        "type": lambda m, x: x.type(torch.float64), "to_kw": lambda m, x: x.to(dtype=torch.float64),
        "type_as": lambda m, x: x.type_as(m.extra), "same": lambda m, x: x.to(x.dtype),
    }[form]


def _rows(form):
    return {
        "tail": lambda m, x: x[:, 1:], "keep": lambda m, x: x[:, -3:], "ellipsis": lambda m, x: x[..., :],
        "view": lambda m, x: x.view(-1, x.shape[-1]), "reshape": lambda m, x: x.reshape(B * T, x.shape[-1]),
        "flatten": lambda m, x: x.flatten(0, -2), "transpose": lambda m, x: x.transpose(0, -2),
        "unsqueeze": lambda m, x: x.unsqueeze(0), "contiguous": lambda m, x: x.contiguous(),
        "mask": lambda m, x: x[torch.ones(x.shape[:-1], dtype=torch.bool).tril()],
        "index": lambda m, x: x[torch.tensor([1, 0, 1])], "split": lambda m, x: x.split(1, dim=0)[-1],
    }[form]


def _vocab(form):
    return {"head": lambda m, x: x[..., :-3], "tail": lambda m, x: x[:, :, 2:], "step": lambda m, x: x[..., ::2]}[form]


class PreBackwardFunctionForModule(torch.autograd.Function):
    """What DeepSpeed ZeRO-3 applies to every module output: forward ``detach``, backward the identity (plus its
    parameter gather); named as DeepSpeed's, which the patch recognises."""

    @staticmethod
    def forward(x):
        return x.detach()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


PreBackwardFunctionForModule.__module__ = "deepspeed.runtime.zero.parameter_offload"


def _no_grad(f):
    with torch.no_grad():
        return f()


def _autograd(form):
    return {
        "detach": lambda m, x: x.detach(), "no_grad": lambda m, x: _no_grad(lambda: x * 1.25),
        "zero3": lambda m, x: PreBackwardFunctionForModule.apply(x),
    }[form]


OPS = {"scale": _scale, "add": _add, "softcap": _softcap, "cast": _cast, "rows": _rows, "vocab": _vocab,
       "autograd": _autograd}
FORMS = {
    "scale": ["mul", "rmul", "method", "torch", "div", "divide", "neg", "param", "param_div", "inplace",
              "inplace_div"],
    "add": ["add", "radd", "sub", "rsub", "vector", "vector_sub", "alpha", "rsub_torch", "sub_tensor", "row_vector"],
    "softcap": ["cap_tanh", "tanh_cap", "chained", "functional", "inplace", "negative", "reciprocal"],
    "cast": ["float", "to", "double", "type", "to_kw", "type_as", "same"],
    "rows": ["tail", "keep", "ellipsis", "view", "reshape", "flatten", "transpose", "unsqueeze", "contiguous",
             "mask", "index", "split"],
    "vocab": ["head", "tail", "step"],
    "autograd": ["detach", "no_grad", "zero3"],
}


def _targets(x, ignore_every=4):
    n = x.numel() // x.shape[-1]
    gen = torch.Generator().manual_seed(n)
    t = torch.randint(0, x.shape[-1], (n,), generator=gen)
    t[::ignore_every] = -100
    return t


def _ending(name, reduction="mean", smoothing=0.0):
    def ce(m, x):
        return F.cross_entropy(x.reshape(-1, x.shape[-1]), _targets(x), reduction=reduction,
                               label_smoothing=smoothing)

    return {
        "ce": lambda m, x: ce(m, x).sum(),
        "ce_module": lambda m, x: torch.nn.CrossEntropyLoss(reduction=reduction)(
            x.reshape(-1, x.shape[-1]), _targets(x)).sum(),
        "z_loss": lambda m, x: ce(m, x).sum() + 0.1 * torch.logsumexp(x, dim=-1).pow(2).mean(),
        "lse": lambda m, x: x.logsumexp(-1, keepdim=True).sum(),
        "accuracy": lambda m, x: ce(m, x).sum() + (x.argmax(-1) == 3).sum() * 0.0,
        "softmax": lambda m, x: F.log_softmax(x, dim=-1).sum(),
        "max": lambda m, x: x.max(dim=-1).values.sum(),
    }[name]


class Toy(torch.nn.Module):
    def __init__(self, program, ending, bias=True, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.lm_head = torch.nn.Linear(D, V, bias=bias, dtype=dtype)
        with torch.no_grad():
            self.lm_head.weight.mul_(4.0)
        self.scale = torch.nn.Parameter(torch.tensor(0.7, dtype=dtype))
        self.extra = torch.nn.Parameter(torch.randn(V, dtype=dtype))
        self.program, self.ending = program, ending

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, hidden, labels=None):
        logits = self.lm_head(hidden)
        for op in self.program:
            logits = op(self, logits)
        return self.ending(self, logits), logits


def _run(model, hidden):
    loss, logits = model(hidden, labels=True)
    params = [hidden, *model.parameters()]
    if not loss.requires_grad:  # e.g. detached logits and nothing learnable after them
        return loss.detach(), [torch.zeros_like(p) for p in params], logits, False
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return loss.detach(), grads, logits, True


def _compare(program, ending, bias=True, materialize="warn", tol=1e-10):
    model = Toy(program, ending, bias)
    hidden = torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    try:
        want = _run(model, hidden)
    except (RuntimeError, IndexError, ValueError):
        assume(False)  # a program the unpatched model rejects too
    handle = patch(model, backend="torch", materialize=materialize)
    _WARNED.clear()  # the materialisation warning is once per model class and op
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _run(model, hidden)
    finally:
        handle.undo()
    report = LAST_REPORT[0]
    assert report.head_calls == 1 and (got[2] is None or report.materialised)  # lazy logits never escape
    assert got[3] == want[3], "the loss has a graph patched iff it has one unpatched"
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol, equal_nan=True)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * (1 + float(w.abs().max())))
    return report, caught


def _op(kind, form):
    return OPS[kind](form)


PROGRAM = st.lists(st.sampled_from([(k, f) for k, forms in FORMS.items() for f in forms]), max_size=4)
FUSED_ENDINGS = st.sampled_from(["ce", "ce_module", "z_loss", "lse", "accuracy"])


def _representable(program) -> bool:
    """The fused form ``post * tanh(scale * z + add)``: one soft cap at most, and after it only numeric scales."""
    kinds = [k for k, _ in program]
    if kinds.count("softcap") > 1:
        return False
    after = program[kinds.index("softcap") + 1:] if "softcap" in kinds else []
    return all(k not in ("add", "scale") or (k == "scale" and f not in ("torch", "param", "param_div"))
               for k, f in after)


@settings(max_examples=120, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(program=PROGRAM, ending=FUSED_ENDINGS, reduction=st.sampled_from(["mean", "sum", "none"]),
       smoothing=st.sampled_from([0.0, 0.1]), bias=st.booleans())
def test_programs_of_logit_ops_match_unpatched(program, ending, reduction, smoothing, bias):
    ops = [_op(k, f) for k, f in program]
    casts32 = any(f == "float" for k, f in program if k == "cast")
    report, caught = _compare(ops, _ending(ending, reduction, smoothing), bias, tol=1e-5 if casts32 else 1e-10)
    representable = _representable(program)
    if representable:  # one soft cap at most, nothing additive or learnable after it: fused, nothing materialised
        assert not report.materialised, (program, report)
        assert set(report.served) >= ({"cross_entropy"} if ending != "lse" else {"logsumexp"}), report
    else:
        assert report.materialised and any("materialised" in str(w.message) for w in caught), report


@pytest.mark.parametrize("ending", ["softmax", "max"])
def test_other_ops_materialise_exactly_with_one_warning(ending):
    report, caught = _compare([_softcap("cap_tanh")], _ending(ending))
    assert report.materialised and len([w for w in caught if "materialised" in str(w.message)]) <= 1
    with pytest.raises(UnsupportedModelError, match="materialize=.warn.. allows it"):
        _compare([_softcap("cap_tanh")], _ending(ending), materialize="error")


def test_cross_entropy_forms_the_core_does_not_take_materialise():
    weight = torch.rand(V, dtype=torch.float64) + 0.5
    for ending in (lambda m, x: F.cross_entropy(x.reshape(-1, V), _targets(x), weight=weight),
                   lambda m, x: F.cross_entropy(x.transpose(1, 2), _targets(x).view(B, T).clamp(min=0)),
                   lambda m, x: F.cross_entropy(x.reshape(-1, V), F.one_hot(_targets(x).clamp(min=0), V).double())):
        report, _ = _compare([], ending)
        assert report.materialised == ("cross_entropy",) or report.materialised, report


def test_mean_over_no_targets_is_nan_like_torch():
    ending = lambda m, x: F.cross_entropy(x.reshape(-1, V), torch.full((B * T,), -100))  # noqa: E731
    model = Toy([], ending)
    hidden = torch.randn(B, T, D, dtype=torch.float64)
    want = model(hidden)[0]
    patch(model, backend="torch")
    assert torch.isnan(want) and torch.isnan(model(hidden, labels=True)[0])


def test_argmax_is_served_and_equal():
    got = {}
    ending = lambda m, x: (got.setdefault("argmax", []).append(x.argmax(dim=-1, keepdim=True)), x.logsumexp(-1).sum())[1]  # noqa: E731, E501
    model = Toy([_add("vector"), _softcap("cap_tanh")], ending)
    hidden = torch.randn(B, T, D, dtype=torch.float64)
    model(hidden)
    patch(model, backend="torch", materialize="error")
    model(hidden, labels=True)
    assert torch.equal(got["argmax"][0], got["argmax"][1]) and "argmax" in LAST_REPORT[0].served


def test_detach_keeps_the_gradient_of_what_comes_after_it():
    """``logits.detach() * scale + extra``: the head and hidden states get no gradient, the learnable scale and
    additive vector do (a fused form where the detach sits between the head and the operands)."""
    report, _ = _compare([_autograd("detach"), _scale("param"), _add("vector")], _ending("ce"))
    assert report.served == ("cross_entropy",) and not report.materialised


def test_deepspeed_zero3_identity_function_on_the_logits_is_fused():
    """ZeRO-3's output Function (forward ``detach``, backward identity), then a learnable scale: fused, and the
    head, hidden states and scale get the unpatched gradients."""
    report, _ = _compare([_autograd("zero3"), _scale("param"), _autograd("zero3")], _ending("z_loss"))
    assert set(report.served) == {"cross_entropy", "logsumexp"} and not report.materialised


class ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(x, materialise):
        return torch.cos(x).acos() if materialise else x * 1.0  # cos: not recordable, so it materialises

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad * 0.5, None


def test_what_acts_on_the_logits_gradient_is_refused():
    """The fused loss has no gradient of the logits: a gradient hook on them, or a custom autograd Function applied to
    them (other than DeepSpeed ZeRO-3's identity), would be skipped, so they raise instead."""
    def hook(m, x):
        x.register_hook(lambda grad: grad * 0.5)
        return x

    hidden = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    for op in (hook, lambda m, x: ScaleGradient.apply(x, False), lambda m, x: ScaleGradient.apply(x, True)):
        model = Toy([op], _ending("ce"))
        model(hidden, labels=True)[0].backward()  # unpatched: runs
        patch(model, backend="torch")
        refused = pytest.raises(UnsupportedModelError, match="gradient hook|Function ScaleGradient|gradient reached")
        with refused, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the materialisation warning
            model(hidden, labels=True)[0].backward()


def test_in_place_ops_that_cannot_be_recorded_are_refused():
    def on_view(m, x):
        v = x[:, :2]
        v.mul_(2.0)
        return F.cross_entropy(x.reshape(-1, V), _targets(x))

    def clamp(m, x):
        x.clamp_(-1.0, 1.0)
        return F.cross_entropy(x.reshape(-1, V), _targets(x))

    def setitem(m, x):
        x[..., 0] = 0.0
        return F.cross_entropy(x.reshape(-1, V), _targets(x))

    for ending in (on_view, clamp, setitem):
        model = Toy([], ending)
        patch(model, backend="torch")
        with pytest.raises(UnsupportedModelError, match="in-place"):
            model(torch.randn(B, T, D, dtype=torch.float64), labels=True)


def test_lazy_logits_report_metadata_without_materialising():
    seen = {}

    def ending(m, x):
        seen.update(shape=tuple(x.shape), dtype=x.dtype, dim=x.dim(), size=x.size(-1), numel=x.numel(),
                    device=x.device, float=x.is_floating_point(), text=repr(x))
        return F.cross_entropy(x.view(-1, x.shape[-1]), _targets(x))

    model = Toy([_cast("float")], ending)
    patch(model, backend="torch", materialize="error")
    model(torch.randn(B, T, D, dtype=torch.float64), labels=True)
    assert seen["shape"] == (B, T, V) and seen["dtype"] == torch.float32 and seen["numel"] == B * T * V
    assert seen["dim"] == 3 and seen["size"] == V and seen["float"] and seen["text"].startswith("LazyLogits(")


def test_compiled_soft_cap_scale_and_z_loss_trace_without_graph_breaks():
    import torch._dynamo

    targets = torch.randint(0, V, (B * T,), generator=torch.Generator().manual_seed(3))
    targets[::4] = -100

    def z_loss(m, x):  # targets made outside: a generator inside the traced code is a graph break of its own
        return F.cross_entropy(x.reshape(-1, V), targets) + 0.1 * torch.logsumexp(x, dim=-1).pow(2).mean()

    program = [_scale("div"), _softcap("tanh_cap"), _cast("float"), _rows("view")]
    model = Toy(program, z_loss, dtype=torch.float32)
    hidden = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2), requires_grad=True)
    want = _run(model, hidden)
    patch(model, backend="torch", materialize="error")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda h: model(h, labels=True)[0])(hidden)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss = compiled(hidden, labels=True)[0]
    grads = torch.autograd.grad(loss, [hidden, *model.parameters()], allow_unused=True)
    torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(grads, want[1], strict=True):
        torch.testing.assert_close(torch.zeros_like(w) if g is None else g, w, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
