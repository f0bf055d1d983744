"""Load Hugging Face GPT-2 checkpoints (`config.json` + `model.safetensors`) into `GPTModel`.

Hugging Face GPT-2 uses `Conv1D` layers whose weights are stored (in, out), the transpose
of `nn.Linear`, and fuses Q, K, V into one `c_attn`. Two layouts exist in the wild: the
hub's published files name tensors without a prefix and carry causal-mask buffers
(`h.N.attn.bias`, `h.N.attn.masked_bias`); folders written by current `transformers`
prefix every name with `transformer.` and drop the tied `lm_head.weight`.
Safetensors only: no pickle is ever loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .download import download, join_url
from .errors import SpamloraError
from .fileio import atomic_path, link_or_copy, read_json, write_json
from .hub import MODEL_FILES, file_digests, find_in_hf_cache
from .model import GPTConfig, GPTModel

CONFIG_FILE, WEIGHTS_FILE = MODEL_FILES[:2]
DOWNLOAD_RECORD = "download.json"

log = logging.getLogger(__name__)


class WeightsError(SpamloraError, ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and tensor."""


def read_config(folder: str | Path) -> GPTConfig:
    path = Path(folder) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{path}: missing (expected a Hugging Face GPT-2 config)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON: {e}") from None
    keys = {"vocab_size": "vocab_size", "context_length": "n_positions", "emb_dim": "n_embd",
            "n_layers": "n_layer", "n_heads": "n_head"}
    missing = [hf for hf in keys.values() if hf not in raw]
    if missing:
        raise WeightsError(f"{path}: missing key(s) {missing}")
    try:
        return GPTConfig(**{ours: raw[hf] for ours, hf in keys.items()},
                         layer_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)))
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None


def _expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    d, ff = cfg.emb_dim, 4 * cfg.emb_dim
    shapes = {"wte.weight": (cfg.vocab_size, d), "wpe.weight": (cfg.context_length, d),
              "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(cfg.n_layers):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, ff), p + "mlp.c_fc.bias": (ff,),
            p + "mlp.c_proj.weight": (ff, d), p + "mlp.c_proj.bias": (d,),
        })
    return shapes


def _is_ignorable(name: str) -> bool:
    # Causal-mask buffers of old checkpoints, not parameters.
    return name.startswith("h.") and name.endswith((".attn.bias", ".attn.masked_bias"))


def check_weights(folder: str | Path, cfg: GPTConfig) -> dict[str, str]:
    """Check the folder's safetensors header against `cfg` without reading the data:
    missing, unexpected or wrongly shaped tensors are errors. Returns the file's tensor
    names mapped to prefix-free GPT-2 names (mask buffers and the tied head dropped)."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsError(f"{path}: missing (expected GPT-2 weights in safetensors format)")
    expected = _expected_shapes(cfg)
    expected_lm_head = expected["wte.weight"]  # lm_head is tied to wte: shape check only
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = {key: key.removeprefix("transformer.") for key in f.keys()
                    if not _is_ignorable(key.removeprefix("transformer."))}
            for key, name in keys.items():
                shape = tuple(f.get_slice(key).get_shape())
                want = expected_lm_head if name == "lm_head.weight" else expected.get(name)
                if want is None:
                    raise WeightsError(f"{path}: unexpected tensor {key!r} for a GPT-2 of "
                                       f"{cfg.n_layers} layers (config.json)")
                if shape != want:
                    raise WeightsError(f"{path}: tensor {key!r} has shape {shape}, "
                                       f"expected {want} from config.json")
    except SafetensorError as e:
        raise WeightsError(f"{path}: unreadable safetensors file (truncated or corrupt?): "
                           f"{e}") from None
    missing = sorted(set(expected) - set(keys.values()))
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightsError(f"{path}: missing tensor(s) {shown}")
    return {key: name for key, name in keys.items() if name != "lm_head.weight"}


def _our_tensors(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Where a Hugging Face GPT-2 tensor goes in `GPTModel`. Conv1D stores (in, out):
    weights are transposed for nn.Linear, and c_attn is split into Q, K, V."""
    top = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight",
           "ln_f.weight": "final_norm.weight", "ln_f.bias": "final_norm.bias"}
    if name in top:
        return [(top[name], tensor)]
    _, layer, *rest = name.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    p = f"trf_blocks.{layer}."
    if module == "attn.c_attn":
        pieces = tensor.chunk(3, dim=1 if kind == "weight" else 0)
        return [(f"{p}att.{w}.{kind}", piece.T if kind == "weight" else piece)
                for w, piece in zip(("W_query", "W_key", "W_value"), pieces, strict=True)]
    ours = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_proj": "att.out_proj",
            "mlp.c_fc": "ff.layers.0", "mlp.c_proj": "ff.layers.2"}[module]
    transpose = kind == "weight" and not module.startswith("ln_")
    return [(f"{p}{ours}.{kind}", tensor.T if transpose else tensor)]


def fetch_model(name: str, base_url: str, dest: str | Path, timeout: float, retries: int,
                revision: str, sha256: dict[str, str] | None) -> dict:
    """Fetch a GPT-2 folder (weights, config, tokenizer files) into `dest` and check that
    it loads. A file with a pinned `sha256` is taken from the local Hugging Face cache
    when it holds exactly that content, else downloaded and verified while it streams.
    `dest/download.json` records each file's source (URL or cache path), size, sha256
    and whether it was checked; `dest` appears only when complete. An existing `dest`
    must be empty or a previous download (its download.json): then only the four files
    and the record are replaced, and nothing else in it is touched."""
    record = {}
    with atomic_path(dest, is_dir=True, record=DOWNLOAD_RECORD) as tmp:
        for file in MODEL_FILES:
            want = (sha256 or {}).get(file)
            cached = find_in_hf_cache(name, file, revision, want) if want else None
            if cached is not None:
                link_or_copy(cached, tmp / file)
                source, digest = str(cached), want
            else:
                got = download([join_url(base_url, file)], tmp / file, sha256=want,
                               timeout=timeout, retries=retries)
                source, digest = got.url, got.sha256
            record[file] = {"source": source, "bytes": (tmp / file).stat().st_size,
                            "sha256": digest, "verified": want is not None}
        check_weights(tmp, read_config(tmp))
        write_json(tmp / DOWNLOAD_RECORD, record)
    return record


class DamagedBaseError(WeightsError):
    """A base model file whose content is not what its download recorded."""


def base_fingerprint(folder: str | Path, files: tuple[str, ...] = (CONFIG_FILE, WEIGHTS_FILE),
                     strict: bool = False) -> dict[str, str]:
    """The sha256 of `files` of a base model folder (by default those that make its
    weights), each checked against the folder's download.json where it records one: a
    file whose content differs is a `DamagedBaseError`. Digests come from `file_digests`
    (hashing GPT-2 124M's weights takes ~1.5 s, once per change of the file); `strict`:
    every file hashed in full."""
    folder = Path(folder)
    try:
        record = read_json(folder / DOWNLOAD_RECORD)
    except (OSError, ValueError):
        record = {}
    record = record if isinstance(record, dict) else {}
    paths = [folder / name for name in files]
    for path in paths:
        if not path.is_file():
            raise WeightsError(f"{path}: missing (a GPT-2 base model folder holds "
                               f"{', '.join(MODEL_FILES)})")
    fingerprint = dict(zip(files, file_digests(paths, rehash=strict), strict=True))
    for path, (name, got) in zip(paths, fingerprint.items(), strict=True):
        entry = record.get(name)
        want = entry.get("sha256") if isinstance(entry, dict) else None
        if isinstance(want, str) and got != want:
            raise DamagedBaseError(
                f"{path}: damaged: its sha256 is {got}, but {DOWNLOAD_RECORD} recorded "
                f"{want} when it was downloaded. Restore it: `dvc checkout {folder}` (a "
                f"pipeline's data/base_model), else download it again (`dvc repro --force "
                f"download_model`, or `spamlora download-model --name <model> {folder}`)")
    return fingerprint


@contextlib.contextmanager
def uninitialised() -> Iterator[None]:
    """Modules built inside get their parameters allocated but not initialised: every
    `torch.nn.init` function is a no-op meanwhile, as in transformers' `no_init_weights`.
    For a model whose every parameter is then loaded: GPT-2 124M's random init took
    ~1.3 s, and building on the meta device ~1.8 s in a fresh process (its first use
    imports torch's meta kernels); this takes ~0.02 s. Not thread-safe."""
    names = [name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


@torch.no_grad()
def load_gpt2(folder: str | Path, drop_rate: float = 0.0) -> GPTModel:
    """A `GPTModel` with the weights of a Hugging Face GPT-2 folder, output head tied.

    The model is allocated without initialising it and filled one tensor at a time, so
    loading needs the model's memory once, not twice (and no time on random init)."""
    cfg = read_config(folder).with_dropout(drop_rate)
    keys = check_weights(folder, cfg)
    with uninitialised():
        model = GPTModel(cfg)
    params = dict(model.named_parameters(remove_duplicate=False))
    path = Path(folder) / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            for key, name in keys.items():
                for target, tensor in _our_tensors(name, f.get_tensor(key)):
                    params[target].copy_(tensor)
    except SafetensorError as e:
        raise WeightsError(f"{path}: unreadable safetensors file (truncated or corrupt?): "
                           f"{e}") from None
    return model.eval()
