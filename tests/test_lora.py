"""LoRA layers: initial identity, merge, gradients, scaling, targets."""

import math

import pytest
import torch
from torch import nn

from spamlora.lora import (
    LinearWithLoRA,
    LoRALayer,
    lora_layers,
    merge,
    merge_for_good,
    replace_linear_with_lora,
    unmerge,
)
from spamlora.model import GPTConfig, GPTModel

TINY = GPTConfig(vocab_size=64, context_length=16, emb_dim=16, n_layers=2, n_heads=2)


def test_b_starts_at_zero_so_output_equals_the_frozen_linear():
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    wrapped = LinearWithLoRA(linear, rank=4, alpha=8)
    x = torch.randn(3, 5, 12)
    assert torch.equal(wrapped(x), linear(x))
    assert torch.count_nonzero(wrapped.lora.A) > 0
    bound = 1 / math.sqrt(4)  # kaiming_uniform(a=sqrt(5)) on a (12 x 4) tensor: fan_in 4
    assert wrapped.lora.A.abs().max() <= bound


def test_alpha_over_rank_scaling():
    torch.manual_seed(0)
    layer = LoRALayer(6, 5, rank=2, alpha=6)
    nn.init.normal_(layer.B)
    x = torch.randn(4, 6)
    assert layer.scaling == 3.0
    torch.testing.assert_close(layer(x), 3.0 * (x @ layer.A @ layer.B))
    wrapped = LinearWithLoRA(nn.Linear(6, 5), rank=2, alpha=6)
    wrapped.lora.load_state_dict(layer.state_dict())
    x3 = torch.randn(2, 3, 6)  # the fused path reshapes (batch, seq, in) inputs
    torch.testing.assert_close(wrapped(x3), wrapped.linear(x3) + layer(x3))
    doubled = LoRALayer(6, 5, rank=2, alpha=12)
    doubled.load_state_dict(layer.state_dict())
    torch.testing.assert_close(doubled(x), 2 * layer(x))


def test_merged_equals_unmerged_and_unmerge_restores_the_base():
    torch.manual_seed(0)
    linear = nn.Linear(16, 32)
    original = linear.weight.detach().clone()
    wrapped = LinearWithLoRA(linear, rank=4, alpha=4)
    nn.init.normal_(wrapped.lora.B)
    x = torch.randn(8, 16)
    unmerged = wrapped(x)
    wrapped.merge()
    wrapped.merge()  # idempotent
    torch.testing.assert_close(wrapped(x), unmerged, atol=1e-6, rtol=0)
    wrapped.unmerge()
    torch.testing.assert_close(linear.weight, original, atol=1e-6, rtol=0)
    torch.testing.assert_close(wrapped(x), unmerged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_adds_exactly_the_scaled_update_in_the_weights_dtype(dtype):
    """fp32 weights take one GEMM accumulating into them; others add the update cast."""
    torch.manual_seed(0)
    linear = nn.Linear(24, 40)
    wrapped = LinearWithLoRA(linear, rank=4, alpha=10)  # scaling 2.5
    nn.init.normal_(wrapped.lora.B)
    linear.to(dtype)
    expected = (linear.weight.double() + 2.5 * (wrapped.lora.A.double()
                                                @ wrapped.lora.B.double()).T)
    original = linear.weight.detach().clone()
    wrapped.merge()
    assert linear.weight.dtype == dtype
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(linear.weight.double(), expected, atol=tolerance, rtol=0)
    wrapped.unmerge()
    torch.testing.assert_close(linear.weight, original, atol=tolerance, rtol=0)


def test_whole_model_merge_matches_and_gradients_reach_only_lora_and_head():
    torch.manual_seed(0)
    model = GPTModel(TINY)
    for p in model.parameters():
        p.requires_grad_(False)
    replace_linear_with_lora(model, rank=2, alpha=2)
    model.out_head = nn.Linear(16, 2)
    for layer in lora_layers(model):
        nn.init.normal_(layer.lora.B, std=0.1)
    ids = torch.randint(0, 64, (3, 10))
    lengths = torch.tensor([10, 4, 7])
    model(ids, lengths).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters()
                         if n.endswith((".A", ".B")) or n.startswith("out_head.")}
    assert len([n for n in with_grad if n.endswith(".A")]) == 2 * 6
    with torch.no_grad():
        before = model(ids, lengths)
        merge(model)
        torch.testing.assert_close(model(ids, lengths), before, atol=1e-6, rtol=0)
        unmerge(model)
        torch.testing.assert_close(model(ids, lengths), before, atol=1e-6, rtol=0)


def test_merging_for_good_leaves_the_linears_alone_with_the_same_outputs():
    """Each LoRA layer gives way to its Linear, the update folded in: the model's output
    is the unmerged one's, and no LoRA parameter or layer is left."""
    torch.manual_seed(0)
    model = replace_linear_with_lora(GPTModel(TINY), rank=2, alpha=2)
    model.out_head = nn.Linear(16, 2)
    for layer in lora_layers(model):
        nn.init.normal_(layer.lora.B, std=0.1)
    ids = torch.randint(0, 64, (3, 10))
    lengths = torch.tensor([10, 4, 7])
    with torch.no_grad():
        before = model(ids, lengths)
        merge_for_good(model)
        torch.testing.assert_close(model(ids, lengths), before, atol=1e-6, rtol=0)
    assert not lora_layers(model)
    assert not any(n.endswith((".A", ".B")) for n, _ in model.named_parameters())
    assert type(model.trf_blocks[0].att.W_query) is nn.Linear


def test_targets_select_layers_and_the_output_head_is_never_adapted():
    model = replace_linear_with_lora(GPTModel(TINY), rank=2, alpha=2,
                                     targets=["query", "mlp_proj"])
    block = model.trf_blocks[0]
    assert isinstance(block.att.W_query, LinearWithLoRA)
    assert isinstance(block.ff.layers[2], LinearWithLoRA)
    assert isinstance(block.att.W_key, nn.Linear)
    assert isinstance(block.ff.layers[0], nn.Linear)
    assert isinstance(model.out_head, nn.Linear)
    assert len(lora_layers(model)) == 2 * TINY.n_layers
    with pytest.raises(ValueError, match="already carries LoRA"):
        replace_linear_with_lora(model, rank=2, alpha=2, targets=["query"])
    with pytest.raises(ValueError, match="unknown LoRA target"):
        replace_linear_with_lora(GPTModel(TINY), rank=2, alpha=2, targets=["c_attn"])


def test_dropout_applies_only_to_the_lora_branch_in_training():
    torch.manual_seed(0)
    wrapped = LinearWithLoRA(nn.Linear(8, 8), rank=2, alpha=2, dropout=0.5)
    nn.init.normal_(wrapped.lora.B)
    x = torch.randn(4, 8)
    wrapped.train()
    assert not torch.equal(wrapped(x), wrapped(x))
    wrapped.eval()
    assert torch.equal(wrapped(x), wrapped(x))


def _separately_and_together(layers, x):
    """Outputs and input/parameter gradients of `layers` on `x`, called one by one and
    through `model.project` (the fused path attention uses for Q, K and V), each from the
    same random state (dropout)."""
    from spamlora.model import project

    results = []
    for run in (lambda x: [layer(x) for layer in layers], lambda x: project(x, layers)):
        torch.manual_seed(1)
        xi = x.clone().requires_grad_()
        for p in (p for layer in layers for p in layer.parameters()):
            p.grad = None
        outs = run(xi)
        sum((o * torch.arange(o.numel()).view(o.shape).sin()).sum() for o in outs).backward()
        grads = [torch.zeros(0) if p.grad is None else p.grad.clone()
                 for layer in layers for p in layer.parameters() if p.requires_grad]
        results.append((outs, xi.grad, grads))
    return results


@pytest.mark.parametrize("adapted", [(True, True, True), (True, False, True),
                                     (False, True, False)])
def test_projecting_together_equals_calling_each_layer(adapted):
    torch.manual_seed(0)
    layers = []
    for i, on in enumerate(adapted):
        linear = nn.Linear(12, 6 + 2 * i).requires_grad_(False)
        if on:
            linear = LinearWithLoRA(linear, rank=2 + i, alpha=3.0 + i)
            nn.init.normal_(linear.lora.B)
        layers.append(linear)
    (want, want_dx, want_grads), (got, got_dx, got_grads) = _separately_and_together(
        layers, torch.randn(2, 5, 12))
    for g, w in zip(got + [got_dx] + got_grads, want + [want_dx] + want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert len(got_grads) == 2 * sum(adapted)


def test_projecting_together_keeps_dropout_and_merged_layers_exact():
    torch.manual_seed(0)
    layers = [LinearWithLoRA(nn.Linear(8, 8).requires_grad_(False), 2, 4.0, dropout=0.5)
              for _ in range(3)]
    for layer in layers:
        nn.init.normal_(layer.lora.B)
    x = torch.randn(3, 8)
    (want, *_), (got, *_) = _separately_and_together(layers, x)  # masks in layer order
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert not torch.equal(want[0], layers[0].linear(x))  # dropout did change something
    layers[1].merge()
    (want, *_), (got, *_) = _separately_and_together([layer.eval() for layer in layers], x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [2, 8])
def test_textbook_and_reference_initialisation_of_a(rank):
    torch.manual_seed(0)
    textbook = LoRALayer(768, 768, rank, alpha=8, init="textbook")
    reference = LoRALayer(768, 768, rank, alpha=8)  # the default
    # Kaiming-uniform with a = sqrt(5) draws from ±1/sqrt(fan_in).
    assert textbook.A.abs().max() <= 1 / rank ** 0.5
    assert textbook.A.abs().max() > 0.9 / rank ** 0.5  # fan-in r: the textbook's scale
    assert reference.A.abs().max() <= 1 / 768 ** 0.5  # fan-in in_dim, whatever the rank
    assert reference.A.abs().max() > 0.9 / 768 ** 0.5
    assert reference.A.shape == textbook.A.shape == (768, rank)
    assert not reference.B.any() and not textbook.B.any()
    with pytest.raises(ValueError, match="init must be one of"):
        LoRALayer(8, 8, 2, alpha=2, init="xavier")
