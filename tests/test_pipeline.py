"""End to end: the real `dvc repro`, `dvc exp run -S lora.rank=4` and a two-worker queue,
fed by a loopback HTTP server with the real SMS zip (or a stand-in) and a tiny random
GPT-2 written by transformers."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from spamlora.hub import MODEL_FILES
from spamlora.paths import SPLITS, Paths
from spamlora.sweep import BOOK_ROW_PREFIX
from spamlora.tracking import EXPERIMENT, RUN_ID_KEY, STAGES_TAG, TRAINING_RUN_TAG

from .conftest import REPO, dataset_zip_bytes, local_server, make_hf_gpt2
from .workspace import dvc, env, make_workspace, served_probabilities, serving

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A workspace after `dvc repro`, with the output of that command."""
    tmp = tmp_path_factory.mktemp("pipeline")
    with local_server() as server:
        body = dataset_zip_bytes()
        data_url = server.serve("/uci/sms+spam+collection.zip", body)
        model = make_hf_gpt2(tmp / "gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=256)
        server.serve_dir("/hub/gpt2", model)
        pins = {name: hashlib.sha256((model / name).read_bytes()).hexdigest()
                for name in MODEL_FILES}
        ws = make_workspace(tmp / "ws", {
            "data.url": data_url, "data.sha256": hashlib.sha256(body).hexdigest(),
            "model.url": server.base_url + "/hub/{name}", "model.sha256": pins,
            "train.precision": "fp32"})
        out = dvc(ws, "repro")
        yield ws, out, server


def mlflow_runs(ws):
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client, client.search_runs([experiment.experiment_id])


def test_repro_writes_every_output(pipeline):
    ws, out, server = pipeline
    paths = Paths(ws)
    # Folder outputs too are links into DVC's cache, not second copies (issue 31, item 11)
    for folder in (paths.raw_dir, paths.base_model, paths.adapter.parent):
        for file in folder.iterdir():
            assert file.stat().st_nlink >= 2, f"{file} is a copy of DVC's cache"
    for stage in ("download_data", "balance", "split", "download_model", "train",
                  "evaluate", "plot"):
        assert f"Running stage '{stage}'" in out
    paths = Paths(ws)
    record = json.loads((paths.base_model / "download.json").read_text())
    assert set(record) == {"config.json", "model.safetensors", "vocab.json", "merges.txt"}
    assert paths.adapter.stat().st_size > 0
    evaluation = json.loads(paths.metrics("eval").read_text())
    for split in SPLITS:
        m = evaluation[split]
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["roc_auc"] <= 1
        assert sum(m["confusion"].values()) == m["examples"]
    predictions = pd.read_csv(paths.test_predictions)
    assert list(predictions.columns) == ["id", "label", "predicted", "ham_probability",
                                         "spam_probability"]
    assert len(predictions) == evaluation["test"]["examples"]
    history = pd.read_csv(paths.plot_data("history"))
    assert history["epoch"].tolist() == [1, 2]
    for name in ("confusion", "roc", "precision_recall"):
        assert len(pd.read_csv(paths.plot_data(name))) > 1
    for name in ("history", "confusion", "roc"):
        assert paths.figure(name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train = json.loads(paths.metrics("train").read_text())
    assert train["parameters"]["trainable"] > 0


def test_repro_says_each_epochs_result_and_warns_of_nothing(pipeline):
    """What `dvc repro` prints, as a user (or `dvc queue logs`) sees it: a line per
    epoch, and no warning the project could avoid (issue 25, item 20)."""
    _, out, _ = pipeline
    epochs = [line for line in out.splitlines()
              if line.startswith("epoch ") and "validation loss" in line]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    # Python warnings (UserWarning: ...) and MLflow's logged ones (WARNING mlflow...)
    assert not re.search(r"Warning\b|WARNING mlflow", out), out


def test_nothing_to_do_afterwards(pipeline):
    ws, _, _ = pipeline
    status = dvc(ws, "status")
    assert "up to date" in status.lower()
    assert "Running stage" not in dvc(ws, "repro")
    assert "metrics/eval.json" in dvc(ws, "metrics", "show")
    dvc(ws, "plots", "show", "--out", str(ws / ".plots"))
    assert (ws / ".plots" / "index.html").is_file()


# The comparison the README gives: what changed, and accuracy and F1 per split.
EXP_SHOW_DROP = (".*(loss|precision|recall|roc|confusion|run_id|/)|train_|val_|"
                 "parameters\\.(lm|total)")
EXP_SHOW_CHANGED = ("--only-changed", "--drop", EXP_SHOW_DROP)
COMPARED = {f"{split}.{m}" for split in (*SPLITS, "test_unseen") for m in ("accuracy", "f1")}


def test_exp_run_reruns_only_training_and_logs_a_second_run(pipeline):
    ws, _, _ = pipeline
    subprocess.run(["git", "add", "-A"], cwd=ws, env=env(ws), check=True)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=ws, env=env(ws), check=True)
    out = dvc(ws, "exp", "run", "-S", "lora.rank=4")
    ran = {stage for stage in ("download_data", "balance", "split", "download_model",
                               "train", "evaluate", "plot")
           if f"Running stage '{stage}'" in out}
    assert ran == {"train", "evaluate", "plot"}

    shown = json.loads(dvc(ws, "exp", "show", "--json"))
    ranks = {}
    for entry in shown:
        revs = [entry] + [r for e in entry.get("experiments") or [] for r in e["revs"]]
        for rev in revs:
            data = rev.get("data") or {}
            rank = data["params"]["params.yaml"]["data"]["lora"]["rank"]
            test = data["metrics"]["metrics/eval.json"]["data"]["test"]
            ranks.setdefault(rank, test["accuracy"])
    assert set(ranks) == {8, 4} and all(0 <= a <= 1 for a in ranks.values())
    # The table leads with the results compared, and the README's command keeps only
    # what differs between the experiments (issue 24, item 9).
    header = dvc(ws, "exp", "show", "--csv").splitlines()[0].split(",")
    # a column of eval.json, train.json, data.json and balance.json, in that order
    order = [header.index(c) for c in ("test.accuracy", "val_accuracy", "train.rows",
                                       "balanced.rows")]
    assert order == sorted(order) and order[0] < header.index("lora.rank")
    changed = dvc(ws, "exp", "show", "--csv", *EXP_SHOW_CHANGED).splitlines()[0].split(",")
    assert changed[:4] == ["Experiment", "rev", "typ", "Created"]
    assert {"lora.rank", "parameters.trainable"} <= set(changed[4:]), changed
    assert set(changed[4:]) <= COMPARED | {"lora.rank", "parameters.trainable"}, changed
    command = f"dvc exp show --only-changed --drop '{EXP_SHOW_DROP}'"
    assert command in (REPO / "README.md").read_text(encoding="utf-8")

    client, runs = mlflow_runs(ws)
    assert sorted(r.data.params["lora.rank"] for r in runs) == ["4", "8"]
    for run in runs:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == [1, 2]
        figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        assert figures == {"figures/history.png", "figures/confusion.png",
                           "figures/roc.png"}
    exp_run = next(r for r in runs if r.data.params["lora.rank"] == "4")
    assert exp_run.data.tags.get("dvc.exp_name")

    # The workspace now holds the rank-4 results: compare them with the baseline commit.
    diff = json.loads(dvc(ws, "metrics", "diff", "--json"))
    assert "metrics/train.json" in diff or "metrics/eval.json" in diff
    dvc(ws, "plots", "diff", "HEAD", "--out", str(ws / ".plots-diff"))
    assert (ws / ".plots-diff" / "index.html").is_file()

    # Experiment B changes evaluation only: train is cached, and B is a run of its own.
    out = dvc(ws, "exp", "run", "-S", "evaluate.batch_size=32")
    assert "Running stage 'train'" not in out and "Running stage 'evaluate'" in out
    client, runs = mlflow_runs(ws)
    assert len(runs) == 3
    b_run = next(r for r in runs if r.data.params["evaluate.batch_size"] == "32")
    assert b_run.data.tags[TRAINING_RUN_TAG] == exp_run.info.run_id
    assert b_run.data.params["lora.rank"] == "4" and "test.accuracy" in b_run.data.metrics
    assert len(client.get_metric_history(exp_run.info.run_id, "test.accuracy")) == 1
    assert client.get_run(exp_run.info.run_id).data.params["evaluate.batch_size"] == "64"
    paths = Paths(ws)
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    locked = {o["path"]: o["md5"] for o in lock["stages"]["split"]["outs"]}
    digests = {i.dataset.name: i.dataset.digest for i in b_run.inputs.dataset_inputs}
    for name in SPLITS:
        assert digests[f"{name}.csv"] == locked[f"data/{name}.csv"]
    assert b_run.data.tags["dvc.dep.data/train"] == next(
        d["md5"] for d in lock["stages"]["evaluate"]["deps"] if d["path"] == "data/train")

    # The same experiment again: every stage cached, no new run, and the metrics that
    # `dvc exp show` lists name the run that holds its results.
    out = dvc(ws, "exp", "run", "-S", "evaluate.batch_size=32")
    assert "Running stage" not in out
    assert len(mlflow_runs(ws)[1]) == 3
    assert json.loads(paths.metrics("eval").read_text())[RUN_ID_KEY] == b_run.info.run_id
    assert json.loads(paths.metrics("train").read_text())[RUN_ID_KEY] == exp_run.info.run_id


def spamlora(ws, *args, **extra_env):
    """What `spamlora args...` printed, once it succeeded."""
    proc = spamlora_process(ws, *args, **extra_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def spamlora_process(ws, *args, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spamlora.cli", *args], cwd=ws,
                          env={**env(ws), **extra_env}, capture_output=True, text=True,
                          timeout=300)


def test_two_book_rows_queued_on_two_workers_land_and_are_reported(pipeline):
    """`make experiments ROWS="8 9" EXTRA="-S train.epochs=1"`, step by step as its
    recipe runs them: a random-base row, and a LoRA row of rank 16 on the "pretrained"
    tiny GPT-2 served on 127.0.0.1, in two queue workers; each its own MLflow run in the
    workspace's store with the -S values it was queued with, and a row of the report."""
    ws, _, _ = pipeline
    queued = spamlora(ws, "experiments", "queue", "8", "9", "-S", "train.epochs=1")
    assert "queued book-row-09-lora-r16 (needs pretrained gpt2 weights" in queued
    # The recipe's workers, a core each: two 2-thread trainings on 2 cores thrash ~10x
    # slower. Not captured: the workers it leaves running would hold the pipes open.
    subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], cwd=ws,
                   env={**env(ws), "OMP_NUM_THREADS": "1"}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 480
    while time.monotonic() < deadline:
        status = dvc(ws, "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    dvc(ws, "queue", "stop")  # no idle worker outlives the test
    assert status.count("Success") == 2, status + dvc(ws, "queue", "logs",
                                                      "book-row-09-lora-r16")
    # the baseline, experiments A and B (test_exp_run_...) and the two rows, all whole
    _, runs = mlflow_runs(ws)
    assert len(runs) == 5 and all(r.info.status == "FINISHED"
                                  and "test.accuracy" in r.data.metrics for r in runs)
    rows = sorted((r for r in runs if r.info.run_name.startswith(BOOK_ROW_PREFIX)),
                  key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in rows] == ["book-row-08-random-all",
                                               "book-row-09-lora-r16"]
    assert all(r.data.params["train.epochs"] == "1" for r in rows)
    random_all, lora_r16 = rows
    assert (random_all.data.params["model.weights"],
            random_all.data.params["train.trainable"]) == ("random", "all")
    assert (lora_r16.data.params["lora.rank"], lora_r16.data.params["lora.init"],
            lora_r16.data.params["train.trainable"]) == ("16", "textbook", "lora")
    assert os.path.isdir(ws / "mlartifacts")

    spamlora(ws, "experiments", "report")
    table = (ws / "metrics" / "experiments" / "table.md").read_text(encoding="utf-8")
    for number, name in ((8, "book-row-08-random-all"), (9, "book-row-09-lora-r16")):
        line = next(x for x in table.splitlines() if f"| {name} |" in x)
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[0] == str(number)
        assert cells[3].endswith("**train.epochs=1**")  # not the book's 5: said
        ours = [cells[i] for i in (4, 6, 8, 10)]  # train, validation, test, test_unseen
        assert all(c.endswith("%") and 0 <= float(c[:-1]) <= 100 for c in ours), line
        assert float(cells[11]) > 0  # training seconds
        assert cells[13].startswith(("x86_64", "aarch64", "arm64", "AMD64")), line
    assert "| book-row-02-first-token (not run) |" in table
    assert (ws / "metrics" / "experiments" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"

    # A row run already is refused before any of those asked for is queued.
    again = spamlora_process(ws, "experiments", "queue", "2", "9")
    assert again.returncode == 1
    assert ("experiment(s) book-row-09-lora-r16 exist already on this commit (run, "
            "running or queued): `dvc exp remove book-row-09-lora-r16` to run them "
            "again") in again.stderr
    assert "book-row-02" not in dvc(ws, "queue", "status")


def probabilities(jsonl: str) -> list[float]:
    return [json.loads(line)["spam_probability"] for line in jsonl.splitlines()]


MESSAGES = ["WINNER!! claim your free prize now", "ok see you at 5"]


def test_promote_an_experiment_then_predict_from_the_registry(pipeline, tmp_path):
    ws, _, _ = pipeline
    client, runs = mlflow_runs(ws)
    # the rank-4 experiment's run, whose adapter the workspace holds (not a queued one's)
    exp_run = client.get_run(json.loads(Paths(ws).metrics("train").read_text())[RUN_ID_KEY])
    assert exp_run.data.params["lora.rank"] == "4" and TRAINING_RUN_TAG not in exp_run.data.tags
    out = spamlora(ws, "promote", "--exp", exp_run.data.tags["dvc.exp_name"])
    assert f"from run {exp_run.info.run_id}" in out
    assert "models:/spamlora-sms@champion" in out
    # The workspace holds this experiment's adapter: the registry's model, loaded in a
    # fresh process, scores as the files do (runs:/ URIs: test_mlflow_model.py).
    predict = ("predict", "--precision", "fp32", "--format", "jsonl", *MESSAGES)
    by_files = probabilities(spamlora(ws, *predict))
    by_alias = probabilities(spamlora(ws, *predict, "--model",
                                      "models:/spamlora-sms@champion"))
    assert by_alias == pytest.approx(by_files, abs=1e-4)

    # The best of all five runs; a queued one trained in a temporary copy that is gone,
    # so a base it needs comes from the cache, downloaded from the recorded URL.
    best = max((r for r in runs if "validation.accuracy" in r.data.metrics),
               key=lambda r: r.data.metrics["validation.accuracy"])
    out = spamlora(ws, "promote", "--best", "validation.accuracy")  # as README says
    assert "version 2 " in out
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    scored = probabilities(spamlora(ws, *predict, "--model", "models:/spamlora-sms@champion",
                                    **cache))
    assert len(scored) == 2
    champion = client.get_model_version_by_alias("spamlora-sms", "champion")
    assert str(champion.version) == "2"
    chosen = client.get_run(champion.tags["chosen_run"])
    assert chosen.data.metrics["validation.accuracy"] == \
        best.data.metrics["validation.accuracy"]


def test_sweep_report_from_dvc_exp_show(pipeline):
    ws, _, _ = pipeline
    proc = subprocess.run([str(Path(sys.executable).parent / "spamlora"), "sweep-report"],
                          cwd=ws, env=env(ws), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(ws / "metrics" / "sweep" / "experiments.csv")
    # the baseline and the exp run; the queued book rows are not rank-sweep points (a
    # queued one's rank reaching MLflow: the queue test above; queued experiments read
    # from `dvc exp show`: the book rows' report there, through the same `finished`)
    assert set(table["rank"]) == {4, 8}
    by_rank = table.groupby("rank")["trainable"].first()
    assert by_rank.is_monotonic_increasing and by_rank.is_unique
    assert "| 4 |" in (ws / "metrics" / "sweep" / "by_rank.md").read_text()
    png = ws / "metrics" / "sweep" / "accuracy_vs_rank.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_push_then_a_second_clone_pulls_and_runs_no_stage(pipeline, tmp_path):
    ws, _, _ = pipeline
    remote = tmp_path / "remote"
    dvc(ws, "remote", "modify", "--local", "local", "url", str(remote))
    # The state to share: dvc.lock, params and the small metrics go to git, data to DVC.
    subprocess.run(["git", "add", "-A"], cwd=ws, env=env(ws), check=True)
    subprocess.run(["git", "commit", "-qm", "results"], cwd=ws, env=env(ws), check=True)
    dvc(ws, "push")
    assert any(remote.rglob("*"))

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], env=env(ws), check=True)
    dvc(clone, "remote", "modify", "--local", "local", "url", str(remote))
    dvc(clone, "pull")
    assert (clone / "data" / "train" / "adapter.safetensors").read_bytes() == (
        ws / "data" / "train" / "adapter.safetensors").read_bytes()
    assert "Running stage" not in dvc(clone, "repro")
    assert "up to date" in dvc(clone, "status").lower()

    # The clone's store holds none of the original runs; an evaluation change still
    # reruns evaluate and plot, into a run of their own that names the training run.
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["evaluate"]["batch_size"] = 16
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(clone, "repro")
    assert "Running stage 'evaluate'" in out and "Running stage 'train'" not in out
    client, runs = mlflow_runs(clone)
    (run,) = runs
    trained = json.loads((clone / "metrics" / "train.json").read_text())[RUN_ID_KEY]
    assert run.data.tags[TRAINING_RUN_TAG] == trained
    assert run.data.tags[STAGES_TAG] == "evaluate,plot"


# One mode's model is also promoted and served: serving is the same for every mode (its
# model loads as `spamlora predict --model` loads it, below, and test_mlflow_model.py
# loads each mode's in a fresh process), and each server costs ~7 s of the suite.
@pytest.mark.parametrize("settings, trainable, token, weights, served", [
    (["train.trainable=last_block"], "last_block", "last", "pretrained", True),
    (["train.token=first"], "lora", "first", "pretrained", False),
    (["model.weights=random", "train.trainable=all"], "all", "last", "random", False)])
def test_a_mode_is_an_experiment_with_its_own_run_metrics_and_served_model(
        pipeline, settings, trainable, token, weights, served):
    """Issue 24, items 2-4 and 6: each mode trains into its own MLflow run, with its
    metrics and its parameter counts, and its model scores the same by the files
    (`spamlora predict`) and by URI; promoted, and served by `mlflow models serve`."""
    from spamlora.adapter import read_spec
    from spamlora.precision import resolve_device, resolve_precision

    ws, _, _ = pipeline
    paths = Paths(ws)
    # Each experiment starts from the committed params, not the last experiment's.
    subprocess.run(["git", "checkout", "HEAD", "--", "params.yaml"], cwd=ws, check=True)
    out = dvc(ws, "exp", "run", *[arg for s in settings for arg in ("-S", s)])
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    spec = read_spec(paths.adapter)
    assert (spec.trainable, spec.token, spec.weights) == (trainable, token, weights)
    trained = json.loads(paths.metrics("train").read_text())
    evaluation = json.loads(paths.metrics("eval").read_text())
    assert evaluation[RUN_ID_KEY] == trained[RUN_ID_KEY]  # one run: trained, evaluated
    client, runs = mlflow_runs(ws)
    run = client.get_run(trained[RUN_ID_KEY])
    assert run.info.status == "FINISHED" and run.data.tags.get("dvc.exp_name")
    assert (run.data.params["train.trainable"], run.data.params["train.token"],
            run.data.params["model.weights"]) == (trainable, token, weights)
    assert run.data.metrics["test.accuracy"] == evaluation["test"]["accuracy"]
    assert run.data.params["parameters.trainable"] == str(trained["parameters"]["trainable"])
    assert sum(r.data.params.get("train.trainable") == trainable
               and r.data.params.get("train.token") == token for r in runs) >= 1

    # The served model's precision is `auto`: the files are scored at what that is here.
    host = str(resolve_precision("auto", resolve_device("auto"))).removeprefix("torch.")
    predict = ("predict", "--precision", {"bfloat16": "bf16", "float32": "fp32"}[host],
               "--format", "jsonl", *MESSAGES)
    by_files = probabilities(spamlora(ws, *predict))
    by_uri = probabilities(spamlora(ws, *predict, "--model",
                                    f"runs:/{run.info.run_id}/model"))
    assert by_uri == pytest.approx(by_files, abs=1e-4)
    if not served:
        return
    alias = f"{weights}-{trainable}-{token}"
    out = spamlora(ws, "promote", "--run", run.info.run_id, "--alias", alias)
    assert f"from run {run.info.run_id}" in out
    with serving(ws, f"models:/spamlora-sms@{alias}") as url:
        assert served_probabilities(url, MESSAGES) == pytest.approx(by_files, abs=1e-4)


def own_messages(classes: list[str], per_class: int) -> list[tuple[str, str]]:
    """(text, label) rows whose texts name their class, some with a tab and quotes."""
    return [(f'{label} note {i}: "see"\tdetails {i * 7}' if i % 3 == 0 else
             f"{label} message number {i} about {label} things", label)
            for label in classes for i in range(per_class)]


# A text format with three classes, and the binary one with two, the positive first.
# Reading each format (jsonl and tsv too) is tested without DVC in test_own_data.py; the
# rest of the way, tested here, is the same for every format. The three classes' model is
# also served: over HTTP the answer is the pyfunc's, whose form with two classes, the
# positive first, is tested in test_classes.py.
@pytest.mark.parametrize("fmt, classes", [("csv", ["billing", "delivery", "promotion"]),
                                          ("parquet", ["urgent", "later"])])
def test_own_labelled_file_is_one_experiment_scored_with_its_own_names(
        pipeline, fmt, classes):
    """Issue 26: a labelled file of another format and other class names, tracked as a
    dependency, through `dvc exp run` to a model that `spamlora predict` (and, of three
    classes, `mlflow models serve`) score with its own label names."""
    ws, _, _ = pipeline
    start = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True,
                           text=True, check=True).stdout.strip()
    subprocess.run(["git", "checkout", "HEAD", "--", "params.yaml"], cwd=ws, check=True)
    name = f"mine.{fmt}"
    try:
        rows = pd.DataFrame(own_messages(classes, 30), columns=["message", "kind"])
        if fmt == "csv":  # quoted as pandas writes it: a tab or quote in quotes
            rows.to_csv(ws / name, index=False, lineterminator="\n")
            assert '"' in (ws / name).read_text()
        else:
            rows.to_parquet(ws / name)
        dvc_yaml = yaml.safe_load((ws / "dvc.yaml").read_text())
        dvc_yaml["stages"]["download_data"]["deps"].append(name)
        (ws / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
        subprocess.run(["git", "add", "-A"], cwd=ws, env=env(ws), check=True)
        subprocess.run(["git", "commit", "-qm", f"own {fmt} data"], cwd=ws, env=env(ws),
                       check=True)
        positive = "urgent" if len(classes) == 2 else "null"
        out = dvc(ws, "exp", "run", "-S", f"data.format={fmt}", "-S", f"data.url={name}",
                  "-S", "data.sha256=null", "-S", "data.text_column=message",
                  "-S", "data.label_column=kind", "-S", f"data.positive={positive}",
                  "-S", "data.stratify=true", "-S", "train.epochs=1")
        for stage in ("download_data", "balance", "split", "train", "evaluate", "plot"):
            assert f"Running stage '{stage}'" in out
        paths = Paths(ws)
        evaluation = json.loads(paths.metrics("eval").read_text())
        confusion = evaluation["test"]["confusion"]
        if len(classes) > 2:
            assert list(evaluation["test"]["per_class"]) == classes
            assert list(confusion) == classes
        trained = json.loads(paths.metrics("train").read_text())[RUN_ID_KEY]

        rows_out = [json.loads(line) for line in spamlora(
            ws, "predict", "--format", "jsonl", *MESSAGES).splitlines()]
        assert [set(r) for r in rows_out] == [
            {"text", "label", *(f"{c}_probability" for c in classes)}] * 2
        assert all(r["label"] in classes for r in rows_out)

        if len(classes) == 2:
            return
        with serving(ws, f"runs:/{trained}/model") as url:
            request = urllib.request.Request(
                url + "/invocations", data=json.dumps({"inputs": MESSAGES}).encode(),
                headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as r:
                served = json.loads(r.read())["predictions"]
        for got, by_files in zip(served, rows_out, strict=True):
            assert got["label"] == by_files["label"]
            assert got["probabilities"] == pytest.approx(
                {c: by_files[f"{c}_probability"] for c in classes}, abs=1e-4)
    finally:  # the module's other tests expect the SMS data's workspace: a new commit
        # restores it (resetting to `start` under DVC's experiment refs breaks its locks)
        subprocess.run(["git", "checkout", start, "--", "dvc.yaml", "params.yaml"], cwd=ws,
                       check=True)
        subprocess.run(["git", "rm", "-q", "--cached", "--ignore-unmatch", name], cwd=ws,
                       check=True)
        (ws / name).unlink(missing_ok=True)
        subprocess.run(["git", "commit", "-qam", "the SMS data again", "--allow-empty"], cwd=ws,
                       env=env(ws), check=True)
