"""One call makes a Hugging Face causal LM (or vision-language model) train without building its logits.

    from largevocab.integrations.hf import patch
    handle = patch(model)          # or patch(LlamaForCausalLM), patch(peft_model), patch(trainer.model)
    loss = model(input_ids, labels=labels).loss     # the model's own loss, fused: outputs.logits is None
    handle.undo()                  # the original forwards again, exactly

How it works. With labels in training, the model's own forward runs unchanged, except that its output layer
(``get_output_embeddings()``) returns :class:`LazyLogits` instead of ``hidden @ W.T + b``: a tensor subclass with
the logits' shape, dtype and device and no values. Everything the model then does to the logits reaches its
``__torch_function__`` (see ``_lazy.py``): slicing and reshaping the rows, scaling, dividing, soft caps in any
written form (``c * tanh(x / c)``, ``tanh(x / c) * c``, in place or not), additive terms, casts and vocabulary
slices are recorded; the model's loss code (``self.loss_function`` or ``F.cross_entropy``) asks the lazy tensor
for a cross-entropy, z-loss terms for a ``logsumexp``, metrics for an ``argmax``, and those are computed by the
fused core (:func:`largevocab.linear_cross_entropy`) from the hidden states, the head's weight and the recorded
transform. So the model's own code decides the loss: label shift, ``num_items_in_batch``, MoE auxiliary losses with
the model's coefficients, extra terms (e.g. Bamba's z-loss), ``text_config`` of composite models — nothing is read
from the forward's source and nothing is rebuilt by the patch.

Never silently wrong: any other op on the logits materialises them (the head's own forward, then the recorded
calls replayed one by one, so the values are exactly the unpatched ones) and runs the op on them, with a one-time
warning, or raises :class:`UnsupportedModelError` with ``materialize="error"``. An in-place op that cannot be
recorded raises. A model whose forward never calls its output layer gets a one-time warning that the patch had no
effect. A model without a linear output layer is refused at patch time.

Distributed and wrapped heads. Every value is computed *inside a call of the output layer* (``_head.py``): the lazy
tensor calls the layer again with an opaque request and the hidden states, so FSDP2, FSDP and DeepSpeed ZeRO-3
gather its weight for the fused forward and, through the hooks or Functions they put on that call's outputs (the
answer is a tuple, which they search), again for the fused backward; the head's weight is read nowhere else (ZeRO-3
would otherwise keep it gathered for the whole step). The lazy logits carry the real logits' ``requires_grad``, so
the frameworks treat them as they would the real ones; what would act on their gradient (a gradient hook, a custom
autograd Function) raises, except the frameworks' own pre-backward hooks and ZeRO-3's identity Function, which the
answer gets too (``_lazy.py``). PEFT's LoRA on the head (``W + scale * B @ A``, built as a (V, D) tensor so autograd
routes the gradients) and ``modules_to_save=["lm_head"]`` are fused too; other adapter kinds on the head run their
own forward.

TRL's ``SFTTrainer`` replaces the model's forward with a fused head of its own; patching before or after the
trainer is built routes that protocol through the model's own (patched) forward instead (``_trl.py``).

Semantics kept from torch: ``F.cross_entropy``'s ``ignore_index``, ``label_smoothing``, ``reduction`` (a mean over
zero targets is NaN, as in torch). The fused core accumulates the logits in float32, so a loss on bfloat16 logits is
more precise than the unpatched one, never less. Without labels (generation, inference) and in eval mode (unless
``fused_in_eval=True``) the model runs exactly as before.
"""

from __future__ import annotations

from ._head import IGNORE_INDEX
from ._lazy import LazyLogits, UnsupportedModelError
from ._patch import LAST_REPORT, PatchHandle, Report, make_settings, patch_model
from ._trl import watch_trl

__all__ = ["IGNORE_INDEX", "LAST_REPORT", "LazyLogits", "PatchHandle", "Report", "UnsupportedModelError", "patch"]


def patch(model_or_class, loss: str = "cce", *, fused_in_eval: bool = False, materialize: str = "warn",
          **options) -> PatchHandle:
    """Make a transformers model (instance or class) compute its training loss without materialising the logits.

    Args:
        model_or_class: a ``*ForCausalLM`` / ``*ForConditionalGeneration`` instance (also under PEFT, DDP or FSDP1
            wrappers, or one TRL's ``SFTTrainer`` prepared), or a model class (instances created afterwards are
            patched too).
        loss: ``"cce"`` (exact: :func:`largevocab.linear_cross_entropy`), ``"sce"`` (Scalable Cross-Entropy) or
            ``"sampled"`` (sampled softmax); the approximate losses replace the model's cross-entropy term.
        fused_in_eval: also fuse in eval mode with labels (then ``logits`` is None there too); by default eval
            keeps the original path so ``compute_metrics`` gets logits.
        materialize: ``"warn"`` (default): an op on the logits the fused core does not compute materialises them,
            with a one-time warning; ``"error"``: it raises :class:`UnsupportedModelError` instead.
        options: options of the chosen loss (e.g. ``backend=...``, ``filter_eps=...``, ``z_loss=...`` for an extra
            z-loss term); reduction, soft cap, bias, ignore index and label smoothing come from the model.

    Returns a :class:`PatchHandle` whose ``undo()`` restores every forward it replaced. Patching again replaces
    the settings. Raises :class:`UnsupportedModelError` for a model without a linear output layer.
    """
    settings = make_settings(loss, options, fused_in_eval, materialize)
    watch_trl()
    return patch_model(model_or_class, settings)
