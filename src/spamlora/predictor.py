"""A trained classifier ready for inference: base weights + adapter, LoRA merged.

Used by the evaluate stage and by `spamlora predict`, so both give the same numbers: a
message's score does not depend on the batch it is scored in (evaluate's 64 or predict's
one), within 1e-5 of the logits in fp32 and one bf16 rounding step in bf16 (tested).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .adapter import AdapterError, AdapterSpec
from .batching import encode
from .classifier import load_classifier
from .inference import merged_for_inference, predict_logits, softmax
from .model import GPTModel
from .precision import resolve_device, resolve_precision
from .tokenizer import Tokenizer


class Predictor:
    def __init__(self, weights: str | Path, adapter: str | Path, device: str = "auto",
                 precision: str = "auto", batch_size: int = 64, strict: bool = False,
                 base_sha256: dict[str, str] | None = None):
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.batch_size = batch_size
        model, self.spec = load_classifier(weights, adapter, strict, base_sha256)
        self.model = merged_for_inference(model.to(self.device), self.dtype)
        self.tokenizer = Tokenizer(weights)
        if self.tokenizer.pad_id != self.spec.pad_id:
            raise AdapterError(f"{adapter}: trained with padding id {self.spec.pad_id}, but "
                               f"the tokenizer in {weights} has {self.tokenizer.pad_id}")

    @classmethod
    def of_model(cls, model: GPTModel, spec: AdapterSpec, tokenizer: Tokenizer,
                 device: torch.device, dtype: torch.dtype, batch_size: int = 64) -> Predictor:
        """A classifier already in memory, scored as it is (LoRA not merged, `model` left
        unchanged): the train stage's, to check the logged model's input example without
        loading the model a second time."""
        predictor = cls.__new__(cls)
        predictor.device, predictor.dtype, predictor.batch_size = device, dtype, batch_size
        predictor.model, predictor.spec, predictor.tokenizer = model, spec, tokenizer
        return predictor

    def logits(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Class logits in input order, and the positions of messages truncated to the
        adapter's max length."""
        ids, truncated = encode(self.tokenizer, texts, self.spec.max_length)
        return predict_logits(self.model, ids, self.spec.pad_id, self.batch_size,
                              self.device, self.dtype), truncated

    def probabilities(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """Each class's probability (n, classes), in `spec.class_names` order."""
        logits, truncated = self.logits(texts)
        return softmax(logits.astype(np.float64)), truncated

    def spam_probabilities(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """The positive class's probability (of two classes: spam for the SMS data)."""
        if self.spec.positive_index is None:
            raise AdapterError(f"this adapter has {self.spec.num_classes} classes, not a "
                               f"positive one of two: use probabilities()")
        probs, truncated = self.probabilities(texts)
        return probs[:, self.spec.positive_index], truncated
