"""Public API of the fused sampled cross-entropy ("CCE-", Zhelnin, Redko et al., arXiv 2509.09682).

Cross-entropy over the positive item and K sampled negatives per row, with logQ correction and accidental-hit
removal, without materialising the N x (1 + K) sampled logits (Triton backend) or with O(chunk x K) of them
(torch backend). Typical use: recommenders with catalogues too large even for the exact fused loss.
"""

from __future__ import annotations

import torch

from . import parallel
from ._common import acc_dtype, check_bool, check_int_tensor, check_options, meta_loss, prepare_inputs
from .cross_entropy import _resolve_backend
from .ops._library import is_strict, poison, use_generator
from .ops._library_sampled import SAMPLING_MODES, _check_counts

# More negatives per row than this would not fit any device's memory as int64 indices (2**31 of them is 16 GiB).
MAX_NEGATIVES = 2**31 - 1


def _check_sampling_options(num_negatives, sampling, shared_negatives, logq_correction, remove_accidental_hits,
                            generator) -> None:
    """Validate the scalar options of the sampled loss; raises ``ValueError``/``TypeError`` naming the value."""
    if not isinstance(sampling, str) or sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
    if num_negatives is not None:
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int):
            raise TypeError(f"num_negatives must be None or an int, got {type(num_negatives).__name__}")
        if not 1 <= num_negatives <= MAX_NEGATIVES:
            raise ValueError(f"num_negatives must be in [1, {MAX_NEGATIVES}], got {num_negatives}")
    check_bool("shared_negatives", shared_negatives)
    check_bool("logq_correction", logq_correction)
    check_bool("remove_accidental_hits", remove_accidental_hits)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")


def _check_item_counts(item_counts, vocab: int | None, device=None) -> torch.Tensor:
    """``item_counts`` after checking type, shape and device; its values are checked where it is used, inside the
    ops (finite, >= 0, not all zero)."""
    if not isinstance(item_counts, torch.Tensor):
        raise TypeError(f"item_counts must be a torch.Tensor, got {type(item_counts).__name__}")
    if item_counts.layout != torch.strided:
        raise TypeError(f"item_counts must be a dense tensor, got layout {item_counts.layout}")
    if item_counts.dtype.is_complex or item_counts.dtype == torch.bool:
        raise TypeError(f"item_counts must be a real (integer or float) tensor, got {item_counts.dtype}")
    if item_counts.dim() != 1 or (vocab is not None and item_counts.shape[0] != vocab):
        want = f"(V,) = ({vocab},)" if vocab is not None else "(V,)"
        raise ValueError(f"item_counts must have shape {want}, got {tuple(item_counts.shape)}")
    if device is not None and item_counts.device != device:
        raise ValueError(f"item_counts ({item_counts.device}) must be on the device of hidden ({device})")
    return item_counts


def _check_negatives(negatives, n_rows: int, target_shape, device, shared_negatives: bool,
                     num_negatives: int | None) -> torch.Tensor:
    """Explicit negatives as int64, (N, K) per row or (K,) shared, after type, shape and device checks (their
    range is checked inside the ops)."""
    check_int_tensor("negatives", negatives)
    if negatives.device != device:
        raise ValueError(f"negatives ({negatives.device}) must be on the device of hidden ({device})")
    shape = tuple(negatives.shape)
    per_row = negatives.dim() >= 2 and shape[:-1] in (tuple(target_shape), (n_rows,))
    if negatives.dim() != 1 and not per_row:
        raise ValueError(
            f"negatives must have shape (K,) (shared), (N, K) or targets.shape + (K,) (per row) with "
            f"N = {n_rows}, targets shape {tuple(target_shape)}; got {shape}"
        )
    if per_row and shared_negatives:
        raise ValueError(f"shared_negatives=True needs negatives of shape (K,), got per-row negatives {shape}")
    k = shape[-1]
    if k == 0:
        raise ValueError(f"negatives must hold at least one negative per row, got shape {shape}")
    if num_negatives is not None and num_negatives != k:
        raise ValueError(f"num_negatives={num_negatives} disagrees with negatives of shape {shape} (K = {k})")
    negatives = negatives.reshape(-1, k) if per_row else negatives
    return negatives.long().contiguous()


def _check_sampling_needs(num_negatives, sampling, item_counts, vocab) -> None:
    """What sampling (no explicit negatives) needs: K for uniform/popularity, counts for popularity only."""
    if sampling == "in_batch":
        if num_negatives is not None:
            raise ValueError(
                f"num_negatives must be None with sampling='in_batch' (K is the number of non-ignored targets), "
                f"got {num_negatives}"
            )
    elif num_negatives is None:
        raise ValueError(f"sampling={sampling!r} needs num_negatives (or explicit negatives=)")
    if sampling == "popularity":
        if item_counts is None:
            raise ValueError("sampling='popularity' needs item_counts (V,)")
    elif item_counts is not None:
        raise ValueError(
            f"item_counts is only used with sampling='popularity' or explicit negatives, not sampling={sampling!r}"
        )


def sample_negatives(
    targets: torch.Tensor,
    num_items: int,
    *,
    num_negatives: int | None = None,
    sampling: str = "uniform",
    shared_negatives: bool = False,
    item_counts: torch.Tensor | None = None,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The negatives :func:`sampled_cross_entropy` draws for these options and ``generator`` state.

    ``targets`` (...) integer in [0, ``num_items``) or ``ignore_index``. Returns int64 indices on ``targets``'
    device: (N, K) per row or (K,) shared (N = ``targets.numel()``), for ``"in_batch"`` the non-ignored targets in
    order. Passing them back as ``negatives=`` (with ``item_counts`` set to the sampling distribution) gives the
    same loss as sampling inside the loss. Torch equivalent (uniform): ``torch.randint(0, num_items, (N, K))``.
    """
    _check_sampling_options(num_negatives, sampling, shared_negatives, True, True, generator)
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
        raise ValueError(f"num_items must be an int >= 1, got {num_items!r}")
    check_int_tensor("targets", targets)
    check_options(ignore_index=ignore_index, reduction="none", label_smoothing=0.0, z_loss=0.0, softcap=None,
                  shift=0, backend="auto")
    _check_sampling_needs(num_negatives, sampling, item_counts, num_items)
    if item_counts is not None:
        _check_item_counts(item_counts, num_items, targets.device)
    with use_generator(generator):
        negatives, *_ = torch.ops.largevocab.draw_negatives(
            targets.reshape(-1).long(), ignore_index, num_items, num_negatives, sampling,
            shared_negatives or sampling == "in_batch", item_counts, None, False, is_strict(),
        )
    return negatives


def sampled_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    num_negatives: int | None = None,
    negatives: torch.Tensor | None = None,
    sampling: str = "uniform",
    shared_negatives: bool = False,
    item_counts: torch.Tensor | None = None,
    logq_correction: bool = True,
    remove_accidental_hits: bool = True,
    ignore_index: int = -100,
    reduction: str = "mean",
    generator: torch.Generator | None = None,
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Sampled softmax cross-entropy of ``hidden @ weight.T`` over [positive, K negatives] per row.

    Shapes: ``hidden`` (..., D), ``weight`` (V, D), ``targets`` (...) integer with ``hidden``'s leading shape;
    rows are the flattened leading dimensions (N of them). Returns a scalar for ``reduction="mean"``/``"sum"``
    and a tensor shaped like ``targets`` for ``"none"`` (0 at ignored rows). The loss is float32 (float64 for
    float64 inputs); ``hidden`` and ``weight`` share one dtype (float16, bfloat16, float32 or float64), and
    under ``torch.autocast`` are cast to the autocast dtype first. Gradients flow to ``hidden`` and ``weight``.

    Per row n with target y_n, negatives neg_n1..neg_nK and ``s(i) = <h_n, W[i]>``::

        c_k    = log(K * q(neg_nk))        if logq_correction else 0
        z_nk   = -inf                      if remove_accidental_hits and neg_nk == y_n
                 s(neg_nk) - c_k           otherwise
        loss_n = logsumexp([s(y_n), z_n1, ..., z_nK]) - s(y_n)

    Ignored rows (``targets == ignore_index``) have loss 0 and zero gradient. Masked hits are -inf in the
    forward and the backward alike (the positive is always in the softmax, so no row is all -inf).

    Negatives:
        negatives: explicit int indices in [0, V): (N, K) (or ``targets.shape + (K,)``) per row, or (K,) shared
            by all rows (``shared_negatives`` is then implied). No sampling happens. Their q for the logQ
            correction is ``item_counts / item_counts.sum()`` when ``item_counts`` is given, else uniform 1 / V;
            a negative with count 0 is an error under logQ correction (its correction would be -inf).
        num_negatives: K for ``"uniform"``/``"popularity"`` sampling (required unless ``negatives`` is given; must
            equal K if both are given; must be None for ``"in_batch"``).
        sampling: ``"uniform"``: with replacement, q(i) = 1/V, so the correction adds ``log(V) - log(K)``.
            ``"popularity"``: with replacement, q(i) = c_i / sum(c) for ``item_counts`` c (V,), finite and
            >= 0, not all zero; items with count 0 are never drawn. ``"in_batch"``: the batch's own non-ignored
            targets, duplicates kept, as one shared set (K = number of non-ignored rows), q(i) = (count of i
            among them) / K, so ``c_k = log(count of neg_k)``.
        shared_negatives: draw one set of K negatives for all rows (one GEMM) instead of K per row.
        item_counts: (V,) counts or frequencies; only with ``"popularity"`` or explicit negatives.
        generator: the ``torch.Generator`` every draw uses (the same seed gives the same negatives); draws happen
            on the generator's device and are moved to ``hidden``'s. :func:`sample_negatives` returns them.

    Other options:
        ignore_index, reduction: as in :func:`largevocab.linear_cross_entropy` (``"mean"`` over non-ignored rows,
            0.0 rather than NaN when all are ignored).
        backend: ``"triton"`` (fused kernels, CUDA tensors: per-row negatives are a register-blocked gather, shared
            negatives a tensor-core GEMM tile; only the per-row log-sum-exp is stored), ``"torch"`` (chunked pure
            PyTorch, O(chunk x K) logits, any device) or ``"auto"`` (triton for CUDA tensors, torch otherwise).
            The Triton backward accumulates dW with atomics, so it is not bit-reproducible even under
            ``torch.use_deterministic_algorithms(True)``; the torch backend is (its ``index_add_`` then is).
        process_group: vocabulary parallelism as in :func:`largevocab.linear_cross_entropy` (or a ``DTensor``
            weight): the negatives are global ids drawn once, identically on every rank (the same generator
            state everywhere), each rank scores those it holds; ``item_counts`` is the whole vocabulary's (V,).
            The sharded form runs the chunked torch code on every device (see :mod:`largevocab.parallel`).

    Torch equivalent, materialising the N x (1 + K) sampled logits (``neg`` (N, K); a shared (K,) set is
    ``neg.expand(N, K)``; ``q`` (V,) as above)::

        h, w, y = hidden.reshape(-1, D).float(), weight.float(), targets.reshape(-1)
        valid = y != ignore_index
        y = torch.where(valid, y, 0)                                        # ignored rows: any in-range index
        pos = (h * w[y]).sum(-1)                                            # (N,)
        z = torch.einsum("nd,nkd->nk", h, w[neg])                           # (N, K)
        if logq_correction: z = z - torch.log(K * q[neg])
        if remove_accidental_hits: z = z.masked_fill(neg == y[:, None], float("-inf"))
        per_row = F.cross_entropy(torch.cat([pos[:, None], z], 1), torch.zeros_like(y), reduction="none")
        per_row = per_row * valid                       # "mean": per_row.sum() / valid.sum().clamp(min=1)
    """
    check_options(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=0.0, z_loss=0.0, softcap=None, shift=0,
        backend=backend,
    )
    _check_sampling_options(num_negatives, sampling, shared_negatives, logq_correction, remove_accidental_hits,
                            generator)
    hidden, weight, _, targets, shard = parallel.resolve(weight, None, process_group, hidden=hidden, targets=targets)
    inputs = prepare_inputs(hidden, weight, targets, None, ignore_index=ignore_index, shift=0,
                            allow_empty_vocab=shard is not None)
    h, w = inputs.hidden, inputs.weight
    n_rows, vocab = h.shape[0], (shard.vocab if shard is not None else w.shape[0])
    if item_counts is not None:
        _check_item_counts(item_counts, vocab, h.device)
    if negatives is not None:
        explicit = _check_negatives(negatives, n_rows, inputs.target_shape, h.device, shared_negatives, num_negatives)
        shared = explicit.dim() == 1
    else:
        explicit = None
        _check_sampling_needs(num_negatives, sampling, item_counts, vocab)
        shared = shared_negatives or sampling == "in_batch"
    if h.device.type == "meta" and explicit is None and sampling == "in_batch":
        return meta_loss(h, w, reduction, inputs.target_shape)
    with use_generator(generator):
        negs, log_kq, safe, valid, bad = torch.ops.largevocab.draw_negatives(
            inputs.targets, ignore_index, vocab, num_negatives, sampling, shared, item_counts, explicit,
            logq_correction, is_strict(),
        )
    resolved = _resolve_backend(backend, h.device)
    if shard is not None:
        loss = parallel.sampled_cross_entropy(
            h, w, safe, valid, negs, log_kq.to(acc_dtype(h.dtype)), shard, logq_correction=logq_correction,
            remove_accidental_hits=remove_accidental_hits, reduction=reduction)
        if reduction == "none":
            return poison(loss, bad, per_row=True).reshape(inputs.target_shape)
        return poison(loss, bad, per_row=False)
    # A uniform q is one value for every item: a (1,) table viewed as (V,) with stride 0.
    correction = log_kq.to(acc_dtype(h.dtype)).expand(vocab) if logq_correction else None
    loss, _ = torch.ops.largevocab.sampled_cross_entropy(h, w, safe, valid, negs, correction,
                                                         remove_accidental_hits, resolved)
    if reduction == "none":
        return poison(loss, bad, per_row=True).reshape(inputs.target_shape)
    total = loss.sum()
    if reduction == "mean":
        # Mean over non-ignored rows; 0 (with zero gradients) when all are ignored, instead of torch's NaN.
        total = total / valid.sum().clamp(min=1).to(total.dtype)
    return poison(total, bad, per_row=False)


class SampledCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`sampled_cross_entropy`: ``SampledCrossEntropyLoss(**options)(hidden, weight, targets)``.

    Holds no parameters: the item embedding ``weight`` (V, D) is passed at call time. ``negatives`` and
    ``item_counts`` are kept as non-persistent buffers, so ``module.to(device)`` moves them. Options are checked
    at construction where they do not depend on the inputs.
    """

    def __init__(
        self,
        *,
        num_negatives: int | None = None,
        negatives: torch.Tensor | None = None,
        sampling: str = "uniform",
        shared_negatives: bool = False,
        item_counts: torch.Tensor | None = None,
        logq_correction: bool = True,
        remove_accidental_hits: bool = True,
        ignore_index: int = -100,
        reduction: str = "mean",
        generator: torch.Generator | None = None,
        backend: str = "auto",
        process_group=None,
    ) -> None:
        super().__init__()
        check_options(
            ignore_index=ignore_index, reduction=reduction, label_smoothing=0.0, z_loss=0.0, softcap=None, shift=0,
            backend=backend,
        )
        _check_sampling_options(num_negatives, sampling, shared_negatives, logq_correction, remove_accidental_hits,
                                generator)
        if item_counts is not None:
            _check_counts(_check_item_counts(item_counts, None), strict=True)  # construction is not a hot path
        if negatives is not None:
            check_int_tensor("negatives", negatives)
        self.register_buffer("negatives", negatives, persistent=False)
        self.register_buffer("item_counts", item_counts, persistent=False)
        self.generator = generator
        self.options = dict(
            num_negatives=num_negatives, sampling=sampling, shared_negatives=shared_negatives,
            logq_correction=logq_correction, remove_accidental_hits=remove_accidental_hits,
            ignore_index=ignore_index, reduction=reduction, backend=backend, process_group=process_group,
        )

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sampled_cross_entropy(hidden, weight, targets, negatives=self.negatives, item_counts=self.item_counts,
                                     generator=self.generator, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "process_group")
