"""The frozen part computed once (issue 24, item 7): where the embeddings and the first
blocks train nothing and draw no dropout, their output is kept per message and steps
run the blocks after them only; losses and trained weights as computed in full."""

import dataclasses

import numpy as np
import pytest
import torch

from spamlora import batching, frozen
from spamlora.adapter import AdapterSpec
from spamlora.checkpoint import Checkpoints
from spamlora.classifier import build_classifier
from spamlora.errors import Interrupted
from spamlora.frozen import PrefixCache, frozen_blocks
from spamlora.tokenizer import Tokenizer
from spamlora.train import Resumable, train_classifier
from spamlora.weights import load_gpt2

from .conftest import make_hf_gpt2
from .test_train import PARAMS, separable_task

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def three_blocks(tmp_path_factory):
    """Three blocks, so that `last_two_blocks` leaves one frozen (the tiny model has
    two)."""
    return make_hf_gpt2(tmp_path_factory.mktemp("three_blocks"), n_layer=3)


def classifier(folder, trainable, token="last", drop_rate=0.0, seed=3):
    base = load_gpt2(folder, drop_rate)
    spec = AdapterSpec("tiny", base.cfg, rank=4, alpha=8, max_length=64,
                       pad_id=Tokenizer(folder).pad_id, trainable=trainable, token=token)
    return build_classifier(base, spec, seed=seed), spec


@pytest.mark.parametrize("trainable, frozen_count", [
    ("lora", 0), ("all", 0), ("last_block", 2), ("last_two_blocks", 1), ("last_layer", 3)])
def test_the_frozen_blocks_of_each_mode(three_blocks, trainable, frozen_count):
    assert frozen_blocks(classifier(three_blocks, trainable)[0]) == frozen_count
    # Dropout below the trained blocks draws anew each step: nothing there is fixed.
    assert frozen_blocks(classifier(three_blocks, trainable, drop_rate=0.1)[0]) == 0


def test_lora_without_dropout_or_training_counts_as_frozen(three_blocks):
    """What decides is whether a block computes a fixed function, not what it holds."""
    model, _ = classifier(three_blocks, "lora")
    for p in model.trf_blocks[0].parameters():
        p.requires_grad_(False)
    assert frozen_blocks(model) == 1


def messages(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("trainable", ["last_block", "last_two_blocks", "last_layer"])
@pytest.mark.parametrize("token", ["last", "first", "mean"])
@pytest.mark.parametrize("packed", [True, False])
def test_a_batch_fed_from_the_cache_gives_the_logits_and_gradients_computed_in_full(
        three_blocks, trainable, token, packed):
    model, spec = classifier(three_blocks, trainable, token)
    with torch.no_grad():  # a head and blocks as after training, not at their init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    model.train()
    ids = messages([5, 31, 1, 17, 64, 2, 40, 9, 3, 22], model.cfg.vocab_size)
    labels = torch.tensor([i % 2 for i in range(len(ids))])
    # A cache of all ten messages; the batch takes some of them, out of order.
    cache = PrefixCache.build(model, ids, frozen_blocks(model), spec.pad_id, 4, CPU,
                              torch.float32, training=True)
    index = [7, 1, 4, 0, 9]
    batch = (batching.pack(ids, index, spec.pad_id, 256, 8) if packed
             else batching.collate(ids, index, spec.pad_id, multiple=8))
    results = []
    for b in (batch, cache.feed(batch)):
        model.zero_grad(set_to_none=True)
        logits = b.logits(model)
        torch.nn.functional.cross_entropy(logits, labels[b.index]).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()
                                          if p.requires_grad}))
    (want, want_grads), (got, got_grads) = results
    assert cache.feed(batch).entering.hidden.shape == (*batch.ids.shape, model.cfg.emb_dim)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-5,
                                   msg=f"gradient of {name}")


def train(folder, trainable, token="last", dtype=torch.float32, cache=True,
          padding="packed", resumable=None, epochs=2):
    """History, trained tensors and how often the token embedding ran."""
    model, spec = classifier(folder, trainable, token)
    embedded = []
    model.tok_emb.register_forward_hook(lambda *_: embedded.append(1))
    params = dataclasses.replace(PARAMS, epochs=epochs, trainable=trainable, token=token,
                                 padding=padding)
    history = train_classifier(model, *separable_task(Tokenizer(folder)), params,
                               spec.pad_id, 64, CPU, dtype, resumable=resumable,
                               cache_frozen=cache)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return history, trained, len(embedded)


# In fp32 the cached states are the values the full forward computes, up to the order
# of float sums (other batch shapes); in bf16 the rounding of a bf16 product may also
# differ with a batch's shape.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-3}


def assert_close_runs(a, b, dtype):
    (history_a, trained_a, _), (history_b, trained_b, _) = a, b
    atol = TOLERANCE[dtype]
    np.testing.assert_allclose(history_a.step_losses, history_b.step_losses, atol=atol)
    np.testing.assert_allclose([e.val_loss for e in history_a.epochs],
                               [e.val_loss for e in history_b.epochs], atol=atol)
    assert [e.val_accuracy for e in history_a.epochs] == [
        e.val_accuracy for e in history_b.epochs]
    assert set(trained_a) == set(trained_b)
    for name in trained_a:
        # A key bias adds the same q.b to every score of a query's row, which softmax
        # ignores: its gradient is float noise that Adam scales up to full steps, other
        # noise for other summation orders (measured on GPT-2 124M: 6e-5 in fp32, 3e-3
        # in bf16, where every other weight was within 1e-5 and 2.3e-4).
        if name.endswith("W_key.bias"):
            continue
        torch.testing.assert_close(trained_a[name], trained_b[name], atol=atol, rtol=0,
                                   msg=f"trained {name}")


# Two epochs of 60 training and 20 validation messages, 8 steps an epoch: in full the
# embedding runs at every step and validation batch; cached, once for each split (each
# fits one batch), whatever the epochs.
FULL_EMBEDDINGS, CACHED_EMBEDDINGS = 2 * (8 + 1), 2


@pytest.mark.parametrize("trainable, token, dtype, padding", [
    ("last_block", "last", torch.float32, "packed"),
    ("last_block", "mean", torch.bfloat16, "packed"),
    ("last_two_blocks", "first", torch.float32, "packed"),
    ("last_two_blocks", "last", torch.bfloat16, "batch"),
    ("last_layer", "mean", torch.float32, "batch"),
    ("last_layer", "last", torch.bfloat16, "packed"),
    ("last_block", "last", torch.float32, "max_length"),
])
def test_cached_training_gives_the_losses_and_weights_computed_in_full(
        three_blocks, trainable, token, dtype, padding):
    cached = train(three_blocks, trainable, token, dtype, padding=padding)
    full = train(three_blocks, trainable, token, dtype, cache=False, padding=padding)
    assert (cached[2], full[2]) == (CACHED_EMBEDDINGS, FULL_EMBEDDINGS)
    epochs = cached[0].epochs
    assert epochs[-1].train_loss < epochs[0].train_loss - 0.05  # it learned: weights moved
    assert_close_runs(cached, full, dtype)


@pytest.mark.parametrize("trainable", ["lora", "all"])
def test_where_every_block_trains_every_step_is_computed_in_full(three_blocks, trainable):
    history, trained, embedded = train(three_blocks, trainable, epochs=1)
    assert embedded == FULL_EMBEDDINGS // 2
    again, trained_again, _ = train(three_blocks, trainable, cache=False, epochs=1)
    assert history == again
    assert all(torch.equal(trained[n], trained_again[n]) for n in trained)


def test_caches_larger_than_the_bound_are_not_kept(three_blocks, monkeypatch, caplog):
    monkeypatch.setattr(frozen, "MAX_CACHE_BYTES", 1000)
    _, _, embedded = train(three_blocks, "last_block", epochs=1)
    assert embedded == FULL_EMBEDDINGS // 2
    assert "every step computes it again" in caplog.text


def test_a_split_without_messages_caches_nothing_but_the_padding_row(three_blocks):
    model, spec = classifier(three_blocks, "last_block")
    cache = PrefixCache.build(model, [], 2, spec.pad_id, 4, CPU, torch.float32, True)
    assert cache.hidden.shape == (1, model.cfg.emb_dim) and len(cache.offsets) == 0


@pytest.mark.parametrize("trainable, token, dtype, stop_at", [
    ("last_block", "last", torch.float32, 5), ("last_two_blocks", "mean", torch.bfloat16, 8),
    ("last_layer", "first", torch.bfloat16, 13)])
def test_a_resumed_cached_training_rebuilds_the_cache_and_ends_where_one_never_stopped(
        three_blocks, tmp_path, trainable, token, dtype, stop_at):
    """Stopped after step `stop_at` (mid-epoch, at an epoch's end), resumed by a fresh
    process' worth of objects: the cache is rebuilt, and the result is bit for bit the
    uninterrupted cached run's, and close to the uncached one's."""
    straight = train(three_blocks, trainable, token, dtype, epochs=3)
    checkpoints = Checkpoints(tmp_path, "k")
    taken = []

    def stop():
        taken.append(1)
        return len(taken) == stop_at

    with pytest.raises(Interrupted, match=f"step={stop_at}"):
        train(three_blocks, trainable, token, dtype, epochs=3,
              resumable=Resumable(checkpoints, 3600.0, should_stop=stop))
    resumed = train(three_blocks, trainable, token, dtype, epochs=3,
                    resumable=Resumable(checkpoints, 0.0))
    assert resumed[2] == CACHED_EMBEDDINGS
    assert resumed[0] == straight[0]
    assert all(torch.equal(resumed[1][n], straight[1][n]) for n in straight[1])
    assert_close_runs(resumed, train(three_blocks, trainable, token, dtype, cache=False,
                                     epochs=3), dtype)
