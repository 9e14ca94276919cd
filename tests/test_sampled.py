"""Fused sampled cross-entropy against a float64 reference built on materialised sampled logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from largevocab.ops import torch_sampled, triton_sampled
from largevocab.sampled import SampledCrossEntropyLoss, sample_negatives, sampled_cross_entropy

from reference import reference_sampled_loss as reference

BACKENDS = ["torch", "triton"]
LAYOUTS = ["rows", "shared"]
IGNORE = -100
# Odd sizes, so every block of the kernels is ragged; V is small next to K so that negatives repeat and hit
# targets. The per-row kernel is a 3-D block the interpreter computes in full, hence the smaller shape.
SHAPES = {"rows": dict(n=70, d=40, v=97, k=100), "shared": dict(n=150, d=100, v=257, k=300)}

OPTION_ROWS = {
    "default": {},
    "no_logq": {"logq_correction": False},
    "keep_hits": {"remove_accidental_hits": False},
    "plain": {"logq_correction": False, "remove_accidental_hits": False},
    "item_counts": {"item_counts": True},
    "ignore_index": {"ignore_index": 5},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
}


def make_inputs(layout, *, dtype=torch.float64, ignore_index=IGNORE, seed=0, lead=None, **shape):
    """hidden, weight (requiring grad), targets (every 7th ignored), negatives with hits and duplicates."""
    size = {**SHAPES[layout], **shape}
    n, d, v, k = size["n"], size["d"], size["v"], size["k"]
    gen = torch.Generator().manual_seed(seed)
    lead = lead or (n,)
    hidden = torch.randn(*lead, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * (3.0 / d**0.5)
    targets = torch.randint(0, v, lead, generator=gen)
    targets.view(-1)[::7] = ignore_index
    flat = targets.reshape(-1)
    safe = torch.where(flat != ignore_index, flat, torch.zeros_like(flat))
    if layout == "shared":
        negatives = torch.randint(0, v, (k,), generator=gen)
        hits = min(3, k, n - 1)
        negatives[:hits] = safe[1 : 1 + hits]  # rows 1..3 are not ignored: guaranteed accidental hits
        negatives[-1] = negatives[-2]  # and a duplicate
    else:
        negatives = torch.randint(0, v, (*lead, k), generator=gen)
        rows = negatives.view(-1, k)
        rows[::2, 0] = safe[::2]  # an accidental hit in every other row
        rows[:, 1] = rows[:, 2]  # and a duplicate in every row
    cast = lambda t: t.to(dtype).requires_grad_()  # noqa: E731
    return cast(hidden), cast(weight), targets, negatives


def make_counts(v, seed=1):
    return torch.randint(1, 50, (v,), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(fn, hidden, weight, targets, upstream=None, **opts):
    loss = fn(hidden, weight, targets, **opts)
    total = (loss * upstream).sum() if loss.dim() else loss
    params = [t for t in (hidden, weight) if t.requires_grad]
    return loss.detach(), torch.autograd.grad(total, params)


def assert_close_all(got, want, **tol):
    torch.testing.assert_close(got[0], want[0], **tol)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, **tol)


def resolve_options(row, v):
    opts = dict(OPTION_ROWS[row])
    if opts.pop("item_counts", False):
        opts["item_counts"] = make_counts(v)
    return opts


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("row", list(OPTION_ROWS))
def test_matches_float64_reference(backend, layout, row):
    opts = resolve_options(row, SHAPES[layout]["v"])
    hidden, weight, targets, negatives = make_inputs(layout, ignore_index=opts.get("ignore_index", IGNORE))
    flat_neg = negatives.reshape(-1, negatives.shape[-1]) if layout == "rows" else negatives[None, :]
    assert (flat_neg == targets.reshape(-1, 1)).any(), "the test data must contain accidental hits"
    upstream = torch.rand(targets.shape, dtype=torch.float64) if opts.get("reduction") == "none" else None
    want = loss_and_grads(reference, hidden, weight, targets, upstream, negatives=negatives, **opts)
    got = loss_and_grads(sampled_cross_entropy, hidden, weight, targets, upstream, negatives=negatives,
                         backend=backend, **opts)
    assert got[0].dtype == torch.float64 and got[0].shape == want[0].shape
    assert_close_all(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dimensions_and_per_token_upstream(backend):
    hidden, weight, targets, negatives = make_inputs("rows", lead=(3, 11), k=37)
    upstream = torch.rand(targets.shape, dtype=torch.float64)
    want = loss_and_grads(reference, hidden, weight, targets, upstream, negatives=negatives, reduction="none")
    for negs in (negatives, negatives.reshape(33, 37)):  # targets.shape + (K,) or (N, K)
        got = loss_and_grads(sampled_cross_entropy, hidden, weight, targets, upstream, negatives=negs,
                             reduction="none", backend=backend)
        assert got[0].shape == (3, 11) and torch.all(got[0].reshape(-1)[::7] == 0)
        assert_close_all(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_duplicate_negatives_accumulate_in_weight_grad(backend, layout):
    """K copies of one item with logQ correction off: that row of dW gets all K contributions."""
    hidden, weight, targets, _ = make_inputs(layout, n=20, k=8)
    shape = (8,) if layout == "shared" else (20, 8)
    negatives = torch.full(shape, 3)
    opts = dict(negatives=negatives, logq_correction=False, remove_accidental_hits=False, reduction="sum")
    want = loss_and_grads(reference, hidden, weight, targets, **opts)
    got = loss_and_grads(sampled_cross_entropy, hidden, weight, targets, backend=backend, **opts)
    assert_close_all(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_only_hits_gives_zero_loss_and_gradient(backend, layout):
    """Every negative is the row's target: all are masked in forward and backward, so the loss is exactly 0."""
    hidden, weight, _, _ = make_inputs(layout, n=12, k=5)
    targets = torch.full((12,), 7)
    negatives = torch.full((5,) if layout == "shared" else (12, 5), 7)
    loss, grads = loss_and_grads(sampled_cross_entropy, hidden, weight, targets, negatives=negatives,
                                 reduction="sum", backend=backend)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_items_as_shared_negatives_is_exact_cross_entropy(backend, reduction):
    hidden, weight, targets, _ = make_inputs("shared")
    vocab = weight.shape[0]
    upstream = torch.rand(targets.shape, dtype=torch.float64) if reduction == "none" else None

    def exact(h, w, y, **_):
        return F.cross_entropy(h @ w.T, y, ignore_index=IGNORE, reduction=reduction)

    want = loss_and_grads(exact, hidden, weight, targets, upstream)
    got = loss_and_grads(sampled_cross_entropy, hidden, weight, targets, upstream, negatives=torch.arange(vocab),
                         logq_correction=False, remove_accidental_hits=True, reduction=reduction, backend=backend)
    assert_close_all(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(backend, layout):
    hidden, weight, targets, negatives = make_inputs(layout, n=9, d=5, v=13, k=7, ignore_index=3)
    counts = make_counts(13)

    def fn(h, w):
        return sampled_cross_entropy(h, w, targets, negatives=negatives, item_counts=counts, ignore_index=3,
                                     reduction="none", backend=backend)

    assert torch.autograd.gradcheck(fn, (hidden, weight), fast_mode=backend == "triton")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_matches_torch_and_splits_merge(layout, splits, monkeypatch):
    monkeypatch.setattr(triton_sampled, "_num_splits", lambda *args: splits)
    hidden, weight, targets, negatives = make_inputs(layout, dtype=torch.float32)
    counts = make_counts(weight.shape[0])
    opts = dict(negatives=negatives, item_counts=counts, reduction="none")
    upstream = torch.rand(targets.shape)
    want = loss_and_grads(sampled_cross_entropy, hidden, weight, targets, upstream, backend="torch", **opts)
    got = loss_and_grads(sampled_cross_entropy, hidden, weight, targets, upstream, backend="triton", **opts)
    assert_close_all(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradient_of_one_input_only(backend, layout):
    hidden, weight, targets, negatives = make_inputs(layout, n=30, k=20)
    want = loss_and_grads(reference, hidden, weight, targets, negatives=negatives)
    for frozen, keep in ((hidden, 1), (weight, 0)):
        frozen.requires_grad_(False)
        got = loss_and_grads(sampled_cross_entropy, hidden, weight, targets, negatives=negatives, backend=backend)
        frozen.requires_grad_(True)
        torch.testing.assert_close(got[1][0], want[1][keep], rtol=1e-9, atol=1e-11)


def test_torch_backend_chunking_is_invisible():
    for layout in LAYOUTS:
        hidden, weight, targets, negatives = make_inputs(layout, n=40, k=30)
        h, w = hidden.detach(), weight.detach()
        valid = targets != IGNORE
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        correction = torch.randn(weight.shape[0], dtype=torch.float64)
        upstream = torch.rand(targets.shape, dtype=torch.float64)
        outs = []
        for chunk in (1, 7, 1000):
            loss, lse = torch_sampled.forward(h, w, safe, valid, negatives, correction, True, chunk)
            grads = torch_sampled.backward(h, w, safe, valid, negatives, correction, True, lse, upstream,
                                           (True, True), chunk)
            outs.append((loss, grads))
        for other in outs[1:]:
            assert_close_all(other, outs[0], rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------------------- sampling


SAMPLING_CASES = [
    ("uniform", False), ("uniform", True), ("popularity", False), ("popularity", True), ("in_batch", True),
]


@pytest.mark.parametrize("sampling,shared", SAMPLING_CASES)
def test_sampling_is_reproducible_and_equals_explicit_negatives(sampling, shared):
    hidden, weight, targets, _ = make_inputs("rows", n=50, k=10)
    vocab = weight.shape[0]
    counts = make_counts(vocab) if sampling == "popularity" else None
    k = None if sampling == "in_batch" else 23
    opts = dict(num_negatives=k, sampling=sampling, shared_negatives=shared, item_counts=counts)

    def loss(seed, backend="torch"):
        gen = torch.Generator().manual_seed(seed)
        return sampled_cross_entropy(hidden, weight, targets, generator=gen, backend=backend, **opts)

    first = loss(1)
    assert torch.equal(first, loss(1))
    if sampling != "in_batch":
        assert not torch.equal(first, loss(2))
    drawn = sample_negatives(targets, vocab, generator=torch.Generator().manual_seed(1), **opts)
    assert drawn.shape == ((23,) if shared else (50, 23)) or sampling == "in_batch"
    q_counts = torch.bincount(targets[targets != IGNORE], minlength=vocab) if sampling == "in_batch" else counts
    want = reference(hidden, weight, targets, drawn, item_counts=q_counts)
    torch.testing.assert_close(first, want, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(loss(1, backend="triton"), want, rtol=1e-9, atol=1e-11)


def test_popularity_follows_the_counts_and_never_draws_zero_count_items():
    vocab = 50
    counts = torch.randint(0, 20, (vocab,), generator=torch.Generator().manual_seed(0)).double()
    counts[::3] = 0.0
    counts[-1] = 0.0  # the last item too: the top of the inverse CDF is clamped to the last positive count
    targets = torch.zeros(100, dtype=torch.long)
    drawn = sample_negatives(targets, vocab, num_negatives=2000, sampling="popularity", item_counts=counts,
                             generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (100, 2000) and bool((counts[drawn] > 0).all())
    freq = torch.bincount(drawn.reshape(-1), minlength=vocab).double() / drawn.numel()
    torch.testing.assert_close(freq, counts / counts.sum(), rtol=0, atol=3e-3)


def test_uniform_covers_the_vocabulary_evenly():
    drawn = sample_negatives(torch.zeros(10, dtype=torch.long), 40, num_negatives=20000, shared_negatives=True,
                             generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (20000,)
    freq = torch.bincount(drawn, minlength=40).double() / drawn.numel()
    torch.testing.assert_close(freq, torch.full((40,), 1 / 40, dtype=torch.float64), rtol=0, atol=6e-3)


def test_in_batch_uses_the_non_ignored_targets():
    targets = torch.tensor([[4, IGNORE, 2, 4], [IGNORE, 7, 2, 2]])
    drawn = sample_negatives(targets, 10, sampling="in_batch")
    assert drawn.tolist() == [4, 2, 4, 7, 2, 2]
    hidden = torch.randn(2, 4, 6, dtype=torch.float64)
    weight = torch.randn(10, 6, dtype=torch.float64)
    got = sampled_cross_entropy(hidden, weight, targets, sampling="in_batch", backend="torch")
    # log(K q(i)) = log(count of i in the batch): item 2 appears 3 times, 4 twice, 7 once.
    want = reference(hidden, weight, targets, drawn, item_counts=torch.bincount(drawn, minlength=10))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    all_ignored = sampled_cross_entropy(hidden, weight, torch.full_like(targets, IGNORE), sampling="in_batch")
    assert all_ignored.item() == 0.0


# -------------------------------------------------------------------------------------- precision and edges


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_precision_three_way(backend, dtype, layout):
    """error(ours, fp64) <= 2 * error(torch at the same dtype, fp64) + small atol, for loss and gradients."""
    hidden, weight, targets, negatives = make_inputs(layout, dtype=dtype)
    counts = make_counts(weight.shape[0])
    opts = dict(negatives=negatives, item_counts=counts, reduction="none")
    upstream = torch.rand(targets.shape)

    def as64(t):
        return t.detach().double().requires_grad_()

    exact = loss_and_grads(reference, as64(hidden), as64(weight), targets, upstream.double(), **opts)
    same_dtype = loss_and_grads(lambda *a, **k: reference(*a, dtype=dtype, **k), hidden, weight, targets, upstream,
                                **opts)
    ours = loss_and_grads(sampled_cross_entropy, hidden, weight, targets, upstream, backend=backend, **opts)

    def err(x, ref):
        return ((x.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()

    atol = 1e-6
    assert ours[0].dtype == torch.float32
    assert err(ours[0], exact[0]) <= 2 * err(same_dtype[0], exact[0]) + atol
    for i, (g_ours, g_torch, g_exact) in enumerate(zip(ours[1], same_dtype[1], exact[1], strict=True)):
        assert g_ours.dtype == dtype
        assert err(g_ours, g_exact) <= 2 * err(g_torch, g_exact) + atol, f"gradient {i} (hidden, weight)"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_and_all_ignored(backend, reduction):
    hidden, weight, targets, negatives = make_inputs("rows", n=0, k=5)
    loss = sampled_cross_entropy(hidden, weight, targets, negatives=negatives, reduction=reduction, backend=backend)
    assert loss.shape == (() if reduction != "none" else (0,))
    hidden, weight, targets, negatives = make_inputs("rows", n=10, k=5)
    loss = sampled_cross_entropy(hidden, weight, torch.full_like(targets, IGNORE), negatives=negatives,
                                 reduction=reduction, backend=backend)
    assert torch.all(loss == 0.0)
    loss.sum().backward()
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_autocast_casts_like_f_linear():
    hidden, weight, targets, negatives = make_inputs("rows", dtype=torch.float32, n=20, k=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sampled_cross_entropy(hidden, weight, targets, negatives=negatives)
    want = sampled_cross_entropy(hidden.bfloat16(), weight.bfloat16(), targets, negatives=negatives)
    assert loss.dtype == torch.float32 and torch.equal(loss, want)
    loss.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def test_auto_backend_uses_torch_on_cpu(monkeypatch):
    hidden, weight, targets, negatives = make_inputs("rows", n=10, k=5)
    calls = []
    real = torch_sampled.forward
    monkeypatch.setattr(torch_sampled, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(triton_sampled, "forward", lambda *a, **k: pytest.fail("auto chose triton on the CPU"))
    sampled_cross_entropy(hidden, weight, targets, negatives=negatives)
    assert calls == [1]


# ------------------------------------------------------------------------------------------ API and errors


def _small():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(13, 8, generator=gen)
    weight = torch.randn(29, 8, generator=gen)
    targets = torch.randint(0, 29, (13,), generator=gen)
    return hidden, weight, targets


def call(**opts):
    return lambda h, w, y: sampled_cross_entropy(h, w, y, **opts)


NEG = torch.zeros(13, 4, dtype=torch.long)
BAD_CALLS = [
    ("num_negatives 0", call(num_negatives=0), ValueError, "0"),
    ("num_negatives < 0", call(num_negatives=-3), ValueError, "-3"),
    ("num_negatives float", call(num_negatives=2.5), TypeError, "num_negatives"),
    ("no num_negatives", call(), ValueError, "num_negatives"),
    ("in_batch with K", call(sampling="in_batch", num_negatives=4), ValueError, "in_batch"),
    ("unknown sampling", call(num_negatives=4, sampling="random"), ValueError, "random"),
    ("popularity without counts", call(num_negatives=4, sampling="popularity"), ValueError, "item_counts"),
    ("counts with uniform", call(num_negatives=4, item_counts=torch.ones(29)), ValueError, "item_counts"),
    ("counts length", call(num_negatives=4, sampling="popularity", item_counts=torch.ones(28)), ValueError, "28"),
    ("counts negative", call(num_negatives=4, sampling="popularity", item_counts=-torch.ones(29)), ValueError,
     "-1"),
    ("counts all zero", call(num_negatives=4, sampling="popularity", item_counts=torch.zeros(29)), ValueError,
     "zero"),
    ("counts nan", call(num_negatives=4, sampling="popularity",
                        item_counts=torch.full((29,), math.nan)), ValueError, "nan"),
    ("counts not a tensor", call(num_negatives=4, sampling="popularity", item_counts=[1] * 29), TypeError,
     "item_counts"),
    ("counts bool", call(num_negatives=4, sampling="popularity", item_counts=torch.ones(29, dtype=torch.bool)),
     TypeError, "item_counts"),
    ("negative above V", call(negatives=NEG + 29), ValueError, "29"),
    ("negative below 0", call(negatives=NEG - 1), ValueError, "-1"),
    ("float negatives", call(negatives=NEG.float()), TypeError, "integer"),
    ("negatives shape", call(negatives=torch.zeros(12, 4, dtype=torch.long)), ValueError, "(12, 4)"),
    ("negatives 0-dim", call(negatives=torch.tensor(3)), ValueError, "negatives"),
    ("negatives K = 0", call(negatives=NEG[:, :0]), ValueError, "at least one"),
    ("negatives not a tensor", call(negatives=[1, 2]), TypeError, "negatives"),
    ("per-row but shared", call(negatives=NEG, shared_negatives=True), ValueError, "shared_negatives"),
    ("K disagrees", call(negatives=NEG, num_negatives=5), ValueError, "num_negatives=5"),
    ("zero-count negative", call(negatives=NEG, item_counts=torch.arange(29.0)), ValueError, "item_counts 0"),
    ("generator type", call(num_negatives=4, generator=0), TypeError, "generator"),
    ("logq not bool", call(num_negatives=4, logq_correction="yes"), TypeError, "logq_correction"),
    ("hits not bool", call(num_negatives=4, remove_accidental_hits=1), TypeError, "remove_accidental_hits"),
    ("shared not bool", call(num_negatives=4, shared_negatives=None), TypeError, "shared_negatives"),
    ("reduction", call(num_negatives=4, reduction="avg"), ValueError, "avg"),
    ("backend", call(num_negatives=4, backend="cuda"), ValueError, "cuda"),
    ("ignore_index float", call(num_negatives=4, ignore_index=-1.5), TypeError, "ignore_index"),
    ("target above V", lambda h, w, y: sampled_cross_entropy(h, w, y + 29, num_negatives=4), ValueError, "29"),
    ("dtype mismatch", lambda h, w, y: sampled_cross_entropy(h.double(), w, y, num_negatives=4), TypeError,
     "same dtype"),
    ("D mismatch", lambda h, w, y: sampled_cross_entropy(h[:, :5], w, y, num_negatives=4), ValueError, "D"),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_a_clear_error(case):
    _, bad_call, error, fragment = case
    hidden, weight, targets = _small()
    with pytest.raises(error) as info:
        bad_call(hidden, weight, targets)
    assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("kwargs", [dict(num_negatives=0), dict(sampling="x"), dict(reduction="max"),
                                    dict(item_counts=-torch.ones(3)), dict(logq_correction=None)])
def test_module_validates_options_at_construction(kwargs):
    with pytest.raises((ValueError, TypeError)):
        SampledCrossEntropyLoss(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_equals_function(backend):
    hidden, weight, targets, negatives = make_inputs("rows", n=20, k=9, ignore_index=2)
    counts = make_counts(weight.shape[0])
    opts = dict(negatives=negatives, item_counts=counts, logq_correction=True, remove_accidental_hits=False,
                ignore_index=2, reduction="sum", backend=backend)
    module = SampledCrossEntropyLoss(**opts)
    assert torch.equal(module(hidden, weight, targets), sampled_cross_entropy(hidden, weight, targets, **opts))
    assert "reduction='sum'" in repr(module)
    sampling = dict(num_negatives=6, sampling="popularity", item_counts=counts, backend=backend)
    module = SampledCrossEntropyLoss(generator=torch.Generator().manual_seed(4), **sampling)
    want = sampled_cross_entropy(hidden, weight, targets, generator=torch.Generator().manual_seed(4), **sampling)
    assert torch.equal(module(hidden, weight, targets), want)
