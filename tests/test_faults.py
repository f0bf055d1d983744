"""A full disk (issue 31, item 10): refused before the big writes where their size is
known, and anywhere else one line naming the file, with nothing half-written left."""

import errno
from collections import namedtuple
from pathlib import Path

import pytest

from spamlora import fileio, stage
from spamlora.download import download
from spamlora.fileio import NoSpaceError, write_json

from .conftest import REPO

Usage = namedtuple("Usage", "total used free")


def small_disk(monkeypatch, free: int) -> None:
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: Usage(10 * free, 0, free))


def test_a_download_larger_than_the_free_space_is_refused_before_writing(http_server,
                                                                         tmp_path,
                                                                         monkeypatch):
    body = b"w" * (1 << 20)
    url = http_server.serve("/big.safetensors", body)
    small_disk(monkeypatch, 100 << 20)  # 1 MiB + the 64 MiB margin fits in 100 MiB
    download([url], tmp_path / "ok.bin", retries=0)  # fits
    small_disk(monkeypatch, 32 << 20)
    with pytest.raises(NoSpaceError, match=rf"{tmp_path}: downloading {url} needs "
                                           r"1,048,576 bytes \(and 64 MiB to spare\), but "
                                           r"33,554,432 are free there"):
        download([url], tmp_path / "model.safetensors", retries=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.bin"]  # nothing half-written


def stage_exit(capsys, main) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        stage.run(main, str(REPO / "params.yaml"))
    return e.value.code, capsys.readouterr().err


def test_enospc_anywhere_in_a_stage_is_one_line_and_leaves_no_output(tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "metrics" / "eval.json"

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    code, err = stage_exit(capsys, lambda params: write_json(out, {"accuracy": 1.0}))
    assert code == 1
    (line,) = err.strip().splitlines()
    assert line.startswith("error: no space left on device writing ")
    assert "bytes free there): free some, then rerun" in line
    assert not out.exists() and list(out.parent.iterdir()) == []  # the temp file is gone


def test_a_full_mlflow_store_is_one_line(capsys):
    import mlflow

    def main(params):
        raise mlflow.exceptions.MlflowException(
            "(sqlite3.OperationalError) database or disk is full")

    code, err = stage_exit(capsys, main)
    assert code == 1 and err.strip() == (
        "error: no space left on device for the MLflow store (SQLite: database or disk is "
        "full): free some, then rerun")


def test_other_errors_keep_their_traceback(capsys):
    def main(params):
        raise OSError(errno.EACCES, "Permission denied", "/x")

    with pytest.raises(PermissionError):
        stage.run(main, str(REPO / "params.yaml"))


def test_download_model_on_a_small_disk_is_a_one_line_error(http_server, tiny_gpt2,
                                                            tmp_path, monkeypatch, capsys):
    from spamlora.cli import main

    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt"):
        http_server.serve(f"/m/{name}", (tiny_gpt2 / name).read_bytes())
    small_disk(monkeypatch, 1 << 20)
    code = main(["download-model", str(tmp_path / "base"), "--url",
                 http_server.base_url + "/m", "--no-checksums", "--retries", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "needs" in err and "are free there" in err
    assert not (tmp_path / "base").exists()
