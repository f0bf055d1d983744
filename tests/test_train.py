"""Training: it learns, it is deterministic, batching options are equivalent."""

import dataclasses

import numpy as np
import pytest
import torch

from spamlora import batching, packed, precision
from spamlora.adapter import AdapterSpec, save_adapter
from spamlora.checkpoint import Checkpoints
from spamlora.classifier import build_classifier
from spamlora.config import TrainParams
from spamlora.errors import Interrupted
from spamlora.lora import lora_layers
from spamlora.tokenizer import Tokenizer
from spamlora.train import Resumable, train_classifier
from spamlora.weights import load_gpt2

from .conftest import cpu_build, make_hf_gpt2, sms_lines

CPU = torch.device("cpu")


def separable_task(tokenizer):
    rows = [line.split("\t") for line in sms_lines(40, 40).splitlines()]
    rng = np.random.default_rng(0)
    rng.shuffle(rows)
    texts = [t for _, t in rows]
    labels = np.array([int(label == "spam") for label, _ in rows])
    ids, _ = batching.encode(tokenizer, texts, 64)
    return ids[:60], labels[:60], ids[60:], labels[60:]


def run(folder, params: TrainParams, dtype=torch.float32, tmp_path=None, resumable=None,
        dropout=0.0, models=None):
    """Train a tiny classifier on a separable task; `models`, a list: the trained model
    appended to it."""
    tokenizer = Tokenizer(folder)
    base = load_gpt2(folder)
    spec = AdapterSpec("tiny", base.cfg, rank=4, alpha=8, dropout=dropout, max_length=64,
                       pad_id=tokenizer.pad_id, trainable=params.trainable,
                       token=params.token)
    model = build_classifier(base, spec, seed=params.seed)
    tr, ytr, va, yva = separable_task(tokenizer)
    steps = []
    history = train_classifier(model, tr, ytr, va, yva, params, tokenizer.pad_id, 64, CPU,
                               dtype, on_step=lambda s, loss: steps.append(s),
                               resumable=resumable)
    if tmp_path is not None:
        save_adapter(model, spec, tmp_path)
    if models is not None:
        models.append(model)
    return history, steps


PARAMS = TrainParams(epochs=4, batch_size=8, lr=5e-3, weight_decay=0.0, seed=3)


@pytest.mark.parametrize("trainable, token", [("lora", "last"), ("last_block", "first"),
                                               ("all", "mean")])
def test_learns_a_separable_task(tiny_gpt2, trainable, token):
    params = dataclasses.replace(PARAMS, trainable=trainable, token=token)
    history, steps = run(tiny_gpt2, params)
    first, last = history.epochs[0], history.epochs[-1]
    assert last.val_accuracy >= 0.95
    assert last.train_loss < first.train_loss
    assert [r.examples_seen for r in history.epochs] == [60, 120, 180, 240]
    assert steps == list(range(1, 4 * 8 + 1))  # ceil(60 / 8) = 8 steps an epoch


@pytest.mark.parametrize("dtype, computes_bf16, multiple", [
    (torch.bfloat16, True, 32), (torch.bfloat16, False, 8), (torch.float32, True, 8)])
def test_packed_rows_are_rounded_as_their_precision_wants(tiny_gpt2, monkeypatch, dtype,
                                                          computes_bf16, multiple):
    """Where the CPU computes bf16, oneDNN compiles kernels for every new row width, so
    packed rows are rounded up to 32 tokens; elsewhere to 8, where the pad tokens cost
    more than the shapes they save. (The validation pass packs its rows unrounded.)"""
    widths, pack = [], batching.pack

    def recording(token_ids, index, pad_id, max_width, multiple=1):
        batch = pack(token_ids, index, pad_id, max_width, multiple)
        if multiple > 1:  # a training batch (the validation pass rounds nothing)
            widths.append(batch.ids.shape[1])
        return batch

    monkeypatch.setattr(batching, "pack", recording)
    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda: computes_bf16)
    run(tiny_gpt2, dataclasses.replace(PARAMS, epochs=1), dtype=dtype)
    assert len(widths) == 8 and all(w % multiple == 0 for w in widths)
    if multiple < 32:
        assert any(w % 32 for w in widths)


def test_same_seed_gives_bitwise_identical_metrics_and_adapter(tiny_gpt2, tmp_path):
    a, _ = run(tiny_gpt2, PARAMS, tmp_path=tmp_path / "a.safetensors")
    b, _ = run(tiny_gpt2, PARAMS, tmp_path=tmp_path / "b.safetensors")
    assert a == b
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    c, _ = run(tiny_gpt2, dataclasses.replace(PARAMS, seed=4))
    assert c.step_losses != a.step_losses


@pytest.mark.parametrize("padding, grouped", [("max_length", False), ("batch", False)])
def test_other_batching_modes_also_learn(tiny_gpt2, padding, grouped):
    params = dataclasses.replace(PARAMS, padding=padding, group_by_length=grouped)
    history, _ = run(tiny_gpt2, params)
    assert history.epochs[-1].val_accuracy >= 0.95


def test_padding_mode_does_not_change_the_first_step(tiny_gpt2):
    # Same batches, padded to the batch's longest or to max_length: same loss.
    one = dataclasses.replace(PARAMS, epochs=1, group_by_length=False)
    batch_pad, _ = run(tiny_gpt2, one)
    full_pad, _ = run(tiny_gpt2, dataclasses.replace(one, padding="max_length"))
    np.testing.assert_allclose(batch_pad.step_losses, full_pad.step_losses, atol=1e-5)


def test_bf16_autocast_trains_with_fp32_master_weights(tiny_gpt2):
    history, _ = run(tiny_gpt2, PARAMS, dtype=torch.bfloat16)
    assert history.epochs[-1].val_accuracy >= 0.9


@pytest.mark.skipif(not packed.can_pack_bf16(), reason="oneDNN cannot pre-pack bf16 "
                    "weights on this CPU (needs AVX-512 BW/VL/DQ or AMX)")
def test_bf16_training_on_packed_frozen_weights_follows_the_plain_ones(tiny_gpt2,
                                                                       monkeypatch):
    """Where oneDNN can, the frozen Linears train from pre-packed weights (each weight
    and its transpose packed once): the same steps as on the plain weights, within bf16
    rounding, and the model holds its own Linears again after."""
    made = []
    reorder = packed.mkldnn_op("_reorder_linear_weight")
    monkeypatch.setattr(packed, "mkldnn_op", lambda name: (
        (lambda w: made.append(w.shape) or reorder(w)) if name == "_reorder_linear_weight"
        else torch.ops.mkldnn.__getattr__(name)))
    models = []
    on_packed, _ = run(tiny_gpt2, PARAMS, dtype=torch.bfloat16, models=models)
    assert not any(isinstance(m, packed.PackedLinear) for m in models[0].modules())
    assert all(type(m.linear) is torch.nn.Linear for m in lora_layers(models[0]))
    # Per block one joint Q, K and V, the attention output, the MLP's two: each weight
    # and its transpose, once for the whole training; but the first block's Q, K and V
    # read the frozen embeddings, whose gradient nothing needs: no transpose.
    blocks = load_gpt2(tiny_gpt2).cfg.n_layers
    assert len(made) == 2 * 4 * blocks - 1
    monkeypatch.setattr(packed, "can_pack_bf16", lambda: False)
    on_plain, _ = run(tiny_gpt2, PARAMS, dtype=torch.bfloat16)
    np.testing.assert_allclose(on_packed.step_losses, on_plain.step_losses, rtol=0,
                               atol=2e-2)
    assert [e.val_accuracy for e in on_packed.epochs] == pytest.approx(
        [e.val_accuracy for e in on_plain.epochs], abs=0.05)


@pytest.mark.parametrize("trainable", ["lora", "all"])
def test_the_fused_adamw_updates_as_the_per_tensor_loop_does(tiny_gpt2, tmp_path, trainable,
                                                             monkeypatch):
    from safetensors.torch import load_file

    import spamlora.train as train_module

    fused_flags = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            fused_flags.append(self.defaults["fused"])

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    params = dataclasses.replace(PARAMS, epochs=2, weight_decay=0.1, trainable=trainable)
    fused, _ = run(tiny_gpt2, params, tmp_path=tmp_path / "fused.safetensors")
    monkeypatch.setattr(train_module, "FUSED_ADAMW_DEVICES", ())
    looped, _ = run(tiny_gpt2, params, tmp_path=tmp_path / "looped.safetensors")
    assert fused_flags == [True, False]
    np.testing.assert_allclose(fused.step_losses, looped.step_losses, rtol=0, atol=1e-5)
    a, b = (load_file(tmp_path / f"{name}.safetensors") for name in ("fused", "looped"))
    assert a.keys() == b.keys() and len(a) > 2
    # A key's bias adds the same amount to all of a query's scores: its true gradient is
    # 0, what it gets is rounding noise, and Adam scales noise up to full steps.
    for key in [k for k in a if not k.endswith("W_key.bias")]:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=key)


def test_training_order_is_seeded_grouped_and_covers_every_example():
    lengths = list(np.random.default_rng(0).integers(1, 120, size=500))
    order = batching.training_order(lengths, 8, torch.Generator().manual_seed(1), True)
    assert sorted(i for b in order for i in b) == list(range(500))
    again = batching.training_order(lengths, 8, torch.Generator().manual_seed(1), True)
    assert order == again
    padded = sum(len(b) * max(lengths[i] for i in b) for b in order)
    plain = batching.training_order(lengths, 8, torch.Generator().manual_seed(1), False)
    padded_plain = sum(len(b) * max(lengths[i] for i in b) for b in plain)
    assert padded < 0.8 * padded_plain  # grouping saves most padding


def test_collate_rounds_the_width_up_but_never_past_the_context():
    rows = [[7] * 5, [9] * 3]
    assert batching.collate(rows, [1, 0], pad_id=0).ids.shape == (2, 5)  # exact
    b = batching.collate(rows, [1, 0], pad_id=0, multiple=8)
    assert b.ids.shape == (2, 8)
    assert b.lengths.tolist() == [3, 5] and b.index.tolist() == [1, 0]
    assert b.ids[0].tolist() == [9, 9, 9] + [0] * 5
    assert batching.collate([[1] * 10], [0], 0, multiple=8, max_width=12).ids.shape == (1, 12)
    assert batching.collate([[1] * 10], [0], 0, pad_to=20).ids.shape == (1, 20)


@pytest.mark.parametrize("dtype, dropout, stop_at, trainable, token", [
    (torch.float32, 0.1, 5, "lora", "last"), (torch.float32, 0.0, 8, "lora", "last"),
    (torch.bfloat16, 0.1, 13, "lora", "last"),
    (torch.float32, 0.0, 5, "last_two_blocks", "mean"),
    (torch.bfloat16, 0.0, 13, "all", "first")])
def test_an_interrupted_training_resumes_bit_exactly(tiny_gpt2, tmp_path, dtype, dropout,
                                                     stop_at, trainable, token):
    """Stopped after step `stop_at` (mid-epoch, at an epoch's end), then resumed by a
    fresh model: the same history and adapter bytes as a run never interrupted. LoRA
    dropout makes the global generator's state matter too; in the other modes the
    checkpoint holds the blocks (or every weight) and their optimizer state."""
    params = dataclasses.replace(PARAMS, epochs=3, trainable=trainable, token=token)
    straight, _ = run(tiny_gpt2, params, dtype, tmp_path / "straight.safetensors",
                      dropout=dropout)
    checkpoints = Checkpoints(tmp_path, "k")
    taken = []

    def stop():
        taken.append(1)
        return len(taken) == stop_at

    with pytest.raises(Interrupted, match=f"step={stop_at}"):
        run(tiny_gpt2, params, dtype, resumable=Resumable(checkpoints, 3600.0,
                                                          should_stop=stop),
            dropout=dropout)
    resumed, steps = run(tiny_gpt2, params, dtype, tmp_path / "resumed.safetensors",
                         resumable=Resumable(checkpoints, 0.0), dropout=dropout)
    assert steps == list(range(stop_at + 1, 3 * 8 + 1))
    assert resumed == straight
    assert (tmp_path / "resumed.safetensors").read_bytes() == (
        tmp_path / "straight.safetensors").read_bytes()


def test_a_resumed_training_counts_the_seconds_of_every_process(tiny_gpt2, tmp_path,
                                                                monkeypatch):
    """train_seconds (metrics/train.json, MLflow) is what the training cost: the part
    before a stop, kept in the checkpoint, plus the part after it. A clock that says
    10 s pass in the first process and 5 s in the second."""
    import types

    from spamlora import train as train_module

    def clock(elapsed: float):
        readings = iter([0.0])  # `began`, then every later reading
        return types.SimpleNamespace(monotonic=train_module.time.monotonic,
                                     perf_counter=lambda: next(readings, elapsed))

    params = dataclasses.replace(PARAMS, epochs=2)
    checkpoints = Checkpoints(tmp_path, "k")
    monkeypatch.setattr(train_module, "time", clock(10.0))
    with pytest.raises(Interrupted):
        run(tiny_gpt2, params, resumable=Resumable(checkpoints, 3600.0,
                                                   should_stop=lambda: True))
    monkeypatch.setattr(train_module, "time", clock(5.0))
    resumed, _ = run(tiny_gpt2, params, resumable=Resumable(checkpoints, 3600.0))
    assert resumed.seconds == 15.0
    monkeypatch.setattr(train_module, "time", clock(5.0))
    straight, _ = run(tiny_gpt2, params)
    assert straight.seconds == 5.0 and straight == resumed  # seconds are not compared


def test_off_a_terminal_training_says_where_it_is_and_each_epochs_result(tiny_gpt2, capsys,
                                                                         monkeypatch):
    """dvc queue logs, CI and redirected runs saw nothing for the whole training (issue
    25, item 20): one line per epoch, and a progress line every PROGRESS_SECONDS."""
    from spamlora import train as train_module

    monkeypatch.setattr(train_module, "PROGRESS_SECONDS", 0.0)  # every step, for the test
    history, _ = run(tiny_gpt2, dataclasses.replace(PARAMS, epochs=2))
    out = capsys.readouterr().out  # not a terminal: the bar is off
    epochs = [line for line in out.splitlines() if line.startswith("epoch ") and
              "validation loss" in line]
    assert len(epochs) == 2
    last = history.epochs[-1]
    assert epochs[1] == (f"epoch 2/2: train loss {last.train_loss:.4f}, accuracy "
                         f"{last.train_accuracy:.4f}; validation loss {last.val_loss:.4f}, "
                         f"accuracy {last.val_accuracy:.4f}")
    progress = [line for line in out.splitlines() if "examples/s" in line]
    assert len(progress) == 2 * 8 and progress[0].startswith("epoch 1/2, step 1/8: loss ")
    monkeypatch.setattr(train_module, "PROGRESS_SECONDS", 3600.0)
    run(tiny_gpt2, dataclasses.replace(PARAMS, epochs=1))
    assert "examples/s" not in capsys.readouterr().out


# The default recipe's numbers (trainable: lora, token: last, packed) as the code before
# the trainable/token modes computed them (issue 24): every build must come within float
# rounding of them.
BEFORE_MODES = {"first_step_losses": ["0x1.7693040000000p-1", "0x1.7a54f80000000p-1"],
                "val_loss": "0x1.42fa240000000p-1"}
# ... and bit for bit what the code computes today, on the build it was measured on (the
# trained tensors' bits moved within rounding when attention ran in tiles, when AdamW
# was fused, and when the last block's queries read their tile's keys instead of their
# row's, by 1.0e-7 at most: issue 27): a bit-level change to the default computation
# fails here, to be looked at.
DEFAULT_BITS = {
    "build": ("2.13.0+cpu", "AVX512", "AuthenticAMD"),
    "tensors_sha256": "02573e7f316678c71db34c1ecfe5f13ff7a854d5ee203b8c27173090553689f8",
    "first_step_losses": BEFORE_MODES["first_step_losses"],  # these bits did not move
    "val_loss": BEFORE_MODES["val_loss"],
}


def test_the_default_recipe_computes_what_it_did_before_the_modes(tmp_path):
    from spamlora.adapter import tensors_digest, trainable_state

    folder = make_hf_gpt2(tmp_path / "g", tokenizer=False, vocab_size=257)
    base = load_gpt2(folder)
    model = build_classifier(base, AdapterSpec("tiny", base.cfg, rank=4, alpha=8,
                                               max_length=64, pad_id=0), seed=3)
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 257, size=n).tolist() for n in rng.integers(1, 40, size=48)]
    labels = np.array([len(t) % 2 for t in ids])
    params = TrainParams(epochs=1, batch_size=8, lr=5e-3, weight_decay=0.0, seed=3)
    assert (params.trainable, params.token, params.padding) == ("lora", "last", "packed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = train_classifier(model, ids[:40], labels[:40], ids[40:], labels[40:],
                                   params, 0, 64, CPU, torch.float32)
    finally:
        torch.set_num_threads(threads)
    got = {"first_step_losses": [x.hex() for x in history.step_losses[:2]],
           "val_loss": history.epochs[-1].val_loss.hex()}
    np.testing.assert_allclose(
        [float.fromhex(x) for x in got["first_step_losses"] + [got["val_loss"]]],
        [float.fromhex(x) for x in BEFORE_MODES["first_step_losses"]
         + [BEFORE_MODES["val_loss"]]], rtol=0, atol=1e-5)
    if cpu_build() == DEFAULT_BITS["build"]:
        assert got == {k: DEFAULT_BITS[k] for k in got}
        assert tensors_digest(trainable_state(model)) == DEFAULT_BITS["tensors_sha256"]
