"""Frozen bf16 Linears with their weights pre-packed in oneDNN's blocked layout, for
CPU inference (`inference.merged_for_inference`) and training (`packed_for_training`).

A plain weight is re-laid-out inside every oneDNN call; for the few rows of a message or
a short batch that costs as much as the product itself (measured: one message's 73 GEMMs
in 11 ms instead of 17, the same values; benchmarks/README.md). A training step's packed
row of ~250 tokens is short too: its frozen products, and its input gradients from a
packed copy of each weight's transpose, made epochs ~7% faster on an AMX Xeon, for
~370 MB more peak RSS (benchmarks/README.md).

A packed copy is made once and does not follow later in-place changes to the weight it
was made from: pack a model after the last change to its frozen weights (LoRA merged)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .model import side_by_side


def mkldnn_op(name: str):
    """One of torch's private oneDNN ops, or None where this torch release lacks it:
    a torch upgrade that drops them costs the pre-packed speed-up, never a result."""
    return getattr(torch.ops.mkldnn, name, None)


class _FrozenProduct(torch.autograd.Function):
    """``rows @ W.T + b`` with W and b frozen: the forward from the packed weight, the
    input's gradient ``g @ W`` from its packed transpose; none for W or b."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.product(rows, layer.packed_weight, layer.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layer = ctx.layer
        return layer.product(grad.contiguous(), layer.packed_transpose, None), None


class PackedLinear(nn.Module):
    """A frozen bf16 CPU Linear whose weight is kept pre-packed for oneDNN (the module
    docstring says why), packed on first use: Q, K and V are read through one joint
    PackedLinear (`together`) and never pack their own. The input's gradient flows (from
    a packed copy of the transpose, made at the first backward); the weight's and the
    bias's do not: they are frozen.

    Every input takes the packed kernel, larger ones in equal chunks of at most
    `PACKED_MAX_ROWS` rows (past ~450 rows the plain kernel won, on an AMX Xeon, by up
    to 1.5x), so the path is chosen per model, not per batch. Within that path oneDNN
    still picks its blocking from a call's row count, so in bf16 a row's product can
    differ by a rounding step with the rows beside it (see `can_pack_bf16` for the
    fallback, and benchmarks/README.md for what that does to a message's score)."""

    PACKED_MAX_ROWS = 384

    def __init__(self, original: nn.Linear | None, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.original = original  # the Linear it stands for
        if original is not None:
            if any(p.requires_grad for p in original.parameters()):
                raise ValueError("PackedLinear is for frozen Linears: this one trains")
            weight, bias = original.weight, original.bias
        # No public `weight`: `lora.merge` on a packed layer fails loudly rather than
        # change a weight whose packed copy would not follow.
        self._plain = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.out_features, self.in_features = self._plain.shape
        self._packed: torch.Tensor | None = None
        self._packed_transpose: torch.Tensor | None = None
        self._product = mkldnn_op("_linear_pointwise")
        self._joint: dict[tuple[PackedLinear, ...], PackedLinear] = {}

    @property
    def packed_weight(self) -> torch.Tensor:
        if self._packed is None:
            self._packed = mkldnn_op("_reorder_linear_weight")(self._plain)
        return self._packed

    @property
    def packed_transpose(self) -> torch.Tensor:
        """The weight's transpose, packed: the input gradient's product is ``g @ W``."""
        if self._packed_transpose is None:
            self._packed_transpose = mkldnn_op("_reorder_linear_weight")(
                self._plain.t().contiguous())
        return self._packed_transpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Cast as autocast would for the Linear: the result is the same bf16 product.
        rows = x.to(self._plain.dtype).reshape(-1, self.in_features)
        if rows.requires_grad and torch.is_grad_enabled():
            out = _FrozenProduct.apply(rows, self)
        else:
            out = self.product(rows, self.packed_weight, self.bias)
        # 2-D in, the product itself out, not a view of it: an in-place update of a view
        # (LoRA's, `LinearWithLoRA.add_updates`) costs its backward two extra copies.
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def product(self, rows: torch.Tensor, packed: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        """``rows @ W.T + bias`` for a packed W, in as few equal chunks of at most
        `PACKED_MAX_ROWS` rows as it takes."""
        if len(rows) <= self.PACKED_MAX_ROWS:  # no torch.cat: it would copy the output
            return self._product(rows, packed, bias, "none", [], "")
        chunks = -(-len(rows) // self.PACKED_MAX_ROWS)
        return torch.cat([self._product(chunk, packed, bias, "none", [], "")
                          for chunk in rows.tensor_split(chunks)])

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


def _frozen_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, Linear) of every frozen bf16 CPU Linear of `model`, or none where
    oneDNN cannot pack (another device, dtype, build or CPU)."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module.weight.device.type == "cpu"
               and module.weight.dtype == torch.bfloat16
               and not any(p.requires_grad for p in module.parameters())]
    if not targets or not can_pack_bf16():
        return []
    return [(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], linear)
            for name, linear in targets]


def pack_linears(model: nn.Module) -> nn.Module:
    """Every frozen bf16 CPU Linear of `model` replaced by a `PackedLinear`, in place, for
    good (inference)."""
    for parent, name, linear in _frozen_linears(model):
        parent.register_module(name, PackedLinear(linear))
    return model


@contextlib.contextmanager
def packed_for_training(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every frozen bf16 CPU Linear computed from pre-packed weights while
    the block runs (the input's gradient too), its own Linears back after it, however it
    ends. The packed copies (the weight and its transpose, ~340 MB for GPT-2 124M) live
    as long as the block."""
    swapped: list[tuple[nn.Module, str, nn.Linear, PackedLinear]] = []
    try:
        for parent, name, linear in _frozen_linears(model):
            packed = PackedLinear(linear)
            parent.register_module(name, packed)
            swapped.append((parent, name, linear, packed))
        yield model
    finally:
        for parent, name, linear, packed in swapped:
            parent.register_module(name, linear)
            # A joint layer is kept by its first layer under a key holding that layer:
            # a cycle that would keep the packed copies past the block until Python's
            # cycle collector ran.
            packed._joint.clear()
