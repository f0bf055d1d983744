"""The one batching path for training, evaluation and prediction.

A batch is token ids in rows plus where each message lies in them. Two layouts, both
exact per message (the classifier reads its own tokens only: its last, its first or
their mean, `train.token`):
- padded: one message a row, right-padded with the tokenizer's `<|endoftext|>` id to the
  batch's longest; causal attention keeps the padding out of every real token's view.
- packed (training's default, and scoring's): the messages laid end to end in one row
  (more only when they would pass the model's context, or in scoring `SCORING_ROW_WIDTH`),
  attention within each message (in tiles of whole messages, `model.ATTENTION_TILE`),
  positions restarting at 0 (`model.Packing`). No padding between messages, so a batch
  drawn at random, whatever its mix of lengths, computes its real tokens and only the
  few pad tokens that round its row up (`packed_row_multiple`); in scoring's rows of
  several, also what the fullest row leaves unfilled in the others (~13% of the
  validation split's tokens).
GPT-2 tokens per SMS average ~30 (max ~120): padding every batch to the longest message
would compute ~4x the real tokens, padding random batches to their own longest ~1.8x.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import precision
from .model import Entering, Packing

# Training batches are drawn from windows of this many batches sorted by length: similar
# lengths share a batch, yet the order of batches and their members stays random.
GROUP_WINDOW_BATCHES = 32
# Training batch widths are rounded up to a multiple of this (a packed row's where the
# CPU computes bf16: `packed_row_multiple`): a few pad tokens buy far fewer distinct
# GEMM shapes, each of which oneDNN caches a primitive for (measured: ~6% faster and
# ~550 MB less peak RSS an epoch). Scoring rounds nothing: rounding its padded batches
# cost ~8% of throughput and saved nothing.
PAD_MULTIPLE = 8
# Where oneDNN computes bf16 on the CPU, it JIT-compiles its kernels for each new row
# count (~26 primitives, ~65 ms, kept in its cache), and packed rows of 8 SMS met ~28
# widths in an epoch at a multiple of 8 against ~8 at 32, for ~13 more pad tokens a row
# (on an AMX Xeon, two epochs: 6% faster, peak RSS 2.2 -> 1.6 GB; benchmarks/README.md).
# In fp32 a new shape costs less and the pad tokens more (32 was ~6% slower there).
BF16_CPU_ROW_MULTIPLE = 32
# Scoring packs each length-sorted batch's messages, longest first, in rows of up to this
# many tokens: the validation split's 149 SMS then compute 5,509 tokens for their 4,879,
# where batches of 64 padded to their longest computed 7,313. On the AMD EPYC (GPT-2
# 124M, bf16) a validation pass of training took 3.9 s against 4.9 padded, evaluate's
# scoring 29.1 against 31.5; rows of 128 were slower, of 512 no faster
# (benchmarks/README.md). Rows are not rounded up: scoring meets few widths.
SCORING_ROW_WIDTH = 256


def packed_row_multiple(device: torch.device, dtype: torch.dtype) -> int:
    """What a packed training row's width is rounded up to on `device` in `dtype`."""
    if device.type == "cpu" and dtype == torch.bfloat16 and precision.cpu_computes_bf16():
        return BF16_CPU_ROW_MULTIPLE
    return PAD_MULTIPLE


@dataclass
class Batch:
    ids: torch.Tensor  # (rows, width) token ids
    lengths: torch.Tensor  # (messages,) tokens per message
    index: torch.Tensor  # (messages,) positions of the messages in the input list
    packing: Packing | None = None  # None: one message a row, right-padded
    # The hidden states of `ids` entering a block, where the blocks before it are not
    # to run again (`frozen.PrefixCache.feed`)
    entering: Entering | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.ids.to(device, non_blocking=True),
                     self.lengths.to(device, non_blocking=True), self.index,
                     None if self.packing is None else self.packing.to(device),
                     None if self.entering is None else self.entering.to(device))

    def logits(self, model) -> torch.Tensor:
        """The model's logits for each message, (messages, classes), in `index` order."""
        return model(self.ids, self.lengths, self.packing, self.entering)


def resolve_max_length(setting: int | str | None, longest: int, context: int) -> int:
    """`train.max_length` in tokens: null, the longest training message; `model`, the
    model's context (the book's `model_context_length`); else the number given. Never
    past the context."""
    if setting == "model":
        return context
    return min(setting or longest, context)


def truncate(ids: list[list[int]], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Every sequence cut to `max_length`, and the positions of those cut."""
    cut = [i for i, seq in enumerate(ids) if len(seq) > max_length]
    return [seq[:max_length] for seq in ids], cut


def encode(tokenizer, texts: Sequence[str],
           max_length: int | None) -> tuple[list[list[int]], list[int]]:
    """Token ids of every text cut to `max_length` (None: not cut), and the positions of
    those cut."""
    ids = tokenizer.encode_batch(list(texts))
    empty = [i for i, seq in enumerate(ids) if not seq]
    if empty:
        raise ValueError(f"message(s) at position(s) {empty[:10]} encode to no tokens")
    return (ids, []) if max_length is None else truncate(ids, max_length)


def collate(token_ids: Sequence[Sequence[int]], index: Sequence[int], pad_id: int,
            pad_to: int | None = None, multiple: int = 1,
            max_width: int | None = None) -> Batch:
    """Rows `index` of `token_ids`, right-padded to `pad_to`, or to the longest row
    rounded up to `multiple` but never past `max_width` (the model's context)."""
    lengths = [len(token_ids[i]) for i in index]
    if pad_to is None:
        pad_to = -(-max(lengths) // multiple) * multiple
        if max_width is not None:
            pad_to = min(pad_to, max_width)
    # One tensor from nested lists: ~10x faster than filling rows one tensor at a time.
    ids = torch.tensor([[*token_ids[i], *[pad_id] * (pad_to - n)]
                        for i, n in zip(index, lengths, strict=True)], dtype=torch.long)
    return Batch(ids, torch.tensor(lengths, dtype=torch.long),
                 torch.tensor(list(index), dtype=torch.long))


def pack(token_ids: Sequence[Sequence[int]], index: Sequence[int], pad_id: int,
         max_width: int, multiple: int = 1) -> Batch:
    """Rows `index` of `token_ids` laid end to end, in order, in as few rows of at most
    `max_width` tokens as that takes (one for SMS-sized batches); the width is the fullest
    row's, rounded up to `multiple` (never past `max_width`)."""
    lengths = [len(token_ids[i]) for i in index]
    rows, starts, n_rows, width = row_layout(lengths, max_width, multiple)
    row_ids = [[] for _ in range(n_rows)]
    for i, row in zip(index, rows, strict=True):
        row_ids[row].extend(token_ids[i])
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in row_ids], dtype=torch.long)
    return Batch(ids, torch.tensor(lengths, dtype=torch.long),
                 torch.tensor(list(index), dtype=torch.long),
                 Packing.build(rows, starts, lengths, n_rows, width))


def row_layout(lengths: Sequence[int], max_width: int,
               multiple: int = 1) -> tuple[list[int], list[int], int, int]:
    """Where `pack` lays messages of `lengths` end to end, in order: each one's row and
    start column, the number of rows, and their width."""
    if max(lengths) > max_width:
        raise ValueError(f"a message of {max(lengths)} tokens does not fit in rows of "
                         f"{max_width}")
    rows, starts, fill = [], [], [0]
    for n in lengths:
        if fill[-1] + n > max_width:
            fill.append(0)
        rows.append(len(fill) - 1)
        starts.append(fill[-1])
        fill[-1] += n
    return rows, starts, len(fill), min(-(-max(fill) // multiple) * multiple, max_width)


def training_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                   group_by_length: bool) -> list[list[int]]:
    """The batches of one epoch as lists of positions: a seeded shuffle, cut in order
    (the textbook recipe's random batches), or with `group_by_length` each window of
    batches sorted by length before it is cut, then the batches shuffled again so long
    and short ones alternate randomly."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * GROUP_WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start: start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def inference_order(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of similar length, longest first (so memory peaks at once, not late)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def batches(token_ids: Sequence[Sequence[int]], order: list[list[int]],
            pad_id: int) -> Iterator[Batch]:
    """Scoring's batches, `order`'s (`inference_order`): the messages of each packed in
    rows of `SCORING_ROW_WIDTH` tokens (wider only for a longer message); padded, one
    message a row, where that computes no more tokens (a message alone, messages too
    long to share a row, or all of one length), sparing the packed attention's gathers."""
    for index in order:
        lengths = [len(token_ids[i]) for i in index]
        width = max(SCORING_ROW_WIDTH, *lengths)
        _, _, n_rows, packed_width = row_layout(lengths, width)
        # Decided before it is built: building a `Packing` for every batch scored a
        # 200,000-line file of similar short messages with a tiny model in 13.1-13.3 s
        # against 8.2-9.0 padded; deciding first, 8.0-8.4 (benchmarks/README.md).
        yield (pack(token_ids, index, pad_id, width)
               if n_rows * packed_width < len(index) * max(lengths)
               else collate(token_ids, index, pad_id))
