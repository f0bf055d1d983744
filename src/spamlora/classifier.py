"""GPT-2 + LoRA as a sequence classifier, its adapter file, and batched inference.

The adapter file holds only what training changed (the LoRA matrices and the new head)
plus, in its safetensors metadata, everything needed to rebuild the classifier on the
public base model: base config, LoRA settings, number of classes, max length.
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import batching
from .errors import SpamloraError
from .fileio import atomic_path
from .lora import merge, replace_linear_with_lora
from .model import GPTConfig, GPTModel
from .presets import TARGET_MODULES
from .weights import CONFIG_FILE, WeightsError, load_gpt2

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


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def add_lora(model: GPTModel, spec: AdapterSpec, seed: int) -> GPTModel:
    """Freeze `model` and inject LoRA (seeded), in place; the LM head is untouched."""
    freeze(model)
    torch.manual_seed(seed)
    return replace_linear_with_lora(model, spec.rank, spec.alpha, spec.targets, spec.dropout)


def swap_head(model: GPTModel, num_classes: int, seed: int) -> GPTModel:
    """Replace the LM head with a trainable `Linear(emb_dim, num_classes)` (seeded)."""
    torch.manual_seed(seed)
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes).to(model.tok_emb.weight.device)
    return model


def build_classifier(base: GPTModel, spec: AdapterSpec, seed: int) -> GPTModel:
    """Frozen base + LoRA + a new trainable head: the classifier before training."""
    if base.cfg.with_dropout(0.0) != spec.base_config.with_dropout(0.0):
        raise AdapterError(f"adapter was made for a base model with config "
                           f"{spec.base_config}, but the base model has {base.cfg}")
    return swap_head(add_lora(base, spec, seed), spec.num_classes, seed)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total). Tied tensors count once per module, as the textbook model,
    whose output head is its own matrix, counts them."""
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()
            if p.requires_grad}


def save_adapter(model: GPTModel, spec: AdapterSpec, path: str | Path) -> None:
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


def load_classifier(weights: str | Path, adapter: str | Path) -> tuple[GPTModel,
                                                                        AdapterSpec]:
    """The trained classifier: the base GPT-2 folder `weights` with the adapter applied.
    The (small) adapter is read first, so a bad one fails before the base loads."""
    spec, tensors = read_adapter(adapter)
    if not (Path(weights) / CONFIG_FILE).is_file():
        raise WeightsError(f"{weights}: no GPT-2 base model here; this adapter needs "
                           f"{spec.base_model!r}: fetch it with `spamlora download-model "
                           f"--name {spec.base_model} {weights}`")
    model = build_classifier(load_gpt2(weights), spec, seed=0)
    expected = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) -
                                                                        set(expected))
    if missing or unexpected:
        raise AdapterError(f"{adapter}: does not fit the classifier it describes "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, p in expected.items():
            if tensors[name].shape != p.shape:
                raise AdapterError(f"{adapter}: tensor {name!r} has shape "
                                   f"{tuple(tensors[name].shape)}, the base model needs "
                                   f"{tuple(p.shape)}")
            p.copy_(tensors[name])
    return model, spec


def resolve_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """bf16 autocast where the hardware computes bf16 natively, else fp32."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and (torch.cpu._is_amx_tile_supported()
                                 or torch.cpu._is_avx512_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=dtype == torch.bfloat16)


def training_attention(device: torch.device):
    """On CPU, the plain "math" attention kernel for training: for SMS-length sequences
    the CPU flash-attention kernel's backward took ~20% of a step, the math kernel a
    fraction of that. Inference keeps the default, whose forward is faster
    (benchmarks/README.md)."""
    if device.type == "cpu":
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def cast_frozen_linears(model: GPTModel, dtype: torch.dtype) -> GPTModel:
    """Store every frozen Linear in `dtype`, in place. Under bf16 autocast a Linear's
    weight and bias are cast to bf16 at every call anyway, so this changes no result and
    saves that copy on every step and half the weights' memory. Trainable parameters
    (LoRA, head) stay fp32: they are the master weights the optimizer updates."""
    if dtype == torch.float32:
        return model
    for module in model.modules():
        if isinstance(module, nn.Linear) and not any(p.requires_grad
                                                     for p in module.parameters()):
            module.to(dtype)
    return model


@torch.inference_mode()
def predict_logits(model: GPTModel, token_ids: list[list[int]], pad_id: int,
                   batch_size: int, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Class logits (n, num_classes) in input order, from length-sorted batches."""
    was_training = model.training
    model.eval()
    out = np.zeros((len(token_ids), model.out_head.out_features), dtype=np.float32)
    order = batching.inference_order([len(t) for t in token_ids], batch_size)
    with autocast(device, dtype):
        for batch in batching.batches(token_ids, order, pad_id):
            b = batch.to(device)
            out[batch.index.numpy()] = b.logits(model).float().cpu().numpy()
    model.train(was_training)
    return out


class PackedLinear(nn.Module):
    """A frozen bf16 Linear for CPU inference that also keeps its weight pre-packed in
    oneDNN's blocked layout. A plain weight is re-laid-out inside every oneDNN call; for
    the few rows of a message or a short batch that costs as much as the product itself
    (measured: 73 GEMMs of one 30-token message 17 → 11 ms, same values). From a few
    hundred rows on, oneDNN's plain path is the faster one, so larger inputs take it."""

    PACKED_MAX_ROWS = 256

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > self.PACKED_MAX_ROWS * x.shape[-1]:
            return self.linear(x)
        # Cast as autocast would for the Linear: the result is the same bf16 product.
        return torch.ops.mkldnn._linear_pointwise(x.to(self.linear.weight.dtype),
                                                  self.packed_weight, self.linear.bias,
                                                  "none", [], "")


@functools.cache
def can_pack_bf16() -> bool:
    """Whether this torch build and CPU pre-pack bf16 weights for oneDNN (it needs
    AVX-512 BW/VL/DQ or AVX-NE-CONVERT; plain AVX2 CPUs cannot)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16))
    except (RuntimeError, AttributeError):
        return False
    return True


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


def merged_for_inference(model: GPTModel, dtype: torch.dtype = torch.float32) -> GPTModel:
    """LoRA folded into the base weights (in fp32, then stored in the compute `dtype`):
    inference then costs what the base model costs. bf16 weights on CPU are also
    pre-packed for oneDNN (`PackedLinear`); elsewhere Q, K and V are read as one matrix."""
    model = cast_frozen_linears(freeze(merge(model)), dtype).store_qkv_together()
    return pack_linears(model).eval()


@dataclass(frozen=True)
class ParameterCounts:
    lm_trainable: int  # the LoRA-adapted language model, before the head swap
    lm_total: int
    trainable: int  # the classifier: LoRA + the new head
    total: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def parameter_counts(classifier: GPTModel) -> ParameterCounts:
    """Counts of the classifier and of the LM it was made from. The swap only changed the
    head, so the LM's figures follow: less the new head, plus the LM head, which the
    textbook model (and so the seed's 164,364,288) counts as its own matrix."""
    trainable, total = count_parameters(classifier)
    head = sum(p.numel() for p in classifier.out_head.parameters())
    lm_head = classifier.cfg.vocab_size * classifier.cfg.emb_dim
    return ParameterCounts(trainable - head, total - head + lm_head, trainable, total)


def format_summary(classifier: GPTModel, counts: ParameterCounts) -> str:
    """The model's structure (the first block in full) and its parameter table."""
    lines = [f"{type(classifier).__name__}("]
    for name, module in classifier.named_children():
        if name == "trf_blocks":
            n = len(module)
            first = repr(module[0]).replace("\n", "\n    ")
            lines.append(f"  (trf_blocks): {n} x TransformerBlock, each like block 0:")
            lines.append(f"    (0): {first}")
            if n > 1:
                lines.append(f"    (1-{n - 1}): {n - 1} more, same structure")
        else:
            lines.append(f"  ({name}): {module!r}".replace("\n", "\n  "))
    lines.append(")")
    rows = [("LM + LoRA (before head swap)", counts.lm_trainable, counts.lm_total),
            (f"Classifier ({classifier.out_head.out_features}-class head)",
             counts.trainable, counts.total)]
    lines += ["", f"{'':32}{'trainable':>14}{'total':>16}{'fraction':>10}"]
    lines += [f"{label:32}{t:>14,}{n:>16,}{t / n:>10.2%}" for label, t, n in rows]
    return "\n".join(lines)
