"""The GPT-2 releases on the Hugging Face Hub: which commit and file contents each preset
is pinned to, where a local Hugging Face cache may already hold them, and the digests of
files as spamlora checks them (cached per user, as DVC caches its own).

No torch here: `config` resolves `model.revision: auto` / `model.sha256: auto` with it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .fileio import read_json, write_json

log = logging.getLogger(__name__)

MODEL_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
UNPINNED_REVISION = "main"


@dataclass(frozen=True)
class Pin:
    repo: str  # the Hub repository, e.g. openai-community/gpt2
    revision: str | None  # its git commit; None: not known, `main` is used
    sha256: dict[str, str] | None  # per file; None: no checksums known
    aliases: tuple[str, ...] = ()  # legacy repository names of the same files


# Only values confirmed from two independent public records go here. gpt2: the Hub's
# file listing and LFS pointer at that commit, and the files themselves (vocab.json and
# merges.txt are byte-identical to OpenAI's encoder.json / vocab.bpe, which tiktoken pins).
# The larger presets: not confirmed here; `auto` means unchecked for them (docs/downloads.md).
PINS: dict[str, Pin] = {
    "gpt2": Pin(
        repo="openai-community/gpt2",
        revision="607a30d783dfa663caf39e06633721c8d4cfcd7e",
        sha256={
            "config.json": "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4",
            "model.safetensors":
                "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
            "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
            "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        },
        aliases=("gpt2",)),
    "gpt2-medium": Pin("openai-community/gpt2-medium", None, None, ("gpt2-medium",)),
    "gpt2-large": Pin("openai-community/gpt2-large", None, None, ("gpt2-large",)),
    "gpt2-xl": Pin("openai-community/gpt2-xl", None, None, ("gpt2-xl",)),
}


def resolve_revision(name: str, revision: str) -> str:
    """`auto`: the commit pinned for preset `name` (`main` where none is known)."""
    if revision != "auto":
        return revision
    return PINS[name].revision or UNPINNED_REVISION


def resolve_sha256(name: str, sha256: str | dict[str, str] | None) -> dict[str, str] | None:
    """The expected sha256 of each file: `auto`, the preset's pins (None where none are
    known); a mapping, as given; None, no check."""
    if sha256 == "auto":
        return PINS[name].sha256
    return sha256  # type: ignore[return-value]


def file_sha256(path: str | Path) -> str:
    return _file_digest(path, hashlib.sha256())


def file_md5(path: str | Path) -> str:
    """DVC 3's hash of a file: the md5 of its bytes."""
    return _file_digest(path, hashlib.md5())


def _file_digest(path: str | Path, digest) -> str:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def spamlora_cache_dir() -> Path:
    """The user's cache folder for spamlora: `$XDG_CACHE_HOME/spamlora`, default
    `~/.cache/spamlora`. Never inside a workspace: what is cached here describes files,
    it is not a pipeline output."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "spamlora"


DIGEST_CACHE = "file-digests.json"
DIGEST_CACHE_FORMAT = "spamlora-file-digests/1"
DIGEST_CACHE_ENTRIES = 1024  # the most recently hashed files kept
# A file modified this shortly before it was hashed may be modified again within the same
# timestamp tick (coarse kernel clocks, 2 s on FAT): its digest is used but not stored.
RACY_NS = 2_000_000_000


def _stamp(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def file_digests(paths: list[Path], rehash: bool = False,
                 algorithm: str = "sha256") -> list[str]:
    """The sha256 (or md5, DVC's hash) of each file, as DVC tracks content: a digest stored
    in the user's cache (`spamlora_cache_dir() / DIGEST_CACHE`, never beside the files: a
    DVC output may be read-only hard links) is used while the file's size, mtime_ns and
    inode are those it was computed for; else the file is hashed and the digest stored. A
    change that keeps all three (bytes rewritten in place, then the mtime set back) goes
    unseen: `rehash` hashes every file. A cache that is absent, damaged or unwritable
    only costs hashing."""
    hash_file = {"sha256": file_sha256, "md5": file_md5}[algorithm]
    cache_file = spamlora_cache_dir() / DIGEST_CACHE
    try:
        cache = read_json(cache_file)
        entries = cache["files"] if cache.get("format") == DIGEST_CACHE_FORMAT else {}
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        entries = {}
    digests, changed = [], False
    for path in paths:
        key = str(path.resolve())
        before = _stamp(path.stat())
        entry = entries.get(key)
        current = isinstance(entry, dict) and entry.get("stat") == before
        if not rehash and current and isinstance(entry.get(algorithm), str):
            digests.append(entry[algorithm])
            continue
        started = time.time_ns()
        digest = hash_file(path)
        digests.append(digest)
        entries.pop(key, None)
        if _stamp(path.stat()) == before and before["mtime_ns"] < started - RACY_NS:
            # The other algorithm's digest stays while it describes this very state.
            others = {k: v for k, v in entry.items() if k != algorithm} if (
                current and not rehash) else {"stat": before}
            entries[key] = {**others, algorithm: digest}
            changed = True
    if changed:
        kept = {k: v for k, v in entries.items() if os.path.exists(k)}
        kept = dict(list(kept.items())[-DIGEST_CACHE_ENTRIES:])
        try:
            write_json(cache_file, {"format": DIGEST_CACHE_FORMAT, "files": kept})
        except OSError as e:
            log.debug("file digests not cached in %s: %s", cache_file, e)
    return digests


def hf_cache_dirs() -> list[Path]:
    """The Hugging Face Hub cache, as `huggingface_hub` finds it: `HF_HUB_CACHE`, else
    `$HF_HOME/hub`, else `~/.cache/huggingface/hub` (XDG_CACHE_HOME respected)."""
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"]).expanduser()]
    if os.environ.get("HF_HOME"):
        return [Path(os.environ["HF_HOME"]).expanduser() / "hub"]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [cache.expanduser() / "huggingface" / "hub"]


def _candidates(name: str, file: str, revision: str,
                sha256: str) -> Iterator[tuple[Path, bool]]:
    """Where the cache may hold `file`, and whether a mismatch there means corruption:
    the pinned revision's snapshot first, then the blob named by the sha256 (the Hub names
    LFS blobs so), then any other snapshot (another revision may hold the same file)."""
    pin = PINS[name]
    for cache in hf_cache_dirs():
        for repo in (pin.repo, *pin.aliases):
            folder = cache / ("models--" + repo.replace("/", "--"))
            if not folder.is_dir():
                continue
            yield folder / "snapshots" / revision / file, True
            yield folder / "blobs" / sha256, True
            snapshots = folder / "snapshots"
            for snapshot in sorted(snapshots.iterdir()) if snapshots.is_dir() else ():
                if snapshot.name != revision:
                    yield snapshot / file, False


def find_in_hf_cache(name: str, file: str, revision: str, sha256: str) -> Path | None:
    """A file of the local Hugging Face cache whose content has `sha256`, or None. A
    cached file with other content (another revision, a corrupt blob) is never used."""
    seen = set()
    for path, must_match in _candidates(name, file, revision, sha256):
        if not path.is_file() or path.resolve() in seen:
            continue
        seen.add(path.resolve())
        got = file_sha256(path)
        if got == sha256:
            return path.resolve()
        if must_match:
            log.warning("%s in the Hugging Face cache has sha256 %s, not the pinned %s "
                        "(corrupt?): not used", path, got, sha256)
    return None
