"""Custom ops of the sampled cross-entropy: drawing (or checking) the negatives, and the fused loss.

Same conventions as :mod:`largevocab.ops._library`: value checks, random draws and data-dependent sizes (in-batch
negatives) live inside the ops, so ``torch.compile`` traces the loss with no graph break and the same draws as
eager mode. The sampling itself is defined in ``largevocab.sampled``.
"""

from __future__ import annotations

import math

import torch

from .._common import acc_dtype
from ._library import LIBRARY, _grads_or_empty, check_targets, check_values, current_generator, without_autocast

SAMPLING_MODES = ("uniform", "popularity", "in_batch")


def _check_counts(counts: torch.Tensor, strict: bool) -> torch.Tensor:
    """``item_counts`` as float64 after the value checks: finite, >= 0, not all zero."""
    counts = counts.to(torch.float64)
    check_values(~torch.isfinite(counts) | (counts < 0), counts, "item_counts must be finite and >= 0, found {}",
                 strict)
    none_positive = (counts > 0).any().logical_not().reshape(1)
    check_values(none_positive, none_positive,
                 "item_counts are all zero: at least one item must have a positive count", strict)
    return counts


def _draw(targets, valid, vocab, num_negatives, sampling, shared, counts, generator, device) -> torch.Tensor:
    """Sampled negatives (N, K) or (K,), int64 on ``device``; options already validated."""
    if sampling == "in_batch":
        return targets[valid].contiguous()
    size = (num_negatives,) if shared else (targets.shape[0], num_negatives)
    # Sample where the generator lives (a CPU generator also drives CUDA inputs, reproducibly), then move.
    sample_device = generator.device if generator is not None else device
    if sampling == "uniform":
        out = torch.randint(0, vocab, size, generator=generator, device=sample_device)
    else:
        # Inverse-CDF sampling (torch.multinomial caps the number of categories at 2**24). A zero-count item has
        # cdf[i] == cdf[i - 1], so searchsorted(right=True) never lands on it; the clamp guards the one case
        # u * total == total that rounding can produce.
        counts = counts.to(sample_device)
        cdf = torch.cumsum(counts, dim=0)
        u = torch.rand(size, generator=generator, device=sample_device, dtype=torch.float64) * cdf[-1]
        positive = counts > 0
        last_positive = (positive.numel() - 1) - torch.argmax(positive.flip(0).to(torch.int8))
        out = torch.minimum(torch.searchsorted(cdf, u, right=True), last_positive)
    return out.to(device)


def _log_kq(k: int, vocab: int, sampling: str, counts, targets, valid, acc, device) -> torch.Tensor:
    """``log(K * q(item))`` in the accumulation dtype: a (V,) table, or (1,) when q is uniform."""
    if sampling == "in_batch":
        # q(i) = count of i among the K non-ignored targets / K, so K q(i) is that count; items absent from the
        # batch are never negatives (their entry, 0, is unused).
        counts = torch.bincount(targets[valid], minlength=vocab).to(torch.float64)
        return torch.where(counts > 0, counts.log(), torch.zeros_like(counts)).to(acc)
    if counts is None:  # uniform: q(i) = 1 / V for every item
        return torch.full((1,), math.log(k) - math.log(vocab), dtype=acc, device=device)
    counts = counts.to(device)
    log_q = counts.log() - counts.sum().log()
    # Zero-count items are never sampled (and rejected as explicit negatives); 0 keeps the table finite.
    return torch.where(counts > 0, math.log(k) + log_q, torch.zeros_like(log_q)).to(acc)


def _bad_rows_of_negatives(bad_negative: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Rows that use a bad explicit negative: per-row negatives flag their rows, a bad shared one flags all."""
    if bad_negative.dim() == 2:
        return bad_negative.any(dim=1)
    return bad_negative.any().expand(n_rows)


@torch.library.custom_op(f"{LIBRARY}::draw_negatives", mutates_args=())
@without_autocast
def draw_negatives_op(
    targets: torch.Tensor, ignore_index: int, vocab: int, num_negatives: int | None, sampling: str, shared: bool,
    item_counts: torch.Tensor | None, negatives: torch.Tensor | None, logq: bool, strict: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(negatives, log_kq, safe_targets, valid, bad)``: drawn (or checked explicit) negatives, the logQ table
    (``(V,)``, ``(1,)`` for a uniform q, empty without ``logq``), and the checked targets (see ``check_targets``).
    With explicit ``negatives``, q is ``item_counts`` normalised, or uniform without counts."""
    device = targets.device
    safe, valid, bad = check_targets(targets, vocab, ignore_index, strict)
    bad = torch.zeros_like(valid) if bad is None else bad
    counts = _check_counts(item_counts, strict) if item_counts is not None else None
    if negatives is not None:
        out_of_range = (negatives < 0) | (negatives >= vocab)
        flagged = check_values(out_of_range, negatives, f"negatives must be in [0, V={vocab}); found {{}}", strict)
        if counts is not None and logq:
            # A zero-count negative would get log(K q) = -inf as its correction.
            zero = counts.to(device)[negatives.clamp(0, vocab - 1)] == 0
            found = check_values(zero & ~out_of_range, negatives,
                                 "negative item {} has item_counts 0: its logQ correction log(K q) is -inf", strict)
            flagged = found if flagged is None else (flagged if found is None else flagged | found)
        if flagged is not None:
            bad = bad | _bad_rows_of_negatives(flagged, targets.shape[0])
        negs = negatives.clamp(0, vocab - 1)
        mode = "explicit"
    else:
        negs = _draw(safe, valid, vocab, num_negatives, sampling, shared, counts, current_generator(), device)
        mode = sampling
    if not logq:
        return negs, torch.empty(0, device=device), safe, valid, bad
    # float64, so that float64 losses get an exact table; the caller casts it to its accumulation dtype.
    log_kq = _log_kq(negs.shape[-1], vocab, mode, counts, safe, valid, torch.float64, device)
    return negs, log_kq, safe, valid, bad


@draw_negatives_op.register_fake
def _(targets, ignore_index, vocab, num_negatives, sampling, shared, item_counts, negatives, logq, strict):
    device, n = targets.device, targets.shape[0]
    if negatives is not None:
        negs = torch.empty_like(negatives)
    elif sampling == "in_batch":
        negs = torch.empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long, device=device)
    else:
        negs = torch.empty((num_negatives,) if shared else (n, num_negatives), dtype=torch.long, device=device)
    uniform = item_counts is None and (sampling != "in_batch" or negatives is not None)
    table = torch.empty(0 if not logq else (1 if uniform else vocab), dtype=torch.float64, device=device)
    flags = dict(dtype=torch.bool, device=device)
    return negs, table, torch.empty_like(targets), torch.empty((n,), **flags), torch.empty((n,), **flags)


def _sampled_module(backend: str, hidden: torch.Tensor, negatives: torch.Tensor):
    if backend == "triton" and hidden.shape[0] > 0 and hidden.shape[1] > 0 and negatives.numel() > 0:
        from . import triton_sampled

        return triton_sampled
    from . import torch_sampled

    return torch_sampled


@torch.library.custom_op(f"{LIBRARY}::sampled_cross_entropy", mutates_args=())
@without_autocast
def sampled_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, negatives: torch.Tensor,
    correction: torch.Tensor | None, remove_hits: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(loss, lse)`` of ``largevocab.ops.torch_sampled.forward`` (targets and negatives in range;
    ``correction`` in the accumulation dtype)."""
    return _sampled_module(backend, hidden, negatives).forward(hidden, weight, targets, valid, negatives, correction,
                                                               remove_hits)


@sampled_cross_entropy_op.register_fake
def _(hidden, weight, targets, valid, negatives, correction, remove_hits, backend):
    acc = acc_dtype(hidden.dtype)
    return hidden.new_empty((hidden.shape[0],), dtype=acc), hidden.new_empty((hidden.shape[0],), dtype=acc)


def _sampled_setup_context(ctx, inputs, output):
    hidden, weight, targets, valid, negatives, correction, remove_hits, backend = inputs
    ctx.save_for_backward(hidden, weight, targets, valid, negatives, correction, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.config = (remove_hits, backend)
    ctx.set_materialize_grads(False)


@torch.library.custom_op(f"{LIBRARY}::sampled_cross_entropy_backward", mutates_args=())
@without_autocast
def sampled_cross_entropy_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, negatives: torch.Tensor,
    correction: torch.Tensor | None, remove_hits: bool, backend: str, lse: torch.Tensor, grad_loss: torch.Tensor,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh, dw)`` of :func:`sampled_cross_entropy_op` (empty where not needed), recomputing the logits."""
    grads = _sampled_module(backend, hidden, negatives).backward(
        hidden, weight, targets, valid, negatives, correction, remove_hits, lse, grad_loss, tuple(needs))
    return _grads_or_empty(grads, (hidden, weight))


@sampled_cross_entropy_backward_op.register_fake
def _(hidden, weight, targets, valid, negatives, correction, remove_hits, backend, lse, grad_loss, needs):
    grads = (torch.empty_like(hidden), torch.empty_like(weight))
    return _grads_or_empty([t if need else None for t, need in zip(grads, needs, strict=True)], (hidden, weight))


def _sampled_backward(ctx, grad_loss, _grad_lse):
    hidden, weight, targets, valid, negatives, correction, lse = ctx.saved_tensors
    remove_hits, backend = ctx.config
    needs = tuple(ctx.needs_input_grad[:2])
    if grad_loss is None:
        return (None,) * 8
    dh, dw = torch.ops.largevocab.sampled_cross_entropy_backward(
        hidden, weight, targets, valid, negatives, correction, remove_hits, backend, lse, grad_loss, list(needs))
    return (dh if needs[0] else None), (dw if needs[1] else None), *(None,) * 6


sampled_cross_entropy_op.register_autograd(_sampled_backward, setup_context=_sampled_setup_context)
