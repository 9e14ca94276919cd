"""Fused distillation losses (forward KL, reverse KL, JSD) against float64 references on materialised logits."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import largevocab as lv
from largevocab.ops import torch_distill, triton_distill

import posttrain_reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["torch", "triton"]
KINDS = ["forward_kl", "reverse_kl", "jsd"]
IGNORE = -100
TOL = dict(rtol=1e-9, atol=1e-11)


def make_inputs(lead=(251,), d_s=67, d_t=123, v=3001, *, dtype=torch.float64, bias=False, ignore_every=7, seed=0,
                scale=3.0, related=True):
    """Student and teacher share a part of their logits (the teacher's head starts from the student's), so the
    divergences are O(1) rather than dominated by unrelated distributions; ``related=False``: independent heads."""
    gen = torch.Generator().manual_seed(seed)
    hs = torch.randn(*lead, d_s, generator=gen, dtype=torch.float64)
    ws = torch.randn(v, d_s, generator=gen, dtype=torch.float64) * (scale / d_s**0.5)
    ht = torch.cat([hs, torch.randn(*lead, d_t - d_s, generator=gen, dtype=torch.float64)], dim=-1)
    wt = torch.cat([ws, torch.randn(v, d_t - d_s, generator=gen, dtype=torch.float64) * (scale / 1.5 / d_t**0.5)],
                   dim=-1)
    if not related:
        wt = torch.randn(v, d_t, generator=gen, dtype=torch.float64) * (scale / d_t**0.5)
    targets = torch.randint(0, v, lead, generator=gen)
    if ignore_every:
        targets.view(-1)[::ignore_every] = IGNORE
    bs = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    bt = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    student = [t.to(dtype).requires_grad_() if t is not None else None for t in (hs, ws, bs)]
    teacher = [t.to(dtype) if t is not None else None for t in (ht, wt, bt)]
    return student, teacher, targets


def loss_and_grads(fn, student, teacher, targets, upstream=None, **opts):
    hs, ws, bs = student
    ht, wt, bt = teacher
    loss = fn(hs, ws, ht, wt, targets, student_bias=bs, teacher_bias=bt, **opts)
    total = (loss * upstream).sum() if upstream is not None else loss
    params = [t for t in student if t is not None]
    return [loss.detach(), *torch.autograd.grad(total, params)]


def assert_all_close(got, want, **tol):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"output {i} (loss, dH, dW, db): {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_float64_reference(backend, kind, reduction):
    student, teacher, targets = make_inputs(lead=(3, 61), bias=True)
    upstream = torch.randn(targets.shape, dtype=torch.float64) if reduction == "none" else None
    opts = dict(kind=kind, beta=0.3, temperature=0.7, reduction=reduction)
    want = loss_and_grads(ref.distillation_loss, student, teacher, targets, upstream, **opts)
    got = loss_and_grads(lv.linear_distillation_loss, student, teacher, targets, upstream, backend=backend, **opts)
    assert got[0].dtype == torch.float64 and got[0].shape == want[0].shape
    if reduction == "none":
        assert torch.all(got[0][targets == IGNORE] == 0)
    assert_all_close(got, want, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("targets_given", [True, False])
def test_temperatures_and_optional_targets(backend, temperature, targets_given):
    student, teacher, targets = make_inputs(v=1031)
    targets = targets if targets_given else None
    for kind in KINDS:
        opts = dict(kind=kind, beta=0.6, temperature=temperature)
        want = loss_and_grads(ref.distillation_loss, student, teacher, targets, **opts)
        got = loss_and_grads(lv.linear_distillation_loss, student, teacher, targets, backend=backend, **opts)
        assert_all_close(got, want, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient_and_scaled_upstream(backend):
    student, teacher, targets = make_inputs(v=1031, bias=True)
    teacher = [t.detach().clone().requires_grad_() for t in teacher]
    loss = lv.linear_distillation_loss(*student[:2], *teacher[:2], targets, student_bias=student[2],
                                       teacher_bias=teacher[2], kind="jsd", backend=backend)
    (loss * 0.37).backward()  # the torch backend's gradients precomputed in forward, scaled by the upstream 0.37
    assert all(t.grad is None for t in teacher)
    want = ref.distillation_loss(*[t.detach().requires_grad_() for t in student[:2]], *teacher[:2], targets,
                                 kind="jsd", student_bias=student[2].detach(), teacher_bias=teacher[2])
    torch.testing.assert_close(loss, want, **TOL)
    ref_h = student[0].detach().requires_grad_()
    (ref.distillation_loss(ref_h, student[1], *teacher[:2], targets, kind="jsd", student_bias=student[2],
                           teacher_bias=teacher[2]) * 0.37).backward()
    torch.testing.assert_close(student[0].grad, ref_h.grad, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(backend, kind):
    student, teacher, targets = make_inputs(lead=(2, 5), d_s=5, d_t=7, v=23, bias=True, ignore_every=3)
    ht, wt, bt = teacher

    def fn(hs, ws, bs):
        return lv.linear_distillation_loss(hs, ws, ht, wt, targets, student_bias=bs, teacher_bias=bt, kind=kind,
                                           beta=0.4, temperature=0.8, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(student), fast_mode=backend == "triton")


def test_identical_models_have_zero_divergence_and_gradient():
    student, _, targets = make_inputs(v=1031, d_s=40, d_t=40)
    teacher = [t.detach() if t is not None else None for t in student]
    for kind in KINDS:
        for backend in BACKENDS:
            got = loss_and_grads(lv.linear_distillation_loss, student, teacher, targets, kind=kind, backend=backend,
                                 reduction="sum")
            assert abs(got[0].item()) < 1e-10 and all(g.abs().max() < 1e-12 for g in got[1:])


@pytest.mark.parametrize("splits", [1, 3, 10])
@pytest.mark.parametrize("kind", KINDS)
def test_triton_vocabulary_splits_merge(splits, kind):
    student, teacher, targets = make_inputs(bias=True)
    valid = targets != IGNORE
    opts = torch_distill.DistillOptions(kind=kind, beta=0.3, temperature=0.6, entropy=True)
    got = triton_distill.forward(*student, *teacher, valid, opts, splits=splits)
    want = torch_distill.forward(*student, *teacher, valid, opts)[:4]
    for a, b in zip(got, want, strict=True):  # divergence, student entropy, both normalisers, the backward's KL
        torch.testing.assert_close(a, b, **TOL)
    ent = ref.log_probs(student[0], student[1], targets, bias=student[2], temperature=0.6, return_entropy=True)[1]
    torch.testing.assert_close(got[1], ent, **TOL)


def test_triton_deterministic_mode_is_bitwise_reproducible():
    student, teacher, targets = make_inputs(v=1031, bias=True, dtype=torch.float32)
    opts = dict(kind="reverse_kl", temperature=0.8, backend="triton")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [loss_and_grads(lv.linear_distillation_loss, student, teacher, targets, **opts) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    atomic = loss_and_grads(lv.linear_distillation_loss, student, teacher, targets, **opts)
    assert_all_close(runs[0], atomic, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "scale"), [(torch.bfloat16, 3.0), (torch.float16, 3.0), (torch.float32, 3.0),
                                              (torch.float32, 25.0)])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_three_way(backend, dtype, scale, kind):
    """error(ours, fp64) <= 2 * error(torch at the same dtype, fp64) + small atol, loss and student gradients.

    ``scale`` 25 with unrelated heads gives logits of +-80 and KLs of ~50: there a normaliser rounded to one
    float32 number (lse instead of (max, log sum)) made the reverse-KL gradient 5x less accurate than torch's."""
    _check_three_way(backend, dtype, scale, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_three_way_at_a_large_vocabulary(kind):
    """The same rule at V = 131,072, where how a row's sums are accumulated shows: a batched BLAS dot (serial
    float32 accumulation) once biased the forward KL by 2.5e-5 relative. Torch backend only (the Triton kernels sum
    tiles; the interpreter is too slow at this V)."""
    _check_three_way("torch", torch.float32, 3.0, kind, lead=(24,), d_s=19, d_t=31, v=131_072)


def _check_three_way(backend, dtype, scale, kind, lead=(251,), d_s=67, d_t=123, v=1031):
    student, teacher, targets = make_inputs(lead, d_s, d_t, v, dtype=dtype, bias=True, scale=scale,
                                            related=scale < 10)
    opts = dict(kind=kind, beta=0.3, temperature=0.9, reduction="none")
    upstream = torch.rand(targets.shape)

    def as64(ts):
        return [t.detach().double().requires_grad_() if t is not None else None for t in ts]

    exact = loss_and_grads(ref.distillation_loss, as64(student), as64(teacher), targets, upstream.double(), **opts)
    same = loss_and_grads(lambda *a, **k: ref.distillation_loss(*a, dtype=dtype, **k), student, teacher, targets,
                          upstream, **opts)
    ours = loss_and_grads(lv.linear_distillation_loss, student, teacher, targets, upstream, backend=backend, **opts)

    def err(x, want):
        return ((x.double() - want).norm() / want.norm().clamp(min=1e-30)).item()

    atol = 1e-6 if dtype != torch.float32 else 1e-7
    for name, a, b, c in zip(["loss", "dH", "dW", "db"], ours, same, exact, strict=True):
        assert err(a, c) <= 2 * err(b, c) + atol, name
    assert all(g.dtype == dtype for g in ours[1:])


SHAPES = st.tuples(st.sampled_from([0, 1, 2, 9, 130]), st.sampled_from([1, 5, 33]), st.sampled_from([3, 8]),
                   st.sampled_from([1, 2, 7, 600]))


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(shape=SHAPES, kind=st.sampled_from(KINDS), reduction=st.sampled_from(["mean", "sum", "none"]),
       temperature=st.sampled_from([0.3, 1.0, 2.5]), beta=st.sampled_from([0.1, 0.5, 0.9]), bias=st.booleans(),
       mask=st.sampled_from(["none", "some", "all"]), backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2**16))
def test_property_random_shapes_and_options(shape, kind, reduction, temperature, beta, bias, mask, backend, seed):
    n, d_s, extra, v = shape
    gen = torch.Generator().manual_seed(seed)
    student = [torch.randn(n, d_s, generator=gen, dtype=torch.float64).requires_grad_(),
               torch.randn(v, d_s, generator=gen, dtype=torch.float64).requires_grad_(),
               torch.randn(v, generator=gen, dtype=torch.float64).requires_grad_() if bias else None]
    d_t = d_s + extra
    teacher = [torch.randn(n, d_t, generator=gen, dtype=torch.float64),
               torch.randn(v, d_t, generator=gen, dtype=torch.float64),
               torch.randn(v, generator=gen, dtype=torch.float64) if bias else None]
    targets = None if mask == "none" else torch.randint(0, v, (n,), generator=gen)
    if mask == "all":
        targets[:] = IGNORE
    elif mask == "some":
        targets[torch.rand(n, generator=gen) < 0.4] = IGNORE
    upstream = torch.randn(n, generator=gen, dtype=torch.float64) if reduction == "none" else None
    opts = dict(kind=kind, beta=beta, temperature=temperature, reduction=reduction)
    want = loss_and_grads(ref.distillation_loss, student, teacher, targets, upstream, **opts)
    got = loss_and_grads(lv.linear_distillation_loss, student, teacher, targets, upstream, backend=backend, **opts)
    assert_all_close(got, want, rtol=1e-9, atol=1e-10)
    assert torch.all(got[0] >= -1e-12)  # every divergence is >= 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_shared_by_both_models_are_masked_tokens(backend):
    """A shared -inf bias masks tokens out of both softmaxes: the same as the divergence over the other tokens."""
    student, teacher, targets = make_inputs(lead=(40,), v=1031, bias=True)
    masked = torch.zeros(1031, dtype=torch.bool)
    masked[::3] = True
    kept = (~masked).nonzero()[:, 0]
    with torch.no_grad():
        student[2][masked] = -math.inf
        teacher[2][masked] = -math.inf
    for kind in KINDS:
        got = loss_and_grads(lv.linear_distillation_loss, student, teacher, targets, kind=kind, backend=backend)
        sub_student = [t.detach()[kept].requires_grad_() if i else t for i, t in enumerate(student)]
        want = loss_and_grads(ref.distillation_loss, sub_student, [teacher[0], *(t[kept] for t in teacher[1:])],
                              targets, kind=kind)
        assert_all_close(got[:2], want[:2], **TOL)
        for full, part in zip(got[2:], want[2:], strict=True):
            torch.testing.assert_close(full[kept], part, **TOL)
            assert torch.all(full[masked] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_inf_and_nan_logits_give_nan(backend):
    student, teacher, targets = make_inputs(lead=(20,), v=1031, bias=True, ignore_every=0)
    with torch.no_grad():
        student[0][3, 0] = math.nan  # row 3 of the student: NaN
        teacher[2][50] = math.inf  # every teacher row holds +inf
    for kind in KINDS:
        per_token = lv.linear_distillation_loss(*student[:2], *teacher[:2], targets, student_bias=student[2],
                                                kind=kind, reduction="none", backend=backend)
        assert torch.isnan(per_token[3])
        with_inf = lv.linear_distillation_loss(*student[:2], *teacher[:2], targets, student_bias=student[2],
                                               teacher_bias=teacher[2], kind=kind, backend=backend)
        assert torch.isnan(with_inf)
        (grad_h,) = torch.autograd.grad(with_inf, (student[0],))
        assert torch.isnan(grad_h).all()


def test_compiles_with_fullgraph_and_matches_eager():
    import torch._dynamo

    student, teacher, targets = make_inputs(lead=(2, 37), v=1031, bias=True, dtype=torch.float32)

    def step(hs, ws, bs, ht, wt, bt, y):
        return sum(lv.linear_distillation_loss(hs, ws, ht, wt, y, student_bias=bs, teacher_bias=bt, kind=kind,
                                               temperature=0.7) for kind in KINDS)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*student, *teacher, targets)
    grads = torch.autograd.grad(loss, student)
    want = step(*student, *teacher, targets)
    want_grads = torch.autograd.grad(want, student)
    assert_all_close([loss, *grads], [want, *want_grads], rtol=0, atol=0)


def test_autocast_casts_both_models():
    student, teacher, targets = make_inputs(lead=(13,), d_s=16, d_t=24, v=64, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lv.linear_distillation_loss(*student[:2], *teacher[:2], targets, kind="jsd")
    want = ref.distillation_loss(*(t.bfloat16() for t in (*student[:2], *teacher[:2])), targets, kind="jsd",
                                 dtype=torch.bfloat16)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=2e-3)
    loss.backward()
    assert student[0].grad.dtype == torch.float32


def small():
    student, teacher, targets = make_inputs(lead=(13,), d_s=8, d_t=12, v=29, dtype=torch.float32)
    return student[0], student[1], teacher[0], teacher[1], targets


def _call(**opts):
    return lambda hs, ws, ht, wt, y: lv.linear_distillation_loss(hs, ws, ht, wt, y, **opts)


BAD_CALLS = [
    ("unknown kind", _call(kind="kl"), ValueError, "'kl'"),
    ("beta 0", _call(kind="jsd", beta=0.0), ValueError, "0.0"),
    ("beta 1", _call(kind="jsd", beta=1.0), ValueError, "1.0"),
    ("beta > 1", _call(beta=1.5), ValueError, "1.5"),
    ("beta nan", _call(beta=math.nan), ValueError, "nan"),
    ("beta str", _call(beta="0.5"), TypeError, "beta"),
    ("temperature 0", _call(temperature=0.0), ValueError, "temperature"),
    ("temperature < 0", _call(temperature=-2.0), ValueError, "-2.0"),
    ("reduction", _call(reduction="batchmean"), ValueError, "batchmean"),
    ("backend", _call(backend="cuda"), ValueError, "cuda"),
    ("V mismatch", lambda hs, ws, ht, wt, y: lv.linear_distillation_loss(hs, ws, ht, wt[:-1], y), ValueError,
     "V = 28"),
    ("token shapes differ", lambda hs, ws, ht, wt, y: lv.linear_distillation_loss(hs, ws, ht[:-1], wt), ValueError,
     "leading"),
    ("teacher D mismatch", lambda hs, ws, ht, wt, y: lv.linear_distillation_loss(hs, ws, ht[:, :5], wt, y),
     ValueError, "teacher"),
    ("student D mismatch", lambda hs, ws, ht, wt, y: lv.linear_distillation_loss(hs[:, :5], ws, ht, wt, y),
     ValueError, "student"),
    ("dtypes differ", lambda hs, ws, ht, wt, y: lv.linear_distillation_loss(hs, ws, ht.double(), wt.double(), y),
     TypeError, "same dtype"),
    ("targets shape", lambda hs, ws, ht, wt, y: lv.linear_distillation_loss(hs, ws, ht, wt, y[:-1]), ValueError,
     "targets shape"),
    ("float targets", lambda hs, ws, ht, wt, y: lv.linear_distillation_loss(hs, ws, ht, wt, y.float()), TypeError,
     "integer"),
    ("teacher not a tensor", lambda hs, ws, ht, wt, y: lv.linear_distillation_loss(hs, ws, ht.tolist(), wt, y),
     TypeError, "teacher_hidden"),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_a_clear_error(case):
    _, call, error, fragment = case
    with pytest.raises(error) as info:
        call(*small())
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_an_ignored_row_of_nan_logits_leaves_the_gradients_finite(backend, kind):
    """Row 3's logits overflow to +-inf in both models; ignored, it adds nothing to any gradient."""
    student, teacher, targets = make_inputs(lead=(20,), v=1031, bias=True, ignore_every=0, dtype=torch.float32)
    with torch.no_grad():
        student[0][3] *= 1e38
        teacher[0][3] *= 1e38
    targets[3] = IGNORE
    for reduction in ("mean", "none"):
        upstream = torch.ones(20) if reduction == "none" else None
        got = loss_and_grads(lv.linear_distillation_loss, student, teacher, targets, upstream, kind=kind,
                             reduction=reduction, backend=backend)
        assert torch.isfinite(got[0]).all() and all(torch.isfinite(g).all() for g in got[1:])
