"""SASRec (Kang & McAuley, ICDM 2018) as in the SCE authors' reference code (AIRI-Institute/Scalable-SASRec, itself
pmixer/SASRec.pytorch): a causal transformer over a user's item sequence whose output at position t scores the item
at t + 1 against the item embedding table, which is tied to the input embeddings.

The model only produces hidden states; the loss is injected by the caller (:mod:`.losses`), which receives the hidden
states, the item table :meth:`SASRec.item_weight` and the targets, and never needs the (positions x items) logits.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from largevocab.mlet import FactorizedEmbedding

PAD_ID = 0  # item id 0 is padding; real items are 1..num_items
# The reference's LayerNorm epsilon (pmixer and SCE code); small, because the inputs are scaled by sqrt(d).
LAYER_NORM_EPS = 1e-8


@dataclass
class SASRecConfig:
    """Architecture of :class:`SASRec`. Defaults are the SCE paper's (Mezentsev et al., RecSys 2024) for SASRec.

    num_items: catalogue size V; the item table has V + 1 rows (row 0 is padding).
    hidden_dim: d. num_blocks, num_heads: transformer blocks and attention heads. max_len: longest input window.
    dropout: on the scaled input embeddings, inside attention and in the feed-forward layer.
    residual_from_normed: True (the reference's behaviour): each sub-layer's residual adds its *LayerNorm-ed*
        input, ``x = LN(x) + MHA(q=LN(x), k=x, v=x)`` then ``x = LN'(x) + FFN(LN'(x))``, so the residual stream is
        re-normalised at every block. False: the textbook pre-LN block, ``x = x + MHA(LN(x), LN(x), LN(x))`` then
        ``x = x + FFN(LN'(x))`` (pmixer's later ``--norm_first``).
    mlet_inner_dim: None for a plain (V + 1, d) table; k >= d to train the table as a (V + 1, k) @ (k, d) product
        (MLET, :class:`largevocab.FactorizedEmbedding`); :meth:`SASRec.collapse_mlet` turns it into a plain table.
    """

    num_items: int
    hidden_dim: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    max_len: int = 200
    dropout: float = 0.3
    residual_from_normed: bool = True
    mlet_inner_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_items", "hidden_dim", "num_blocks", "num_heads", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.residual_from_normed, bool):
            raise TypeError(f"residual_from_normed must be a bool, got {type(self.residual_from_normed).__name__}")
        if self.mlet_inner_dim is not None and (
            isinstance(self.mlet_inner_dim, bool) or not isinstance(self.mlet_inner_dim, int)
            or self.mlet_inner_dim < self.hidden_dim
        ):
            raise ValueError(f"mlet_inner_dim must be None or an int >= hidden_dim ({self.hidden_dim}), "
                             f"got {self.mlet_inner_dim!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class PointWiseFeedForward(nn.Module):
    """Two position-wise linear layers (the reference's 1x1 convolutions) with ReLU and dropout; no residual here."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.fc2(self.dropout1(F.relu(self.fc1(x)))))


class SASRecBlock(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        d = config.hidden_dim
        self.attn_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.attn = nn.MultiheadAttention(d, config.num_heads, dropout=config.dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.ffn = PointWiseFeedForward(d, config.dropout)
        self.residual_from_normed = config.residual_from_normed

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q = self.attn_norm(x)
        if self.residual_from_normed:
            # Reference: the query is normalised, keys and values are the raw stream, the residual adds the query.
            x = q + self.attn(q, x, x, attn_mask=causal_mask, need_weights=False)[0]
            y = self.ffn_norm(x)
            x = y + self.ffn(y)
        else:
            x = x + self.attn(q, q, q, attn_mask=causal_mask, need_weights=False)[0]
            x = x + self.ffn(self.ffn_norm(x))
        return x * keep


class SASRec(nn.Module):
    """SASRec over item ids in ``[0, num_items]`` (0 = padding), right-aligned (padding on the left).

    ``model(seq)``: ``seq`` (B, L) integer with L <= max_len; returns the hidden states (B, L, d), zero at padding
    positions; position t depends only on ``seq[:, :t + 1]``. Its score for item i is ``hidden @ item_weight()[i]``.

    Forward, as in the reference: ``x = item_emb(seq) * sqrt(d) + pos_emb``, dropout, padding positions zeroed
    (timeline mask); ``num_blocks`` blocks (:class:`SASRecConfig` ``residual_from_normed``) with causal attention,
    each followed by the timeline mask; a final LayerNorm. Padding keys are not masked out of the attention (the
    reference does not mask them either: they carry the projections' biases). Positions are counted from the right:
    the last column always has position ``max_len - 1``, so a window shorter than ``max_len`` is embedded as the
    right end of a ``max_len`` one. Unlike the reference, the final output is masked too (the reference leaves
    ``LayerNorm(0)`` there), which no loss or ranking reads.

    Initialisation follows the reference: Xavier-uniform for every weight matrix (both embedding tables included),
    PyTorch defaults for biases and LayerNorms; the padding row is zeroed. An MLET table is initialised so that its
    product has the variance of that Xavier-uniform table (see :class:`largevocab.FactorizedEmbedding`).
    """

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        d, rows = config.hidden_dim, config.num_items + 1
        if config.mlet_inner_dim is None:
            self.item_emb: nn.Module = nn.Embedding(rows, d, padding_idx=PAD_ID)
        else:
            self.item_emb = FactorizedEmbedding(rows, d, config.mlet_inner_dim, padding_idx=PAD_ID)
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_blocks))
        self.last_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, param in self.named_parameters():
            if param.dim() >= 2 and not name.startswith("item_emb."):
                nn.init.xavier_uniform_(param)
        rows, d = self.config.num_items + 1, self.config.hidden_dim
        if isinstance(self.item_emb, FactorizedEmbedding):
            # Xavier-uniform on (rows, d) has variance 2 / (rows + d); give the product that variance.
            self.item_emb.reset_parameters(std=math.sqrt(2.0 / (rows + d)))
        else:
            nn.init.xavier_uniform_(self.item_emb.weight)
            with torch.no_grad():
                self.item_emb.weight[PAD_ID].zero_()

    def item_weight(self) -> torch.Tensor:
        """The (num_items + 1, d) item table, tied to the input embeddings; row 0 (padding) is not an item."""
        return self.item_emb.weight

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        if seq.dim() != 2:
            raise ValueError(f"seq must have shape (B, L), got {tuple(seq.shape)}")
        length = seq.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.config.max_len}")
        keep = (seq != PAD_ID).unsqueeze(-1)
        x = self.item_emb(seq) * math.sqrt(self.config.hidden_dim)
        positions = torch.arange(self.config.max_len - length, self.config.max_len, device=seq.device)
        x = self.emb_dropout(x + self.pos_emb(positions))
        x = x * keep
        # True above the diagonal: position t may not attend to t' > t.
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).triu_(1)
        for block in self.blocks:
            x = block(x, causal, keep)
        return self.last_norm(x) * keep

    def user_embeddings(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, d): the hidden state at the last position, which scores the next item."""
        return self(seq)[:, -1]

    @torch.no_grad()
    def collapse_mlet(self) -> SASRec:
        """Replace an MLET table by the plain table of its product (same scores); no-op for a plain table."""
        if isinstance(self.item_emb, FactorizedEmbedding):
            self.item_emb = self.item_emb.collapse()
            self.config.mlet_inner_dim = None
        return self
