"""The chunked torch backends hold one chunk's buffers at a time: their peak of live tensor bytes does not grow with
the number of chunks (beyond the O(N) outputs).

A loop that rebinds ``z = <next chunk's logits>`` while the previous chunk (or a gradient view of it) is still
referenced holds two chunks at the peak: the result is right, only the memory is doubled, so no value test sees it.
Here the peak is read from the profiler's allocation events (deterministic: every CPU allocation and free of a
tensor), for 1 and for 4 chunks of the same size; the difference must stay well below one chunk.
"""

import pytest
import torch

from largevocab._common import CEOptions
from largevocab.ops import torch_ce, torch_distill, torch_log_probs, torch_sampled, torch_sampled_shard, torch_sce
from largevocab.profiling import live_tensor_peak_bytes as live_peak_bytes

CHUNKS = 4
# Per-chunk buffers are 1-64 MiB below; what grows with N (outputs, dH at D = 8) stays under 0.1 MiB, and what
# does not (dW, the inputs) is the same for 1 and for 4 chunks.
GROWTH_LIMIT = 0.25  # of one chunk's bytes; a second chunk's buffer live at once adds at least 0.5


def assert_one_chunk_live(run, chunk_bytes: int) -> None:
    """``run(n_chunks)`` builds inputs outside the profile and returns the call to profile."""
    one, many = live_peak_bytes(run(1)), live_peak_bytes(run(CHUNKS))
    assert one >= chunk_bytes, (one, chunk_bytes)  # the measurement sees the chunk at all
    assert many - one < GROWTH_LIMIT * chunk_bytes, (
        f"peak {many / 2**20:.2f} MiB with {CHUNKS} chunks vs {one / 2**20:.2f} MiB with 1 (chunk "
        f"{chunk_bytes / 2**20:.2f} MiB): more than one chunk's buffers are live at once")


V, D, ROWS = 32768, 8, 128  # a logit chunk: 128 x 32768 float32 = 16 MiB; a cache block of rows is 4 MiB


def _dense_inputs(n_chunks: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = ROWS * n_chunks
    hidden, weight = torch.randn(n, D, generator=gen), torch.randn(V, D, generator=gen) * 0.3
    targets = torch.randint(0, V, (n,), generator=gen)
    return hidden, weight, targets, torch.ones(n, dtype=torch.bool)


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+grad"])
def test_cross_entropy_chunks(grad):
    def run(n_chunks):
        hidden, weight, targets, valid = _dense_inputs(n_chunks)
        g = torch.ones(hidden.shape[0]) if grad else None
        return lambda: torch_ce.forward(hidden, weight, None, targets, valid, CEOptions(), g, (grad, grad, False),
                                        chunk_rows=ROWS)

    assert_one_chunk_live(run, ROWS * V * 4)


@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_log_probs_chunks(direction, entropy):
    opts = torch_log_probs.LogProbOptions(entropy=entropy, temperature=0.9)

    def run(n_chunks):
        hidden, weight, targets, valid = _dense_inputs(n_chunks)
        if direction == "forward":
            return lambda: torch_log_probs.forward(hidden, weight, None, targets, valid, opts, chunk_rows=ROWS)
        _, ent, norm = torch_log_probs.forward(hidden, weight, None, targets, valid, opts, chunk_rows=ROWS)
        g = torch.ones(hidden.shape[0])
        return lambda: torch_log_probs.backward(hidden, weight, None, targets, valid, norm, ent, opts, g,
                                                g if entropy else None, (True, True, False), chunk_rows=ROWS)

    assert_one_chunk_live(run, ROWS * V * 4)


# forward and backward run the same loop (_run), whatever the divergence: one kind each keeps the 64 MiB chunks cheap.
@pytest.mark.parametrize(("direction", "kind"), [("forward+grad", "forward_kl"), ("backward", "jsd")])
def test_distillation_chunks(direction, kind):
    opts = torch_distill.DistillOptions(kind=kind)
    # Student and teacher logits: two buffers per chunk, each larger than the per-block temporaries (a few cache
    # blocks of 4 MiB), which would otherwise hide a second chunk.
    rows = 2 * ROWS

    def run(n_chunks):
        gen = torch.Generator().manual_seed(1)
        n = rows * n_chunks
        student, teacher = torch.randn(n, D, generator=gen), torch.randn(n, D, generator=gen)
        w_s, w_t = torch.randn(V, D, generator=gen) * 0.3, torch.randn(V, D, generator=gen) * 0.3
        valid, g = torch.ones(n, dtype=torch.bool), torch.ones(n)
        fn = torch_distill.forward if direction == "forward+grad" else torch_distill.backward
        return lambda: fn(student, w_s, None, teacher, w_t, None, valid, opts, g, (True, True, False),
                          chunk_rows=rows)

    assert_one_chunk_live(run, 2 * rows * V * 4)


BUCKETS, BUCKET_ROWS, BUCKET_ITEMS = 8, 64, 1024  # an SCE chunk of 8 buckets: 8 x 64 x 1024 float32 = 2 MiB


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_scalable_chunks(direction):
    def run(n_chunks):
        gen = torch.Generator().manual_seed(2)
        n = 512
        hidden, weight = torch.randn(n, D, generator=gen), torch.randn(V, D, generator=gen) * 0.3
        targets = torch.randint(0, V, (n,), generator=gen)
        g_b = BUCKETS * n_chunks
        rows = torch.randint(0, n, (g_b, BUCKET_ROWS), generator=gen)
        cols = torch.randint(0, V, (g_b, BUCKET_ITEMS), generator=gen)
        if direction == "forward":
            return lambda: torch_sce.forward(hidden, weight, targets, rows, cols, chunk_buckets=BUCKETS)
        lse, _ = torch_sce.forward(hidden, weight, targets, rows, cols, chunk_buckets=BUCKETS)
        grad_lse, grad_pos = torch.ones_like(lse), torch.ones(n)
        return lambda: torch_sce.backward(hidden, weight, targets, rows, cols, lse, grad_lse, grad_pos,
                                          (True, True), chunk_buckets=BUCKETS)

    assert_one_chunk_live(run, BUCKETS * BUCKET_ROWS * BUCKET_ITEMS * 4)


SAMPLED_ROWS, NEGATIVES = 64, 512  # per-row negatives: 64 x 512 x D=8 gathered rows = 1 MiB; shared: see below


def _sampled_inputs(n_chunks: int, rows: int, shared: bool, vocab: int = V):
    gen = torch.Generator().manual_seed(3)
    n = rows * n_chunks
    hidden, weight = torch.randn(n, D, generator=gen), torch.randn(vocab, D, generator=gen) * 0.3
    targets = torch.randint(0, vocab, (n,), generator=gen)
    shape = (NEGATIVES * 8,) if shared else (n, NEGATIVES)
    return hidden, weight, targets, torch.randint(0, vocab, shape, generator=gen)


def _sampled_chunk_bytes(shared: bool) -> tuple[int, int]:
    """(rows per chunk, the chunk's largest buffer in bytes): per-row negatives gather (rows, K, D) weight rows;
    shared ones score (rows, K) logits against the K gathered once."""
    if shared:
        rows = 512
        return rows, rows * NEGATIVES * 8 * 4
    return SAMPLED_ROWS, SAMPLED_ROWS * NEGATIVES * D * 4


@pytest.mark.parametrize("shared", [False, True], ids=["per-row", "shared"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_sampled_chunks(direction, shared):
    rows, chunk_bytes = _sampled_chunk_bytes(shared)

    def run(n_chunks):
        hidden, weight, targets, negatives = _sampled_inputs(n_chunks, rows, shared)
        valid = torch.ones(hidden.shape[0], dtype=torch.bool)
        if direction == "forward":
            return lambda: torch_sampled.forward(hidden, weight, targets, valid, negatives, None, True,
                                                 chunk_rows=rows)
        _, lse = torch_sampled.forward(hidden, weight, targets, valid, negatives, None, True, chunk_rows=rows)
        return lambda: torch_sampled.backward(hidden, weight, targets, valid, negatives, None, True, lse,
                                              torch.ones_like(lse), (True, True), chunk_rows=rows)

    assert_one_chunk_live(run, chunk_bytes)


@pytest.mark.parametrize("shared", [False, True], ids=["per-row", "shared"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_sampled_shard_chunks(direction, shared):
    rows, chunk_bytes = _sampled_chunk_bytes(shared)

    def run(n_chunks):
        # One shard holding the first half of a 2V vocabulary: ids >= V are held elsewhere (local id V).
        hidden, weight, targets, negatives = _sampled_inputs(n_chunks, rows, shared, vocab=2 * V)
        weight = weight[:V].contiguous()
        owned = targets < V
        targets, negatives = targets.clamp(max=V), negatives.clamp(max=V)
        if direction == "forward":
            return lambda: torch_sampled_shard.forward(hidden, weight, targets, owned, negatives, None, True,
                                                       chunk_rows=rows)
        lse, _ = torch_sampled_shard.forward(hidden, weight, targets, owned, negatives, None, True, chunk_rows=rows)
        ones = torch.ones_like(lse)
        return lambda: torch_sampled_shard.backward(hidden, weight, targets, owned, negatives, None, True, lse, ones,
                                                    ones, (True, True), chunk_rows=rows)

    assert_one_chunk_live(run, chunk_bytes)
