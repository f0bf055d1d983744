"""A throw-away git + DVC copy of the repository for tests that run real `dvc` commands."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

from .conftest import REPO, free_port

TRACKED = ["dvc.yaml", "params.yaml", "stages", "src", ".dvc/config", ".dvcignore",
           ".gitignore", "pyproject.toml"]


def stage_workspace(root: Path, base_model: Path) -> Path:
    """A folder laid out as after download_model and split (80 short messages; three
    test messages copy training ones, as in the real split), for running the train,
    evaluate and plot stages without DVC."""
    import pandas as pd

    from spamlora.data import DEFAULT_CLASSES, write_csv
    from spamlora.paths import Paths

    from .conftest import sms_lines

    paths = Paths(root)
    shutil.copytree(base_model, paths.base_model)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    rows = [line.split("\t") for line in sms_lines(40, 40).splitlines()]
    df = pd.DataFrame({"id": range(1, 81), "text": [t for _, t in rows],
                       "label": [int(label == "spam") for label, _ in rows]})
    df = df.sample(frac=1, random_state=0)
    copies = df[:3].assign(id=[81, 82, 83])
    for name, part in (("train", df[:50]), ("validation", df[50:65]),
                       ("test", pd.concat([df[65:], copies]))):
        write_csv(part, paths.split(name))
    DEFAULT_CLASSES.write(paths.classes)
    return root


def make_workspace(dest: Path, overrides: dict[str, object]) -> Path:
    """Copy what git tracks of the pipeline to `dest`, apply `section.key` overrides to
    params.yaml, and commit it (`dvc exp run` needs a commit)."""
    for name in TRACKED:
        src = REPO / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__",
                                                                      "*.egg-info"))
        else:
            shutil.copy(src, target)
    params_file = dest / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        params[section][key] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm",
                 "workspace"]):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def env(workspace: Path) -> dict[str, str]:
    """Stage commands run `python`: it must be this interpreter, importing the copy."""
    e = dict(os.environ)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONPATH"] = str(workspace / "src")
    e["GIT_AUTHOR_NAME"] = e["GIT_COMMITTER_NAME"] = "t"
    e["GIT_AUTHOR_EMAIL"] = e["GIT_COMMITTER_EMAIL"] = "t@localhost"
    e.pop("MLFLOW_TRACKING_URI", None)
    e.pop("DVC_ROOT", None)
    return e


def dvc(workspace: Path, *args: str, timeout: float = 300) -> str:
    """Run `dvc args...` in the workspace; its output, or a failure showing it."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace,
                          env=env(workspace), capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{out}"
    return out


@contextlib.contextmanager
def serving(workspace: Path, model_uri: str) -> Iterator[str]:
    """`mlflow models serve` of `model_uri` from the workspace's store, on a free port of
    127.0.0.1: its URL while it runs."""
    port = free_port()
    log = workspace / f"serve-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
             "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
            cwd=workspace, env={**env(workspace), "MLFLOW_TRACKING_URI":
                                f"sqlite:///{workspace / 'mlflow.db'}"},
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            assert proc.poll() is None, f"server exited: {log.read_text()}"
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError(f"server did not answer /ping in 120 s: {log.read_text()}")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def served_probabilities(url: str, texts: list[str]) -> list[float]:
    request = urllib.request.Request(url + "/invocations",
                                     data=json.dumps({"inputs": texts}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return [row["spam_probability"] for row in json.loads(r.read())["predictions"]]
