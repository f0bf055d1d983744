"""The LoRA classifier: the seed's parameter figures, the adapter file, inference."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from spamlora import inference, packed
from spamlora.adapter import AdapterError, AdapterSpec, read_adapter, save_adapter
from spamlora.classifier import (
    add_lora,
    build_classifier,
    count_parameters,
    format_summary,
    load_classifier,
    parameter_counts,
)
from spamlora.inference import fuse_gelu, merged_for_inference, predict_logits
from spamlora.lora import LinearWithLoRA, merge_for_good
from spamlora.model import GPTConfig, GPTModel
from spamlora.packed import PackedLinear, can_pack_bf16
from spamlora.weights import load_gpt2

from .conftest import downloaded, flip_bytes, make_hf_gpt2

GPT2 = GPTConfig.preset("gpt2")
NO_PACKING = ("oneDNN cannot pre-pack bf16 weights on this CPU (needs AVX-512 BW/VL/DQ, "
              "and ONEDNN_MAX_CPU_ISA not capped below AVX512_CORE)")


def test_seed_figures_on_a_random_124m_model():
    spec = AdapterSpec("gpt2", GPT2, rank=8, alpha=8)
    lm = add_lora(GPTModel(GPT2), spec, seed=123)
    assert count_parameters(lm) == (1_327_104, 164_364_288)  # before the head swap
    model = build_classifier(GPTModel(GPT2), spec, seed=123)
    assert count_parameters(model) == (1_328_642, 125_768_450)
    counts = parameter_counts(model)
    assert (counts.lm_trainable, counts.lm_total) == (1_327_104, 164_364_288)
    text = format_summary(model, counts)
    assert "1,327,104" in text and "164,364,288" in text and "0.81%" in text
    assert "1,328,642" in text and "125,768,450" in text and "1.06%" in text
    first_block = text.split("(0): TransformerBlock(")[1].split("(1-11)")[0]
    assert first_block.count("LinearWithLoRA(") == 6
    assert "(out_head): Linear(in_features=768, out_features=2, bias=True)" in text


def tiny_spec(base, **kw):
    return AdapterSpec("tiny", base.cfg, rank=4, alpha=8, max_length=32, pad_id=0, **kw)


@pytest.fixture
def trained_like(tiny_gpt2):
    """A classifier whose LoRA B and head hold non-zero values, as after training."""
    base = load_gpt2(tiny_gpt2)
    model = build_classifier(base, tiny_spec(base), seed=5)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearWithLoRA):
                m.lora.B.normal_(std=0.2)
    return model


def test_adapter_round_trip_gives_identical_predictions(tiny_gpt2, trained_like, tmp_path):
    spec = tiny_spec(trained_like)
    save_adapter(trained_like, spec, tmp_path / "a.safetensors")
    tensors = load_file(tmp_path / "a.safetensors")
    assert set(tensors) == {n for n, p in trained_like.named_parameters() if p.requires_grad}
    loaded, loaded_spec = load_classifier(tiny_gpt2, tmp_path / "a.safetensors")
    assert loaded_spec == spec
    ids = [[5, 6, 7, 8], [9, 10], list(range(20, 40))]
    want = predict_logits(trained_like, ids, 0, 2, torch.device("cpu"))
    got = predict_logits(loaded, ids, 0, 2, torch.device("cpu"))
    np.testing.assert_array_equal(got, want)


def test_batching_and_padding_do_not_change_predictions(trained_like):
    rng = np.random.default_rng(0)
    vocab = trained_like.cfg.vocab_size
    ids = [rng.integers(1, vocab, size=n).tolist() for n in rng.integers(1, 60, size=40)]
    one_by_one = predict_logits(trained_like, ids, 0, 1, torch.device("cpu"))
    for batch_size in (3, 16, 64):
        np.testing.assert_allclose(
            predict_logits(trained_like, ids, 0, batch_size, torch.device("cpu")),
            one_by_one, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fails", [False, True])
def test_predict_logits_scores_in_eval_mode_and_leaves_each_module_as_it_was(trained_like,
                                                                              fails):
    """Scoring switches off every module's training mode (dropout), and afterwards, even
    when scoring failed, each module is in the mode it was in, a mixed model included."""
    model = trained_like.train()
    model.trf_blocks[0].eval()
    before = {name: module.training for name, module in model.named_modules()}
    during = []

    def record(module, args):
        during.append(module.training)
        if fails:
            raise RuntimeError("scoring failed")

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if isinstance(m, nn.Dropout)]
    ids = [[1, 2, 3], [4, 5]]
    if fails:
        with pytest.raises(RuntimeError, match="scoring failed"):
            predict_logits(model, ids, 0, 2, torch.device("cpu"))
    else:
        predict_logits(model, ids, 0, 2, torch.device("cpu"))
    for hook in hooks:
        hook.remove()
    assert during and not any(during)
    assert {name: module.training for name, module in model.named_modules()} == before
    assert model.training and not model.trf_blocks[0].training


def test_adapter_errors(tiny_gpt2, trained_like, tmp_path):
    with pytest.raises(AdapterError, match="adapter not found"):
        read_adapter(tmp_path / "missing.safetensors")
    path = tmp_path / "a.safetensors"
    save_adapter(trained_like, tiny_spec(trained_like), path)
    other = make_hf_gpt2(tmp_path / "other", n_embd=64, tokenizer=False, vocab_size=300)
    with pytest.raises(AdapterError, match="made for a base model with config"):
        load_classifier(other, path)
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(AdapterError, match="unreadable adapter file"):
        read_adapter(tmp_path / "cut.safetensors")
    save_file({"x": torch.ones(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(AdapterError, match="not a spamlora adapter"):
        read_adapter(tmp_path / "plain.safetensors")
    tensors = load_file(path)
    tensors["out_head.weight"] = torch.ones(3, trained_like.cfg.emb_dim)
    save_file(tensors, tmp_path / "shape.safetensors",
              metadata=tiny_spec(trained_like).to_metadata())
    with pytest.raises(AdapterError, match=r"'out_head\.weight' has shape \(3, 32\)"):
        load_classifier(tiny_gpt2, tmp_path / "shape.safetensors")


@pytest.mark.parametrize("rows", [1, 30, PackedLinear.PACKED_MAX_ROWS + 1])
def test_packed_linear_computes_what_autocast_computes(rows):
    if not can_pack_bf16():
        pytest.skip(NO_PACKING)
    torch.manual_seed(0)
    linear = nn.Linear(64, 96).to(torch.bfloat16).requires_grad_(False)
    packed = PackedLinear.of(linear)
    x = torch.randn(rows, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = linear(x)
        got = packed(x)
        got_3d = packed(x.view(1, rows, 64))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got_3d, want.view(1, rows, 96), atol=1e-2, rtol=1e-2)


def test_packed_linear_takes_the_packed_kernel_for_every_row_count():
    """Rows past PACKED_MAX_ROWS are packed too, in equal chunks: a row's product stays
    within a bf16 rounding step of its product alone."""
    if not can_pack_bf16():
        pytest.skip(NO_PACKING)
    torch.manual_seed(0)
    packed = PackedLinear.of(nn.Linear(64, 96).to(torch.bfloat16).requires_grad_(False))
    x = torch.randn(2, 3 * PackedLinear.PACKED_MAX_ROWS + 7, 64)
    together = packed(x)
    alone = torch.stack([packed(row.view(1, 64)) for row in x.reshape(-1, 64)])
    assert together.shape == (*x.shape[:2], 96)
    torch.testing.assert_close(together.reshape(-1, 96), alone.view(-1, 96),
                               atol=2 ** -7, rtol=2 ** -7)


# bf16's unit roundoff: 8 significant bits.
BF16_U = 2 ** -8


def bf16_kernel_bound(model, fp32_logits: np.ndarray) -> float:
    """How far a bf16 logit may lie from another bf16 computation of it, or from fp32.

    oneDNN and the CPU attention kernel choose their blocking, and so the order of their
    bf16 sums, from a call's row count and sequence length. Each of a block's six
    kernel-shaped operations (the Q/K/V projection, the attention scores, their weighted
    sum of the values, the output projection, the MLP's two layers) rounds its output to
    bf16, and a different shape may round it differently: a relative error of up to
    bf16's unit roundoff u, which the blocks pass on about unchanged (layer norms rescale
    the residual stream). Added up, with the embeddings' sum: (6 * blocks + 1) * u at the
    logits' scale, largest when every rounding goes the same way. Measured (u * scale as
    the unit, benchmarks/README.md): this test's tiny model, batch-mates up to 3.5 and
    bf16 against fp32 up to 7.3 of the bound's 13, on AMX and with oneDNN capped to
    AVX512_CORE_BF16, AVX512_CORE and AVX2; GPT-2 124M on real SMS, about 1 of 73."""
    blocks = model.cfg.n_layers
    return (6 * blocks + 1) * BF16_U * float(np.abs(fp32_logits).max())


@pytest.fixture(params=["native", "autocast"])
def bf16_path(request, monkeypatch):
    """Both bf16 inference paths on every CPU: the pre-packed oneDNN kernel where this
    CPU has it (else skipped, naming the feature) and autocast's plain one, forced."""
    if request.param == "native" and not can_pack_bf16():
        pytest.skip(NO_PACKING)
    if request.param == "autocast":
        monkeypatch.setattr(packed, "can_pack_bf16", lambda: False)
    return request.param


def batch_mates_case(model):
    rng = np.random.default_rng(0)
    context = model.cfg.context_length
    lengths = [*rng.integers(1, 60, size=70), context, 1]
    return [rng.integers(1, model.cfg.vocab_size, size=n).tolist() for n in lengths]


@pytest.fixture(params=["native", "plain"])
def fp32_path(request, monkeypatch):
    """Both fp32 inference paths: pre-packed oneDNN weights where oneDNN computes fp32
    with AVX-512 (else skipped) and the plain Linear, forced."""
    if request.param == "native" and not packed.can_pack_fp32():
        pytest.skip("oneDNN computes fp32 without AVX-512 here: no fp32 weight is packed")
    if request.param == "plain":
        monkeypatch.setattr(packed, "can_pack_fp32", lambda: False)
    return request.param


def test_a_message_scores_the_same_alone_and_among_batch_mates_in_fp32(trained_like,
                                                                       fp32_path):
    """In fp32, packed or not, alone and among 63 others (one of the full context) a
    message's logits agree to fp32's precision, and with the trained model's own (LoRA
    not merged)."""
    ids = batch_mates_case(trained_like)
    cpu = torch.device("cpu")
    merged = merged_for_inference(copy.deepcopy(trained_like), torch.float32)
    assert any(isinstance(m, PackedLinear) for m in merged.modules()) == (
        fp32_path == "native")
    fused = fp32_path == "native" and packed.can_fuse_gelu("tanh", torch.float32)
    assert any(isinstance(m, nn.GELU) for m in merged.modules()) == (not fused)
    together = predict_logits(merged, ids, 0, 64, cpu)
    alone = np.concatenate([predict_logits(merged, [t], 0, 64, cpu) for t in ids])
    np.testing.assert_allclose(alone, together, atol=1e-5, rtol=0)
    np.testing.assert_allclose(together, predict_logits(trained_like, ids, 0, 64, cpu),
                               atol=1e-5, rtol=0)


def test_a_messages_bf16_score_moves_with_batch_mates_only_by_rounding(trained_like,
                                                                      bf16_path):
    """In bf16 a message's logits alone and among 63 others (one of the full context)
    agree within `bf16_kernel_bound`, and each is that close to the fp32 result."""
    ids = batch_mates_case(trained_like)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    merged = merged_for_inference(copy.deepcopy(trained_like), bf16)
    assert any(isinstance(m, PackedLinear) for m in merged.modules()) == (
        bf16_path == "native")
    assert any(isinstance(m, nn.GELU) for m in merged.modules()) == (bf16_path != "native")
    together = predict_logits(merged, ids, 0, 64, cpu, bf16)
    alone = np.concatenate([predict_logits(merged, [t], 0, 64, cpu, bf16) for t in ids])
    fp32 = predict_logits(merged_for_inference(copy.deepcopy(trained_like)), ids, 0, 64, cpu)
    bound = bf16_kernel_bound(trained_like, fp32)  # 5% of the logits' scale here
    np.testing.assert_allclose(alone, together, atol=bound, rtol=0)
    np.testing.assert_allclose(together, fp32, atol=bound, rtol=0)
    np.testing.assert_allclose(alone, fp32, atol=bound, rtol=0)


def test_inference_fuses_each_gelu_after_a_packed_product_and_no_other(monkeypatch):
    """GELU moves into the product before it where that product is a packed frozen
    Linear's (one a LoRA update was folded into too); not after a LoRA layer whose
    update is added after the product, nor after a plain Linear, nor after a layer held
    in two places; none where oneDNN cannot fuse it. The outputs stay those of the
    Linears then GELU."""
    if not can_pack_bf16():
        pytest.skip(NO_PACKING)
    torch.manual_seed(0)
    bf16 = torch.bfloat16

    def frozen(i, o):
        return nn.Linear(i, o).to(bf16).requires_grad_(False)

    merged = LinearWithLoRA(frozen(64, 96), rank=2, alpha=4)
    nn.init.normal_(merged.lora.B)
    merged = merge_for_good(nn.Sequential(merged))[0]
    unmerged = LinearWithLoRA(frozen(64, 64), rank=2, alpha=4)
    nn.init.normal_(unmerged.lora.B)

    def model():
        return nn.Sequential(
            copy.deepcopy(merged), nn.GELU(approximate="tanh"),
            frozen(96, 64), nn.GELU(),
            copy.deepcopy(unmerged), nn.GELU(approximate="tanh"),
            nn.Linear(64, 64), nn.GELU(approximate="tanh"))

    torch.manual_seed(1)
    want_model, got_model = model(), model()
    got_model.load_state_dict(want_model.state_dict())
    packed.pack_linears(want_model)
    fuse_gelu(packed.pack_linears(got_model))
    assert [type(m).__name__ for m in got_model][1::2] == [
        "Identity", "Identity", "GELU", "GELU"]
    assert [got_model[0].gelu_approximate, got_model[2].gelu_approximate] == ["tanh", "none"]
    x = torch.randn(9, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=bf16):
        torch.testing.assert_close(got_model(x), want_model(x), atol=2 ** -5, rtol=2 ** -6)

    shared = packed.pack_linears(nn.Sequential(frozen(64, 64)))[0]
    twice = nn.Sequential(nn.Sequential(shared, nn.GELU()), nn.Sequential(shared))
    fuse_gelu(twice)  # the GELU would follow `shared` into the second Sequential too
    assert type(twice[0][1]) is nn.GELU and shared.gelu_approximate is None

    monkeypatch.setattr(inference, "can_fuse_gelu", lambda approximate, dtype: False)
    kept = fuse_gelu(packed.pack_linears(model()))
    assert [type(m).__name__ for m in kept][1::2] == ["GELU"] * 4


def test_private_onednn_ops_missing_cost_speed_not_results(trained_like, monkeypatch):
    """Where a torch release lacks the private ops PackedLinear uses, bf16 inference
    takes autocast's Linear: no crash, and the same scores within bf16 rounding."""
    ids = batch_mates_case(trained_like)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    fp32 = predict_logits(merged_for_inference(copy.deepcopy(trained_like)), ids, 0, 64, cpu)
    for missing in ("_reorder_linear_weight", "_linear_pointwise"):
        real = packed.mkldnn_op
        monkeypatch.setattr(packed, "mkldnn_op",
                            lambda name, gone=missing, real=real: None if name == gone
                            else real(name))
        packed.can_pack_bf16.cache_clear()
        try:
            merged = merged_for_inference(copy.deepcopy(trained_like), bf16)
            assert not any(isinstance(m, PackedLinear) for m in merged.modules())
            got = predict_logits(merged, ids, 0, 64, cpu, bf16)
        finally:
            monkeypatch.undo()
            packed.can_pack_bf16.cache_clear()
        np.testing.assert_allclose(got, fp32, atol=bf16_kernel_bound(trained_like, fp32),
                                   rtol=0)


def test_merged_inference_keeps_the_head_in_fp32(trained_like):
    """The head's logits are not rounded to bf16: values off bf16's grid appear."""
    ids = batch_mates_case(trained_like)[:8]
    merged = merged_for_inference(copy.deepcopy(trained_like), torch.bfloat16)
    logits = predict_logits(merged, ids, 0, 8, torch.device("cpu"), torch.bfloat16)
    as_bf16 = torch.from_numpy(logits).to(torch.bfloat16).float().numpy()
    assert (logits != as_bf16).any()


def test_merged_bf16_inference_agrees_with_the_trained_model(trained_like):
    rng = np.random.default_rng(0)
    vocab = trained_like.cfg.vocab_size
    ids = [rng.integers(1, vocab, size=n).tolist() for n in rng.integers(1, 30, size=12)]
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    want = predict_logits(trained_like, ids, 0, 4, cpu, bf16)
    merged = merged_for_inference(trained_like, bf16)
    assert any(isinstance(m, PackedLinear) for m in merged.modules()) == can_pack_bf16()
    got = predict_logits(merged, ids, 0, 4, cpu, bf16)
    np.testing.assert_allclose(got, want, atol=0.05, rtol=0)


@pytest.mark.parametrize("field, value, message", [
    ("rank", 10**9, r"rank must be an integer in \[1, 32\]"),
    ("rank", 0, "rank must be"),
    ("alpha", -1.0, "alpha must be a positive number"),
    ("dropout", 1.0, r"dropout must lie in \[0, 1\)"),
    ("targets", ["query", "c_attn"], "targets must be a non-empty subset"),
    ("targets", [["query"]], r"targets must be a non-empty subset .*, got \(\['query'\],\)"),
    ("targets", ["query", "query"], "targets must be a non-empty subset .* each named once"),
    ("num_classes", 2.0, r"num_classes must be an integer in \[2, 65536\]"),
    ("pad_id", True, "pad_id must be a token id"),
    ("base_sha256", {"config.json": 5}, "base_sha256 must be null or map file names to"),
    ("num_classes", 1, r"num_classes must be an integer in \[2, 65536\]"),
    ("classes", ["ham", "ham"], r"classes must be null or name each of num_classes"),
    ("classes", ["a", "b", "c"], r"classes must be null or name each of num_classes"),
    ("positive", "eggs", r"positive must be null or, for two classes, one of them"),
    ("max_length", 10**6, r"max_length must be an integer in \[1, 256\]"),
    ("pad_id", -1, "pad_id must be a token id"),
    ("init", "xavier", "init must be one of"),
])
def test_crafted_adapter_metadata_is_refused_before_anything_is_built(
        trained_like, tmp_path, field, value, message):
    import json

    path = tmp_path / "a.safetensors"
    save_adapter(trained_like, tiny_spec(trained_like), path)
    tensors = load_file(path)
    meta = json.loads(tiny_spec(trained_like).to_metadata()["spamlora"])
    meta["spec"][field] = value
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"spamlora": json.dumps(meta)})
    with pytest.raises(AdapterError, match=f"bad.safetensors: adapter metadata {message}"):
        read_adapter(tmp_path / "bad.safetensors")


def test_tensor_shapes_are_checked_against_the_spec_before_building(trained_like, tmp_path):
    spec = tiny_spec(trained_like)
    path = tmp_path / "a.safetensors"
    save_adapter(trained_like, spec, path)
    tensors = load_file(path)
    name = "trf_blocks.1.att.W_value.lora.A"
    tensors[name] = torch.zeros(32, 5)
    save_file(tensors, tmp_path / "bad.safetensors", metadata=spec.to_metadata())
    with pytest.raises(AdapterError, match=rf"'{name}' has shape \(32, 5\), its metadata "
                                           r"implies \(32, 4\)"):
        read_adapter(tmp_path / "bad.safetensors")
    del tensors[name]
    save_file(tensors, tmp_path / "gone.safetensors", metadata=spec.to_metadata())
    with pytest.raises(AdapterError, match="missing"):
        read_adapter(tmp_path / "gone.safetensors")


def test_loading_leaves_the_callers_random_generator_alone(tiny_gpt2, trained_like,
                                                          tmp_path):
    save_adapter(trained_like, tiny_spec(trained_like), tmp_path / "a.safetensors")
    torch.manual_seed(42)
    before = torch.random.get_rng_state()
    load_classifier(tiny_gpt2, tmp_path / "a.safetensors")
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_base_with_other_weights_warns_or_with_strict_is_refused(tiny_gpt2, trained_like,
                                                                   tmp_path, caplog):
    import dataclasses
    import shutil

    from spamlora.weights import base_fingerprint

    spec = dataclasses.replace(tiny_spec(trained_like),
                               base_sha256=base_fingerprint(tiny_gpt2))
    save_adapter(trained_like, spec, tmp_path / "a.safetensors")
    _, loaded = load_classifier(tiny_gpt2, tmp_path / "a.safetensors", strict=True)
    assert loaded.base_sha256 == spec.base_sha256
    other = make_hf_gpt2(tmp_path / "other", seed=9)  # same shape, other weights
    shutil.copy(tiny_gpt2 / "config.json", other / "config.json")
    with caplog.at_level("WARNING"):
        load_classifier(other, tmp_path / "a.safetensors")
    assert "model.safetensors has sha256" in caplog.text
    with pytest.raises(AdapterError, match=r"other/model\.safetensors has sha256 [0-9a-f]{64}"
                                           r", but .* was trained on"):
        load_classifier(other, tmp_path / "a.safetensors", strict=True)


def test_an_adapter_from_before_init_was_recorded_reads_as_textbook(trained_like, tmp_path):
    """Those were all trained with the textbook init: the record stays true."""
    import json

    path = tmp_path / "a.safetensors"
    spec = tiny_spec(trained_like)
    save_adapter(trained_like, spec, path)
    meta = json.loads(spec.to_metadata()["spamlora"])
    del meta["spec"]["init"]
    save_file(load_file(path), tmp_path / "old.safetensors",
              metadata={"spamlora": json.dumps(meta)})
    assert spec.init == "reference"
    assert read_adapter(tmp_path / "old.safetensors")[0].init == "textbook"


@pytest.mark.parametrize("field, value, message", [
    ("n_layers", 10**12, r"base_config\.n_layers must be an integer in \[1, 256\]"),
    ("emb_dim", 2**40, r"base_config\.emb_dim must be an integer in \[1, 16384\]"),
    ("vocab_size", 2**40, r"base_config\.vocab_size must be an integer in \[1, 1048576\]"),
    ("n_layers", 2.0, r"base_config\.n_layers must be an integer"),
    ("n_heads", True, r"base_config\.n_heads must be an integer"),
    ("context_length", "256", r"base_config\.context_length must be an integer"),
    ("layer_norm_eps", "1e-5", r"base_config\.layer_norm_eps must be a number"),
    ("drop_rate", None, r"base_config\.drop_rate must lie in \[0, 1\)"),
    ("n_positions", 256, r"base_config has unknown field\(s\), got \['n_positions'\]"),
])
def test_crafted_base_config_is_refused_before_anything_is_sized_by_it(
        trained_like, tmp_path, monkeypatch, field, value, message):
    """A huge size fails at once: nothing is looped over or allocated by it first."""
    import json

    def never(spec):
        raise AssertionError(f"tensor_shapes ran for {spec.base_config}")

    path = tmp_path / "a.safetensors"
    save_adapter(trained_like, tiny_spec(trained_like), path)
    meta = json.loads(tiny_spec(trained_like).to_metadata()["spamlora"])
    meta["spec"]["base_config"][field] = value
    save_file(load_file(path), tmp_path / "bad.safetensors",
              metadata={"spamlora": json.dumps(meta)})
    monkeypatch.setattr(AdapterSpec, "tensor_shapes", never)
    with pytest.raises(AdapterError, match=f"bad.safetensors: adapter metadata {message}"):
        read_adapter(tmp_path / "bad.safetensors")


def data_region(path):
    """Where a safetensors file's tensor bytes start: after the 8-byte header length and
    the JSON header."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_an_adapter_with_flipped_tensor_bytes_is_refused(tiny_gpt2, trained_like, tmp_path,
                                                        caplog):
    path = tmp_path / "a.safetensors"
    save_adapter(trained_like, tiny_spec(trained_like), path)
    with caplog.at_level("WARNING"):
        read_adapter(path)  # intact: loads, and says nothing
    assert "digest" not in caplog.text
    start = data_region(path)
    data = bytearray(path.read_bytes())
    middle = (start + len(data)) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    with pytest.raises(AdapterError, match=r"flipped\.safetensors: damaged: its tensors "
                                           r"have sha256 [0-9a-f]{64}, not the"):
        read_adapter(tmp_path / "flipped.safetensors")
    with pytest.raises(AdapterError, match="damaged"):
        load_classifier(tiny_gpt2, tmp_path / "flipped.safetensors")


def test_an_adapter_saved_before_digests_loads_with_a_warning(trained_like, tmp_path,
                                                              caplog):
    import json

    spec = tiny_spec(trained_like)
    path = tmp_path / "a.safetensors"
    save_adapter(trained_like, spec, path)
    meta = json.loads(spec.to_metadata()["spamlora"])
    assert "tensors_sha256" not in meta  # the metadata such adapters carry
    save_file(load_file(path), tmp_path / "old.safetensors",
              metadata={"spamlora": json.dumps(meta)})
    with caplog.at_level("WARNING"):
        old_spec, tensors = read_adapter(tmp_path / "old.safetensors")
    assert old_spec == spec and set(tensors) == set(load_file(path))
    assert "old.safetensors: carries no digest of its tensors" in caplog.text
    meta["tensors_sha256"] = "not a digest"
    save_file(load_file(path), tmp_path / "bad.safetensors",
              metadata={"spamlora": json.dumps(meta)})
    with pytest.raises(AdapterError, match="tensors_sha256 must be a sha256 hex digest"):
        read_adapter(tmp_path / "bad.safetensors")


def test_a_damaged_base_is_refused_by_load_classifier_and_the_predictor(tiny_gpt2, adapter,
                                                                        tmp_path):
    from spamlora.predictor import Predictor
    from spamlora.weights import DamagedBaseError


    base = downloaded(tiny_gpt2, tmp_path / "base")
    load_classifier(base, adapter)  # the weights' digest is now cached
    flip_bytes(base / "model.safetensors")
    message = r"base/model\.safetensors: damaged: .* `dvc checkout "
    with pytest.raises(DamagedBaseError, match=message):
        load_classifier(base, adapter)
    with pytest.raises(DamagedBaseError, match=message):
        Predictor(base, adapter, precision="fp32")


def test_strict_rehashes_the_base_and_catches_a_flip_that_kept_the_mtime(tiny_gpt2, adapter,
                                                                         tmp_path):
    from spamlora.predictor import Predictor
    from spamlora.weights import DamagedBaseError


    base = downloaded(tiny_gpt2, tmp_path / "base")
    Predictor(base, adapter, precision="fp32")
    flip_bytes(base / "model.safetensors", keep_mtime=True)
    with pytest.raises(DamagedBaseError, match=r"base/model\.safetensors: damaged"):
        Predictor(base, adapter, precision="fp32", strict=True)
