"""The Hugging Face patch: fused loss == transformers' loss and gradients for every family, undo, generation,
gradient accumulation, Trainer, hooks, and clear errors for models it cannot handle."""

import os

import pytest
import torch

from largevocab.integrations.hf import UnsupportedModelError, patch

from hf_models import FAMILIES, VOCAB, batch, tiny_model

BACKENDS = ["torch", "triton"]
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def loss_and_grads(model, inputs):
    out = model(**inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    return out, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def assert_same(got, want):
    """Loss to rtol 1e-5; every gradient to 1e-4 of its tensor's largest magnitude."""
    torch.testing.assert_close(got[0].loss, want[0].loss, rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4 * float(w.abs().max()) + 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_patched_loss_and_gradients_equal_transformers(model_type, backend):
    model = tiny_model(model_type).train()
    inputs = batch()
    want = loss_and_grads(model, inputs)
    handle = patch(model, backend=backend)
    got = loss_and_grads(model, inputs)
    assert got[0].logits is None
    assert_same(got, want)
    handle.undo()
    again = loss_and_grads(model, inputs)
    assert again[0].logits is not None and torch.equal(again[0].loss, want[0].loss)


def test_class_patch_applies_to_new_instances_and_undo_restores():
    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM.forward
    handle = patch(LlamaForCausalLM)
    try:
        assert tiny_model("llama").train()(**batch()).logits is None
        second = patch(LlamaForCausalLM, backend="torch")  # patching twice is harmless
        assert second.original is original
    finally:
        handle.undo()
    assert LlamaForCausalLM.forward is original
    assert tiny_model("llama").train()(**batch()).logits is not None


def test_patching_an_instance_twice_then_undo():
    model = tiny_model("qwen2").train()
    patch(model)
    handle = patch(model, backend="torch")
    handle.undo()
    assert "forward" not in vars(model) and model(**batch()).logits is not None


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "mixtral"])
def test_generation_is_unchanged(model_type):
    model = tiny_model(model_type).eval()
    prompt = batch(batch_size=1, pad_last=1)["input_ids"][:, :6]
    want = model.generate(prompt, max_new_tokens=5, do_sample=False)
    handle = patch(model)
    got = model.generate(prompt, max_new_tokens=5, do_sample=False)
    handle.undo()
    assert torch.equal(got, want)


def test_eval_with_labels_keeps_logits_unless_asked():
    model = tiny_model("llama").eval()
    inputs = batch()
    want = model(**inputs)
    patch(model)
    out = model(**inputs)
    assert out.logits is not None and torch.equal(out.loss, want.loss)
    patch(model, fused_in_eval=True)
    out = model(**inputs)
    assert out.logits is None
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_gradient_accumulation_with_num_items_in_batch(model_type):
    """Two micro-batches with num_items_in_batch give the gradients of the whole batch, as in transformers."""

    def accumulated(model):
        inputs = batch(batch_size=4)
        n_items = (inputs["labels"][:, 1:] != -100).sum()
        total = None
        for half in (slice(0, 2), slice(2, 4)):
            part = {k: v[half] for k, v in inputs.items()}
            _, grads = loss_and_grads(model, {**part, "num_items_in_batch": n_items})
            total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
        return total

    model = tiny_model(model_type).train()
    want = accumulated(model)
    patch(model, backend="torch")
    got = accumulated(model)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_shift_labels_logits_to_keep_and_tuple_output():
    model = tiny_model("llama").train()
    inputs = batch()
    shift_labels = torch.roll(inputs["labels"], -1, dims=1)
    shift_labels[:, -1] = -100
    want_shift = model(**inputs, shift_labels=shift_labels).loss
    want_tuple = model(**inputs, return_dict=False)
    patch(model)
    torch.testing.assert_close(model(**inputs, shift_labels=shift_labels).loss, want_shift, rtol=1e-5, atol=1e-6)
    got_tuple = model(**inputs, return_dict=False)
    assert isinstance(got_tuple, tuple)
    torch.testing.assert_close(got_tuple[0], want_tuple[0], rtol=1e-5, atol=1e-6)
    # logits_to_keep=k with full-length labels: transformers' own loss rejects the mismatch, and so does the patch.
    patch(model, materialize="error")
    with pytest.raises(UnsupportedModelError, match="cross_entropy"):
        model(**inputs, logits_to_keep=5)


def test_labels_passed_positionally_are_fused_too():
    model = tiny_model("llama").train()
    inputs = batch()
    want = model(**inputs).loss
    patch(model)
    # LlamaForCausalLM.forward(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels)
    out = model(inputs["input_ids"], inputs["attention_mask"], None, None, None, inputs["labels"])
    assert out.logits is None
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)


def test_output_layer_hooks_run_on_every_call():
    """Pre-hooks see the hidden states once, then one request per value the fused loss computes in the layer, with
    the hidden states it computes from (so input hooks act on them as in the layer's own call)."""
    from largevocab.integrations.hf._head import Request

    model = tiny_model("llama").train()
    calls = []
    model.lm_head.register_forward_pre_hook(lambda module, args: calls.append(args))
    patch(model)
    model(**batch()).loss.backward()
    assert len(calls) == 2 and len(calls[0]) == 1 and calls[0][0].shape[-1] == 64
    assert isinstance(calls[1][0], Request) and calls[1][1].shape[-1] == 64


@pytest.mark.parametrize("edit", [lambda out: out * 1.0, lambda out: 2 * out, lambda out: out + 1.0,
                                  lambda out: out.float(), lambda out: out if torch.is_tensor(out) else tuple(out)])
def test_a_hook_that_edits_the_output_layer_output_is_refused(edit):
    model = tiny_model("llama").train()
    model.lm_head.register_forward_hook(lambda module, args, output: edit(output))
    patch(model)
    with pytest.raises((TypeError, AttributeError, UnsupportedModelError), match="Answer|fused request"):
        model(**batch())


@pytest.mark.parametrize("loss, options", [("sce", dict(bucket_size_y=64)), ("sampled", dict(num_negatives=32))])
def test_approximate_losses_plug_in(loss, options):
    model = tiny_model("qwen2").train()
    patch(model, loss=loss, **options)
    out = model(**batch())
    assert out.logits is None and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    gemma = tiny_model("gemma2").train()
    patch(gemma, loss=loss, **options)
    with pytest.raises(UnsupportedModelError, match="soft cap"):
        gemma(**batch())


def test_trainer_step_with_the_patch(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    def train(patched):
        model = tiny_model("llama", seed=3)
        if patched:
            patch(model, backend="torch")
        data = batch(batch_size=4, seed=5)
        dataset = Dataset.from_dict({k: v.tolist() for k, v in data.items()})
        args = TrainingArguments(output_dir=str(tmp_path / str(patched)), max_steps=2, per_device_train_batch_size=2,
                                 learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                                 seed=0, data_seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        trainer.train()
        return [log["loss"] for log in trainer.state.log_history if "loss" in log], model

    want, reference = train(False)
    got, model = train(True)
    assert len(got) == 2
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5)


class _EmbeddingHead(torch.nn.Module):
    """A causal LM whose output layer is not linear."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Embedding(VOCAB, 8)

    def get_output_embeddings(self):
        return self.head

    def forward(self, hidden, labels=None):
        return hidden


class _NoLabels(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lm_head = torch.nn.Linear(8, VOCAB)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids):
        return input_ids


def test_unsupported_models_get_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="Embedding, whose forward is not a linear layer"):
        patch(_EmbeddingHead())
    with pytest.raises(UnsupportedModelError, match="takes no labels"):
        patch(_NoLabels())
    with pytest.raises(UnsupportedModelError, match="no output layer"):
        patch(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="transformers model"):
        patch(42)


def test_bad_options():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="loss must be one of"):
        patch(model, loss="focal")
    with pytest.raises(ValueError, match="reduction"):
        patch(model, reduction="sum")
    with pytest.raises(ValueError, match="filter_eps"):
        patch(model, filter_eps=-1.0)


def test_real_tokens_qwen_tokenizer_on_tiny_shakespeare():
    folder = os.path.join(SHARED_DATA, "tokenizers", "qwen")
    text_path = os.path.join(SHARED_DATA, "text", "tinyshakespeare_input.txt")
    if not os.path.isdir(folder):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must have the shared data: {folder} is missing")
        pytest.skip(f"shared data not found at {folder} (it is not part of the repository)")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder)
    with open(text_path) as f:
        ids = tokenizer(f.read(20_000), return_tensors="pt")["input_ids"][0]
    vocab = len(tokenizer)
    assert vocab > 150_000
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    seqs = ids[: 4 * 128].reshape(4, 128)
    want = model(input_ids=seqs, labels=seqs).loss
    patch(model, backend="torch")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = model(input_ids=seqs, labels=seqs).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.testing.assert_close(torch.tensor(losses[0]), want.detach(), rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_still_matches(use_reentrant):
    model = tiny_model("qwen2").train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    inputs = batch()

    def run():  # reentrant checkpointing supports .backward() only
        model.zero_grad()
        out = model(**inputs)
        out.loss.backward()
        return out, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    want = run()
    patch(model, backend="torch", materialize="error")
    got = run()
    assert got[0].logits is None
    assert_same(got, want)


def test_torch_compile_fullgraph_without_graph_breaks():
    """The lazy logits, the requests to the output layer and the fused op trace into one graph."""
    import torch._dynamo

    model = tiny_model("llama").train()
    inputs = batch()
    want = loss_and_grads(model, inputs)
    patch(model, backend="torch", materialize="error")
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda **kw: model(**kw).loss)(**inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(**inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    got = out, list(torch.autograd.grad(out.loss, params))
    assert out.logits is None
    assert_same(got, want)
    torch._dynamo.reset()
