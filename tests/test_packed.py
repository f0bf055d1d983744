"""Frozen bf16 Linears pre-packed for oneDNN: packed once, on first use, and Q, K and V
read through one joint product with the outputs each gives alone; in training, the
input's gradient from a packed transpose, and the model's own Linears back after."""

import contextlib

import pytest
import torch
from torch import nn

from spamlora import packed
from spamlora.model import project
from spamlora.packed import PackedLinear, can_pack_bf16, pack_linears, packed_for_training

pytestmark = pytest.mark.skipif(
    not can_pack_bf16(), reason="oneDNN cannot pre-pack bf16 weights on this CPU (needs "
    "AVX-512 BW/VL/DQ, and ONEDNN_MAX_CPU_ISA not capped below AVX512_CORE)")


def frozen_bf16_linear(in_dim=64, out_dim=96, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_dim, out_dim).to(torch.bfloat16).requires_grad_(False)


def test_the_weight_is_packed_once_on_first_use():
    layer = PackedLinear(frozen_bf16_linear())
    assert layer._packed is None
    with torch.inference_mode():
        layer(torch.randn(5, 64))
        first = layer._packed
        layer(torch.randn(3, 64))
    assert first is not None and layer._packed is first
    assert torch.equal(first.to_dense(), layer.original.weight)
    assert not hasattr(layer, "weight")


def test_project_computes_q_k_v_together_as_each_alone():
    """`model.project` reads PackedLinears side by side through one joint product, built
    once (from their weights as they lie, no copy where stored together): the outputs
    each layer gives alone, and the layers' own weights never packed."""
    layers = [PackedLinear(frozen_bf16_linear(64, 64, seed)) for seed in range(3)]
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


def test_only_frozen_bf16_cpu_linears_are_packed(monkeypatch):
    model = nn.Sequential(frozen_bf16_linear(), nn.Linear(96, 8),  # trained, fp32
                          nn.Linear(8, 8).to(torch.bfloat16),  # bf16 but trained
                          nn.Linear(8, 8).requires_grad_(False))  # frozen, fp32
    kept = list(model)[1:]
    pack_linears(model)
    assert type(model[0]) is PackedLinear and list(model)[1:] == kept
    unpackable = nn.Sequential(frozen_bf16_linear())
    monkeypatch.setattr(packed, "can_pack_bf16", lambda: False)
    pack_linears(unpackable)
    assert type(unpackable[0]) is nn.Linear


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
    layer = PackedLinear(linear)
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


def test_a_trained_linear_is_not_packed():
    with pytest.raises(ValueError, match="frozen"):
        PackedLinear(nn.Linear(4, 4).to(torch.bfloat16))


def test_training_packs_frozen_linears_and_gives_the_models_own_back_however_it_ends():
    """Inside `packed_for_training` the frozen bf16 Linears are PackedLinears (LoRA's
    stay wrapped around them); after it, returned or raised, the very Linear objects are
    back with their weights, so `lora.merge` and saving see the model as it was."""
    from spamlora.lora import LinearWithLoRA

    adapted = LinearWithLoRA(frozen_bf16_linear(64, 64), rank=2, alpha=4)
    model = nn.Sequential(adapted, frozen_bf16_linear(64, 32), nn.Linear(32, 2))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    linears = [adapted.linear, model[1]]
    for raised in (False, True):
        with pytest.raises(KeyError) if raised else contextlib.nullcontext():
            with packed_for_training(model):
                assert type(adapted.linear) is PackedLinear and type(model[1]) is PackedLinear
                assert type(model[2]) is nn.Linear  # trained: not packed
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model(torch.randn(3, 64)).float().sum().backward()
                if raised:
                    raise KeyError("stopped")
        assert [adapted.linear, model[1]] == linears
        state = model.state_dict()
        assert state.keys() == before.keys()
        assert all(torch.equal(state[k], v) for k, v in before.items()
                   if not k.startswith(("0.lora", "2.")))
    assert adapted.lora.B.grad is not None and model[2].weight.grad is not None


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
    with_bias = PackedLinear(frozen_bf16_linear(64, 64, 0))
    with torch.no_grad():
        with_bias.original.bias.fill_(5.0)
    without = PackedLinear(nn.Linear(64, 64, bias=False).to(torch.bfloat16)
                           .requires_grad_(False))
    x = torch.randn(2, 3, 64)
    with torch.inference_mode():
        got = project(x, [with_bias, without])
        want = [with_bias(x), without(x)]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="bias"):
        PackedLinear.together([with_bias, without])
