"""Scoring with LoRA merged: length-sorted batches, and bf16 weights pre-packed for oneDNN."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from . import batching
from .classifier import freeze
from .frozen import PrefixCache
from .lora import merge
from .model import GPTModel
from .precision import attention_kernels, autocast, cast_frozen_linears


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits (n, classes), stable for large logits. Here, not
    with the metrics, so that scoring never imports scikit-learn (~1.4 s of start-up)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predictions(probs: np.ndarray, positive_index: int | None = 1,
                threshold: float = 0.5) -> np.ndarray:
    """Predicted class indices: of two classes, the positive one where its probability is
    at least `threshold` (a tie goes to it, as it always has for spam); of more, the most
    probable. Shared by evaluate, predict and the served model, so all three agree."""
    if probs.shape[1] == 2 and positive_index is not None:
        return np.where(probs[:, positive_index] >= threshold, positive_index,
                        1 - positive_index)
    return probs.argmax(axis=1)


@torch.inference_mode()
def predict_logits(model: GPTModel, token_ids: list[list[int]], pad_id: int,
                   batch_size: int, device: torch.device,
                   dtype: torch.dtype = torch.float32,
                   cache: PrefixCache | None = None) -> np.ndarray:
    """Class logits (n, num_classes) in input order, from length-sorted batches; with
    `cache` (of `token_ids`), the blocks it holds the output of are not run."""
    # Only the modules in training mode are switched, and back: `model.eval()` and
    # `model.train()` walk all of GPT-2 124M's ~480 modules, ~1 ms each, where one
    # short message is scored in ~20 (benchmarks/README.md).
    training = [module for module in model.modules() if module.training]
    for module in training:
        module.training = False
    try:
        out = np.zeros((len(token_ids), model.out_head.out_features), dtype=np.float32)
        order = batching.inference_order([len(t) for t in token_ids], batch_size)
        with autocast(device, dtype), attention_kernels(device, training=False):
            for batch in batching.batches(token_ids, order, pad_id):
                b = (batch if cache is None else cache.feed(batch)).to(device)
                out[batch.index.numpy()] = b.logits(model).float().cpu().numpy()
    finally:
        for module in training:
            module.training = True
    return out


def mkldnn_op(name: str):
    """One of torch's private oneDNN ops, or None where this torch release lacks it:
    a torch upgrade that drops them costs the pre-packed speed-up, never a result."""
    return getattr(torch.ops.mkldnn, name, None)


class PackedLinear(nn.Module):
    """A frozen bf16 Linear for CPU inference that keeps its weight pre-packed in oneDNN's
    blocked layout. A plain weight is re-laid-out inside every oneDNN call; for the few
    rows of a message or a short batch that costs as much as the product itself
    (measured: 73 GEMMs of one 30-token message 17 → 11 ms, same values). Every input
    takes the packed kernel, larger ones `PACKED_MAX_ROWS` rows at a time (where the plain
    kernel would start to win), so the path is chosen per model, not per batch. Within
    that path oneDNN still picks its blocking from a call's row count, so in bf16 a row's
    product can differ by a rounding step with the rows beside it (see `can_pack_bf16`
    for the fallback, and benchmarks/README.md for what that does to a message's score)."""

    PACKED_MAX_ROWS = 256

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = mkldnn_op("_reorder_linear_weight")(linear.weight.detach())
        self._product = mkldnn_op("_linear_pointwise")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Cast as autocast would for the Linear: the result is the same bf16 product.
        rows = x.to(self.linear.weight.dtype).reshape(-1, self.in_features)
        if len(rows) <= self.PACKED_MAX_ROWS:  # no torch.cat: it would copy the output
            out = self._product(rows, self.packed_weight, self.linear.bias, "none", [], "")
        else:
            out = torch.cat([self._product(chunk, self.packed_weight, self.linear.bias,
                                           "none", [], "")
                             for chunk in rows.split(self.PACKED_MAX_ROWS)])
        return out.view(*x.shape[:-1], self.out_features)


@functools.cache
def can_pack_bf16() -> bool:
    """Whether this torch build and CPU pre-pack bf16 weights for oneDNN (it needs
    AVX-512 BW/VL/DQ or AVX-NE-CONVERT; plain AVX2 CPUs cannot) and the packed product
    agrees with the plain one. The ops are private: where one is missing, renamed or
    changed, the answer is no and inference takes autocast's plain bf16 Linear."""
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
    """Every bf16 CPU Linear of a frozen `model` replaced by a `PackedLinear`, in place;
    a no-op where oneDNN cannot pack (another device, dtype, build or CPU)."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module.weight.device.type == "cpu"
               and module.weight.dtype == torch.bfloat16]
    if not targets or not can_pack_bf16():
        return model
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, PackedLinear(linear))
    return model


class Fp32Head(nn.Module):
    """The classification head computed in fp32 whatever the autocast: its few outputs
    cost nothing, and the logits are not rounded to bf16's 8 significant bits (one such
    step, 2**-7 for logits of 1 to 2, was the largest difference a message's bf16 score
    showed between alone and among batch-mates; benchmarks/README.md)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear.float()
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.linear(x.float())


def merged_for_inference(model: GPTModel, dtype: torch.dtype = torch.float32) -> GPTModel:
    """LoRA folded into the base weights (in fp32, then stored in the compute `dtype`):
    inference then costs what the base model costs. bf16 weights on CPU are also
    pre-packed for oneDNN (`PackedLinear`); elsewhere Q, K and V are read as one matrix.
    The head stays fp32 (`Fp32Head`)."""
    model = freeze(merge(model))
    head = model.out_head
    model.out_head = nn.Identity()  # not cast or packed with the blocks' Linears
    model = pack_linears(cast_frozen_linears(model, dtype).store_qkv_together())
    model.out_head = Fp32Head(head)
    return model.eval()
