"""Bad inputs raise clear errors; edge cases (empty, all ignored, NaN, autocast) behave like torch or better."""

import math

import pytest
import torch

import largevocab as lv

from reference import reference_loss

BACKENDS = ["torch", "triton"]


def small(n=13, d=8, v=29, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, d, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, d, generator=gen, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, targets


BAD_CALLS = [
    ("target above V", lambda h, w, y: lv.linear_cross_entropy(h, w, torch.full_like(y, 29)), ValueError, "29"),
    ("negative target", lambda h, w, y: lv.linear_cross_entropy(h, w, torch.full_like(y, -1)), ValueError, "-1"),
    ("float targets", lambda h, w, y: lv.linear_cross_entropy(h, w, y.float()), TypeError, "integer"),
    ("bool targets", lambda h, w, y: lv.linear_cross_entropy(h, w, y > 3), TypeError, "integer"),
    ("D mismatch", lambda h, w, y: lv.linear_cross_entropy(h[:, :5], w, y), ValueError, "D"),
    ("targets shape", lambda h, w, y: lv.linear_cross_entropy(h, w, y[:-1]), ValueError, "targets shape"),
    ("weight not 2-D", lambda h, w, y: lv.linear_cross_entropy(h, w[0], y), ValueError, "2-D"),
    ("bias length", lambda h, w, y: lv.linear_cross_entropy(h, w, y, bias=torch.zeros(28)), ValueError, "bias"),
    ("bias dtype", lambda h, w, y: lv.linear_cross_entropy(h, w, y, bias=torch.zeros(29, dtype=torch.float64)),
     TypeError, "bias"),
    ("dtype mismatch", lambda h, w, y: lv.linear_cross_entropy(h.double(), w, y), TypeError, "same dtype"),
    ("int hidden", lambda h, w, y: lv.linear_cross_entropy(y[:, None].expand(-1, 8), w, y), TypeError, "hidden"),
    ("reduction", lambda h, w, y: lv.linear_cross_entropy(h, w, y, reduction="avg"), ValueError, "avg"),
    ("backend", lambda h, w, y: lv.linear_cross_entropy(h, w, y, backend="cuda"), ValueError, "cuda"),
    ("smoothing < 0", lambda h, w, y: lv.linear_cross_entropy(h, w, y, label_smoothing=-0.1), ValueError, "-0.1"),
    ("smoothing > 1", lambda h, w, y: lv.linear_cross_entropy(h, w, y, label_smoothing=1.5), ValueError, "1.5"),
    ("softcap 0", lambda h, w, y: lv.linear_cross_entropy(h, w, y, softcap=0.0), ValueError, "softcap"),
    ("softcap < 0", lambda h, w, y: lv.linear_cross_entropy(h, w, y, softcap=-2.0), ValueError, "-2.0"),
    ("z_loss < 0", lambda h, w, y: lv.linear_cross_entropy(h, w, y, z_loss=-1.0), ValueError, "z_loss"),
    ("shift < 0", lambda h, w, y: lv.linear_cross_entropy(h, w, y, shift=-1), ValueError, "-1"),
    ("shift >= T", lambda h, w, y: lv.linear_cross_entropy(h, w, y, shift=13), ValueError, "13"),
    ("float shift", lambda h, w, y: lv.linear_cross_entropy(h, w, y, shift=1.0), TypeError, "shift"),
    ("filter_eps str", lambda h, w, y: lv.linear_cross_entropy(h, w, y, filter_eps="high"), ValueError, "high"),
    ("filter_eps <= 0", lambda h, w, y: lv.linear_cross_entropy(h, w, y, filter_eps=0.0), ValueError, "filter_eps"),
    ("ignore_index float", lambda h, w, y: lv.linear_cross_entropy(h, w, y, ignore_index=-1.5), TypeError,
     "ignore_index"),
    ("empty vocabulary", lambda h, w, y: lv.linear_cross_entropy(h, w[:0], y), ValueError, "V = 0"),
    ("not a tensor", lambda h, w, y: lv.linear_cross_entropy(h.tolist(), w, y), TypeError, "hidden"),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_a_clear_error(case):
    # Inputs are checked before a backend is chosen, so one run covers both backends.
    _, call, error, fragment = case
    hidden, weight, targets = small()
    with pytest.raises(error) as info:
        call(hidden, weight, targets)
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("kwargs", [dict(reduction="max"), dict(softcap=-1.0), dict(shift=-2), dict(filter_eps="x")])
def test_module_validates_options_at_construction(kwargs):
    with pytest.raises(ValueError):
        lv.LinearCrossEntropyLoss(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_equals_function(backend):
    hidden, weight, targets = small()
    bias = torch.randn(29, requires_grad=True)
    opts = dict(ignore_index=2, reduction="sum", label_smoothing=0.1, z_loss=0.01, softcap=3.0, shift=1,
                filter_eps=None, backend=backend)
    module = lv.LinearCrossEntropyLoss(**opts)
    assert torch.equal(module(hidden, weight, targets, bias), lv.linear_cross_entropy(hidden, weight, targets,
                                                                                        bias=bias, **opts))
    assert "softcap=3.0" in repr(module)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_input(backend, reduction):
    hidden, weight, _ = small(n=0)
    targets = torch.zeros(0, dtype=torch.long)
    loss = lv.linear_cross_entropy(hidden, weight, targets, reduction=reduction, backend=backend)
    if reduction == "none":
        assert loss.shape == (0,)
    else:
        assert loss.shape == () and loss.item() == 0.0
        loss.backward()
        assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored_gives_zero_not_nan(backend):
    hidden, weight, targets = small()
    loss = lv.linear_cross_entropy(hidden, weight, torch.full_like(targets, -100), backend=backend)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_like_torch(backend):
    hidden, weight, targets = small()
    with torch.no_grad():
        hidden[3, 0] = math.nan
    per_token = lv.linear_cross_entropy(hidden, weight, targets, reduction="none", backend=backend)
    ref = reference_loss(hidden, weight, targets, reduction="none", dtype=torch.float32)
    assert torch.equal(torch.isnan(per_token), torch.isnan(ref))
    assert torch.isnan(lv.linear_cross_entropy(hidden, weight, targets, backend=backend))


def test_auto_backend_uses_torch_on_cpu(monkeypatch):
    from largevocab.ops import torch_ce, triton_ce

    hidden, weight, targets = small()
    calls = []
    real = torch_ce.forward
    monkeypatch.setattr(torch_ce, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(triton_ce, "forward", lambda *a, **k: pytest.fail("auto chose triton on the CPU"))
    lv.linear_cross_entropy(hidden, weight, targets)
    assert calls == [1]


def test_triton_backend_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    from largevocab.ops import triton_ce

    monkeypatch.setattr(triton_ce, "INTERPRET", False)
    hidden, weight, targets = small()
    with pytest.raises(ValueError, match="CUDA"):
        lv.linear_cross_entropy(hidden, weight, targets, backend="triton")


@pytest.mark.parametrize(("triton_version", "numpy_version", "broken"), [
    ("3.6.0", "2.4.6", True), ("3.6.1+git1a2b3c", "2.5.0rc1", True), ("3.6.0", "2.3.5", False),
    ("3.7.1", "2.4.6", False), ("3.9.0", "2.4.6", False),
])
def test_interpreter_problem_names_the_broken_pair(triton_version, numpy_version, broken):
    from largevocab.ops.triton_ce import interpreter_problem

    problem = interpreter_problem(triton_version, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert triton_version in problem and numpy_version in problem and "numpy<2.4" in problem


def test_triton_backend_on_the_interpreter_explains_a_broken_triton_numpy_pair(monkeypatch):
    """Triton 3.6's interpreter with NumPy >= 2.4 gets a RuntimeError that says what to install, not an
    InterpreterError from inside a kernel."""
    from largevocab.ops import triton_ce

    monkeypatch.setattr(triton_ce, "INTERPRET", True)
    monkeypatch.setattr(triton_ce, "interpreter_problem",
                        lambda *a, _real=triton_ce.interpreter_problem: _real("3.6.0", "2.4.6"))
    hidden, weight, targets = small()
    with pytest.raises(RuntimeError, match="numpy<2.4"):
        lv.linear_cross_entropy(hidden, weight, targets, backend="triton")


def test_autocast_casts_like_f_linear():
    hidden, weight, targets = small(d=16, v=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lv.linear_cross_entropy(hidden, weight, targets)
    want = reference_loss(hidden.bfloat16(), weight.bfloat16(), targets, dtype=torch.bfloat16)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=1e-2, atol=1e-2)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def test_targets_of_any_integer_dtype():
    hidden, weight, targets = small()
    ref = lv.linear_cross_entropy(hidden, weight, targets)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(lv.linear_cross_entropy(hidden, weight, targets.to(dtype)), ref)
