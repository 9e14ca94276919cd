"""The patch with PEFT (patch(peft_model), LoRA on the head, modules_to_save) and TRL's SFTTrainer (patched before
or after the trainer is built): loss, gradients and the trainer's metrics equal the unpatched run's."""

import os

import pytest
import torch

from largevocab.integrations.hf import LAST_REPORT, patch
from largevocab.integrations.hf._patch import _WARNED

from hf_models import batch, tiny_model

peft = pytest.importorskip("peft")


def _lora(model, targets, **options):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **options)
    torch.manual_seed(1)
    return peft.get_peft_model(model, config)


def _trainable_grads(model, inputs):
    torch.manual_seed(0)
    out = model(**inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.loss, params)


def _assert_same(got, want):
    torch.testing.assert_close(got[0].loss, want[0].loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4 * float(w.abs().max()) + 1e-12)


@pytest.mark.parametrize("case", ["attention", "lm_head", "lm_head+bias", "modules_to_save", "two adapters"])
def test_peft_models_fuse_with_their_own_head_weight(case):
    model = tiny_model("llama").train()
    if case == "modules_to_save":
        peft_model = _lora(model, ["q_proj"], modules_to_save=["lm_head"])
        with torch.no_grad():
            peft_model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    elif case == "two adapters":
        peft_model = _lora(model, ["q_proj", "lm_head"])
        peft_model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
        peft_model.base_model.set_adapter(["default", "second"])
    else:
        peft_model = _lora(model, ["q_proj"] if case == "attention" else ["q_proj", "lm_head"],
                           lora_bias=case == "lm_head+bias")
    inputs = batch()
    want = _trainable_grads(peft_model, inputs)
    handle = patch(peft_model, backend="torch", materialize="error")
    got = _trainable_grads(peft_model, inputs)
    assert got[0].logits is None and LAST_REPORT[0].served == ("cross_entropy",)
    _assert_same(got, want)
    handle.undo()
    assert torch.equal(_trainable_grads(peft_model, inputs)[0].loss, want[0].loss)


@pytest.mark.parametrize("state", ["disabled", "merged", "dropout", "dora"])
def test_peft_head_states(state):
    """Disabled or merged adapters fuse with the base weight; LoRA dropout in training and DoRA run the head's own
    forward (one warning), with the same loss."""
    model = tiny_model("llama").train()
    options = {"lora_dropout": 0.1} if state == "dropout" else {"use_dora": True} if state == "dora" else {}
    peft_model = _lora(model, ["lm_head"], **options)
    if state == "merged":
        peft_model.merge_adapter()
    inputs = batch()
    loss_only = state in ("disabled", "merged")  # no adapter in the graph: nothing trainable to differentiate

    def run():
        return (peft_model(**inputs), []) if loss_only else _trainable_grads(peft_model, inputs)

    context = peft_model.disable_adapter() if state == "disabled" else torch.enable_grad()
    with context:
        want = run()
        patch(peft_model, backend="torch")
        _WARNED.clear()
        if state in ("dropout", "dora"):
            with pytest.warns(UserWarning, match="cannot be fused in its current state"):
                got = run()
            assert LAST_REPORT[0].not_fused
        else:
            got = run()
            assert LAST_REPORT[0].served == ("cross_entropy",)
    _assert_same(got, want)


# ---------------------------------------------------------------------------------------------------------------
# TRL's SFTTrainer.

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "integrations", "data", "gpt2")


def _sft_run(tmp_path, when, steps=3, bf16=False):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.pad_token = tokenizer.eos_token
    model = tiny_model("llama", seed=3)
    model.config.pad_token_id = 0
    data = batch(batch_size=6, seq=16, seed=5, pad_last=0)
    dataset = Dataset.from_dict({"input_ids": data["input_ids"].tolist()})
    args = trl.SFTConfig(output_dir=str(tmp_path / f"{when}{bf16}"), max_steps=steps, per_device_train_batch_size=2,
                         learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                         seed=0, data_seed=0, dataset_kwargs={"skip_prepare_dataset": True}, pad_token="<|endoftext|>",
                         bf16=bf16)
    if when == "before":
        patch(model, backend="torch")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    handle = patch(trainer.model, backend="torch") if when == "after" else None
    LAST_REPORT[0] = None
    trainer.train()
    report = LAST_REPORT[0]
    if handle is not None:
        handle.undo()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return {k: [log[k] for log in logs] for k in ("loss", "mean_token_accuracy", "entropy")}, model, report


@pytest.mark.parametrize("when", ["before", "after"])
def test_sft_trainer_patched_before_or_after_trains_with_the_fused_loss(tmp_path, when):
    want, reference, _ = _sft_run(tmp_path, "unpatched")
    got, model, report = _sft_run(tmp_path, when)
    assert report is not None and report.served == ("cross_entropy",), report  # our forward computed the loss
    for key in want:
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)


def test_sft_trainer_under_bf16_autocast_is_as_close_to_float32_as_trl(tmp_path):
    """Under accelerate's bf16 autocast both TRL's fused head and ours round; the three-way rule against the
    float32 run (first step, same weights and batch): our error is at most twice TRL's."""
    exact = _sft_run(tmp_path, "unpatched", steps=1)[0]["loss"][0]
    trl_bf16 = _sft_run(tmp_path, "unpatched", steps=1, bf16=True)[0]["loss"][0]
    ours_bf16 = _sft_run(tmp_path, "before", steps=1, bf16=True)[0]["loss"][0]
    assert abs(ours_bf16 - exact) <= 2 * abs(trl_bf16 - exact) + 1e-6, (exact, trl_bf16, ours_bf16)
