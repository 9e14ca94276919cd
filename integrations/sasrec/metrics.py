"""Full-catalogue ranking metrics: HR@K, NDCG@K, MRR@K and catalogue coverage COV@K (no sampled metrics).

Every user's next item is ranked against the whole catalogue (items 1..V) minus the items of the user's input
history (the SCE reference's ``downvote_seen_items``; a target the user has already seen therefore counts as a
miss). Scores are computed ``users_per_batch`` users at a time and reduced to the top ``max(ks)`` by a running top-k
over chunks of ``item_chunk`` items, so memory is O(users_per_batch x (item_chunk + K)) beyond the item table: a
10M-item catalogue is ranked without ever holding a users x items score matrix.

Ties are broken by item id: among equal scores the smaller id ranks first. The ranking is therefore a deterministic
function of the scores, whatever the chunking or batching (a ``torch.topk`` over the catalogue alone would leave
the order of equal scores to the implementation).

Definitions (``rank`` the 1-based position of the target in the user's ranked list, U evaluated users, V items)::

    HR@K   = #{rank <= K} / U
    NDCG@K = sum_{rank <= K} 1 / log2(rank + 1) / U        (one relevant item: IDCG = 1)
    MRR@K  = sum_{rank <= K} 1 / rank / U
    COV@K  = |union of all users' top-K lists| / V
"""

from __future__ import annotations

import math

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10, 20, 50)
# Scores are materialised this many (user x item) entries at a time per chunk: 16M floats, 64 MiB.
SCORE_CHUNK_ELEMENTS = 1 << 24
DEFAULT_USERS_PER_BATCH = 256


def _ordered(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (score desc, id asc) of each row of ``scores`` (B, n) whose columns have increasing ``ids``."""
    k = min(k, scores.shape[1])
    values, index = scores.topk(k, dim=1)
    kth = values[:, -1:]
    # topk may pick any of the entries tied with the k-th value: where more are tied than were taken, redo the row
    # with a stable sort, which keeps ties in column (= id) order.
    straddles = (scores == kth).sum(1) > (values == kth).sum(1)
    if bool(straddles.any()):
        rows = straddles.nonzero().squeeze(1)
        sorted_values, sorted_index = scores[rows].sort(dim=1, descending=True, stable=True)
        values[rows], index[rows] = sorted_values[:, :k], sorted_index[:, :k]
    # Within the kept k, order ties by id as well: sort by id, then stably by score.
    by_id = index.sort(dim=1).indices
    values, index = values.gather(1, by_id), index.gather(1, by_id)
    by_score = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, by_score), ids[index.gather(1, by_score)]


def streaming_topk(users: torch.Tensor, item_weight: torch.Tensor, k: int, *, exclude: list[np.ndarray] | None = None,
                   first_item: int = 1, item_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` items for each user vector, over items ``first_item..V`` of ``item_weight`` (V + 1, d).

    ``users`` (B, d); ``exclude[b]``: item ids whose score is -inf for user b (their input history). Returns
    ``(scores, items)``, both (B, k), best first, ties by smaller id. Items are scored ``item_chunk`` at a time
    (default: 16M scores per chunk), keeping only a running top-k.
    """
    n_items = item_weight.shape[0]
    if item_chunk is None:
        item_chunk = max(k, SCORE_CHUNK_ELEMENTS // max(1, users.shape[0]))
    device = users.device
    if exclude is not None:
        lengths = torch.tensor([len(e) for e in exclude], device=device)
        ex_rows = torch.repeat_interleave(torch.arange(len(exclude), device=device), lengths)
        flat = [np.asarray(e, dtype=np.int64) for e in exclude]
        ex_items = torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0, np.int64)).to(device)
    best_scores = best_items = None
    for start in range(first_item, n_items, item_chunk):
        stop = min(start + item_chunk, n_items)
        scores = (users @ item_weight[start:stop].T).float()
        if exclude is not None:
            inside = (ex_items >= start) & (ex_items < stop)
            scores[ex_rows[inside], ex_items[inside] - start] = float("-inf")
        ids = torch.arange(start, stop, device=device)
        chunk_scores, chunk_items = _ordered(scores, ids, k)
        if best_scores is None:
            best_scores, best_items = chunk_scores, chunk_items
            continue
        # Earlier chunks hold smaller ids, so a stable sort of [best, chunk] by score keeps ties in id order.
        merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
        merged_items = torch.cat([best_items, chunk_items], dim=1)
        order = merged_scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
        best_scores, best_items = merged_scores.gather(1, order), merged_items.gather(1, order)
    return best_scores, best_items


class RankingMetrics:
    """Accumulates HR/NDCG/MRR/COV@K from top-k lists, batch by batch; :meth:`result` gives the dict."""

    def __init__(self, num_items: int, ks=DEFAULT_KS) -> None:
        self.ks = tuple(sorted(set(int(k) for k in ks)))
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"ks must be positive integers, got {ks!r}")
        self.num_items = num_items
        self.users = 0
        self.sums = {f"{m}@{k}": 0.0 for k in self.ks for m in ("hr", "ndcg", "mrr")}
        self.covered = {k: np.zeros(num_items + 1, dtype=bool) for k in self.ks}

    def update(self, top_items: torch.Tensor, targets: torch.Tensor) -> None:
        """``top_items`` (B, >= max(ks)) ranked item ids, ``targets`` (B,) the true next items."""
        top = top_items.cpu().numpy()
        hits = top == targets.cpu().numpy()[:, None]
        has_hit = hits.any(1)
        rank = np.where(has_hit, hits.argmax(1) + 1, np.iinfo(np.int64).max)  # 1-based; "infinite" if absent
        self.users += len(top)
        for k in self.ks:
            inside = rank <= k
            self.sums[f"hr@{k}"] += float(inside.sum())
            self.sums[f"ndcg@{k}"] += float((1.0 / np.log2(rank[inside] + 1.0)).sum())
            self.sums[f"mrr@{k}"] += float((1.0 / rank[inside]).sum())
            self.covered[k][top[:, :k].reshape(-1)] = True

    def result(self) -> dict:
        out = {name: value / max(1, self.users) for name, value in self.sums.items()}
        for k in self.ks:
            out[f"cov@{k}"] = float(self.covered[k][1:].sum()) / self.num_items
        return dict(sorted(out.items(), key=lambda kv: (kv[0].split("@")[0], int(kv[0].split("@")[1]))))


def rank_metrics(scorer, item_weight: torch.Tensor, inputs: list[np.ndarray], targets, *, ks=DEFAULT_KS,
                 exclude_seen: bool = True, users_per_batch: int = DEFAULT_USERS_PER_BATCH,
                 item_chunk: int | None = None) -> dict:
    """HR/NDCG/MRR/COV@K of ranking the whole catalogue for every user.

    ``scorer(batch_of_histories) -> (B, d)`` user vectors; ``item_weight`` (V + 1, d), row 0 padding (never
    ranked); ``inputs[u]`` user u's input history (also the items excluded when ``exclude_seen``); ``targets[u]``
    the item to find. Returns ``{"hr@1": ..., "ndcg@10": ..., "cov@50": ..., "users": U}``.
    """
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} input histories but {len(targets)} targets")
    num_items = item_weight.shape[0] - 1
    metrics = RankingMetrics(num_items, ks)
    k = min(max(metrics.ks), num_items)
    for start in range(0, len(inputs), users_per_batch):
        batch = inputs[start:start + users_per_batch]
        users = scorer(batch)
        scores, top = streaming_topk(users, item_weight, k, exclude=batch if exclude_seen else None,
                                     item_chunk=item_chunk)
        # A user with fewer than k unseen items gets excluded (-inf) ones at the end: drop them (id 0 is never a
        # target and never counts as covered).
        top = top.masked_fill(scores == float("-inf"), 0)
        if top.shape[1] < max(metrics.ks):  # a catalogue smaller than K: pad with an id that is never a target
            top = torch.cat([top, top.new_zeros(top.shape[0], max(metrics.ks) - top.shape[1])], dim=1)
        metrics.update(top, targets[start:start + users_per_batch])
    result = metrics.result()
    result["users"] = metrics.users
    return result


def ndcg_of_rank(rank: int) -> float:
    """NDCG of a single relevant item at 1-based ``rank`` (helper for hand-computed examples)."""
    return 1.0 / math.log2(rank + 1.0)
