"""Multi-Layer Embedding Training (MLET; Deng, Ghaemmaghami, Singh, Cho, Orshansky, Erez, Orshansky, ACML 2023,
arXiv 2309.15881).

An embedding table ``W`` (V, d) is trained as the product ``A @ B`` of a (V, k) table and a (k, d) matrix with an
inner dimension ``k >= d``. The search space is the same as a plain table's (every (V, d) matrix of rank <= d is such
a product), but gradient descent on the factors updates ``W`` along its singular directions with adaptive step sizes,
which the paper shows helps rarely seen ids. After training :meth:`FactorizedEmbedding.collapse` multiplies the
factors once and returns a plain ``nn.Embedding``: inference costs and stores exactly what a plain table does.

The core losses take the table as ``weight`` (V, d), so a tied output layer feeds them ``module.weight`` (the
product, differentiable with respect to both factors) exactly as it would feed a plain table's weight.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_dim(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


class FactorizedEmbedding(nn.Module):
    """An embedding table trained as ``A @ B``: ``A`` (num_embeddings, inner_dim), ``B`` (inner_dim, embedding_dim).

    ``forward(ids)`` returns ``A[ids] @ B`` with shape ``ids.shape + (embedding_dim,)`` (only the looked-up rows are
    multiplied); ``weight`` is the full (num_embeddings, embedding_dim) product, recomputed at each access so that
    gradients reach both factors (use it for a tied output layer, once per step). Torch equivalent::

        nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx, _weight=A @ B)(ids)

    ``inner_dim`` must be >= ``embedding_dim`` (MLET's regime: a wider inner layer; the paper finds quality grows
    with it, e.g. k = 4d to 16d). ``padding_idx``: as in ``nn.Embedding``: row ``padding_idx`` of ``A`` is zero at
    initialisation and receives no gradient, so the product's row is zero and stays zero.

    Initialisation (:meth:`reset_parameters`): ``A ~ N(0, std**2)`` and ``B ~ N(0, 1 / inner_dim)``. Each product
    entry ``sum_j A_ij B_jc`` is then a sum of ``inner_dim`` independent terms of variance ``std**2 / inner_dim``,
    so it has mean 0 and variance ``std**2``: the product starts at the scale of a plain table initialised with
    ``N(0, std**2)`` (``std=1`` is ``nn.Embedding``'s default), whatever ``inner_dim`` is, and ``B.T @ B`` is close
    to the identity (``E[B.T @ B] = I``), so ``B`` neither shrinks nor inflates the rows of ``A`` at the start.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, inner_dim: int, padding_idx: int | None = None,
                 *, std: float = 1.0) -> None:
        super().__init__()
        _check_dim("num_embeddings", num_embeddings)
        _check_dim("embedding_dim", embedding_dim)
        _check_dim("inner_dim", inner_dim)
        if inner_dim < embedding_dim:
            raise ValueError(
                f"inner_dim must be >= embedding_dim ({embedding_dim}) for MLET (a wider inner layer), got {inner_dim}"
            )
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int):
                raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}")
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must be in [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim, self.inner_dim = num_embeddings, embedding_dim, inner_dim
        self.padding_idx = padding_idx
        self.A = nn.Parameter(torch.empty(num_embeddings, inner_dim))
        self.B = nn.Parameter(torch.empty(inner_dim, embedding_dim))
        self.reset_parameters(std)

    def reset_parameters(self, std: float = 1.0) -> None:
        """``A ~ N(0, std**2)`` (padding row zero), ``B ~ N(0, 1 / inner_dim)``: product entries have variance
        ``std**2``, like a plain table initialised with ``N(0, std**2)``."""
        if not isinstance(std, (int, float)) or isinstance(std, bool):
            raise TypeError(f"std must be a finite float > 0, got {type(std).__name__} {std!r}")
        if not (std > 0 and math.isfinite(std)):
            raise ValueError(f"std must be a finite float > 0, got {std!r}")
        with torch.no_grad():
            self.A.normal_(0.0, float(std))
            self.B.normal_(0.0, self.inner_dim**-0.5)
            if self.padding_idx is not None:
                self.A[self.padding_idx].zero_()

    @property
    def weight(self) -> torch.Tensor:
        """The (num_embeddings, embedding_dim) table ``A @ B`` (differentiable; recomputed at each access)."""
        return self.A @ self.B

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # F.embedding with padding_idx keeps the padding row of A out of the gradient, as nn.Embedding does.
        return F.embedding(ids, self.A, padding_idx=self.padding_idx) @ self.B

    @torch.no_grad()
    def collapse(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding ``A @ B`` (same dtype and device): identical outputs, d instead of k
        columns per row, and no trace of the factorisation (the inference-time model of MLET)."""
        table = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                             device=self.A.device, dtype=self.A.dtype)
        table.weight.copy_(self.A @ self.B)
        return table

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, inner_dim={self.inner_dim}{pad}"
