"""Windows and Python 3.10: what can be checked on this machine.

Windows has no `fcntl` or `resource`; every module of the package and every stage script
must still import. Paths in Windows syntax are handled where the logic is pure."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path, PurePosixPath, PureWindowsPath

import pytest
import yaml

from spamlora.config import Params, ParamsError
from spamlora.download import is_url, join_url, to_url
from spamlora.tracking import sqlite_uri

from .conftest import REPO

POSIX_ONLY = ("fcntl", "resource")

IMPORT_ALL = textwrap.dedent("""
    import importlib, importlib.abc, importlib.util, pkgutil, sys
    from pathlib import Path

    class PosixOnly(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in {blocked!r}:
                raise ImportError(f"No module named {{name!r}} (as on Windows)")
            return None

    for name in {blocked!r}:
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, PosixOnly())
    import spamlora
    imported = []
    for info in pkgutil.walk_packages(spamlora.__path__, "spamlora."):
        importlib.import_module(info.name)
        imported.append(info.name)
    for script in sorted(Path("stages").glob("*.py")):
        spec = importlib.util.spec_from_file_location("stage_" + script.stem, script)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        imported.append(str(script))
    for name in {blocked!r}:
        assert name not in sys.modules, name + " was imported"
    print(len(imported))
""")


def test_every_module_and_stage_imports_without_posix_only_modules():
    code = IMPORT_ALL.format(blocked=POSIX_ONLY)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = len(list((REPO / "src" / "spamlora").glob("*.py"))) - 1  # not __init__
    stages = len(list((REPO / "stages").glob("*.py")))
    assert int(proc.stdout.split()[-1]) == modules + stages


def test_the_import_check_catches_a_posix_only_import(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "bad.py").write_text("import fcntl\n")
    code = IMPORT_ALL.format(blocked=POSIX_ONLY)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "as on Windows" in proc.stderr


@pytest.mark.parametrize("source, url", [
    (r"C:\mirror\sms.zip", "file:///C:/mirror/sms.zip"),
    ("C:/mirror/gpt2", "file:///C:/mirror/gpt2"),
    (r"\\server\share\sms.zip", "file://server/share/sms.zip"),
    ("file:///C:/mirror/sms.zip", "file:///C:/mirror/sms.zip"),
    ("https://example.org/a.zip", "https://example.org/a.zip"),
])
def test_windows_paths_become_file_urls(source, url):
    assert to_url(source, PureWindowsPath) == url


def test_a_drive_letter_is_a_path_not_a_url_scheme():
    assert not is_url(r"C:\mirror\sms.zip") and not is_url("D:/x")
    assert is_url("file:///C:/x") and is_url("https://h/x") and not is_url("ftp://h/x")
    with pytest.raises(ValueError, match="not an absolute"):
        to_url(r"mirror\sms.zip", PureWindowsPath)
    assert join_url("file:///C:/mirror/gpt2/", "config.json") == \
        "file:///C:/mirror/gpt2/config.json"


def test_windows_paths_in_params_are_accepted_as_local_paths():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["url"] = r"C:\mirror\smsspamcollection.zip"
    params["data"]["mirrors"] = ["D:/backup/sms.zip", r"\\server\share\sms.zip"]
    params["model"]["url"] = r"C:\mirror\{name}"
    parsed = Params.from_dict(params)
    assert parsed.model.base_url == r"C:\mirror\gpt2"
    params["data"]["mirrors"] = ["ftp://host/sms.zip"]
    with pytest.raises(ParamsError, match=r"data\.mirrors\[0\]"):
        Params.from_dict(params)


def test_sqlite_store_uri_on_both_platforms():
    assert sqlite_uri(PureWindowsPath(r"C:\Users\me\spamlora\mlflow.db")) == \
        "sqlite:///C:/Users/me/spamlora/mlflow.db"
    assert sqlite_uri(PurePosixPath("/home/me/spamlora/mlflow.db")) == \
        "sqlite:////home/me/spamlora/mlflow.db"


@pytest.mark.parametrize("source, expect_ok", [(None, True), ("import tomllib\n", False)])
def test_nothing_needs_a_python_newer_than_3_10(tmp_path, source, expect_ok):
    """vermin reads every file and names any standard-library feature past the floor
    (`tomllib`, `datetime.UTC`, `typing.Self`, `enum.StrEnum`, `except*`, ...)."""
    if source is None:
        targets = [str(REPO / d) for d in ("src", "stages", "tests", "benchmarks")]
    else:
        (tmp_path / "new.py").write_text(source)
        targets = [str(tmp_path / "new.py")]
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or "vermin"
    proc = subprocess.run([vermin, "-t=3.10-", "--violations",
                           "--no-tips", "--eval-annotations", *targets],
                          capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == expect_ok, proc.stdout[-3000:]
