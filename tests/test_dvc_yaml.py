"""dvc.yaml says what each stage runs: its code deps are exactly the modules of
`spamlora` the stage script imports, directly or through other modules (an import inside
a function counts: it runs too), so editing any of them reruns the stage and editing
another does not. Its paths are those of `paths.Paths`."""

import ast
from pathlib import Path

import pytest
import yaml

from spamlora.paths import SPLITS, Paths

from .conftest import REPO

PACKAGE = REPO / "src" / "spamlora"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def imported_modules(path: Path) -> set[str]:
    """Names of the `spamlora` modules `path` imports anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_package = path.parent == PACKAGE
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names
                      if a.name.startswith("spamlora.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 and in_package:
                base = node.module
            elif node.level == 0 and node.module and node.module.split(".")[0] == "spamlora":
                base = node.module.partition(".")[2] or None
            else:
                continue
            # `from spamlora import stage` / `from . import batching` name modules;
            # `from spamlora.config import Params` / `from .model import X` name one.
            found |= {a.name for a in node.names} if base is None else {base.split(".")[0]}
    return {m for m in found if (PACKAGE / f"{m}.py").is_file()}


def closure(script: Path) -> set[str]:
    todo, seen = imported_modules(script), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo |= imported_modules(PACKAGE / f"{module}.py")
    return seen


def test_the_import_walk_sees_relative_absolute_and_lazy_imports(tmp_path):
    assert {"config", "errors"} <= imported_modules(PACKAGE / "stage.py")
    assert "weights" in imported_modules(PACKAGE / "cli.py")  # imported inside a function
    assert "batching" in closure(REPO / "stages" / "train.py")  # through spamlora.train


@pytest.mark.parametrize("name", list(STAGES))
def test_code_deps_are_exactly_what_the_stage_imports(name):
    stage = STAGES[name]
    script = stage["cmd"].split()[-1]
    assert stage["cmd"] == f"python {script}"
    deps = [d for d in stage["deps"] if isinstance(d, str)]
    assert script in deps
    listed = {Path(d).stem for d in deps if d.startswith("src/spamlora/")}
    needed = closure(REPO / script)
    assert not needed - listed, f"{name}: add to deps: {sorted(needed - listed)}"
    assert not listed - needed, f"{name}: deps it does not import: {sorted(listed - needed)}"


def test_dvc_yaml_paths_are_those_of_paths_py():
    paths = Paths()

    def outs(stage):
        return {o if isinstance(o, str) else next(iter(o)) for o in STAGES[stage]["outs"]}

    assert str(paths.raw_dir) in outs("download_data")
    assert {str(paths.balanced), str(paths.metrics("balance"))} <= outs("balance")
    assert {str(paths.split(s)) for s in SPLITS} | {str(paths.metrics("data"))} <= \
        outs("split")
    assert str(paths.base_model) in outs("download_model")
    assert {str(paths.train_dir), str(paths.metrics("train")),
            str(paths.plot_data("history"))} <= outs("train")
    assert {str(paths.test_predictions.parent), str(paths.metrics("eval")),
            str(paths.plot_data("roc"))} <= outs("evaluate")
    assert str(paths.figure("history").parent) in outs("plot")
