"""Coverage sweep: every causal-LM and image-text-to-text model type transformers knows, patched vs unpatched.

For each type, a tiny config from its default (``hf_models.tiny_config``: sizes shrunk, dropouts 0, MoE router
logits on, logit multipliers / soft caps / z-loss and aux-loss coefficients at non-default values), float32, the
torch backend, one CPU thread. Asserted per type: the patched loss equals the unpatched one (rtol 1e-5) and every
parameter's gradient too (to 1e-4 of the tensor's largest magnitude, or of 1e-4 x the model's largest gradient
where that is larger); eval forwards (with and without labels) are
bit-identical with the patch on; ``undo()`` restores the forwards and the loss bit for bit. A type may instead be
refused with :class:`UnsupportedModelError` only for having no linear output layer. Types that cannot be built
from a config here (a missing optional library) or whose unpatched forward rejects text-only inputs are reported
as not run, with the reason. ``python tests/test_hf_sweep.py`` prints the coverage table (kept in the README).
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from hf_models import SWEEP_VOCAB, sweep_cases, tiny_config  # noqa: E402

MIN_FUSED = 230  # 235 with transformers 5.24; a drop below this means the patch or the sweep regressed
GRAD_FLOOR = 1e-4
RESULTS: dict[str, tuple[str, str]] = {}


def _inputs(seed=1, batch=2, seq=8):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, SWEEP_VOCAB, (batch, seq), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False)


def _loss_and_grads(model, inputs):
    torch.manual_seed(0)  # any sampling in a training forward draws the same numbers in both runs
    out = model(**inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    return out.loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _eval_outputs(model, inputs):
    model.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        plain = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        torch.manual_seed(0)
        labelled = model(**inputs).loss
    model.train()
    return plain, labelled


def _build(case):
    import transformers

    model_type, class_name = sweep_cases()[case]
    cls = getattr(transformers, class_name)
    config = tiny_config(model_type)
    if not isinstance(config, cls.config_class):  # a text-only class of a composite type
        config = config.get_text_config()
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="eager").float()
    if hasattr(model, "set_default_language"):
        model.set_default_language(next(iter(getattr(config, "languages", None) or ["en_XX"])))
    head = model.get_output_embeddings()
    if isinstance(getattr(head, "weight", None), torch.Tensor):
        with torch.no_grad():  # a random head gives near-uniform logits; scale it so the loss depends on it
            head.weight.mul_(20.0)
    return model.train()


def _instance_forwards(model):
    return {(name, vars(m)["forward"]) for name, m in model.named_modules() if "forward" in vars(m)}


def _max_error(got, want):
    """Largest ``|g - w| / max(max|w|, FLOOR * G)`` over the parameters, G the largest gradient magnitude anywhere.

    The floor keeps a gradient that is zero in exact arithmetic (e.g. a key bias: softmax is shift-invariant) or
    ill-conditioned from being compared as rounding noise against rounding noise."""
    scale = max((float(w.abs().max()) for w in want), default=0.0)
    return max((float((g - w).abs().max()) / max(float(w.abs().max()), GRAD_FLOOR * scale, 1e-30)
                for g, w in zip(got, want, strict=True)), default=0.0)


def run_case(case: str) -> tuple[str, str]:
    """``(status, detail)``; status is fused / materialised / no effect / refused / not run / MISMATCH / CRASH."""
    from largevocab.integrations.hf import LAST_REPORT, UnsupportedModelError, patch

    try:
        model = _build(case)
    except ImportError as e:
        return "not run", f"cannot be built here: {str(e).strip().splitlines()[0]}"
    except Exception as e:  # noqa: BLE001 - the table says why
        return "not run", f"tiny config does not build: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    inputs = _inputs()
    try:
        want = _loss_and_grads(model, inputs)
        want_eval = _eval_outputs(model, inputs)
    except Exception as e:  # noqa: BLE001
        return "not run", f"unpatched forward rejects text-only inputs: {type(e).__name__}: {str(e)[:100]}"
    forwards_before = _instance_forwards(model)
    try:
        handle = patch(model, backend="torch")
    except UnsupportedModelError as e:
        return "refused", str(e)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _loss_and_grads(model, inputs)
            report = LAST_REPORT[0]
            got_eval = _eval_outputs(model, inputs)
    except Exception as e:  # noqa: BLE001
        return "CRASH", f"{type(e).__name__}: {str(e)[:200]}"
    loss_ok = torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    grad_error = _max_error(got[1], want[1])
    if not loss_ok or grad_error > 1e-4:
        return "MISMATCH", f"loss {got[0].item():.6f} vs {want[0].item():.6f}, gradient error {grad_error:.2e}"
    if not (torch.equal(got_eval[0], want_eval[0]) and torch.equal(got_eval[1], want_eval[1])):
        return "MISMATCH", "eval outputs changed under the patch"
    handle.undo()
    if _instance_forwards(model) != forwards_before:
        return "MISMATCH", "undo() left a forward behind"
    torch.manual_seed(0)
    if not torch.equal(model(**inputs).loss.detach(), want[0]):
        return "MISMATCH", "undo() did not restore the loss"
    if report.not_fused:
        return "no effect", report.not_fused
    if report.materialised:
        return "materialised", ", ".join(sorted(set(report.materialised)))
    return "fused", ", ".join(dict.fromkeys(report.served))


@pytest.mark.parametrize("case", list(sweep_cases()))
def test_model_type(case):
    torch.set_num_threads(1)
    status, detail = RESULTS[case] = run_case(case)
    if status == "not run":
        pytest.skip(detail)
    assert status not in ("MISMATCH", "CRASH"), f"{case}: {status}: {detail}"
    if status == "refused":
        assert "no output layer" in detail or "not a linear layer" in detail, detail


# Families whose logits the model transforms (soft cap, multiplier, division) or whose loss has a logsumexp term.
TRANSFORMED = ["gemma2", "recurrent_gemma", "granite", "cohere", "falcon_h1", "hyperclovax", "muse_glimmer",
               "bamba"]


def test_the_sweep_catches_a_dropped_transform(monkeypatch):
    """Mutation check: with the fused form's scales and soft caps dropped, or the z-loss's logsumexp zeroed, every
    transformed family must come out as a MISMATCH (so the sweep's non-default values are visible)."""
    from largevocab.integrations.hf import _head, _lazy

    def without_transforms(tape, vocab):
        form = _lazy.fused_form(tape, vocab)
        if form is not None:
            form.scale, form.tanh, form.post = 1.0, False, 1.0
        return form

    monkeypatch.setattr(_head, "fused_form", without_transforms)
    monkeypatch.setattr(_head.Source, "logsumexp", lambda self, lazy: lazy._lv_hidden.new_zeros(lazy.shape[:-1]))
    torch.set_num_threads(1)
    results = {case: run_case(case) for case in TRANSFORMED}
    assert all(status == "MISMATCH" for status, _ in results.values()), results


def test_coverage_summary():
    if len(RESULTS) < len(sweep_cases()):
        pytest.skip("the whole sweep did not run in this session")
    print("\n" + table(RESULTS))
    fused = sum(status == "fused" for status, _ in RESULTS.values())
    assert fused >= MIN_FUSED, f"only {fused} model types fused"


def table(results) -> str:
    counts: dict[str, int] = {}
    for status, _ in results.values():
        counts[status] = counts.get(status, 0) + 1
    lines = [", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: -kv[1])), "",
             "| model type | result | detail |", "|---|---|---|"]
    lines += [f"| {case} | {status} | {detail.replace('|', '/')} |"
              for case, (status, detail) in sorted(results.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    start = time.time()
    chosen = sys.argv[1].split(",") if len(sys.argv) > 1 else list(sweep_cases())
    results = {}
    for mt in chosen:
        results[mt] = run_case(mt)
        print(f"{mt:28s} {results[mt][0]:12s} {results[mt][1][:150]}", file=sys.stderr, flush=True)
    print(table(results))
    print(f"\n{len(results)} types in {time.time() - start:.0f} s", file=sys.stderr)
