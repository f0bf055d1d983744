"""The frozen part of a classifier computed once (issue 24, item 7).

Where nothing in the embeddings and the first k blocks trains and no dropout draws there
(`last_block`: k = n_layers - 1, `last_two_blocks`: n_layers - 2, `last_layer`: every
block), the hidden states entering block k are a fixed function of each message: a
message's attend to its own tokens only, packed or padded (`model.Packing`). They are
computed once per message and split, kept, and each batch's are gathered from them in
the batch's own layout, so that a step runs blocks k and after only
(`model.Entering`). Elsewhere (`lora`: LoRA in every block; `all`) k is 0 and nothing
is kept.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import batching
from .batching import Batch
from .model import Entering, GPTModel
from .precision import attention_kernels, autocast

# Both splits' caches together at most this many bytes; above it a training computes
# every step in full. GPT-2 124M's states of the 1,045-message training split take
# ~100 MB; 2 GiB holds ~700k tokens at its width (~23k SMS), yet an own-data split of
# millions of tokens cannot fill the memory, or a GPU's.
MAX_CACHE_BYTES = 2 * 1024 ** 3

log = logging.getLogger(__name__)


def _fixed(module: nn.Module) -> bool:
    """Whether `module` computes a fixed function of its input while training: no
    parameter of it trains and no dropout of it draws (nn.Dropout, attention's own)."""
    return not any(p.requires_grad for p in module.parameters()) and not any(
        (isinstance(m, nn.Dropout) and m.p > 0) or getattr(m, "drop_rate", 0.0) > 0
        for m in module.modules())


def frozen_blocks(model: GPTModel) -> int:
    """How many of the first blocks, with the embeddings, are a fixed function of each
    message (n_layers: all of them); 0 where the embeddings themselves are not."""
    if not all(_fixed(m) for m in (model.tok_emb, model.pos_emb, model.drop_emb)):
        return 0
    k = 0
    for block in model.trf_blocks:
        if not _fixed(block):
            break
        k += 1
    return k


def cache_bytes(model: GPTModel, token_ids: Sequence[Sequence[int]]) -> int:
    """The memory a cache of `token_ids` takes: one fp32 row of the model's width a token
    (the residual stream is fp32 under bf16 autocast too), and the zero row."""
    return (sum(map(len, token_ids)) + 1) * model.cfg.emb_dim * 4


@dataclass(frozen=True)
class PrefixCache:
    """Every message's hidden states entering block `block`, end to end, message i's
    from row `offsets[i]`, then a row of zeros that padding reads (no message's real
    token sees padding: its values change no result)."""
    block: int
    hidden: torch.Tensor  # (tokens + 1, emb_dim), on the training device
    offsets: torch.Tensor  # (messages,) on the CPU, where batches are laid out

    @classmethod
    @torch.no_grad()
    def build(cls, model: GPTModel, token_ids: Sequence[Sequence[int]], block: int,
              pad_id: int, batch_size: int, device: torch.device, dtype: torch.dtype,
              training: bool) -> PrefixCache:
        """Computed as the uncached forward computes them where the cache stands in:
        under the same autocast and, per `training`, the attention kernels of training
        steps or of validation; in batches of similar length (padding costs little),
        in a fixed order, so that a resumed training rebuilds the same values."""
        lengths = [len(t) for t in token_ids]
        offsets = torch.tensor([0, *lengths]).cumsum(0)
        hidden: torch.Tensor | None = None
        with autocast(device, dtype), attention_kernels(device, training):
            for index in batching.inference_order(lengths, batch_size):
                batch = batching.collate(token_ids, index, pad_id)
                x = model.entering(batch.ids.to(device), block)
                if hidden is None:
                    hidden = torch.zeros(int(offsets[-1]) + 1, x.shape[-1], dtype=x.dtype,
                                         device=device)
                real = torch.arange(x.shape[1]) < batch.lengths[:, None]
                rows = torch.cat([torch.arange(offsets[i], offsets[i] + lengths[i])
                                  for i in index])
                hidden[rows.to(device)] = x[real.to(device)]
        if hidden is None:  # no message: only the zero row
            hidden = torch.zeros(1, model.cfg.emb_dim, device=device)
        return cls(block, hidden, offsets[:-1])

    @property
    def nbytes(self) -> int:
        return self.hidden.numel() * self.hidden.element_size()

    def feed(self, batch: Batch) -> Batch:
        """`batch` (on the CPU) with its hidden states entering `block`, from the cache,
        in its layout: packed (each token's message and position in it) or padded."""
        starts = self.offsets[batch.index]
        zero = len(self.hidden) - 1
        if batch.packing is None:
            columns = torch.arange(batch.ids.shape[1])
            at = torch.where(columns < batch.lengths[:, None], starts[:, None] + columns,
                             zero)
        else:
            segment = batch.packing.segment
            at = torch.where(segment >= 0, starts[segment.clamp(min=0)]
                             + batch.packing.positions, zero)
        hidden = self.hidden[at.to(self.hidden.device)]
        return dataclasses.replace(batch, entering=Entering(self.block, hidden))


def prefix_caches(model: GPTModel, train_ids: Sequence[Sequence[int]],
                  val_ids: Sequence[Sequence[int]], pad_id: int, batch_size: int,
                  device: torch.device, dtype: torch.dtype,
                  ) -> tuple[PrefixCache, PrefixCache] | None:
    """The training and validation splits' caches, or None where no block is frozen
    or they would take more than MAX_CACHE_BYTES."""
    block = frozen_blocks(model)
    if block == 0:
        return None
    size = cache_bytes(model, train_ids) + cache_bytes(model, val_ids)
    if size > MAX_CACHE_BYTES:
        log.warning("the frozen blocks' output would take %.1f GiB, more than the %.1f "
                    "GiB kept at most: every step computes it again", size / 2 ** 30,
                    MAX_CACHE_BYTES / 2 ** 30)
        return None
    return (PrefixCache.build(model, train_ids, block, pad_id, batch_size, device, dtype,
                              training=True),
            PrefixCache.build(model, val_ids, block, pad_id, batch_size, device, dtype,
                              training=False))
