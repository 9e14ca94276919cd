"""Regression tests for the defects a property-based fuzzer found in the core (issue 12), one group per defect.

The property-based suite (tests/test_properties.py) draws the general cases; these pin the exact reproductions.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import largevocab as lv

from reference import reference_loss, reference_loss_and_lse

BACKENDS = ["torch", "triton"]


def grads_of(loss, *params):
    params = [p for p in params if p is not None and p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


# 1. ---------------------------------------------------- every combination of inputs that need a gradient


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("needs", [(h, w, b) for h in (0, 1) for w in (0, 1) for b in (0, 1) if h or w or b])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_any_subset_of_inputs_needing_a_gradient(backend, needs, deterministic):
    """The deterministic dW kernel used to write V x D values into a placeholder when only the bias needed a
    gradient (SIGSEGV on the CPU, silent corruption on a GPU)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 9, generator=gen, dtype=torch.float64)
    weight = torch.randn(300, 9, generator=gen, dtype=torch.float64)
    bias = torch.randn(300, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 300, (40,), generator=gen)
    for t, need in zip((hidden, weight, bias), needs, strict=True):
        t.requires_grad_(bool(need))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        got = grads_of(lv.linear_cross_entropy(hidden, weight, targets, bias=bias, backend=backend),
                       hidden, weight, bias)
    finally:
        torch.use_deterministic_algorithms(previous)
    want = grads_of(reference_loss(hidden, weight, targets, bias=bias), hidden, weight, bias)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("loss", ["sce", "sampled rows", "sampled shared"])
@pytest.mark.parametrize("needs", [(1, 0), (0, 1)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sce_and_sampled_any_subset_of_inputs_needing_a_gradient(backend, needs, loss):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(30, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 50, (30,), generator=gen)
    if loss == "sce":
        def fn(h, w, b):
            return lv.scalable_cross_entropy(h, w, targets, n_buckets=3, bucket_size_x=10, bucket_size_y=20,
                                             backend=b, generator=torch.Generator().manual_seed(2))
    else:
        shape = (16,) if loss.endswith("shared") else (30, 16)
        negatives = torch.randint(0, 50, shape, generator=gen)

        def fn(h, w, b):
            return lv.sampled_cross_entropy(h, w, targets, negatives=negatives, backend=b)
    hidden.requires_grad_(bool(needs[0]))
    weight.requires_grad_(bool(needs[1]))
    got = grads_of(fn(hidden, weight, backend), hidden, weight)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    full = grads_of(fn(hidden, weight, "torch"), hidden, weight)
    want = [g for g, need in zip(full, needs, strict=True) if need]
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


# 2. -------------------------------------------------------------- any ignore_index torch accepts


@pytest.mark.parametrize("ignore_index", [5, 6, 1000, -1, -(2**62)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_outside_the_vocabulary(backend, ignore_index):
    hidden = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, ignore_index, 4, ignore_index])
    got = lv.linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, backend=backend)
    want = F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)
    torch.testing.assert_close(got, want)
    for g, r in zip(grads_of(got, hidden, weight), grads_of(want, hidden, weight), strict=True):
        torch.testing.assert_close(g, r)
    sce = lv.scalable_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, backend=backend,
                                    n_buckets=1, bucket_size_x=2, bucket_size_y=5)
    torch.testing.assert_close(sce, want)  # one bucket holding every row and item is exact CE
    sampled = lv.sampled_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, backend=backend,
                                       negatives=torch.arange(5), logq_correction=False)
    torch.testing.assert_close(sampled, want)  # every item as a shared negative, hits removed, is exact CE
    negatives = lv.sample_negatives(targets, 5, num_negatives=3, ignore_index=ignore_index)
    assert negatives.shape == (4, 3)


# 3. ------------------------------------------------------------------------ shift pads in int64


def test_shift_with_narrow_target_dtypes():
    hidden = torch.randn(2, 6, 4, dtype=torch.float64)
    weight = torch.randn(200, 4, dtype=torch.float64)
    targets = torch.randint(0, 200, (2, 6))
    want = lv.linear_cross_entropy(hidden, weight, targets, shift=1)
    assert torch.equal(lv.linear_cross_entropy(hidden, weight, targets.to(torch.uint8), shift=1), want)
    big = 2**40  # does not fit int32: the padding must not overflow
    assert torch.equal(lv.linear_cross_entropy(hidden, weight, targets.int(), shift=1, ignore_index=big),
                       lv.linear_cross_entropy(hidden, weight, targets, shift=1, ignore_index=big))


# 4. ----------------------------------------------------------------- autocast as F.linear would


@pytest.mark.parametrize("fn", ["ce", "sce", "sampled"])
def test_autocast_with_bf16_activations_and_fp32_master_weights(fn):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 16, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(64, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 64, (20,), generator=gen)
    calls = {
        "ce": lambda h, w: lv.linear_cross_entropy(h, w, targets),
        "sce": lambda h, w: lv.scalable_cross_entropy(h, w, targets, generator=torch.Generator().manual_seed(1)),
        "sampled": lambda h, w: lv.sampled_cross_entropy(h, w, targets, negatives=torch.arange(0, 64, 3)),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = calls[fn](hidden, weight)
    want = calls[fn](hidden, weight.bfloat16())
    assert loss.dtype == torch.float32 and torch.equal(loss, want)
    loss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32


def test_autocast_keeps_float64_as_f_linear_does():
    hidden = torch.randn(5, 4, dtype=torch.float64)
    weight = torch.randn(7, 4, dtype=torch.float64)
    targets = torch.randint(0, 7, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lv.linear_cross_entropy(hidden, weight, targets)
        assert F.linear(hidden, weight).dtype == torch.float64
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets), rtol=1e-12, atol=1e-12)


# 5. -------------------------------------------------------- empty inputs keep an autograd graph


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input_has_a_graph_for_every_output(backend, reduction):
    hidden = torch.randn(0, 3, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.zeros(0, 3, dtype=torch.long)
    loss, lse = lv.linear_cross_entropy_with_lse(hidden, weight, targets, reduction=reduction, backend=backend)
    (loss.sum() + lse.sum()).backward()
    assert hidden.grad.shape == hidden.shape and torch.count_nonzero(weight.grad) == 0
    for call in (lambda: lv.sampled_cross_entropy(hidden, weight, targets, num_negatives=4, reduction=reduction,
                                                  backend=backend),
                 lambda: lv.sampled_cross_entropy(hidden, weight, targets, negatives=torch.arange(4),
                                                  reduction=reduction, backend=backend),
                 lambda: lv.scalable_cross_entropy(hidden, weight, targets, reduction=reduction, backend=backend)):
        weight.grad = None
        call().sum().backward()
        assert torch.count_nonzero(weight.grad) == 0


# 6. ------------------------------------------------------------------------ soft-cap precision


@pytest.mark.parametrize("softcap", [1e4, 1e6, 1e30, 0.5])
def test_triton_softcap_is_accurate_for_any_cap(softcap):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=gen)
    weight = torch.randn(500, 32, generator=gen)
    targets = torch.randint(0, 500, (64,), generator=gen)
    got, lse = lv.linear_cross_entropy_with_lse(hidden, weight, targets, softcap=softcap, backend="triton")
    want, want_lse = reference_loss_and_lse(hidden.double(), weight.double(), targets, softcap=softcap)
    # float32 logits are within ~eps * |logit| of float64 ones, whatever the cap.
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=0)
    torch.testing.assert_close(lse.double(), want_lse, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("softcap", [1e39, math.inf, True])
def test_softcap_beyond_float32_or_not_a_number_is_refused(softcap):
    with pytest.raises((ValueError, TypeError), match="softcap"):
        lv.linear_cross_entropy(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 1]), softcap=softcap)


# 7. ------------------------------------------------- float16 logits accumulate and stay in float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_logits_beyond_65504_do_not_overflow(backend):
    hidden = torch.full((3, 4), 200.0, dtype=torch.float16)  # logits of 4 * 200 * 200 = 160000 > 65504
    weight = torch.full((6, 4), 200.0, dtype=torch.float16)
    weight[1] = -200.0
    targets = torch.tensor([0, 1, 2])
    got = lv.linear_cross_entropy(hidden, weight, targets, reduction="none", backend=backend)
    want = reference_loss(hidden.double(), weight.double(), targets, reduction="none")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-3)


# 8. -------------------------------------------------- NaN / Inf as in the materialised computation


INF_ROWS = {
    "+inf": [math.inf, 0.0, 1.0, 2.0],
    "-inf": [-math.inf, 0.0, 1.0, 2.0],
    "+inf and -inf": [math.inf, -math.inf, 0.0, 1.0],
    "all -inf": [-math.inf] * 4,
    "nan": [math.nan, 0.0, 1.0, 2.0],
    "huge": [1e30, 0.0, -1e30, 1.0],
}


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("row", list(INF_ROWS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_logits_behave_like_torch(backend, row, smoothing):
    """Logits equal the bias here (hidden = 0), so each row of logits is set exactly."""
    bias = torch.tensor(INF_ROWS[row], dtype=torch.float64)
    hidden = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.ones(4, 2, dtype=torch.float64, requires_grad=True)
    bias.requires_grad_()
    targets = torch.arange(4)  # every column is the target once
    upstream = torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=torch.float64)
    got, lse = lv.linear_cross_entropy_with_lse(hidden, weight, targets, bias=bias, reduction="none",
                                                label_smoothing=smoothing, backend=backend)
    want, want_lse = reference_loss_and_lse(hidden, weight, targets, bias=bias, reduction="none",
                                            label_smoothing=smoothing)
    torch.testing.assert_close(got, want, equal_nan=True)
    torch.testing.assert_close(lse, want_lse, equal_nan=True)
    got_grads = grads_of((got * upstream).sum(), hidden, weight, bias)
    want_grads = grads_of((want * upstream).sum(), hidden, weight, bias)
    for g, r in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, r, equal_nan=True)


# 9. / 10. / 11. ------------------------------------------------- D = 0, meta tensors, sparse inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_hidden_size_is_uniform_cross_entropy(backend):
    hidden = torch.randn(5, 0, requires_grad=True)
    weight = torch.randn(7, 0, requires_grad=True)
    bias = torch.randn(7, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 4])
    got = lv.linear_cross_entropy(hidden, weight, targets, bias=bias, backend=backend)
    want = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    torch.testing.assert_close(got, want)
    for g, r in zip(grads_of(got, hidden, weight, bias), grads_of(want, hidden, weight, bias), strict=True):
        torch.testing.assert_close(g, r)


def test_meta_tensors_give_shapes_at_every_entry_point():
    hidden = torch.empty(2, 5, 8, device="meta", requires_grad=True)
    weight = torch.empty(30, 8, device="meta", requires_grad=True)
    targets = torch.empty(2, 5, dtype=torch.long, device="meta")
    loss, lse = lv.linear_cross_entropy_with_lse(hidden, weight, targets, shift=1)
    assert loss.shape == () and lse.shape == (2, 5) and loss.device.type == "meta"
    assert lv.linear_cross_entropy(hidden, weight, targets, reduction="none").shape == (2, 5)
    loss.backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
    assert lv.scalable_cross_entropy(hidden, weight, targets, n_buckets=2).shape == ()
    assert lv.sampled_cross_entropy(hidden, weight, targets, num_negatives=4, reduction="none").shape == (2, 5)
    assert lv.sampled_cross_entropy(hidden, weight, targets, num_negatives=4, shared_negatives=True).shape == ()


def test_item_counts_on_another_device_is_refused():
    hidden, weight, targets = torch.randn(4, 3), torch.randn(6, 3), torch.tensor([0, 1, 2, 3])
    counts = torch.ones(6, device="meta")
    with pytest.raises(ValueError, match="item_counts"):
        lv.sampled_cross_entropy(hidden, weight, targets, num_negatives=2, sampling="popularity",
                                 item_counts=counts)


@pytest.mark.parametrize("which", ["hidden", "weight"])
def test_sparse_inputs_are_a_type_error(which):
    hidden, weight, targets = torch.randn(4, 3), torch.randn(6, 3), torch.tensor([0, 1, 2, 3])
    args = {"hidden": hidden, "weight": weight}
    args[which] = args[which].to_sparse()
    for fn in (lv.linear_cross_entropy, lv.scalable_cross_entropy):
        with pytest.raises(TypeError, match=f"{which}.*dense"):
            fn(args["hidden"], args["weight"], targets)
    with pytest.raises(TypeError, match=f"{which}.*dense"):
        lv.sampled_cross_entropy(args["hidden"], args["weight"], targets, num_negatives=2)


# 12. / 13. / 14. / 15. --------------------------------------------------------------- bad options


@pytest.mark.parametrize("option", ["label_smoothing", "z_loss", "softcap"])
def test_bool_is_not_a_number(option):
    with pytest.raises(TypeError, match=option):
        lv.linear_cross_entropy(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 1]), **{option: True})


def test_n_buckets_is_checked_against_the_rows():
    with pytest.raises(ValueError, match="n_buckets"):
        lv.scalable_cross_entropy(torch.randn(10, 3), torch.randn(5, 3), torch.zeros(10, dtype=torch.long),
                                  n_buckets=10**12)


@pytest.mark.parametrize(("targets", "kwargs", "error", "fragment"), [
    (torch.tensor([0, 7]), {}, ValueError, "7"),
    (torch.tensor([0, -3]), {}, ValueError, "-3"),
    (torch.tensor([0.0, 1.0]), {}, TypeError, "integer"),
    ([0, 1], {}, TypeError, "Tensor"),
    (torch.tensor([0, 1]), {"ignore_index": 1.5}, TypeError, "ignore_index"),
    (torch.tensor([0, 1]), {"ignore_index": True}, TypeError, "ignore_index"),
])
def test_sample_negatives_validates_targets(targets, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        lv.sample_negatives(targets, 5, num_negatives=3, **kwargs)


@pytest.mark.parametrize("std", [math.inf, math.nan, -1.0, 0.0])
def test_factorized_embedding_refuses_a_non_finite_std(std):
    with pytest.raises(ValueError, match="std"):
        lv.FactorizedEmbedding(10, 4, 8, std=std)


def test_deferred_cuda_checks_raise_at_the_first_call_that_finds_them_done():
    """The non-strict CUDA path (torch.compile) copies its verdict to the host without a sync; a later call raises
    once the copy has landed, in order, and a pending copy does not block (simulated: no GPU here)."""
    from largevocab.ops._library import _PendingChecks

    class Event:
        def __init__(self, done):
            self.done = done

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    checks = _PendingChecks()
    ok, late = Event(True), Event(False)
    checks.items = [(ok, torch.tensor([0, 0]), "never {}"), (late, torch.tensor([1, 77]), "target {} out of range")]
    checks.raise_ready()  # the second copy has not landed: nothing to report yet, nothing waited for
    assert len(checks.items) == 1 and not late.done
    late.done = True
    with pytest.raises(ValueError, match="target 77 out of range.*earlier call"):
        checks.raise_ready()
    assert checks.items == []
    checks.items = [(Event(False), torch.tensor([1, -5]), "target {}")]
    with pytest.raises(ValueError, match="target -5"):
        checks.raise_ready(wait=True)  # largevocab.ops._library.raise_pending_errors() waits


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_inside_an_autocast_block_keeps_float32_gradients(backend):
    """backward() called inside the autocast block runs the ops' backward under autocast too; their float32
    accumulations must not be cast down."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (20,), generator=gen)
    calls = {
        "ce none": lambda h, w: lv.linear_cross_entropy(h, w, targets, reduction="none", backend=backend).sum(),
        "sce": lambda h, w: lv.scalable_cross_entropy(h, w, targets, bucket_size_y=9, backend=backend,
                                                      generator=torch.Generator().manual_seed(1)),
        "sampled": lambda h, w: lv.sampled_cross_entropy(h, w, targets, negatives=torch.arange(0, 50, 3),
                                                         backend=backend),
    }
    for name, call in calls.items():
        want = torch.autograd.grad(call(hidden, weight), (hidden, weight))
        h32, w32 = (t.detach().float().requires_grad_() for t in (hidden, weight))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = call(h32.bfloat16(), w32.bfloat16())
            got = torch.autograd.grad(loss, (h32, w32))
        plain = torch.autograd.grad(call(h32.bfloat16(), w32.bfloat16()), (h32, w32))
        for g, p in zip(got, plain, strict=True):
            torch.testing.assert_close(g, p, rtol=0, atol=0, msg=name)  # autocast changed nothing inside
        assert all(torch.isfinite(g).all() for g in want)
