"""The one batching path for training, evaluation and prediction.

Messages are right-padded with the tokenizer's `<|endoftext|>` id and carry their real
lengths; the classifier reads each message's last real token, which under causal
attention never sees the padding, so a prediction does not depend on its batch. That
makes dynamic padding exact: GPT-2 tokens per SMS average ~30 (max ~120), and padding
every batch to the longest message would compute ~4x the real tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# Training batches are drawn from windows of this many batches sorted by length: similar
# lengths share a batch, yet the order of batches and their members stays random.
GROUP_WINDOW_BATCHES = 32
# Training batch widths are rounded up to a multiple of this: a few pad tokens buy far
# fewer distinct GEMM shapes, each of which oneDNN caches a primitive for (measured:
# ~6% faster and ~550 MB less peak RSS an epoch). Inference pads exactly: rounding
# there cost ~8% of throughput and saved nothing.
PAD_MULTIPLE = 8


@dataclass
class Batch:
    ids: torch.Tensor  # (batch, seq) token ids, right-padded
    lengths: torch.Tensor  # (batch,) real tokens per row
    index: torch.Tensor  # (batch,) positions of the rows in the input list

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.ids.to(device, non_blocking=True),
                     self.lengths.to(device, non_blocking=True), self.index)


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
    width = pad_to
    ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    for row, i in enumerate(index):
        ids[row, : lengths[row]] = torch.tensor(token_ids[i], dtype=torch.long)
    return Batch(ids, torch.tensor(lengths, dtype=torch.long),
                 torch.tensor(list(index), dtype=torch.long))


def training_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                   group_by_length: bool) -> list[list[int]]:
    """The batches of one epoch as lists of positions: a seeded shuffle, and with
    `group_by_length` each window of batches sorted by length before it is cut, then the
    batches shuffled again so long and short ones alternate randomly."""
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
    for index in order:
        yield collate(token_ids, index, pad_id)
