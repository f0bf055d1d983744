"""Training state saved and restored exactly, so an interrupted training loses nothing.

A checkpoint is one safetensors file: the trainable weights (LoRA, head), the optimizer's
tensors, every random generator state the loop uses, and in its metadata (JSON) the
loop's position, its history so far and the MLflow run. Nothing is pickled. Each is
written atomically, then a `.sha256` beside it: a checkpoint without a matching one (a
write cut short, a damaged file) is skipped with a warning for the previous one. The
newest two are kept.

Checkpoints live outside DVC's outputs, under `<repo>/.spamlora/checkpoints/<key>/`,
where the key hashes everything the result depends on (the train stage's params and the
content of its dependencies, code included): a checkpoint is only ever resumed by the
same computation. `owner.json` in each folder names the run and the process writing it,
so a later start can tell a live training from one that was killed. A computation's
checkpoints are removed when it completes, and otherwise only on request
(`spamlora checkpoints prune`): another computation's, even a killed one's, is work that
rerunning it (a re-queued experiment, say) resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import SpamloraError
from .fileio import atomic_path, read_json, write_json
from .hub import file_sha256
from .process import pid_alive, start_time

log = logging.getLogger(__name__)

FOLDER = Path(".spamlora") / "checkpoints"
KEEP = 2
OWNER_FILE = "owner.json"
FORMAT = "spamlora-checkpoint/1"


class CheckpointError(SpamloraError):
    pass


def computation_key(params: dict[str, object], deps: dict[str, Path]) -> str:
    """A hash of what a training's result depends on: its params and the content of
    each dependency (`deps`: name -> file or folder). Folders are hashed file by file,
    as `base_fingerprint` does (checked against a base's download record; digests
    cached while a file is unchanged: hashing 0.5-6 GB at every start would take seconds
    to minutes)."""
    from .weights import base_fingerprint

    contents = {}
    for name, path in sorted(deps.items()):
        if not path.exists():
            contents[name] = None  # run outside DVC (which checks deps exist)
        elif path.is_dir():
            files = tuple(sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                                 if p.is_file()))
            contents[name] = base_fingerprint(path, files)
        else:
            contents[name] = file_sha256(path)
    blob = json.dumps({"format": FORMAT, "params": params, "deps": contents},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class LoopState:
    """Where the training loop stands after a step (or an epoch): enough, with the
    weights, optimizer and generators, to continue as if it had never stopped."""
    epoch: int  # the epoch in progress, from 1
    batch: int  # batches of it done
    step: int
    seen: int
    loss_sum: float
    correct: float
    count: int
    history: dict  # train.History as a dict

    @property
    def where(self) -> str:
        return f"epoch {self.epoch}, step {self.step}"


@dataclass(frozen=True)
class Owner:
    run_id: str | None
    host: str
    pid: int
    started: str | None = None  # process.start_time (absent in older owner.json files)

    @classmethod
    def me(cls, run_id: str | None) -> Owner:
        return cls(run_id, socket.gethostname(), os.getpid(), start_time(os.getpid()))

    def alive(self) -> bool:
        """Whether the process that wrote this still runs (only knowable on its host);
        a reused pid of a process started later is not it."""
        if self.host != socket.gethostname():
            return True  # another machine's: not ours to judge
        return pid_alive(self.pid, self.started)


def generator_states() -> dict[str, torch.Tensor]:
    """This process's global random generators (LoRA dropout draws from them): each
    process of a multi-process training has its own, saved apart."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = state
    return states


def _set_generator_states(tensors: dict[str, torch.Tensor],
                          order_generator: torch.Generator, rank: int) -> None:
    order_generator.set_state(tensors["rng.order"])
    # Checkpoints from before per-process states hold one, `rng.torch`, for all.
    prefix = f"rng.{rank}." if f"rng.{rank}.torch" in tensors else "rng."
    torch.set_rng_state(tensors[prefix + "torch"])
    cuda = sorted((k for k in tensors if k.startswith(prefix + "cuda.")),
                  key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda:
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The optimizer's state as tensors (safetensors) and the rest (JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    # JSON has no tuples: betas and the like come back as the tuples torch made them.
    groups = [{k: v if k == "params" or not isinstance(v, list) else tuple(v)
               for k, v in group.items()} for group in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


class Checkpoints:
    """The checkpoints of one computation (`key`) under `root/.spamlora/checkpoints`."""

    def __init__(self, root: Path, key: str):
        self.key = key
        self.root = root
        self.base = root / FOLDER
        self.folder = self.base / key

    def check_writable(self) -> None:
        """Fail before training, not after hours of it, if nothing can be saved."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"checkpoint folder {self.folder} is not writable: "
                                  f"{e.strerror or e}") from None

    def claim(self, run_id: str | None) -> None:
        write_json(self.folder / OWNER_FILE, asdict(Owner.me(run_id)))

    def _files(self) -> list[Path]:
        return sorted(self.folder.glob("step-*.safetensors"), reverse=True)

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             order_state: torch.Tensor, state: LoopState, run_id: str | None,
             rng_states: list[dict[str, torch.Tensor]] | None = None) -> bool:
        """Write a checkpoint; False (with a warning) if it could not be written: the
        training goes on, resumable from the previous one. `order_state` is the batch
        order generator's state at the start of `state.epoch` (the order is drawn
        again from it on resume)."""
        tensors = {f"model.{n}": p.detach().cpu().contiguous()
                   for n, p in model.named_parameters() if p.requires_grad}
        optim_tensors, optim_meta = _optimizer_tensors(optimizer)
        tensors.update({k: v.cpu().contiguous() for k, v in optim_tensors.items()})
        tensors["rng.order"] = order_state
        for rank, states in enumerate(rng_states or [generator_states()]):
            tensors.update({f"rng.{rank}.{k}": v.cpu() for k, v in states.items()})
        meta = {"format": FORMAT, "key": self.key, "run_id": run_id,
                "loop": asdict(state), "optimizer": optim_meta}
        path = self.folder / f"step-{state.step:09d}-epoch-{state.epoch:04d}.safetensors"
        try:
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"spamlora": json.dumps(meta)})
            with atomic_path(path.with_suffix(".sha256")) as tmp:
                tmp.write_text(file_sha256(path) + "\n", encoding="ascii", newline="\n")
        except OSError as e:
            log.warning("checkpoint %s not written (%s): training goes on", path,
                        e.strerror or e)
            return False
        for old in self._files()[KEEP:]:
            old.with_suffix(".sha256").unlink(missing_ok=True)
            old.unlink(missing_ok=True)
        return True

    def _valid(self) -> Iterator[tuple[Path, dict[str, torch.Tensor], dict]]:
        """The checkpoints that can be trusted, newest first; others get a warning."""
        for path in self._files():
            try:
                digest = path.with_suffix(".sha256").read_text(encoding="ascii").strip()
                if digest != file_sha256(path):
                    raise ValueError("its sha256 does not match (damaged or cut short)")
                meta = json.loads(_metadata(path))
                if meta.get("format") != FORMAT or meta.get("key") != self.key:
                    raise ValueError("made by another version or computation")
                tensors = load_file(str(path))
            except (OSError, SafetensorError, ValueError, KeyError) as e:
                log.warning("checkpoint %s skipped: %s", path, e)
                continue
            yield path, tensors, meta

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                order_generator: torch.Generator, rank: int = 0) -> LoopState | None:
        """Load the newest valid checkpoint into the model, optimizer and generators
        (process `rank`'s own); its loop state, or None to start afresh."""
        for _, tensors, meta in self._valid():
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, p in params.items():
                    if p.requires_grad:
                        p.copy_(tensors[f"model.{name}"])
            optimizer.load_state_dict(_optimizer_state(tensors, meta["optimizer"]))
            _set_generator_states(tensors, order_generator, rank)
            return LoopState(**meta["loop"])
        return None

    def newest(self) -> dict | None:
        """The metadata of the newest valid checkpoint (its run, where it stands)."""
        for _, _, meta in self._valid():
            return meta
        return None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# A folder without owner.json is being created (its training is still starting its
# MLflow run) for seconds, not hours: younger than this, prune leaves it alone.
CLAIM_GRACE_SECONDS = 3600


@dataclass(frozen=True)
class Stored:
    """One computation's checkpoint folder, as `spamlora checkpoints list` shows it."""
    folder: Path
    owner: Owner | None
    bytes: int
    modified: float  # the newest file's mtime (the folder's own when empty)

    @property
    def running(self) -> bool:
        return self.owner is not None and self.owner.alive()

    def where(self) -> str:
        """Where its newest checkpoint stands, from the file name alone (no hashing)."""
        files = sorted(self.folder.glob("step-*.safetensors"), reverse=True)
        if not files:
            return "no checkpoint yet"
        _, step, _, epoch = files[0].stem.split("-")
        return f"epoch {int(epoch)}, step {int(step)}"


def stored(root: Path) -> list[Stored]:
    """Every computation's checkpoint folder under `root/.spamlora/checkpoints`."""
    base = root / FOLDER
    found = []
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        if not folder.is_dir():
            continue
        files = [p for p in folder.iterdir() if p.is_file()]
        found.append(Stored(folder, read_owner(folder), sum(p.stat().st_size for p in files),
                            max((p.stat().st_mtime for p in files),
                                default=folder.stat().st_mtime)))
    return found


def prune(root: Path, older_than_seconds: float, now: float,
          dry_run: bool = False) -> list[Stored]:
    """Remove the checkpoint folders not written to for `older_than_seconds` whose
    training is not running; never one whose writer runs (on another host: never), nor
    one still being created (no owner.json, younger than CLAIM_GRACE_SECONDS). Returns
    what was (or, with `dry_run`, would be) removed."""
    removed = []
    for entry in stored(root):
        age = now - entry.modified
        if entry.running or age < older_than_seconds or (
                entry.owner is None and age < CLAIM_GRACE_SECONDS):
            continue
        if not dry_run:
            shutil.rmtree(entry.folder)
        removed.append(entry)
    return removed


def read_owner(folder: Path) -> Owner | None:
    try:
        return Owner(**read_json(folder / OWNER_FILE))
    except (OSError, TypeError, ValueError):
        return None


def _metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {})["spamlora"]
