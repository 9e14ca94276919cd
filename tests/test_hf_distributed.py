"""The patch under DDP, FSDP2 and accelerate's FSDP: 2 CPU ranks over gloo, patched vs unpatched, same wrapping.

FSDP2 wraps every decoder layer and the root; optionally the output layer as its own unit too (what size-based
auto-wrapping does, since the (V, D) head is often the largest module), with ``reshard_after_forward=True`` so its
weight is freed after each call and must be gathered again for the fused backward. Two training steps (forward,
backward, SGD) per run: losses of both steps and the full gradients of the first must equal the unpatched run's.
"""

from __future__ import annotations

import pytest
import torch

from distributed import run_ranks as spawn_ranks

WORLD = 2
TIMEOUT_S = 180
VOCAB = 257


def run_ranks(fn):
    """``fn(rank, world_size)`` on WORLD gloo ranks; a hang or an error on a rank fails the test with its traceback."""
    return spawn_ranks(fn, WORLD, timeout=TIMEOUT_S)


def _model(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.train()


def _batch(rank, step):
    gen = torch.Generator().manual_seed(10 * rank + step)
    ids = torch.randint(3, VOCAB, (2, 12), generator=gen)
    labels = ids.clone()
    labels[0, -3:] = -100
    return dict(input_ids=ids, labels=labels)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(model, rank, steps=2):
    """Losses of ``steps`` SGD steps and the full gradients of the first."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, grads = [], None
    from largevocab.integrations.hf import LAST_REPORT

    LAST_REPORT[0] = None
    for step in range(steps):
        loss = model(**_batch(rank, step)).loss
        report = LAST_REPORT[0]
        assert report is None or (report.served == ("cross_entropy",) and not report.materialised), report
        loss.backward()
        if grads is None:
            grads = {n: _full(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses, grads


def _compare(got, want):
    """``(max loss difference, max gradient error relative to each tensor's max)``."""
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(got[0], want[0], strict=True))
    assert got[1].keys() == want[1].keys()
    grad_error = max(float((got[1][n] - want[1][n]).abs().max()) / max(float(want[1][n].abs().max()), 1e-12)
                     for n in want[1])
    return loss_error, grad_error


def _ddp_worker(rank, tie):
    from torch.nn.parallel import DistributedDataParallel

    from largevocab.integrations.hf import patch

    want = _train(DistributedDataParallel(_model(tie)), rank)
    model = _model(tie)
    patch(model, backend="torch")
    got = _train(DistributedDataParallel(model), rank)
    return _compare(got, want)


def _fsdp2_worker(rank, tie, head_unit, patch_first):
    from torch.distributed.fsdp import fully_shard

    from largevocab.integrations.hf import patch

    def build(patched):
        model = _model(tie)
        if patched and patch_first:
            patch(model, backend="torch")
        for layer in model.model.layers:
            fully_shard(layer)
        if head_unit:
            fully_shard(model.lm_head, reshard_after_forward=True)
        fully_shard(model)
        if patched and not patch_first:
            patch(model, backend="torch")
        return model

    want = _train(build(False), rank)
    got = _train(build(True), rank)
    return _compare(got, want)


def _accelerate_worker(rank, fsdp_version):
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    from largevocab.integrations.hf import LAST_REPORT, patch

    def run(patched):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp_version, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                                reshard_after_forward=True if fsdp_version == 2 else "FULL_SHARD")
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
        model = _model(False)
        if patched:
            patch(model, backend="torch")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        losses = []
        for step in range(2):
            loss = model(**_batch(rank, step)).loss
            assert not patched or LAST_REPORT[0].served == ("cross_entropy",), LAST_REPORT[0]
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        return losses

    want, got = run(False), run(True)
    return max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True)), 0.0


FSDP2_VARIANTS = {  # (tied embeddings, head as its own unit, patched before fully_shard)
    "untied": (False, False, True), "tied": (True, False, True), "head unit": (False, True, True),
    "head unit, patched after fully_shard": (False, True, False),
}


def _wrapping_worker(rank, world_size):
    results = {f"ddp tied={tie}": _ddp_worker(rank, tie) for tie in (False, True)}
    results.update({f"fsdp2 {name}": _fsdp2_worker(rank, *variant) for name, variant in FSDP2_VARIANTS.items()})
    try:
        results["fsdp2 tied head unit"] = _fsdp2_worker(rank, True, True, True)
    except ValueError as error:  # FSDP2's own refusal, the same patched or not
        results["fsdp2 tied head unit"] = str(error)
    return results


def _accelerate_both(rank, world_size):
    return {f"accelerate fsdp v{v}": _accelerate_worker(rank, v) for v in (1, 2)}


def _zero3_worker(rank, world_size):
    """ZeRO-3 partitions every parameter and gathers it in each module's pre-forward hook, and again in the
    pre-backward Function it puts on the module's outputs. Two SGD steps: the losses of both and every parameter's
    full gradient in the first, against the unpatched model under the same engine. The torch backend computes the
    gradients in the fused forward; the Triton one (on the interpreter here) recomputes the logits in backward, so it
    reads the head's weight there: it must have been gathered again."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from largevocab.integrations.hf import LAST_REPORT, patch

    # Nothing persistent, reused or prefetched: each module's parameters are gathered for its own calls only.
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0}
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_allow_untested_optimizer": True, "zero_optimization": zero}

    def run(backend):
        model = _model(False)
        if backend is not None:
            patch(model, backend=backend)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          config=config)
        head = model.lm_head.weight
        seen = []  # the head weight's status when the gradient reaches the decoder's output (after the head's backward)

        def on_norm_output(module, inputs, out):
            out.register_hook(lambda grad: seen.append(head.ds_status.name))

        model.model.norm.register_forward_hook(on_norm_output)
        losses, grads = [], None
        for step in range(2):
            LAST_REPORT[0] = None
            loss = engine(**_batch(rank, step)).loss
            report = LAST_REPORT[0]
            assert backend is None or (report.served == ("cross_entropy",) and not report.materialised), report
            assert head.ds_status.name == "NOT_AVAILABLE"  # released after forward: the backward must gather it
            engine.backward(loss)
            assert seen == ["NOT_AVAILABLE"] * (step + 1), seen  # and released after the head's backward
            # Parameters read outside their module's call become "external" to the calling module and stay gathered
            # through its forward and backward: the patch must read the head's weight only inside the head's calls.
            assert not any(getattr(m, "_external_params", None) for m in engine.module.modules())
            if grads is None:
                grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
            engine.step()
            losses.append(float(loss))
        engine.destroy()
        return losses, grads

    want = run(None)
    return {f"zero3 {backend}": _compare(run(backend), want) for backend in ("torch", "triton")}


def _check(results):
    for per_rank in results:
        for name, value in per_rank.items():
            if isinstance(value, str):
                assert "shared with a parameter already managed by another FSDP group" in value, (name, value)
                continue
            loss_error, grad_error = value
            assert loss_error < 1e-5 and grad_error < 1e-4, (name, value)


def test_ddp_and_fsdp2():
    """DDP (tied and untied) and every FSDP2 wrapping; a tied head as its own FSDP2 unit is refused by FSDP2
    itself (it asks for fully_shard([embedding, head])), patched or not."""
    _check(run_ranks(_wrapping_worker))


def test_accelerate_fsdp():
    _check(run_ranks(_accelerate_both))


def test_deepspeed_zero3():
    """Where DeepSpeed is installed (CI does not install it; its CPU accelerator uses gloo without Intel's oneCCL)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (not a dependency of largevocab; "
                        "`pip install deepspeed` to run the ZeRO-3 test)")
    _check(run_ranks(_zero3_worker))
