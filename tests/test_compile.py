"""torch.compile(fullgraph=True) of every public loss: one graph, no break, results equal to eager mode.

The losses are custom ops (largevocab/ops/_library.py), so Dynamo traces them as opaque nodes. Most cases compile
with ``aot_eager`` (Dynamo + AOTAutograd + the ops' fake implementations: everything our code contributes); a few
go through Inductor too. SCE and in-batch sampled CE have sizes that depend on tensor values (the number of
non-ignored rows), which Dynamo traces only with ``capture_dynamic_output_shape_ops``; without it they break the
graph once, at that op (tested below).
"""

import pytest
import torch

import largevocab as lv

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["torch", "triton"]
V, D = 53, 16


def inputs(seq=7, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, seq, D, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, D, generator=gen, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (2, seq), generator=gen)
    targets[0, :2] = -100
    return hidden, weight, targets


BIAS = torch.randn(V, generator=torch.Generator().manual_seed(9), requires_grad=True)
COUNTS = torch.arange(1, V + 1, dtype=torch.float32)

LOSSES = {
    "ce all options": lambda h, w, y, b: lv.linear_cross_entropy(
        h, w, y, bias=BIAS, shift=1, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, backend=b),
    "ce none": lambda h, w, y, b: (lv.linear_cross_entropy(h, w, y, reduction="none", backend=b)
                                   * torch.linspace(0, 1, y.numel()).reshape(y.shape)).sum(),
    "ce with lse": lambda h, w, y, b: sum(
        t.sum() for t in lv.linear_cross_entropy_with_lse(h, w, y, reduction="sum", backend=b)),
    "ce module": lambda h, w, y, b: lv.LinearCrossEntropyLoss(z_loss=1e-2, backend=b)(h, w, y),
    "sampled uniform": lambda h, w, y, b: lv.sampled_cross_entropy(h, w, y, num_negatives=8, backend=b),
    "sampled shared popularity": lambda h, w, y, b: lv.sampled_cross_entropy(
        h, w, y, num_negatives=8, shared_negatives=True, sampling="popularity", item_counts=COUNTS, backend=b),
    "sampled explicit": lambda h, w, y, b: lv.sampled_cross_entropy(
        h, w, y, negatives=torch.arange(0, V, 4), item_counts=COUNTS, backend=b),
}
DATA_DEPENDENT = {
    "sce": lambda h, w, y, b: lv.scalable_cross_entropy(h, w, y, bucket_size_y=16, backend=b),
    "sce sizes given": lambda h, w, y, b: lv.scalable_cross_entropy(h, w, y, n_buckets=3, bucket_size_x=5,
                                                                    bucket_size_y=16, backend=b),
    "sampled in batch": lambda h, w, y, b: lv.sampled_cross_entropy(h, w, y, sampling="in_batch", backend=b),
}


def run(fn, hidden, weight, targets, backend, seed=1):
    torch.manual_seed(seed)  # the random losses draw from the global generator, compiled or not
    loss = fn(hidden, weight, targets, backend)
    return [loss.detach(), *torch.autograd.grad(loss, (hidden, weight))]


def assert_same(got, want):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.fixture
def dynamic_output_shapes():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_fullgraph_compile_equals_eager(name, backend):
    torch._dynamo.reset()
    fn = LOSSES[name]
    hidden, weight, targets = inputs()
    explained = torch._dynamo.explain(fn)(hidden, weight, targets, backend)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_same(run(compiled, hidden, weight, targets, backend), run(fn, hidden, weight, targets, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(DATA_DEPENDENT))
def test_data_dependent_sizes_compile_with_dynamic_output_shapes(name, backend, dynamic_output_shapes):
    fn = DATA_DEPENDENT[name]
    hidden, weight, targets = inputs()
    explained = torch._dynamo.explain(fn)(hidden, weight, targets, backend)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert_same(run(compiled, hidden, weight, targets, backend), run(fn, hidden, weight, targets, backend))


def test_data_dependent_sizes_cost_exactly_one_break_without_the_flag():
    torch._dynamo.reset()
    hidden, weight, targets = inputs()
    explained = torch._dynamo.explain(DATA_DEPENDENT["sce"])(hidden, weight, targets, "torch")
    assert explained.graph_break_count == 1
    assert "depends on input Tensor data" in str(explained.break_reasons[0].reason)


@pytest.mark.parametrize("name", ["ce all options", "sampled uniform", "sce"])
def test_inductor_compile_equals_eager(name, dynamic_output_shapes):
    fn = {**LOSSES, **DATA_DEPENDENT}[name]
    hidden, weight, targets = inputs()
    compiled = torch.compile(fn, fullgraph=True)
    assert_same(run(compiled, hidden, weight, targets, "torch"), run(fn, hidden, weight, targets, "torch"))


def test_dynamic_shapes_recompile_at_most_once(dynamic_output_shapes):
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    fn = LOSSES["ce all options"]
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=counting_backend)
    for seq in (7, 12, 19):
        hidden, weight, targets = inputs(seq=seq)
        assert_same(run(compiled, hidden, weight, targets, "torch"), run(fn, hidden, weight, targets, "torch"))
    assert len(compiles) <= 2


def test_compiled_target_check_still_raises_on_the_cpu():
    torch._dynamo.reset()
    hidden, weight, targets = inputs()
    compiled = torch.compile(lambda h, w, y: lv.linear_cross_entropy(h, w, y), fullgraph=True, backend="aot_eager")
    compiled(hidden, weight, targets)
    bad = targets.clone()
    bad[1, 3] = V + 4
    with pytest.raises(ValueError, match=f"found {V + 4}"):
        compiled(hidden, weight, bad)


def test_a_generator_under_compile_is_refused_with_an_explanation():
    torch._dynamo.reset()
    hidden, weight, targets = inputs()
    gen = torch.Generator().manual_seed(0)
    compiled = torch.compile(lambda h, w, y: lv.sampled_cross_entropy(h, w, y, num_negatives=4, generator=gen),
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="generator=None"):
        compiled(hidden, weight, targets)


def test_autocast_inside_a_compiled_step():
    torch._dynamo.reset()
    hidden, weight, targets = inputs()

    def step(h, w, y, backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lv.linear_cross_entropy(h.bfloat16(), w, y, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert_same(run(compiled, hidden, weight, targets, "torch"), run(step, hidden, weight, targets, "torch"))
