"""GPT-2 in plain PyTorch: the whole model on one screen.

Layout and parameter names follow the textbook model of *Build a Large Language Model
(From Scratch)* (Raschka, 2024): separate Q, K, V and output projections with bias,
pre-LayerNorm blocks, GELU(tanh) MLP, and an output head kept as its own module but tied
to the token embedding, as in GPT-2 (a classifier swaps it for its own head).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .presets import PRESETS


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, "
                                 f"got {getattr(self, name)!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by "
                             f"n_heads ({self.n_heads})")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate}")

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def with_dropout(self, drop_rate: float) -> GPTConfig:
        return replace(self, drop_rate=drop_rate)


def side_by_side(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`torch.cat(tensors)`, or, for frozen tensors that already lie one after another in
    one storage (`GPTModel.store_qkv_together`), a view of that memory: no copy."""
    first = tensors[0]
    if stored_together(tensors):
        return first.as_strided((sum(len(t) for t in tensors), *first.shape[1:]),
                                first.stride())
    return torch.cat(tensors)


def stored_together(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether frozen `tensors` lie one after another, in this order, in one storage."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (t.requires_grad or not t.is_contiguous() or t.shape[1:] != first.shape[1:]
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != offset):
            return False
        offset += t.numel()
    return True


def project(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]` for Linears that read the same input, as one GEMM.

    One (3d x d) product runs faster than three (d x d) ones, and under autocast the input
    is cast once rather than once per layer (benchmarks/README.md). A layer may wrap its
    Linear as `.linear` and add an update of its own: its class's
    `add_updates(x, layers, y)` adds those of all the layers to their joint output `y`,
    as `lora.LinearWithLoRA` does. The Linears may also be of a class that computes
    several side by side itself, `together(linears)` (`packed.PackedLinear`). Other
    layers are simply called."""
    bases = [getattr(layer, "linear", layer) for layer in layers]
    wrappers = {type(layer) for layer in layers if layer is not getattr(layer, "linear", layer)}
    together = getattr(type(bases[0]), "together", None)
    same_kind = all(type(base) is type(bases[0]) for base in bases) and (
        together is not None or type(bases[0]) is nn.Linear
        and all(base.weight.dtype == bases[0].weight.dtype for base in bases))
    if (len(layers) < 2 or not same_kind
            or any(getattr(base, "bias", None) is None for base in bases)
            or len(wrappers) > 1 or not all(hasattr(w, "add_updates") for w in wrappers)):
        return [layer(x) for layer in layers]
    rows = x.reshape(-1, x.shape[-1])
    if torch.is_autocast_enabled(x.device.type):
        rows = rows.to(torch.get_autocast_dtype(x.device.type))
    if together is not None:
        y = together(bases)(rows)
    else:
        y = F.linear(rows, side_by_side([base.weight for base in bases]),
                     side_by_side([base.bias for base in bases]))
    if wrappers:
        y = wrappers.pop().add_updates(rows, layers, y)
    return [part.view(*x.shape[:-1], -1)
            for part in y.split([base.out_features for base in bases], dim=-1)]


# Packed messages attend in tiles: consecutive messages of a row, up to this many tokens
# together (a longer message alone; 0: every message alone), padded to the batch's
# fullest tile. Over the whole packed row (~250 tokens for 8 SMS) ~7/8 of the scores
# would pair two messages, masked. Measured (GPT-2 124M, a bf16 training step on the
# AMD AVX-512-bf16 machine, benchmarks/README.md): 388 ms with 64, 425-431 with 32 or
# 128, 405 with a message a tile, 448 with a row a tile.
ATTENTION_TILE = 64


def gather_heads(y: torch.Tensor, index: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The tokens of (rows, width, d) projections `y` at the flat indices `index` (n, m),
    split into heads: (n, heads, m, head dim). index_select, not indexing: its backward
    is index_add_, where indexing's (index_put_ with accumulate) cost ~20 ms a step on
    GPT-2 124M (benchmarks/README.md)."""
    d = y.shape[-1]
    picked = y.reshape(-1, d).index_select(0, index.view(-1))
    return picked.view(*index.shape, n_heads, d // n_heads).transpose(1, 2)


@dataclass(frozen=True)
class Packing:
    """How several messages lie end to end in the rows of a token batch (`idx`).

    Each message attends only to itself, causally, its positions restart at 0, and the
    classifier reads its own tokens only: per message, the same result as running it
    alone, but the batch computes its real tokens only, with no padding between
    messages. Tokens after the last message of a row (rounding the width up) belong to
    no message: nothing reads them, and attention gives them zeros.

    Attention runs on tiles (`ATTENTION_TILE`): the projections of each tile's tokens
    gathered into a row of their own (`gather`), attended there (causally, or
    block-diagonally where a tile holds several messages: `tile_mask`) and put back."""
    positions: torch.Tensor  # (rows, width) position of each token in its message
    last: tuple[torch.Tensor, torch.Tensor]  # (row, column) of each message's last token
    longest: int  # tokens in the longest message
    first: tuple[torch.Tensor, torch.Tensor]  # (row, column) of each message's first token
    segment: torch.Tensor  # (rows, width) the message each token belongs to, -1: none
    gather: torch.Tensor  # (tiles, tile width) flat index (row * width + column) of each
    slots: torch.Tensor  # the flat positions in `gather` of messages' tokens (not padding)
    tokens: torch.Tensor  # ... and the flat index of the token at each (gather[slots])
    tile_mask: torch.Tensor | None  # (tiles, w, w) bool; None: one message a tile (causal)
    tile_message: torch.Tensor  # (tiles, tile width) the message in each slot, -1: none
    tile_of: torch.Tensor  # (messages,) the tile each message lies in

    @classmethod
    def build(cls, rows: Sequence[int], starts: Sequence[int], lengths: Sequence[int],
              n_rows: int, width: int, tile: int | None = None) -> Packing:
        """Message i lies in row `rows[i]` from column `starts[i]`, `lengths[i]` long;
        `tile`: `ATTENTION_TILE` unless given."""
        segment = torch.full((n_rows, width), -1, dtype=torch.long)
        positions = torch.zeros(n_rows, width, dtype=torch.long)
        for i, (row, start, n) in enumerate(zip(rows, starts, lengths, strict=True)):
            segment[row, start: start + n] = i
            positions[row, start: start + n] = torch.arange(n)
        cap = ATTENTION_TILE if tile is None else tile  # a longer message: a tile alone
        tiles: list[list[int]] = []  # the messages of each tile
        fill = 0
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
            if not tiles or fill + n > cap or rows[tiles[-1][-1]] != row:
                tiles.append([])
                fill = 0
            tiles[-1].append(i)
            fill += n
        tile_width = max(sum(lengths[i] for i in members) for members in tiles)
        gather = torch.zeros(len(tiles), tile_width, dtype=torch.long)
        message = torch.full((len(tiles), tile_width), -1, dtype=torch.long)
        tile_of = torch.zeros(len(lengths), dtype=torch.long)
        for t, members in enumerate(tiles):
            column = 0
            for i in members:
                tile_of[i] = t
                n, flat = lengths[i], rows[i] * width + starts[i]
                gather[t, column: column + n] = torch.arange(flat, flat + n)
                message[t, column: column + n] = i
                column += n
        causal = torch.ones(tile_width, tile_width, dtype=torch.bool).tril()
        tile_mask = (None if len(tiles) == len(lengths) else
                     (message[:, :, None] == message[:, None, :]) & causal)
        rows_t, starts_t = torch.tensor(list(rows)), torch.tensor(list(starts))
        slots = (message.view(-1) >= 0).nonzero().view(-1)
        return cls(positions, (rows_t, starts_t + torch.tensor(list(lengths)) - 1),
                   max(lengths), (rows_t, starts_t), segment, gather, slots,
                   gather.view(-1)[slots], tile_mask, message, tile_of)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int,
               dropout: float) -> torch.Tensor:
        """Attention of (rows, width, d) projections, each message within itself."""
        rows, width, d = q.shape
        tiles, tile_width = self.gather.shape
        y = F.scaled_dot_product_attention(
            *(gather_heads(y, self.gather, n_heads) for y in (q, k, v)), dropout_p=dropout,
            attn_mask=None if self.tile_mask is None else self.tile_mask[:, None],
            is_causal=self.tile_mask is None)
        y = y.transpose(1, 2).reshape(tiles * tile_width, d).index_select(0, self.slots)
        return y.new_zeros(rows * width, d).index_copy(0, self.tokens, y).view(rows, width, d)

    def keys_of(self, row: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor,
                                                                     torch.Tensor]:
        """For the tokens at (row, col), n of them: the flat index of every token of
        each one's tile, (n, tile width), and which of those it attends to (its own
        message's, up to itself). Its tile, not its row: a row holds ~8 messages, and
        each query read its whole row's keys before (~12 ms a step of GPT-2 124M, much
        of it the backward of that copy, benchmarks/README.md)."""
        width = self.segment.shape[1]
        message = self.segment[row, col]
        tiles = self.tile_of[message]
        keys = self.gather[tiles]
        return keys, (self.tile_message[tiles] == message[:, None]) & (
            keys <= (row * width + col)[:, None])

    def to(self, device: torch.device | str) -> Packing:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Packing(move(self.positions), tuple(map(move, self.last)), self.longest,
                       tuple(map(move, self.first)), move(self.segment), move(self.gather),
                       move(self.slots), move(self.tokens), move(self.tile_mask),
                       move(self.tile_message), move(self.tile_of))


@dataclass(frozen=True)
class Entering:
    """Hidden states (rows, width, emb_dim) entering block `block`, for a batch's tokens
    and laid out as its token ids are: what the embeddings and the blocks before it
    would compute there, computed earlier (`frozen.PrefixCache`)."""
    block: int
    hidden: torch.Tensor

    def to(self, device: torch.device | str) -> Entering:
        return Entering(self.block, self.hidden.to(device, non_blocking=True))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.emb_dim
        self.n_heads = cfg.n_heads
        self.drop_rate = cfg.drop_rate
        self.W_query = nn.Linear(d, d)
        self.W_key = nn.Linear(d, d)
        self.W_value = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.resid_dropout = nn.Dropout(cfg.drop_rate)

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        """(b, t, d) -> (b, heads, t, head_dim)"""
        b, _, d = y.shape
        return y.view(b, -1, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, packing: Packing | None = None,
                last: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Self-attention over (rows, t, d): causal, or within each message `packing` lays
        out. With `last` (row and column indices of n positions) only those positions
        query: (n, d) out, each seeing what causality (or its message) allows."""
        rows, t, d = x.shape
        dropout = self.drop_rate if self.training else 0.0
        q, k, v = project(x, (self.W_query, self.W_key, self.W_value))
        if last is None:
            if packing is not None:
                y = packing.attend(q, k, v, self.n_heads, dropout)
                return self.resid_dropout(self.out_proj(y))
            y = F.scaled_dot_product_attention(self._heads(q), self._heads(k),
                                               self._heads(v), is_causal=True,
                                               dropout_p=dropout)
            return self.resid_dropout(self.out_proj(y.transpose(1, 2).reshape(rows, t, d)))
        row, col = last
        q = self._heads(q[row, col][:, None])  # (n, heads, 1, head_dim)
        if packing is None:  # a message a row
            k, v = self._heads(k)[row], self._heads(v)[row]
            seen = torch.arange(t, device=x.device) <= col[:, None]  # (n, t)
        else:
            keys, seen = packing.keys_of(row, col)  # (n, tile width)
            k, v = (gather_heads(y, keys, self.n_heads) for y in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=seen[:, None, None, :],
                                           dropout_p=dropout)
        return self.resid_dropout(self.out_proj(y.reshape(len(row), d)))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
            nn.Dropout(cfg.drop_rate),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.att = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.ff = FeedForward(cfg)

    def forward(self, x: torch.Tensor, packing: Packing | None = None,
                last: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """With `last` (row and column indices), only those positions go on: (n, d) out."""
        attended = self.att(self.norm1(x), packing, last)
        if last is not None:
            x = x[last]
        x = x + attended
        return x + self.ff(self.norm2(x))


def mean_over_messages(hidden: torch.Tensor, segment: torch.Tensor,
                       lengths: torch.Tensor) -> torch.Tensor:
    """Each message's mean hidden state, (messages, emb_dim), from `hidden` (rows, width,
    emb_dim) and `segment` (which message each token belongs to, -1 for none). One
    product with a (messages, tokens) averaging matrix: deterministic on every device,
    unlike a scatter, and exact zeros for the tokens of padding and other messages. In
    fp32 whatever the autocast: a bf16 sum of up to a context of tokens would lose the
    mean's low bits."""
    messages = torch.arange(len(lengths), device=segment.device)
    weights = ((segment.reshape(1, -1) == messages[:, None]).float()
               / lengths.to(segment.device)[:, None].float())
    with torch.autocast(hidden.device.type, enabled=False):
        return weights @ hidden.reshape(-1, hidden.shape[-1]).float()


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        # Which hidden state of each message `forward` reads with `lengths` or `packing`
        # (presets.TOKENS): a classifier's choice, set when it is built.
        self.token = "last"
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*(TransformerBlock(cfg) for _ in range(cfg.n_layers)))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.out_head.weight = self.tok_emb.weight  # tied, as in GPT-2

    @torch.no_grad()
    def store_qkv_together(self) -> GPTModel:
        """Lay each block's Q, K and V weights (and biases) out one after another in one
        tensor, values unchanged, so `project` reads them as one matrix instead of
        concatenating them at every call. For frozen weights, after any dtype or device
        change (which gives each parameter new storage again); trained ones are left
        apart (`side_by_side` concatenates them anyway, and tensors sharing storage
        cannot be saved as they are)."""
        for block in self.trf_blocks:
            linears = [getattr(m, "linear", m) for m in
                       (block.att.W_query, block.att.W_key, block.att.W_value)]
            for name in ("weight", "bias"):
                params = [getattr(linear, name) for linear in linears]
                if any(p.requires_grad for p in params):
                    continue
                joint = torch.cat(params)
                for p, part in zip(params, joint.split([len(p) for p in params]),
                                   strict=True):
                    p.data = part
        return self

    def embed(self, idx: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """The hidden states entering the first block, (rows, seq, emb_dim)."""
        t = idx.shape[1]
        longest = t if packing is None else packing.longest
        if longest > self.cfg.context_length:
            raise ValueError(f"sequence of {longest} tokens exceeds the model's context "
                             f"length of {self.cfg.context_length}")
        pos = torch.arange(t, device=idx.device) if packing is None else packing.positions
        return self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))

    def entering(self, idx: torch.Tensor, block: int,
                 packing: Packing | None = None) -> torch.Tensor:
        """The hidden states entering block `block` (`n_layers`: leaving the last one),
        (rows, seq, emb_dim), at every position: what an `Entering` hands back."""
        x = self.embed(idx, packing)
        for b in list(self.trf_blocks)[:block]:
            x = b(x, packing)
        return x

    def hidden_states(self, idx: torch.Tensor, packing: Packing | None = None,
                      last: tuple[torch.Tensor, torch.Tensor] | None = None,
                      entering: Entering | None = None) -> torch.Tensor:
        """Final-LayerNorm hidden states, (rows, seq, emb_dim), of one sequence a row or of
        the messages `packing` lays out. With `last` (row and column indices of n
        positions) only at those positions, (n, emb_dim): then the last block's attention
        is queried, and its output projection and MLP run, at those positions alone;
        nothing else of it is ever read (~5% of a classifier's work saved). With
        `entering`, the embeddings and the blocks before `entering.block` do not run:
        its hidden states, laid out as `idx`, stand for theirs."""
        if entering is None:
            x, start = self.embed(idx, packing), 0
        else:
            x, start = entering.hidden, entering.block
        blocks = list(self.trf_blocks)[start:]
        for block in blocks if last is None else blocks[:-1]:
            x = block(x, packing)
        if last is not None:
            x = blocks[-1](x, packing, last) if blocks else x[last]
        return self.final_norm(x)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None,
                packing: Packing | None = None,
                entering: Entering | None = None) -> torch.Tensor:
        """Logits for token ids `idx` of shape (rows, seq).

        Alone: logits at every position, (rows, seq, out_features).
        With `lengths` (real tokens per right-padded row) or `packing` (several messages
        a row; `lengths` then per message): logits of each message, (messages,
        out_features), read from the hidden state `self.token` names: its last real
        token, its first, or the mean over its own tokens. Attention is causal (within a
        message when packed), so no message's tokens see padding or another message, and
        the result is each message's as if alone. `entering`: the hidden states of `idx`
        entering one of the blocks, computed before (`hidden_states`).
        """
        if packing is None and lengths is None:
            return self.out_head(self.hidden_states(idx, entering=entering))
        if packing is None:
            if lengths.min() < 1 or lengths.max() > idx.shape[1]:
                raise ValueError("lengths must lie in [1, seq_len]")
            lengths = lengths.to(idx.device)
            rows = torch.arange(idx.shape[0], device=idx.device)
        if self.token == "mean":
            if packing is None:
                columns = torch.arange(idx.shape[1], device=idx.device)
                segment = torch.where(columns < lengths[:, None], rows[:, None], -1)
            else:
                segment = packing.segment
                if lengths is None:
                    lengths = torch.bincount(segment[segment >= 0],
                                             minlength=len(packing.last[0]))
            return self.out_head(mean_over_messages(
                self.hidden_states(idx, packing, entering=entering), segment, lengths))
        if self.token == "first":
            at = packing.first if packing is not None else (rows, torch.zeros_like(rows))
        else:
            at = packing.last if packing is not None else (rows, lengths - 1)
        return self.out_head(self.hidden_states(idx, packing, at, entering))
