"""SASRec with its item catalogue sharded over the ranks of a process group (vocabulary parallelism).

    model = shard_items(SASRec(SASRecConfig(num_items=V)), group)   # each rank keeps its block of table rows
    loss = ShardedItemLoss(build_loss("sce", seed=0))                 # cce, sce, sampled (ce = exact cce)
    hidden = gather_rows(ddp(inputs_r), group)                        # see "Layout" below
    loss(hidden, targets, model.item_emb).backward()

Layout: the vocabulary group is also the data-parallel group.

* The (V + 1, d) item table (row 0 is padding) is split into contiguous row blocks in rank order, with
  ``torch.chunk``'s sizes (``ceil((V + 1) / W)`` rows, the last ones shorter), which is exactly a DTensor ``Shard(0)``
  placement, so a checkpoint can be written and read with ``torch.distributed.checkpoint`` at any world size.
  Rank 0's block holds the padding row. A separate output table (``tie_output=False``) is split the same way.
* The transformer is replicated and each rank runs it on its *own* slice of the global batch (data parallel, under
  DDP, with the table shards excluded from DDP). The input lookup (:class:`VocabParallelEmbedding`) all-gathers the
  ids of every rank's slice, looks up the rows this rank owns (zeros elsewhere) and reduce-scatters, so every rank
  gets the complete embeddings of its own slice; backward all-gathers the slices' gradients and each rank adds the
  rows it owns into its shard's gradient.
* The vocabulary-parallel losses need ``hidden`` and ``targets`` identical on every rank, so the hidden states of
  the slices are all-gathered (:func:`gather_rows`) into the global batch before the loss: every rank computes the
  loss of the *global* batch against its shard (``process_group=``), and the loss is the global mean, the same on
  every rank. Its backward gives every rank the full gradient of the global batch's hidden states (the loss
  all-reduces dH over the shards), so :func:`gather_rows`' backward keeps this rank's rows of it, unchanged.
* A replicated parameter's gradient on rank r is then the part of the global gradient that comes through rank r's
  slice; the exact gradient is the *sum* over ranks, so DDP runs with an all-reduce-SUM communication hook
  (:func:`data_parallel`) instead of its default average. Each table shard's gradient is already exact (its rows of
  the global gradient, from the loss and from every rank's lookups) and must not be averaged.

A step on W ranks with B rows each therefore equals one step of one process on the concatenated batch of W x B rows
(float rounding aside; dropout masks are drawn per rank, so they differ from one process's), which
``tests/test_sasrec_sharded.py`` checks for cce, sce and sampled. SCE and sampled CE draw their buckets / negatives
from the loss's generator, seeded identically on every rank (the same seed as the single-process run).

Communication per training step, global batch ``G = W * B`` windows of length L (``n`` = G * L positions), d
floats of ``p`` bytes: ids all-gather ``8 n``; lookup reduce-scatter ``n d p`` in (``n d p / W`` out) and its backward
all-gather ``n d p``; hidden all-gather ``n d p``; the loss (see :mod:`largevocab.parallel`, over the N <= n
non-padding positions): O(N p) plus ``N d p`` for dH; DDP's SUM of the transformer's gradients. Nothing is O(V).

Evaluation (:func:`evaluate_sharded`): each rank embeds its slice of a block of users, the user vectors are
all-gathered, every rank ranks them against its own shard (top-k with global ids, seen items excluded), the
per-shard top-k lists are all-gathered and merged, ties by smaller id, so the top-k is exactly the single-process
:func:`~.metrics.streaming_topk` of the whole catalogue.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import largevocab as lv

from .data import right_align
from .losses import IGNORE, FullCrossEntropy, FusedCrossEntropy, SampledSoftmax, SASRecLoss, ScalableCrossEntropy
from .metrics import DEFAULT_KS, DEFAULT_USERS_PER_BATCH, RankingMetrics, streaming_topk
from .model import PAD_ID, SASRec
from .train import _autocast

TABLES = ("item_emb", "out_emb")  # the (V + 1, d) tables of SASRec that are sharded
NEG_INF = float("-inf")


def shard_bounds(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank``: ``torch.chunk``'s split, i.e. a DTensor ``Shard(0)``'s."""
    chunk = -(-rows // world)
    lo = min(rank * chunk, rows)
    return lo, min(lo + chunk, rows)


def _world(group) -> tuple[int, int]:
    return dist.get_world_size(group), dist.get_rank(group)


def _all_gather_cat(x: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    world, _ = _world(group)
    every = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(every, x.contiguous(), group=group)
    return torch.cat(every, dim)


# ------------------------------------------------------------------------------------------- collectives


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0; backward: this rank's rows of the (replicated, complete) upstream gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rows = group, x.shape[0]
        return _all_gather_cat(x, group)

    @staticmethod
    def backward(ctx, grad):
        _, rank = _world(ctx.group)
        if lv.parallel._CHECK_REPLICATED:
            _check_same(grad, ctx.group, "the gradient reaching gather_rows")
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows], None


def gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """``torch.cat`` over the ranks of ``x`` (B, ...) (same shape on every rank) -> (W * B, ...), in rank order.

    Its backward keeps this rank's rows of the upstream gradient without summing over ranks: it is correct only when
    everything downstream is computed identically on every rank and so yields the same complete gradient there,
    as the vocabulary-parallel losses do (``largevocab.parallel.set_replication_check(True)`` verifies it).
    Communication: forward ``W * x.nbytes`` gathered."""
    return _GatherRows.apply(x, group)


def _check_same(t: torch.Tensor, group, what: str) -> None:
    d = t.detach().double()
    fingerprint = torch.stack([d.sum(), d.square().sum()])
    every = _all_gather_cat(fingerprint[None], group)
    if not torch.equal(every, fingerprint.expand_as(every)):
        raise ValueError(f"{what} differs between ranks: the computation after gather_rows must be replicated")


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, offset, num_embeddings, padding_idx, group):
        all_ids = _all_gather_cat(ids, group)  # (W * B, ...): every rank's slice
        # Decided from the gathered ids, which every rank holds: all ranks raise together, none waits.
        if all_ids.numel() and (int(all_ids.min()) < 0 or int(all_ids.max()) >= num_embeddings):
            raise ValueError(f"item ids must be in [0, {num_embeddings}), got ids in "
                             f"[{int(all_ids.min())}, {int(all_ids.max())}]")
        local = all_ids - offset
        owned = (local >= 0) & (local < weight.shape[0])
        safe = torch.where(owned, local, torch.zeros_like(local))
        if weight.shape[0]:
            part = torch.where(owned.unsqueeze(-1), weight[safe], weight.new_zeros(()))
        else:
            part = weight.new_zeros((*all_ids.shape, weight.shape[1]))
        out = weight.new_empty((*ids.shape, weight.shape[1]))
        # Each position has one owner and zeros elsewhere, so the sum is exact: the embeddings equal nn.Embedding's.
        dist.reduce_scatter_single(out, part.contiguous(), group=group)
        ctx.save_for_backward(safe, owned & (all_ids != padding_idx))
        ctx.group, ctx.rows = group, weight.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        safe, keep = ctx.saved_tensors
        every = _all_gather_cat(grad, ctx.group)  # every slice's gradient: this shard's rows may be anywhere
        dw = grad.new_zeros((ctx.rows, grad.shape[-1]))
        dw.index_add_(0, safe[keep], every[keep])
        return None, dw, None, None, None, None


class VocabParallelEmbedding(nn.Module):
    """This rank's rows ``[offset, offset + V_r)`` of a (num_embeddings, d) embedding table.

    ``forward(ids)``: ``ids`` (B, ...) this rank's (global) ids, the same shape on every rank of ``group``; returns
    (B, ..., d), equal to ``nn.Embedding(num_embeddings, d, padding_idx)(ids)`` on the whole table. A collective:
    every rank of the group must call it together (see the module docstring for its communication). The padding
    row gets no gradient, as with ``nn.Embedding(padding_idx=...)``. Ids outside ``[0, num_embeddings)`` raise
    ``ValueError`` on every rank.
    """

    def __init__(self, weight: torch.Tensor, offset: int, num_embeddings: int, group,
                 padding_idx: int = PAD_ID) -> None:
        super().__init__()
        if weight.dim() != 2 or not 0 <= offset <= offset + weight.shape[0] <= num_embeddings:
            raise ValueError(f"a shard of shape {tuple(weight.shape)} at row {offset} does not fit a table of "
                             f"{num_embeddings} rows")
        self.weight = nn.Parameter(weight)
        self.offset, self.num_embeddings, self.padding_idx, self.group = offset, num_embeddings, padding_idx, group

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _ShardedLookup.apply(ids, self.weight, self.offset, self.num_embeddings, self.padding_idx, self.group)

    def extra_repr(self) -> str:
        return (f"rows [{self.offset}, {self.offset + self.weight.shape[0]}) of {self.num_embeddings}, "
                f"dim {self.embedding_dim}")


# --------------------------------------------------------------------------------------------- the model


def sharded_tables(model: SASRec) -> dict[str, VocabParallelEmbedding]:
    """The sharded tables of ``model`` by attribute name (empty for an unsharded model)."""
    return {name: t for name in TABLES if isinstance(t := getattr(model, name, None), VocabParallelEmbedding)}


def item_table(model: SASRec) -> VocabParallelEmbedding:
    """The sharded table items are scored against (``model.item_weight()``'s module)."""
    tables = sharded_tables(model)
    if "item_emb" not in tables:
        raise ValueError("the model's item table is not sharded: call shard_items(model, group) first")
    return tables.get("out_emb", tables["item_emb"])


@torch.no_grad()
def shard_items(model: SASRec, group=None) -> SASRec:
    """Keep only this rank's block of rows of ``model``'s item table(s), in place; returns ``model``.

    Every rank must pass the same model (same seed or the same checkpoint): the transformer stays replicated and
    rank r keeps rows :func:`shard_bounds` ``(V + 1, W, r)`` of the table. A factorised (MLET) table is refused
    (collapse it first: :meth:`SASRec.collapse_mlet`).
    """
    group = group or dist.group.WORLD
    if model.config.mlet_inner_dim is not None:
        raise ValueError("an MLET item table cannot be sharded; call model.collapse_mlet() first")
    if sharded_tables(model):
        raise ValueError("the model's item table is already sharded")
    world, rank = _world(group)
    for name in TABLES:
        table = getattr(model, name)
        if table is None:
            continue
        rows = table.weight.shape[0]
        lo, hi = shard_bounds(rows, world, rank)
        shard = table.weight[lo:hi].detach().clone()
        setattr(model, name, VocabParallelEmbedding(shard, lo, rows, group, padding_idx=PAD_ID))
    return model


# ---------------------------------------------------------------------------------------------- the loss


class ShardedItemLoss(nn.Module):
    """A SASRec loss (``ce``, ``cce``, ``sce`` or ``sampled`` from :func:`~.losses.build_loss`, with its options and
    seed) computed against a sharded item table through the vocabulary-parallel losses.

    ``forward(hidden, targets, table)``: ``hidden`` (B, L, d) and ``targets`` (B, L) (0 at padding) identical on
    every rank (:func:`gather_rows`), ``table`` the :class:`VocabParallelEmbedding` items are scored against. The
    same loss as ``loss(hidden, full_table, targets)`` of one process: padding removed (``compact``), item 0 dropped,
    targets shifted by one; ``ce`` becomes the exact fused CE (the same loss, logits never materialised).
    """

    def __init__(self, loss: SASRecLoss) -> None:
        super().__init__()
        if isinstance(loss, FullCrossEntropy):
            fn, options = lv.linear_cross_entropy, {}
        elif isinstance(loss, FusedCrossEntropy):
            fn, options = lv.linear_cross_entropy, dict(loss.options)
        elif isinstance(loss, ScalableCrossEntropy):
            fn, options = lv.scalable_cross_entropy, dict(loss.options)
        elif isinstance(loss, SampledSoftmax):
            fn, options = lv.sampled_cross_entropy, dict(loss.options)
        else:
            raise ValueError(f"a sharded item table trains with the ce, cce, sce or sampled loss, got {loss!r}")
        self.loss, self.fn, self.options = loss, fn, options

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, table: VocabParallelEmbedding) -> torch.Tensor:
        if hidden.shape[:-1] != targets.shape:
            raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
        weight = table.weight
        if hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        if table.offset == 0:  # the padding row is rank 0's first row: not an item
            weight = weight[1:]
        if self.loss.compact:
            valid = targets != PAD_ID
            hidden, targets = hidden[valid], targets[valid]
        kwargs = dict(self.options)
        if self.loss.uses_generator:
            kwargs["generator"] = self.loss.generator(hidden.device)
        if isinstance(self.loss, SampledSoftmax):
            kwargs["item_counts"] = self.loss.item_counts
        return self.fn(hidden, weight, targets.long() - 1, ignore_index=IGNORE, process_group=table.group, **kwargs)

    def extra_repr(self) -> str:
        return repr(self.loss)


# ------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def sharded_topk(users: torch.Tensor, shard: torch.Tensor, offset: int, k: int, group, *,
                 exclude: list[np.ndarray] | None = None, item_chunk: int | None = None):
    """The top-``k`` of the whole catalogue from this rank's rows ``[offset, offset + V_r)`` of the item table.

    ``users`` (B, d) identical on every rank; ``exclude[b]`` global item ids scored -inf for user b. Returns
    ``(scores, items)`` (B, k), global ids, best first, ties by smaller id: the same as
    ``streaming_topk(users, full_table, k, exclude=exclude)``. Row 0 of the table (padding) is never ranked.
    Communication: ``W * B * k * (4 + 8)`` bytes gathered.
    """
    size = shard.shape[0]
    first = PAD_ID + 1 - offset if offset <= PAD_ID < offset + size else 0
    local_exclude = None
    if exclude is not None:
        local_exclude = []
        for items in exclude:
            items = np.asarray(items, dtype=np.int64)
            local_exclude.append(items[(items >= offset) & (items < offset + size)] - offset)
    b = users.shape[0]
    if size > first:
        scores, items = streaming_topk(users, shard, k, exclude=local_exclude, first_item=first,
                                       item_chunk=item_chunk)
        items = items + offset
    else:
        scores = users.new_empty((b, 0), dtype=torch.float32)
        items = torch.empty((b, 0), dtype=torch.long, device=users.device)
    missing = k - scores.shape[1]  # a shard with fewer than k items: pad with entries that never win
    scores = torch.cat([scores.float(), scores.new_full((b, missing), NEG_INF, dtype=torch.float32)], 1)
    items = torch.cat([items, items.new_zeros((b, missing))], 1)
    scores, items = _all_gather_cat(scores, group, dim=1), _all_gather_cat(items, group, dim=1)
    # Rank order is id order, and each list is (score desc, id asc): a stable sort keeps ties by id.
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), items.gather(1, order)


def _slice_of(count: int, world: int, rank: int) -> tuple[int, int, int]:
    """(start, stop, padded size) of this rank's contiguous slice of ``count`` rows."""
    per = -(-count // world)
    start = min(rank * per, count)
    return start, min(start + per, count), per


@torch.no_grad()
def evaluate_sharded(model: SASRec, inputs: list[np.ndarray], targets, *, ks=DEFAULT_KS,
                     users_per_batch: int = DEFAULT_USERS_PER_BATCH, exclude_seen: bool = True, amp: bool = False,
                     item_chunk: int | None = None) -> dict:
    """Full-catalogue HR/NDCG/MRR/COV@K of a sharded ``model``, the same dict as :func:`~.train.evaluate` of the
    unsharded model, on every rank. ``users_per_batch`` users per rank are embedded at a time (a collective)."""
    model.eval()
    table = item_table(model)
    group = table.group
    world, rank = _world(group)
    device = table.weight.device
    shard = table.weight.float()
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} input histories but {len(targets)} targets")
    num_items = table.num_embeddings - 1
    metrics = RankingMetrics(num_items, ks)
    k = min(max(metrics.ks), num_items)
    block = users_per_batch * world
    for start in range(0, len(inputs), block):
        batch = inputs[start:start + block]
        lo, hi, per = _slice_of(len(batch), world, rank)
        mine = list(batch[lo:hi]) + [np.zeros(0, dtype=np.int64)] * (per - (hi - lo))
        with _autocast(device, amp):
            users = model.user_embeddings(right_align(mine, model.config.max_len).to(device)).float()
        users = _all_gather_cat(users, group)
        kept = torch.cat([torch.arange(r * per, r * per + (s[1] - s[0]))
                          for r in range(world) for s in [_slice_of(len(batch), world, r)]])
        scores, top = sharded_topk(users[kept.to(device)], shard, table.offset, k, group,
                                   exclude=batch if exclude_seen else None, item_chunk=item_chunk)
        top = top.masked_fill(scores == NEG_INF, 0)  # as rank_metrics: excluded / absent entries never count
        if top.shape[1] < max(metrics.ks):
            top = torch.cat([top, top.new_zeros(top.shape[0], max(metrics.ks) - top.shape[1])], dim=1)
        for first in range(0, len(batch), users_per_batch):  # evaluate()'s batches: its float sums, bit for bit
            metrics.update(top[first:first + users_per_batch], targets[start + first:start + first + users_per_batch])
    result = metrics.result()
    result["users"] = metrics.users
    return result


__all__ = ["ShardedItemLoss", "VocabParallelEmbedding", "evaluate_sharded", "gather_rows", "item_table",
           "shard_bounds", "shard_items", "sharded_tables", "sharded_topk"]
