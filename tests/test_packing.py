"""Packed batches: per message, the same logits and gradients as running it alone, and
the same training trajectory as padded random batches."""

import dataclasses

import numpy as np
import pytest
import torch

from spamlora import batching
from spamlora import model as model_module
from spamlora.adapter import AdapterSpec
from spamlora.classifier import build_classifier
from spamlora.config import TrainParams
from spamlora.lora import LinearWithLoRA
from spamlora.model import GPTConfig, GPTModel
from spamlora.weights import load_gpt2

from .test_train import run


def classifier(folder, dropout: float = 0.0):
    base = load_gpt2(folder)
    spec = AdapterSpec("tiny", base.cfg, rank=4, alpha=8, dropout=dropout,
                       max_length=base.cfg.context_length, pad_id=0)
    model = build_classifier(base, spec, seed=5)
    torch.manual_seed(1)
    with torch.no_grad():  # as after training: every LoRA update non-zero
        for m in model.modules():
            if isinstance(m, LinearWithLoRA):
                m.lora.B.normal_(std=0.2)
    return model


def messages(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 200, size=n).tolist() for n in lengths]


def trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model, batch, labels):
    model.zero_grad(set_to_none=True)
    logits = batch.logits(model)
    torch.nn.functional.cross_entropy(logits, labels[batch.index], reduction="sum").backward()
    return logits.detach(), trainable_grads(model)


CASES = {
    "mixed": [5, 31, 1, 17, 64, 2, 40, 9],
    "single": [23],
    "context length": [256, 3, 100, 12],  # tiny_gpt2's context is 256 positions
}


@pytest.mark.parametrize("token", ["last", "first"])  # the queries of the last block
@pytest.mark.parametrize("tile", [0, 40, 100_000])  # a message a tile, some, a row a tile
@pytest.mark.parametrize("case", list(CASES))
def test_packed_logits_and_gradients_equal_each_message_alone(tiny_gpt2, case, tile, token,
                                                              monkeypatch):
    monkeypatch.setattr(model_module, "ATTENTION_TILE", tile)
    model = classifier(tiny_gpt2).train()
    model.token = token
    ids = messages(CASES[case])
    labels = torch.tensor([i % 2 for i in range(len(ids))])
    index = list(range(len(ids)))
    context = model.cfg.context_length
    packed = batching.pack(ids, index, pad_id=0, max_width=context, multiple=8)
    assert packed.ids.shape[1] % 8 == 0 or packed.ids.shape[1] == context
    got, got_grads = loss_and_grads(model, packed, labels)

    alone = [model(torch.tensor([seq]), torch.tensor([len(seq)])) for seq in ids]
    torch.testing.assert_close(got, torch.cat(alone).detach(), atol=1e-5, rtol=0)

    padded = batching.collate(ids, index, pad_id=0)
    want, want_grads = loss_and_grads(model, padded, labels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert set(got_grads) == set(want_grads) and any("lora.A" in n for n in got_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4,
                                   msg=f"gradient of {name}")


def test_packing_lays_messages_end_to_end_with_restarting_positions():
    ids = [[7] * 5, [8] * 3, [9] * 6]
    b = batching.pack(ids, [2, 0, 1], pad_id=0, max_width=12, multiple=4)
    # 6 + 5 = 11 tokens fit the first row of 12; the third message starts a second row
    assert b.ids.tolist() == [[9] * 6 + [7] * 5 + [0], [8] * 3 + [0] * 9]
    assert b.packing.positions[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 0]
    rows, cols = b.packing.last
    assert rows.tolist() == [0, 0, 1] and cols.tolist() == [5, 10, 2]
    assert b.index.tolist() == [2, 0, 1] and b.lengths.tolist() == [6, 5, 3]
    # the token in column 7 of row 0 sees its own message's first two tokens only
    keys, seen = b.packing.keys_of(torch.tensor([0, 0]), torch.tensor([7, 10]))
    assert keys[0][seen[0]].tolist() == [6, 7]
    assert keys[1][seen[1]].tolist() == [6, 7, 8, 9, 10]  # never the padding
    # the second row's message: its flat indices start at the row's (12)
    keys, seen = b.packing.keys_of(torch.tensor([1]), torch.tensor([2]))
    assert keys[0][seen[0]].tolist() == [12, 13, 14]
    with pytest.raises(ValueError, match="does not fit"):
        batching.pack([[1] * 13], [0], pad_id=0, max_width=12)


def test_tiles_change_bf16_training_only_within_its_rounding(tiny_gpt2, monkeypatch):
    """Under bf16 autocast (as training on a bf16 CPU) the tiles give the logits and
    gradients of attention over the whole packed row, up to bf16 rounding."""
    ids = messages(CASES["mixed"])
    labels = torch.tensor([i % 2 for i in range(len(ids))])
    results = {}
    for tile in (model_module.ATTENTION_TILE, 100_000):
        monkeypatch.setattr(model_module, "ATTENTION_TILE", tile)
        model = classifier(tiny_gpt2).train()
        packed = batching.pack(ids, list(range(len(ids))), pad_id=0, max_width=256)
        assert packed.packing.gather.shape[0] == (1 if tile == 100_000 else 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[tile] = loss_and_grads(model, packed, labels)
    (got, got_grads), (want, want_grads) = results.values()
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=0.05, rtol=0.05,
                                   msg=f"gradient of {name}")


def test_attention_tiles_hold_consecutive_messages_of_one_row():
    ids = [[1] * 5, [2] * 3, [3] * 6, [4] * 2, [5] * 9]
    b = batching.pack(ids, range(5), pad_id=0, max_width=16)
    rows, _ = b.packing.last
    assert rows.tolist() == [0, 0, 0, 0, 1]  # 16 tokens, then a row of its own
    width = b.ids.shape[1]

    def tiles(tile):
        p = model_module.Packing.build(rows.tolist(), b.packing.first[1].tolist(),
                                       b.lengths.tolist(), 2, width, tile)
        real = torch.zeros(p.gather.numel(), dtype=torch.bool)
        real[p.slots] = True
        assert (p.gather.view(-1)[p.slots] == p.tokens).all()
        return [[b.ids.view(-1)[i].item() for i in g[r]]
                for g, r in zip(p.gather, real.view(p.gather.shape), strict=True)], p
    # up to 8 tokens a tile; a longer message alone; never across rows
    got, p = tiles(8)
    assert got == [[1] * 5 + [2] * 3, [3] * 6 + [4] * 2, [5] * 9]
    assert p.tile_mask is not None and p.tile_mask[0, 5].tolist() == (
        [False] * 5 + [True] + [False] * 3)  # message 2's first token: itself only
    assert not p.tile_mask[0, 4, 5] and p.tile_mask[0, 4, :5].all()
    got, p = tiles(0)  # a message a tile: causal, no mask
    assert got == [[1] * 5, [2] * 3, [3] * 6, [4] * 2, [5] * 9] and p.tile_mask is None
    got, _ = tiles(1000)  # a row a tile
    assert got == [[1] * 5 + [2] * 3 + [3] * 6 + [4] * 2, [5] * 9]


def test_a_packed_message_longer_than_the_context_is_refused():
    cfg = GPTConfig(vocab_size=50, context_length=16, emb_dim=16, n_layers=1, n_heads=2)
    model = GPTModel(cfg)
    b = batching.pack([[1] * 17], [0], pad_id=0, max_width=32)
    with pytest.raises(ValueError, match="exceeds the model's context length of 16"):
        b.logits(model)


def test_packed_and_padded_random_batches_follow_the_same_trajectory(tiny_gpt2):
    params = TrainParams(epochs=2, batch_size=8, lr=5e-3, weight_decay=0.0, seed=3,
                         group_by_length=False)
    packed, _ = run(tiny_gpt2, dataclasses.replace(params, padding="packed"))
    padded, _ = run(tiny_gpt2, dataclasses.replace(params, padding="batch"))
    assert len(packed.step_losses) == 16
    np.testing.assert_allclose(packed.step_losses, padded.step_losses, atol=1e-4, rtol=0)
    for a, b in zip(packed.epochs, padded.epochs, strict=True):
        assert a.val_accuracy == b.val_accuracy
        assert abs(a.val_loss - b.val_loss) < 1e-4


@pytest.mark.parametrize("token", ["last", "first", "mean"])
def test_scoring_packs_each_batch_and_scores_each_message_as_alone(tiny_gpt2, monkeypatch,
                                                                   token):
    """Scoring (validation, evaluate, predict, the served model) packs each length-sorted
    batch in rows of `SCORING_ROW_WIDTH` tokens: fewer tokens computed than padding each
    batch to its longest, each message scored as alone (fp32), by the training-time model
    and the merged one, a message longer than a row in a row of its own."""
    from spamlora.inference import merged_for_inference, predict_logits

    monkeypatch.setattr(batching, "SCORING_ROW_WIDTH", 64)
    ids = messages([5, 31, 1, 17, 100, 2, 40, 9, 23, 3, 64])
    cpu = torch.device("cpu")
    layouts, batches = [], batching.batches

    def recording(*args):
        for batch in batches(*args):
            layouts.append(batch)
            yield batch

    monkeypatch.setattr(batching, "batches", recording)
    model = classifier(tiny_gpt2).train()
    for scored in (model, merged_for_inference(classifier(tiny_gpt2))):
        scored.token = token
        alone = np.concatenate([predict_logits(scored, [seq], 0, 1, cpu) for seq in ids])
        assert all(b.packing is None and b.ids.shape == (1, len(seq))
                   for b, seq in zip(layouts, ids, strict=True))  # exact, a row each
        layouts.clear()
        got = predict_logits(scored, ids, 0, 4, cpu)
        np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)
        assert [b.packing is not None for b in layouts] == [True, True, True]
        # batches of 4, the longest first: 100 | 64 | 40 + 31 in rows of 100 (a row is as
        # wide as the longest message), then 23 + 17 + 9 + 5, then 3 + 2 + 1
        assert [b.ids.shape for b in layouts] == [(3, 100), (1, 54), (1, 6)]
        padded = sum(max(map(len, (ids[i] for i in b.index))) * len(b.index)
                     for b in layouts)
        assert sum(b.ids.numel() for b in layouts) < padded
        layouts.clear()
    assert model.training  # scoring put training mode back
    # Messages too long to share a row, or as long as each other: padded, one a row
    # (packing would compute as many tokens, and add its gathers)
    for unpackable, shape in (([100, 90, 70], (3, 100)), ([5, 5, 5, 5], (4, 5))):
        ids = messages(unpackable)
        layouts.clear()
        got = predict_logits(model, ids, 0, 4, cpu)
        assert [(b.packing, b.ids.shape) for b in layouts] == [(None, shape)]
        np.testing.assert_allclose(got, np.concatenate(
            [predict_logits(model, [seq], 0, 1, cpu) for seq in ids]), atol=1e-5, rtol=0)
