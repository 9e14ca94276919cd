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
# Weight initialisations of the three reference codes (see SASRecConfig.init).
INITS = ("xavier", "normal", "torch")
# antklen/sasrec-bert4rec-recsys23's (HF GPT-2 style) standard deviation for init="normal".
NORMAL_INIT_STD = 0.02
POSITIONS = ("from_end", "from_start")


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
    init: "xavier" (pmixer / SCE code: Xavier-uniform for every weight matrix, both embedding tables included);
        "normal" (antklen/sasrec-bert4rec-recsys23, "SASRec+": N(0, 0.02) for embeddings and linear layers, zero
        biases; the attention's packed input projection keeps PyTorch's Xavier-uniform, as there); "torch"
        (gSASRec-pytorch: PyTorch's defaults, N(0, 1) embeddings). The padding row is zero in every case.
    positions: "from_end": the last column of a window always has position ``max_len - 1`` (pmixer, SCE and
        gSASRec, which left-pad every window to ``max_len``); "from_start": position 0 is the window's first real
        item (antklen, which right-pads each batch to its longest sequence).
    mask_padding_keys: True: attention never reads a padding position (antklen gets this from right padding under a
        causal mask, gSASRec from its key mask); False: real positions also attend to the left padding, whose keys
        and values are the projections' biases (pmixer and SCE code).
    scale_embeddings: multiply the input item embeddings by sqrt(d) (all but gSASRec).
    tie_output: True: items are scored against the input table; False: a separate output table (gSASRec's
        default, "a separate set of item embeddings improves model convergence").
    """

    num_items: int
    hidden_dim: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    max_len: int = 200
    dropout: float = 0.3
    residual_from_normed: bool = True
    mlet_inner_dim: int | None = None
    init: str = "xavier"
    positions: str = "from_end"
    mask_padding_keys: bool = False
    scale_embeddings: bool = True
    tie_output: bool = True

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
        for name in ("residual_from_normed", "mask_padding_keys", "scale_embeddings", "tie_output"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {self.positions!r}")
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

    Forward, as in the references: ``x = item_emb(seq) * sqrt(d) + pos_emb`` (no sqrt(d) with
    ``scale_embeddings=False``), dropout, padding positions zeroed (timeline mask); ``num_blocks`` blocks
    (:class:`SASRecConfig` ``residual_from_normed``) with causal attention, each followed by the timeline mask; a
    final LayerNorm. With ``mask_padding_keys=False`` padding keys are not masked out of the attention (the pmixer /
    SCE code does not mask them: they carry the projections' biases). Positions follow :class:`SASRecConfig`
    ``positions``; with ``"from_end"`` a window shorter than ``max_len`` is embedded as the right end of a
    ``max_len`` one. Unlike the references, the final output is masked too (they leave ``LayerNorm(0)`` there),
    which no loss or ranking reads.

    Initialisation: :class:`SASRecConfig` ``init``. An MLET table is initialised so that its product has the
    variance of the plain table it replaces (see :class:`largevocab.FactorizedEmbedding`).
    """

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        d, rows = config.hidden_dim, config.num_items + 1
        if config.mlet_inner_dim is None:
            self.item_emb: nn.Module = nn.Embedding(rows, d, padding_idx=PAD_ID)
        else:
            self.item_emb = FactorizedEmbedding(rows, d, config.mlet_inner_dim, padding_idx=PAD_ID)
        self.out_emb = None if config.tie_output else nn.Embedding(rows, d, padding_idx=PAD_ID)
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_blocks))
        self.last_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.reset_parameters()

    def _table_std(self) -> float:
        """Standard deviation of the plain item table under ``config.init`` (what an MLET product must match)."""
        rows, d = self.config.num_items + 1, self.config.hidden_dim
        return {"xavier": math.sqrt(2.0 / (rows + d)), "normal": NORMAL_INIT_STD, "torch": 1.0}[self.config.init]

    def reset_parameters(self) -> None:
        init = self.config.init
        # The attention's output projection is initialised by its MultiheadAttention (zero bias), not as a Linear.
        out_projs = {id(m.out_proj) for m in self.modules() if isinstance(m, nn.MultiheadAttention)}
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            elif isinstance(module, nn.MultiheadAttention):
                module._reset_parameters()  # Xavier-uniform packed projection, zero biases (PyTorch's own init)
            elif isinstance(module, (nn.Linear, nn.Embedding)) and module is not self.item_emb:
                if id(module) not in out_projs:
                    module.reset_parameters()  # PyTorch's defaults ("torch"), then overridden below
                if init == "xavier":
                    nn.init.xavier_uniform_(module.weight)
                elif init == "normal":
                    nn.init.normal_(module.weight, 0.0, NORMAL_INIT_STD)
                    if isinstance(module, nn.Linear) and module.bias is not None:
                        nn.init.zeros_(module.bias)
        if isinstance(self.item_emb, FactorizedEmbedding):
            self.item_emb.reset_parameters(std=self._table_std())
        elif init == "xavier":
            nn.init.xavier_uniform_(self.item_emb.weight)
        else:
            nn.init.normal_(self.item_emb.weight, 0.0, self._table_std())
        with torch.no_grad():
            for table in (self.item_emb, self.out_emb):
                if isinstance(table, nn.Embedding):
                    table.weight[PAD_ID].zero_()

    def item_weight(self) -> torch.Tensor:
        """The (num_items + 1, d) table items are scored against: the input embeddings (tied, the default) or the
        separate output table (``tie_output=False``); row 0 (padding) is not an item."""
        return self.item_emb.weight if self.out_emb is None else self.out_emb.weight

    def attention_mask(self, seq: torch.Tensor) -> torch.Tensor:
        """True where attention is blocked: (L, L) causal, or (B * heads, L, L) with padding keys blocked too for
        real queries (``mask_padding_keys``; a padding query keeps its causal row, so no row is fully blocked)."""
        length = seq.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).triu_(1)
        if not self.config.mask_padding_keys:
            return causal
        pad = seq == PAD_ID
        blocked = causal | (pad[:, None, :] & ~pad[:, :, None])
        return blocked.repeat_interleave(self.config.num_heads, dim=0)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        if seq.dim() != 2:
            raise ValueError(f"seq must have shape (B, L), got {tuple(seq.shape)}")
        length = seq.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.config.max_len}")
        keep = (seq != PAD_ID).unsqueeze(-1)
        x = self.item_emb(seq)
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.hidden_dim)
        if self.config.positions == "from_end":
            positions = torch.arange(self.config.max_len - length, self.config.max_len, device=seq.device)
        else:  # 0 at the first real item of each row; padding rows get 0 too and are zeroed below
            positions = (keep.squeeze(-1).cumsum(1) - 1).clamp_(min=0)
        x = self.emb_dropout(x + self.pos_emb(positions))
        x = x * keep
        mask = self.attention_mask(seq)
        for block in self.blocks:
            x = block(x, mask, keep)
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
