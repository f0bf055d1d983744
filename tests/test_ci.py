"""The hosted CI workflow (.github/workflows/ci.yml) runs what the README tells users to
run, on the Pythons and systems pyproject.toml claims, and is valid for GitHub (`make lint`).

(`.ci/run`, the CI of the project's own machines, runs `make test`.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import yaml

from .conftest import REPO

try:
    import tomllib  # novermin (3.11+; pytest brings tomli before)
except ModuleNotFoundError:
    import tomli as tomllib

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def supported_pythons() -> list[str]:
    """The Python versions pyproject.toml claims, lowest first; the lowest is its floor."""
    project = pyproject()["project"]
    versions = sorted((c.rsplit(" :: ", 1)[1] for c in project["classifiers"]
                       if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)),
                      key=lambda v: tuple(map(int, v.split("."))))
    assert project["requires-python"] == f">={versions[0]}"
    return versions


def readme_block(language: str) -> list[str]:
    """The commands of the README's first ```language block, comments dropped."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(rf"```{language}\n(.*?)```", text, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines()
            if line.split("#", 1)[0].strip()]


def jobs_on(system: str) -> list[tuple[str, dict, list[str]]]:
    """(Python version, job, run lines) for each job and matrix entry on `system`."""
    found = []
    for job in workflow()["jobs"].values():
        if not job["runs-on"].startswith(f"{system}-"):
            continue
        matrix = job.get("strategy", {}).get("matrix", {})
        (setup,) = [s for s in job["steps"] if s.get("uses", "").startswith(
            "actions/setup-python@")]
        version = str(setup["with"]["python-version"])
        lines = [line.strip() for s in job["steps"] if "run" in s
                 for line in s["run"].splitlines() if line.strip()]
        for python in (matrix["python"] if version == "${{ matrix.python }}" else [version]):
            found.append((str(python), job, lines))
    return found


def test_linux_runs_make_test_on_the_lowest_and_newest_python():
    pythons = supported_pythons()
    assert pythons[0] == "3.10" and len(pythons) > 1
    assert "make test" in readme_block("bash")[1]
    testing = {python for python, _, lines in jobs_on("ubuntu") if "make test" in lines}
    assert testing == {pythons[0], pythons[-1]}
    (python_check,) = {line for _, _, lines in jobs_on("ubuntu") for line in lines
                       if line.startswith("python3 --version")}
    assert "matrix.python" in python_check  # `make` builds .venv with that python3


def test_windows_runs_the_readme_powershell_commands_on_the_lowest_python():
    """Each command of the README's PowerShell block, in order, but `dvc repro` (as
    Linux runs `make test`, not `make repro`); `py -3` is the job's Python."""
    readme = [c for c in readme_block("powershell") if c != "dvc repro"]
    assert readme[0] == "py -3 -m venv .venv" and any("pytest" in c for c in readme)
    ((python, job, lines),) = jobs_on("windows")
    assert python == supported_pythons()[0]
    assert str(job["env"]["PY_PYTHON3"]) == python
    step = next(s for s in job["steps"] if "py -3 -m venv .venv" in s.get("run", ""))
    assert step["shell"] == "pwsh"
    assert lines[0] == "$PSNativeCommandUseErrorActionPreference = $true"  # stop on failure
    position = [lines.index(c) for c in readme]  # ValueError: a command not run
    assert position == sorted(position)


def test_the_workflow_runs_make_lint_and_make_lint_checks_the_workflow(tmp_path):
    assert any("make lint" in lines for _, _, lines in jobs_on("ubuntu"))
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make (Windows): the Linux jobs check the Makefile")
    venv = tmp_path / "venv"

    def dry_run(target: str) -> list[str]:
        proc = subprocess.run([make, "-n", target, f"VENV={venv}"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    lint = dry_run("lint")
    assert (f"{venv}/bin/check-jsonschema --builtin-schema vendor.github-workflows "
            ".github/workflows/ci.yml") in lint
    assert any(line.startswith(f"{venv}/bin/ruff check") for line in lint)
    # what `make lint` needs comes with the dev extra, which `make test` installs
    assert any("pip install -e '.[dev]'" in line for line in lint)
    assert any(r.startswith("check-jsonschema")
               for r in pyproject()["project"]["optional-dependencies"]["dev"])
    assert "make test" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def check_workflow(path) -> subprocess.CompletedProcess:
    """`make lint`'s check of a workflow file: GitHub's schema, vendored by
    check-jsonschema (no download)."""
    # The dev extra brings it: a missing one fails rather than skips.
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                           "vendor.github-workflows", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_the_workflow_is_valid_for_github():
    proc = check_workflow(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_workflow_check_refuses_a_broken_workflow(tmp_path):
    """The check `make lint` runs can fail: a misspelt key is refused."""
    text = WORKFLOW.read_text(encoding="utf-8")
    assert "runs-on:" in text
    broken = tmp_path / "ci.yml"
    broken.write_text(text.replace("runs-on:", "runs_on:", 1), encoding="utf-8")
    proc = check_workflow(broken)
    assert proc.returncode != 0
    assert "runs_on" in proc.stdout + proc.stderr
