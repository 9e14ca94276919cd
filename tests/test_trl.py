"""largevocab.integrations.trl: TRL's trainers on the fused ops give the same log-probs, losses and weights."""

import math
import warnings

import pytest
import torch

import posttrain_reference as ref

trl = pytest.importorskip("trl")

from largevocab.integrations import trl as lv_trl  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [f"w{i}" for i in range(203)]  # with 4 special tokens: V = 207, odd


# ------------------------------------------------------------------------------ the two stand-ins, directly


def _log_prob_inputs(seed=0, n=70, d=24, v=301, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, requires_grad=True)
    weight = (torch.randn(v, d, generator=gen) * 0.8).requires_grad_()
    b = torch.randn(v, generator=gen).requires_grad_() if bias else None
    return hidden, weight, b, torch.randint(0, v, (n,), generator=gen)


def _outputs_and_grads(fn, hidden, weight, bias, targets, *args):
    out = fn(hidden, weight, bias, targets, *args)
    coef = torch.linspace(-1.0, 1.0, len(hidden))
    total = (out[0] * coef).sum() + (out[1].sum() if out[1] is not None else 0)
    grads = torch.autograd.grad(total, [t for t in (hidden, weight, bias) if t is not None])
    return [*out, *grads]


def _rel(a, w):
    return ((a.double() - w.double()).norm() / w.double().norm().clamp(min=1e-30)).item()


def _float64_log_probs(hidden, weight, bias, targets, temperature, _chunk, softcap, logit_scale, outputs):
    """TRL's definition, materialised: softcap(logit_scale * (h W^T + b)) / T."""
    z = hidden @ weight.T + (bias if bias is not None else 0.0)
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = (z / temperature).log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1) if "entropy" in outputs else None
    return log_p.gather(-1, targets[:, None])[:, 0], entropy, None, None, None


@pytest.mark.parametrize(("temperature", "softcap", "logit_scale", "bias"), [
    (1.0, None, 1.0, False), (0.7, None, 1.0, True), (1.3, None, 0.25, True), (0.9, 4.0, 2.0, True),
])
def test_log_prob_head_matches_trl_function(temperature, softcap, logit_scale, bias):
    from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS, ChunkedLogProbFunction

    hidden, weight, b, targets = _log_prob_inputs(bias=bias)
    with torch.no_grad():
        targets[:5] = (hidden[:5] @ weight.T).argmax(-1)  # some top-1 hits
    outputs = ("log_probs", *(o for o in OPTIONAL_OUTPUTS if softcap is None or o != "mean_logits"))
    args = (temperature, 64, softcap, logit_scale, outputs)
    want = _outputs_and_grads(ChunkedLogProbFunction.apply, hidden, weight, b, targets, *args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        got = _outputs_and_grads(lv_trl._LogProbHead(ChunkedLogProbFunction, "torch").apply, hidden, weight, b,
                                 targets, *args)
    exact = _outputs_and_grads(_float64_log_probs, *(t.detach().double().requires_grad_() if t is not None else None
                                                      for t in (hidden, weight, b)), targets, *args)
    names = ["log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "dH", "dW", "db"]
    for name, a, w, x in zip(names, got, want, exact, strict=False):
        if w is None:
            assert a is None, name
        elif w.dtype == torch.bool:
            assert torch.equal(a, w) and a.any(), name
        elif name.startswith("d"):  # float32 sums of O(N V) terms: at most twice TRL's own error against float64
            assert _rel(a, x) <= 2 * _rel(w, x) + 1e-7, (name, _rel(a, x), _rel(w, x))
        else:
            torch.testing.assert_close(a, w, rtol=0, atol=1e-5, msg=name)


def test_log_prob_head_under_autocast_and_fp32_head():
    """Autocast: both cast to the autocast dtype; without it a bf16 head is multiplied in the hidden states' dtype
    (TRL's cast_lm_head_to_fp32), both as TRL's own function does."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    hidden, weight, b, targets = _log_prob_inputs()
    args = (1.0, 64, None, 1.0, ("log_probs", "entropy"))
    head = lv_trl._LogProbHead(ChunkedLogProbFunction, "torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ChunkedLogProbFunction.apply(hidden, weight, b, targets, *args)
        got = head.apply(hidden, weight, b, targets, *args)
    for a, w in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a, w, rtol=2e-2, atol=2e-2)
    w16 = weight.detach().bfloat16().requires_grad_()
    want = _outputs_and_grads(ChunkedLogProbFunction.apply, hidden, w16, None, targets, *args)
    got = _outputs_and_grads(head.apply, hidden, w16, None, targets, *args)
    assert got[-1].dtype == torch.bfloat16
    for a, w in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a, w, rtol=0, atol=1e-5)
    assert _rel(got[-2], want[-2]) < 1e-5 and _rel(got[-1].float(), want[-1].float()) < 1e-2


@pytest.mark.parametrize(("args", "reason"), [
    ((1.0, 64, None, 0.0, ("log_probs",)), "logit_scale"),
    ((1.0, 64, 3.0, 1.0, ("log_probs", "mean_logits")), "mean soft-capped logit"),
])
def test_log_prob_head_hands_back_to_trl_loudly(args, reason):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    hidden, weight, b, targets = _log_prob_inputs()
    head = lv_trl._LogProbHead(ChunkedLogProbFunction, "torch")
    with pytest.warns(UserWarning, match=reason):
        got = head.apply(hidden, weight, b, targets, *args)
    want = ChunkedLogProbFunction.apply(hidden, weight, b, targets, *args)
    assert all((a is None and w is None) or torch.equal(a, w) for a, w in zip(got, want, strict=True))


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_divergence_head_matches_trl_function(beta):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    hidden, weight, b, _ = _log_prob_inputs()
    gen = torch.Generator().manual_seed(5)
    teacher = (hidden.detach()[:, :16] * 1.5, torch.randn(weight.shape[0], 16, generator=gen),
               torch.randn(weight.shape[0], generator=gen))
    args = (*teacher, beta, 0.8)

    def fn(h, w, bias, _targets, *rest):
        return ChunkedDivergenceFunction.apply(h, w, bias, *rest) if fn.trl else head.apply(h, w, bias, *rest)

    head = lv_trl._DivergenceHead(ChunkedDivergenceFunction, "torch")
    fn.trl = True
    want = _outputs_and_grads(fn, hidden, weight, b, None, *args)
    fn.trl = False
    got = _outputs_and_grads(fn, hidden, weight, b, None, *args)
    kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")

    def exact_fn(h, w, bias, _targets, ht, wt, bt, beta, temperature):
        s, t = h @ w.T + bias, ht.double() @ wt.double().T + bt.double()
        return ref.divergence(s, t, kind, beta, temperature), None

    exact = _outputs_and_grads(exact_fn, *(t.detach().double().requires_grad_() for t in (hidden, weight, b)), None,
                               *args)
    for name, a, w, x in zip(["divergence", "entropy", "dH", "dW", "db"], got, want, exact, strict=True):
        if name.startswith("d"):
            assert _rel(a, x) <= 2 * _rel(w, x) + 1e-7, (name, _rel(a, x), _rel(w, x))
        else:
            torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5, msg=name)


def test_divergence_head_hands_back_a_soft_capped_model_to_trl():
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    hidden, weight, b, _ = _log_prob_inputs()
    head = lv_trl._DivergenceHead(ChunkedDivergenceFunction, "torch")
    args = (hidden.detach(), weight.detach(), None, 0.5, 1.0, 1.0, 30.0)
    with pytest.warns(UserWarning, match="soft cap"):
        got = head.apply(hidden, weight, b, *args)
    assert torch.equal(got[0], ChunkedDivergenceFunction.apply(hidden, weight, b, *args)[0])


def test_patch_is_idempotent_and_undone():
    from trl.trainer import distillation_trainer, utils

    original = utils._ChunkedLogProbFunction, distillation_trainer.ChunkedDivergenceFunction
    handle = lv_trl.patch()
    try:
        assert lv_trl.patch() is not None and utils._ChunkedLogProbFunction is handle.log_probs
        assert distillation_trainer.ChunkedDivergenceFunction is handle.divergence
    finally:
        handle.undo()
    assert (utils._ChunkedLogProbFunction, distillation_trainer.ChunkedDivergenceFunction) == original
    with pytest.raises(ValueError, match="backend"):
        lv_trl.patch(backend="gpu")


# --------------------------------------------------------------------------------- trainers, 2 steps each


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def _save_model(path, seed, hidden_size=32, head_scale=10.0):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = _tokenizer()
    config = AutoConfig.for_model(
        "qwen2", vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():  # a random head gives near-uniform distributions; scale it so they differ
        model.get_output_embeddings().weight.mul_(head_scale)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_models")
    return {"policy": _save_model(root / "policy", 0), "teacher": _save_model(root / "teacher", 1, hidden_size=48)}


def _prompts(n=16):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [" ".join(WORDS[i:i + 4]) for i in range(0, 4 * n, 4)]})


def _reward(completions, **_):
    return [float(sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) % 7) for c in completions]


COMMON_ARGS = dict(max_steps=2, learning_rate=0.05, optim="sgd", logging_steps=1, report_to="none", use_cpu=True,
                   seed=0, save_strategy="no", bf16=False, dataloader_num_workers=0, disable_tqdm=True)


def _run(make_trainer, patched: bool, probe=None):
    """Train for 2 steps; with ``patched``, TRL's own functions are replaced by ones that fail if called."""
    handle = lv_trl.patch(backend="torch") if patched else None
    originals = (handle.log_probs.original, handle.divergence.original) if patched else None
    try:
        if patched:
            def refuse(*a, **k):
                raise AssertionError("TRL's own function was called under the patch")
            stub = type("Refuse", (), {"apply": staticmethod(refuse)})
            handle.log_probs.original, handle.divergence.original = stub, stub
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="largevocab")
            trainer = make_trainer()
            trainer.train()
            result = (probe or _probe)(trainer)
        return trainer, result
    finally:
        if handle is not None:
            handle.log_probs.original, handle.divergence.original = originals
            handle.undo()


def _probe(trainer):
    """Per-token log-probs and entropies of fixed sequences under the trained model (through the fused head)."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(4, len(WORDS) + 4, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = trainer.model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    return out.log_probs, out.entropy


def _probe_distillation(trainer):
    """Per-token divergence and student entropy of fixed sequences under the trained student and the teacher."""
    from trl.trainer import distillation_trainer

    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(4, len(WORDS) + 4, (3, 12), generator=gen)
    with torch.no_grad():
        heads = []
        for model in (trainer.model, trainer.teacher_model):
            hidden = model.base_model(input_ids=ids).last_hidden_state.reshape(-1, model.config.hidden_size)
            head = model.get_output_embeddings()
            heads += [hidden, head.weight, head.bias]
        return distillation_trainer.ChunkedDivergenceFunction.apply(*heads, trainer.beta, trainer.temperature)


def _assert_same_run(plain, fused, loss_keys, initial):
    from transformers import AutoModelForCausalLM
    (t0, probe0), (t1, probe1) = plain, fused
    for a, b in zip(probe0, probe1, strict=True):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    logs0 = [h for h in t0.state.log_history if "loss" in h]
    logs1 = [h for h in t1.state.log_history if "loss" in h]
    assert len(logs0) == len(logs1) == 2
    for h0, h1 in zip(logs0, logs1, strict=True):
        for key in loss_keys:
            assert math.isclose(h0[key], h1[key], rel_tol=1e-4, abs_tol=1e-6), (key, h0[key], h1[key])
    params0 = dict(t0.model.named_parameters())
    start = dict(AutoModelForCausalLM.from_pretrained(initial).named_parameters())
    moved = 0.0
    for name, p1 in t1.model.named_parameters():
        torch.testing.assert_close(p1, params0[name], rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, (p1 - start[name]).abs().max().item())
    assert moved > 1e-3, "training did not change the weights: the comparison would be empty"
    return logs0


def test_grpo_two_steps_match_unpatched(models, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    def make():
        args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=6, beta=0.1, temperature=0.8, **COMMON_ARGS)
        return GRPOTrainer(model=models["policy"], reward_funcs=_reward, args=args, train_dataset=_prompts(),
                           processing_class=_tokenizer())

    logs = _assert_same_run(_run(make, False), _run(make, True), ("loss", "kl", "entropy", "grad_norm"),
                            models["policy"])
    assert logs[1]["kl"] > 0 and logs[0]["grad_norm"] > 0  # the policy moved away from the reference


def test_dpo_two_steps_match_unpatched(models, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    n = 8
    data = Dataset.from_dict({"prompt": [" ".join(WORDS[i:i + 3]) for i in range(n)],
                              "chosen": [" ".join(WORDS[i + 10:i + 14]) for i in range(n)],
                              "rejected": [" ".join(WORDS[i + 40:i + 43]) for i in range(n)]})

    def make():
        args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, beta=0.1, **COMMON_ARGS)
        return DPOTrainer(model=models["policy"], args=args, train_dataset=data, processing_class=_tokenizer())

    logs = _assert_same_run(_run(make, False), _run(make, True),
                            ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
                             "mean_token_accuracy", "entropy", "logits/chosen", "logits/rejected"), models["policy"])
    assert logs[1]["rewards/chosen"] != 0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_trainer_two_steps_match_unpatched(models, tmp_path, beta):
    from trl import DistillationConfig, DistillationTrainer

    def make():
        args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_completion_length=6,
                                  beta=beta, temperature=0.9, **COMMON_ARGS)
        return DistillationTrainer(model=models["policy"], teacher_model=models["teacher"], args=args,
                                   train_dataset=_prompts(), processing_class=_tokenizer())

    logs = _assert_same_run(_run(make, False, _probe_distillation), _run(make, True, _probe_distillation),
                            ("loss", "entropy", "grad_norm"), models["policy"])
    assert logs[0]["loss"] > 0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gkd_recipe_equals_gkds_own_loss(models, beta):
    """gkd_loss (hidden states, fused) against GKDTrainer.generalized_jsd_loss on both models' full logits."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM
    from trl.experimental.gkd import GKDTrainer

    student = AutoModelForCausalLM.from_pretrained(models["policy"])
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"])
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(4, len(WORDS) + 4, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m), teacher_model=teacher, beta=beta)
    for num_items in (None, 11):
        got = lv_trl.gkd_loss(trainer, student, inputs, num_items)
        (grad,) = torch.autograd.grad(got, (student.get_output_embeddings().weight,))
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits
        want = GKDTrainer.generalized_jsd_loss(student(input_ids=ids, attention_mask=mask).logits[:, :-1],
                                               t_logits[:, :-1], labels=labels[:, 1:], beta=beta,
                                               num_items_in_batch=num_items)
        (want_grad,) = torch.autograd.grad(want, (student.get_output_embeddings().weight,))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert _rel(grad, want_grad) < 1e-5
