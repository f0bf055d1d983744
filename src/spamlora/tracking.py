"""MLflow bookkeeping for the pipeline's entry points (train, evaluate, plot).

One pipeline run is one MLflow run: `train` creates it and writes its id next to the
adapter; `evaluate` and `plot` reopen it. The store is the project's own SQLite file at
the repository root, `DVC_ROOT` when DVC runs the stage (DVC sets it to the main
workspace even for `--temp` and `--queue` experiments, whose own folders vanish), with
artifacts under `<root>/mlartifacts`. `MLFLOW_TRACKING_URI` overrides it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePath
from urllib.parse import urlparse

from filelock import FileLock

from .errors import SpamloraError
from .fileio import read_json, write_json

EXPERIMENT = "spamlora"
STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def sqlite_uri(path: PurePath) -> str:
    """SQLAlchemy's URL of a SQLite file: `sqlite:////abs/path` on POSIX,
    `sqlite:///C:/abs/path` on Windows (forward slashes, drive kept)."""
    return f"sqlite:///{path.as_posix()}"


def tracking_uri(root: Path | None = None) -> str:
    root = root or repo_root()
    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(root / STORE_FILE)


def _git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@contextlib.contextmanager
def _store_lock(root: Path) -> Iterator[None]:
    """Serialise store set-up: parallel queue workers otherwise race to create the
    SQLite tables (an alembic migration error) and the experiment. `filelock` locks the
    same way on POSIX and Windows."""
    with FileLock(root / f"{STORE_FILE}.lock"):
        yield


def _experiment_id(client, root: Path, default_store: bool) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    # A temp experiment's workspace is deleted after the run: artifacts must live at the
    # repository root, not in the default ./mlruns of the stage's working directory.
    location = (root / ARTIFACT_DIR).as_uri() if default_store else None
    return client.create_experiment(EXPERIMENT, artifact_location=location)


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail at once with a clear message if a tracking server does not answer: MLflow's
    own client would retry for minutes, or the stage would fail after the training."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SpamloraError(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is not "
                            f"reachable: {reason}. Start it, or unset MLFLOW_TRACKING_URI "
                            f"to use the local store mlflow.db.") from None


def create_pipeline_run(params: dict[str, object], model_name: str) -> str:
    """Create the MLflow run of this pipeline run with every parameter and its tags;
    called first, so an unusable store fails the stage before any compute."""
    import mlflow

    root = repo_root()
    # Read before set_tracking_uri, which also exports MLFLOW_TRACKING_URI.
    default_store = "MLFLOW_TRACKING_URI" not in os.environ
    uri = tracking_uri(root)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    with _store_lock(root):
        client = mlflow.MlflowClient()
        experiment_id = _experiment_id(client, root, default_store)
    tags = {"model.name": model_name}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    commit = _git_commit(Path.cwd())
    if commit:
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    run = client.create_run(experiment_id, tags=tags,
                            run_name=os.environ.get("DVC_EXP_NAME") or None)
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v))
                                              for k, v in params.items()])
    return run.info.run_id


def record_run(run_file: Path, run_id: str) -> None:
    """Leave the run's id for the later stages (evaluate, plot) to add to it."""
    write_json(run_file, {"run_id": run_id})


def recorded_run(run_file: Path) -> str:
    try:
        return str(read_json(run_file)["run_id"])
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        raise SpamloraError(f"{run_file}: no MLflow run recorded (run the train stage "
                           f"first)") from None


@contextlib.contextmanager
def active_run(run_id: str) -> Iterator[object]:
    """The run, active for `mlflow.log_*`; ended as FAILED if the block raises."""
    import mlflow

    check_reachable(tracking_uri())
    mlflow.set_tracking_uri(tracking_uri())
    try:
        mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise SpamloraError(f"MLflow run {run_id} is not in the store {tracking_uri()} "
                           f"(was the store moved or deleted?)") from None
    with mlflow.start_run(run_id=run_id) as run:
        yield run
