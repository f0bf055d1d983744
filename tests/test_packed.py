"""Frozen bf16 Linears pre-packed for oneDNN (inference): packed once, on first use, and
Q, K and V read through one joint product with the outputs each gives alone."""

import pytest
import torch
from torch import nn

from spamlora import packed
from spamlora.model import project
from spamlora.packed import PackedLinear, can_pack_bf16, pack_linears

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


def test_no_gradient_is_asked_of_a_packed_layer():
    layer = PackedLinear(frozen_bf16_linear())
    with pytest.raises(RuntimeError, match="no gradient"):
        layer(torch.randn(3, 64, requires_grad=True))
    with torch.no_grad():
        assert layer(torch.randn(3, 64, requires_grad=True)).shape == (3, 96)


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
