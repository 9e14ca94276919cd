"""Custom ops of the vocabulary-parallel losses: each rank holds a contiguous block of the vocabulary's rows.

The collectives run inside the ops (a process group is named by its ``group_name``, which a custom-op schema can
carry), so ``torch.compile`` sees opaque nodes. Every rank calls every collective in the same order with tensors of
the same shape, whatever its shard holds (an empty shard included), so no rank can wait alone.

* ``vp_linear_cross_entropy`` (+ its backward): exact CE. Forward: the shard's per-token log-sum-exp, target logit
  (0 where the target is elsewhere) and logit sum; one MAX all-reduce of the LSE and one SUM all-reduce of
  ``[exp(lse_r - max), target logit, logit sum]`` give the global ones (O(N) floats). Backward: the shard's
  gradient from the *global* LSE (so its softmax is the whole vocabulary's), then one SUM all-reduce of dH (N x D).
* ``vp_logsumexp`` / ``vp_sum`` / ``vp_copy``: differentiable collectives for composing the other losses:
  a log-sum-exp and a sum over ranks whose backward is local (every rank holds the same reduced value and the same
  upstream gradient, so d/dx_r needs no communication), and an identity whose backward sums the gradient over
  ranks (Megatron's "copy to the tensor-parallel region", for the replicated hidden states).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from .._common import CEOptions, acc_dtype
from . import torch_ce
from ._library import (
    LIBRARY,
    _ce_backend,
    _grads_or_empty,
    _reduce,
    _token_grad,
    check_targets,
    poison,
    without_autocast,
)


def _group(group_name: str):
    return _resolve_process_group(group_name)


def all_reduce_logsumexp(x: torch.Tensor, group) -> torch.Tensor:
    """``log(sum_r exp(x_r))`` elementwise over the ranks, with torch.logsumexp's +inf / -inf / NaN."""
    peak = x.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
    total = torch.exp(x - shift)
    dist.all_reduce(total, group=group)
    return total.log() + shift


def _local_targets(targets, valid, offset: int, size: int):
    """This shard's view of global targets: local ids where owned, ``owned`` (N,) bool."""
    local = targets - offset
    owned = valid & (local >= 0) & (local < size)
    return torch.where(owned, local, torch.zeros_like(local)), owned


# ------------------------------------------------------------------------------------------------ exact CE


def _shard_stats(hidden, weight, bias, local, owned, opts: CEOptions, backend: str):
    n = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    if weight.shape[0] == 0:  # an empty shard: no logits, lse -inf
        zeros = hidden.new_zeros(n, dtype=acc)
        return torch.full_like(zeros, -math.inf), zeros, zeros if opts.label_smoothing else None
    if _ce_backend(backend, hidden) == "triton":
        from . import triton_ce

        h, w = triton_ce._rows_contiguous(hidden), triton_ce._rows_contiguous(weight)
        b = bias.contiguous() if bias is not None else None
        marked = torch.where(owned, local, torch.full_like(local, -1)).contiguous()  # -1 matches no column
        return triton_ce._forward(h, w, b, marked, opts)
    return torch_ce.stats(hidden, weight, bias, local, owned, opts)


@torch.library.custom_op(f"{LIBRARY}::vp_linear_cross_entropy", mutates_args=())
@without_autocast
def vp_linear_cross_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, ignore_index: int,
    reduction: str, label_smoothing: float, z_loss: float, softcap: float | None, backend: str, group_name: str,
    offset: int, vocab: int, strict: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, lse)`` of the whole vocabulary from this rank's rows ``[offset, offset + V_r)`` of it."""
    group = _group(group_name)
    opts = CEOptions(label_smoothing, z_loss, softcap, None, smoothing_vocab=vocab)
    _, valid, bad = check_targets(targets, vocab, ignore_index, strict)
    local, owned = _local_targets(targets, valid, offset, weight.shape[0])
    lse_r, tgt_r, sum_r = _shard_stats(hidden, weight, bias, local, owned, opts, backend)
    lse = all_reduce_logsumexp(lse_r, group)
    parts = torch.stack([tgt_r] + ([sum_r] if opts.label_smoothing else []))
    dist.all_reduce(parts, group=group)
    from .._common import combine_loss

    loss = combine_loss(lse, parts[0], parts[1] if opts.label_smoothing else None, valid, opts, vocab)
    return _reduce(poison(loss, bad, per_row=True), valid, reduction), lse


@vp_linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, reduction, label_smoothing, z_loss, softcap, backend, group_name,
      offset, vocab, strict):
    n, acc = hidden.shape[0], acc_dtype(hidden.dtype)
    return hidden.new_empty((n,) if reduction == "none" else (), dtype=acc), hidden.new_empty((n,), dtype=acc)


@torch.library.custom_op(f"{LIBRARY}::vp_linear_cross_entropy_backward", mutates_args=())
@without_autocast
def vp_linear_cross_entropy_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, lse: torch.Tensor,
    grad_tokens: torch.Tensor | None, grad_lse: torch.Tensor | None, ignore_index: int, label_smoothing: float,
    z_loss: float, softcap: float | None, backend: str, group_name: str, offset: int, vocab: int, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dh, dw, db)``: dH summed over the ranks (the full gradient), dW and dbias of this shard's rows."""
    group = _group(group_name)
    opts = CEOptions(label_smoothing, z_loss, softcap, None, smoothing_vocab=vocab)
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab))
    valid = valid & ~bad
    local, owned = _local_targets(targets, valid, offset, weight.shape[0])
    g = grad_tokens
    if g is not None:
        g = poison(g.to(lse.dtype), bad if bad.device.type == "cuda" else None, per_row=True).contiguous()
    need_h, need_w, need_b = needs
    if weight.shape[0] == 0:
        grads = (torch.zeros_like(hidden) if need_h else None, torch.zeros_like(weight) if need_w else None,
                 torch.zeros_like(bias) if need_b else None)
    elif _ce_backend(backend, hidden) == "triton":
        from . import triton_ce

        marked = torch.where(owned, local, torch.full_like(local, -1))
        grads = triton_ce.backward(hidden, weight, bias, marked, valid, lse, opts, g, grad_lse, tuple(needs))
    else:
        grads = torch_ce.backward(hidden, weight, bias, local, valid, opts, g, grad_lse, tuple(needs), owned=owned,
                                  lse_ext=lse)
    dh, dw, db = grads
    if need_h:
        # Every rank runs this all-reduce: requires_grad of hidden must agree across the group.
        dh = dh.contiguous()
        dist.all_reduce(dh, group=group)
    return _grads_or_empty((dh, dw, db), (hidden, weight, weight))


@vp_linear_cross_entropy_backward_op.register_fake
def _(hidden, weight, bias, targets, lse, grad_tokens, grad_lse, ignore_index, label_smoothing, z_loss, softcap,
      backend, group_name, offset, vocab, needs):
    grads = (torch.empty_like(hidden), torch.empty_like(weight), torch.empty_like(bias) if bias is not None else None)
    return _grads_or_empty([t if need else None for t, need in zip(grads, needs, strict=True)],
                           (hidden, weight, weight))


def _vp_ce_setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, ignore_index, reduction, label_smoothing, z_loss, softcap, backend, group_name,
     offset, vocab, strict) = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    ctx.set_materialize_grads(False)
    ctx.config = (ignore_index, reduction, label_smoothing, z_loss, softcap, backend, group_name, offset, vocab)


def _vp_ce_backward(ctx, g_loss, g_lse):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    ignore_index, reduction, label_smoothing, z_loss, softcap, backend, group_name, offset, vocab = ctx.config
    needs = tuple(ctx.needs_input_grad[:3])
    if g_loss is None and g_lse is None:
        return (None,) * 14
    g = _token_grad(g_loss, targets != ignore_index, reduction)
    grads = torch.ops.largevocab.vp_linear_cross_entropy_backward(
        hidden, weight, bias, targets, lse, g, g_lse, ignore_index, label_smoothing, z_loss, softcap, backend,
        group_name, offset, vocab, list(needs))
    return (*(t if need else None for t, need in zip(grads, needs, strict=True)), *(None,) * 11)


vp_linear_cross_entropy_op.register_autograd(_vp_ce_backward, setup_context=_vp_ce_setup_context)


# ------------------------------------------------------------------------------- differentiable collectives


@torch.library.custom_op(f"{LIBRARY}::vp_logsumexp", mutates_args=())
@without_autocast
def vp_logsumexp_op(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """``log(sum_r exp(x_r))`` over the ranks; backward ``exp(x_r - y)`` times the (replicated) upstream grad."""
    return all_reduce_logsumexp(x.contiguous(), _group(group_name))


@vp_logsumexp_op.register_fake
def _(x, group_name):
    return torch.empty_like(x)


def _lse_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output)


def _lse_backward(ctx, grad):
    x, y = ctx.saved_tensors
    # A shard with no entry (x = -inf) gets no gradient, even where y is -inf too.
    weight = torch.where(x == -math.inf, torch.zeros_like(x), torch.exp(x - y))
    return grad * weight, None


vp_logsumexp_op.register_autograd(_lse_backward, setup_context=_lse_setup)


@torch.library.custom_op(f"{LIBRARY}::vp_sum", mutates_args=())
@without_autocast
def vp_sum_op(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Sum over the ranks; backward: the upstream gradient itself (it is the same on every rank)."""
    out = x.clone().contiguous()
    dist.all_reduce(out, group=_group(group_name))
    return out


@vp_sum_op.register_fake
def _(x, group_name):
    return torch.empty_like(x)


vp_sum_op.register_autograd(lambda ctx, grad: (grad, None), setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op(f"{LIBRARY}::vp_copy", mutates_args=())
@without_autocast
def vp_copy_op(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Identity; backward sums the gradient over the ranks (each rank's shard contributes part of it)."""
    return x.clone()


@vp_copy_op.register_fake
def _(x, group_name):
    return torch.empty_like(x)


def _copy_setup(ctx, inputs, output):
    ctx.group_name = inputs[1]


def _copy_backward(ctx, grad):
    return torch.ops.largevocab.vp_sum(grad, ctx.group_name), None


vp_copy_op.register_autograd(_copy_backward, setup_context=_copy_setup)


# ---------------------------------------------------------------------------------- Scalable Cross-Entropy


@torch.library.custom_op(f"{LIBRARY}::vp_sce_select", mutates_args=())
@without_autocast
def vp_sce_select_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, n_buckets: int | None,
    bucket_size_x: int | None, bucket_size_y: int, mix_x: bool, group_name: str, offset: int, vocab: int,
    strict: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, local_cols, local_targets, owned, valid, bad)`` of vocabulary-parallel SCE.

    The bucket vectors and rows come from the replicated hidden states (and the same generator state on every
    rank); each bucket's top ``b_y`` items are the top of every rank's own top ``b_y``, all-gathered. Items and
    targets held by another rank get the local id ``V_r`` (absent)."""
    from ..scalable import bucket_plan, top_items
    from ._library import current_generator

    group = _group(group_name)
    size = weight.shape[0]
    _, valid, bad = check_targets(targets, vocab, ignore_index, strict)
    buckets, rows, b_y = bucket_plan(hidden, valid, n_buckets, bucket_size_x, bucket_size_y, vocab, mix_x,
                                     current_generator())
    scores, ids = top_items(weight, buckets, b_y, offset=offset)
    missing = b_y - scores.shape[1]  # a shard smaller than b_y pads with items that can never win
    scores = torch.cat([scores, scores.new_full((scores.shape[0], missing), -math.inf)], 1)
    ids = torch.cat([ids, ids.new_full((ids.shape[0], missing), -1)], 1)
    world = dist.get_world_size(group)
    every_scores = [torch.empty_like(scores) for _ in range(world)]
    every_ids = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(every_scores, scores.contiguous(), group=group)
    dist.all_gather(every_ids, ids.contiguous(), group=group)
    top = torch.cat(every_scores, 1).topk(b_y, dim=1)
    cols = torch.cat(every_ids, 1).gather(1, top.indices) - offset
    local_cols = torch.where((cols >= 0) & (cols < size), cols, torch.full_like(cols, size))
    local, owned = _local_targets(targets, valid, offset, size)
    local = torch.where(owned, local, torch.full_like(local, size))
    return rows, local_cols, local, owned, valid, bad if bad is not None else torch.zeros_like(valid)


@vp_sce_select_op.register_fake
def _(hidden, weight, targets, ignore_index, n_buckets, bucket_size_x, bucket_size_y, mix_x, group_name, offset,
      vocab, strict):
    ctx = torch.library.get_ctx()
    n_b = n_buckets if n_buckets is not None else ctx.new_dynamic_size()
    index = dict(dtype=torch.long, device=hidden.device)
    flags = dict(dtype=torch.bool, device=hidden.device)
    n = targets.shape[0]
    return (torch.empty((n_b, ctx.new_dynamic_size()), **index), torch.empty((n_b, min(bucket_size_y, vocab)), **index),
            torch.empty((n,), **index), torch.empty((n,), **flags), torch.empty((n,), **flags),
            torch.empty((n,), **flags))


# ------------------------------------------------------------------------------------ sampled cross-entropy


@torch.library.custom_op(f"{LIBRARY}::vp_sampled_partial", mutates_args=())
@without_autocast
def vp_sampled_partial_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, owned: torch.Tensor, negatives: torch.Tensor,
    correction: torch.Tensor | None, remove_hits: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lse_r, pos_r)`` of one shard (:mod:`largevocab.ops.torch_sampled_shard`); ids ``V_r`` are absent."""
    from . import torch_sampled_shard

    return torch_sampled_shard.forward(hidden, weight, targets, owned, negatives, correction, remove_hits)


@vp_sampled_partial_op.register_fake
def _(hidden, weight, targets, owned, negatives, correction, remove_hits):
    acc = acc_dtype(hidden.dtype)
    return hidden.new_empty((hidden.shape[0],), dtype=acc), hidden.new_empty((hidden.shape[0],), dtype=acc)


@torch.library.custom_op(f"{LIBRARY}::vp_sampled_partial_backward", mutates_args=())
@without_autocast
def vp_sampled_partial_backward_op(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, owned: torch.Tensor, negatives: torch.Tensor,
    correction: torch.Tensor | None, remove_hits: bool, lse: torch.Tensor, grad_lse: torch.Tensor | None,
    grad_pos: torch.Tensor | None, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    from . import torch_sampled_shard

    grads = torch_sampled_shard.backward(hidden, weight, targets, owned, negatives, correction, remove_hits, lse,
                                         grad_lse, grad_pos, tuple(needs))
    return _grads_or_empty(grads, (hidden, weight))


@vp_sampled_partial_backward_op.register_fake
def _(hidden, weight, targets, owned, negatives, correction, remove_hits, lse, grad_lse, grad_pos, needs):
    grads = (torch.empty_like(hidden), torch.empty_like(weight))
    return _grads_or_empty([t if need else None for t, need in zip(grads, needs, strict=True)], (hidden, weight))


def _partial_setup(ctx, inputs, output):
    hidden, weight, targets, owned, negatives, correction, remove_hits = inputs
    ctx.save_for_backward(hidden, weight, targets, owned, negatives, correction, output[0])
    ctx.remove_hits = remove_hits
    ctx.set_materialize_grads(False)


def _partial_backward(ctx, grad_lse, grad_pos):
    hidden, weight, targets, owned, negatives, correction, lse = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:2])
    if grad_lse is None and grad_pos is None:
        return (None,) * 7
    dh, dw = torch.ops.largevocab.vp_sampled_partial_backward(
        hidden, weight, targets, owned, negatives, correction, ctx.remove_hits, lse, grad_lse, grad_pos, list(needs))
    return (dh if needs[0] else None), (dw if needs[1] else None), *(None,) * 5


vp_sampled_partial_op.register_autograd(_partial_backward, setup_context=_partial_setup)
