"""TRL's ``SFTTrainer``: its fused-LM-head protocol answered by the patched model's own forward.

TRL (>= 1.x) gives the model a forward of its own (``trl.trainer.utils.add_fused_lm_head``): called with
``fused_lm_head=True`` it skips the model's forward, projects the decoder's hidden states through ``lm_head.weight``
in chunks and returns per-token ``log_probs`` (the trainer's loss is ``-log_probs.sum() / n``), ``entropy``,
``is_top1`` and ``label_mask``. Left alone, it would bypass the largevocab patch whichever came first. So:

- patched after the trainer is built (``patch(trainer.model)``): TRL's forward is replaced by :func:`sft_forward`;
- patched before: TRL's ``add_fused_lm_head``, as the SFT trainer module sees it, is wrapped (when that module is
  imported, now or later) so that, for a model carrying the largevocab patch, :func:`sft_forward` replaces TRL's
  forward as soon as TRL installs it.

:func:`sft_forward` runs the model's own forward with lazy logits (so the model's own transforms apply) and returns
the per-token values of the cross-entropy the model's loss served, with the entropy and argmax of the same logits,
in TRL's ``FusedCausalLMOutput``. A model whose loss is not one per-token cross-entropy over its label positions
gets an :class:`UnsupportedModelError` naming the reason, never a different loss.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import sys
import types
import weakref

import torch

from ._head import chunked_rows
from ._lazy import UnsupportedModelError

_TRL_MODULE = "trl.trainer.sft_trainer"


def _is_trl_forward(forward) -> bool:
    # TRL wraps its forward with functools.wraps(type(model).forward): only the code object keeps its own name.
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)
    return code is not None and code.co_name == "_fused_forward" and f"{os.sep}trl{os.sep}" in code.co_filename


def trl_fused_forward(model):
    """A handle on TRL's fused forward installed on ``model`` (or our replacement of it), or None."""
    forward = vars(model).get("forward")
    if forward is not None and (_is_trl_forward(forward) or hasattr(getattr(forward, "__func__", None),
                                                                     "_lv_trl_forward")):
        return _TrlPatch(forward)
    return None


class _TrlPatch:
    def __init__(self, forward):
        func = forward.__func__
        self.trl_forward = getattr(func, "_lv_trl_forward", forward)

    def patch(self, model, settings):
        from ._patch import PatchHandle

        heads = weakref.WeakSet()
        install_sft_forward(model, self.trl_forward, settings, heads)
        return PatchHandle(model, self.trl_forward, False, heads, previous=self.trl_forward)


def install_sft_forward(model, trl_forward, settings, heads) -> None:
    def forward(self, *args, fused_lm_head=False, **kwargs):
        if not fused_lm_head:
            return trl_forward(*args, **kwargs)
        return sft_forward(self, args, kwargs, settings, heads)

    forward._lv_trl_forward = trl_forward
    model.forward = types.MethodType(functools.wraps(type(model).forward)(forward), model)


def sft_forward(model, args, kwargs, settings, heads):
    """TRL's ``model(..., labels=..., fused_lm_head=True)`` computed by the model's own forward, fused."""
    from trl.trainer.utils import FusedCausalLMOutput

    from ._patch import _PATCH_MARK, run_fused

    labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
    if labels is None and shift_labels is None:
        raise ValueError("fused_lm_head=True needs labels")
    kwargs = {**kwargs, "use_cache": False}
    if labels is None:  # transformers' loss reads shift_labels only next to labels
        kwargs["labels"] = shift_labels
    cls_forward = type(model).forward
    call = functools.partial(getattr(cls_forward, _PATCH_MARK, cls_forward), model)
    outputs, context = run_fused(model, call, args, kwargs, settings, heads, per_token=True)
    lazy, per_token, targets, ignore_index = _the_cross_entropy(model, context)
    raw_targets = targets
    batch = (shift_labels if shift_labels is not None else labels).shape
    rows = per_token.reshape(batch[0], -1)
    targets = targets.reshape(batch[0], -1)
    if rows.shape[1] != batch[1]:
        raise UnsupportedModelError(f"{type(model).__name__}'s loss scores {rows.shape[1]} positions per sequence, "
                                    f"not the {batch[1]} of its labels: TRL's per-token log-probabilities would not "
                                    "line up with them")
    want = shift_labels if shift_labels is not None else torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    if not torch.equal(targets, want.to(targets.device)):
        raise UnsupportedModelError(f"{type(model).__name__}'s loss does not score the next-token labels TRL's "
                                    "SFTTrainer reads its per-token log-probabilities against")
    keep = slice(None) if shift_labels is not None else slice(0, -1)
    log_probs, targets = -rows[:, keep], targets[:, keep]
    mask = targets != ignore_index
    entropy, top1 = _entropy_and_argmax(lazy, raw_targets, ignore_index,
                                        context.settings.options.get("backend", "auto"))
    entropy = entropy.reshape(batch[0], -1)[:, keep].masked_fill(~mask, 0.0)
    is_top1 = (top1.reshape(batch[0], -1)[:, keep] == targets) & mask
    return FusedCausalLMOutput(loss=outputs.loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1,
                               label_mask=mask, aux_loss=getattr(outputs, "aux_loss", None))


def _the_cross_entropy(model, context):
    name = type(model).__name__
    if context.settings.loss != "cce":
        raise UnsupportedModelError(f"TRL's SFTTrainer computes its loss from exact per-token log-probabilities; "
                                    f"loss={context.settings.loss!r} gives none")
    if len(context.per_token) != 1:
        raise UnsupportedModelError(
            f"{name}'s loss computed {len(context.per_token)} cross-entropies over its logits, not one: TRL's "
            "SFTTrainer rebuilds the loss from one per-token log-probability per label")
    lazy, per_token, targets, ignore_index = context.per_token[0]
    if not lazy._lv_rows_full:
        raise UnsupportedModelError(f"{name}'s loss scores a subset of its logits' rows: TRL's per-token "
                                    "log-probabilities would not line up with the labels")
    return lazy, per_token, targets, ignore_index


def _entropy_and_argmax(lazy, targets, ignore_index, backend):
    """Per-row entropy and argmax of the lazy logits, no grad: the fused core's ops where the logits have a fused
    form, else the head's forward and the replayed tape in row chunks."""
    import largevocab as lv

    def entropy(logits):
        log_p = torch.log_softmax(logits.float(), dim=-1)
        return -(log_p.exp() * log_p).sum(-1)

    def run(module, hidden):
        fused = source._fused(module, lazy, hidden)
        if fused is None:
            return chunked_rows(module, lazy, hidden, entropy, lambda x: x.argmax(-1))
        hidden, weight, bias, softcap = fused
        with torch.no_grad():
            _, ent = lv.linear_log_probs(hidden, weight, targets.reshape(hidden.shape[:-1]), bias=bias,
                                         softcap=softcap, ignore_index=ignore_index, return_entropy=True,
                                         backend=backend)
            return ent, lv.linear_argmax(hidden, weight, bias=bias, softcap=softcap, backend=backend)

    source = lazy._lv_source
    return source._request(lazy, run)


# ---------------------------------------------------------------------------------------------------------------
# Patched before the trainer: wrap TRL's add_fused_lm_head.


def _wrap_add_fused_lm_head(module) -> None:
    original = getattr(module, "add_fused_lm_head", None)
    if original is None or getattr(original, "_lv_wrapped", False):
        return

    @functools.wraps(original)
    def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        from ._patch import patched_forward

        ours = patched_forward(model, False) or patched_forward(type(model), True)
        original(model, temperature, cast_lm_head_to_fp32, outputs)
        if ours is None:
            return
        if temperature != 1.0:
            raise UnsupportedModelError(f"TRL's fused LM head at temperature {temperature}: the largevocab patch "
                                        "computes the model's own loss (temperature 1); undo the patch to use TRL's")
        install_sft_forward(model, vars(model)["forward"], ours._lv_settings, ours._lv_heads)

    add_fused_lm_head._lv_wrapped = True
    module.add_fused_lm_head = add_fused_lm_head


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Wraps TRL's add_fused_lm_head in the SFT trainer module right after that module is imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRL_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            _wrap_add_fused_lm_head(module)

        spec.loader.exec_module = exec_and_wrap
        return spec


def watch_trl() -> None:
    """Make a later or earlier import of TRL's SFT trainer route its fused head through the patch."""
    if _TRL_MODULE in sys.modules:
        _wrap_add_fused_lm_head(sys.modules[_TRL_MODULE])
    elif not any(isinstance(finder, _WrapOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WrapOnImport())
