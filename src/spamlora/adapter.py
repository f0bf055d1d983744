"""The adapter file: what training changed, and how to rebuild the classifier around it.

It holds only the LoRA matrices and the new head, plus, in its safetensors metadata,
everything needed to rebuild the classifier on the public base model: base config, LoRA
settings, number of classes, max length.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import SpamloraError
from .fileio import atomic_path
from .model import GPTConfig
from .presets import TARGET_MODULES

ADAPTER_FORMAT = "spamlora-adapter/1"
# One metadata key only: safetensors writes several in random (hash map) order, which
# would make two identical trainings' adapter files differ byte for byte.
METADATA_KEY = "spamlora"


class AdapterError(SpamloraError, ValueError):
    pass


@dataclass(frozen=True)
class AdapterSpec:
    """How a classifier was built: stored with its adapter."""
    base_model: str
    base_config: GPTConfig
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(TARGET_MODULES)
    num_classes: int = 2
    max_length: int = 1024
    pad_id: int = 50256

    def to_metadata(self) -> dict[str, str]:
        d = asdict(self)
        d["base_config"] = asdict(self.base_config)
        d["targets"] = list(self.targets)
        return {METADATA_KEY: json.dumps({"format": ADAPTER_FORMAT, "spec": d},
                                         sort_keys=True)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str] | None, source: str) -> AdapterSpec:
        try:
            stored = json.loads((meta or {})[METADATA_KEY])
        except (KeyError, ValueError):
            stored = {}
        if not isinstance(stored, dict) or stored.get("format") != ADAPTER_FORMAT:
            raise AdapterError(f"{source}: not a spamlora adapter (no {ADAPTER_FORMAT!r} "
                               f"metadata)")
        try:
            d = dict(stored["spec"])
            d["base_config"] = GPTConfig(**d["base_config"])
            d["targets"] = tuple(d["targets"])
            return cls(**d)
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterError(f"{source}: unreadable adapter metadata: {e}") from None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()
            if p.requires_grad}


def save_adapter(model: nn.Module, spec: AdapterSpec, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        save_file(trainable_state(model), str(tmp), metadata=spec.to_metadata())


def read_adapter(path: str | Path) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter not found (train one with `dvc repro train`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            spec = AdapterSpec.from_metadata(f.metadata(), str(path))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise AdapterError(f"{path}: unreadable adapter file (truncated or corrupt?): "
                           f"{e}") from None
    return spec, tensors


