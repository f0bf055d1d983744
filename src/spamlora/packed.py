"""Frozen Linears with their weights pre-packed in oneDNN's blocked layout, for CPU
inference in bf16 or fp32 (`inference.merged_for_inference`) and training in bf16
(`packed_for_training`).

A plain weight is re-laid-out inside every oneDNN call; for the few rows of a message or
a short batch that costs as much as the product itself (measured: one message's 73 GEMMs
in 11 ms instead of 17, the same values; benchmarks/README.md). A training step's packed
row of ~250 tokens is short too: its frozen products, and its input gradients from a
packed copy of each weight's transpose, made epochs ~7% faster on an AMX Xeon, for
~0.2 GB more peak RSS, the plain weights let go (benchmarks/README.md). In fp32, a
layer's products take 4-8% less at a training step's ~256 rows and 5-23% at a message's
32 (with AVX2 and with AVX-512), timed alone. Scoring packs them where oneDNN computes
fp32 with AVX-512 (one message in 13-14% less time, batches 5-7% faster), for no more
peak memory; with AVX2 only, a whole message scored slower packed. fp32 training does
not pack: a few percent of a step by those figures, for ~0.34 GB more peak RSS.

A packed layer holds its weight only packed: no plain copy is kept (the plain weight is
let go with the Linear, or while training runs). A packed copy does not follow later
in-place changes to the weight it was made from: pack a model after the last change to
its frozen weights (LoRA merged)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .model import side_by_side, stored_together
from .precision import cpu_computes_fp32_with_avx512


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
    """A frozen CPU Linear (bf16, or fp32 for scoring) whose weight is held only
    pre-packed for oneDNN (the module docstring says why): packed when the layer is
    made, and no plain copy kept, so a packed model holds its weights once. The input's
    gradient flows (from a packed copy of the transpose, made at the first backward);
    the weight's and the bias's do not: they are frozen. `dense_weight()` gives the
    weight back, bit for bit.

    Every input takes the packed kernel, so the path is chosen per model, not per
    batch: in bf16 larger ones in equal chunks of at most `PACKED_MAX_ROWS` rows (past
    ~450 rows the plain kernel won, on an AMX Xeon, by up to 1.5x); in fp32 whole
    (chunks cost 4-9% there past 768 rows, benchmarks/README.md). Within that path oneDNN
    still picks its blocking from a call's row count, so in bf16 a row's product can
    differ by a rounding step with the rows beside it (see `can_pack_bf16` for the
    fallback, and benchmarks/README.md for what that does to a message's score); in
    fp32, by a few units in the last place.

    For scoring, the GELU after a layer can be computed in its product
    (`gelu_approximate`, set by `inference.fuse_gelu`); such a layer has no backward."""

    PACKED_MAX_ROWS = 384

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        # Where `inference.fuse_gelu` moved the GELU after this layer into its product,
        # that GELU's `approximate` ("tanh" or "none"); else None.
        self.gelu_approximate: str | None = None
        self.out_features, self.in_features = weight.shape
        # No public `weight`: `lora.merge` on a packed layer fails loudly rather than
        # change a weight whose packed copy would not follow.
        self.packed_weight = mkldnn_op("_reorder_linear_weight")(weight.detach())
        self.bias = None if bias is None else bias.detach()
        self._packed_transpose: torch.Tensor | None = None
        self._product = mkldnn_op("_linear_pointwise")
        self._joint: dict[tuple[nn.Module, ...], PackedLinear] = {}

    @classmethod
    def of(cls, linear: nn.Linear) -> PackedLinear:
        _refuse_trained([linear])
        return cls(linear.weight, linear.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.packed_weight.to_dense()

    def extra_repr(self) -> str:
        gelu = ("" if self.gelu_approximate is None
                else f", then GELU(approximate={self.gelu_approximate!r})")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{gelu}")

    @property
    def packed_transpose(self) -> torch.Tensor:
        """The weight's transpose, packed: the input gradient's product is ``g @ W``."""
        if self._packed_transpose is None:
            self._packed_transpose = mkldnn_op("_reorder_linear_weight")(
                self.dense_weight().t().contiguous())
        return self._packed_transpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Cast as autocast would for a bf16 Linear: the result is the same bf16 product.
        rows = x.to(self.packed_weight.dtype).reshape(-1, self.in_features)
        if rows.requires_grad and torch.is_grad_enabled():
            if self.gelu_approximate is not None:
                raise RuntimeError("a PackedLinear with GELU fused in (fuse_gelu) is for "
                                   "inference: it has no backward")
            out = _FrozenProduct.apply(rows, self)
        elif self.gelu_approximate is not None:
            out = self.product(rows, self.packed_weight, self.bias,
                               ("gelu", self.gelu_approximate))
        else:
            out = self.product(rows, self.packed_weight, self.bias)
        # 2-D in, the product itself out, not a view of it: an in-place update of a view
        # (LoRA's, `LinearWithLoRA.add_updates`) costs its backward two extra copies.
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def product(self, rows: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                post_op: tuple[str, str] = ("none", "")) -> torch.Tensor:
        """``rows @ W.T + bias`` for a packed W, in bf16 in as few equal chunks of at
        most `PACKED_MAX_ROWS` rows as it takes; with `post_op` (oneDNN's name and
        algorithm, ``("gelu", "tanh")``) that function of it, applied before rounding."""
        name, algorithm = post_op
        # No torch.cat where one call does: it would copy the output.
        if packed.dtype != torch.bfloat16 or len(rows) <= self.PACKED_MAX_ROWS:
            return self._product(rows, packed, bias, name, [], algorithm)
        chunks = -(-len(rows) // self.PACKED_MAX_ROWS)
        return torch.cat([self._product(chunk, packed, bias, name, [], algorithm)
                          for chunk in rows.tensor_split(chunks)])

    @staticmethod
    def together(layers: Sequence[PackedLinear | PackedPart]) -> PackedLinear:
        """One PackedLinear computing `layers`' outputs side by side (Q, K and V: one
        product of 3d outputs is faster than three of d, `model.project`): the joint
        layer they are the parts of, all of it in order; else one packed from their
        weights, built on the first call and kept by the first layer. All with a bias,
        or all without."""
        biases = [layer.bias for layer in layers]
        if any(getattr(layer, "gelu_approximate", None) for layer in layers):
            raise ValueError("PackedLinear.together: a layer computes GELU in its product; "
                             "a joint product would not")
        if len({b is None for b in biases}) > 1:
            raise ValueError("PackedLinear.together: some layers have a bias, some not")
        joint = PackedPart.whole(layers)
        if joint is not None:
            return joint
        key = tuple(layers)  # the layers themselves: ids could be reused
        joint = layers[0]._joint.get(key)
        if joint is None:
            joint = PackedLinear(torch.cat([layer.dense_weight() for layer in layers]),
                                 None if biases[0] is None else torch.cat(biases))
            layers[0]._joint[key] = joint
        return joint


class PackedPart(nn.Module):
    """One of several frozen Linears whose weights lie one after another in one storage
    (Q, K and V: `GPTModel.store_qkv_together`), packed together as one joint
    PackedLinear: `project` reads them all through it (`PackedLinear.together`); alone,
    a part gives its own columns of the joint product. Made by `PackedPart.split`."""

    def __init__(self, joint: PackedLinear, start: int, stop: int):
        super().__init__()
        # Not a child module: the joint layer belongs to all its parts alike.
        object.__setattr__(self, "joint", joint)
        self.start, self.stop = start, stop
        self.out_features, self.in_features = stop - start, joint.in_features
        self.bias = None if joint.bias is None else joint.bias[start:stop]
        self._joint: dict[tuple[nn.Module, ...], PackedLinear] = {}

    @staticmethod
    def split(linears: Sequence[nn.Linear]) -> list[PackedPart]:
        """`linears` (frozen, all with a bias or all without) packed as one joint layer
        from their weights side by side (no copy where they are stored together), a
        part for each."""
        _refuse_trained(linears)
        joint = PackedLinear(side_by_side([linear.weight for linear in linears]),
                             None if linears[0].bias is None
                             else side_by_side([linear.bias for linear in linears]))
        stops = itertools.accumulate(linear.out_features for linear in linears)
        return [PackedPart(joint, stop - linear.out_features, stop)
                for linear, stop in zip(linears, stops, strict=True)]

    @staticmethod
    def whole(layers: Sequence[nn.Module]) -> PackedLinear | None:
        """The joint layer `layers` are all the parts of, in order, or None."""
        joint = getattr(layers[0], "joint", None)
        spans = [(getattr(layer, "joint", None), getattr(layer, "start", None),
                  getattr(layer, "stop", None)) for layer in layers]
        bounds = [0] + [stop for _, _, stop in spans]
        if joint is None or bounds[-1] != joint.out_features or any(
                j is not joint or start != bound
                for (j, start, _), bound in zip(spans, bounds, strict=False)):
            return None
        return joint

    def dense_weight(self) -> torch.Tensor:
        return self.joint.dense_weight()[self.start:self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        # Its own tensor, not a view (`PackedLinear.forward` says why), for one row too
        # (whose slice is contiguous already). The whole joint product is computed: alone
        # a part is a fallback, `project` reads the parts together.
        out = self.joint(rows)[:, self.start:self.stop].clone(
            memory_format=torch.contiguous_format)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    together = staticmethod(PackedLinear.together)


def _refuse_trained(linears: Sequence[nn.Linear]) -> None:
    if any(p.requires_grad for linear in linears for p in linear.parameters()):
        raise ValueError("a packed layer is for frozen Linears: this one trains")


@functools.cache
def can_pack_bf16() -> bool:
    """Whether this torch build and CPU pre-pack bf16 weights for oneDNN (it needs
    AVX-512 BW/VL/DQ or AVX-NE-CONVERT; plain AVX2 CPUs cannot) and the packed product
    agrees with the plain one. The ops are private: where one is missing, renamed or
    changed, the answer is no and the plain bf16 Linear runs."""
    return _packed_product_agrees(torch.bfloat16, atol=2 ** -6, rtol=2 ** -7)


@functools.cache
def can_pack_fp32() -> bool:
    """`can_pack_bf16` for fp32 weights, held to fp32's precision, where oneDNN computes
    fp32 with AVX-512: with AVX2 only it could, but scoring one message took ~4% longer
    than from MKL's plain product (benchmarks/README.md)."""
    return cpu_computes_fp32_with_avx512() and _packed_product_agrees(
        torch.float32, atol=1e-6, rtol=1e-5)


def can_pack(dtype: torch.dtype) -> bool:
    """Whether a frozen Linear of `dtype` can be packed here (`can_pack_bf16`,
    `can_pack_fp32`); for another dtype, no."""
    check = {torch.bfloat16: can_pack_bf16, torch.float32: can_pack_fp32}.get(dtype)
    return check is not None and check()


def _packed_product_agrees(dtype: torch.dtype, atol: float, rtol: float) -> bool:
    reorder, product = mkldnn_op("_reorder_linear_weight"), mkldnn_op("_linear_pointwise")
    if not torch.backends.mkldnn.is_available() or reorder is None or product is None:
        return False
    weight = torch.linspace(-1, 1, 64, dtype=dtype).view(8, 8)
    x = torch.linspace(-2, 2, 24, dtype=dtype).view(3, 8)
    try:
        got = product(x, reorder(weight), None, "none", [], "")
    except (RuntimeError, TypeError, AttributeError):
        return False
    return got.shape == (3, 8) and got.dtype == dtype and torch.allclose(
        got.float(), (x.double() @ weight.double().T).float(), atol=atol, rtol=rtol)


@functools.cache
def can_fuse_gelu(approximate: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether oneDNN computes GELU (`approximate`: "tanh" or "none", as `nn.GELU`'s) in
    a packed product of `dtype`, giving what `F.gelu` gives of the product within bf16's
    rounding step (2**-7) or fp32's usual 1e-5: near -3 the two forms differ
    by ~10%, so the wrong one fails. Where not (the private op's arguments changed),
    GELU runs alone. Asked only of a layer already packed (`can_pack`)."""
    reorder, product = mkldnn_op("_reorder_linear_weight"), mkldnn_op("_linear_pointwise")
    if reorder is None or product is None:
        return False
    x = torch.linspace(-4, 4, 48, dtype=dtype).view(6, 8)
    try:
        got = product(x, reorder(torch.eye(8, dtype=dtype)), None, "gelu", [],
                      approximate)
    except (RuntimeError, TypeError, AttributeError):
        return False
    return got.shape == x.shape and torch.allclose(
        got.float(), F.gelu(x.float(), approximate=approximate), atol=1e-6,
        rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-5)


Frozen = tuple[nn.Module, str, nn.Linear]  # a frozen Linear: (parent, name, Linear)


def _frozen_linears(model: nn.Module, dtypes: Sequence[torch.dtype]) -> list[list[Frozen]]:
    """Every frozen CPU Linear of `model` of one of `dtypes` that oneDNN can pack here
    (`can_pack`: not on another device, build or CPU), in groups: those whose weights
    lie one after another in one storage (`GPTModel.store_qkv_together`), each with a
    bias or each without, in storage order; each other Linear alone."""
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and module.weight.device.type == "cpu"
               and module.weight.dtype in dtypes
               and not any(p.requires_grad for p in module.parameters())
               and can_pack(module.weight.dtype)]
    if not targets:
        return []
    by_storage: dict[int, list[Frozen]] = {}
    for name, linear in targets:
        parent, _, child = name.rpartition(".")
        by_storage.setdefault(linear.weight.untyped_storage().data_ptr(), []).append(
            (model.get_submodule(parent), child, linear))
    groups = []
    for frozen in by_storage.values():
        frozen.sort(key=lambda f: f[2].weight.storage_offset())
        linears = [linear for _, _, linear in frozen]
        if (len(linears) > 1 and stored_together([linear.weight for linear in linears])
                and len({linear.bias is None for linear in linears}) == 1):
            groups.append(frozen)
        else:
            groups.extend([f] for f in frozen)
    return groups


def _packed(group: list[Frozen]) -> list[PackedLinear | PackedPart]:
    linears = [linear for _, _, linear in group]
    return [PackedLinear.of(linears[0])] if len(linears) == 1 else PackedPart.split(linears)


def pack_linears(model: nn.Module) -> nn.Module:
    """Every frozen bf16 or fp32 CPU Linear of `model` replaced by a `PackedLinear` (Q,
    K and V stored together by `PackedPart`s of one), in place, for good (inference):
    the plain weights are let go with the Linears."""
    groups = _frozen_linears(model, (torch.bfloat16, torch.float32))
    # One group at a time, each let go once replaced (nothing else here holds it): the
    # plain weights held until the end lay beside all the packed copies, +0.2 GB of
    # scoring's peak RSS for GPT-2 124M in fp32 (benchmarks/README.md).
    while groups:
        _put_packed(groups.pop())
    return model


def _put_packed(group: list[Frozen]) -> None:
    for (parent, name, _), layer in zip(group, _packed(group), strict=True):
        parent.register_module(name, layer)


@contextlib.contextmanager
def packed_for_training(model: nn.Module) -> Iterator[nn.Module]:
    """`model` with every frozen bf16 CPU Linear computed from pre-packed weights while
    the block runs (the input's gradient too), its own Linears back after it, with the
    very weights they had, however it ends. While it runs, the Linears' plain weights are
    let go where their packed copies give them back bit for bit (checked): the packed
    copies, the weights and their transposes, ~340 MB for GPT-2 124M, then replace
    ~170 MB of plain ones instead of adding to them."""
    swapped: list[_Swap] = []
    groups = _frozen_linears(model, (torch.bfloat16,))
    # A weight whose memory another tensor of the model also holds (tied, as GPT-2's head
    # and token embedding) is kept: letting it go would take it from that tensor too, or
    # free nothing.
    holders = collections.Counter(
        t.untyped_storage().data_ptr() for _, t in itertools.chain(
            model.named_parameters(remove_duplicate=False),
            model.named_buffers(remove_duplicate=False))
        if t.layout == torch.strided) if groups else collections.Counter()
    try:
        for group in groups:
            swap = _Swap(group, _packed(group))
            swapped.append(swap)
            for (parent, name, _), layer in zip(group, swap.layers, strict=True):
                parent.register_module(name, layer)
            weights = [linear.weight for _, _, linear in group]
            storage = weights[0].untyped_storage().data_ptr()
            if (stored_together(weights) and holders[storage] == len(weights)
                    and _same_bits(_dense(swap.layers), side_by_side(weights))):
                swap.released = True  # before: a weight let go is always given back
                for weight in weights:
                    weight.data = weight.data.new_empty(0)
        yield model
    finally:
        # A block never left before the interpreter exits (an abandoned generator) ends
        # here while torch is torn down: its ops would abort the process, and nothing
        # reads the model again.
        if not sys.is_finalizing():
            _give_back(swapped)


def _give_back(swapped: list[_Swap]) -> None:
    """The Linears in their places again, with the weights let go rebuilt from the packed
    copies, which are let go in turn. A group that cannot be given back (its rebuild
    failed) keeps its packed layers, which compute what its Linears did; the others are
    given back all the same, and the first error is raised after."""
    errors = []
    while swapped:
        swap = swapped[-1]
        try:
            if swap.released:
                # Views of one tensor, as they were stored (`side_by_side` reads them so).
                dense = _dense(swap.layers)
                sizes = [layer.out_features for layer in swap.layers]
                for (_, _, linear), part in zip(swap.group, dense.split(sizes), strict=True):
                    linear.weight.data = part
            for (parent, name, linear), layer in zip(swap.group, swap.layers, strict=True):
                parent.register_module(name, linear)
                # A joint layer is kept by its first layer under a key holding that layer:
                # a cycle that would keep the packed copies past the block until Python's
                # cycle collector ran.
                layer._joint.clear()
        except BaseException as error:  # noqa: BLE001 (raised below, once all are tried)
            errors.append(error)
        swapped.pop()
    if errors:
        raise errors[0]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, where `torch.equal` takes -0.0 for 0.0 and no NaN for itself."""
    return a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16 and torch.equal(
        a.view(torch.int16), b.view(torch.int16))


@dataclasses.dataclass
class _Swap:
    group: list[Frozen]
    layers: list[PackedLinear | PackedPart]
    released: bool = False  # the Linears' weights let go, to be rebuilt from `layers`


def _dense(layers: list[PackedLinear | PackedPart]) -> torch.Tensor:
    """The weights of a group's packed layers, one after another, in one tensor."""
    return (layers[0].joint if isinstance(layers[0], PackedPart) else layers[0]).dense_weight()
