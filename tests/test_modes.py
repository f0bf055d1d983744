"""`train.trainable` and `train.token`: which parameters each mode trains (the book's
meanings), which hidden state the head reads, and each mode's adapter file."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from spamlora import batching
from spamlora.adapter import AdapterError, AdapterSpec, read_adapter, save_adapter
from spamlora.classifier import (
    build_classifier,
    count_parameters,
    counts_by_mode,
    format_summary,
    load_classifier,
    parameter_counts,
    random_base,
)
from spamlora.config import TrainParams
from spamlora.inference import merged_for_inference, predict_logits
from spamlora.model import GPTConfig, GPTModel
from spamlora.presets import TOKENS, TRAINABLE
from spamlora.train import train_classifier
from spamlora.weights import load_gpt2, read_config, uninitialised

CPU = torch.device("cpu")


def spec_of(base, trainable="lora", token="last", pad_id=0, **kw):
    return AdapterSpec("tiny", base.cfg, rank=4, alpha=8, max_length=64, pad_id=pad_id,
                       trainable=trainable, token=token, **kw)


def classifier(folder, trainable="lora", token="last", seed=5):
    base = load_gpt2(folder)
    return build_classifier(base, spec_of(base, trainable, token), seed=seed)


# The parameters LLMs-from-scratch's ch06 experiments set trainable, by name prefix (the
# tiny model has two blocks): the new head always; `last_*` with the final LayerNorm.
BOOK = {
    "last_layer": ("out_head.",),
    "last_block": ("out_head.", "final_norm.", "trf_blocks.1."),
    "last_two_blocks": ("out_head.", "final_norm.", "trf_blocks.1.", "trf_blocks.0."),
    "all": ("",),
}


@pytest.mark.parametrize("trainable", TRAINABLE)
def test_each_mode_trains_what_the_book_trains(tiny_gpt2, trainable):
    model = classifier(tiny_gpt2, trainable)
    names = [n for n, _ in model.named_parameters()]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    if trainable == "lora":
        assert trained == {n for n in names if n.startswith("out_head.")
                           or n.endswith((".lora.A", ".lora.B"))}
        assert len(trained) == 2 + 2 * 6 * 2  # head; A and B of six Linears, two blocks
    else:
        assert not any(".lora." in n for n in names)
        assert trained == {n for n in names if n.startswith(BOOK[trainable])}
    assert model.out_head.out_features == 2 and model.out_head.weight.requires_grad


def test_the_parameter_counts_of_every_mode_on_gpt2_124m():
    """124,439,808 is GPT-2 124M (head tied); one block holds 7,087,872, the final
    LayerNorm 1,536, the 2-class head 1,538."""
    want = {"lora": (1_328_642, 125_768_450), "all": (124_441_346, 124_441_346),
            "last_block": (7_090_946, 124_441_346), "last_two_blocks": (14_178_818,
                                                                       124_441_346),
            "last_layer": (1_538, 124_441_346)}
    for trainable in TRAINABLE:
        with uninitialised():
            base = GPTModel(GPTConfig.preset("gpt2"))
        model = build_classifier(base, AdapterSpec("gpt2", base.cfg, 8, 8.0,
                                                   trainable=trainable), seed=123)
        counts = parameter_counts(model)
        assert (counts.trainable, counts.total) == want[trainable], trainable
        # The LM before the head swap: its head is tied to the token embedding, so it
        # trains with it in `all` only.
        assert counts.lm_trainable == {"lora": 1_327_104, "all": 163_037_184}.get(
            trainable, counts.trainable - 1_538)
        summary = format_summary(model, counts)
        assert f"{counts.trainable:,}" in summary
        assert ("LM + LoRA (before head swap)" in summary) == (trainable == "lora")


def test_counts_by_mode_agree_with_the_classifiers_built(tiny_gpt2):
    base = load_gpt2(tiny_gpt2)
    counts = counts_by_mode(spec_of(base))
    assert list(counts) == list(TRAINABLE)
    for trainable in TRAINABLE:
        assert counts[trainable] == count_parameters(classifier(tiny_gpt2, trainable))


def trained_values(model, seed=1):
    """Give every trained parameter values no initialisation would give (as after
    training), so a load that skipped one would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def random_ids(model, n=12, longest=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, model.cfg.vocab_size, size=k).tolist()
            for k in rng.integers(1, longest, size=n)]


@pytest.mark.parametrize("trainable", TRAINABLE)
@pytest.mark.parametrize("token", ["last", "mean"])
def test_the_adapter_holds_exactly_the_trained_parameters_and_reloads_them(
        tiny_gpt2, tmp_path, trainable, token):
    model = trained_values(classifier(tiny_gpt2, trainable, token))
    spec = spec_of(model, trainable, token)
    path = tmp_path / "a.safetensors"
    save_adapter(model, spec, path)
    trained = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert {n: tuple(t.shape) for n, t in load_file(path).items()} == trained
    assert spec.tensor_shapes() == trained
    loaded, loaded_spec = load_classifier(tiny_gpt2, path)
    assert (loaded_spec.trainable, loaded_spec.token) == (trainable, token)
    assert loaded.token == token
    ids = random_ids(model)
    want = predict_logits(model, ids, 0, 4, CPU)
    np.testing.assert_array_equal(predict_logits(loaded, ids, 0, 4, CPU), want)
    merged = merged_for_inference(loaded)
    np.testing.assert_allclose(predict_logits(merged, ids, 0, 4, CPU), want, atol=1e-5)


def test_an_adapter_from_before_the_modes_reads_as_lora_on_the_last_token(tiny_gpt2,
                                                                         tmp_path):
    model = trained_values(classifier(tiny_gpt2))
    spec = spec_of(model)
    save_adapter(model, spec, tmp_path / "a.safetensors")
    meta = json.loads(spec.to_metadata()["spamlora"])
    del meta["spec"]["trainable"], meta["spec"]["token"]
    save_file(load_file(tmp_path / "a.safetensors"), tmp_path / "old.safetensors",
              metadata={"spamlora": json.dumps(meta)})
    old, _ = read_adapter(tmp_path / "old.safetensors")
    assert (old.trainable, old.token) == ("lora", "last") and old == spec


@pytest.mark.parametrize("field, value, message", [
    ("trainable", "some", r"trainable must be one of \['lora', 'all', 'last_block', "
                          r"'last_two_blocks', 'last_layer'\], got 'some'"),
    ("trainable", ["all"], "trainable must be one of"),
    ("token", "middle", r"token must be one of \['last', 'first', 'mean'\], got 'middle'"),
])
def test_crafted_mode_metadata_is_refused(tiny_gpt2, tmp_path, field, value, message):
    model = classifier(tiny_gpt2)
    path = tmp_path / "a.safetensors"
    save_adapter(model, spec_of(model), path)
    meta = json.loads(spec_of(model).to_metadata()["spamlora"])
    meta["spec"][field] = value
    save_file(load_file(path), tmp_path / "bad.safetensors",
              metadata={"spamlora": json.dumps(meta)})
    with pytest.raises(AdapterError, match=f"adapter metadata {message}"):
        read_adapter(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("made, claimed", [("lora", "last_block"), ("last_block", "all"),
                                           ("last_two_blocks", "last_block"),
                                           ("last_layer", "lora")])
def test_tensors_of_one_mode_under_another_modes_metadata_are_refused(
        tiny_gpt2, tmp_path, made, claimed):
    """The mode decides which tensors must be there: a file relabelled is refused
    before any model is built."""
    model = classifier(tiny_gpt2, made)
    path = tmp_path / "a.safetensors"
    save_adapter(model, spec_of(model, made), path)
    save_file(load_file(path), tmp_path / "relabelled.safetensors",
              metadata=spec_of(model, claimed).to_metadata())
    with pytest.raises(AdapterError, match="does not fit the classifier it describes"):
        read_adapter(tmp_path / "relabelled.safetensors")


def test_an_adapter_of_every_weight_needs_the_bases_config_and_tokenizer_only(
        tiny_gpt2, tmp_path):
    import shutil

    model = trained_values(classifier(tiny_gpt2, "all", "first"))
    save_adapter(model, spec_of(model, "all", "first"), tmp_path / "a.safetensors")
    folder = tmp_path / "no_weights"
    folder.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(tiny_gpt2 / name, folder / name)
    loaded, _ = load_classifier(folder, tmp_path / "a.safetensors", strict=True)
    ids = random_ids(model)
    np.testing.assert_array_equal(predict_logits(loaded, ids, 0, 4, CPU),
                                  predict_logits(model, ids, 0, 4, CPU))


def test_first_and_mean_read_the_hidden_states_they_name(tiny_gpt2):
    model = trained_values(classifier(tiny_gpt2)).eval()
    ids = torch.tensor([random_ids(model, n=1, longest=30, seed=3)[0]])
    lengths = torch.tensor([ids.shape[1]])
    with torch.no_grad():
        hidden = model.hidden_states(ids)[0]
        read = {"last": hidden[-1], "first": hidden[0], "mean": hidden.mean(0)}
        for token, h in read.items():
            model.token = token
            torch.testing.assert_close(model(ids, lengths)[0], model.out_head(h),
                                       atol=1e-6, rtol=0)


@pytest.mark.parametrize("token", TOKENS)
def test_each_message_scores_as_if_alone_padded_or_packed(tiny_gpt2, token):
    """Padding, and the other messages packed in the same row, are outside every
    message's reading: its logits alone, in a padded batch and in a packed one agree,
    and so do the gradients of a training step."""
    model = trained_values(classifier(tiny_gpt2, "last_block", token))
    ids = random_ids(model, n=9)
    index = list(range(len(ids)))
    labels = torch.tensor([i % 2 for i in index])
    alone = torch.cat([batching.collate(ids, [i], 0).logits(model) for i in index])
    layouts = {"padded": batching.collate(ids, index, 0, multiple=8),
               "packed": batching.pack(ids, index, 0, 64, multiple=8)}
    assert layouts["packed"].ids.shape[0] < len(ids)  # several messages share a row
    grads = {}
    for name, batch in layouts.items():
        model.zero_grad()
        logits = batch.logits(model)
        torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)
        torch.nn.functional.cross_entropy(logits, labels).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()
                       if p.requires_grad}
    for n, g in grads["padded"].items():
        torch.testing.assert_close(grads["packed"][n], g, atol=1e-5, rtol=1e-4)


def test_first_reads_only_the_first_token_and_mean_every_token(tiny_gpt2):
    """The first token sees nothing after it (causal): changing a later token leaves
    `first` as it was; `mean` and `last` move."""
    model = trained_values(classifier(tiny_gpt2))
    ids = random_ids(model, n=1, longest=20, seed=4)[0] + [7, 8]
    changed = ids[:-1] + [9]
    for token in TOKENS:
        model.token = token
        # Each message scored alone, so both sit at the same place in a GEMM of the same
        # shape: two rows of one batch may round differently (AMX's fp32 kernels do).
        a, b = (predict_logits(model, [t], 0, 1, CPU) for t in (ids, changed))
        assert np.array_equal(a, b) == (token == "first"), token


@pytest.mark.parametrize("trainable", TRAINABLE)
def test_training_changes_exactly_the_trained_parameters(tiny_gpt2, trainable):
    model = classifier(tiny_gpt2, trainable, "mean")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = random_ids(model, n=24)
    labels = np.array([len(t) % 2 for t in ids])
    params = TrainParams(epochs=1, batch_size=8, lr=5e-3, weight_decay=0.1, seed=3,
                         trainable=trainable, token="mean")
    train_classifier(model, ids[:16], labels[:16], ids[16:], labels[16:], params, 0, 64,
                     CPU, torch.float32)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


def without_weights(folder, dest):
    """The base folder's config and tokenizer, not its weights file."""
    import shutil

    dest.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(folder / name, dest / name)
    return dest


def test_a_random_base_is_pytorchs_own_initialisation_seeded(tiny_gpt2):
    """As the book's GPTModel with `--weights random`: PyTorch's module defaults (an
    embedding ~N(0, 1), not GPT-2's N(0, 0.02); LayerNorms at one and zero), the same for
    the same seed, and the caller's generator untouched."""
    cfg = read_config(tiny_gpt2)
    torch.manual_seed(42)
    before = torch.random.get_rng_state()
    model, digest = random_base(cfg, 123)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert abs(model.tok_emb.weight.std().item() - 1.0) < 0.05
    assert torch.equal(model.final_norm.weight, torch.ones(cfg.emb_dim))
    bound = 1 / cfg.emb_dim ** 0.5  # kaiming_uniform(a=sqrt(5)) on a (d, d) Linear
    assert model.trf_blocks[0].att.W_query.weight.abs().max() <= bound
    again, same = random_base(cfg, 123)
    assert same == digest and all(torch.equal(a, b) for a, b in
                                  zip(model.parameters(), again.parameters(), strict=True))
    assert random_base(cfg, 124)[1] != digest


@pytest.mark.parametrize("trainable", ["lora", "last_block", "all"])
def test_a_classifier_on_a_random_base_scores_the_same_after_a_reload(tiny_gpt2, tmp_path,
                                                                     trainable):
    """The base is rebuilt from the seed the file records, checked against the digest
    recorded at training; the base folder's weights file is never read."""
    from spamlora.predictor import Predictor
    from spamlora.tokenizer import Tokenizer

    base, digest = random_base(read_config(tiny_gpt2), 7)
    spec = spec_of(base, trainable, "mean", Tokenizer(tiny_gpt2).pad_id, weights="random",
                   base_seed=7, random_sha256=digest)
    model = build_classifier(base, spec, seed=3)
    ids = random_ids(model, n=24)
    labels = np.array([len(t) % 2 for t in ids])
    train_classifier(model, ids[:16], labels[:16], ids[16:], labels[16:],
                     TrainParams(epochs=1, seed=3, trainable=trainable, token="mean"), 0, 64,
                     CPU, torch.float32)
    save_adapter(model, spec, tmp_path / "a.safetensors")
    folder = without_weights(tiny_gpt2, tmp_path / "base")
    loaded, loaded_spec = load_classifier(folder, tmp_path / "a.safetensors", strict=True)
    assert (loaded_spec.weights, loaded_spec.base_seed) == ("random", 7)
    want = predict_logits(model, ids, 0, 8, CPU)
    np.testing.assert_array_equal(predict_logits(loaded, ids, 0, 8, CPU), want)
    texts = ["WINNER!! claim your prize", "see you at 5"]
    predictor = Predictor(folder, tmp_path / "a.safetensors", precision="fp32")
    in_memory = Predictor.of_model(model, spec, predictor.tokenizer, CPU, torch.float32)
    np.testing.assert_allclose(predictor.logits(texts)[0], in_memory.logits(texts)[0],
                               atol=1e-5, rtol=0)


def test_a_random_base_rebuilt_otherwise_is_refused(tiny_gpt2, tmp_path):
    """Another PyTorch could initialise modules otherwise: the digest says so, naming
    the seed and both digests, rather than scoring on another base."""
    base, digest = random_base(read_config(tiny_gpt2), 7)
    spec = spec_of(base, weights="random", base_seed=7, random_sha256="0" * 64)
    save_adapter(build_classifier(base, spec, seed=3), spec, tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match=rf"a random base \(seed 7\) whose weights had "
                                           rf"sha256 0{{64}}; rebuilt here they have "
                                           rf"{digest}"):
        load_classifier(tiny_gpt2, tmp_path / "a.safetensors")


@pytest.mark.parametrize("changes, message", [
    ({"weights": "noise"}, r"weights must be one of \['pretrained', 'random'\]"),
    ({"weights": "random", "base_seed": None}, "base_seed must be the random base's seed"),
    ({"base_seed": 7}, "base_seed must be .* null for a pretrained one"),
    ({"weights": "random", "base_seed": 2 ** 70, "random_sha256": "0" * 64},
     "base_seed must be the random base's seed"),
    ({"weights": "random", "base_seed": 7, "random_sha256": "x"},
     "random_sha256 must be the random base's sha256"),
])
def test_crafted_random_base_metadata_is_refused(tiny_gpt2, tmp_path, changes, message):
    model = classifier(tiny_gpt2)
    path = tmp_path / "a.safetensors"
    save_adapter(model, spec_of(model), path)
    meta = json.loads(spec_of(model).to_metadata()["spamlora"])
    meta["spec"].update(changes)
    save_file(load_file(path), tmp_path / "bad.safetensors",
              metadata={"spamlora": json.dumps(meta)})
    with pytest.raises(AdapterError, match=f"adapter metadata {message}"):
        read_adapter(tmp_path / "bad.safetensors")
