"""Scalable Cross-Entropy: exact CE as a special case, a direct transcription of the reference algorithm, and
the fused bucket kernel against the chunked torch backend."""

import pytest
import torch
import torch.nn.functional as F

import largevocab as lv
from largevocab.scalable import bucket_vectors, sce_from_selection, select_items, select_rows

BACKENDS = ["torch", "triton"]
N, D, V = 211, 37, 1301
IGNORE = -100


def make(n=N, d=D, v=V, dtype=torch.float64, seed=0, ignore_every=9):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.4).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::ignore_every] = IGNORE
    return hidden, weight, targets


def grads(loss, hidden, weight):
    return [loss.detach(), *torch.autograd.grad(loss, (hidden, weight))]


def assert_all_close(got, want, **tol):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


def transcription(hidden, weight, targets, buckets, b_x, b_y):
    """The reference algorithm written out with materialised scores and logits (autograd does the backward)."""
    valid = targets != IGNORE
    x_scores = (buckets @ hidden.detach().T).masked_fill(~valid, float("-inf"))
    rows = x_scores.topk(b_x, dim=1).indices
    cols = (buckets @ weight.detach().T).topk(b_y, dim=1).indices
    positive = (hidden * weight[targets.clamp(min=0)]).sum(-1)
    per_bucket = torch.full((buckets.shape[0], hidden.shape[0]), float("-inf"), dtype=hidden.dtype)
    for k in range(buckets.shape[0]):
        logits = hidden[rows[k]] @ weight[cols[k]].T
        logits = logits.masked_fill(cols[k][None, :] == targets[rows[k]][:, None], float("-inf"))
        with_positive = torch.cat([positive[rows[k]][:, None], logits], dim=1)
        ce = torch.logsumexp(with_positive, dim=1) - positive[rows[k]]
        per_bucket = per_bucket.index_put((torch.full_like(rows[k], k), rows[k]), ce)
    row_loss, _ = per_bucket.max(dim=0)
    covered = torch.isfinite(row_loss)
    return torch.where(covered, row_loss, torch.zeros_like(row_loss)).sum() / covered.sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_bucket_covering_everything_is_exact_cross_entropy(backend, reduction):
    hidden, weight, targets = make()
    m = int((targets != IGNORE).sum())
    got = lv.scalable_cross_entropy(hidden, weight, targets, n_buckets=1, bucket_size_x=m, bucket_size_y=V,
                                    reduction=reduction, backend=backend)
    want = F.cross_entropy(hidden @ weight.T, targets, reduction=reduction)
    upstream = torch.rand(N, dtype=torch.float64) if reduction == "none" else None
    reduce = (lambda t: (t * upstream).sum()) if upstream is not None else (lambda t: t)  # noqa: E731
    assert_all_close(grads(reduce(got), hidden, weight), grads(reduce(want), hidden, weight), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix_x", [True, False])
def test_matches_a_direct_transcription_on_fixed_buckets(backend, mix_x):
    hidden, weight, targets = make()
    valid = targets != IGNORE
    b_x, b_y = 29, 57
    buckets = bucket_vectors(hidden, valid, 13, mix_x, torch.Generator().manual_seed(1))
    rows = select_rows(hidden, valid, buckets, b_x)
    cols = select_items(weight, buckets, b_y, chunk=100)  # several chunks of the running top-k
    safe = torch.where(valid, targets, 0)
    loss, _ = sce_from_selection(hidden, weight, safe, valid, rows, cols, reduction="mean", backend=backend)
    want = transcription(hidden, weight, targets, buckets, b_x, b_y)
    assert_all_close(grads(loss, hidden, weight), grads(want, hidden, weight), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_matches_torch_with_the_same_generator(reduction):
    hidden, weight, targets = make(dtype=torch.float32)

    def run(backend):
        loss = lv.scalable_cross_entropy(hidden, weight, targets, bucket_size_y=100, reduction=reduction,
                                         generator=torch.Generator().manual_seed(7), backend=backend)
        return grads(loss.sum(), hidden, weight)

    assert_all_close(run("triton"), run("torch"), rtol=1e-5, atol=1e-6)


def test_running_top_k_equals_a_global_top_k():
    _, weight, _ = make()
    buckets = torch.randn(5, D, dtype=torch.float64)
    want = (buckets @ weight.detach().T).topk(40, dim=1).indices.sort(dim=1).values
    for chunk in (40, 97, 1000, V):
        got = select_items(weight, buckets, 40, chunk=chunk).sort(dim=1).values
        assert torch.equal(got, want), chunk


@pytest.mark.parametrize("backend", BACKENDS)
def test_uncovered_rows_get_no_loss_and_no_gradient(backend):
    hidden, weight, targets = make()
    per_row = lv.scalable_cross_entropy(hidden, weight, targets, n_buckets=1, bucket_size_x=5, bucket_size_y=50,
                                        reduction="none", backend=backend, generator=torch.Generator().manual_seed(0))
    covered = per_row != 0
    assert covered.sum() == 5 and torch.isfinite(per_row).all()
    (grad_h,) = torch.autograd.grad(per_row.sum(), (hidden,))
    assert torch.count_nonzero(grad_h[~covered]) == 0 and torch.count_nonzero(grad_h[covered]) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored(backend):
    hidden, weight, targets = make()
    loss = lv.scalable_cross_entropy(hidden, weight, torch.full_like(targets, IGNORE), backend=backend)
    assert loss.item() == 0.0
    grad_h, grad_w = torch.autograd.grad(loss, (hidden, weight))
    assert torch.count_nonzero(grad_h) == 0 and torch.count_nonzero(grad_w) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bucket_size_y_beyond_the_catalogue_is_clamped_and_gives_exact_per_row_ce(backend):
    hidden, weight, targets = make(v=300)
    per_row = lv.scalable_cross_entropy(hidden, weight, targets, bucket_size_y=10_000, reduction="none",
                                        backend=backend, generator=torch.Generator().manual_seed(3))
    exact = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    covered = per_row != 0
    assert covered.any()
    torch.testing.assert_close(per_row[covered], exact[covered], rtol=1e-9, atol=1e-12)
    torch.autograd.grad(per_row.sum(), (hidden, weight))  # differentiable


def test_generator_makes_a_step_reproducible():
    hidden, weight, targets = make()

    def loss(seed):
        return lv.scalable_cross_entropy(hidden, weight, targets, bucket_size_y=64,
                                         generator=torch.Generator().manual_seed(seed))

    assert torch.equal(loss(11), loss(11)) and not torch.equal(loss(11), loss(12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bucket_lse_gradcheck_and_fully_masked_rows(backend):
    op = lambda *args: torch.ops.largevocab.bucket_lse(*args, backend)  # noqa: E731
    hidden, weight, _ = make(n=9, d=5, v=17)
    targets = torch.arange(9) % 17
    rows = torch.tensor([[0, 1, 2, 3], [3, 4, 5, 8], [6, 7, 0, 1]])
    cols = torch.tensor([[0, 5, 9], [4, 5, 6], [7, 6, 16]])  # bucket 0 row 0 and bucket 1 rows 4-6 hit targets
    fn = lambda h, w: op(h, w, targets, rows, cols)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight), fast_mode=backend == "triton")
    # A row whose only candidate is its own target: lse = -inf, zero (not NaN) gradient.
    lse, _ = op(hidden, weight, targets, torch.tensor([[2, 3]]), torch.tensor([[2]]))
    assert lse[0, 0] == float("-inf") and torch.isfinite(lse[0, 1])
    grad_h, grad_w = torch.autograd.grad(lse[0, 1], (hidden, weight))
    assert torch.isfinite(grad_h).all() and torch.isfinite(grad_w).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_three_way(backend, dtype):
    hidden, weight, targets = make(dtype=dtype)
    valid = targets != IGNORE
    buckets = bucket_vectors(hidden, valid, 9, True, torch.Generator().manual_seed(2))
    rows, cols = select_rows(hidden, valid, buckets, 21), select_items(weight, buckets, 64)
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    safe = torch.where(valid, targets, 0)
    exact = grads(sce_from_selection(h64, w64, safe, valid, rows, cols, reduction="mean", backend="torch")[0],
                  h64, w64)
    same = grads(transcription_low(hidden, weight, targets, rows, cols), hidden, weight)
    ours = grads(sce_from_selection(hidden, weight, safe, valid, rows, cols, reduction="mean", backend=backend)[0],
                 hidden, weight)
    for got, torch_same, ref in zip(ours, same, exact, strict=True):
        err = lambda x, ref=ref: ((x.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        assert err(got) <= 2 * err(torch_same) + 1e-6


def transcription_low(hidden, weight, targets, rows, cols):
    """Torch at the inputs' dtype: materialised bucket logits in that dtype, softmax in float32."""
    logits = (hidden[rows] @ weight[cols].mT).float()
    logits = logits.masked_fill(cols[:, None, :] == targets[rows][..., None], float("-inf"))
    positive = (hidden * weight[targets.clamp(min=0)]).sum(-1).float()[rows]
    ce = torch.cat([positive[..., None], logits], -1).logsumexp(-1) - positive
    row_loss = ce.new_zeros(hidden.shape[0]).scatter_reduce(0, rows.flatten(), ce.flatten(), "amax",
                                                             include_self=False)
    covered = torch.zeros(hidden.shape[0], dtype=torch.bool).index_fill_(0, rows.flatten(), True)
    return row_loss.sum() / covered.sum()


BAD = [
    (dict(n_buckets=0), ValueError, "n_buckets"),
    (dict(bucket_size_x=0), ValueError, "bucket_size_x"),
    (dict(bucket_size_y=0), ValueError, "bucket_size_y"),
    (dict(bucket_size_y=None), TypeError, "bucket_size_y"),
    (dict(n_buckets=2.5), TypeError, "n_buckets"),
    (dict(mix_x=1), TypeError, "mix_x"),
    (dict(generator=3), TypeError, "generator"),
    (dict(reduction="avg"), ValueError, "avg"),
    (dict(backend="gpu"), ValueError, "gpu"),
]


@pytest.mark.parametrize("kwargs, error, fragment", BAD)
def test_bad_options(kwargs, error, fragment):
    hidden, weight, targets = make(n=20, v=50)
    with pytest.raises(error, match=fragment):
        lv.scalable_cross_entropy(hidden, weight, targets, **kwargs)


def test_bad_targets_and_module_equals_function():
    hidden, weight, targets = make(n=20, v=50)
    with pytest.raises(ValueError, match="50"):
        lv.scalable_cross_entropy(hidden, weight, torch.full_like(targets, 50))
    module = lv.ScalableCrossEntropyLoss(bucket_size_y=16, generator=torch.Generator().manual_seed(4))
    function = lv.scalable_cross_entropy(hidden, weight, targets, bucket_size_y=16,
                                         generator=torch.Generator().manual_seed(4))
    assert torch.equal(module(hidden, weight, targets), function)
    with pytest.raises(ValueError, match="n_buckets"):
        lv.ScalableCrossEntropyLoss(n_buckets=-1)
