"""The train, evaluate and plot stages log one MLflow run, checked with MLflow's client."""

import dataclasses
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from spamlora import precision
from spamlora.checkpoint import FOLDER
from spamlora.config import load_params
from spamlora.errors import SpamloraError
from spamlora.fileio import read_json
from spamlora.paths import Paths
from spamlora.registry import promote
from spamlora.tracking import (
    ARTIFACT_DIR,
    DVC_EXP_MERGE,
    EXPERIMENT,
    RUN_ID_KEY,
    SPLIT_CONTEXTS,
    STAGES_TAG,
    STORE_FILE,
    TRAINING_RUN_TAG,
    UNAVAILABLE,
    check_experiment_params,
    file_md5,
)

from .conftest import REPO, free_port
from .workspace import stage_workspace


def stage_main(name):
    return runpy.run_path(str(REPO / "stages" / f"{name}.py"), run_name="stage")["main"]


@pytest.fixture
def workspace(tmp_path, tiny_gpt2, monkeypatch):
    """A folder laid out as after download_model and split, as the cwd and DVC_ROOT."""
    stage_workspace(tmp_path, tiny_gpt2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "brave-test")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.mark.parametrize("host_bf16", [True, False], ids=["bf16-host", "fp32-host"])
def test_one_run_holds_params_metrics_artifacts_and_tags(workspace, monkeypatch, host_bf16):
    """Both stages pinned to fp32, on a host whose `auto` would choose either (forced
    here, so the test means the same on every CPU): the facts they record say fp32."""
    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda: host_bf16)
    params = load_params(REPO / "params.yaml")
    params = dataclasses.replace(
        params, train=dataclasses.replace(params.train, epochs=2, precision="fp32"),
        evaluate=dataclasses.replace(params.evaluate, precision="fp32"),
        lora=dataclasses.replace(params.lora, rank=4))
    for stage in ("train", "evaluate", "plot"):
        stage_main(stage)(params)

    assert (workspace / STORE_FILE).is_file()
    mlflow.set_tracking_uri(f"sqlite:///{workspace / STORE_FILE}")
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location == (workspace / ARTIFACT_DIR).as_uri()
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "brave-test"
    assert run.data.params["lora.rank"] == "4"
    assert run.data.params["train.epochs"] == "2"
    assert set(params.flat()) <= set(run.data.params)
    assert int(run.data.params["parameters.trainable"]) > 0
    assert run.data.tags["dvc.exp_name"] == "brave-test"
    assert run.data.tags["model.name"] == "gpt2"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    steps = client.get_metric_history(run.info.run_id, "step_loss")
    assert [m.step for m in steps] == list(range(1, 2 * 7 + 1))  # ceil(50 / 8) = 7 a epoch
    assert 0 <= run.data.metrics["test.accuracy"] <= 1
    assert 0 <= run.data.metrics["test_unseen.accuracy"] <= 1
    evaluation = read_json(Paths(workspace).metrics("eval"))
    assert evaluation["test"]["examples"] == 18 and evaluation["test_unseen"]["examples"] == 15
    trained = read_json(Paths(workspace).metrics("train"))
    for facts in (evaluation["run"], trained["run"]):  # in DVC's metrics, not only MLflow
        assert facts["precision"] == "float32" and facts["device"] == "cpu"
        assert facts["torch"] == torch.__version__ and facts["hardware"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_summary.txt", "eval.json", "test_predictions.csv", "figures"} <= artifacts
    (model,) = client.search_logged_models([experiment.experiment_id])
    assert model.source_run_id == run.info.run_id and model.name == "model"
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/history.png", "figures/confusion.png", "figures/roc.png"}
    assert (workspace / ARTIFACT_DIR).is_dir()
    summary = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/model_summary.txt")
    assert "LinearWithLoRA" in summary

    # Lineage: the DVC metrics name the run; its datasets are the splits, digest DVC's
    # md5; the UI's Source column is filled.
    assert trained[RUN_ID_KEY] == evaluation[RUN_ID_KEY] == run.info.run_id
    assert run.data.tags[STAGES_TAG] == "train,evaluate,plot"
    assert run.data.tags["mlflow.source.name"] == "dvc.yaml:train"
    assert run.data.tags["mlflow.source.type"] == "LOCAL"
    paths = Paths(workspace)
    assert run.data.tags["dvc.dep.data/train.csv"] == file_md5(paths.split("train"))
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train.csv", "validation.csv", "test.csv"}
    for name in ("train", "validation", "test"):
        entry = inputs[f"{name}.csv"]
        assert entry.dataset.digest == file_md5(paths.split(name))
        tags = {t.key: t.value for t in entry.tags}
        assert tags["mlflow.data.context"] == SPLIT_CONTEXTS[name]
        assert tags["data.url"] == params.data.url
    steps = pd.read_csv(paths.plot_data("steps"))
    assert steps["step"].tolist() == list(range(1, 15)) and steps["epoch"].iloc[-1] == 2
    assert steps["examples_seen"].iloc[-1] == 100


def test_the_train_stage_checks_its_logged_model_without_loading_it_again(workspace,
                                                                         monkeypatch):
    """Issue 25, item 11: MLflow checks a logged model by loading it and scoring its
    input example; at the end of training that loaded the whole classifier a second time
    (on the GPU too, when it trained there). The classifier just trained scores it."""
    from spamlora import predictor
    from spamlora.mlflow_model import INPUT_EXAMPLE

    loads, scored = [], []
    load, score = predictor.load_classifier, predictor.Predictor.probabilities
    monkeypatch.setattr(predictor, "load_classifier",
                        lambda *a, **k: loads.append(a) or load(*a, **k))
    monkeypatch.setattr(predictor.Predictor, "probabilities",
                        lambda self, texts: scored.append(list(texts)) or score(self, texts))
    params = load_params(REPO / "params.yaml")
    params = dataclasses.replace(
        params, train=dataclasses.replace(params.train, epochs=1, precision="fp32"))
    stage_main("train")(params)
    assert loads == []
    assert scored == [INPUT_EXAMPLE]


def test_an_evaluate_only_change_is_a_run_of_its_own_naming_the_training_run(workspace):
    params = load_params(REPO / "params.yaml")
    params = dataclasses.replace(
        params, train=dataclasses.replace(params.train, epochs=1, precision="fp32"))
    for stage in ("train", "evaluate", "plot"):
        stage_main(stage)(params)
    first = read_json(Paths(workspace).metrics("train"))[RUN_ID_KEY]
    changed = dataclasses.replace(params, evaluate=dataclasses.replace(params.evaluate,
                                                                       batch_size=32))
    for stage in ("evaluate", "plot"):  # train cached: as DVC would run it
        stage_main(stage)(changed)
    mlflow.set_tracking_uri(f"sqlite:///{workspace / STORE_FILE}")
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 2
    second = next(r for r in runs if r.info.run_id != first)
    assert read_json(Paths(workspace).metrics("eval"))[RUN_ID_KEY] == second.info.run_id
    assert second.data.tags[TRAINING_RUN_TAG] == first
    assert second.data.params["evaluate.batch_size"] == "32"
    assert "train_loss" in second.data.metrics and "test.accuracy" in second.data.metrics
    assert {a.path for a in client.list_artifacts(second.info.run_id, "figures")} == {
        "figures/history.png", "figures/confusion.png", "figures/roc.png"}
    # The training run keeps its own params and one evaluation.
    assert client.get_run(first).data.params["evaluate.batch_size"] == "64"
    assert len(client.get_metric_history(first, "test.accuracy")) == 1
    # A plot-only rerun (e.g. plot code changed) is a run of its own too.
    stage_main("plot")(changed)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 3
    third = next(r for r in runs if r.info.run_id not in (first, second.info.run_id))
    assert third.data.tags[TRAINING_RUN_TAG] == first


def test_a_later_stage_failing_never_marks_the_finished_training_failed(workspace,
                                                                       monkeypatch):
    """Evaluate failing on the training's run (issue 25, item 7): the run stays
    FINISHED and promotable, the failure is a tag, and a rerun of evaluate continues
    the same run and clears it. A later stage killed outright (its run left RUNNING)
    is ended the same way by the next start."""
    from spamlora import predictor
    from spamlora.tracking import (
        HOST_TAG,
        PID_TAG,
        STARTED_TAG,
        end_stale_runs,
        stage_failed_tag,
    )

    params = load_params(REPO / "params.yaml")
    params = dataclasses.replace(
        params, train=dataclasses.replace(params.train, epochs=1, precision="fp32"),
        evaluate=dataclasses.replace(params.evaluate, precision="fp32"))
    stage_main("train")(params)
    run_id = read_json(Paths(workspace).metrics("train"))[RUN_ID_KEY]

    def broken(self, texts):
        raise RuntimeError("out of memory, say")

    with monkeypatch.context() as m:
        m.setattr(predictor.Predictor, "logits", broken)
        with pytest.raises(RuntimeError, match="out of memory"):
            stage_main("evaluate")(params)
    client = mlflow.MlflowClient(f"sqlite:///{workspace / STORE_FILE}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[stage_failed_tag("evaluate")] == (
        "failed: RuntimeError: out of memory, say")
    assert run.data.tags[STAGES_TAG] == "train"
    assert promote(run_id=run_id).version  # still promotable

    stage_main("evaluate")(params)  # the rerun continues the training's run
    assert read_json(Paths(workspace).metrics("eval"))[RUN_ID_KEY] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test.accuracy" in run.data.metrics
    assert stage_failed_tag("evaluate") not in run.data.tags

    # plot killed outright while it had the run open: RUNNING, a dead pid
    client.set_tag(run_id, STAGES_TAG, "train,evaluate,plot")
    client.set_tag(run_id, PID_TAG, "999999999")
    client.set_tag(run_id, HOST_TAG, __import__("socket").gethostname())
    client.update_run(run_id, status="RUNNING")
    assert end_stale_runs() == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[stage_failed_tag("plot")].startswith("stopped: process 999999999")
    assert run.data.tags[STAGES_TAG] == "train,evaluate"

    # the pid of the process that had it open now belongs to another (this one): reused
    client.set_tag(run_id, STAGES_TAG, "train,evaluate,plot")
    client.set_tag(run_id, PID_TAG, str(os.getpid()))
    client.set_tag(run_id, STARTED_TAG, "0")
    client.update_run(run_id, status="RUNNING")
    assert end_stale_runs() == [run_id]


def test_a_batch_larger_than_the_training_split_is_said(workspace, capsys):
    """Accepted silently before, one step an epoch (issue 31, item 13)."""
    params = load_params(REPO / "params.yaml")
    params = dataclasses.replace(params, train=dataclasses.replace(
        params.train, epochs=1, batch_size=64, precision="fp32"))
    stage_main("train")(params)
    assert ("warning: train.batch_size (64) is larger than the training split (50 "
            "messages): every epoch is a single step") in capsys.readouterr().out


def test_a_clone_without_the_training_run_still_evaluates(workspace, monkeypatch):
    params = load_params(REPO / "params.yaml")
    params = dataclasses.replace(
        params, train=dataclasses.replace(params.train, epochs=1, precision="fp32"))
    stage_main("train")(params)
    trained = read_json(Paths(workspace).metrics("train"))[RUN_ID_KEY]
    # A clone that pulled the outputs but not the store: a store without that run.
    clone_store = workspace / "clone.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{clone_store}")
    stage_main("evaluate")(params)
    mlflow.set_tracking_uri(f"sqlite:///{clone_store}")
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.data.tags[TRAINING_RUN_TAG] == trained and "test.accuracy" in run.data.metrics


def test_user_tracking_uri_overrides_the_default(workspace, monkeypatch, tmp_path_factory):
    other = tmp_path_factory.mktemp("elsewhere") / "runs.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    params = load_params(REPO / "params.yaml")
    params = dataclasses.replace(
        params, train=dataclasses.replace(params.train, epochs=1, precision="fp32"))
    stage_main("train")(params)
    assert other.is_file() and not (workspace / STORE_FILE).exists()


def test_parallel_workers_creating_a_fresh_store_all_land(tmp_path):
    # Queue workers start together; without the lock they race to create the tables.
    code = ("from spamlora.tracking import RunInputs, create_run; "
            "create_run('train', {'k': 1}, 'gpt2', RunInputs({}, {}, []))")
    env = {**os.environ, "DVC_ROOT": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / STORE_FILE}")
    client = mlflow.MlflowClient()
    (experiment,) = [e for e in client.search_experiments() if e.name == EXPERIMENT]
    assert len(client.search_runs([experiment.experiment_id])) == 3


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:`port`, its SQL backend and artifacts in
    `root`, once it answers."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
         str(port), "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", (root / "artifacts").as_uri(), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
    proc.kill()
    pytest.fail("mlflow server did not start in 90 s")


@pytest.fixture
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQL backend and an artifact store."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = start_mlflow_server(root, port)
    yield f"http://127.0.0.1:{port}", proc, root
    proc.terminate()
    proc.wait(timeout=30)


def test_a_tracking_server_receives_the_pipeline_run(workspace, mlflow_server, monkeypatch):
    uri, proc, root = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = load_params(REPO / "params.yaml")
    params = dataclasses.replace(
        params, train=dataclasses.replace(params.train, epochs=1, precision="fp32"))
    for stage in ("train", "evaluate"):
        stage_main(stage)(params)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["lora.rank"] == "8" and "test.accuracy" in run.data.metrics
    assert not (workspace / STORE_FILE).exists()
    assert any((root / "artifacts").rglob("adapter.safetensors"))  # in the logged model
    # The server's registry: promote, then load by alias through the server alone.
    done = promote(best="validation.accuracy")
    assert done.run_id == run.info.run_id
    loaded = mlflow.pyfunc.load_model(done.alias_uri, model_config={"precision": "fp32"})
    assert list(loaded.predict(["win a prize now"]).columns) == [
        "label", "spam_probability", "probabilities"]

    proc.terminate()
    proc.wait(timeout=30)
    # With the base model gone too, the error shows which check comes first: the
    # server's, before anything is loaded or trained.
    shutil.rmtree(Paths(workspace).base_model)
    with pytest.raises(SpamloraError, match=r"MLflow tracking server .* is not reachable"):
        stage_main("train")(params)


@pytest.mark.e2e
def test_train_stage_in_two_processes_logs_one_run_from_rank_0(workspace):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update({"nproc": 2, "epochs": 1, "precision": "fp32"})
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "DVC_ROOT": str(workspace)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "train.py")], cwd=workspace,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("LM + LoRA (before head swap)") == 1  # rank 0 only
    assert Paths(workspace).adapter.is_file()
    mlflow.set_tracking_uri(f"sqlite:///{workspace / STORE_FILE}")
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.data.params["train.nproc"] == "2"
    steps = client.get_metric_history(run.info.run_id, "step_loss")
    assert [m.step for m in steps] == list(range(1, 8))  # ceil(50 / 8), not per process


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process table")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_a_multi_process_training_stops_torchrun_and_its_workers(workspace, signum):
    """SIGTERM to the stage is passed on; after a SIGKILL of the stage alone (nothing
    passed on) each worker's watchdog sees it gone (issue 25, item 4). Either way every
    process ends, with a checkpoint and the run KILLED."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update({"nproc": 2, "epochs": 50, "precision": "fp32"})
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "DVC_ROOT": str(workspace)}
    env.pop("MLFLOW_TRACKING_URI", None)
    stage = subprocess.Popen([sys.executable, str(REPO / "stages" / "train.py")],
                             cwd=workspace, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)

    def group() -> list[str]:  # torchrun and every process under it
        out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True,
                             text=True).stdout.split()
        children: dict[str, list[str]] = {}
        for pid, ppid in zip(out[::2], out[1::2], strict=True):
            children.setdefault(ppid, []).append(pid)
        found, todo = [], list(children.get(str(stage.pid), []))
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    deadline = time.monotonic() + 120
    for line in stage.stdout:  # rank 0 prints the summary once the workers are up
        if "LM + LoRA (before head swap)" in line or time.monotonic() > deadline:
            break
    members = group()
    assert len(members) >= 3, members  # torchrun and two workers
    stage.send_signal(signum)
    if signum == signal.SIGTERM:
        assert stage.wait(timeout=60) == 130, stage.stdout.read()[-3000:]  # as one process
        assert "training in 2 processes stopped by SIGTERM" in stage.stdout.read()
    else:
        assert stage.wait(timeout=60) == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while group_alive := [p for p in members if os.path.exists(f"/proc/{p}")]:
        assert time.monotonic() < deadline, f"still running: {group_alive}"
        time.sleep(0.5)
    client = mlflow.MlflowClient(f"sqlite:///{workspace / STORE_FILE}")
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "KILLED"
    assert list((workspace / FOLDER).glob("*/step-*.sha256"))  # resumable
    assert not Paths(workspace).adapter.exists()


def test_folder_dependencies_are_hashed_as_dvc_does_from_what_is_read_now(tmp_path,
                                                                           monkeypatch):
    """dvc.dep.<folder> tags came from dvc.lock, written before the stage ran (the last
    run's hash; a queued experiment's, another workspace's): issue 25, item 6."""
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    from spamlora.tracking import dependency_tags, dir_md5

    folder = tmp_path / "data" / "train"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter.safetensors").write_bytes(b"\x00\x01weights")
    (folder / "sub" / "b.txt").write_text("b")
    (folder / "a b.json").write_text("{}")
    tree = Tree()
    for path in folder.rglob("*"):
        if path.is_file():
            tree.add(path.relative_to(folder).parts, Meta(),
                     HashInfo("md5", file_md5(path)))
    tree.digest()
    assert dir_md5(folder) == tree.hash_info.value  # DVC's own computation

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"stages": {"evaluate": {"deps": [
        {"path": "data/train", "md5": "0" * 32 + ".dir"}]}}}))
    before = dependency_tags([Path("data/train")])["dvc.dep.data/train"]
    (folder / "adapter.safetensors").write_bytes(b"other weights")
    after = dependency_tags([Path("data/train")])["dvc.dep.data/train"]
    assert before != after and "0" * 32 not in before + after
    assert after == dir_md5(Path("data/train"))


def test_a_server_that_answers_at_all_is_reachable_and_passwords_are_never_printed():
    """A proxy answering /health with 401 and user:password@ URLs are what MLflow's
    client accepts; they were refused, and the refusal printed the password (issue 25,
    item 10)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from spamlora.tracking import check_reachable, redacted

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        check_reachable(f"http://127.0.0.1:{port}")
        check_reachable(f"http://alice:s3cret@127.0.0.1:{port}/")
    finally:
        server.shutdown()
        server.server_close()
    dead = free_port()
    with pytest.raises(SpamloraError, match="is not reachable") as e:
        check_reachable(f"http://alice:s3cret@127.0.0.1:{dead}", timeout=2)
    assert "s3cret" not in str(e.value) and f"alice:***@127.0.0.1:{dead}" in str(e.value)
    assert redacted("https://bob:pw@host/x") == "https://bob:***@host/x"
    assert redacted("http://host:5000") == "http://host:5000"


def test_the_checkpoint_key_holds_what_auto_precision_resolves_to(workspace, monkeypatch):
    """Issue 25, item 12: `precision: auto` is keyed as what it resolves to on this host,
    so a bf16 checkpoint is never resumed in fp32 (nor the reverse); a pinned `bf16` is
    another key (the run records the params as written: see `checkpoint_key`)."""
    main = stage_main("train")
    checkpoint_key = main.__globals__["checkpoint_key"]
    params = load_params(REPO / "params.yaml")
    auto = dataclasses.replace(params, train=dataclasses.replace(params.train,
                                                                 precision="auto"))
    pinned = dataclasses.replace(params, train=dataclasses.replace(params.train,
                                                                   precision="bf16"))
    cpu, paths = torch.device("cpu"), Paths(workspace)
    keys = {}
    for host_bf16 in (True, False):
        monkeypatch.setattr(precision, "cpu_computes_bf16", lambda host_bf16=host_bf16: host_bf16)
        dtype = precision.resolve_precision("auto", cpu)
        assert dtype == (torch.bfloat16 if host_bf16 else torch.float32)
        keys[host_bf16] = checkpoint_key(auto, paths, cpu, dtype)
        assert checkpoint_key(auto, paths, cpu, dtype) == keys[host_bf16]  # stable
    assert keys[True] != keys[False]
    assert checkpoint_key(pinned, paths, cpu, torch.bfloat16) != keys[True]


def test_an_auto_precision_checkpoint_resumes_only_where_auto_resolves_the_same(
        workspace, monkeypatch, capsys):
    """A training stopped in bf16 (`auto` on a bf16 host) and rerun where `auto` means
    fp32 trains afresh in a run of its own (it used to resume the bf16 run, and MLflow
    refused to change its `resolved.precision`); back on a bf16 host it resumes."""
    from spamlora.errors import Interrupted

    params = load_params(REPO / "params.yaml")
    params = dataclasses.replace(params, train=dataclasses.replace(
        params.train, epochs=1, precision="auto", device="cpu"))

    class StopAtOnce:  # as a SIGTERM during the first step would
        def requested(self):
            return True

        def restore(self):
            pass

    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda: True)
    stopped = stage_main("train")
    monkeypatch.setitem(stopped.__globals__, "StopRequest", StopAtOnce)
    with pytest.raises(Interrupted):
        stopped(params)
    client = mlflow.MlflowClient(f"sqlite:///{workspace / STORE_FILE}")
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (killed,) = client.search_runs([experiment_id])
    assert killed.info.status == "KILLED"
    assert killed.data.params["resolved.precision"] == "bfloat16"
    capsys.readouterr()

    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda: False)
    stage_main("train")(params)
    assert "resuming" not in capsys.readouterr().out
    fresh = read_json(Paths(workspace).metrics("train"))[RUN_ID_KEY]
    assert fresh != killed.info.run_id
    run = client.get_run(fresh)
    assert run.info.status == "FINISHED" and run.data.params["resolved.precision"] == "float32"

    monkeypatch.setattr(precision, "cpu_computes_bf16", lambda: True)
    stage_main("train")(params)
    assert "resuming from epoch 1, step 1" in capsys.readouterr().out
    assert read_json(Paths(workspace).metrics("train"))[RUN_ID_KEY] == killed.info.run_id
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    assert len(client.search_runs([experiment_id])) == 2


def test_a_new_store_is_created_whole_or_not_at_all(tmp_path, monkeypatch):
    """A full disk while MLflow created its tables left a half-built mlflow.db that broke
    every later run (issue 31, item 5)."""
    from spamlora import tracking

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(mlflow.MlflowClient, "create_experiment", full)
        with pytest.raises(SpamloraError, match=r"could not create the MLflow store .*"
                                                r"mlflow\.db: .*No space left on device.*"
                                                r"nothing was left behind"):
            tracking._client()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db.lock"]
    client = tracking._client()
    assert (tmp_path / STORE_FILE).is_file()
    assert client.get_experiment_by_name(EXPERIMENT).artifact_location == (
        tmp_path / ARTIFACT_DIR).as_uri()


def test_a_half_built_store_without_runs_is_moved_aside_and_rebuilt(tmp_path, monkeypatch,
                                                                     capsys):
    import sqlite3

    from spamlora import tracking

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with sqlite3.connect(tmp_path / STORE_FILE) as db:  # as a migration cut short leaves it
        db.execute("create table spans (id integer)")
    tracking._client()
    out = capsys.readouterr().out
    assert "was left half-built (no runs in it): moved to mlflow.db.half-built-" in out
    (aside,) = tmp_path.glob("mlflow.db.half-built-*")  # moved, never deleted
    with sqlite3.connect(aside) as db:
        assert db.execute("select name from sqlite_master").fetchall() == [("spans",)]
    run_id = tracking.create_run("train", {"k": 1}, "gpt2", tracking.RunInputs({}, {}, []))
    assert mlflow.MlflowClient().get_run(run_id).info.status == "RUNNING"
    tracking._client()  # a store with runs in it is never judged half-built
    assert len(list(tmp_path.glob("mlflow.db.half-built-*"))) == 1


def test_clones_sharing_an_external_store_lock_it_and_keep_artifacts_beside_it(tmp_path):
    """The lock was <repo>/mlflow.db.lock, another file in each clone, so two clones
    raced on a new shared store; and the artifacts went where the first clone's stage
    ran (issue 31, items 4 and 6)."""
    shared = tmp_path / "shared" / "store.db"
    code = ("from spamlora.tracking import RunInputs, create_run; "
            "create_run('train', {'k': 1}, 'gpt2', RunInputs({}, {}, []))")
    procs = []
    for clone in ("clone-a", "clone-b", "clone-a", "clone-b"):
        (tmp_path / clone).mkdir(exist_ok=True)
        env = {**os.environ, "DVC_ROOT": str(tmp_path / clone),
               "MLFLOW_TRACKING_URI": f"sqlite:///{shared}"}
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path / clone,
                                      env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    client = mlflow.MlflowClient(f"sqlite:///{shared}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert len(client.search_runs([experiment.experiment_id])) == 4
    assert experiment.artifact_location == (shared.parent / ARTIFACT_DIR).as_uri()
    assert (shared.parent / "store.db.lock").exists()
    assert not any((tmp_path / clone / "mlflow.db.lock").exists()
                   for clone in ("clone-a", "clone-b"))


def test_an_experiment_keeping_artifacts_in_a_dvc_temp_folder_is_refused(tmp_path,
                                                                         monkeypatch):
    from spamlora import tracking

    store = tmp_path / "store.db"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    doomed = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "standalone" / "tmpab12" / "mlruns"
    mlflow.MlflowClient(f"sqlite:///{store}").create_experiment(
        EXPERIMENT, artifact_location=doomed.as_uri())
    with pytest.raises(SpamloraError, match=r"inside a DVC temporary folder that DVC "
                                            r"deletes"):
        tracking._client()


def test_promote_refuses_a_model_whose_files_are_gone(workspace):
    from spamlora.registry import PromotionError

    params = load_params(REPO / "params.yaml")
    params = dataclasses.replace(params, train=dataclasses.replace(
        params.train, epochs=1, precision="fp32"))
    stage_main("train")(params)
    run_id = read_json(Paths(workspace).metrics("train"))[RUN_ID_KEY]
    client = mlflow.MlflowClient(f"sqlite:///{workspace / STORE_FILE}")
    (model,) = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    folder = Path(urllib.request.url2pathname(model.artifact_location.removeprefix("file://")))
    shutil.rmtree(folder)  # as DVC deletes a --temp experiment's folder
    with pytest.raises(PromotionError, match=rf"the model of run {run_id} has no files "
                                             r"any more"):
        promote(run_id=run_id)
    assert client.search_registered_models() == []  # nothing registered


def test_a_damaged_store_is_one_sentence_naming_it(tmp_path):
    """`database disk image is malformed` came as a traceback from promote and the
    evaluate stage (issue 31, item 12). Each check is a fresh process, as in use."""
    env = {**os.environ, "DVC_ROOT": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)

    def python(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    made = python("from spamlora.tracking import RunInputs, create_run; "
                  "create_run('train', {'k': 1}, 'gpt2', RunInputs({}, {}, []))")
    assert made.returncode == 0, made.stderr
    store = tmp_path / STORE_FILE
    data = bytearray(store.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the schema page, after the header
    store.write_bytes(bytes(data))
    opened = python("from spamlora import tracking\n"
                    "try:\n    tracking._client()\n"
                    "except tracking.SpamloraError as e:\n    print(e)")
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout.startswith(f"the MLflow store {store} is damaged (SQLite: ")
    assert "Restore it from a backup, or move it aside" in opened.stdout
    promoted = python("import sys; from spamlora.cli import main; "
                      "sys.exit(main(['promote', '--best', 'validation.accuracy']))")
    assert promoted.returncode == 1
    assert f"the MLflow store {store} is damaged" in promoted.stderr
    assert "Traceback" not in promoted.stderr
    assert store.read_bytes() == bytes(data)  # left as it was


def test_mlflow_waits_for_a_server_are_bounded_unless_the_user_set_them(monkeypatch):
    """MLflow's own defaults wait ~9 minutes for a server that stopped answering (issue
    31, item 7): the stages' client bounds them for a tracking server, over http or
    https; a user's settings are theirs, and a local store needs none."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    from spamlora import tracking

    class Connecting(Exception):
        """Where the client, its waits set, would connect."""

    def connecting(uri):
        raise Connecting(uri)

    def client_of(uri: str, **users: str) -> None:
        """`_client()` of `uri` with only the user's `users` settings in the environment."""
        for name in tracking.SERVER_HTTP_DEFAULTS:  # set first, so that each is restored
            monkeypatch.setenv(name, "unset")
            monkeypatch.delenv(name)
        for name, value in users.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(tracking, "tracking_uri", lambda root=None: uri)
        with pytest.raises(Connecting):
            tracking._client()

    monkeypatch.setattr(tracking, "check_reachable", lambda uri: None)
    monkeypatch.setattr(mlflow, "set_tracking_uri", connecting)
    client_of("sqlite:///mlflow.db")
    assert not set(tracking.SERVER_HTTP_DEFAULTS) & set(os.environ)
    for uri in ("http://127.0.0.1:5000", "https://mlflow.example.org"):
        client_of(uri)
        retries, factor, timeout = (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(),
                                    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(),
                                    MLFLOW_HTTP_REQUEST_TIMEOUT.get())
        # Each try waits out its timeout, then urllib3's back-off before the next (none
        # before the first retry, factor * 2**(n - 1) before the n-th after it, and
        # MLflow's jitter of up to 1 s).
        worst = timeout * (retries + 1) + sum(factor * 2 ** (n - 1) + 1
                                              for n in range(2, retries + 1))
        assert 0 < retries and worst <= 40, uri
    client_of("http://127.0.0.1:5000", MLFLOW_HTTP_REQUEST_TIMEOUT="300")
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 300
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == int(
        tracking.SERVER_HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])  # the rest bound


@pytest.mark.e2e
def test_a_server_that_dies_mid_training_costs_a_rerun_and_nothing_else(workspace,
                                                                        mlflow_server):
    """It stalled training for ~9 minutes of retries, then a ~230-line traceback, the
    run left RUNNING (issue 31, item 7). Now training goes on without it, the stage ends
    with one line, the checkpoint stays, and a rerun once the server is back resumes the
    same run and logs every step exactly once."""
    uri, proc, root = mlflow_server
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update({"epochs": 3, "precision": "fp32", "checkpoint_seconds": 0})
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "DVC_ROOT": str(workspace), "MLFLOW_TRACKING_URI": uri}
    command = [sys.executable, str(REPO / "stages" / "train.py")]
    # No retries while the server dies: they would only add seconds to each call that
    # fails (their bound is tested above). The rerun keeps the stages' own bound.
    stage = subprocess.Popen(command, cwd=workspace,
                             env={**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not list((workspace / FOLDER).glob("*/step-*.sha256")):
        assert stage.poll() is None, stage.stdout.read()[-3000:]
        time.sleep(0.01)
    proc.terminate()
    proc.wait(timeout=30)
    out, _ = stage.communicate(timeout=300)
    assert stage.returncode == 1, out[-3000:]
    assert f"warning: MLflow tracking server {uri} did not answer" in out
    assert out.strip().splitlines()[-1] == "error: " + UNAVAILABLE.format(uri), out[-2500:]
    assert "Traceback" not in out
    assert list((workspace / FOLDER).glob("*/step-*.sha256"))  # kept for the rerun
    assert not Paths(workspace).metrics("train").exists()

    again = start_mlflow_server(root, int(uri.rsplit(":", 1)[1]))
    try:
        rerun = subprocess.run(command, cwd=workspace, env=env, capture_output=True,
                               text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert "resuming from epoch 4, step 21" in rerun.stdout
        client = mlflow.MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "step_loss")]
        assert sorted(steps) == list(range(1, 3 * 7 + 1))  # each once
    finally:
        again.terminate()
        again.wait(timeout=30)


def dvc_exp_merge(ws: Path, name: str, seed: int) -> None:
    """What `dvc exp run -n <name> -S train.seed=<seed>` leaves in git for the stages it
    runs: refs/exps/exec/EXEC_MERGE, a commit whose message names the experiment and
    whose params.yaml holds its values."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["seed"] = seed
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    rev = "0" * 40
    for command in (["init", "-q"], ["add", "params.yaml"],
                    ["-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-qm",
                     f"dvc-exp:{rev}:{rev}:{name}"],
                    ["update-ref", DVC_EXP_MERGE, "HEAD"]):
        subprocess.run(["git", *command], cwd=ws, check=True)


@pytest.mark.parametrize("stage, applied_name, applied_seed, error", [
    ("train", "brave-test", 7, "(train.seed is 123 here, DVC applied 7)"),
    ("evaluate", "brave-test", 7, "(train.seed is 123 here, DVC applied 7)"),
    ("plot", "brave-test", 7, "(train.seed is 123 here, DVC applied 7)"),
    ("train", "other-exp", 123, f"(DVC's {DVC_EXP_MERGE} now names experiment 'other-exp')"),
])
def test_params_other_than_dvc_applied_for_the_experiment_fail_before_any_run(
        workspace, stage, applied_name, applied_seed, error):
    """Issue 31, item 3: a second `dvc exp run` in the workspace wrote its -S values into
    params.yaml while this experiment ('brave-test', as the fixture names it) ran."""
    dvc_exp_merge(workspace, applied_name, applied_seed)
    params = load_params(REPO / "params.yaml")  # train.seed 123
    with pytest.raises(SpamloraError) as e:
        stage_main(stage)(params)
    assert str(e.value) == (
        f"params.yaml: another `dvc exp run` changed it during experiment 'brave-test' "
        f"{error}, so nothing is logged under that name. Parallel experiments go through "
        f"`dvc exp run --queue` or `--temp`")
    assert not (workspace / STORE_FILE).exists()  # no run, not even a store


def test_params_as_dvc_applied_them_pass(workspace):
    dvc_exp_merge(workspace, "brave-test", 123)
    check_experiment_params(load_params(REPO / "params.yaml").flat())
