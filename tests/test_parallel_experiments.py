"""Two `dvc exp run` in one workspace (issue 31, item 3), with the real DVC: the second
writes its -S values into params.yaml while the first runs; the first's stages, which
would log an MLflow run under its name with the other's values, fail instead. A stage
of its own stands in for train: it reads params.yaml and checks it as train does,
without training anything."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO
from .workspace import env

pytestmark = pytest.mark.e2e

# The stage: with PROBE_WAIT_FOR, it first waits until another `dvc exp run` has
# written that train.seed into params.yaml (as a train stage starting at that moment
# reads it), then runs as every stage does.
PROBE = """
import os, sys, time
from pathlib import Path

import yaml

from spamlora import stage, tracking

if os.environ.get("PROBE_WAIT_FOR"):
    Path(os.environ["PROBE_STARTED"]).touch()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            seed = yaml.safe_load(Path("params.yaml").read_text())["train"]["seed"]
        except Exception:  # caught half-written
            seed = None
        if str(seed) == os.environ["PROBE_WAIT_FOR"]:
            break
        time.sleep(0.005)
    else:
        sys.exit("params.yaml never changed")


def main(params):
    tracking.check_experiment_params(params.flat())
    Path("seen.txt").write_text(str(params.train.seed))
    print(f"checked train.seed {params.train.seed} against experiment "
          f"{os.environ['DVC_EXP_NAME']}")


stage.run(main)
"""

DVC_YAML = """
stages:
  probe:
    cmd: python probe.py
    params: [train.seed]
    outs: [seen.txt]
"""


def probe_repo(root: Path) -> Path:
    ws = root / "ws"
    ws.mkdir()
    shutil.copy(REPO / "params.yaml", ws / "params.yaml")
    (ws / "probe.py").write_text(PROBE)
    (ws / "dvc.yaml").write_text(DVC_YAML)
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                    ["git", "add", "-A"], ["git", "commit", "-qm", "probe"]):
        subprocess.run(command, cwd=ws, env=probe_env(ws), check=True)
    return ws


def probe_env(ws: Path, **extra: str) -> dict[str, str]:
    return {**env(ws), "PYTHONPATH": str(REPO / "src"), "DVC_NO_ANALYTICS": "1", **extra}


def exp_run(ws: Path, *args: str, **extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dvc", "exp", "run", *args], cwd=ws,
                            env=probe_env(ws, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def test_one_experiment_at_a_time_passes_the_check(tmp_path):
    """What DVC applies for an experiment is found (the message names it) and matches,
    in the workspace and in a --temp copy."""
    ws = probe_repo(tmp_path)
    code, out = finish(exp_run(ws, "-S", "train.seed=5", "-n", "alone"))
    assert code == 0, out
    assert "checked train.seed 5 against experiment alone" in out
    code, out = finish(exp_run(ws, "--temp", "-S", "train.seed=6", "-n", "alone-temp"))
    assert code == 0, out
    assert "checked train.seed 6 against experiment alone-temp" in out


def test_a_second_exp_run_in_the_workspace_fails_the_first_instead_of_mislabelling_it(
        tmp_path):
    ws = probe_repo(tmp_path)
    started = tmp_path / "probe-started"
    first = exp_run(ws, "-S", "train.seed=5", "-n", "exp-a", PROBE_WAIT_FOR="9",
                    PROBE_STARTED=str(started))
    while not started.exists():
        assert first.poll() is None, first.communicate()[0]
        time.sleep(0.01)
    second = exp_run(ws, "-S", "train.seed=9", "-n", "exp-b")
    code, out = finish(first)
    finish(second)  # DVC's own race: whether it fails or runs is DVC's
    assert code != 0, out
    assert "checked train.seed" not in out
    assert ("error: params.yaml: another `dvc exp run` changed it during experiment "
            "'exp-a' (") in out
    assert ("so nothing is logged under that name. Parallel experiments go through "
            "`dvc exp run --queue` or `--temp`") in out
    # It read exp-b's values while DVC's record still named exp-a, or after exp-b had
    # taken the record over: either is said.
    assert ("(train.seed is 9 here, DVC applied 5)" in out
            or "now names experiment 'exp-b')" in out), out
