"""Training losses for SASRec, selectable by name: every one is called as ``loss(hidden, item_weight, targets)``.

``hidden`` (B, L, d) are the model's hidden states, ``item_weight`` (V + 1, d) its tied item table (row 0 is
padding) and ``targets`` (B, L) the next item at each position, 0 at padding positions.

Item 0 is padding, never an item. Every loss drops it in the same way: the catalogue it sees is ``item_weight[1:]``
(a view, no copy) and the targets are ``targets - 1``, so padding positions become ``-1``, passed as
``ignore_index``. Slicing rather than masking means item 0 can be neither a softmax entry, nor a sampled negative,
nor a bucket item for SCE, with no per-loss special case and no -inf column. By default the padding positions are
also removed before the loss (``hidden[targets != 0]``, one gather of N x d): the ignored rows would contribute
nothing but would still cost a row of logits each, which on short-sequence data (Amazon Beauty: ~9 items per user in
a 200-item window) is most of the work.

| name | loss | per step cost | reference |
|---|---|---|---|
| ``ce`` | full softmax, logits (N x V) materialised: ``F.cross_entropy(h @ W.T, y)`` | O(N V) memory | baseline |
| ``cce`` | the same loss, exact, logits never stored: :func:`largevocab.linear_cross_entropy` | O(chunk x V) | |
| ``sce`` | :func:`largevocab.scalable_cross_entropy` (softmax over MIPS-picked hard negatives) | buckets | 2409.18721 |
| ``sampled`` | :func:`largevocab.sampled_cross_entropy` (uniform / popularity / in-batch, logQ) | O(N K) | 2509.09682 |
| ``bce`` | binary CE on the positive and K uniform negatives (original SASRec: K = 1) | O(N K) | Kang 2018 |
| ``gbce`` | gSASRec's generalised BCE, positive term raised to the power beta | O(N K) | 2308.07192 |
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import largevocab as lv

PAD_ID = 0
IGNORE = -1  # targets - 1 at padding positions
LOSS_NAMES = ("ce", "cce", "sce", "sampled", "bce", "gbce")
# gSASRec's recommended calibration (Petrov & Macdonald 2023, and the SCE configs for gBCE): t = 0.75.
DEFAULT_GBCE_T = 0.75
# Negatives per positive when none is given: the original SASRec's 1 for BCE; gSASRec's ML-1M setting (256) for
# gBCE; the CCE- paper's mid-range for the sampled softmax.
DEFAULT_NEGATIVES = {"bce": 1, "gbce": 256, "sampled": 256}


class SASRecLoss(nn.Module):
    """Base class: item 0 removed from the catalogue, padding positions removed or ignored, then :meth:`compute`.

    ``compute(h, w, y)`` gets ``h`` (N, d) (or (B, L, d) with ``compact=False``), ``w = item_weight[1:]`` (V, d)
    and ``y = targets - 1`` with ``-1`` at ignored positions, and returns the mean loss over non-ignored rows.
    ``seed`` seeds the generator of losses that draw random numbers (negatives, SCE buckets); it is created on the
    device of the first call, so a run is reproducible for a given seed and device.
    """

    uses_generator = False

    def __init__(self, *, compact: bool = True, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(compact, bool):
            raise TypeError(f"compact must be a bool, got {type(compact).__name__}")
        self.compact, self.seed = compact, int(seed)
        self._generator: torch.Generator | None = None

    def generator(self, device: torch.device) -> torch.Generator | None:
        if not self.uses_generator:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def reseed(self, seed: int) -> None:
        """Restart the random draws from ``seed`` (the same negatives / buckets again)."""
        self.seed, self._generator = int(seed), None

    def forward(self, hidden: torch.Tensor, item_weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if hidden.shape[:-1] != targets.shape:
            raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} do not match")
        if item_weight.dim() != 2 or item_weight.shape[0] < 2 or item_weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"item_weight must have shape (num_items + 1, {hidden.shape[-1]}), "
                             f"got {tuple(item_weight.shape)}")
        if hidden.dtype != item_weight.dtype:
            # Under autocast the last LayerNorm yields float32 while a table may be 16-bit, or the reverse.
            hidden = hidden.to(item_weight.dtype)
        weight = item_weight[1:]
        if self.compact:
            valid = targets != PAD_ID
            hidden, targets = hidden[valid], targets[valid]
        return self.compute(hidden, weight, targets.long() - 1)

    def compute(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"compact={self.compact}"


class FullCrossEntropy(SASRecLoss):
    """``ce``: ``F.cross_entropy((hidden @ weight.T).float(), targets)``, logits materialised (the baseline)."""

    def compute(self, hidden, weight, targets):
        logits = hidden @ weight.T
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # 16-bit logits: float32 softmax
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE)


class FusedCrossEntropy(SASRecLoss):
    """``cce``: the same loss as ``ce`` by :func:`largevocab.linear_cross_entropy` (logits never stored)."""

    def __init__(self, *, compact: bool = True, seed: int = 0, **options) -> None:
        super().__init__(compact=compact, seed=seed)
        lv.LinearCrossEntropyLoss(ignore_index=IGNORE, **options)  # validates the options now
        self.options = options

    def compute(self, hidden, weight, targets):
        return lv.linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE, **self.options)


class ScalableCrossEntropy(SASRecLoss):
    """``sce``: :func:`largevocab.scalable_cross_entropy`; options ``n_buckets``, ``bucket_size_x``,
    ``bucket_size_y``, ``mix_x``, ``backend`` (the library's defaults otherwise)."""

    uses_generator = True

    def __init__(self, *, compact: bool = True, seed: int = 0, **options) -> None:
        super().__init__(compact=compact, seed=seed)
        lv.ScalableCrossEntropyLoss(ignore_index=IGNORE, **options)
        self.options = options

    def compute(self, hidden, weight, targets):
        return lv.scalable_cross_entropy(hidden, weight, targets, ignore_index=IGNORE,
                                         generator=self.generator(hidden.device), **self.options)


class SampledSoftmax(SASRecLoss):
    """``sampled``: :func:`largevocab.sampled_cross_entropy` with ``num_negatives`` (default 256), ``sampling``
    (``"uniform"``, ``"popularity"``, ``"in_batch"``), ``shared_negatives``, ``logq_correction``,
    ``remove_accidental_hits``, ``backend``. ``"popularity"`` needs ``item_counts`` (num_items + 1,), indexed by
    item id like the table (entry 0 is dropped with the padding row)."""

    uses_generator = True

    def __init__(self, *, compact: bool = True, seed: int = 0, num_negatives: int | None = None,
                 sampling: str = "uniform", item_counts: torch.Tensor | None = None, **options) -> None:
        super().__init__(compact=compact, seed=seed)
        if sampling == "in_batch":
            if num_negatives is not None:
                raise ValueError("num_negatives must be None with sampling='in_batch' (the batch is the negatives)")
        elif num_negatives is None:
            num_negatives = DEFAULT_NEGATIVES["sampled"]
        if item_counts is not None:
            item_counts = torch.as_tensor(item_counts)
            if item_counts.dim() != 1 or item_counts.shape[0] < 2:
                raise ValueError(f"item_counts must have shape (num_items + 1,), got {tuple(item_counts.shape)}")
            item_counts = item_counts[1:]
        if sampling != "popularity":
            item_counts = None  # only the popularity sampler reads them (the library rejects them otherwise)
        lv.SampledCrossEntropyLoss(num_negatives=num_negatives, sampling=sampling, item_counts=item_counts,
                                   ignore_index=IGNORE, **options)
        self.register_buffer("item_counts", item_counts, persistent=False)
        self.options = dict(num_negatives=num_negatives, sampling=sampling, **options)

    def compute(self, hidden, weight, targets):
        return lv.sampled_cross_entropy(hidden, weight, targets, item_counts=self.item_counts, ignore_index=IGNORE,
                                        generator=self.generator(hidden.device), **self.options)


class BinaryCrossEntropy(SASRecLoss):
    """``bce``: the original SASRec loss with ``num_negatives`` K uniform negatives per position (default 1).

    Per position: ``(softplus(-s+) + sum_k softplus(s-_k)) / (1 + K)``, i.e. ``-log sigmoid(s+)`` and
    ``-log(1 - sigmoid(s-))`` averaged over the 1 + K logits, as the SCE reference's ``bce_forward`` and gSASRec's
    training loop do; then the mean over positions. Negatives are drawn uniformly with replacement from items
    1..V (the SCE reference's ``with_rep`` sampler); a draw equal to the positive is kept (probability K / V).
    """

    uses_generator = True
    _name = "bce"

    def __init__(self, *, compact: bool = True, seed: int = 0, num_negatives: int | None = None) -> None:
        super().__init__(compact=compact, seed=seed)
        k = DEFAULT_NEGATIVES[self._name] if num_negatives is None else num_negatives
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
        self.num_negatives = k

    def positive_weight(self, vocab: int) -> float:
        """The weight beta of the positive term: 1 for BCE."""
        return 1.0

    def compute(self, hidden, weight, targets):
        valid = targets != IGNORE
        y = torch.where(valid, targets, torch.zeros_like(targets))
        generator = self.generator(hidden.device)
        negatives = torch.randint(0, weight.shape[0], (*y.shape, self.num_negatives), generator=generator,
                                  device=hidden.device)
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        s_pos, s_neg = (s.to(acc) for s in positive_and_negative_scores(hidden, weight, y, negatives))
        beta = self.positive_weight(weight.shape[0])
        per_row = (beta * F.softplus(-s_pos) + F.softplus(s_neg).sum(-1)) / (1 + self.num_negatives)
        return (per_row * valid).sum() / valid.sum().clamp(min=1)

    def extra_repr(self) -> str:
        return f"num_negatives={self.num_negatives}, compact={self.compact}"


class GeneralisedBinaryCrossEntropy(BinaryCrossEntropy):
    """``gbce``: gSASRec's gBCE (Petrov & Macdonald, "gSASRec: Reducing Overconfidence in Sequential Recommendation
    Trained with Negative Sampling", RecSys 2023, arXiv 2308.07192; the formula of asash/gsasrec's README and
    asash/gSASRec-pytorch's gbce.py).

    With K uniform negatives out of the V - 1 non-positive items, the sampling rate is ``alpha = K / (V - 1)`` and
    ``beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)`` for the calibration parameter ``t`` in [0, 1] (t = 0 gives
    beta = 1, plain BCE; t = 1 gives beta = alpha, the fully calibrated case). The loss per position is::

        -(1 / (1 + K)) * (log(sigmoid(s+) ** beta) + sum_k log(1 - sigmoid(s-_k)))
          = (beta * softplus(-s+) + sum_k softplus(s-_k)) / (1 + K)

    (the gSASRec code's ``beta * pos + neg`` averaged over the 1 + K logits; the SCE reference computes the same
    through the transformed logit ``log(1 / (sigmoid(s+) ** -beta - 1))``). Default K = 256, t = 0.75.
    """

    _name = "gbce"

    def __init__(self, *, compact: bool = True, seed: int = 0, num_negatives: int | None = None,
                 t: float = DEFAULT_GBCE_T) -> None:
        super().__init__(compact=compact, seed=seed, num_negatives=num_negatives)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ValueError(f"t must be a number in [0, 1], got {t!r}")
        self.t = float(t)

    def positive_weight(self, vocab: int) -> float:
        return gbce_beta(self.num_negatives, vocab, self.t)

    def extra_repr(self) -> str:
        return f"num_negatives={self.num_negatives}, t={self.t}, compact={self.compact}"


def positive_and_negative_scores(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 negatives: torch.Tensor, full: bool | None = None
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``(s+ (...), s- (..., K))`` of ``targets`` (...) and ``negatives`` (..., K) against ``hidden`` (..., D).

    Equal to ``(hidden * weight[targets]).sum(-1)`` and ``einsum("...d,...kd->...k", hidden, weight[negatives])``.
    Gathering K negatives' rows stores N x K x D values (and backward scatters as many); scoring every item stores
    N x V. ``full=None`` takes the smaller: on ML-1M with gSASRec's 256 negatives at d = 128, 3.4k logits per row
    instead of 32.8k gathered values (a 3.4 GB gather per batch of 128 x 200), ten times less memory and traffic.
    """
    if full is None:
        full = weight.shape[0] <= negatives.shape[-1] * weight.shape[1]
    if not full:
        return (hidden * weight[targets]).sum(-1), torch.einsum("...d,...kd->...k", hidden, weight[negatives])
    logits = hidden @ weight.T
    s_pos = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return s_pos, logits.gather(-1, negatives)


def gbce_beta(num_negatives: int, num_items: int, t: float) -> float:
    """gSASRec's ``beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)`` with ``alpha = K / (V - 1)``."""
    if num_items < 2:
        raise ValueError(f"gBCE needs at least 2 items, got {num_items}")
    alpha = num_negatives / (num_items - 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


_LOSSES = {
    "ce": FullCrossEntropy,
    "cce": FusedCrossEntropy,
    "sce": ScalableCrossEntropy,
    "sampled": SampledSoftmax,
    "bce": BinaryCrossEntropy,
    "gbce": GeneralisedBinaryCrossEntropy,
}


def build_loss(name: str, *, compact: bool = True, seed: int = 0, **options) -> SASRecLoss:
    """The loss called ``name`` (one of :data:`LOSS_NAMES`) with its options (see each class; unknown options
    raise ``TypeError`` naming them)."""
    if name not in _LOSSES:
        raise ValueError(f"loss must be one of {LOSS_NAMES}, got {name!r}")
    cls = _LOSSES[name]
    if cls in (FullCrossEntropy,) and options:
        raise TypeError(f"loss 'ce' takes no options, got {sorted(options)}")
    return cls(compact=compact, seed=seed, **options)
