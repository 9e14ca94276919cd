"""Exact fused linear cross-entropy against a float64 reference built on materialised logits."""

import pytest
import torch

import largevocab as lv
from largevocab.ops import triton_ce

from reference import reference_loss, reference_loss_and_lse

BACKENDS = ["torch", "triton"]
N, D, V = 251, 123, 5003  # odd sizes: every block of the kernels is ragged
IGNORE = -100

OPTION_ROWS = {
    "default": {},
    "bias": {"bias": True},
    "ignore_index": {"ignore_index": 5},
    "sum": {"reduction": "sum"},
    "none": {"reduction": "none"},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 0.05},
    "softcap": {"softcap": 5.0},
    "shift": {"shift": 1},
    "all": {"bias": True, "ignore_index": 5, "reduction": "none", "label_smoothing": 0.2, "z_loss": 0.01,
            "softcap": 4.0, "shift": 2},
}


def make_inputs(n=N, d=D, v=V, *, dtype=torch.float64, bias=False, ignore_index=IGNORE, seed=0, lead=None):
    gen = torch.Generator().manual_seed(seed)
    lead = lead or (n,)
    hidden = torch.randn(*lead, d, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * (3.0 / d**0.5)
    targets = torch.randint(0, v, lead, generator=gen)
    targets.view(-1)[::7] = ignore_index
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    cast = lambda t: t.to(dtype).requires_grad_() if t is not None else None  # noqa: E731
    return cast(hidden), cast(weight), targets, cast(b)


def loss_and_grads(fn, hidden, weight, targets, bias, upstream=None, **opts):
    loss = fn(hidden, weight, targets, bias=bias, **opts)
    total = (loss * upstream).sum() if loss.dim() else loss
    params = [t for t in (hidden, weight, bias) if t is not None]
    return loss.detach(), torch.autograd.grad(total, params)


def assert_close_all(got, want, **tol):
    torch.testing.assert_close(got[0], want[0], **tol)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", list(OPTION_ROWS))
def test_matches_float64_reference(backend, row):
    opts = dict(OPTION_ROWS[row])
    has_bias = opts.pop("bias", False)
    ignore_index = opts.get("ignore_index", IGNORE)
    hidden, weight, targets, bias = make_inputs(bias=has_bias, ignore_index=ignore_index)
    upstream = torch.rand(targets.shape, dtype=torch.float64) if opts.get("reduction") == "none" else None
    want = loss_and_grads(reference_loss, hidden, weight, targets, bias, upstream, **opts)
    got = loss_and_grads(lv.linear_cross_entropy, hidden, weight, targets, bias, upstream, backend=backend, **opts)
    assert got[0].dtype == torch.float64 and got[0].shape == want[0].shape
    assert_close_all(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_sequences_with_shift(backend):
    hidden, weight, targets, bias = make_inputs(v=1031, lead=(3, 29), bias=True)
    opts = dict(shift=1, reduction="none", label_smoothing=0.05)
    upstream = torch.rand(targets.shape, dtype=torch.float64)
    want = loss_and_grads(reference_loss, hidden, weight, targets, bias, upstream, **opts)
    got = loss_and_grads(lv.linear_cross_entropy, hidden, weight, targets, bias, upstream, backend=backend, **opts)
    assert got[0].shape == (3, 29)
    assert torch.all(got[0][:, -1] == 0)  # the last position of each sequence has nothing to predict
    assert_close_all(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_output_and_its_gradient(backend):
    hidden, weight, targets, bias = make_inputs(v=1031, bias=True)
    opts = dict(z_loss=0.02, softcap=6.0)
    coeff = torch.randn(targets.shape, dtype=torch.float64)

    def with_lse(fn):
        loss, lse = fn(hidden, weight, targets, bias=bias, **opts)
        grads = torch.autograd.grad(loss + (coeff * lse).sum(), (hidden, weight, bias))
        return lse.detach(), grads

    def ref(*args, **kw):
        return reference_loss_and_lse(*args, **kw)

    got = with_lse(lambda *a, **k: lv.linear_cross_entropy_with_lse(*a, backend=backend, **k))
    want = with_lse(ref)
    assert_close_all(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_all_options(backend):
    hidden, weight, targets, bias = make_inputs(n=None, d=7, v=37, lead=(2, 5), bias=True, ignore_index=3)
    opts = dict(ignore_index=3, reduction="sum", label_smoothing=0.1, z_loss=0.1, softcap=3.0, shift=1,
                backend=backend)

    def fn(h, w, b):
        loss, lse = lv.linear_cross_entropy_with_lse(h, w, targets, bias=b, **opts)
        return loss + 0.1 * lse.sum()

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_none_reduction(backend):
    hidden, weight, targets, _ = make_inputs(d=5, v=23, n=9)
    fn = lambda h, w: lv.linear_cross_entropy(h, w, targets, reduction="none", backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight), fast_mode=backend == "triton")


def test_torch_backend_chunking_is_invisible():
    """Chunk and cache-block sizes change nothing: the fused forward+backward and the recomputing backward agree
    with each other and across chunkings."""
    from largevocab._common import CEOptions
    from largevocab.ops import torch_ce

    hidden, weight, targets, bias = make_inputs(v=311, bias=True)
    h, w, b = hidden.detach(), weight.detach(), bias.detach()
    valid = targets != IGNORE
    safe = torch.where(valid, targets, 0)
    opts = CEOptions(label_smoothing=0.1, z_loss=0.01, softcap=5.0)
    g = torch.rand(targets.shape, dtype=torch.float64)
    gl = torch.rand(targets.shape, dtype=torch.float64)
    needs = (True, True, True)
    outs = []
    for chunk, block in ((1, 1), (17, 5), (1000, 1 << 20)):
        torch_ce.CACHE_BLOCK_ELEMENTS, previous = block * 311, torch_ce.CACHE_BLOCK_ELEMENTS
        try:
            loss, lse, *fused = torch_ce.forward(h, w, b, safe, valid, opts, g=g, needs=needs, chunk_rows=chunk)
            recomputed = torch_ce.backward(h, w, b, safe, valid, opts, g, None, needs, chunk_rows=chunk)
            with_lse = torch_ce.backward(h, w, b, safe, valid, opts, g, gl, needs, chunk_rows=chunk)
        finally:
            torch_ce.CACHE_BLOCK_ELEMENTS = previous
        for a, r in zip(fused, recomputed, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-13)
        outs.append((loss, lse, *fused, *with_lse))
    for other in outs[1:]:
        for a, r in zip(other, outs[0], strict=True):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("splits", [1, 3, 10])
def test_triton_vocabulary_splits_merge(splits, monkeypatch):
    monkeypatch.setattr(triton_ce, "_num_splits", lambda *args: splits)
    hidden, weight, targets, bias = make_inputs(bias=True)
    want = reference_loss_and_lse(hidden, weight, targets, bias=bias, label_smoothing=0.1)
    got = lv.linear_cross_entropy_with_lse(hidden, weight, targets, bias=bias, label_smoothing=0.1, backend="triton")
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("row", ["default", "all"])
def test_triton_deterministic_mode_is_bitwise_reproducible(row):
    opts = dict(OPTION_ROWS[row])
    has_bias = opts.pop("bias", False)
    hidden, weight, targets, bias = make_inputs(dtype=torch.float32, bias=has_bias, ignore_index=opts.get(
        "ignore_index", IGNORE))
    upstream = torch.rand(targets.shape) if opts.get("reduction") == "none" else None
    want = loss_and_grads(reference_loss, hidden, weight, targets, bias, upstream, **opts)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [loss_and_grads(lv.linear_cross_entropy, hidden, weight, targets, bias, upstream, backend="triton",
                               **opts) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, b)
    assert_close_all(runs[0], [want[0].float(), [g.float() for g in want[1]]], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    hidden, weight, targets, bias = make_inputs(v=1031, bias=True)
    want = loss_and_grads(reference_loss, hidden, weight, targets, bias)
    # hidden as a transposed copy viewed back, weight as a column slice of a wider matrix (strided rows),
    # and a column-major weight (elements of a row not adjacent).
    h_t = hidden.detach().T.contiguous().T.requires_grad_()
    wide = torch.cat([weight.detach(), torch.randn(weight.shape[0], 9, dtype=weight.dtype)], dim=1)
    w_slice = wide[:, : weight.shape[1]]
    w_col = weight.detach().T.contiguous().T
    for w in (w_slice, w_col):
        w.requires_grad_()
        got = loss_and_grads(lv.linear_cross_entropy, h_t, w, targets[None].T.contiguous().T[0], bias,
                             backend=backend)
        assert_close_all(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("row", ["default", "all"])
def test_low_precision_three_way(backend, dtype, row):
    """error(kernel, fp64) <= 2 * error(torch at the same dtype, fp64) + small atol, for loss and gradients."""
    opts = dict(OPTION_ROWS[row])
    has_bias = opts.pop("bias", False)
    hidden, weight, targets, bias = make_inputs(v=1031, dtype=dtype, bias=has_bias,
                                                ignore_index=opts.get("ignore_index", IGNORE))
    upstream = torch.rand(targets.shape) if opts.get("reduction") == "none" else None
    up64 = upstream.double() if upstream is not None else None

    def as64(t):
        return t.detach().double().requires_grad_() if t is not None else None

    exact = loss_and_grads(reference_loss, as64(hidden), as64(weight), targets, as64(bias), up64, **opts)
    same_dtype = loss_and_grads(lambda *a, **k: reference_loss(*a, dtype=dtype, **k), hidden, weight, targets, bias,
                                upstream, **opts)
    ours = loss_and_grads(lv.linear_cross_entropy, hidden, weight, targets, bias, upstream, backend=backend, **opts)

    def err(x, ref):
        return ((x.double() - ref).norm() / ref.norm().clamp(min=1e-30)).item()

    atol = 1e-6
    assert err(ours[0], exact[0]) <= 2 * err(same_dtype[0], exact[0]) + atol
    for i, (g_ours, g_torch, g_exact) in enumerate(zip(ours[1], same_dtype[1], exact[1], strict=True)):
        assert g_ours.dtype == dtype
        assert err(g_ours, g_exact) <= 2 * err(g_torch, g_exact) + atol, f"gradient {i} (hidden, weight, bias)"


def test_filter_skips_tiles_within_the_documented_bound():
    """Targets live in the first vocabulary block and the rest of the vocabulary is unlikely: those tiles go."""
    gen = torch.Generator().manual_seed(3)
    n, d, v = 200, 64, 3000
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.05
    weight[:400] *= 20.0
    weight.requires_grad_()
    targets = torch.randint(0, 400, (n,), generator=gen)
    eps = 1e-3
    exact = loss_and_grads(lv.linear_cross_entropy, hidden, weight, targets, None, reduction="sum", backend="triton")
    got = loss_and_grads(lv.linear_cross_entropy, hidden, weight, targets, None, reduction="sum", backend="triton",
                         filter_eps=eps)
    torch.testing.assert_close(got[0], exact[0], rtol=0, atol=0)  # the forward is exact
    dh_err = (got[1][0] - exact[1][0]).norm(dim=1)
    dw_err = (got[1][1] - exact[1][1]).norm(dim=1)
    assert dw_err[512:].max() > 0, "no tile was skipped: the test data no longer exercises filtering"
    bound_h = eps * weight.detach().norm(dim=1).sum()  # |g_n| = 1 for reduction="sum"
    bound_w = eps * hidden.detach().norm(dim=1).sum()
    assert torch.all(dh_err <= bound_h) and torch.all(dw_err <= bound_w)


def test_filter_with_a_huge_threshold_drops_every_tile_and_torch_backend_stays_exact():
    hidden, weight, targets, _ = make_inputs(v=1031)
    exact = loss_and_grads(reference_loss, hidden, weight, targets, None)
    dropped = loss_and_grads(lv.linear_cross_entropy, hidden, weight, targets, None, filter_eps=10.0,
                             backend="triton")
    assert all(torch.count_nonzero(g) == 0 for g in dropped[1])
    torch.testing.assert_close(dropped[0], exact[0], rtol=1e-9, atol=1e-11)
    kept = loss_and_grads(lv.linear_cross_entropy, hidden, weight, targets, None, filter_eps=10.0, backend="torch")
    assert_close_all(kept, exact, rtol=1e-9, atol=1e-11)


def test_filter_auto_in_float32_is_close_to_exact():
    hidden, weight, targets, _ = make_inputs(v=1031, dtype=torch.float32)
    exact = loss_and_grads(lv.linear_cross_entropy, hidden, weight, targets, None, backend="triton")
    auto = loss_and_grads(lv.linear_cross_entropy, hidden, weight, targets, None, backend="triton",
                          filter_eps="auto")
    assert_close_all(auto, exact, rtol=1e-5, atol=1e-7)


def test_filter_sorts_the_vocabulary_so_scattered_targets_still_let_tiles_go(monkeypatch):
    """Targets scattered over the whole vocabulary put one in every vocabulary block: unsorted, no tile can be
    skipped; visiting the most frequent targets first (CCE's vocabulary sorting) frees the other tiles."""
    gen = torch.Generator().manual_seed(4)
    n, d, v = 200, 64, 3000
    hot = torch.randperm(v, generator=gen)[:40]
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.05
    weight[hot] *= 20.0
    weight.requires_grad_()
    targets = hot[torch.randint(0, len(hot), (n,), generator=gen)]
    assert len({int(t) // 512 for t in targets}) == (v + 511) // 512  # every vocabulary block holds a target
    eps = 1e-3

    def grads(**opts):
        return loss_and_grads(lv.linear_cross_entropy, hidden, weight, targets, None, reduction="sum",
                              backend="triton", **opts)

    exact = grads()
    sorted_run = grads(filter_eps=eps)
    dw_err = (sorted_run[1][1] - exact[1][1]).norm(dim=1)
    dh_err = (sorted_run[1][0] - exact[1][0]).norm(dim=1)
    assert dw_err.max() > 0, "sorting freed no tile"
    assert torch.all(dh_err <= eps * weight.detach().norm(dim=1).sum())
    assert torch.all(dw_err <= eps * hidden.detach().norm(dim=1).sum())
    monkeypatch.setattr(triton_ce, "_vocab_order", lambda *args: None)
    unsorted = grads(filter_eps=eps)
    assert_close_all(unsorted, exact, rtol=0, atol=0)  # unsorted, every tile holds a target: nothing skipped
