"""The adapter file: what training changed, and how to rebuild the classifier around it.

It holds exactly the parameters that were trained (`train.trainable`): the LoRA matrices
and the new head by default; or the last one or two blocks, the final LayerNorm and the
head; the head alone; or every weight. In its safetensors metadata it holds everything
needed to rebuild the classifier on the public base model: base config, which mode was
trained and which token the head reads, LoRA settings, number of classes, max length;
and the sha256 of its tensors, checked on reading.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import SpamloraError
from .fileio import atomic_path
from .model import GPTConfig
from .presets import LORA_INITS, TARGET_MODULES, TOKENS, TRAINABLE, WEIGHTS

ADAPTER_FORMAT = "spamlora-adapter/1"
# One metadata key only: safetensors writes several in random (hash map) order, which
# would make two identical trainings' adapter files differ byte for byte.
METADATA_KEY = "spamlora"
# Beside "spec" in that metadata: `tensors_sha256` of the tensors as saved. Adapters
# written before it was recorded carry none; they load, with a warning.
DIGEST_KEY = "tensors_sha256"
# Bounds on the base config an adapter file describes, checked before anything is sized
# or looped over by it (`tensor_shapes` makes entries per layer). Far above GPT-2 XL
# (48 layers, width 1,600, 25 heads, 1,024 positions, 50,257 tokens) and above any
# common BPE vocabulary (at most ~262k), yet small enough that a crafted file cannot
# make a loop run for ever or a table fill the memory.
MAX_BASE_CONFIG = {"n_layers": 256, "emb_dim": 16384, "n_heads": 16384,
                   "vocab_size": 1 << 20, "context_length": 1 << 20}
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_CLASSES = 1 << 16  # a crafted count would size the head

log = logging.getLogger(__name__)


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
    # The class names in the head's output order and, of two, the positive one; None
    # (adapters written before classes could be named): ham, spam, the second positive.
    classes: tuple[str, ...] | None = None
    positive: str | None = None
    max_length: int = 1024
    pad_id: int = 50256
    init: str = "reference"
    # sha256 of the base model's files it was trained on (config.json, model.safetensors)
    base_sha256: dict[str, str] | None = None
    # Adapters written before these were recorded were all LoRA reading the last token.
    trainable: str = "lora"  # presets.TRAINABLE; the LoRA fields matter only for `lora`
    token: str = "last"  # presets.TOKENS
    # A random base (model.weights) is rebuilt from its seed wherever the classifier is
    # loaded, and must have the digest (`tensors_digest` of its parameters) it had.
    weights: str = "pretrained"  # presets.WEIGHTS
    base_seed: int | None = None
    random_sha256: str | None = None

    @property
    def reads_base_weights(self) -> bool:
        """Whether the classifier needs the base folder's weights file (besides its
        config and tokenizer)."""
        return self.weights == "pretrained" and self.trainable != "all"

    def check(self, source: str) -> AdapterSpec:
        """The same rules as params.yaml's, plus bounds a file could otherwise abuse (a
        crafted rank would size every layer's A, a crafted n_layers would make
        `tensor_shapes` loop for ever, before any shape is compared). Each rule reads
        only fields checked before it."""
        cfg = self.base_config
        if not isinstance(cfg, GPTConfig):
            raise _invalid(source, "base_config", "must be a GPT-2 config", cfg)
        check_base_config(asdict(cfg), source)
        targets = self.targets
        rules = [
            (lambda: isinstance(self.base_model, str), "base_model", "must be a string"),
            (lambda: isinstance(self.trainable, str) and self.trainable in TRAINABLE,
             "trainable", f"must be one of {list(TRAINABLE)}"),
            (lambda: isinstance(self.token, str) and self.token in TOKENS, "token",
             f"must be one of {list(TOKENS)}"),
            (lambda: isinstance(self.weights, str) and self.weights in WEIGHTS, "weights",
             f"must be one of {list(WEIGHTS)}"),
            (lambda: (self.weights == "random") == (
                _is_int(self.base_seed) and -2 ** 63 <= self.base_seed < 2 ** 64),
             "base_seed", "must be the random base's seed (an integer torch can seed "
             "with), and null for a pretrained one"),
            (lambda: (self.weights == "random") == (
                isinstance(self.random_sha256, str)
                and SHA256.fullmatch(self.random_sha256) is not None), "random_sha256",
             "must be the random base's sha256, and null for a pretrained one"),
            (lambda: _is_int(self.rank) and 1 <= self.rank <= cfg.emb_dim, "rank",
             f"must be an integer in [1, {cfg.emb_dim}] (the base's width)"),
            (lambda: _is_number(self.alpha) and 0 < self.alpha < math.inf, "alpha",
             "must be a positive number"),
            (lambda: _is_number(self.dropout) and 0 <= self.dropout < 1, "dropout",
             "must lie in [0, 1)"),
            (lambda: isinstance(targets, tuple) and len(targets) > 0
             and all(isinstance(t, str) and t in TARGET_MODULES for t in targets)
             and len(set(targets)) == len(targets), "targets",
             f"must be a non-empty subset of {list(TARGET_MODULES)}, each named once"),
            (lambda: _is_int(self.num_classes) and 2 <= self.num_classes <= MAX_CLASSES,
             "num_classes", f"must be an integer in [2, {MAX_CLASSES}]"),
            (lambda: self.classes is None or (
                isinstance(self.classes, tuple) and len(self.classes) == self.num_classes
                and all(isinstance(c, str) and c for c in self.classes)
                and len(set(self.classes)) == len(self.classes)), "classes",
             "must be null or name each of num_classes classes once"),
            (lambda: self.positive is None or (
                self.num_classes == 2 and self.positive in self.class_names), "positive",
             "must be null or, for two classes, one of them"),
            (lambda: _is_int(self.max_length) and 1 <= self.max_length <= cfg.context_length,
             "max_length", f"must be an integer in [1, {cfg.context_length}]"),
            (lambda: _is_int(self.pad_id) and 0 <= self.pad_id < cfg.vocab_size, "pad_id",
             f"must be a token id in [0, {cfg.vocab_size})"),
            (lambda: isinstance(self.init, str) and self.init in LORA_INITS, "init",
             f"must be one of {list(LORA_INITS)}"),
            (lambda: self.base_sha256 is None or (
                isinstance(self.base_sha256, dict) and all(
                    isinstance(k, str) and isinstance(v, str) and SHA256.fullmatch(v)
                    for k, v in self.base_sha256.items())), "base_sha256",
             "must be null or map file names to sha256 hex digests"),
        ]
        for ok, field, rule in rules:
            if not ok():
                raise _invalid(source, field, rule, getattr(self, field))
        return self

    @property
    def class_names(self) -> tuple[str, ...]:
        if self.classes is not None:
            return self.classes
        return ("ham", "spam") if self.num_classes == 2 else tuple(
            str(i) for i in range(self.num_classes))

    @property
    def positive_index(self) -> int | None:
        """The positive class of two (the second unless named); None for more."""
        if self.num_classes != 2:
            return None
        return 1 if self.positive is None else self.class_names.index(self.positive)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The name and shape of every tensor the adapter file must hold."""
        if self.trainable != "lora":
            n_layers = self.base_config.n_layers
            return {name: shape for name, shape in
                    classifier_shapes(self.base_config, self.num_classes).items()
                    if is_trained(name, self.trainable, n_layers)}
        d = self.base_config.emb_dim
        dims = {"query": (d, d), "key": (d, d), "value": (d, d), "attn_out": (d, d),
                "mlp_fc": (d, 4 * d), "mlp_proj": (4 * d, d)}
        shapes = {"out_head.weight": (self.num_classes, d),
                  "out_head.bias": (self.num_classes,)}
        for block in range(self.base_config.n_layers):
            for target in self.targets:
                path = f"trf_blocks.{block}.{TARGET_MODULES[target]}.lora"
                in_dim, out_dim = dims[target]
                shapes[f"{path}.A"] = (in_dim, self.rank)
                shapes[f"{path}.B"] = (self.rank, out_dim)
        return shapes

    def to_metadata(self, tensors_sha256: str | None = None) -> dict[str, str]:
        """The file's metadata; `tensors_sha256`: the digest of its tensors
        (`tensors_digest`), which `save_adapter` always records."""
        d = asdict(self)
        d["base_config"] = asdict(self.base_config)
        d["targets"] = list(self.targets)
        if self.classes is not None:
            d["classes"] = list(self.classes)
        stored = {"format": ADAPTER_FORMAT, "spec": d}
        if tensors_sha256 is not None:
            stored[DIGEST_KEY] = tensors_sha256
        return {METADATA_KEY: json.dumps(stored, sort_keys=True)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str] | None, source: str) -> AdapterSpec:
        stored = _stored_metadata(meta, source)
        try:
            # Adapters written before `init` was recorded were all trained `textbook`.
            d = {"init": "textbook", **stored["spec"]}
            d["base_config"] = GPTConfig(**check_base_config(d["base_config"], source))
            if not isinstance(d["targets"], list):
                raise TypeError(f"targets must be a list, got {d['targets']!r}")
            d["targets"] = tuple(d["targets"])
            if isinstance(d.get("classes"), list):
                d["classes"] = tuple(d["classes"])
            spec = cls(**d)
        except AdapterError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterError(f"{source}: unreadable adapter metadata: {e}") from None
        return spec.check(source)


def classifier_shapes(cfg: GPTConfig, num_classes: int) -> dict[str, tuple[int, ...]]:
    """The name and shape of every parameter of a classifier without LoRA (model.py's
    layout, its head swapped for `num_classes` outputs), from the config alone: a file
    is checked against it before any model is built."""
    d, ff = cfg.emb_dim, 4 * cfg.emb_dim
    shapes = {"tok_emb.weight": (cfg.vocab_size, d), "pos_emb.weight": (cfg.context_length, d)}
    for block in range(cfg.n_layers):
        p = f"trf_blocks.{block}."
        for name, (out_dim, in_dim) in {"att.W_query": (d, d), "att.W_key": (d, d),
                                        "att.W_value": (d, d), "att.out_proj": (d, d),
                                        "ff.layers.0": (ff, d), "ff.layers.2": (d, ff)}.items():
            shapes[f"{p}{name}.weight"] = (out_dim, in_dim)
            shapes[f"{p}{name}.bias"] = (out_dim,)
        for norm in ("norm1", "norm2"):
            shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (d,)
    shapes["final_norm.weight"] = shapes["final_norm.bias"] = (d,)
    shapes["out_head.weight"], shapes["out_head.bias"] = (num_classes, d), (num_classes,)
    return shapes


BLOCK = re.compile(r"trf_blocks\.(\d+)\.")


def is_trained(name: str, trainable: str, n_layers: int) -> bool:
    """Whether a classifier's parameter `name` is trained in mode `trainable`, with
    LLMs-from-scratch's meanings; the head always is."""
    if name.startswith("out_head.") or trainable == "all":
        return True
    if trainable == "lora":
        return ".lora." in name
    if trainable in ("last_block", "last_two_blocks"):
        if name.startswith("final_norm."):
            return True
        block = BLOCK.match(name)
        last = 1 if trainable == "last_block" else 2
        return block is not None and int(block[1]) >= n_layers - last
    return False  # last_layer: the head alone


def _stored_metadata(meta: dict[str, str] | None, source: str) -> dict:
    """The JSON object stored under `METADATA_KEY`, with the right format."""
    try:
        stored = json.loads((meta or {})[METADATA_KEY])
    except (KeyError, ValueError):
        stored = {}
    if not isinstance(stored, dict) or stored.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{source}: not a spamlora adapter (no {ADAPTER_FORMAT!r} "
                           f"metadata)")
    return stored


def _invalid(source: str, field: str, rule: str, value: object) -> AdapterError:
    return AdapterError(f"{source}: adapter metadata {field} {rule}, got {value!r}")


def check_base_config(config: object, source: str) -> dict:
    """`config` (an adapter's base_config mapping) with every field checked: each size an
    integer within `MAX_BASE_CONFIG`, before anything is sized or looped over by it."""
    if not isinstance(config, dict):
        raise _invalid(source, "base_config", "must be a mapping", config)
    unknown = sorted(set(config) - {f.name for f in fields(GPTConfig)}, key=str)
    if unknown:
        raise _invalid(source, "base_config", "has unknown field(s)", unknown)
    for name, most in MAX_BASE_CONFIG.items():
        value = config.get(name, getattr(GPTConfig, name))
        if not (_is_int(value) and 1 <= value <= most):
            raise _invalid(source, f"base_config.{name}", f"must be an integer in [1, {most}]",
                           value)
    drop_rate = config.get("drop_rate", GPTConfig.drop_rate)
    if not (_is_number(drop_rate) and 0 <= drop_rate < 1):
        raise _invalid(source, "base_config.drop_rate", "must lie in [0, 1)", drop_rate)
    eps = config.get("layer_norm_eps", GPTConfig.layer_norm_eps)
    if not (_is_number(eps) and 0 < eps < 1):
        raise _invalid(source, "base_config.layer_norm_eps", "must be a number in (0, 1)", eps)
    return config


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()
            if p.requires_grad}


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """The sha256 of named tensors: for each in name order, its name, dtype and shape
    (one JSON line), then its bytes in this machine's order (little-endian, as safetensors
    stores them, on x86 and ARM)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        line = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
        digest.update(line.encode() + b"\n")
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_adapter(model: nn.Module, spec: AdapterSpec, path: str | Path) -> None:
    """Write the adapter file: the trainable tensors, and in the metadata the spec and
    the tensors' digest, which `read_adapter` checks."""
    tensors = trainable_state(model)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=spec.to_metadata(tensors_digest(tensors)))


def read_spec(path: str | Path) -> AdapterSpec:
    """The validated spec of an adapter file, none of its tensors read (an adapter of
    every weight is the size of the model)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter not found (train one with `dvc repro train`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return AdapterSpec.from_metadata(f.metadata(), str(path))
    except SafetensorError as e:
        raise AdapterError(f"{path}: unreadable adapter file (truncated or corrupt?): "
                           f"{e}") from None


def read_adapter(path: str | Path) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """The spec and tensors of an adapter file, every field validated and every tensor's
    name and shape checked against the spec from the file's header, before any tensor is
    read or any model built; then the tensors checked against the digest saved with them
    (an adapter written before digests were recorded loads, with a warning)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"{path}: adapter not found (train one with `dvc repro train`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            spec = AdapterSpec.from_metadata(f.metadata(), str(path))
            want = _stored_metadata(f.metadata(), str(path)).get(DIGEST_KEY)
            if want is not None and not (isinstance(want, str) and SHA256.fullmatch(want)):
                raise _invalid(str(path), DIGEST_KEY, "must be a sha256 hex digest", want)
            expected = spec.tensor_shapes()
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            missing, unexpected = sorted(set(expected) - set(stored)), sorted(
                set(stored) - set(expected))
            if missing or unexpected:
                raise AdapterError(f"{path}: does not fit the classifier it describes "
                                   f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            for name, shape in expected.items():
                if stored[name] != shape:
                    raise AdapterError(f"{path}: tensor {name!r} has shape {stored[name]}, "
                                       f"its metadata implies {shape}")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise AdapterError(f"{path}: unreadable adapter file (truncated or corrupt?): "
                           f"{e}") from None
    if want is None:
        log.warning("%s: carries no digest of its tensors (written before spamlora "
                    "recorded one), so damage to it cannot be detected", path)
    elif (got := tensors_digest(tensors)) != want:
        raise AdapterError(f"{path}: damaged: its tensors have sha256 {got}, not the "
                           f"{want} recorded when it was saved; restore it (the "
                           f"pipeline's: `dvc checkout data/train`) or train it again")
    return spec, tensors


