"""Two or more classes end to end (issue 26 item 3): the head's width, the metrics and
their MLflow names, the figures, `spamlora predict`, the served model and promote, on a
tiny GPT-2, from a 3-class CSV and from a 2-class JSON Lines file with other label names
and the positive class first."""

import dataclasses
import io
import json
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from spamlora import cli
from spamlora.adapter import read_adapter
from spamlora.config import Params
from spamlora.evaluate import classification_metrics, flat_metrics
from spamlora.fileio import read_json
from spamlora.paths import SPLITS, Paths
from spamlora.registry import promote
from spamlora.tracking import RUN_ID_KEY, STORE_FILE, metric_name

from .conftest import REPO
from .test_own_data import FIXTURE, params, stage, texts

CLASSES3 = ["appointment", "delivery", "promotion"]


def logits_of(probs):
    return np.log(np.asarray(probs, dtype=np.float64))


def test_three_class_metrics_against_hand_worked_counts():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = [[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.1, .5, .4], [.2, .2, .6],
             [.5, .2, .3]]
    m = classification_metrics(labels, logits_of(probs), classes=("a", "b", "c"),
                               positive_index=None)
    # predicted: 0, 1, 1, 1, 2, 0
    assert m["confusion"] == {"a": {"a": 1, "b": 1, "c": 0}, "b": {"a": 0, "b": 2, "c": 0},
                              "c": {"a": 1, "b": 0, "c": 1}}
    assert m["accuracy"] == pytest.approx(4 / 6)
    a, b, c = (m["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (0.5, 0.5, 2)
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == 1.0
    assert (c["precision"], c["recall"]) == (1.0, 0.5)
    assert m["macro"]["precision"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert m["macro"]["f1"] == pytest.approx(np.mean([x["f1"] for x in (a, b, c)]))
    # class c against the rest: scores .1 .1 .1 .4 | .6 .3 -> 7 of 8 pairs ranked right
    assert c["roc_auc"] == pytest.approx(7 / 8)
    assert m["roc_auc"] == pytest.approx(np.mean([a["roc_auc"], b["roc_auc"],
                                                  c["roc_auc"]]))
    assert m["loss"] == pytest.approx(-np.mean(np.log([.8, .2, .8, .5, .6, .3])))
    assert "precision" not in m and "f1" not in m  # no positive class of three


def test_binary_metrics_keep_their_names_for_either_positive_class():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[.9, .1], [.4, .6], [.3, .7], [.6, .4]])
    spam = classification_metrics(labels, logits_of(probs))
    assert list(spam) == ["accuracy", "loss", "precision", "recall", "f1", "roc_auc",
                          "confusion", "examples"]
    first = classification_metrics(1 - labels, logits_of(probs[:, ::-1]),
                                   classes=("urgent", "later"), positive_index=0)
    assert first == spam  # the same problem with the classes' order swapped


def test_metric_names_are_mlflow_safe():
    assert metric_name("a/b:c.d") == "a_b_c_d" and metric_name("été ok") == "été ok"
    tree = {"accuracy": 0.5, "examples": 6, "roc_auc": None,
            "per_class": {"x.y": {"f1": 0.25, "support": 3}}}
    assert flat_metrics(tree, "test") == {"test.accuracy": 0.5, "test.per_class.x_y.f1": 0.25}


# --- the stages, a tiny model ---------------------------------------------------------


@pytest.fixture
def pipeline(tmp_path, tiny_gpt2, monkeypatch):
    """Run download_data ... plot on a labelled file in a scratch workspace."""
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    monkeypatch.setenv("DVC_ROOT", str(ws))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    shutil.copytree(tiny_gpt2, Paths().base_model)

    def run(source, name: str, **data) -> Params:
        shutil.copy(source, ws / name)
        dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
        dvc_yaml["stages"]["download_data"]["deps"].append(name)
        (ws / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
        p = params(url=name, sha256=None, **data)
        p = dataclasses.replace(p, train=dataclasses.replace(
            p.train, epochs=1, precision="fp32", batch_size=8))
        for name in ("download_data", "balance", "split", "train", "evaluate", "plot"):
            stage(name)(p)
        return p

    return run


def predict(capsys, *argv):
    capsys.readouterr()  # what the stages printed
    code = cli.main(["predict", "--adapter", str(Paths().adapter), "--weights",
                     str(Paths().base_model), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_three_classes_end_to_end(pipeline, capsys):
    pipeline(FIXTURE, "messages.csv", format="csv", text_column="message",
             label_column="category", positive=None, stratify=True)
    paths = Paths()
    spec, tensors = read_adapter(paths.adapter)
    assert spec.num_classes == 3 and spec.class_names == tuple(CLASSES3)
    assert spec.positive_index is None and tensors["out_head.weight"].shape[0] == 3

    evaluation = read_json(paths.metrics("eval"))
    for split in (*SPLITS, "test_unseen"):
        m = evaluation[split]
        assert set(m) == {"accuracy", "loss", "macro", "roc_auc", "per_class", "confusion",
                          "examples"}
        assert list(m["per_class"]) == CLASSES3 and list(m["confusion"]) == CLASSES3
        assert sum(sum(row.values()) for row in m["confusion"].values()) == m["examples"]
        assert sum(c["support"] for c in m["per_class"].values()) == m["examples"]
    assert evaluation["test"]["examples"] == 12

    confusion = pd.read_csv(paths.plot_data("confusion"))
    assert set(confusion["actual"]) == set(CLASSES3)
    scored = pd.read_csv(paths.test_predictions)
    assert list(scored.columns) == ["id", "label", "predicted"] + [
        f"{c}_probability" for c in CLASSES3]
    np.testing.assert_allclose(scored.iloc[:, 3:].sum(axis=1), 1.0, atol=1e-9)
    roc = pd.read_csv(paths.plot_data("roc"))
    assert (roc["fpr"].iloc[-1], roc["tpr"].iloc[-1]) == (1.0, 1.0)  # micro-average
    for figure in ("history", "confusion", "roc"):
        assert paths.figure(figure).stat().st_size > 0

    mlflow.set_tracking_uri(f"sqlite:///{paths.root.resolve() / STORE_FILE}")
    client = mlflow.MlflowClient()
    run = client.get_run(evaluation[RUN_ID_KEY])
    assert {"test.macro.f1", "test.per_class.delivery.recall", "test_unseen.roc_auc",
            "validation.per_class.promotion.roc_auc"} <= set(run.data.metrics)

    # spamlora predict: names, one probability column per class, no threshold
    code, out, _ = predict(capsys, "--format", "csv", "Parcel 12345 arrives Monday",
                           "SALE 50% off")
    assert code == 0
    table = pd.read_csv(io.StringIO(out))
    assert list(table.columns) == ["text", "label"] + [f"{c}_probability" for c in CLASSES3]
    rows = list(table.itertuples(index=False))
    for row in rows:
        probs = list(row[2:])
        assert row.label == CLASSES3[int(np.argmax(probs))]
    code, out, _ = predict(capsys, "hello there")
    assert code == 0 and out.splitlines()[0].split() == ["label", "prob", "message"]
    assert out.splitlines()[1].split()[0] in CLASSES3
    code, _, err = predict(capsys, "--threshold", "0.3", "hello")
    assert code == 1 and "--threshold is for two classes" in err

    # the served model: label and probabilities keyed by class
    model = mlflow.pyfunc.load_model(f"runs:/{read_json(paths.metrics('train'))[RUN_ID_KEY]}"
                                     f"/model", model_config={"precision": "fp32"})
    got = model.predict(["Reminder: dentist on Monday", "SALE! 20% off"])
    assert list(got.columns) == ["label", "probabilities"]
    assert all(set(p) == set(CLASSES3) for p in got["probabilities"])
    assert all(label == max(p, key=p.get) for label, p in zip(got["label"],
                                                             got["probabilities"],
                                                             strict=True))
    # promote, by a metric only n-class runs have
    done = promote(best="validation.macro.f1")
    assert done.version == "1"


def test_two_classes_with_other_names_and_the_positive_first(pipeline, capsys, tmp_path):
    lines = [json.dumps({"body": t, "kind": k}) for k in ("urgent", "later")
             for t in texts(k, 30)]
    (tmp_path / "mail.jsonl").write_text("\n".join(lines) + "\n")
    pipeline(tmp_path / "mail.jsonl", "mail.jsonl", format="jsonl", text_column="body",
             label_column="kind", classes=["urgent", "later"], positive="urgent")
    paths = Paths()
    spec, _ = read_adapter(paths.adapter)
    assert spec.class_names == ("urgent", "later") and spec.positive_index == 0
    test = read_json(paths.metrics("eval"))["test"]
    assert list(test) == ["accuracy", "loss", "precision", "recall", "f1", "roc_auc",
                          "confusion", "examples"]
    scored = pd.read_csv(paths.test_predictions)
    # recall of `urgent` from the predictions file: the positive class is index 0
    urgent = scored["label"] == 0
    said = scored["predicted"] == 0
    if urgent.any():
        assert test["recall"] == pytest.approx((urgent & said).sum() / urgent.sum())
    assert (said == (scored["urgent_probability"] >= 0.5)).all()

    code, out, _ = predict(capsys, "--format", "jsonl", "--threshold", "0.0", "x", "y")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["label"] for r in rows] == ["urgent", "urgent"]
    assert set(rows[0]) == {"text", "label", "urgent_probability", "later_probability"}
    code, out, _ = predict(capsys, "hello")
    assert out.splitlines()[0].split() == ["label", "urgent_prob", "message"]

    model = mlflow.pyfunc.load_model(f"runs:/{read_json(paths.metrics('train'))[RUN_ID_KEY]}"
                                     f"/model", model_config={"precision": "fp32"})
    got = model.predict(["urgent message number 3 with some words"])
    assert list(got.columns) == ["label", "urgent_probability", "probabilities"]
    assert got["urgent_probability"][0] == pytest.approx(got["probabilities"][0]["urgent"])


def test_evaluate_refuses_an_adapter_trained_for_other_classes(pipeline, tmp_path):
    p = pipeline(FIXTURE, "messages.csv", format="csv", text_column="message",
                 label_column="category", positive=None, stratify=True)
    Paths().classes.write_text(json.dumps({"classes": ["a", "b", "c"], "positive": None}))
    with pytest.raises(Exception, match=r"trained for the classes \['appointment', "
                                        r"'delivery', 'promotion'\], but data/classes\.json "
                                        r"has \['a', 'b', 'c'\]"):
        stage("evaluate")(p)


def test_metrics_copied_into_a_new_run_take_the_same_safe_names():
    """An evaluate-only rerun copies eval.json's numbers into its run: the class names
    become the names the evaluate stage logs."""
    from spamlora.tracking import _numeric_metrics

    tree = {"test": {"per_class": {"a/b": {"f1": 0.5}}, "accuracy": 0.75}}
    assert _numeric_metrics(tree) == {"test.per_class.a_b.f1": 0.5, "test.accuracy": 0.75}
    assert set(_numeric_metrics(tree)) == set(flat_metrics(tree["test"], "test"))
