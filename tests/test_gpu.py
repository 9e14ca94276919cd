"""GPU-only checks of the Triton backend: real bf16 tensor cores, 64-bit offsets, determinism.

Skipped without CUDA (see conftest.py); run them on a GPU machine and record the result in benchmarks/results.
"""

import pytest
import torch

import largevocab as lv

from reference import reference_loss

pytestmark = pytest.mark.gpu


def inputs(n, d, v, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, d, device="cuda", generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device="cuda", generator=gen) * d**-0.5 * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    targets[::11] = -100
    return hidden, weight, targets


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def grads(loss_fn, hidden, weight, targets, **opts):
    loss = loss_fn(hidden, weight, targets, **opts)
    return [loss.detach(), *torch.autograd.grad(loss, (hidden, weight))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("opts", [{}, dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)])
def test_tensor_core_path_three_way(dtype, opts):
    hidden, weight, targets = inputs(4099, 1031, 50257, dtype)
    exact = grads(reference_loss, hidden.double().detach().requires_grad_(),
                  weight.double().detach().requires_grad_(), targets, **opts)
    torch_same = grads(lambda *a, **k: reference_loss(*a, dtype=dtype, **k), hidden, weight, targets, **opts)
    ours = grads(lv.linear_cross_entropy, hidden, weight, targets, backend="triton", **opts)
    for got, same, ref in zip(ours, torch_same, exact, strict=True):
        assert rel_err(got, ref) <= 2 * rel_err(same, ref) + 1e-6


def test_int64_offsets_beyond_2_pow_31():
    n, d, v = 17_000, 64, 131_072  # N * V = 2.2e9 > 2^31
    hidden, weight, targets = inputs(n, d, v, torch.bfloat16)
    per_token = lv.linear_cross_entropy(hidden, weight, targets, reduction="none", backend="triton")
    grad_h, grad_w = torch.autograd.grad(per_token.sum(), (hidden, weight))
    tail = slice(n - 64, n)  # rows whose logits start past element 2^31
    h64 = hidden[tail].double().detach().requires_grad_()
    ref = reference_loss(h64, weight.double(), targets[tail], reduction="none")
    (ref_grad_h,) = torch.autograd.grad(ref.sum(), (h64,))
    torch.testing.assert_close(per_token[tail].double(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_h[tail].double(), ref_grad_h, rtol=5e-2, atol=5e-2)
    chunked = lv.linear_cross_entropy(hidden.float(), weight.float(), targets, reduction="sum", backend="torch")
    (ref_grad_w,) = torch.autograd.grad(chunked, (weight,))
    assert ((grad_w.float() - ref_grad_w).norm() / ref_grad_w.norm()).item() < 2e-2


def test_deterministic_mode_is_bitwise_reproducible_on_gpu():
    hidden, weight, targets = inputs(2048, 512, 32_000, torch.bfloat16)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = grads(lv.linear_cross_entropy, hidden, weight, targets, backend="triton")
        second = grads(lv.linear_cross_entropy, hidden, weight, targets, backend="triton")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    atomic = grads(lv.linear_cross_entropy, hidden, weight, targets, backend="triton")
    for a, b in zip(first, atomic, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_filtered_backward_stays_close_in_bf16():
    hidden, weight, targets = inputs(4096, 768, 50_257, torch.bfloat16)
    exact = grads(lv.linear_cross_entropy, hidden, weight, targets, backend="triton")
    filtered = grads(lv.linear_cross_entropy, hidden, weight, targets, backend="triton", filter_eps="auto")
    assert torch.equal(exact[0], filtered[0])
    for a, b in zip(exact[1:], filtered[1:], strict=True):
        assert ((a.float() - b.float()).norm() / a.float().norm()).item() < 1e-2
