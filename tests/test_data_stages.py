"""The data stages under the real `dvc repro`, fed by a loopback HTTP server."""

import hashlib
import json

import pandas as pd
import pytest
import yaml

from .conftest import REPO, SMS_ZIP, dataset_zip_bytes
from .workspace import dvc, make_workspace

pytestmark = pytest.mark.e2e


def test_dvc_repro_split_then_nothing_to_do(tmp_path, http_server):
    body = dataset_zip_bytes()
    url = http_server.serve("/sms.zip", body)
    ws = make_workspace(tmp_path / "ws", {
        "data.url": url, "data.sha256": hashlib.sha256(body).hexdigest()})

    out = dvc(ws, "repro", "split")
    for stage in ("download_data", "balance", "split"):
        assert f"Running stage '{stage}'" in out
    record = json.loads((ws / "data/raw/download.json").read_text())
    assert record == {"url": url, "sha256": hashlib.sha256(body).hexdigest(),
                      "bytes": len(body)}
    counts = json.loads((ws / "metrics/data.json").read_text())
    sizes = {name: len(pd.read_csv(ws / f"data/{name}.csv"))
             for name in ("train", "validation", "test")}
    assert {name: counts[name]["rows"] for name in sizes} == sizes
    assert "label_conflicts" not in counts  # none: not reported
    if SMS_ZIP.is_file():
        assert sizes == {"train": 1045, "validation": 149, "test": 300}
        balance = json.loads((ws / "metrics/balance.json").read_text())
        assert balance["parsed"] == {"rows": 5574, "ham": 4827, "spam": 747}
    assert http_server.routes["/sms.zip"].hits == 1

    again = dvc(ws, "repro", "split")
    assert "Running stage" not in again
    assert http_server.routes["/sms.zip"].hits == 1

    # A new data seed reruns balance and split, never the download.
    out = dvc(ws, "exp", "run", "-S", "data.seed=7", "split")
    assert "Running stage 'balance'" in out and "Running stage 'split'" in out
    assert "Running stage 'download_data'" not in out
    assert http_server.routes["/sms.zip"].hits == 1


def test_bad_param_fails_before_any_work(tmp_path, http_server):
    url = http_server.serve("/sms.zip", b"unused")
    ws = make_workspace(tmp_path / "ws", {"data.url": url, "data.train_frac": 0.95})
    with pytest.raises(AssertionError, match=r"params\.yaml: data\.val_frac train_frac "
                                             r"\+ val_frac must be < 1"):
        dvc(ws, "repro", "download_data")
    assert http_server.routes["/sms.zip"].hits == 0
    assert not (ws / "data" / "raw").exists()


def test_a_local_data_file_is_a_dependency_a_change_in_it_reruns(tmp_path):
    """Own data read in place: listed in download_data's deps (as docs/own-data.md
    says), an edit of the file reruns the data stages, and nothing else does."""
    ws = make_workspace(tmp_path / "ws", {
        "data.format": "csv", "data.url": "own/messages.csv", "data.sha256": None,
        "data.text_column": "message", "data.label_column": "category",
        "data.positive": None, "data.stratify": True})
    (ws / "own").mkdir()
    source = REPO / "tests" / "fixtures" / "own_data" / "messages.csv"
    (ws / "own" / "messages.csv").write_bytes(source.read_bytes())
    dvc_yaml = yaml.safe_load((ws / "dvc.yaml").read_text())
    dvc_yaml["stages"]["download_data"]["deps"].append("own/messages.csv")
    (ws / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))

    out = dvc(ws, "repro", "split")
    for stage in ("download_data", "balance", "split"):
        assert f"Running stage '{stage}'" in out
    assert not (ws / "data/raw/messages.csv").exists()  # read in place, not copied
    counts = json.loads((ws / "metrics/data.json").read_text())
    assert [counts[s]["rows"] for s in ("train", "validation", "test")] == [42, 6, 12]
    assert "Running stage" not in dvc(ws, "repro", "split")

    with open(ws / "own" / "messages.csv", "a", encoding="utf-8") as f:
        f.write("Flash sale: 40% off all shoes today only,promotion\n")
    assert "own/messages.csv" in dvc(ws, "status")
    out = dvc(ws, "repro", "split")
    for stage in ("download_data", "balance", "split"):
        assert f"Running stage '{stage}'" in out
    balance = json.loads((ws / "metrics/balance.json").read_text())
    assert balance["parsed"]["promotion"] == 21
