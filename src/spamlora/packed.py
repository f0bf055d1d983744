"""Frozen bf16 Linears with their weights pre-packed in oneDNN's blocked layout, for
CPU inference (`inference.merged_for_inference`).

A plain weight is re-laid-out inside every oneDNN call; for the few rows of a message or
a short batch that costs as much as the product itself (measured: one message's 73 GEMMs
in 11 ms instead of 17, the same values; benchmarks/README.md). Training keeps plain
weights: packed copies of each weight and its transpose raised an epoch's peak RSS by
~390 MB, past the 2 GB target, for steps 1-9% faster (benchmarks/README.md).

A packed copy is made once and does not follow later in-place changes to the weight it
was made from: pack a model after the last change to its frozen weights (LoRA merged).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn

from .model import side_by_side


def mkldnn_op(name: str):
    """One of torch's private oneDNN ops, or None where this torch release lacks it:
    a torch upgrade that drops them costs the pre-packed speed-up, never a result."""
    return getattr(torch.ops.mkldnn, name, None)


class PackedLinear(nn.Module):
    """A frozen bf16 CPU Linear for inference whose weight is kept pre-packed for oneDNN
    (the module docstring says why), packed on first use: Q, K and V are read through
    one joint PackedLinear (`together`) and never pack their own.

    Every input takes the packed kernel, larger ones `PACKED_MAX_ROWS` rows at a time
    (where the plain kernel started to win on the machine it was measured on), so the
    path is chosen per model, not per batch. Within that path oneDNN still picks its
    blocking from a call's row count, so in bf16 a row's product can differ by a
    rounding step with the rows beside it (see `can_pack_bf16` for the fallback, and
    benchmarks/README.md for what that does to a message's score). No gradient flows
    through it."""

    PACKED_MAX_ROWS = 256

    def __init__(self, original: nn.Linear | None, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.original = original  # the Linear it stands for
        if original is not None:
            weight, bias = original.weight, original.bias
        # No public `weight`: `lora.merge` on a packed layer fails loudly rather than
        # change a weight whose packed copy would not follow.
        self._plain = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.out_features, self.in_features = self._plain.shape
        self._packed: torch.Tensor | None = None
        self._product = mkldnn_op("_linear_pointwise")
        self._joint: dict[tuple[PackedLinear, ...], PackedLinear] = {}

    @property
    def packed_weight(self) -> torch.Tensor:
        if self._packed is None:
            self._packed = mkldnn_op("_reorder_linear_weight")(self._plain)
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # the oneDNN op has no backward
            raise RuntimeError("PackedLinear is for inference: no gradient flows through it")
        # Cast as autocast would for the Linear: the result is the same bf16 product.
        rows = x.to(self._plain.dtype).reshape(-1, self.in_features)
        if len(rows) <= self.PACKED_MAX_ROWS:  # no torch.cat: it would copy the output
            out = self._product(rows, self.packed_weight, self.bias, "none", [], "")
        else:
            out = torch.cat([self._product(chunk, self.packed_weight, self.bias, "none",
                                           [], "")
                             for chunk in rows.split(self.PACKED_MAX_ROWS)])
        return out.view(*x.shape[:-1], self.out_features)

    @staticmethod
    def together(layers: Sequence[PackedLinear]) -> PackedLinear:
        """One PackedLinear computing `layers`' outputs side by side (Q, K and V: one
        product of 3d outputs is faster than three of d, `model.project`), built on the
        first call and kept by the first layer. All with a bias, or all without."""
        biases = [layer.bias for layer in layers]
        if len({b is None for b in biases}) > 1:
            raise ValueError("PackedLinear.together: some layers have a bias, some not")
        key = tuple(layers)  # the layers themselves: ids could be reused
        joint = layers[0]._joint.get(key)
        if joint is None:
            joint = PackedLinear(None, side_by_side([layer._plain for layer in layers]),
                                 None if biases[0] is None else side_by_side(biases))
            layers[0]._joint[key] = joint
        return joint


@functools.cache
def can_pack_bf16() -> bool:
    """Whether this torch build and CPU pre-pack bf16 weights for oneDNN (it needs
    AVX-512 BW/VL/DQ or AVX-NE-CONVERT; plain AVX2 CPUs cannot) and the packed product
    agrees with the plain one. The ops are private: where one is missing, renamed or
    changed, the answer is no and the plain bf16 Linear runs."""
    reorder, product = mkldnn_op("_reorder_linear_weight"), mkldnn_op("_linear_pointwise")
    if not torch.backends.mkldnn.is_available() or reorder is None or product is None:
        return False
    weight = torch.linspace(-1, 1, 64, dtype=torch.bfloat16).view(8, 8)
    x = torch.linspace(-2, 2, 24, dtype=torch.bfloat16).view(3, 8)
    try:
        got = product(x, reorder(weight), None, "none", [], "")
    except (RuntimeError, TypeError, AttributeError):
        return False
    return got.shape == (3, 8) and torch.allclose(got.float(), (x @ weight.T).float(),
                                                  atol=2 ** -6, rtol=2 ** -7)


def pack_linears(model: nn.Module) -> nn.Module:
    """Every frozen bf16 CPU Linear of `model` replaced by a `PackedLinear`, in place; a
    no-op where oneDNN cannot pack (another device, dtype, build or CPU). For inference:
    no gradient flows through them."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module.weight.device.type == "cpu"
               and module.weight.dtype == torch.bfloat16
               and not any(p.requires_grad for p in module.parameters())]
    if not targets or not can_pack_bf16():
        return model
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, PackedLinear(linear))
    return model
