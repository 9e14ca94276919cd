"""Vocabulary-parallel losses on gloo ranks spawned from pytest: every loss, option set and shard split equals the
single-process computation on the concatenated weight (loss, LSE and every gradient), in float64 and float32;
bad inputs raise on every rank instead of hanging.

Each spawn runs a whole table of cases (starting processes costs seconds; the cases are milliseconds).
"""

import pytest
import torch

import largevocab as lv

from distributed import run_ranks

V, D, N = 67, 12, 21  # odd sizes: uneven shards and ragged kernel blocks
CE_OPTIONS = {
    "default": {},
    "all": dict(bias=True, label_smoothing=0.1, z_loss=1e-2, softcap=4.0, shift=1, reduction="sum"),
    "none": dict(reduction="none"),
    "ignore inside": dict(ignore_index=3),
    "ignore outside": dict(ignore_index=V + 5),
    "lse": dict(with_lse=True, label_smoothing=0.2),
}
SPLITS = {2: {"even": [34, 33], "uneven": [10, 57], "empty": [0, 67]},
          3: {"even": [23, 22, 22], "uneven": [5, 50, 12], "empty": [30, 0, 37]}}


def _problem(dtype, seed=0, ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, N // 3, D, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, D, generator=gen, dtype=torch.float64) * 2).to(dtype)
    bias = torch.randn(V, generator=gen, dtype=torch.float64).to(dtype)
    targets = torch.randint(0, V, (3, N // 3), generator=gen)
    targets[0, ::2] = ignore_index
    upstream = torch.rand(3, N // 3, generator=gen, dtype=torch.float64).to(dtype)
    return hidden, weight, bias, targets, upstream


def _ce_case(rank, sizes, options, dtype, backend, group=None, dtensor=False):
    """Loss, LSE and gradients of the sharded call and of the unsharded one, on this rank."""
    options = dict(options)
    with_lse = options.pop("with_lse", False)
    use_bias = options.pop("bias", False)
    hidden, weight, bias, targets, upstream = _problem(dtype, ignore_index=options.get("ignore_index", -100))
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]

    def run(h, w, b, **kw):
        fn = lv.linear_cross_entropy_with_lse if with_lse else lv.linear_cross_entropy
        out = fn(h, w, targets, bias=b, backend=backend, **options, **kw)
        loss, lse = out if with_lse else (out, None)
        total = (loss * upstream).sum() if loss.dim() else loss
        if lse is not None:
            total = total + (lse * upstream).sum()
        params = [t for t in (h, w, b) if t is not None]
        grads = torch.autograd.grad(total, params)
        for p, g in zip(params, grads, strict=True):
            if type(p).__name__ == "DTensor":  # the gradient keeps the parameter's placement
                assert type(g).__name__ == "DTensor" and g.placements == p.placements, (type(g), p.placements)
        grads = [g.to_local() if type(g).__name__ == "DTensor" else g for g in grads]
        return [loss.detach(), *(x.detach() for x in [lse] if x is not None), *grads]

    full = run(hidden.clone().requires_grad_(), weight.clone().requires_grad_(),
               bias.clone().requires_grad_() if use_bias else None)
    h = hidden.clone().requires_grad_()
    if dtensor:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (len(sizes),))
        w = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
        b = distribute_tensor(bias.clone(), mesh, [Shard(0)]).requires_grad_() if use_bias else None
        chunk = -(-V // len(sizes))  # torch.chunk's split: the last shard is the short one
        lo, hi = min(rank * chunk, V), min((rank + 1) * chunk, V)
        got = run(h, w, b)
    else:
        w = weight[lo:hi].clone().requires_grad_()
        b = bias[lo:hi].clone().requires_grad_() if use_bias else None
        got = run(h, w, b, process_group=group or torch.distributed.group.WORLD)
    n_rows_out = len(full) - (2 if use_bias else 1)
    want = full[:n_rows_out] + [t[lo:hi] for t in full[n_rows_out:]]
    return got, want


def _check(got, want, dtype):
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **tol)


def ce_worker(rank, world, backend, deterministic, splits, option_names):
    torch.use_deterministic_algorithms(deterministic)
    checked = 0
    for split in splits:
        sizes = SPLITS[world][split]
        for name in option_names:
            options = CE_OPTIONS[name]
            for dtype in (torch.float64, torch.float32):
                if dtype == torch.float32 and name not in ("default", "all"):
                    continue
                try:
                    _check(*_ce_case(rank, sizes, options, dtype, backend), dtype)
                except AssertionError as e:
                    raise AssertionError(f"split {split} {sizes}, options {name}, {dtype}: {e}") from e
                checked += 1
    return checked


def dtensor_worker(rank, world, backend):
    for name in ("default", "all", "lse"):
        _check(*_ce_case(rank, [0] * world, CE_OPTIONS[name], torch.float64, backend, dtensor=True),
               torch.float64)
    return True


# The Triton kernels run on the interpreter here: fewer of the (already torch-checked) combinations.
ALL_SPLITS, ALL_OPTIONS = ("even", "uneven", "empty"), tuple(CE_OPTIONS)


@pytest.mark.parametrize(("world", "backend", "deterministic", "splits", "option_names"), [
    (2, "torch", False, ALL_SPLITS, ALL_OPTIONS), (3, "torch", False, ALL_SPLITS, ALL_OPTIONS),
    (2, "triton", False, ("uneven", "empty"), ALL_OPTIONS), (2, "triton", True, ("uneven",), ("all", "lse")),
])
def test_vocab_parallel_cross_entropy_equals_unsharded(world, backend, deterministic, splits, option_names):
    counts = run_ranks(ce_worker, world, args=(backend, deterministic, splits, option_names))
    float32_rows = sum(name in ("default", "all") for name in option_names)
    assert counts[0] == len(splits) * (len(option_names) + float32_rows)


@pytest.mark.parametrize("backend", ["torch"])
def test_dtensor_weight_sharded_on_a_mesh(backend):
    assert all(run_ranks(dtensor_worker, 3, args=(backend,)))


SCE_OPTIONS = {"defaults": dict(bucket_size_y=16), "sizes": dict(n_buckets=3, bucket_size_x=6, bucket_size_y=40),
               "no mix": dict(mix_x=False, bucket_size_y=9, reduction="sum"), "none": dict(reduction="none")}
SAMPLED_OPTIONS = {
    "uniform": dict(num_negatives=7), "shared": dict(num_negatives=11, shared_negatives=True),
    "popularity": dict(num_negatives=5, sampling="popularity", item_counts=torch.arange(1.0, V + 1)),
    "in batch": dict(sampling="in_batch"), "explicit no logq": dict(negatives=torch.arange(0, V, 3),
                                                                      logq_correction=False),
    "keep hits, none": dict(num_negatives=6, remove_accidental_hits=False, reduction="none"),
}


def _approximate_case(rank, sizes, fn, options, backend):
    hidden, weight, _, targets, upstream = _problem(torch.float64)
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])

    def run(h, w, **kw):
        loss = fn(h, w, targets, generator=torch.Generator().manual_seed(5), backend=backend, **options, **kw)
        total = (loss * upstream).sum() if loss.dim() else loss
        return [loss.detach(), *torch.autograd.grad(total, (h, w))]

    full = run(hidden.clone().requires_grad_(), weight.clone().requires_grad_())
    got = run(hidden.clone().requires_grad_(), weight[lo:hi].clone().requires_grad_(),
              process_group=torch.distributed.group.WORLD)
    return got, [full[0], full[1], full[2][lo:hi]]


def approximate_worker(rank, world, backend):
    checked = 0
    # Sharded sampled CE runs the torch code on every backend; Triton only changes SCE's bucket kernel.
    tables = [(SCE_OPTIONS, lv.scalable_cross_entropy)]
    if backend == "torch":
        tables.append((SAMPLED_OPTIONS, lv.sampled_cross_entropy))
    for split, sizes in SPLITS[world].items():
        for table, fn in tables:
            for name, options in table.items():
                try:
                    _check(*_approximate_case(rank, sizes, fn, options, backend), torch.float64)
                except AssertionError as e:
                    raise AssertionError(f"{fn.__name__} split {split} {sizes}, options {name}: {e}") from e
                checked += 1
    return checked


@pytest.mark.parametrize(("world", "backend"), [(2, "torch"), (3, "torch"), (2, "triton")])
def test_vocab_parallel_sce_and_sampled_equal_unsharded(world, backend):
    """Same generator state on every rank: the same buckets and negatives as the unsharded call, so equal."""
    counts = run_ranks(approximate_worker, world, args=(backend,))
    assert counts[0] == len(SPLITS[world]) * (len(SCE_OPTIONS) + (len(SAMPLED_OPTIONS) if backend == "torch" else 0))


def bad_input_worker(rank, world):
    import torch.distributed as dist

    hidden, weight, bias, targets, _ = _problem(torch.float64)
    group = dist.group.WORLD
    shard = weight[rank * 30:(rank + 1) * 30]
    raised = {}

    def expect(name, call):
        try:
            call()
        except (ValueError, TypeError) as e:
            raised[name] = str(e)
        else:
            raised[name] = None

    expect("target >= V", lambda: lv.linear_cross_entropy(hidden, shard, targets.clamp(min=0) + 60,
                                                           process_group=group))
    # Shard shapes are read once per (group, shard shape): a fresh group, as a first use.
    fresh = dist.new_group(list(range(world)))
    other_d = shard if rank == 0 else torch.randn(30, D + 1, dtype=torch.float64)
    expect("D differs", lambda: lv.linear_cross_entropy(hidden, other_d, targets, process_group=fresh))
    lv.parallel.set_replication_check(True)
    try:
        differs = hidden + rank
        expect("hidden differs", lambda: lv.linear_cross_entropy(differs, shard, targets, process_group=group))
    finally:
        lv.parallel.set_replication_check(False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (1, world))
    w2d = DTensor.from_local(shard, mesh, [Replicate(), Shard(0)], run_check=False)
    expect("2-D mesh", lambda: lv.linear_cross_entropy(hidden, w2d, targets))
    # After all of that the group still works: nobody is stuck in a collective.
    ok = lv.linear_cross_entropy(hidden, shard, targets.clamp(max=59), process_group=group)
    return raised, float(ok)


def test_bad_input_raises_on_every_rank_without_a_hang():
    results = run_ranks(bad_input_worker, 2, timeout=60)
    for raised, _ in results:
        assert raised["target >= V"] and "[0, V=60)" in raised["target >= V"]
        assert raised["D differs"] and "same D" in raised["D differs"]
        assert raised["hidden differs"] and "identical on every rank" in raised["hidden differs"]
        assert raised["2-D mesh"] and "1-D device mesh" in raised["2-D mesh"]
    assert results[0][1] == results[1][1]
