"""A throw-away git + DVC copy of the repository for tests that run real `dvc` commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import REPO

TRACKED = ["dvc.yaml", "params.yaml", "stages", "src", ".dvc/config", ".dvcignore",
           ".gitignore", "pyproject.toml"]


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
