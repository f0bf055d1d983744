"""The data stages under the real `dvc repro`, fed by a loopback HTTP server."""

import hashlib
import json

import pandas as pd
import pytest

from .conftest import SMS_ZIP, dataset_zip_bytes
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
    assert {name: c["rows"] for name, c in counts.items()} == sizes
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
