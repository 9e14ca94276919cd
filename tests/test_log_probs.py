"""Fused per-token log-probabilities, entropy and argmax against float64 references on materialised logits."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import largevocab as lv
from largevocab.ops import torch_log_probs, triton_log_probs

import posttrain_reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["torch", "triton"]
IGNORE = -100
TOL = dict(rtol=1e-9, atol=1e-11)


def make_inputs(lead=(251,), d=123, v=5003, *, dtype=torch.float64, bias=False, ignore_every=7, seed=0,
                ignore_index=IGNORE, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * (scale / d**0.5)
    targets = torch.randint(0, v, lead, generator=gen)
    if ignore_every:
        targets.view(-1)[::ignore_every] = ignore_index
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    cast = lambda t: t.to(dtype).requires_grad_() if t is not None else None  # noqa: E731
    return cast(hidden), cast(weight), targets, cast(b)


def outputs_and_grads(fn, hidden, weight, targets, bias, g_logp, g_ent, **opts):
    """(logp, entropy, grads of sum(g_logp * logp + g_ent * entropy)); a None g skips that output."""
    logp, ent = fn(hidden, weight, targets, bias=bias, return_entropy=True, **opts)
    total = 0.0
    if g_logp is not None:
        total = total + (logp * g_logp).sum()
    if g_ent is not None:
        total = total + (ent * g_ent).sum()
    params = [t for t in (hidden, weight, bias) if t is not None]
    return [logp.detach(), ent.detach(), *torch.autograd.grad(total, params)]


def assert_all_close(got, want, **tol):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, i=i: f"output {i} (logp, entropy, dH, dW, db): {m}")


OPTION_ROWS = {
    "default": {},
    "bias": {"bias": True},
    "cold": {"temperature": 0.3},
    "hot": {"temperature": 2.5},
    "softcap": {"softcap": 5.0},
    "shift": {"shift": 1},
    "ignore_index in V": {"ignore_index": 5},
    "ignore_index beyond V": {"ignore_index": 10_000},
    "all": {"bias": True, "temperature": 0.3, "softcap": 4.0, "shift": 2, "ignore_index": 5},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", list(OPTION_ROWS))
def test_matches_float64_reference_for_any_upstream_gradient(backend, row):
    opts = dict(OPTION_ROWS[row])
    has_bias = opts.pop("bias", False)
    hidden, weight, targets, bias = make_inputs(lead=(3, 83), bias=has_bias,
                                                ignore_index=opts.get("ignore_index", IGNORE))
    gen = torch.Generator().manual_seed(1)
    g_logp = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(targets.shape, generator=gen, dtype=torch.float64)
    want = outputs_and_grads(ref.log_probs, hidden, weight, targets, bias, g_logp, g_ent, **opts)
    got = outputs_and_grads(lv.linear_log_probs, hidden, weight, targets, bias, g_logp, g_ent, backend=backend,
                            **opts)
    assert got[0].dtype == torch.float64 and got[0].shape == targets.shape
    ignored = ref.shifted_targets(targets, opts.get("shift", 0), opts.get("ignore_index", IGNORE)) == opts.get(
        "ignore_index", IGNORE)
    assert torch.all(got[0][ignored] == 0) and torch.all(got[1][ignored] == 0)
    assert_all_close(got, want, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["logp only", "entropy only"])
def test_one_output_alone_has_the_right_gradient(backend, which):
    """GRPO differentiates logp only; an entropy bonus alone differentiates entropy only."""
    hidden, weight, targets, bias = make_inputs(v=1031, bias=True)
    g = torch.rand(targets.shape, dtype=torch.float64)
    g_logp, g_ent = (g, None) if which == "logp only" else (None, g)
    opts = dict(temperature=0.7, softcap=6.0)
    want = outputs_and_grads(ref.log_probs, hidden, weight, targets, bias, g_logp, g_ent, **opts)
    got = outputs_and_grads(lv.linear_log_probs, hidden, weight, targets, bias, g_logp, g_ent, backend=backend,
                            **opts)
    assert_all_close(got, want, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_entropy_returns_logp_alone(backend):
    hidden, weight, targets, _ = make_inputs(v=1031)
    logp = lv.linear_log_probs(hidden, weight, targets, temperature=2.5, backend=backend)
    assert isinstance(logp, torch.Tensor)
    (dh,) = torch.autograd.grad(logp.sum(), (hidden,))
    want = ref.log_probs(hidden, weight, targets, temperature=2.5)
    (want_dh,) = torch.autograd.grad(want.sum(), (hidden,))
    torch.testing.assert_close(logp, want, **TOL)
    torch.testing.assert_close(dh, want_dh, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_all_options(backend):
    hidden, weight, targets, bias = make_inputs(lead=(2, 5), d=7, v=37, bias=True, ignore_every=3,
                                                ignore_index=3)
    opts = dict(ignore_index=3, temperature=0.7, softcap=3.0, shift=1, backend=backend)
    coef = torch.randn(targets.shape, dtype=torch.float64)

    def fn(h, w, b):
        logp, ent = lv.linear_log_probs(h, w, targets, bias=b, return_entropy=True, **opts)
        return logp * coef + 0.3 * ent

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), fast_mode=backend == "triton")


def _backend_outputs(module, hidden, weight, bias, targets, opts, g, **kwargs):
    valid = targets != IGNORE
    safe = torch.where(valid, targets, 0)
    logp, ent, lse = module.forward(hidden, weight, bias, safe, valid, opts, **kwargs)
    grads = module.backward(hidden, weight, bias, safe, valid, lse, ent, opts, g, g * 0.5, (True, True, True),
                            **kwargs) if module is torch_log_probs else ()
    return [logp, ent, lse, *grads]


def test_torch_backend_chunking_is_invisible():
    hidden, weight, targets, bias = make_inputs(v=311, bias=True)
    opts = torch_log_probs.LogProbOptions(softcap=5.0, temperature=0.6, entropy=True)
    g = torch.rand(targets.shape, dtype=torch.float64)
    outs = [_backend_outputs(torch_log_probs, hidden, weight, bias, targets, opts, g, chunk_rows=chunk)
            for chunk in (1, 17, 1000)]
    for other in outs[1:]:
        assert_all_close(other, outs[0], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("splits", [1, 3, 10])
def test_triton_vocabulary_splits_merge(splits):
    hidden, weight, targets, bias = make_inputs(bias=True)
    opts = torch_log_probs.LogProbOptions(softcap=4.0, temperature=0.5, entropy=True)
    g = torch.rand(targets.shape, dtype=torch.float64)
    got = _backend_outputs(triton_log_probs, hidden, weight, bias, targets, opts, g, splits=splits)
    want = _backend_outputs(torch_log_probs, hidden, weight, bias, targets, opts, g)[:3]
    assert_all_close(got, want, **TOL)
    ids = triton_log_probs.argmax(hidden, weight, bias, 4.0, splits)
    assert torch.equal(ids, ref.argmax(hidden, weight, bias=bias, softcap=4.0))


def test_triton_deterministic_mode_is_bitwise_reproducible():
    hidden, weight, targets, bias = make_inputs(dtype=torch.float32, bias=True, v=1031)
    g_logp, g_ent = torch.rand(targets.shape), torch.rand(targets.shape)
    opts = dict(temperature=0.8, softcap=5.0)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [outputs_and_grads(lv.linear_log_probs, hidden, weight, targets, bias, g_logp, g_ent,
                                  backend="triton", **opts) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    atomic = outputs_and_grads(lv.linear_log_probs, hidden, weight, targets, bias, g_logp, g_ent, backend="triton",
                               **opts)
    assert_all_close(runs[0], atomic, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    hidden, weight, targets, bias = make_inputs(v=1031, bias=True)
    g = torch.rand(targets.shape, dtype=torch.float64)
    want = outputs_and_grads(ref.log_probs, hidden, weight, targets, bias, g, g)
    h_t = hidden.detach().T.contiguous().T.requires_grad_()
    wide = torch.cat([weight.detach(), torch.randn(weight.shape[0], 9, dtype=weight.dtype)], dim=1)
    for w in (wide[:, : weight.shape[1]], weight.detach().T.contiguous().T):
        w.requires_grad_()
        got = outputs_and_grads(lv.linear_log_probs, h_t, w, targets, bias, g, g, backend=backend)
        assert_all_close(got, want, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "scale"), [(torch.bfloat16, 3.0), (torch.float16, 3.0), (torch.float32, 3.0),
                                              (torch.float32, 25.0)])
@pytest.mark.parametrize("row", ["default", "all"])
def test_low_precision_three_way(backend, dtype, scale, row):
    """error(ours, fp64) <= 2 * error(torch at the same dtype, fp64) + small atol, for both outputs and gradients.

    ``scale`` 25 gives logits of +-80."""
    _check_three_way(backend, dtype, scale, row)


@pytest.mark.parametrize("row", ["default", "all"])
def test_float32_three_way_at_a_large_vocabulary(row):
    """The same rule at V = 131,072, where how a row's sums are accumulated shows: a batched BLAS dot (serial
    float32 accumulation) once biased the entropy by 2.5e-5 relative, 20x torch's error. Torch backend only (the
    Triton kernels sum tiles; the interpreter is too slow at this V)."""
    _check_three_way("torch", torch.float32, 3.0, row, lead=(24,), d=31, v=131_072)


def _check_three_way(backend, dtype, scale, row, lead=(251,), d=123, v=1031):
    opts = dict(OPTION_ROWS[row])
    has_bias = opts.pop("bias", False)
    hidden, weight, targets, bias = make_inputs(lead, d, v, dtype=dtype, bias=has_bias,
                                                ignore_index=opts.get("ignore_index", IGNORE), scale=scale)
    gen = torch.Generator().manual_seed(2)
    g_logp, g_ent = torch.randn(targets.shape, generator=gen), torch.randn(targets.shape, generator=gen)

    def as64(t):
        return t.detach().double().requires_grad_() if t is not None else None

    exact = outputs_and_grads(ref.log_probs, as64(hidden), as64(weight), targets, as64(bias), g_logp.double(),
                              g_ent.double(), **opts)
    same = outputs_and_grads(lambda *a, **k: ref.log_probs(*a, dtype=dtype, **k), hidden, weight, targets, bias,
                             g_logp, g_ent, **opts)
    ours = outputs_and_grads(lv.linear_log_probs, hidden, weight, targets, bias, g_logp, g_ent, backend=backend,
                             **opts)

    def err(x, want):
        return ((x.double() - want).norm() / want.norm().clamp(min=1e-30)).item()

    names = ["logp", "entropy", "dH", "dW", "db"]
    atol = 1e-6 if dtype != torch.float32 else 1e-7
    for name, a, b, c in zip(names, ours, same, exact, strict=False):
        assert err(a, c) <= 2 * err(b, c) + atol, name
    for g in ours[2:]:
        assert g.dtype == dtype


# ------------------------------------------------------------------------------ properties over random shapes


SHAPES = st.tuples(st.sampled_from([0, 1, 2, 9, 130]), st.sampled_from([1, 5, 33]), st.sampled_from([1, 2, 7, 600]))


@settings(max_examples=24, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(shape=SHAPES, temperature=st.sampled_from([0.3, 1.0, 2.5]), softcap=st.sampled_from([None, 2.0]),
       bias=st.booleans(), mask=st.sampled_from(["none", "some", "all"]), backend=st.sampled_from(BACKENDS),
       seed=st.integers(0, 2**16))
def test_property_random_shapes_and_options(shape, temperature, softcap, bias, mask, backend, seed):
    n, d, v = shape
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(v, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    if mask == "all":
        targets[:] = IGNORE
    elif mask == "some":
        targets[torch.rand(n, generator=gen) < 0.4] = IGNORE
    g = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    opts = dict(temperature=temperature, softcap=softcap)
    want = outputs_and_grads(ref.log_probs, hidden, weight, targets, b, *g, **opts)
    got = outputs_and_grads(lv.linear_log_probs, hidden, weight, targets, b, *g, backend=backend, **opts)
    assert_all_close(got, want, **TOL)
    ids = lv.linear_argmax(hidden, weight, bias=b, softcap=softcap, backend=backend)
    assert ids.dtype == torch.long and torch.equal(ids, ref.argmax(hidden, weight, bias=b, softcap=softcap))


# ---------------------------------------------------------------------------------------------------- argmax


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_ties_go_to_the_smallest_id(backend):
    """Integer-valued inputs make every logit exact in any summation order, so the ties are real ties."""
    gen = torch.Generator().manual_seed(5)
    n, d, v = 300, 16, 1500
    hidden = torch.randint(-2, 3, (n, d), generator=gen).float()
    weight = torch.randint(-2, 3, (v, d), generator=gen).float()
    weight[1200:] = weight[:300]  # every row's best logit appears at least twice when it is among the first 300
    weight[700] = weight[20]
    for softcap in (None, 1.0):  # a cap of 1 saturates logits of 16+ to the same float32 1.0: more ties
        ids = lv.linear_argmax(hidden, weight, softcap=softcap, backend=backend)
        logits = hidden @ weight.T
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        want = torch.argmax(logits, dim=-1)  # documented: the first maximal value
        n_ties = ((logits == logits.max(-1, keepdim=True).values).sum(-1) > 1).sum()
        assert n_ties > 50
        assert torch.equal(ids, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_nan_and_inf_like_torch(backend):
    hidden, weight, _, bias = make_inputs(lead=(40,), v=1031, bias=True)
    with torch.no_grad():
        hidden[3, 0] = math.nan  # a whole row of NaN logits
        weight[600, 1] = math.inf  # inf or NaN in column 600 of every row
        bias[900] = math.nan  # NaN in column 900 of every row
    ids = lv.linear_argmax(hidden, weight, bias=bias, backend=backend)
    assert torch.equal(ids, ref.argmax(hidden, weight, bias=bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_argmax_16bit_picks_a_maximal_logit_up_to_rounding(backend, dtype):
    hidden, weight, _, bias = make_inputs(lead=(4, 60), v=1031, dtype=dtype, bias=True)
    ids = lv.linear_argmax(hidden, weight, bias=bias, backend=backend)
    assert ids.shape == (4, 60)
    exact = ref.final_logits(hidden, weight, bias)  # float64 logits of the rounded inputs
    chosen = exact.gather(-1, ids[..., None])[..., 0]
    best = exact.max(-1).values
    # The torch backend ranks logits rounded to the 16-bit dtype, the Triton one their float32 accumulation: either
    # way the chosen logit is within one 16-bit rounding of the true maximum (and usually is the maximum).
    assert torch.all(chosen >= best - torch.finfo(dtype).eps * best.abs())
    assert (ids == exact.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_token_accuracy_with_batched_hidden(backend):
    hidden, weight, targets, _ = make_inputs(lead=(3, 41), v=1031, ignore_every=0)
    ids = lv.linear_argmax(hidden, weight, backend=backend)
    assert ids.shape == (3, 41) and torch.equal(ids, ref.argmax(hidden, weight))
    targets[:, ::2] = ids[:, ::2]
    assert (ids == targets).float().mean() >= 0.5


# -------------------------------------------------------------------------------------- edges and bad input


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_all_ignored(backend):
    hidden, weight, targets, bias = make_inputs(lead=(2, 0), v=29, d=8, bias=True)
    logp, ent = lv.linear_log_probs(hidden, weight, targets, bias=bias, return_entropy=True, backend=backend)
    assert logp.shape == ent.shape == (2, 0)
    (logp.sum() + ent.sum()).backward()
    assert torch.count_nonzero(weight.grad) == 0 and bias.grad is not None
    assert lv.linear_argmax(hidden, weight, backend=backend).shape == (2, 0)
    hidden, weight, targets, _ = make_inputs(lead=(13,), v=29, d=8)
    logp, ent = lv.linear_log_probs(hidden, weight, torch.full_like(targets, IGNORE), return_entropy=True,
                                    backend=backend)
    assert torch.count_nonzero(logp) == 0 and torch.count_nonzero(ent) == 0
    (logp.sum() + ent.sum()).backward()
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_vocabulary(backend):
    hidden, weight, targets, _ = make_inputs(lead=(9,), v=1, d=5, ignore_every=4)
    logp, ent = lv.linear_log_probs(hidden, weight, targets, return_entropy=True, backend=backend)
    assert torch.all(logp == 0) and torch.all(ent.abs() < 1e-12)
    assert torch.all(lv.linear_argmax(hidden, weight, backend=backend) == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_are_tokens_of_probability_zero(backend):
    """A -inf bias masks tokens out: the same as the softmax over the other tokens (where the materialised
    entropy formula would give 0 * -inf = NaN); they get no gradient, and a masked target has logp = -inf."""
    hidden, weight, _, bias = make_inputs(lead=(40,), v=1031, bias=True, ignore_every=0)
    masked = torch.zeros(1031, dtype=torch.bool)
    masked[::3] = True
    kept = (~masked).nonzero()[:, 0]
    gen = torch.Generator().manual_seed(3)
    sub_targets = torch.randint(0, len(kept), (40,), generator=gen)
    with torch.no_grad():
        bias[masked] = -math.inf
    g = torch.randn(40, generator=gen, dtype=torch.float64), torch.randn(40, generator=gen, dtype=torch.float64)
    got = outputs_and_grads(lv.linear_log_probs, hidden, weight, kept[sub_targets], bias, *g, backend=backend)
    sub = [t.detach()[kept].requires_grad_() for t in (weight, bias)]
    want = outputs_and_grads(ref.log_probs, hidden, sub[0], sub_targets, sub[1], *g)
    assert_all_close(got[:3], want[:3], **TOL)
    for full, part in zip(got[3:], want[3:], strict=True):
        torch.testing.assert_close(full[kept], part, **TOL)
        assert torch.all(full[masked] == 0)
    targets = kept[sub_targets].clone()
    targets[0] = 0  # a masked id
    logp = lv.linear_log_probs(hidden, weight, targets, bias=bias, backend=backend)
    assert logp[0] == -math.inf and torch.isfinite(logp[1:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_inf_and_nan_logits_give_nan_like_torch(backend):
    hidden, weight, targets, bias = make_inputs(lead=(20,), v=1031, bias=True, ignore_every=0)
    with torch.no_grad():
        hidden[3, 0] = math.nan  # row 3: NaN logits
        bias[700] = math.inf  # every row: a +inf logit
    for case in ("nan", "inf"):
        b = bias if case == "inf" else bias.detach().clone().fill_(0.0).requires_grad_()
        got = outputs_and_grads(lv.linear_log_probs, hidden, weight, targets, b, torch.ones(20), torch.ones(20),
                                backend=backend)
        want = outputs_and_grads(ref.log_probs, hidden, weight, targets, b, torch.ones(20), torch.ones(20))
        for a, w in zip(got[:3], want[:3], strict=True):
            assert torch.equal(torch.isnan(a).any(-1) if a.dim() > 1 else torch.isnan(a),
                               torch.isnan(w).any(-1) if w.dim() > 1 else torch.isnan(w))
        assert torch.isnan(got[0]).sum() == (20 if case == "inf" else 1)


def test_compiles_with_fullgraph_and_matches_eager():
    import torch._dynamo

    hidden, weight, targets, bias = make_inputs(lead=(2, 37), v=1031, bias=True, dtype=torch.float32)

    def step(h, w, y, b):
        logp, ent = lv.linear_log_probs(h, w, y, bias=b, temperature=0.7, softcap=8.0, shift=1,
                                        return_entropy=True)
        ids = lv.linear_argmax(h, w, bias=b, softcap=8.0)
        return (logp * 0.3 + ent).sum(), ids

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, ids = compiled(hidden, weight, targets, bias)
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    want_loss, want_ids = step(hidden, weight, targets, bias)
    want_grads = torch.autograd.grad(want_loss, (hidden, weight, bias))
    assert torch.equal(ids, want_ids)
    assert_all_close([loss, *grads], [want_loss, *want_grads], rtol=0, atol=0)


def test_meta_tensors_give_shapes():
    hidden = torch.empty(3, 5, 8, device="meta", requires_grad=True)
    weight = torch.empty(29, 8, device="meta", requires_grad=True)
    targets = torch.empty(3, 5, dtype=torch.long, device="meta")
    logp, ent = lv.linear_log_probs(hidden, weight, targets, return_entropy=True, shift=1)
    assert logp.shape == ent.shape == (3, 5) and logp.dtype == torch.float32
    (logp.sum() + ent.sum()).backward()
    assert hidden.grad.shape == hidden.shape
    assert lv.linear_argmax(hidden, weight).shape == (3, 5)


def test_autocast_casts_like_f_linear():
    hidden, weight, targets, _ = make_inputs(lead=(13,), v=64, d=16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, ent = lv.linear_log_probs(hidden, weight, targets, return_entropy=True)
        ids = lv.linear_argmax(hidden, weight)
    want_logp, want_ent = ref.log_probs(hidden.bfloat16(), weight.bfloat16(), targets, return_entropy=True,
                                        dtype=torch.bfloat16)
    assert logp.dtype == torch.float32 and ids.dtype == torch.long
    torch.testing.assert_close(logp, want_logp, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ent, want_ent, rtol=1e-2, atol=1e-2)
    (logp.sum() + ent.sum()).backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def small():
    hidden, weight, targets, _ = make_inputs(lead=(13,), v=29, d=8, dtype=torch.float32)
    return hidden, weight, targets


BAD_CALLS = [
    ("temperature 0", lambda h, w, y: lv.linear_log_probs(h, w, y, temperature=0.0), ValueError, "0.0"),
    ("temperature < 0", lambda h, w, y: lv.linear_log_probs(h, w, y, temperature=-1.5), ValueError, "-1.5"),
    ("temperature inf", lambda h, w, y: lv.linear_log_probs(h, w, y, temperature=math.inf), ValueError, "inf"),
    ("temperature nan", lambda h, w, y: lv.linear_log_probs(h, w, y, temperature=math.nan), ValueError, "nan"),
    ("temperature str", lambda h, w, y: lv.linear_log_probs(h, w, y, temperature="1"), TypeError, "temperature"),
    ("temperature bool", lambda h, w, y: lv.linear_log_probs(h, w, y, temperature=True), TypeError, "temperature"),
    ("return_entropy", lambda h, w, y: lv.linear_log_probs(h, w, y, return_entropy=1), TypeError, "return_entropy"),
    ("softcap <= 0", lambda h, w, y: lv.linear_log_probs(h, w, y, softcap=0.0), ValueError, "softcap"),
    ("shift >= T", lambda h, w, y: lv.linear_log_probs(h, w, y, shift=13), ValueError, "13"),
    ("target above V", lambda h, w, y: lv.linear_log_probs(h, w, torch.full_like(y, 29)), ValueError, "29"),
    ("float targets", lambda h, w, y: lv.linear_log_probs(h, w, y.float()), TypeError, "integer"),
    ("D mismatch", lambda h, w, y: lv.linear_log_probs(h[:, :5], w, y), ValueError, "D"),
    ("backend", lambda h, w, y: lv.linear_log_probs(h, w, y, backend="cuda"), ValueError, "cuda"),
    ("argmax D mismatch", lambda h, w, y: lv.linear_argmax(h[:, :5], w), ValueError, "D"),
    ("argmax scalar hidden", lambda h, w, y: lv.linear_argmax(h[0, 0], w), ValueError, "scalar"),
    ("argmax list hidden", lambda h, w, y: lv.linear_argmax(h.tolist(), w), TypeError, "hidden"),
    ("argmax softcap", lambda h, w, y: lv.linear_argmax(h, w, softcap=-1.0), ValueError, "-1.0"),
    ("argmax bias length", lambda h, w, y: lv.linear_argmax(h, w, bias=torch.zeros(3)), ValueError, "bias"),
    ("argmax backend", lambda h, w, y: lv.linear_argmax(h, w, backend="gpu"), ValueError, "gpu"),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_a_clear_error(case):
    _, call, error, fragment = case
    with pytest.raises(error) as info:
        call(*small())
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_ignored_row_of_nan_logits_leaves_the_gradients_finite(backend):
    """Row 3's logits overflow to +-inf (a NaN hidden entry would reach dW through dZ^T @ H in any implementation,
    torch's included); ignored, it adds nothing to any gradient."""
    hidden, weight, targets, bias = make_inputs(lead=(20,), v=1031, bias=True, ignore_every=0, dtype=torch.float32)
    with torch.no_grad():
        hidden[3] *= 1e38
    targets[3] = IGNORE
    got = outputs_and_grads(lv.linear_log_probs, hidden, weight, targets, bias, torch.ones(20), torch.ones(20),
                            backend=backend)
    assert got[0][3] == 0 and got[1][3] == 0
    assert all(torch.isfinite(g).all() for g in got[2:])
