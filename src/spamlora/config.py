"""The pipeline's parameters as one validated, typed object.

Stages read `params.yaml` with `load_params(path)` and pass the sections they need to the
library; nothing in the library opens `params.yaml` on its own. Every error names the
file and the dotted parameter, e.g. ``params.yaml: train.lr must be > 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import yaml

from .download import URL_SCHEMES, is_url
from .errors import SpamloraError
from .hub import MODEL_FILES, resolve_revision, resolve_sha256
from .presets import LORA_INITS, PRESETS, TARGET_MODULES, TOKENS, TRAINABLE, WEIGHTS

LORA_TARGETS = tuple(TARGET_MODULES)


class ParamsError(SpamloraError, ValueError):
    pass


@dataclass(frozen=True)
class DownloadParams:
    timeout: float = 30.0  # seconds, for connecting and for each read
    retries: int = 3  # further tries after the first, with exponential back-off

    def check(self, err) -> None:
        err(self.timeout > 0, "timeout", "must be > 0")
        err(self.retries >= 0, "retries", "must be >= 0")


DATA_FORMATS = ("uci-sms", "csv", "tsv", "jsonl", "parquet")
BALANCE_MODES = ("undersample", "none")
# Keys of each split's counts in metrics/data.json beside the class names: a class may not
# be called so.
RESERVED_CLASS_NAMES = ("rows", "in_train")


@dataclass(frozen=True)
class DataParams:
    format: str = "uci-sms"  # uci-sms: the SMS Spam Collection zip; else a labelled file
    url: str = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
    mirrors: list[str] = field(default_factory=list)
    sha256: str | None = None
    text_column: str = "text"  # csv, tsv, jsonl, parquet: the message's column (key)
    label_column: str = "label"
    # The classes in order: the head's outputs and every report follow it. None: the
    # sorted distinct labels of the data (uci-sms: ham, spam).
    classes: list[str] | None = None
    # Two classes: the one whose precision, recall and ROC are reported (None: the second).
    positive: str | None = "spam"
    on_bad_line: str = "error"
    dedupe: bool = False  # drop repeated texts before balancing: no text in two splits
    balance: str = "undersample"  # undersample: every class cut to the smallest | none
    stratify: bool = False  # split each class in the same fractions
    seed: int = 123
    train_frac: float = 0.7
    val_frac: float = 0.1

    def check(self, err) -> None:
        err(self.format in DATA_FORMATS, "format",
            f"must be one of {list(DATA_FORMATS)}, got {self.format!r}")
        for i, url in enumerate([self.url, *self.mirrors]):
            err(_url_ok(url), "url" if i == 0 else f"mirrors[{i - 1}]",
                f"must be an {'/'.join(URL_SCHEMES)} URL or a local path, got {url!r}")
        err(self.sha256 is None or _is_sha256(self.sha256), "sha256",
            "must be 64 hex digits or null")
        err(bool(self.text_column), "text_column", "must name a column")
        err(bool(self.label_column), "label_column", "must name a column")
        err(self.text_column != self.label_column, "label_column",
            f"must differ from data.text_column, got {self.label_column!r} for both")
        if self.classes is not None:
            check_class_names(self.classes, lambda ok, why: err(ok, "classes", why))
            err(self.positive is None or len(self.classes) == 2, "positive",
                f"is for two classes only: set it to null for the {len(self.classes)} "
                f"classes {self.classes}")
            err(self.positive is None or self.positive in self.classes, "positive",
                f"must be one of data.classes {self.classes} or null, got {self.positive!r}")
        err(self.on_bad_line in ("error", "skip"), "on_bad_line", "must be 'error' or 'skip'")
        err(self.balance in BALANCE_MODES, "balance",
            f"must be one of {list(BALANCE_MODES)}, got {self.balance!r}")
        err(0 < self.train_frac < 1, "train_frac", "must lie in (0, 1)")
        err(0 < self.val_frac < 1, "val_frac", "must lie in (0, 1)")
        err(self.train_frac + self.val_frac < 1, "val_frac",
            "train_frac + val_frac must be < 1 (the rest is the test split)")

    @property
    def urls(self) -> list[str]:
        return [self.url, *self.mirrors]


@dataclass(frozen=True)
class ModelParams:
    name: str = "gpt2"
    # `{name}` and `{revision}` are filled in; the folder must hold hub.MODEL_FILES.
    url: str = "https://huggingface.co/openai-community/{name}/resolve/{revision}"
    revision: str = "auto"  # auto: the commit pinned for `name` in hub.PINS
    # auto: the pinned sha256 of each file; {file: sha256}: these; None: no check
    sha256: str | dict[str, str] | None = "auto"
    # pretrained | random: PyTorch's initialisation seeded by train.seed, weights not read
    weights: str = "pretrained"

    def check(self, err) -> None:
        err(self.name in PRESETS, "name", f"must be one of {sorted(PRESETS)}")
        err(self.weights in WEIGHTS, "weights",
            f"must be one of {list(WEIGHTS)}, got {self.weights!r}")
        err(_url_ok(self.url), "url", f"must be an {'/'.join(URL_SCHEMES)} URL or a local "
                                      f"path, got {self.url!r}")
        err(bool(self.revision) and "/" not in self.revision, "revision",
            f"must be auto or a revision (commit, tag, branch), got {self.revision!r}")
        if isinstance(self.sha256, str):
            err(self.sha256 == "auto", "sha256",
                f"must be auto, null or a mapping {{file: sha256}}, got {self.sha256!r}")
        for file, digest in (self.sha256 or {}).items() if isinstance(self.sha256,
                                                                        dict) else ():
            err(file in MODEL_FILES, f"sha256.{file}",
                f"is not one of the model's files {list(MODEL_FILES)}")
            err(_is_sha256(digest), f"sha256.{file}", "must be 64 hex digits")

    @property
    def resolved_revision(self) -> str:
        return resolve_revision(self.name, self.revision)

    @property
    def expected_sha256(self) -> dict[str, str] | None:
        """Each file's expected sha256 (None: unchecked, by choice or for want of pins)."""
        return resolve_sha256(self.name, self.sha256)

    @property
    def base_url(self) -> str:
        return self.url.replace("{name}", self.name).replace("{revision}",
                                                             self.resolved_revision)


@dataclass(frozen=True)
class LoRAParams:
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    init: str = "reference"  # how A starts: reference (fan-in in_dim) | textbook (fan-in r)

    def check(self, err) -> None:
        err(self.rank >= 1, "rank", "must be >= 1")
        err(self.alpha > 0, "alpha", "must be > 0")
        err(0 <= self.dropout < 1, "dropout", "must lie in [0, 1)")
        err(len(self.targets) > 0, "targets", "must name at least one layer")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        err(not bad, "targets", f"unknown target(s) {bad}; choose from {list(LORA_TARGETS)}")
        err(self.init in LORA_INITS, "init", f"must be one of {list(LORA_INITS)}")


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 2
    batch_size: int = 8
    lr: float = 8e-4
    weight_decay: float = 0.1
    seed: int = 123
    # None: longest training message; model: the model's context; each capped at the context
    max_length: int | str | None = None
    device: str = "auto"  # auto: cuda, then mps, then cpu
    precision: str = "auto"  # auto: bf16 where the hardware computes it natively, else fp32
    # packed: a batch's messages end to end, no padding; batch: one a row, padded to the
    # batch's longest; max_length: padded to max_length (the textbook way)
    padding: str = "packed"
    group_by_length: bool = False  # draw batches from messages of similar length
    nproc: int = 1  # processes under torchrun (DistributedDataParallel); batch is global
    checkpoint_seconds: float = 300.0  # also at every epoch's end; 0: after every step
    trainable: str = "lora"  # what is trained besides the head (presets.TRAINABLE)
    token: str = "last"  # which hidden state of each message the head reads

    def check(self, err) -> None:
        err(self.trainable in TRAINABLE, "trainable",
            f"must be one of {list(TRAINABLE)}, got {self.trainable!r}")
        err(self.token in TOKENS, "token", f"must be one of {list(TOKENS)}, got {self.token!r}")
        err(self.epochs >= 1, "epochs", "must be >= 1")
        err(self.batch_size >= 1, "batch_size", "must be >= 1")
        err(self.lr > 0, "lr", "must be > 0")
        err(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        err(self.max_length in (None, "model") or (
            isinstance(self.max_length, int) and self.max_length >= 1), "max_length",
            f"must be null, model or an integer >= 1, got {self.max_length!r}")
        err(self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
            "device", "must be auto, cpu, cuda, cuda:N or mps")
        err(self.precision in ("auto", "fp32", "bf16"), "precision",
            "must be auto, fp32 or bf16")
        err(self.padding in ("packed", "batch", "max_length"), "padding",
            "must be packed, batch or max_length")
        err(self.nproc >= 1, "nproc", "must be >= 1")
        err(self.checkpoint_seconds >= 0, "checkpoint_seconds", "must be >= 0")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 64
    precision: str = "auto"  # as train.precision; `spamlora predict` uses the same

    def check(self, err) -> None:
        err(self.batch_size >= 1, "batch_size", "must be >= 1")
        err(self.precision in ("auto", "fp32", "bf16"), "precision",
            "must be auto, fp32 or bf16")


@dataclass(frozen=True)
class Params:
    download: DownloadParams = field(default_factory=DownloadParams)
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    lora: LoRAParams = field(default_factory=LoRAParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)

    @classmethod
    def from_dict(cls, raw: object, source: str = "params") -> Params:
        """Build and validate; unknown, missing or mistyped keys are errors."""
        return _build(cls, raw, source, "")

    def flat(self) -> dict[str, object]:
        """Every parameter as `section.key` -> value (for MLflow)."""
        return {f"{s}.{k}": v for s, sec in dataclasses.asdict(self).items()
                for k, v in sec.items()}


def load_params(path: str | Path) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    return Params.from_dict(raw, source=str(path))


def metric_name(name: str) -> str:
    """A key (a class name) as it is put in a metric name (letters, digits, `_`, `-`,
    space; dots would read as nesting): anything else becomes `_`."""
    return re.sub(r"[^\w\- ]", "_", name).strip() or "_"


def check_class_names(classes: list[str], err) -> None:
    """Rules for a list of class names, from params.yaml or found in the data."""
    err(len(classes) >= 2, f"must list two or more classes, got {classes}")
    err(all(c != "" for c in classes), f"must not hold an empty name, got {classes}")
    twice = sorted({c for c in classes if classes.count(c) > 1})
    err(not twice, f"names {twice} more than once")
    # Two names that make one metric name would log into one MLflow metric.
    same = sorted({c for c in classes if c not in twice and sum(
        metric_name(o) == metric_name(c) for o in classes) > 1})
    err(not same, f"names {same} make the same metric name "
                  f"{sorted({metric_name(c) for c in same})}: rename one of each")
    reserved = [c for c in classes if c in RESERVED_CLASS_NAMES or c.endswith("_in_train")]
    err(not reserved, f"may not use the names {reserved} (metrics/data.json's own keys)")


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(
        c in "0123456789abcdef" for c in value.lower())


def _url_ok(url: object) -> bool:
    if not isinstance(url, str) or not url:
        return False
    return is_url(url) or urlparse(url).scheme == "" or len(urlparse(url).scheme) == 1


def _check_type(value: object, hint: object) -> bool:
    if hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_check_type(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _check_type(k, key) and _check_type(v, item) for k, v in value.items())
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)  # type: ignore[arg-type]


def _yaml11_float(text: str) -> object:
    try:
        return float(text)
    except ValueError:
        return text


def _type_name(hint: object) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls, raw, source: str, prefix: str):
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: {where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"{source}: unknown parameter(s) "
                          f"{', '.join(prefix + str(k) for k in unknown)}")
    values = {}
    for name in fields:
        dotted = prefix + name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if name not in raw:
                raise ParamsError(f"{source}: missing section {dotted}")
            values[name] = _build(hint, raw[name], source, dotted + ".")
            continue
        if name not in raw:
            # Every key must be in params.yaml: DVC tracks each one and `dvc exp run -S`
            # only sets keys that exist.
            raise ParamsError(f"{source}: missing parameter {dotted}")
        value = raw[name]
        if hint is float and isinstance(value, str):
            value = _yaml11_float(value)  # PyYAML reads `8e-4` (no dot) as a string
        if not _check_type(value, hint):
            raise ParamsError(f"{source}: {dotted} must be {_type_name(hint)}, "
                              f"got {value!r}")
        values[name] = float(value) if hint is float else value
    obj = cls(**values)
    if hasattr(obj, "check"):
        def err(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ParamsError(f"{source}: {prefix}{key} {message}")
        obj.check(err)
    return obj
