"""Text the project writes, and its own files in git, are the same bytes on every OS:
UTF-8 with "\\n" line ends. DVC and MLflow hash raw bytes, so a "\\r\\n" written on Windows
(text mode, pandas' `os.linesep`, Git for Windows' `core.autocrlf`) would make a pulled
pipeline rerun every stage and give the splits other digests.

Windows' text files are emulated here: `_pyio`, the pure-Python `io`, takes the line end
from `os.linesep` and the default encoding from `locale` when a file is opened (the C
`io` has "\\n" built in on POSIX)."""

from __future__ import annotations

import ast
import builtins
import io
import locale
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from spamlora import tracking
from spamlora.data import write_csv
from spamlora.fileio import read_json, write_json, write_text
from spamlora.sweep import COLUMNS, write_report
from spamlora.tracking import file_md5

from .conftest import REPO

TEXT = "Free entry: win £100 🎉\nreply \"YES\", or café"


def emulate_windows(m: pytest.MonkeyPatch) -> None:
    """Files opened in text mode from now on write "\\r\\n" and encode with cp1252."""
    import _pyio

    m.setattr(os, "linesep", "\r\n")
    m.setattr(builtins, "open", _pyio.open)
    m.setattr(io, "open", _pyio.open)
    m.setattr(locale, "getpreferredencoding", lambda do_setlocale=True: "cp1252")
    if hasattr(locale, "getencoding"):  # 3.11+
        m.setattr(locale, "getencoding", lambda: "cp1252")


@pytest.fixture
def windows_text_io(monkeypatch):
    emulate_windows(monkeypatch)


def test_the_emulation_writes_as_windows_does(windows_text_io, tmp_path):
    """Without this the other tests would prove nothing: a plain text write gives "\\r\\n"
    and cp1252, and an emoji cannot be written at all; pandas ends rows with "\\r\\n"."""
    (tmp_path / "plain.txt").write_text("a\nb\n")
    assert (tmp_path / "plain.txt").read_bytes() == b"a\r\nb\r\n"
    (tmp_path / "plain.txt").write_text("£")
    assert (tmp_path / "plain.txt").read_bytes() == "£".encode("cp1252")
    with pytest.raises(UnicodeEncodeError):
        (tmp_path / "plain.txt").write_text("🎉")
    pd.DataFrame({"a": [1, 2]}).to_csv(tmp_path / "plain.csv", index=False)
    assert (tmp_path / "plain.csv").read_bytes() == b"a\r\n1\r\n2\r\n"


def test_csv_outputs_are_the_same_bytes_on_windows(monkeypatch, tmp_path):
    """The splits (and every other CSV a stage writes) and so the md5 DVC and MLflow
    record for them (`tracking.file_md5`, the dataset digest) do not depend on the OS."""
    df = pd.DataFrame({"id": [3, 1], "text": [TEXT, "ok see you at 5"], "label": [1, 0]})
    write_csv(df, tmp_path / "here.csv")
    with monkeypatch.context() as m:
        emulate_windows(m)
        write_csv(df, tmp_path / "windows.csv")
    written = (tmp_path / "windows.csv").read_bytes()
    assert b"\r" not in written
    assert written == (tmp_path / "here.csv").read_bytes()
    assert file_md5(tmp_path / "windows.csv") == file_md5(tmp_path / "here.csv")
    back = pd.read_csv(tmp_path / "windows.csv", keep_default_na=False)
    assert back["text"].tolist() == df["text"].tolist()


def test_json_and_text_outputs_are_utf8_with_lf_on_windows(windows_text_io, tmp_path):
    write_json(tmp_path / "m.json", {"text": TEXT, "nested": {"n": [1, 2]}})
    write_text(tmp_path / "m.md", TEXT + "\n")
    for name in ("m.json", "m.md"):
        written = (tmp_path / name).read_bytes()
        assert b"\r" not in written, name
        written.decode("utf-8")  # neither cp1252 nor cut short
    assert read_json(tmp_path / "m.json")["text"] == TEXT
    assert (tmp_path / "m.md").read_bytes() == (TEXT + "\n").encode("utf-8")


def test_the_sweep_report_is_utf8_with_lf_on_windows(windows_text_io, tmp_path):
    df = pd.DataFrame([["exp-é", "abc", rank, seed, 0.9 + rank / 100, 0.8, 1000 * rank]
                       for rank in (2, 4) for seed in (1, 2)], columns=COLUMNS)
    write_report(df, tmp_path)
    for name in ("experiments.csv", "by_rank.md"):
        written = (tmp_path / name).read_bytes()
        assert b"\r" not in written and written.count(b"\n") >= 3, name
        written.decode("utf-8")
    assert "exp-é" in (tmp_path / "experiments.csv").read_text(encoding="utf-8")


def test_the_book_experiments_report_is_utf8_with_lf_on_windows(windows_text_io, tmp_path):
    from spamlora import experiments as book

    row = book.BY_NUMBER[8]
    df = pd.DataFrame([{"row": 8, "experiment": row.name, "rev": "abc", "overridden": "",
                        "train_accuracy": 1.0, "validation_accuracy": 0.9,
                        "test_accuracy": 0.9, "test_unseen_accuracy": 0.89,
                        "train_seconds": 40.0, "hardware": "x86_64 AVX2",
                        "book_train_accuracy": 1.0, "book_validation_accuracy": 0.9664,
                        "book_test_accuracy": 0.9367, "book_train_seconds": 41.4}],
                      columns=book.COLUMNS)
    book.write_report(df, tmp_path)
    written = (tmp_path / "table.md").read_bytes()
    assert b"\r" not in written and written.count(b"\n") > 20
    assert "| – |" in written.decode("utf-8")  # the rows not run, as written


def test_mlflow_text_artifacts_are_utf8_with_lf_on_windows(windows_text_io, monkeypatch):
    """`mlflow.log_text` writes in text mode ("\\r\\n" on Windows); `tracking.log_text`
    hands MLflow a file written as UTF-8 with "\\n"."""
    import mlflow

    logged = []
    monkeypatch.setattr(mlflow, "log_artifact",
                        lambda path, *a, **k: logged.append((Path(path).name,
                                                             Path(path).read_bytes())))
    tracking.log_text(TEXT + "\n", "model_summary.txt")
    assert logged == [("model_summary.txt", (TEXT + "\n").encode("utf-8"))]


# Every text write in the project's code names its encoding and line end: the default
# of each (the locale's code page; "\r\n" on Windows) depends on the OS.
SOURCES = ("src", "stages", "benchmarks")
TEXT_MODE_CALLS = {"write_text": {"encoding", "newline"}, "open": {"encoding", "newline"},
                   "to_csv": {"encoding", "lineterminator"}, "writer": {"lineterminator"},
                   "DictWriter": {"lineterminator"}}
TEXT_MODE_ONLY = {"log_text", "log_dict"}  # mlflow's: text mode, no way to say otherwise


def _mode(call: ast.Call) -> str | None:
    """The mode of `open(path, mode)` / `path.open(mode)`, when written out."""
    for kw in call.keywords:
        if kw.arg == "mode":
            return kw.value.value if isinstance(kw.value, ast.Constant) else None
    index = 1 if isinstance(call.func, ast.Name) else 0
    if len(call.args) > index and isinstance(call.args[index], ast.Constant):
        return call.args[index].value
    return "r"


def unsafe_text_writes(source: str, name: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(
            func.value, ast.Name) else None
        where = f"{name}:{node.lineno}: {called}"
        if called in TEXT_MODE_ONLY and owner == "mlflow":
            found.append(f"{where} writes in text mode")
            continue
        if called in ("writer", "DictWriter") and owner != "csv":
            continue
        if called == "write_text" and not isinstance(func, ast.Attribute):
            continue  # fileio.write_text, imported by name
        if called == "open":
            mode = _mode(node)
            if owner == "os" or (mode is not None and ("b" in mode or not set(mode) & set("wax"))):
                continue
        if called in TEXT_MODE_CALLS:
            missing = TEXT_MODE_CALLS[called] - {kw.arg for kw in node.keywords}
            if missing:
                found.append(f"{where} without {', '.join(sorted(missing))}")
    return found


def test_every_text_write_names_its_encoding_and_line_end():
    found = []
    for folder in SOURCES:
        for path in sorted((REPO / folder).rglob("*.py")):
            found += unsafe_text_writes(path.read_text(encoding="utf-8"),
                                        str(path.relative_to(REPO)))
    assert found == []


def test_the_text_write_check_catches_each_kind():
    source = "\n".join([
        'p.write_text("x")', 'p.write_text("x", encoding="utf-8")',
        'open(p, "w", encoding="utf-8")', 'p.open("a")', 'df.to_csv(p, index=False)',
        'csv.DictWriter(out, fieldnames=f)', 'mlflow.log_text(s, "a.txt")',
        # and these are fine:
        'p.write_text("x", encoding="utf-8", newline="\\n")', 'open(p)', 'p.open("wb")',
        'open(p, "rb")', 'os.open(p, os.O_WRONLY)', 'log.writer(1)', 'write_text(p, s)',
        'df.to_csv(p, lineterminator="\\n", encoding="utf-8")',
        'csv.writer(out, lineterminator="\\n")'])
    assert unsafe_text_writes(source, "x.py") == [
        "x.py:1: write_text without encoding, newline", "x.py:2: write_text without newline",
        "x.py:3: open without newline", "x.py:4: open without encoding, newline",
        "x.py:5: to_csv without encoding, lineterminator",
        "x.py:6: DictWriter without lineterminator", "x.py:7: log_text writes in text mode"]


# The project's own files in git.

def _git(*args: str, cwd: Path = REPO) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          encoding="utf-8", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_every_tracked_text_file_is_checked_out_with_lf():
    """`eol=lf` holds for each tracked file (src/, stages/, metrics/, dvc.yaml, ...), and
    the index holds none with "\\r\\n"; tests/fixtures stays byte for byte (`-text`)."""
    files = _git("ls-files", "-z").split("\0")[:-1]
    assert "src/spamlora/cli.py" in files and "metrics/README.md" in files
    attrs = {}
    for line in _git("check-attr", "eol", "text", "--", *files).splitlines():
        path, attr, value = line.rsplit(": ", 2)
        attrs.setdefault(path, {})[attr] = value
    fixtures = [f for f in files if f.startswith("tests/fixtures/")]
    assert fixtures and all(attrs[f]["text"] == "unset" for f in fixtures)
    for path in set(files) - set(fixtures):
        assert attrs[path]["eol"] == "lf", path
        assert attrs[path]["text"] in ("auto", "set"), path
    for line in _git("ls-files", "--eol").splitlines():
        index_eol, path = line.split()[0], line.split("\t", 1)[1]
        assert index_eol in ("i/lf", "i/none", "i/-text", "i/"), line


FILES = {"src/a.py": b"x = 1\ny = 2\n", "metrics/eval.json": b'{\n  "a": 1\n}\n',
         "tests/fixtures/raw.txt": b"a\r\nb\n"}


def checkout_with_autocrlf(tmp_path: Path, attributes: bytes) -> dict[str, bytes]:
    """FILES committed with `attributes` as .gitattributes, then cloned as Git for
    Windows does by default (`core.autocrlf=true`): each file's bytes in the clone."""
    repo = tmp_path / "repo"
    for name, content in {**FILES, ".gitattributes": attributes}.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(content)
    _git("init", "-q", cwd=repo)
    _git("add", ".", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false",
         "commit", "-q", "-m", "x", cwd=repo)
    clone = tmp_path / "clone"
    _git("clone", "-q", "--no-local", "--config", "core.autocrlf=true", str(repo),
         str(clone), cwd=tmp_path)
    return {name: (clone / name).read_bytes() for name in FILES}


def test_autocrlf_checks_out_lf(tmp_path):
    """Code and metrics come out with "\n", a fixture exactly as committed."""
    got = checkout_with_autocrlf(tmp_path, (REPO / ".gitattributes").read_bytes())
    assert got == FILES


def test_without_eol_lf_autocrlf_would_check_out_crlf(tmp_path):
    """The check above sees what Windows does: the attributes as they were give CRLF."""
    got = checkout_with_autocrlf(tmp_path, b"tests/fixtures/** -text\n")
    assert got["src/a.py"] == b"x = 1\r\ny = 2\r\n"
    assert got["tests/fixtures/raw.txt"] == FILES["tests/fixtures/raw.txt"]
