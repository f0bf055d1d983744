"""MLflow bookkeeping for the pipeline's entry points (train, evaluate, plot).

One pipeline run (`dvc repro`, `dvc exp run`) is one MLflow run. `train` creates it and
names it in metrics/train.json; `evaluate` and then `plot` continue the run their
upstream metrics file names (`RUN_ID_KEY`) when it belongs to this pipeline run: it
carries exactly the current params and that stage has not logged into it yet. Otherwise
the upstream stage was cached (a run-cache hit, an evaluate-only change, a pulled clone)
and the stage starts a run of its own: every current param, the training run it reuses
(`TRAINING_RUN_TAG`), and the upstream metrics copied from the DVC metrics files. So no
run ever receives the metrics of another experiment.

The store is the project's own SQLite file at the repository root, `DVC_ROOT` when DVC
runs the stage (DVC sets it to the main workspace even for `--temp` and `--queue`
experiments, whose own folders vanish), with artifacts under `<root>/mlartifacts`.
`MLFLOW_TRACKING_URI` overrides it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from urllib.parse import urlparse

from filelock import FileLock

from .config import DataParams, metric_name
from .errors import Interrupted, SpamloraError
from .fileio import read_json
from .hub import file_digests, file_md5
from .paths import SPLITS, Paths
from .process import pid_alive, start_time

EXPERIMENT = "spamlora"
STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
RUN_ID_KEY = "mlflow_run_id"  # in metrics/train.json and eval.json
TRAINING_RUN_TAG = "spamlora.training_run"
STAGES_TAG = "spamlora.stages"  # the stages that logged into a run, comma-separated
# The process logging into a run: a RUNNING run of this host whose process is gone was
# killed (SIGKILL, power cut) and is marked so by the next stage that starts.
HOST_TAG, PID_TAG, NOTE_TAG = "spamlora.host", "spamlora.pid", "spamlora.note"
STARTED_TAG = "spamlora.pid_started"  # process.start_time: tells a reused pid apart


def repo_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def sqlite_uri(path: PurePath) -> str:
    """SQLAlchemy's URL of a SQLite file: `sqlite:////abs/path` on POSIX,
    `sqlite:///C:/abs/path` on Windows (forward slashes, drive kept)."""
    return f"sqlite:///{path.as_posix()}"


def tracking_uri(root: Path | None = None) -> str:
    root = root or repo_root()
    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_uri(root / STORE_FILE)


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def version_tags(stage: str, cwd: Path) -> dict[str, str]:
    """Enough to rebuild the run: git commit and whether the work tree differed from it,
    the DVC experiment and its baseline, and MLflow's own source tags (the UI's Source
    column)."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": f"dvc.yaml:{stage}"}
    commit = _git(cwd, "rev-parse", "HEAD")
    if commit:
        tags["git.commit"] = tags["mlflow.source.git.commit"] = commit
        status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
        tags["git.dirty"] = str(bool(status)).lower()
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"),
                     ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


# The stash commit `dvc exp run` applies to the workspace it runs the stages in (its
# own, or a `--temp` / `--queue` copy): its message is "dvc-exp:<rev>:<baseline>:<name>"
# and its tree holds params.yaml with the experiment's -S values.
DVC_EXP_MERGE = "refs/exps/exec/EXEC_MERGE"


def check_experiment_params(params: dict[str, object], cwd: Path | None = None) -> None:
    """Fail, before any run is started, when `params` (as the stage read them) are not
    those DVC applied for its experiment `DVC_EXP_NAME`: a second `dvc exp run` in the
    same workspace writes its -S values into params.yaml (then fails on DVC's lock), and
    this run would be logged under this experiment's name with the other's values.
    Outside `dvc exp run`, or where git shows no such commit, nothing is compared."""
    import yaml

    from .config import Params
    from .stage import PARAMS_FILE

    name, cwd = os.environ.get("DVC_EXP_NAME"), cwd or Path.cwd()
    subject = _git(cwd, "log", "-1", "--format=%s", DVC_EXP_MERGE) if name else None
    if not subject or not subject.startswith("dvc-exp:"):
        return
    applied_name = (subject.split(":") + [""] * 4)[3]
    if applied_name != name:
        what = f"DVC's {DVC_EXP_MERGE} now names experiment {applied_name!r}"
    else:
        text = _git(cwd, "show", f"{DVC_EXP_MERGE}:./{PARAMS_FILE}")
        if text is None:
            return
        applied = Params.from_dict(yaml.safe_load(text),
                                   f"{DVC_EXP_MERGE}:{PARAMS_FILE}").flat()
        differ = [k for k, v in params.items() if k in applied and applied[k] != v]
        if not differ:
            return
        what = "; ".join(f"{k} is {params[k]!r} here, DVC applied {applied[k]!r}"
                         for k in differ)
    raise SpamloraError(
        f"{PARAMS_FILE}: another `dvc exp run` changed it during experiment {name!r} "
        f"({what}), so nothing is logged under that name. Parallel experiments go "
        f"through `dvc exp run --queue` or `--temp`")


def sqlite_path(uri: str) -> Path | None:
    """The file a `sqlite:///...` tracking URI names (None for a server)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).absolute()


@contextlib.contextmanager
def _store_lock(uri: str, root: Path) -> Iterator[None]:
    """Serialise store set-up: parallel queue workers, and clones sharing one external
    store, otherwise race to create the SQLite tables (an alembic migration error) and
    the experiment. The lock lies beside the SQLite file the URI names (a server's
    set-up is the server's: then per repository). `filelock` locks the same way on
    POSIX and Windows."""
    store = sqlite_path(uri)
    with FileLock((store.parent / f"{store.name}.lock") if store else
                  root / f"{STORE_FILE}.lock"):
        yield


def artifact_root(uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a SQLite store (an absolute, stable
    folder, whichever stage or workspace creates it; a `--temp` experiment's own folder
    is deleted after it), or, for a server, where the server puts them (None)."""
    store = sqlite_path(uri)
    return (store.parent / ARTIFACT_DIR).as_uri() if store else None


def _create_store(uri: str, store: Path) -> None:
    """A new SQLite store, built under a temporary name beside it and renamed into
    place once its tables and experiment exist: a full disk or a kill half-way leaves
    no half-built `store` behind, only nothing."""
    import mlflow

    store.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own each time: MLflow keeps a store open per URI.
    tmp = store.with_name(f".{store.name}.tmp-{os.getpid()}-{time.time_ns()}")
    try:
        client = mlflow.MlflowClient(tracking_uri=sqlite_uri(tmp))
        client.create_experiment(EXPERIMENT, artifact_location=artifact_root(uri))
        with contextlib.suppress(AttributeError):  # let go of the file (Windows)
            client._tracking_client.store.engine.dispose()
        os.replace(tmp, store)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) or "disk" in str(e).lower():
            raise SpamloraError(f"could not create the MLflow store {store}: {e}; nothing "
                                f"was left behind (free space in {store.parent}?)") from None
        raise


def _half_built(store: Path) -> bool:
    """Whether `store` is a SQLite file MLflow began but never finished (no
    alembic_version row, or no experiments table) and that holds no runs: such a file
    breaks every later start ("table ... already exists")."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
            tables = {r[0] for r in db.execute("select name from sqlite_master where "
                                               "type = 'table'")}
            if "runs" in tables and db.execute("select count(*) from runs").fetchone()[0]:
                return False
            version = (db.execute("select version_num from alembic_version").fetchall()
                       if "alembic_version" in tables else [])
            return not version or "experiments" not in tables
    except sqlite3.DatabaseError:
        return False  # not ours to judge: MLflow's own error will name it


def _experiment_id(client, uri: str) -> str:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return client.create_experiment(EXPERIMENT, artifact_location=artifact_root(uri))
    location = experiment.artifact_location or ""
    if "/.dvc/tmp/" in location.replace("\\", "/"):
        raise SpamloraError(
            f"the experiment {EXPERIMENT!r} in {redacted(uri)} keeps its artifacts in "
            f"{location}, inside a DVC temporary folder that DVC deletes: logged models "
            f"would vanish. Create the experiment anew (`mlflow experiments rename` this "
            f"one) or use another store.")
    return experiment.experiment_id


# MLflow's defaults wait ~9 minutes for a server that stopped answering (7 retries,
# back-off factor 2, 120 s timeouts), holding training up; these bound a call to about
# half a minute. A user's own settings win.
SERVER_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def bound_server_waits(uri: str) -> None:
    """For a tracking server, MLflow's HTTP settings not set by the user take
    `SERVER_HTTP_DEFAULTS`."""
    if urlparse(uri).scheme in ("http", "https"):
        for name, value in SERVER_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)


class TrackingUnavailable(SpamloraError):
    """The tracking server stopped answering; what was not logged can be delivered by a
    rerun once it is back."""


UNAVAILABLE = ("MLflow tracking server {} stopped answering; the training is done and "
               "kept in its checkpoint: rerun the stage once the server is back, it resumes "
               "at the end and logs what is missing")


@contextlib.contextmanager
def unanswered_is_resumable() -> Iterator[None]:
    """A server that does not answer, inside, as one `TrackingUnavailable` line."""
    try:
        yield
    except Exception as e:
        if isinstance(e, TrackingUnavailable) or not server_unreachable(e):
            raise
        raise TrackingUnavailable(UNAVAILABLE.format(redacted(tracking_uri()))) from None


def server_unreachable(error: BaseException) -> bool:
    """Whether `error` says the tracking server did not answer (as opposed to refusing
    a request): the connection errors of `requests`, as MLflow raises or wraps them."""
    import requests

    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                          requests.exceptions.RetryError)):
        return True
    text = str(error)
    return "Max retries exceeded" in text or "Read timed out" in text


def redacted(uri: str) -> str:
    """`uri` with any password replaced by ***, for messages."""
    parts = urlparse(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """Fail at once with a clear message if a tracking server does not answer: MLflow's
    own client would retry for minutes, or the stage would fail after the training. Any
    HTTP answer counts (a proxy's 401 means a server is there; MLflow's client brings
    the credentials), and user:password@ in the URL is left to that client, never
    printed."""
    parts = urlparse(uri)
    if parts.scheme not in ("http", "https"):
        return
    netloc = parts.netloc.rpartition("@")[2]
    probe = parts._replace(netloc=netloc).geturl().rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(probe, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SpamloraError(f"MLflow tracking server {redacted(uri)} (MLFLOW_TRACKING_URI) "
                            f"is not reachable: {reason}. Start it, or unset "
                            f"MLFLOW_TRACKING_URI to use the local store mlflow.db.") from None


def connect():
    """A client of the project's store (`MLFLOW_TRACKING_URI`, else mlflow.db at the
    repository root), made the default of `mlflow.*` too; for reading an existing store
    (the CLI), so a missing one is an error rather than created empty."""
    import mlflow

    uri = tracking_uri()
    if "MLFLOW_TRACKING_URI" not in os.environ and not (repo_root() / STORE_FILE).is_file():
        raise SpamloraError(f"no MLflow store here ({repo_root() / STORE_FILE}): run the "
                            f"pipeline first, or set MLFLOW_TRACKING_URI")
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    with damaged_store_is_an_error(uri):
        client = mlflow.MlflowClient()
        client.get_experiment_by_name(EXPERIMENT)  # opens the store
    return client


# What SQLite says of a file that is not (or no longer) a database.
DAMAGED = ("database disk image is malformed", "file is not a database")


@contextlib.contextmanager
def damaged_store_is_an_error(uri: str) -> Iterator[None]:
    """A damaged SQLite store as one sentence naming the file and what to do, not a
    traceback from deep inside SQLAlchemy."""
    try:
        yield
    except Exception as e:
        store = sqlite_path(uri)
        if store is None or not any(d in str(e) for d in DAMAGED):
            raise
        raise SpamloraError(
            f"the MLflow store {store} is damaged (SQLite: "
            f"{next(d for d in DAMAGED if d in str(e))}). Restore it from a backup, or "
            f"move it aside (e.g. `mv {store} {store}.damaged`) "
            f"and rerun: a new store is created, and rerunning the stages logs their "
            f"runs again") from None


def _client():
    """The store's client, the store set up (tables, experiment) under a lock: parallel
    queue workers otherwise race to create a fresh SQLite store. A new SQLite store is
    created whole or not at all (`_create_store`); one that an earlier version left
    half-built, holding no runs, is moved aside (never deleted) and built anew."""
    import mlflow

    uri = tracking_uri(repo_root())
    check_reachable(uri)
    bound_server_waits(uri)
    mlflow.set_tracking_uri(uri)
    store = sqlite_path(uri)
    with _store_lock(uri, repo_root()):
        if store is not None and store.is_file() and _half_built(store):
            aside = store.with_name(f"{store.name}.half-built-{int(time.time())}")
            os.replace(store, aside)
            print(f"MLflow store {store} was left half-built (no runs in it): moved to "
                  f"{aside.name} and created anew")
        if store is not None and not store.is_file():
            _create_store(uri, store)
        with damaged_store_is_an_error(uri):
            client = mlflow.MlflowClient()
            _experiment_id(client, uri)
    return client


def create_run(stage: str, params: dict[str, object], model_name: str,
               inputs: RunInputs, tags: dict[str, str] | None = None) -> str:
    """A new MLflow run for this pipeline run, with every parameter, its tags and its
    data; called first, so an unusable store fails the stage before any compute."""
    import mlflow

    client = _client()
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    run = client.create_run(experiment_id, run_name=os.environ.get("DVC_EXP_NAME") or None,
                            tags={"model.name": model_name, STAGES_TAG: stage,
                                  **process_tags(), **version_tags(stage, Path.cwd()),
                                  **dependency_tags(inputs.deps), **(tags or {})})
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, str(v))
                                              for k, v in params.items()])
    _log_datasets(client, run.info.run_id, inputs.splits, inputs.source)
    return run.info.run_id


def process_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            STARTED_TAG: start_time(os.getpid()) or ""}


def stage_definition(stage: str, paths: Paths) -> dict:
    """`stage` as dvc.yaml declares it (cmd, deps, params, outs)."""
    import yaml

    return yaml.safe_load((paths.root / "dvc.yaml").read_text(encoding="utf-8"))[
        "stages"][stage]


def run_inputs(stage: str, data: DataParams, paths: Paths) -> RunInputs:
    """The splits, the dataset they came from, and `stage`'s data dependencies as
    dvc.yaml lists them (its code dependencies are covered by the git tags)."""
    deps = stage_definition(stage, paths)["deps"]
    return RunInputs({name: paths.split(name) for name in SPLITS},
                     {"data.url": data.url, "data.sha256": data.sha256,
                      "data.format": data.format, "data.dedupe": data.dedupe},
                     [paths.root / d for d in deps if not d.startswith(("src/", "stages/"))])


def end_stale_runs(keep: set[str] = frozenset(), reasons: dict[str, str] | None = None
                   ) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone (nothing else
    can mark a run after a SIGKILL), with a note; `reasons` gives a run a note of its
    own, `keep` spares runs about to be resumed. A run a later stage had reopened after
    its first stages finished is ended FINISHED with that stage's failure tagged, as
    `active_run` does. The runs ended."""
    from mlflow.entities import RunStatus

    client = _client()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    host = socket.gethostname()
    marked = []
    for run in client.search_runs(
            [experiment.experiment_id],
            f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"):
        run_id, pid = run.info.run_id, run.data.tags.get(PID_TAG, "")
        started = run.data.tags.get(STARTED_TAG) or None
        if run_id in keep or not pid.isdigit() or pid_alive(int(pid), started):
            continue
        note = (reasons or {}).get(run_id) or (
            f"process {pid} on {host} ended without closing this run (killed?)")
        stages = [s for s in run.data.tags.get(STAGES_TAG, "").split(",") if s]
        if len(stages) > 1:
            # A later stage reopened a run whose first stages had finished: that stage
            # died, not they (as in `active_run`).
            client.set_tag(run_id, stage_failed_tag(stages[-1]), f"stopped: {note}")
            client.set_tag(run_id, STAGES_TAG, ",".join(stages[:-1]))
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
            print(f"MLflow run {run_id}: its {stages[-1]} stage ended without closing "
                  f"it (killed?); the run stays FINISHED")
            marked.append(run_id)
            continue
        client.set_tag(run_id, NOTE_TAG, note)
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
        print(f"MLflow run {run_id} marked KILLED: {note}")
        marked.append(run_id)
    return marked


@dataclass(frozen=True)
class RunInputs:
    """What a run is computed from: the splits (logged as datasets), where they came
    from, and the stage's data dependencies (their hashes become tags)."""
    splits: dict[str, Path]
    source: dict[str, object]
    deps: list[Path]


def recorded_run(metrics_file: Path) -> str | None:
    """The MLflow run a stage's metrics file names (None: it names none)."""
    try:
        run_id = read_json(metrics_file)[RUN_ID_KEY]
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return None
    return str(run_id)


def continue_or_create_run(stage: str, upstream_file: Path, params: dict[str, object],
                           model_name: str, inputs: RunInputs,
                           copy_from: list[Path]) -> str:
    """The run `stage` logs into: the one `upstream_file` names, if this pipeline run
    made it (it carries exactly `params` and `stage` has not logged into it), else a new
    one naming the training run and holding the metrics of the `copy_from` files
    (module docstring)."""
    import mlflow

    check_experiment_params(params)
    client = _client()
    end_stale_runs()
    upstream_id = recorded_run(upstream_file)
    if upstream_id is None:
        raise SpamloraError(f"{upstream_file}: names no MLflow run (run the stage that "
                            f"writes it first)")
    try:
        upstream = client.get_run(upstream_id)
    except mlflow.exceptions.MlflowException:
        upstream = None  # e.g. a clone that pulled the outputs but not the store
    if upstream is not None:
        stages = upstream.data.tags.get(STAGES_TAG, "").split(",")
        same_params = all(upstream.data.params.get(k) == str(v) for k, v in params.items())
        if stage not in stages and same_params:
            client.set_tag(upstream_id, STAGES_TAG, ",".join([*stages, stage]))
            return upstream_id
    training = (upstream.data.tags.get(TRAINING_RUN_TAG, upstream_id) if upstream
                else upstream_id)
    run_id = create_run(stage, params, model_name, inputs, {TRAINING_RUN_TAG: training})
    copied = {k: v for path in copy_from for k, v in _numeric_metrics(read_json(path)).items()}
    if copied:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, now, 0)
                                          for k, v in copied.items()])
    print(f"{stage}: the upstream stages were not run now; MLflow run {run_id} names the "
          f"training run {training} it reuses")
    return run_id


def _numeric_metrics(tree: object, prefix: str = "") -> dict[str, float]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_numeric_metrics(value, f"{prefix}{metric_name(str(key))}."))
        return out
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("."): float(tree)}
    return {}


SPLIT_CONTEXTS = {"train": "training", "validation": "validation", "test": "testing"}


def _log_datasets(client, run_id: str, splits: dict[str, Path],
                  source: dict[str, object]) -> None:
    """The splits as MLflow dataset inputs of the run (the UI's Datasets column): digest
    DVC's content hash (md5) of the file, source its path, the upstream data URL and
    sha256 as tags, context training / validation / testing."""
    import warnings

    import mlflow
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for name, path in splits.items():
        with warnings.catch_warnings():  # its hint on integer columns: not our concern
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(pd.read_csv(path), source=path.as_posix(),
                                              name=path.name, digest=file_md5(path))
            entity = dataset._to_mlflow_entity()
        tags = {"mlflow.data.context": SPLIT_CONTEXTS[name], "path": path.as_posix(),
                **{k: str(v) for k, v in source.items()}}
        inputs.append(DatasetInput(entity, [InputTag(k, v) for k, v in tags.items()]))
    client.log_inputs(run_id, datasets=inputs)


def dir_md5(folder: Path) -> str:
    """DVC 3's hash of a folder (dvc-data's `Tree.digest`): the md5 of the JSON list of
    its files' md5 and relative paths, sorted by path, with ".dir" appended."""
    files = sorted((p for p in folder.rglob("*") if p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix())
    entries = [{"md5": digest, "relpath": p.relative_to(folder).as_posix()}
               for p, digest in zip(files, cached_md5(files), strict=True)]
    listing = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(listing).hexdigest() + ".dir"


def cached_md5(paths: list[Path]) -> list[str]:
    """`file_md5` of each file, cached while it keeps its size, mtime and inode, as DVC's
    own state does (`hub.file_digests`): hashing the base model's 0.5 GB took ~1 s of
    every train stage's start."""
    return file_digests(paths, algorithm="md5")


def dependency_tags(deps: list[Path]) -> dict[str, str]:
    """The md5 of each data dependency as DVC hashes it, of the content the stage reads
    now (dvc.lock would name the previous run's, or for a queued experiment another
    workspace's)."""
    tags = {}
    for dep in deps:
        if dep.is_file():
            tags[f"dvc.dep.{dep.as_posix()}"] = cached_md5([dep])[0]
        elif dep.is_dir():
            tags[f"dvc.dep.{dep.as_posix()}"] = dir_md5(dep)
    return tags


def stage_failed_tag(stage: str) -> str:
    """The tag a run carries while `stage`'s last try on it failed (its message)."""
    return f"spamlora.failed.{stage}"


@contextlib.contextmanager
def active_run(run_id: str, stage: str = "train") -> Iterator[object]:
    """The run, active for `mlflow.log_*` and tagged with this process; ended FINISHED,
    KILLED if the block was interrupted (Interrupted, KeyboardInterrupt), else FAILED
    if it raised. But a run that was FINISHED before `stage` reopened it (evaluate or
    plot continuing a finished training) keeps that status when `stage` fails: what
    finished did finish, and its model stays promotable. The failure is then recorded
    in `stage_failed_tag(stage)`, and `stage` is taken off the run's stages so that
    rerunning it continues the same run (a success removes the tag)."""
    import mlflow

    client = _client()
    try:
        before = client.get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        raise SpamloraError(f"MLflow run {run_id} is not in the store "
                            f"{redacted(tracking_uri())} (was the store moved or deleted?)"
                            ) from None
    for tag, value in process_tags().items():
        client.set_tag(run_id, tag, value)
    run = mlflow.start_run(run_id=run_id)
    try:
        yield run
    except BaseException as e:
        if isinstance(e, TrackingUnavailable) or server_unreachable(e):
            raise  # nothing can be recorded; a rerun resumes this run
        stopped = isinstance(e, (Interrupted, KeyboardInterrupt))
        if before != "FINISHED":
            mlflow.end_run("KILLED" if stopped else "FAILED")
            raise
        what = "stopped" if stopped else f"failed: {type(e).__name__}: {e}"
        client.set_tag(run_id, stage_failed_tag(stage), what[:1000])
        stages = client.get_run(run_id).data.tags.get(STAGES_TAG, "").split(",")
        client.set_tag(run_id, STAGES_TAG, ",".join(s for s in stages if s != stage))
        mlflow.end_run("FINISHED")
        raise
    if stage_failed_tag(stage) in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, stage_failed_tag(stage))
    mlflow.end_run("FINISHED")


def log_text(text: str, name: str) -> None:
    """`text` as artifact `name` of the active run, UTF-8 with "\n" line ends on every
    OS (`mlflow.log_text` writes in text mode: "\r\n" on Windows)."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_text(text, encoding="utf-8", newline="\n")
        mlflow.log_artifact(str(path))


def run_exists(run_id: str) -> bool:
    import mlflow

    try:
        _client().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return False
    return True


class StepLog:
    """Logs a training history into its run exactly once, however often the training
    was interrupted and resumed: each call logs the steps and epochs the run lacks."""

    def __init__(self, run_id: str):
        self.client, self.run_id = _client(), run_id
        steps = self.client.get_metric_history(run_id, "step_loss")
        epochs = self.client.get_metric_history(run_id, "val_loss")
        self.steps = max((m.step for m in steps), default=0)
        self.epochs = max((m.step for m in epochs), default=0)
        self.down: str | None = None  # why the server did not answer, once it did not

    def sync(self, history, final: bool = False) -> None:
        """Log what the run lacks. During training (not `final`) a server that does not
        answer costs a warning, once, and nothing else: training goes on, and what is
        not logged stays in the checkpoints. `final`: it is tried again, and a server
        still down is a `TrackingUnavailable`."""
        if self.down and not final:
            return
        try:
            self._log(history)
        except Exception as e:
            if not server_unreachable(e):
                raise
            if final:
                raise TrackingUnavailable(UNAVAILABLE.format(redacted(tracking_uri()))
                                          ) from None
            self.down = str(e).splitlines()[0][:200]
            print(f"warning: MLflow tracking server {redacted(tracking_uri())} did not "
                  f"answer ({self.down}): "
                  f"training goes on; what is not logged is kept in its checkpoint",
                  flush=True)

    def _log(self, history) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric("step_loss", loss, now, step)
                   for step, loss in enumerate(history.step_losses, start=1)
                   if step > self.steps]
        for record in history.epochs:
            if record.epoch > self.epochs:
                metrics += [Metric(k, v, now, record.epoch) for k, v in vars(record).items()
                            if k != "epoch"]
        for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[i: i + 1000])
        self.steps = len(history.step_losses)
        self.epochs = max((r.epoch for r in history.epochs), default=self.epochs)
