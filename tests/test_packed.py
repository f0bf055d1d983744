"""Frozen bf16 Linears (and, for scoring, fp32 ones) pre-packed for oneDNN: packed when
made, holding no plain copy, and Q, K and V stored together read as parts of one joint
product with the outputs each gives alone; in training, the input's gradient from a
packed transpose, the plain weights let go while packed, and the model's own Linears
back after with their weights bit for bit."""

import contextlib
import gc
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from spamlora import packed
from spamlora.model import project, stored_together
from spamlora.packed import (
    PackedLinear,
    PackedPart,
    can_fuse_gelu,
    can_pack_bf16,
    pack_linears,
    packed_for_training,
)

pytestmark = pytest.mark.skipif(
    not can_pack_bf16(), reason="oneDNN cannot pre-pack bf16 weights on this CPU (needs "
    "AVX-512 BW/VL/DQ, and ONEDNN_MAX_CPU_ISA not capped below AVX512_CORE)")


def same_bits(a, b):
    """Bit for bit (`torch.equal` takes -0.0 for 0.0)."""
    ints = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(ints),
                                                                     b.view(ints))


def frozen_bf16_linear(in_dim=64, out_dim=96, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_dim, out_dim).to(torch.bfloat16).requires_grad_(False)


def test_a_packed_layer_holds_its_weight_packed_and_gives_it_back_bit_for_bit():
    linear = frozen_bf16_linear()
    layer = PackedLinear.of(linear)
    assert same_bits(layer.dense_weight(), linear.weight)
    assert not hasattr(layer, "weight")
    memory = StorageWeakRef(linear.weight.untyped_storage())
    del linear
    gc.collect()
    assert memory.expired()  # no plain copy, nor a view of it, kept


def store_together(linears):
    """The Linears with their weights and biases one after another in one tensor, as
    `GPTModel.store_qkv_together` lays out Q, K and V."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            params = [getattr(linear, name) for linear in linears]
            joint = torch.cat(params)
            for p, part in zip(params, joint.split([len(p) for p in params]), strict=True):
                p.data = part
    return linears


def test_layers_stored_together_are_packed_as_parts_of_one_joint_layer():
    """Q, K and V stored together become parts of one packed layer: `project` reads them
    through it, each alone gives its columns of it, and a subset or another order is
    computed from their weights instead, with the same outputs."""
    linears = store_together([frozen_bf16_linear(64, n, seed)
                               for seed, n in enumerate((64, 32, 48))])
    model = nn.Sequential(*linears)
    pack_linears(model)
    parts = list(model)
    assert all(type(part) is PackedPart for part in parts)
    joint = parts[0].joint
    assert all(part.joint is joint for part in parts) and joint.out_features == 144
    assert PackedLinear.together(parts) is joint
    x = torch.randn(2, 5, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = [linear(x) for linear in linears]
        alone = [part(x) for part in parts]
        for outputs in (project(x, parts), alone):
            for got, expected in zip(outputs, want, strict=True):
                assert got.shape == expected.shape
                torch.testing.assert_close(got, expected, atol=2 ** -5, rtol=2 ** -7)
        for subset in ([parts[1], parts[2]], [parts[2], parts[1], parts[0]]):
            assert PackedLinear.together(subset) is not joint
            for got, expected in zip(project(x, subset), [part(x) for part in subset],
                                     strict=True):
                torch.testing.assert_close(got, expected, atol=2 ** -5, rtol=2 ** -7)
    with torch.no_grad():  # (inference mode tracks no views)
        # its own tensor, not a view: LoRA adds to it in place (one row's slice too)
        assert all(part(rows)._base is None
                   for part in parts for rows in (torch.randn(1, 64), torch.randn(4, 64)))
    for part, linear in zip(parts, linears, strict=True):
        assert same_bits(part.dense_weight(), linear.weight)
        assert torch.equal(part.bias, linear.bias)


def test_a_part_alone_gives_the_input_gradient_of_its_linear():
    linears = store_together([frozen_bf16_linear(64, n, seed)
                              for seed, n in enumerate((64, 32))])
    parts = PackedPart.split(linears)
    g = torch.randn(5, 32)
    got_x, want_x = torch.randn(5, 64).requires_grad_(), None
    want_x = got_x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (parts[1](got_x).float() * g).sum().backward()
        (linears[1](want_x).float() * g).sum().backward()
    torch.testing.assert_close(got_x.grad, want_x.grad, atol=2 ** -5, rtol=2 ** -7)


def test_packing_for_inference_lets_go_of_the_plain_weights():
    linears = store_together([frozen_bf16_linear(64, 64, seed) for seed in range(3)])
    model = nn.Sequential(*linears, frozen_bf16_linear(64, 16))
    memory = [StorageWeakRef(linear.weight.untyped_storage()) for linear in model]
    del linears
    pack_linears(model)
    gc.collect()
    assert all(m.expired() for m in memory)


def test_project_computes_q_k_v_together_as_each_alone():
    """`model.project` reads PackedLinears stored apart side by side through one joint
    product, packed once from their weights and kept by the first layer: the outputs
    each layer gives alone."""
    layers = [PackedLinear.of(frozen_bf16_linear(64, 64, seed)) for seed in range(3)]
    x = torch.randn(2, 7, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        joint = project(x, layers)
        again = project(x, layers)
        alone = [layer(x) for layer in layers]
    for a, b, c in zip(joint, again, alone, strict=True):
        assert a.shape == (2, 7, 64)
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=2 ** -6, rtol=2 ** -7)
    assert len(layers[0]._joint) == 1
    for layer in layers[1:]:
        assert not layer._joint


def test_only_frozen_bf16_and_fp32_cpu_linears_are_packed(monkeypatch):
    """For scoring: frozen bf16 Linears, and fp32 ones where `can_pack_fp32` (oneDNN
    computes fp32 with AVX-512); none that trains, none of another dtype; none of a
    dtype oneDNN cannot pack here."""
    def model():
        return nn.Sequential(frozen_bf16_linear(), nn.Linear(96, 8),  # trained, fp32
                             nn.Linear(8, 8).to(torch.bfloat16),  # bf16 but trained
                             nn.Linear(8, 8).requires_grad_(False),  # frozen, fp32
                             nn.Linear(8, 8).double().requires_grad_(False))  # fp64

    for bf16, fp32 in ((True, packed.can_pack_fp32()), (True, False), (False, True)):
        monkeypatch.setattr(packed, "can_pack_bf16", lambda bf16=bf16: bf16)
        monkeypatch.setattr(packed, "can_pack_fp32", lambda fp32=fp32: fp32)
        layers = model()
        kept = [layers[1], layers[2], layers[4]]
        pack_linears(layers)
        assert [type(m) is PackedLinear for m in layers] == [bf16, False, False, fp32, False]
        assert [layers[1], layers[2], layers[4]] == kept


def test_fp32_is_packed_only_where_onednn_computes_it_with_avx512(monkeypatch):
    """With AVX2 only, a whole message scored ~4% slower from packed fp32 weights than
    from MKL's plain product (benchmarks/README.md): there nothing fp32 is packed."""
    monkeypatch.setattr(packed, "cpu_computes_fp32_with_avx512", lambda: False)
    # Asked afresh (not from the cache, which stays as it was for the other tests).
    monkeypatch.setattr(packed, "can_pack_fp32", packed.can_pack_fp32.__wrapped__)
    assert not packed.can_pack_fp32()
    model = pack_linears(nn.Sequential(nn.Linear(8, 8).requires_grad_(False)))
    assert type(model[0]) is nn.Linear


@pytest.mark.skipif(not packed.can_pack_fp32(), reason="oneDNN computes fp32 without "
                    "AVX-512 here: fp32 weights are not packed")
def test_packed_fp32_scoring_fuses_gelu():
    """Where fp32 is packed, oneDNN's fused GELU passes fp32's check, both forms: else
    scoring would quietly run GELU alone."""
    assert can_fuse_gelu("tanh", torch.float32) and can_fuse_gelu("none", torch.float32)


@pytest.mark.skipif(not packed.can_pack_fp32(), reason="oneDNN computes fp32 without "
                    "AVX-512 here: fp32 weights are not packed")
@pytest.mark.parametrize("rows", [5, 3 * PackedLinear.PACKED_MAX_ROWS + 7])
@pytest.mark.parametrize("gelu", [None, "tanh"])
def test_a_packed_fp32_layer_gives_the_linears_output_in_one_call(rows, gelu, monkeypatch):
    """fp32, for scoring: the plain Linear's output (then GELU's) to fp32's precision,
    past PACKED_MAX_ROWS too, in one call, not in chunks (in fp32 they cost more than
    they save)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 96).requires_grad_(False)
    layer = PackedLinear.of(linear)
    layer.gelu_approximate = gelu
    calls = []
    product = layer._product
    monkeypatch.setattr(layer, "_product", lambda *a: calls.append(len(a[0])) or product(*a))
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        got, want = layer(x), linear(x)
    if gelu:
        want = F.gelu(want, approximate=gelu)
    assert got.dtype == torch.float32 and calls == [rows]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_training_packs_no_fp32_linear(monkeypatch):
    """fp32 training keeps its plain weights, even where scoring packs fp32: packed ones
    would add ~0.34 GB of peak RSS (a packed copy and a packed transpose), and what they
    save a step is not measured where fp32 packs (benchmarks/README.md)."""
    monkeypatch.setattr(packed, "can_pack_fp32", lambda: True)
    model = nn.Sequential(frozen_bf16_linear(), nn.Linear(96, 8).requires_grad_(False))
    with packed_for_training(model):
        assert [type(m) for m in model] == [PackedLinear, nn.Linear]


def test_packing_lets_each_plain_weight_go_before_packing_the_next(monkeypatch):
    """Scoring's peak memory: a plain weight is let go as soon as its packed copy has
    replaced it, not after all are packed (all plain weights beside all packed copies
    raised scoring's peak RSS by 0.19 GB for GPT-2 124M in fp32)."""
    model = nn.Sequential(*[frozen_bf16_linear(64, 64, seed) for seed in range(3)])
    plain = [StorageWeakRef(linear.weight.untyped_storage()) for linear in model]
    let_go_before = []
    real = packed._packed

    def packing(group):
        let_go_before.append(sum(weight.expired() for weight in plain))
        return real(group)

    monkeypatch.setattr(packed, "_packed", packing)
    gc.disable()  # let go by reference counts alone, not by a collection in between
    try:
        pack_linears(model)
    finally:
        gc.enable()
    assert let_go_before == [0, 1, 2]
    assert all(weight.expired() for weight in plain)


def test_a_packed_layer_refuses_a_merge_rather_than_go_stale():
    """Folding LoRA into a packed Linear's weight would leave the packed copy stale: with
    no `weight` to change, it fails loudly."""
    from spamlora.lora import LinearWithLoRA

    layer = LinearWithLoRA(frozen_bf16_linear(), rank=2, alpha=4)
    model = nn.Sequential(layer)
    pack_linears(model)
    assert isinstance(layer.linear, PackedLinear)
    with pytest.raises(AttributeError, match="weight"):
        layer.merge()


@pytest.mark.parametrize("rows", [5, PackedLinear.PACKED_MAX_ROWS + 7])
def test_a_packed_layer_gives_the_linears_output_and_input_gradient(rows):
    """The bf16 product and input gradient the Linear gives under autocast, within a
    bf16 rounding step (oneDNN blocks a packed weight its own way), also past
    PACKED_MAX_ROWS (chunks); no gradient for the frozen weight; the output is the
    product itself, not a view (LoRA adds to it in place: `LinearWithLoRA.add_updates`)."""
    linear = frozen_bf16_linear(64, 96)
    layer = PackedLinear.of(linear)
    x = torch.randn(rows, 64)
    g = torch.randn(rows, 96)
    got_x, want_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = layer(got_x), linear(want_x)
    assert got.dtype == want.dtype == torch.bfloat16 and got._base is None
    (got.float() * g).sum().backward()
    (want.float() * g).sum().backward()
    torch.testing.assert_close(got, want, atol=2 ** -5, rtol=2 ** -7)
    torch.testing.assert_close(got_x.grad, want_x.grad, atol=2 ** -5, rtol=2 ** -7)
    assert got_x.grad.dtype == torch.float32
    assert linear.weight.grad is None and linear.bias.grad is None
    assert torch.equal(layer._packed_transpose.to_dense(), linear.weight.T)
    with torch.no_grad():
        assert layer(x).shape == (rows, 96)
        assert layer(x.view(1, rows, 64)).shape == (1, rows, 96)


def gelu_of_identity_product(approximate, rows=100, width=64):
    """A packed identity product with GELU fused in, of inputs it sums exactly: what it
    gives, and each GELU of the same inputs in fp32."""
    x = torch.linspace(-6, 6, rows * width).to(torch.bfloat16).view(rows, width)
    layer = PackedLinear(torch.eye(width, dtype=torch.bfloat16),
                         torch.zeros(width, dtype=torch.bfloat16))
    layer.gelu_approximate = approximate
    with torch.inference_mode():
        got = layer(x)
    return got, {a: F.gelu(x.float(), approximate=a) for a in ("tanh", "none")}


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_a_product_with_gelu_fused_in_gives_the_gelu_of_its_fp32_sum(approximate):
    """Rounded to bf16 once, after GELU (half a rounding step: 2**-8 of the value), and
    GELU(tanh) told from GELU(erf), which are further apart than that below about -2.5
    (2.8% there, 10% at -3)."""
    assert can_fuse_gelu(approximate)
    got, want = gelu_of_identity_product(approximate)
    other = {"tanh": "none", "none": "tanh"}[approximate]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want[approximate], atol=1e-6,
                               rtol=2 ** -8 * (1 + 2 ** -10))
    assert not torch.allclose(got.float(), want[other], atol=1e-6, rtol=2 ** -8)


@pytest.mark.parametrize("rows", [5, PackedLinear.PACKED_MAX_ROWS + 7])
def test_a_product_with_gelu_fused_in_is_the_linear_then_gelu_within_rounding(rows):
    """Also in chunks, with a bias: autocast's Linear then GELU within the tolerance the
    packed product alone is held to (oneDNN blocks a packed weight its own way), and on
    average nearer the fp32 Linear then GELU than that is."""
    linear = frozen_bf16_linear(64, 96)
    layer = PackedLinear.of(linear)
    layer.gelu_approximate = "tanh"
    x = torch.randn(rows, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, alone = layer(x), F.gelu(linear(x), approximate="tanh")
    exact = F.gelu(x.to(torch.bfloat16).float() @ linear.weight.float().T
                   + linear.bias.float(), approximate="tanh")
    torch.testing.assert_close(got, alone, atol=2 ** -5, rtol=2 ** -7)
    assert (got.float() - exact).abs().mean() < (alone.float() - exact).abs().mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fusing_gelu_is_refused_where_onednn_would_compute_the_other_form(monkeypatch,
                                                                         dtype):
    """The check behind `can_fuse_gelu` tells GELU(tanh) from GELU(erf) in bf16 and in
    fp32: an op that ignored the form asked for (here: always erf) is not used."""
    real = packed.mkldnn_op("_linear_pointwise")

    def erf_only(x, w, b, attr, scalars, algorithm):
        return real(x, w, b, attr, scalars, "none")

    monkeypatch.setattr(packed, "mkldnn_op", lambda name: erf_only if name ==
                        "_linear_pointwise" else getattr(torch.ops.mkldnn, name))
    packed.can_fuse_gelu.cache_clear()
    try:
        assert packed.can_fuse_gelu("none", dtype)
        assert not packed.can_fuse_gelu("tanh", dtype)
    finally:
        packed.can_fuse_gelu.cache_clear()


def test_a_layer_computing_gelu_in_its_product_is_not_joined_with_others():
    layers = [PackedLinear.of(frozen_bf16_linear(64, 64, seed)) for seed in range(2)]
    layers[1].gelu_approximate = "tanh"
    assert "then GELU(approximate='tanh')" in repr(layers[1])
    with pytest.raises(ValueError, match="GELU"):
        PackedLinear.together(layers)


def test_a_product_with_gelu_fused_in_refuses_a_backward():
    layer = PackedLinear.of(frozen_bf16_linear())
    layer.gelu_approximate = "tanh"
    with pytest.raises(RuntimeError, match="no backward"):
        layer(torch.randn(3, 64, dtype=torch.bfloat16, requires_grad=True))


def test_a_trained_linear_is_not_packed():
    with pytest.raises(ValueError, match="frozen"):
        PackedLinear.of(nn.Linear(4, 4).to(torch.bfloat16))


def test_training_packs_frozen_linears_and_gives_the_models_own_back_however_it_ends():
    """Inside `packed_for_training` the frozen bf16 Linears are packed (LoRA's stay
    wrapped around them; Linears stored together as parts of one joint layer) and the
    Linears' plain weights are let go; after it, returned or raised, the very Linear
    objects are back with bit-identical weights, stored as they were, so `lora.merge` and
    saving see the model as it was."""
    from spamlora.lora import LinearWithLoRA

    adapted = LinearWithLoRA(frozen_bf16_linear(64, 64), rank=2, alpha=4)
    qkv = store_together([frozen_bf16_linear(64, 64, seed) for seed in range(1, 4)])
    model = nn.Sequential(adapted, *qkv, frozen_bf16_linear(64, 32), nn.Linear(32, 2))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    linears = [adapted.linear, *model[1:5]]

    def forward(x):
        h = model[0](x)
        return model[5](model[4](sum(project(h, list(model[1:4])))))

    for raised in (False, True):
        with pytest.raises(KeyError) if raised else contextlib.nullcontext():
            with packed_for_training(model):
                assert type(adapted.linear) is PackedLinear and type(model[4]) is PackedLinear
                assert all(type(m) is PackedPart for m in model[1:4])
                assert type(model[5]) is nn.Linear  # trained: not packed
                assert all(linear.weight.numel() == 0 for linear in linears)  # let go
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    forward(torch.randn(3, 64)).float().sum().backward()
                if raised:
                    raise KeyError("stopped")
        assert [adapted.linear, *model[1:5]] == linears
        state = model.state_dict()
        assert state.keys() == before.keys()
        assert all(same_bits(state[k], v) for k, v in before.items()
                   if not k.startswith(("0.lora", "5.")))
        assert stored_together([linear.weight for linear in qkv])
    assert adapted.lora.B.grad is not None and model[5].weight.grad is not None


def test_training_keeps_a_plain_weight_its_packed_copy_would_not_give_back(monkeypatch):
    """A weight is let go only where the packed copy gives it back bit for bit: were a
    torch release's round trip not exact, the plain weights stay, untouched."""
    linear = frozen_bf16_linear(64, 64)
    model = nn.Sequential(linear)
    before = linear.weight.clone()
    real = PackedLinear.dense_weight
    monkeypatch.setattr(PackedLinear, "dense_weight",
                        lambda self: real(self) + torch.finfo(torch.bfloat16).eps)
    with packed_for_training(model):
        assert type(model[0]) is PackedLinear
        assert same_bits(linear.weight, before)  # kept
    assert model[0] is linear and same_bits(linear.weight, before)


def test_training_lets_go_of_the_joint_products_it_made():
    """Q, K and V's joint product is kept by the first layer, under a key holding that
    layer: after the block nothing keeps it (no cycle left for the collector)."""
    model = nn.Sequential(*(frozen_bf16_linear(64, 64, seed) for seed in range(3)))
    with packed_for_training(model):
        first = model[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            project(torch.randn(3, 64, requires_grad=True), list(model))
        assert len(first._joint) == 1
    assert not first._joint and type(model[0]) is nn.Linear


def test_layers_with_and_without_a_bias_are_not_joined():
    """A joint product has one bias for all its outputs or none: a layer without one
    among others with one is computed apart, not given the others' or lose its own."""
    linear = frozen_bf16_linear(64, 64, 0)
    with torch.no_grad():
        linear.bias.fill_(5.0)
    with_bias = PackedLinear.of(linear)
    without = PackedLinear.of(nn.Linear(64, 64, bias=False).to(torch.bfloat16)
                           .requires_grad_(False))
    x = torch.randn(2, 3, 64)
    with torch.inference_mode():
        got = project(x, [with_bias, without])
        want = [with_bias(x), without(x)]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="bias"):
        PackedLinear.together([with_bias, without])


def test_training_keeps_a_weight_another_module_also_uses():
    """A Linear's weight tied to another module's (GPT-2's head and token embedding) is
    not let go while packed: the other module reads it as before."""
    embedding = nn.Embedding(96, 64).to(torch.bfloat16).requires_grad_(False)
    head = nn.Linear(64, 96, bias=False).to(torch.bfloat16).requires_grad_(False)
    head.weight = embedding.weight
    model = nn.Sequential(embedding, head)
    before = embedding.weight.clone()
    with packed_for_training(model):
        assert type(model[1]) is PackedLinear
        assert torch.equal(model[0](torch.tensor([3, 5])), before[[3, 5]])
    assert model[1] is head and head.weight is embedding.weight
    assert same_bits(embedding.weight, before)


def test_training_keeps_a_weight_whose_memory_another_tensor_holds():
    """Tied by sharing memory rather than the Parameter: kept too."""
    embedding = nn.Embedding(96, 64).to(torch.bfloat16).requires_grad_(False)
    head = nn.Linear(64, 96, bias=False).to(torch.bfloat16).requires_grad_(False)
    head.weight = nn.Parameter(embedding.weight.data, requires_grad=False)
    model = nn.Sequential(embedding, head)
    with packed_for_training(model):
        assert head.weight.numel() == 96 * 64
    assert head.weight.untyped_storage().data_ptr() == \
        embedding.weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("group", [1, 3])
def test_training_keeps_weights_whose_memory_a_buffer_also_holds(group):
    """A buffer viewing a weight's memory (of a Linear alone, or of Q, K and V stored
    together) keeps the weight, or the whole group, as it is."""
    linears = [frozen_bf16_linear(64, 64, seed) for seed in range(group)]
    if group > 1:
        store_together(linears)
    model = nn.Sequential(*linears)
    model.register_buffer("view", linears[-1].weight.detach()[:2])
    before = [linear.weight.clone() for linear in linears]
    with packed_for_training(model):
        assert type(model[0]) in (PackedLinear, PackedPart)
        assert all(linear.weight.numel() == 64 * 64 for linear in linears)
    assert all(same_bits(linear.weight, b) for linear, b in zip(linears, before, strict=True))


def test_a_group_that_cannot_be_given_back_keeps_its_packed_layers(monkeypatch):
    """Rebuilding a weight failed (say, out of memory): that group keeps its packed
    layers, which compute what its Linears did; every other Linear is given back all the
    same, and the error is raised."""
    model = nn.Sequential(frozen_bf16_linear(64, 64, 0), frozen_bf16_linear(64, 64, 1))
    first = model[0]  # given back after the last group's failure (last in, first out)
    before = first.weight.clone()
    x = torch.randn(3, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model[1](x)
    real = packed._dense

    def dense(layers):
        if layers[0] is failing:
            raise MemoryError("rebuilding the weight")
        return real(layers)

    with pytest.raises(MemoryError):
        with packed_for_training(model):
            failing = model[1]
            monkeypatch.setattr(packed, "_dense", dense)
    assert model[1] is failing and type(failing) is PackedLinear
    assert model[0] is first and same_bits(first.weight, before)
    with torch.inference_mode():
        torch.testing.assert_close(model[1](x), want, atol=2 ** -5, rtol=2 ** -7)


def test_bit_for_bit_tells_negative_zero_from_zero():
    zero = torch.zeros(4, dtype=torch.bfloat16)
    assert packed._same_bits(zero, zero.clone())
    assert not packed._same_bits(zero, -zero)


def test_a_block_never_left_does_not_abort_the_interpreter_at_exit():
    """A `packed_for_training` block abandoned (its generator never closed) ends while
    the interpreter exits: giving the weights back then would run torch ops on a torch
    half torn down, which aborts the process (SIGABRT, an internal assert)."""
    script = textwrap.dedent("""
        import contextlib, torch
        from torch import nn
        from spamlora.packed import packed_for_training
        model = nn.Sequential(nn.Linear(64, 64).to(torch.bfloat16).requires_grad_(False))
        stack = contextlib.ExitStack()
        stack.enter_context(packed_for_training(model))
        assert model[0].__class__.__name__ == "PackedLinear"
        print("left open")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "left open"
