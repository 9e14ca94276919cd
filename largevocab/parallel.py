"""Vocabulary-parallel losses: the output layer's rows sharded over the ranks of a process group (or a DTensor).

Layout (Megatron's and torchtitan's tensor-parallel output layer): rank r of the group holds rows
``[offset_r, offset_r + V_r)`` of the (V, D) weight (and of the bias), blocks ordered by rank, sizes free to
differ (an empty shard too). ``hidden`` and the *global* ``targets`` are the same on every rank. The loss (and
LSE) is the global one, identical on every rank and equal to the unsharded loss on the concatenated weight;
``hidden.grad`` is the full gradient on every rank (dH is all-reduced in backward); ``weight.grad``/``bias.grad``
are this shard's rows of the full gradient.

Shard sizes: the group's sizes are read with one all-gather of ``(V_r, D)`` the first time a (group, shard shape)
is used, and cached, so later calls cost no host sync; D must agree on every rank. A shard shape is a property of
the model: changing it on one rank only (the others hitting their cache) would pair that all-gather with another
collective. For a DTensor weight the sizes come from its placement instead.

Communication per call, N rows, float32 (float64 for float64 inputs), ``p`` bytes per float:

* exact CE: forward ``N * p`` (MAX of the LSE) + ``2N * p`` (SUM of exp(LSE - max) and the target logit; 3N with
  label smoothing); backward ``N * D * p`` (dH). Never O(N * V).
* SCE: the rows' selection is replicated (same inputs, same generator state); per bucket every rank sends its top
  ``b_y`` item scores and ids (``n_b * b_y * (p + 8) * ranks`` gathered), then the bucket LSEs
  (``2 * n_b * b_x * p``) and positives (``N * p``) are reduced; backward ``N * D * p``.
* sampled CE: negatives are drawn once with the same generator on every rank; the per-row LSE (``2N * p``) and
  positive (``N * p``) are reduced; backward ``N * D * p``.

Every rank runs the same collectives in the same order, whatever its shard holds, and errors that depend on the
inputs (targets outside ``[0, V)``, bad shard shapes) are decided from data every rank has, so all ranks raise
together instead of one waiting forever. :func:`set_replication_check` turns on a debug check that ``hidden`` and
``targets`` really are identical on every rank (one small all-gather per call).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Set LARGEVOCAB_CHECK_REPLICATED=1 (or call set_replication_check(True)) to verify the replicated inputs.
_CHECK_REPLICATED = os.environ.get("LARGEVOCAB_CHECK_REPLICATED", "0") == "1"
_SIZES: dict = {}


def set_replication_check(enabled: bool) -> None:
    """Debug mode: every vocabulary-parallel call all-gathers a fingerprint of ``hidden`` and ``targets`` and raises
    ``ValueError`` on every rank if they differ between ranks (the layout requires them identical)."""
    global _CHECK_REPLICATED
    _CHECK_REPLICATED = bool(enabled)


@dataclass(frozen=True)
class VocabShard:
    """This rank's block of the vocabulary: rows ``[offset, offset + size)`` of ``vocab``."""

    group: object
    offset: int
    size: int
    vocab: int

    @property
    def group_name(self) -> str:
        return self.group.group_name


def _is_dtensor(t) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _gathered_sizes(group, size: int, dim: int, device) -> list[tuple[int, int]]:
    key = (group.group_name, size, dim)
    if key not in _SIZES:
        world = dist.get_world_size(group)
        mine = torch.tensor([size, dim], dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=group)
        _SIZES[key] = [tuple(int(v) for v in t.tolist()) for t in every]
    return _SIZES[key]


def _dtensor_shard(weight, name: str):
    """(local tensor, offset, global size, group) of a DTensor sharded along dim 0 (or replicated) on a 1-D mesh."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"a DTensor {name} must live on a 1-D device mesh, got a {mesh.ndim}-D mesh {mesh.shape}")
    placement = weight.placements[0]
    if not (isinstance(placement, Shard) and placement.dim == 0) and not isinstance(placement, Replicate):
        raise ValueError(f"a DTensor {name} must be sharded along the vocabulary (Shard(0)) or replicated, got "
                         f"{weight.placements}")
    _, offsets = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
    offset = int(offsets[0]) if isinstance(placement, Shard) else None
    return weight.to_local(), offset, int(weight.shape[0]), mesh.get_group()


def resolve(weight, bias, process_group, *, hidden=None, targets=None):
    """``(hidden, weight, bias, targets, shard)`` as plain tensors and this rank's :class:`VocabShard`, or
    ``shard=None`` when the loss is not vocabulary-parallel (no group, or a replicated DTensor)."""
    unwrap = (lambda t: t.to_local() if _is_dtensor(t) else t)  # noqa: E731
    hidden, targets = unwrap(hidden), unwrap(targets)
    if _is_dtensor(weight):
        if process_group is not None:
            raise ValueError("pass either a DTensor weight or process_group, not both: the DTensor names its group")
        local, offset, vocab, group = _dtensor_shard(weight, "weight")
        if bias is not None:
            if not _is_dtensor(bias):
                raise TypeError("with a DTensor weight, bias must be a DTensor with the same placement")
            local_bias, bias_offset, _, _ = _dtensor_shard(bias, "bias")
            if bias_offset != offset or local_bias.shape[0] != local.shape[0]:
                raise ValueError(f"bias shard [{bias_offset}, +{local_bias.shape[0]}) differs from weight shard "
                                 f"[{offset}, +{local.shape[0]})")
            bias = local_bias
        if offset is None:  # replicated: every rank has the whole table
            return hidden, local, bias, targets, None
        return hidden, local, bias, targets, VocabShard(group, offset, local.shape[0], vocab)
    if process_group is None:
        return hidden, weight, bias, targets, None
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(process_group).__name__}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be this rank's (V_r, D) block of rows, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    sizes = _gathered_sizes(process_group, weight.shape[0], weight.shape[1], weight.device)
    dims = {d for _, d in sizes}
    if len(dims) > 1:
        raise ValueError(f"every rank's weight shard must have the same D; the group has (V_r, D) = {sizes}")
    rank = dist.get_rank(process_group)
    offset = sum(v for v, _ in sizes[:rank])
    vocab = sum(v for v, _ in sizes)
    if vocab == 0:
        raise ValueError(f"the shards of the group hold no vocabulary rows at all: (V_r, D) = {sizes}")
    return hidden, weight, bias, targets, VocabShard(process_group, offset, weight.shape[0], vocab)


def check_replicated(shard: VocabShard, hidden: torch.Tensor, targets: torch.Tensor) -> None:
    """In debug mode (:func:`set_replication_check`), raise on every rank unless hidden/targets agree."""
    if not _CHECK_REPLICATED:
        return
    with torch.no_grad():
        h = hidden.detach().double()
        mine = torch.stack([h.sum(), h.square().sum(), targets.double().sum(), targets.double().square().sum(),
                            torch.tensor(float(hidden.numel()), dtype=torch.float64, device=h.device)])
        world = dist.get_world_size(shard.group)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=shard.group)
    if any(not torch.equal(e, every[0]) for e in every):
        raise ValueError("vocabulary-parallel inputs differ between ranks: hidden and targets must be identical on "
                         "every rank of the group (tensor-parallel layout)")


def linear_cross_entropy(h, w, b, targets, shard: VocabShard, *, ignore_index, reduction, label_smoothing,
                         z_loss, softcap, backend, strict):
    """Global ``(loss, lse)`` from this rank's shard (see the module docstring); inputs prepared by the caller."""
    from .ops import _library_parallel  # noqa: F401  (registers the ops)

    check_replicated(shard, h, targets)
    return torch.ops.largevocab.vp_linear_cross_entropy(
        h, w, b, targets, ignore_index, reduction, float(label_smoothing), float(z_loss),
        float(softcap) if softcap is not None else None, backend, shard.group_name, shard.offset, shard.vocab,
        strict,
    )


def scalable_cross_entropy(h, w, targets, shard: VocabShard, *, n_buckets, bucket_size_x, bucket_size_y, mix_x,
                           ignore_index, reduction, backend, strict):
    """Global SCE from this rank's shard: ``(reduced loss, per-row loss, bad rows)``; see the module docstring."""
    from .ops import _library_parallel  # noqa: F401  (registers the ops)
    from .scalable import reduce_buckets

    check_replicated(shard, h, targets)
    name = shard.group_name
    rows, cols, local, owned, valid, bad = torch.ops.largevocab.vp_sce_select(
        h.detach(), w.detach(), targets, ignore_index, n_buckets, bucket_size_x, bucket_size_y, mix_x, name,
        shard.offset, shard.vocab, strict)
    h = torch.ops.largevocab.vp_copy(h, name)  # backward: dH summed over the shards
    lse, positive = torch.ops.largevocab.bucket_lse(h, w, local, rows, cols, backend)
    lse = torch.ops.largevocab.vp_logsumexp(lse, name)
    positive = torch.ops.largevocab.vp_sum(torch.where(owned, positive, torch.zeros_like(positive)), name)
    loss, per_row = reduce_buckets(lse, positive, rows, reduction)
    return loss, per_row, bad


def sampled_cross_entropy(h, w, safe_targets, valid, negatives, log_kq, shard: VocabShard, *, logq_correction,
                          remove_accidental_hits, reduction):
    """Global sampled CE from this rank's shard, for negatives drawn (identically on every rank) over the whole
    vocabulary: ``(reduced or per-row loss)``; see the module docstring. Runs the chunked torch code."""
    from .ops import _library_parallel  # noqa: F401  (registers the ops)
    from .ops.torch_sampled import sampled_loss

    check_replicated(shard, h, safe_targets)
    name, size, lo = shard.group_name, shard.size, shard.offset

    def local(ids):  # local ids, V_r for ids held elsewhere
        inside = (ids >= lo) & (ids < lo + size)
        return torch.where(inside, ids - lo, torch.full_like(ids, size)), inside

    targets, owned = local(safe_targets)
    owned = owned & valid
    negs, _ = local(negatives)
    correction = None
    if logq_correction:
        table = log_kq if log_kq.shape[0] > 1 else log_kq.expand(shard.vocab)
        correction = torch.cat([table[lo:lo + size], table.new_zeros(1)])  # the last entry: absent items
    h = torch.ops.largevocab.vp_copy(h, name)  # backward: dH summed over the shards
    lse, pos = torch.ops.largevocab.vp_sampled_partial(h, w, targets, owned, negs, correction, remove_accidental_hits)
    lse = torch.ops.largevocab.vp_logsumexp(lse, name)
    pos = torch.ops.largevocab.vp_sum(pos, name)
    loss = sampled_loss(lse, pos, valid)
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / valid.sum().clamp(min=1).to(total.dtype) if reduction == "mean" else total
