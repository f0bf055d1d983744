"""Scoring with LoRA merged: length-sorted batches packed in rows, weights pre-packed
for oneDNN (`packed`), the feed-forward's GELU computed in its first product
(`fuse_gelu`)."""

from __future__ import annotations

import collections

import numpy as np
import torch
from torch import nn

from . import batching
from .classifier import freeze
from .frozen import PrefixCache
from .lora import merge_for_good
from .model import GPTModel
from .packed import PackedLinear, can_fuse_gelu, pack_linears
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
    """Class logits (n, num_classes) in input order, from length-sorted batches, each
    packed in rows (`batching.batches`); with `cache` (of `token_ids`), the blocks it
    holds the output of are not run."""
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


def fuse_gelu(model: nn.Module) -> nn.Module:
    """Each GELU that follows a `PackedLinear` in an `nn.Sequential` (GPT-2's
    feed-forward) computed inside that layer's product, the GELU replaced by
    `nn.Identity`, in place, for good (a fused layer has no backward, and nothing puts
    the GELU back: for a model that only scores). Alone, GELU(tanh) read and wrote the
    feed-forward's 4d-wide activations once more, at ~1 element a ns on an AMX Xeon: 43%
    of the time of the product before it for one message's 33 rows, more than the
    product for 267 (benchmarks/README.md).
    In bf16 each layer's result moves by at most a rounding step, toward the fp32
    result: GELU is applied to the product's fp32 sum, which alone was rounded first.
    A layer the model holds in more than one place is left alone: the fused GELU would
    follow it everywhere."""
    places = collections.Counter(
        id(module) for _, module in model.named_modules(remove_duplicate=False))
    for sequence in model.modules():
        if not isinstance(sequence, nn.Sequential):
            continue
        for i in range(len(sequence) - 1):
            layer, after = sequence[i], sequence[i + 1]
            if (type(layer) is PackedLinear and layer.gelu_approximate is None
                    and places[id(layer)] == 1
                    and type(after) is nn.GELU
                    and can_fuse_gelu(after.approximate, layer.packed_weight.dtype)):
                layer.gelu_approximate = after.approximate
                sequence[i + 1] = nn.Identity()
    return model


def merged_for_inference(model: GPTModel, dtype: torch.dtype = torch.float32) -> GPTModel:
    """LoRA folded into the base weights for good (in fp32, then stored in the compute
    `dtype`; `lora.merge_for_good`, which drops the LoRA layers): inference then costs
    what the base model costs. On CPU the weights (bf16 or fp32) are also pre-packed
    for oneDNN where it can (`PackedLinear`), the feed-forward's GELU computed in its
    first product (`fuse_gelu`); elsewhere Q, K and V are read as one matrix. The head
    stays fp32 (`Fp32Head`)."""
    model = freeze(merge_for_good(model))
    head = model.out_head
    model.out_head = nn.Identity()  # not cast or packed with the blocks' Linears
    model = fuse_gelu(pack_linears(cast_frozen_linears(model, dtype).store_qkv_together()))
    model.out_head = Fp32Head(head)
    return model.eval()
