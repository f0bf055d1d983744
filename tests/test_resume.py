"""An interrupted train stage loses nothing: killed (SIGKILL) or stopped (SIGTERM) at a
random step and rerun, it resumes the same MLflow run and ends with the bytes of a run
never interrupted. Real subprocesses on a tiny model; no timed assertions."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from spamlora.checkpoint import FOLDER
from spamlora.hub import file_sha256
from spamlora.mlflow_model import ADAPTER_DIGEST_TAG, logged_models
from spamlora.paths import Paths
from spamlora.tracking import EXPERIMENT, NOTE_TAG, RUN_ID_KEY, STORE_FILE

from .conftest import REPO
from .workspace import stage_workspace

pytestmark = pytest.mark.e2e

EPOCHS, STEPS_PER_EPOCH = 3, 7  # 50 training messages, batch 8
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH


def write_params(ws: Path, **overrides) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(epochs=EPOCHS, precision="fp32", checkpoint_seconds=0)
    params["lora"].update(dropout=0.1)  # so the global generator's state matters
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def new_workspace(root: Path, tiny_gpt2: Path, **overrides) -> Path:
    ws = stage_workspace(root, tiny_gpt2)
    write_params(ws, **overrides)
    return ws


def start(ws: Path, *python_args: str) -> subprocess.Popen:
    env = {**os.environ, "DVC_ROOT": str(ws), "XDG_CACHE_HOME": str(ws / ".cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, *python_args, str(REPO / "stages" / "train.py")],
                            cwd=ws,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out


def newest_step(ws: Path) -> int:
    done = [int(p.name.split("-")[1]) for p in (ws / FOLDER).glob("*/step-*.sha256")]
    return max(done, default=0)


def train_until(ws: Path, step: int, signum: int) -> tuple[int, str]:
    """Start the stage, send `signum` once a checkpoint of `step` exists."""
    proc = start(ws)
    while newest_step(ws) < step:
        if proc.poll() is not None:
            pytest.fail(f"training ended before step {step}:\n{proc.communicate()[0]}")
        time.sleep(0.005)
    os.kill(proc.pid, signum)
    return finish(proc)


def train(ws: Path) -> str:
    code, out = finish(start(ws))
    assert code == 0, out[-3000:]
    return out


def client(ws: Path):
    return mlflow.MlflowClient(f"sqlite:///{ws / STORE_FILE}")


def runs(ws: Path) -> list:
    c = client(ws)
    return c.search_runs([c.get_experiment_by_name(EXPERIMENT).experiment_id])


def outputs(ws: Path) -> dict:
    """Everything the stage produces that must not depend on interruptions."""
    paths = Paths(ws)
    train_json = json.loads(paths.metrics("train").read_text())
    run_id = train_json.pop(RUN_ID_KEY)
    assert train_json.pop("train_seconds") > 0  # how long it took varies, nothing else
    history = client(ws).get_metric_history(run_id, "step_loss")
    return {"adapter": paths.adapter.read_bytes(), "train.json": train_json,
            "history.csv": paths.plot_data("history").read_bytes(),
            "steps.csv": paths.plot_data("steps").read_bytes(),
            "step_loss": sorted((m.step, m.value) for m in history)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_gpt2):
    """The outputs of runs never interrupted, by precision."""
    made = {}

    def get(precision: str, **overrides) -> dict:
        key = (precision, tuple(sorted(overrides.items())))
        if key not in made:
            ws = new_workspace(tmp_path_factory.mktemp("reference"), tiny_gpt2,
                               **{"train.precision": precision, **overrides})
            train(ws)
            made[key] = outputs(ws)
            assert not (ws / FOLDER).exists() or not any((ws / FOLDER).iterdir())
        return made[key]

    return get


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def a_random_step() -> int:
    step = random.randrange(2, TOTAL_STEPS - 3)
    print(f"interrupting after step {step}")  # shown if the test fails
    return step


@pytest.mark.parametrize("precision, damage", [("fp32", True), ("bf16", False)])
def test_sigkill_then_rerun_resumes_the_same_run_bit_exactly(tmp_path, tiny_gpt2,
                                                             reference, precision, damage):
    """With `damage`, the newest checkpoint is damaged before the rerun: it is skipped
    for the previous one, and the result is still exact."""
    ws = new_workspace(tmp_path, tiny_gpt2, **{"train.precision": precision})
    step = a_random_step()
    code, _ = train_until(ws, step, signal.SIGKILL)
    assert code == -signal.SIGKILL
    (killed,) = runs(ws)
    assert killed.info.status == "RUNNING"  # nothing could mark it
    assert not Paths(ws).adapter.exists() and not Paths(ws).metrics("train").exists()
    if damage:
        newest = sorted((ws / FOLDER).glob("*/step-*.safetensors"))[-1]
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    out = train(ws)
    assert "resuming from epoch" in out
    if damage:
        assert f"checkpoint {newest} skipped: its sha256 does not match" in out
    (run,) = runs(ws)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    got = outputs(ws)
    assert [s for s, _ in got["step_loss"]] == list(range(1, TOTAL_STEPS + 1))  # once each
    assert got == reference(precision)
    assert not any((ws / FOLDER).iterdir())  # checkpoints are gone once it completed


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_stops_with_a_checkpoint_marks_the_run_killed_and_resumes(
        tmp_path, tiny_gpt2, reference, signum):
    """SIGHUP: a closed terminal or ssh session (issue 31, item 9), as SIGTERM."""
    ws = new_workspace(tmp_path, tiny_gpt2)
    step = a_random_step()
    code, out = train_until(ws, step, signum)
    assert code == 130, out[-3000:]
    assert "stopping after this step" in out
    (stopped,) = runs(ws)
    assert stopped.info.status == "KILLED"
    assert not Paths(ws).adapter.exists() and not (Paths(ws).train_dir.exists()
                                                   and any(Paths(ws).train_dir.iterdir()))
    logged = client(ws).get_metric_history(stopped.info.run_id, "step_loss")
    stopped_at = max(m.step for m in logged)
    assert stopped_at >= step
    out = train(ws)
    epoch = (stopped_at - 1) // STEPS_PER_EPOCH + 1
    assert f"resuming from epoch {epoch}, step {stopped_at}" in out
    (run,) = runs(ws)
    assert run.info.run_id == stopped.info.run_id and run.info.status == "FINISHED"
    assert outputs(ws) == reference("fp32")


def test_another_computation_keeps_a_killed_ones_checkpoint_which_then_resumes(
        tmp_path, tiny_gpt2, reference):
    """A param change after a kill trains afresh, marks the old run KILLED with where
    its checkpoint is kept, and leaves that checkpoint alone (issue 25, item 2): going
    back to the old params resumes the old run and ends as if never stopped."""
    ws = new_workspace(tmp_path, tiny_gpt2)
    train_until(ws, a_random_step(), signal.SIGKILL)
    (killed,) = runs(ws)
    (old_folder,) = (ws / FOLDER).iterdir()
    old_files = sorted(p.name for p in old_folder.iterdir())
    write_params(ws, **{"lora.rank": 2})
    out = train(ws)
    assert "resuming" not in out
    by_id = {r.info.run_id: r for r in runs(ws)}
    assert len(by_id) == 2
    old = by_id[killed.info.run_id]
    assert old.info.status == "KILLED"
    assert f"is kept in {old_folder}" in old.data.tags[NOTE_TAG]
    (new,) = [r for r in by_id.values() if r.info.run_id != killed.info.run_id]
    assert new.info.status == "FINISHED" and new.data.params["lora.rank"] == "2"
    assert sorted(p.name for p in old_folder.iterdir()) == old_files
    write_params(ws)
    out = train(ws)
    assert "resuming from" in out
    resumed = {r.info.run_id: r for r in runs(ws)}[killed.info.run_id]
    assert resumed.info.status == "FINISHED"
    assert outputs(ws) == reference("fp32")


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_two_processes_killed_and_resumed_match_an_uninterrupted_pair(tmp_path, tiny_gpt2,
                                                                      reference):
    two = {"train.nproc": 2}  # LoRA dropout 0.1: each process's generators matter
    ws = new_workspace(tmp_path, tiny_gpt2, **two)
    step = a_random_step()
    proc = start(ws)
    while newest_step(ws) < step:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.005)
    tree = descendants(proc.pid)
    for pid in [proc.pid, *tree]:  # as a power cut would: the stage, torchrun, workers
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert len(tree) >= 3
    out = train(ws)
    assert "resuming from" in out
    (run,) = runs(ws)
    assert run.info.status == "FINISHED"
    assert outputs(ws) == reference("fp32", **two)


# The train stage, SIGKILLed as soon as it has logged its model: before it writes
# metrics/train.json and removes its checkpoint.
KILLED_AFTER_LOGGING = """
import os, runpy, signal, sys
import spamlora.mlflow_model as m
log_model = m.log_model
def then_killed(*args, **kwargs):
    log_model(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
m.log_model = then_killed
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def models(ws: Path, run) -> list:
    return logged_models(client(ws), run.info.run_id, run.info.experiment_id)


def test_killed_after_logging_its_model_the_resumed_run_keeps_that_one_model(tmp_path,
                                                                            tiny_gpt2):
    """Issue 31, item 8: the rerun resumes the run, which holds the model already; it
    must not log a second one."""
    ws = new_workspace(tmp_path, tiny_gpt2)
    code, out = finish(start(ws, "-c", KILLED_AFTER_LOGGING))
    assert code == -signal.SIGKILL, out[-3000:]
    (killed,) = runs(ws)
    (logged,) = models(ws, killed)
    assert not Paths(ws).metrics("train").exists()
    out = train(ws)
    assert "resuming from" in out
    (run,) = runs(ws)
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    (model,) = models(ws, run)
    assert model.model_id == logged.model_id and model.status == "READY"
    assert model.tags[ADAPTER_DIGEST_TAG] == file_sha256(Paths(ws).adapter)


def test_an_unwritable_checkpoint_folder_fails_before_training(tmp_path, tiny_gpt2):
    ws = new_workspace(tmp_path, tiny_gpt2)
    (ws / FOLDER).parent.mkdir(parents=True)
    (ws / FOLDER).write_text("a file where the folder should be")
    code, out = finish(start(ws))
    assert code == 1 and f"checkpoint folder {ws / FOLDER}" in out and "not writable" in out
    assert not (ws / STORE_FILE).exists()  # before any run, let alone training
