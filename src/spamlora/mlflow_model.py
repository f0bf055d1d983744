"""The trained classifier as an MLflow pyfunc model that references its base weights.

A logged model holds the adapter (~5 MB for GPT-2 124M, rank 8) and, in its
`model_config`, a reference to the base: the preset name, where it was downloaded from
and the sha256 of each of its four files. Never the base itself: every run would
otherwise copy 0.5-6 GB into the artifact store. At load time the base is looked for, in
order (`find_base`):

1. an explicit folder: `model_config={"base_model": ...}` or `SPAMLORA_BASE_MODEL`;
2. the folder it was trained from, if it still holds the same files;
3. the cache `$XDG_CACHE_HOME/spamlora/models/<name>-<12 hex of the weights' sha256>`
   (default `~/.cache/...`);
4. a download from the recorded URL into that cache, every file verified.

A base whose files differ from the reference is refused, naming the file. Loading then
goes through `Predictor`, the code `spamlora predict` and the evaluate stage use: LoRA
merged, packed inference, the same probabilities.

A classifier that reads no base weights (`train.trainable: all`: its adapter holds every
weight; `model.weights: random`: its base is rebuilt from a seed) has none to reference:
its model carries the base's config and tokenizer files (`BASE_FILES`, ~1.5 MB), with
`base: null` in its `model_config`.

The model is logged as code, not as a pickle: its code is `model_code.py`, which MLflow
runs at load time. Every `model_config` value is checked (`read_model_config`) before
it names a file or folder: a model from a shared store may have been crafted.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import AnyType, DataType, Map

from .adapter import AdapterSpec, read_spec
from .config import DownloadParams, ModelParams
from .errors import SpamloraError
from .hub import MODEL_FILES, file_sha256, spamlora_cache_dir
from .inference import predictions
from .predictor import Predictor
from .presets import PRESETS
from .weights import base_fingerprint, fetch_model

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name in every run
# On each logged model: `file_sha256` of its adapter, by which a rerun on the same run
# (a training killed after logging its model, then resumed) finds it instead of logging
# a second one.
ADAPTER_DIGEST_TAG = "spamlora.adapter_sha256"
BASE_MODEL_ENV = "SPAMLORA_BASE_MODEL"
ADAPTER_ARTIFACT = "adapter"
# What a model of every weight carries of its base: the architecture and the tokenizer.
BASE_FILES_ARTIFACT = "base_files"
BASE_FILES = tuple(f for f in MODEL_FILES if f != "model.safetensors")
TEXT_COLUMN = "text"
# Unnamed, so that `{"inputs": ["msg", ...]}` and a plain list pass MLflow's schema
# check (a named column refuses them); `predict` then takes the `text` column. `any`, not
# `string`: for a string column MLflow's `inputs` parser casts numbers and null to text
# ("7", "None") before the model sees them; `model_texts` checks the types instead, so a
# non-string message is an HTTP 400 in every payload form.
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(AnyType())]),
    outputs=Schema([ColSpec("string", "label"), ColSpec("double", "spam_probability")]))


def signature(spec: AdapterSpec) -> ModelSignature:
    """The served model's columns: `label` (a class name) and `probabilities` keyed by
    class; of two classes also the positive one's, `<positive>_probability` (the SMS
    model's `spam_probability`, which clients of old read)."""
    outputs = [ColSpec("string", "label")]
    if spec.positive_index is not None:
        outputs.append(ColSpec("double",
                               f"{spec.class_names[spec.positive_index]}_probability"))
    outputs.append(ColSpec(Map(DataType.double), "probabilities"))
    return ModelSignature(inputs=SIGNATURE.inputs, outputs=Schema(outputs))
INPUT_EXAMPLE = ["WINNER!! You have been selected to receive a £900 prize reward! Call now",
                 "Are we still on for lunch tomorrow?"]
# What a logged model's `model_config` holds besides its base reference; each can be
# overridden at load time (MLflow overrides only the keys a model was logged with).
# `base_model`: a folder holding the base, tried first; `download`: DownloadParams' fields.
DEFAULT_CONFIG = {"base_model": None, "download": asdict(DownloadParams()), "device": "auto",
                  "precision": "auto", "batch_size": 64, "threshold": 0.5}
PRECISIONS = ("auto", "fp32", "bf16")
# This file, logged with each model as its code (MLflow's "models from code").
MODEL_CODE = Path(__file__).with_name("model_code.py")
# What the model needs at load time besides spamlora itself (not on PyPI: the model is
# served where spamlora is installed, `--env-manager local`).
RUNTIME_PACKAGES = ("torch", "tiktoken", "safetensors", "numpy", "pandas", "mlflow")


class BaseModelError(SpamloraError):
    """No base model with the files the adapter was trained on could be found."""


class InvalidInput(MlflowException, ValueError):
    """Messages the model cannot score: HTTP 400 with this message when served (MLflow
    answers any other exception in `predict` with a generic one)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class ModelConfigError(SpamloraError, ValueError):
    """A `model_config` value that log_model would not have written (a crafted or damaged
    model, a mistyped override): refused before it names any file or folder."""


def _config_error(key: str, must: str, value: object) -> ModelConfigError:
    return ModelConfigError(f"model_config {key} {must}, got {value!r}")


SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
# One path component: a Hub revision (commit, tag, branch without `/`), never `..`.
REVISION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _path_text(value: object) -> bool:
    return isinstance(value, str) and bool(value) and "\0" not in value


class Busy(MlflowException, TimeoutError):
    """A request the server could not score in time: HTTP 503, so a client retries."""

    def __init__(self, message: str):
        super().__init__(message, error_code=TEMPORARILY_UNAVAILABLE)


@dataclass(frozen=True)
class BaseReference:
    """Which base an adapter needs, by content: each of its files' sha256."""
    name: str
    url: str  # the folder it was downloaded from (revision filled in)
    revision: str  # the Hub commit, to find the files in a Hugging Face cache
    sha256: dict[str, str]  # every file of hub.MODEL_FILES
    trained_from: str  # the absolute folder it was trained from

    def __post_init__(self):
        """Each field as log_model writes it: the cache folder is built from the name and
        a sha256, the Hugging Face cache is searched by the revision."""
        if not isinstance(self.name, str) or self.name not in PRESETS:
            raise _config_error("base.name", f"must be one of {sorted(PRESETS)}", self.name)
        if not _path_text(self.url):
            raise _config_error("base.url", "must be a URL or a folder", self.url)
        if not isinstance(self.revision, str) or not REVISION_PATTERN.fullmatch(
                self.revision):
            raise _config_error("base.revision", "must be a Hub revision (letters, digits, "
                                ". _ -)", self.revision)
        if not isinstance(self.sha256, Mapping) or set(self.sha256) != set(MODEL_FILES):
            raise _config_error("base.sha256", f"must map each of {list(MODEL_FILES)} to "
                                "its sha256", self.sha256)
        for file, digest in self.sha256.items():
            if not isinstance(digest, str) or not SHA256_PATTERN.fullmatch(digest):
                raise _config_error(f"base.sha256[{file!r}]", "must be 64 lowercase hex "
                                    "digits", digest)
        if not _path_text(self.trained_from) or not os.path.isabs(self.trained_from):
            raise _config_error("base.trained_from", "must be an absolute path",
                                self.trained_from)

    @classmethod
    def from_config(cls, value: object) -> BaseReference:
        """The reference a model_config's `base` holds: exactly this class's fields."""
        names = {f.name for f in fields(cls)}
        if not isinstance(value, Mapping) or set(value) != names:
            raise _config_error("base", f"must have exactly the keys {sorted(names)}",
                                value)
        return cls(**value)

    @classmethod
    def of_folder(cls, folder: Path, model: ModelParams) -> BaseReference:
        """The reference of the base model in `folder`, downloaded per `model`."""
        return cls(model.name, model.base_url, model.resolved_revision,
                   base_fingerprint(folder, MODEL_FILES), str(Path(folder).resolve()))

    @property
    def cache_folder(self) -> Path:
        return spamlora_cache_dir() / "models" / (
            f"{self.name}-{self.sha256['model.safetensors'][:12]}")

    def mismatch(self, folder: Path) -> str | None:
        """Why `folder` is not this base (the first file missing or different), or None."""
        for file in MODEL_FILES:
            path = folder / file
            if not path.is_file():
                return f"{path} is missing"
            got = file_sha256(path)
            if got != self.sha256[file]:
                return (f"{path} has sha256 {got}, but the adapter was trained on a base "
                        f"whose {file} has {self.sha256[file]}")
        return None


def find_base(ref: BaseReference, explicit: str | Path | None,
              download: DownloadParams | None = None) -> Path:
    """The folder holding `ref`'s files (module docstring for the order). An explicit
    folder that differs is an error, not skipped: the user asked for that one."""
    download = download or DownloadParams()
    explicit = explicit or os.environ.get(BASE_MODEL_ENV)
    if explicit:
        folder = Path(explicit)
        if why := ref.mismatch(folder):
            raise BaseModelError(f"base model {folder} refused: {why}")
        return folder
    trained_from = Path(ref.trained_from)
    if trained_from.is_dir():
        why = ref.mismatch(trained_from)
        if why is None:
            return trained_from
        log.info("not using the folder the adapter was trained from: %s", why)
    cache = ref.cache_folder
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Several server workers may start at once: one downloads, the others then find it
    # (fetch_model would otherwise clear another writer's half-done folder).
    with FileLock(cache.parent / f"{cache.name}.lock"):
        if cache.is_dir():
            why = ref.mismatch(cache)
            if why is None:
                return cache
            log.warning("cached base model %s is damaged (%s): downloading it again",
                        cache, why)
        log.info("downloading base model %s from %s into %s", ref.name, ref.url, cache)
        try:
            fetch_model(ref.name, ref.url, cache, download.timeout, download.retries,
                        ref.revision, ref.sha256)
        except SpamloraError as e:
            raise BaseModelError(f"base model {ref.name} for this adapter is not on this "
                                 f"machine and could not be downloaded: {e}. Set "
                                 f"{BASE_MODEL_ENV} to a folder holding it.") from None
    return cache


def model_texts(model_input: object) -> list[str]:
    """The messages of a pyfunc input: a list of strings, or a DataFrame whose `text`
    column (or only, unnamed column) holds them. Anything else is an `InvalidInput`,
    which MLflow's scoring server answers with HTTP 400 and its message."""
    if isinstance(model_input, pd.DataFrame):
        columns = list(model_input.columns)
        if TEXT_COLUMN in columns:
            column = TEXT_COLUMN
        elif columns == [0]:  # a list or `inputs` payload, after MLflow's schema check
            column = 0
        else:
            raise InvalidInput(f"expected a {TEXT_COLUMN!r} column, got columns {columns}")
        values = model_input[column].tolist()
    elif isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        values = list(model_input)
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        raise InvalidInput(f"expected a list of messages or a DataFrame with a "
                           f"{TEXT_COLUMN!r} column, got {type(model_input).__name__}")
    if not values:
        raise InvalidInput("no messages given")
    for i, text in enumerate(values):
        if not isinstance(text, str):
            raise InvalidInput(f"message {i} is {type(text).__name__}, not a string")
        if not text.strip():
            raise InvalidInput(f"message {i} is empty")
    return values


class SpamloraModel(mlflow.pyfunc.PythonModel):
    """Loads the base and adapter once per process, LoRA merged (Predictor). MLflow's
    scoring server calls `predict` from a thread per request: one scores at a time, as
    concurrent calls would only split the same cores between them."""

    def load_context(self, context) -> None:
        self.lock = threading.Lock()
        self.seconds_per_message = 0.0  # measured, for requests that could not finish
        config = read_model_config(context.model_config or {})
        self.threshold = config.threshold
        adapter = context.artifacts[ADAPTER_ARTIFACT]
        carried = context.artifacts.get(BASE_FILES_ARTIFACT)
        if (config.base is None) != (not read_spec(adapter).reads_base_weights):
            raise ModelConfigError("model_config base must be null exactly for an adapter "
                                   "that reads no base weights (train.trainable: all, or "
                                   "model.weights: random), got "
                                   f"{'null' if config.base is None else 'a base'}")
        if config.base is None and carried is None:
            raise ModelConfigError(f"model_config base is null, but the model carries no "
                                   f"{BASE_FILES_ARTIFACT!r}")
        self.predictor = _being_logged(config.base, adapter)
        if self.predictor is None:
            if config.base is None:
                base, digests = carried, None
            else:
                base = find_base(config.base, config.base_model, config.download)
                # find_base hashed every file against the reference: no second pass
                digests = config.base.sha256
            self.predictor = Predictor(base, adapter, device=config.device,
                                       precision=config.precision,
                                       batch_size=config.batch_size, strict=True,
                                       base_sha256=digests)

    # The hint is one MLflow infers no schema from (SIGNATURE is given) and converts
    # nothing for; without one it warns on every import. model_texts takes lists too.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        texts = model_texts(model_input)
        arrived = time.monotonic()
        # Under `mlflow models serve`, a request not answered within its timeout has
        # had its 504 already: scoring it anyway would only delay those behind it. So
        # is one that would finish too late, at the rate the last requests were scored.
        limit = float(os.environ.get("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT") or -1)
        if not self.lock.acquire(timeout=limit):
            raise Busy(f"not scored: the server was busy for the whole request "
                       f"timeout ({limit:.0f} s)")
        try:
            left = arrived + limit - time.monotonic()
            needed = len(texts) * self.seconds_per_message
            if limit > 0 and needed > left:
                raise Busy(f"not scored: {len(texts)} messages take ~{needed:.0f} s "
                           f"here, {max(left, 0):.0f} s of the request timeout "
                           f"({limit:.0f} s) were left")
            start = time.monotonic()
            probs, truncated = self.predictor.probabilities(texts)
            rate = (time.monotonic() - start) / len(texts)
            self.seconds_per_message = rate if not self.seconds_per_message else (
                0.7 * self.seconds_per_message + 0.3 * rate)
        finally:
            self.lock.release()
        for i in truncated:
            log.warning("message %d is longer than %d tokens and was truncated", i,
                        self.predictor.spec.max_length)
        spec = self.predictor.spec
        names, positive = spec.class_names, spec.positive_index
        out = {"label": np.array(names)[predictions(probs, positive, self.threshold)]}
        if positive is not None:
            out[f"{names[positive]}_probability"] = probs[:, positive]
        out["probabilities"] = [dict(zip(names, map(float, row), strict=True))
                                for row in probs]
        return pd.DataFrame(out)


@dataclass(frozen=True)
class ModelConfig:
    """A logged model's `model_config`, with the overrides given at load time, checked."""
    base: BaseReference | None  # None: the model carries its weights (`BASE_FILES`)
    base_model: str | None
    download: DownloadParams
    device: str
    precision: str
    batch_size: int
    threshold: float


def read_model_config(config: Mapping[str, object]) -> ModelConfig:
    """`config` checked, each value, before any of it names a file or folder (a model
    from a shared store may have been crafted); a key it lacks takes its default (a model
    logged by an older spamlora). An unknown key is an error, not ignored."""
    if not isinstance(config, Mapping):
        raise ModelConfigError(f"model_config must be a mapping, got {config!r}")
    unknown = set(config) - {"base", *DEFAULT_CONFIG}
    if unknown:
        raise ModelConfigError(f"model_config has unknown keys {sorted(unknown)}: it takes "
                               f"{sorted({'base', *DEFAULT_CONFIG})}")
    if "base" not in config:
        raise ModelConfigError("model_config has no `base`: not a spamlora model")
    values = {**DEFAULT_CONFIG, **config}
    base_model = values["base_model"]
    if base_model is not None and not _path_text(base_model):
        raise _config_error("base_model", "must be a folder or null", base_model)
    download = values["download"]
    allowed = {f.name for f in fields(DownloadParams)}
    if not isinstance(download, Mapping) or not set(download) <= allowed:
        raise _config_error("download", f"must be a mapping with keys among "
                            f"{sorted(allowed)}", download)
    download = {**DEFAULT_CONFIG["download"], **download}
    if not _number(download["timeout"]) or not download["timeout"] > 0:
        raise _config_error("download.timeout", "must be a number > 0", download["timeout"])
    if not _integer(download["retries"]) or download["retries"] < 0:
        raise _config_error("download.retries", "must be an integer >= 0",
                            download["retries"])
    if not isinstance(values["device"], str) or not values["device"]:
        raise _config_error("device", "must be a device name (auto, cpu, cuda, cuda:1, "
                            "mps)", values["device"])
    if values["precision"] not in PRECISIONS:
        raise _config_error("precision", f"must be one of {list(PRECISIONS)}",
                            values["precision"])
    if not _integer(values["batch_size"]) or values["batch_size"] < 1:
        raise _config_error("batch_size", "must be an integer >= 1", values["batch_size"])
    if not _number(values["threshold"]) or not 0 <= values["threshold"] <= 1:
        raise _config_error("threshold", "must be a number in [0, 1]", values["threshold"])
    base = None if config["base"] is None else BaseReference.from_config(config["base"])
    return ModelConfig(base, base_model,
                       DownloadParams(float(download["timeout"]), download["retries"]),
                       values["device"], values["precision"], values["batch_size"],
                       float(values["threshold"]))


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class _InMemory:
    adapter_sha256: str
    base: BaseReference
    predictor: Predictor


# The classifier `log_model` is logging in this thread (contextvars: per thread), if its
# caller has it in memory.
_LOGGING: contextvars.ContextVar[_InMemory | None] = contextvars.ContextVar(
    "spamlora_logging", default=None)


def _being_logged(base: BaseReference, adapter: str | Path) -> Predictor | None:
    """The in-memory Predictor of the model `log_model` is logging in this thread, when
    `base` and `adapter` (its content) are that model's: MLflow's check of the input
    example then scores it instead of loading the base and adapter a second time."""
    logging_now = _LOGGING.get()
    if logging_now is None or logging_now.base != base:
        return None
    if file_sha256(adapter) != logging_now.adapter_sha256:
        return None
    return logging_now.predictor


def _requirements() -> list[str]:
    pins = []
    for package in RUNTIME_PACKAGES:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pins.append(package)
    return pins


def logged_models(client, run_id: str, experiment_id: str) -> list:
    """The models named `MODEL_NAME` that run `run_id` logged, newest first (deleted
    ones are not listed)."""
    return list(client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'"))


def missing_files(model) -> Path | None:
    """The folder of logged `model` when it holds no MLmodel (its artifacts were
    deleted, e.g. with a `dvc exp run --temp` workspace), else None. Only local artifact
    stores can be looked at here: a server's or a bucket's count as present."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    location = model.artifact_location or ""
    if urlparse(location).scheme not in ("", "file"):
        return None
    folder = Path(url2pathname(urlparse(location).path)) if "://" in location else Path(
        location)
    return None if (folder / "MLmodel").is_file() else folder


def _unusable(model, adapter_sha256: str) -> str | None:
    """Why logged `model` cannot stand for the adapter whose digest is `adapter_sha256`."""
    from mlflow.entities import LoggedModelStatus

    if model.status != LoggedModelStatus.READY:
        return f"it is {model.status} (its logging failed or was cut short)"
    if model.tags.get(ADAPTER_DIGEST_TAG) != adapter_sha256:
        return "it holds another adapter"
    if folder := missing_files(model):
        return f"its files are gone ({folder} holds no MLmodel)"
    return None


def log_model(adapter: Path, base: BaseReference | None, in_memory: Predictor | None = None,
              base_files: Path | None = None) -> str:
    """Log the classifier as model `MODEL_NAME` of the active run; its model URI. Its
    code is `MODEL_CODE`, not a pickle. MLflow checks the input example against the
    signature, then loads the logged model and scores the example as its server would:
    `in_memory`, the classifier of `adapter` on `base` already in memory (the one just
    trained), is then used instead of loading the base and adapter a second time. An
    adapter that reads no base weights (every weight trained, or a random base)
    references no base (`base` None): `base_files`, a base folder, gives the config and
    tokenizer files it carries instead.

    A run holds one such model: one it logged already with this adapter (a training
    killed after logging it, then resumed) is returned as it is, and any other it holds
    (another adapter, cut short, its files gone) is deleted once this one is logged."""
    if (base is None) != (not read_spec(adapter).reads_base_weights):
        raise ValueError(f"{adapter}: an adapter that reads no base weights is logged "
                         f"with no base reference, any other with one")
    if base is None and base_files is None:
        raise ValueError(f"{adapter}: an adapter that reads no base weights needs "
                         f"`base_files`")
    digest = file_sha256(adapter)
    run = mlflow.active_run()
    client = mlflow.MlflowClient()
    existing = logged_models(client, run.info.run_id, run.info.experiment_id)
    reasons = {m.model_id: _unusable(m, digest) for m in existing}
    kept = next((m for m in existing if reasons[m.model_id] is None), None)
    if kept is not None:
        log.info("run %s logged this adapter already: %s kept", run.info.run_id,
                 kept.model_uri)
    uri = kept.model_uri if kept is not None else _log_new(adapter, digest, base, in_memory,
                                                           base_files)
    for model in existing:
        if model.model_uri != uri:
            log.warning("run %s: %s deleted, %s; %s replaces it", run.info.run_id,
                        model.model_uri, reasons[model.model_id] or "a second copy", uri)
            client.delete_logged_model(model.model_id)
    return uri


def _log_new(adapter: Path, digest: str, base: BaseReference | None,
             in_memory: Predictor | None, base_files: Path | None) -> str:
    """`log_model`'s logging proper: the new model's URI."""
    import shutil
    import tempfile

    token = None
    if in_memory is not None:
        token = _LOGGING.set(_InMemory(digest, base, in_memory))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            artifacts = {ADAPTER_ARTIFACT: str(adapter)}
            if base is None:
                carried = Path(tmp) / BASE_FILES_ARTIFACT
                carried.mkdir()
                for name in BASE_FILES:
                    shutil.copy(Path(base_files) / name, carried / name)
                artifacts[BASE_FILES_ARTIFACT] = str(carried)
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(MODEL_CODE), artifacts=artifacts,
                model_config={"base": None if base is None else asdict(base),
                              **DEFAULT_CONFIG},
                signature=signature(in_memory.spec if in_memory is not None
                                    else read_spec(adapter)),
                input_example=INPUT_EXAMPLE,
                pip_requirements=_requirements(), tags={ADAPTER_DIGEST_TAG: digest})
    finally:
        if token is not None:
            _LOGGING.reset(token)
    return info.model_uri


def load_predictor(model_uri: str, base_model: str | Path | None = None,
                   **config: object) -> Predictor:
    """The Predictor inside a logged model (`runs:/...`, `models:/...`), for
    `spamlora predict --model`; `config` overrides its model_config (device, ...)."""
    overrides = {**config, **({"base_model": str(base_model)} if base_model else {})}
    try:
        loaded = mlflow.pyfunc.load_model(model_uri, model_config=overrides or None)
    except mlflow.exceptions.MlflowException as e:
        raise SpamloraError(f"cannot load model {model_uri}: {e.message}") from None
    model = loaded.unwrap_python_model()
    if not isinstance(model, SpamloraModel):
        raise SpamloraError(f"{model_uri} is not a spamlora model")
    return model.predictor
