"""The classifier as an MLflow model: logged with a reference to its base (never a copy),
loaded by URI in a fresh process, promoted in the Model Registry, served by
`mlflow models serve`."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from spamlora.config import ModelParams
from spamlora.hub import MODEL_FILES, file_sha256
from spamlora.mlflow_model import (
    ADAPTER_DIGEST_TAG,
    BASE_MODEL_ENV,
    INPUT_EXAMPLE,
    MODEL_CODE,
    MODEL_NAME,
    BaseModelError,
    BaseReference,
    ModelConfigError,
    find_base,
    load_predictor,
    log_model,
    logged_models,
    model_texts,
    read_model_config,
)
from spamlora.precision import resolve_device, resolve_precision
from spamlora.predictor import Predictor
from spamlora.registry import PromotionError, promote, selection_warnings
from spamlora.tracking import (
    ARTIFACT_DIR,
    EXPERIMENT,
    STORE_FILE,
    TRAINING_RUN_TAG,
    _log_datasets,
    file_md5,
)

from .conftest import free_port, local_server

MESSAGES = ["WINNER!! claim your free prize now", "ok see you at 5",
            "Congratulations, you have been selected for a cash reward of 1000 pounds"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_gpt2, adapter):
    """A repository root with a SQLite store holding three runs, each with a logged model
    and a test accuracy; the base model in `root/base`."""
    root = tmp_path_factory.mktemp("store")
    base = shutil.copytree(tiny_gpt2, root / "base")
    env = {"DVC_ROOT": str(root), "XDG_CACHE_HOME": str(root / "cache")}
    saved = {k: os.environ.get(k) for k in (*env, "MLFLOW_TRACKING_URI")}
    os.environ.update(env)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    uri = f"sqlite:///{root / STORE_FILE}"
    mlflow.set_tracking_uri(uri)
    mlflow.MlflowClient().create_experiment(
        EXPERIMENT, artifact_location=(root / ARTIFACT_DIR).as_uri())
    experiment = mlflow.set_experiment(EXPERIMENT)
    ref = BaseReference.of_folder(base, ModelParams(url="http://127.0.0.1:9/{name}"))
    runs = {}
    for exp_name, accuracy in (("low-exp", 0.5), ("high-exp", 0.9), ("mid-exp", 0.7)):
        with mlflow.start_run(run_name=exp_name, tags={"dvc.exp_name": exp_name}) as run:
            log_model(adapter, ref)
            mlflow.log_metric("test.accuracy", accuracy)
            mlflow.log_metric("val_loss", 1 - accuracy)
        runs[exp_name] = run.info.run_id
    yield {"root": root, "uri": uri, "base": base, "runs": runs, "ref": ref, "adapter": adapter,
           "experiment_id": experiment.experiment_id}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# Every load in these tests refuses pickle: the logged model is code, never a pickle.
NO_PICKLE = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}


def in_fresh_process(code: str, store, **env) -> object:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": store["uri"],
                                            **NO_PICKLE, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


LOAD_AND_PREDICT = """
import json, sys, mlflow
model = mlflow.pyfunc.load_model(sys.argv[1] if len(sys.argv) > 1 else {uri!r},
                                 model_config={{"precision": "fp32"}})
out = model.predict({messages!r})
print(json.dumps({{"label": out["label"].tolist(),
                  "p": out["spam_probability"].tolist()}}))
"""


def expected(store, adapter, precision="fp32"):
    probs, _ = Predictor(store["base"], adapter, precision=precision).spam_probabilities(
        MESSAGES)
    return probs


def test_a_logged_model_predicts_what_the_predictor_does_in_a_fresh_process(store, adapter):
    run_id = store["runs"]["high-exp"]
    got = in_fresh_process(LOAD_AND_PREDICT.format(uri=f"runs:/{run_id}/{MODEL_NAME}",
                                                   messages=MESSAGES), store)
    want = expected(store, adapter)
    np.testing.assert_allclose(got["p"], want, atol=1e-4)
    assert got["label"] == ["spam" if p >= 0.5 else "ham" for p in want]


def test_the_logged_model_references_the_base_and_holds_no_copy(store, adapter):
    client = mlflow.MlflowClient(store["uri"])
    (model,) = client.search_logged_models(
        [store["experiment_id"]],
        filter_string=f"source_run_id = '{store['runs']['low-exp']}'")
    folder = Path(mlflow.artifacts.download_artifacts(model.artifact_location))
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < adapter.stat().st_size + 200_000
    base_bytes = {hashlib.sha256((store["base"] / f).read_bytes()).hexdigest()
                  for f in MODEL_FILES}
    assert not {hashlib.sha256(p.read_bytes()).hexdigest() for p in files} & base_bytes
    config = mlflow.models.Model.load(folder / "MLmodel").flavors["python_function"][
        "config"]
    assert config["base"]["sha256"] == store["ref"].sha256
    assert set(config["base"]["sha256"]) == set(MODEL_FILES)
    assert mlflow.models.Model.load(folder / "MLmodel").signature is not None


LOG_AND_LOAD = """
import json, sys, mlflow
from spamlora.mlflow_model import BaseReference, log_model
with mlflow.start_run(experiment_id={experiment!r}):
    uri = log_model({adapter!r}, BaseReference.from_config({base!r}))
mlflow.pyfunc.load_model(uri, model_config={{"precision": "fp32"}}).predict({messages!r})
print(json.dumps(uri))
"""


def test_logging_and_loading_a_model_warns_of_nothing(store, adapter):
    """Issue 25, item 20: the train stage printed MLflow's warnings (no type hint on
    `predict`, pickling the model) that were the project's to avoid. With the warning
    filters a user has, none comes."""
    code = LOG_AND_LOAD.format(experiment=store["experiment_id"], adapter=str(adapter),
                               base=asdict(store["ref"]), messages=MESSAGES)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300, env={
                              **os.environ, "MLFLOW_TRACKING_URI": store["uri"], **NO_PICKLE})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Python warnings (UserWarning: ...) and MLflow's logged ones (WARNING mlflow...)
    assert not re.search(r"Warning\b|WARNING mlflow", proc.stderr), proc.stderr


def logged_folder(store, run: str) -> Path:
    (model,) = mlflow.MlflowClient(store["uri"]).search_logged_models(
        [store["experiment_id"]], filter_string=f"source_run_id = '{store['runs'][run]}'")
    return Path(mlflow.artifacts.download_artifacts(model.artifact_location))


def test_the_logged_model_is_code_not_a_pickle(store, monkeypatch):
    """Issue 25, item 16: loading a model from a shared store runs no pickle. It holds
    the package's code file (MLflow's models from code), which builds the model from the
    spamlora installed where it loads; a load that refuses pickle loads it."""
    folder = logged_folder(store, "mid-exp")
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))], files
    flavor = mlflow.models.Model.load(folder / "MLmodel").flavors["python_function"]
    assert "python_model" not in flavor  # the pickle's entry
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(flavor["model_code_path"]).name == MODEL_CODE.name
    assert (folder / MODEL_CODE.name).read_text() == MODEL_CODE.read_text()
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(str(folder), model_config={"precision": "fp32"})
    np.testing.assert_allclose(model.predict(MESSAGES)["spam_probability"],
                               expected(store, store["adapter"]), atol=1e-4)


def test_the_example_is_scored_by_the_classifier_in_memory_not_a_second_load(
        store, monkeypatch):
    """Issue 25, item 11: MLflow checks the logged model by loading it and scoring the
    input example; given the classifier in memory (the train stage's), that check scores
    the example with it, and nothing is loaded. Without it, the classifier is loaded."""
    import spamlora.predictor

    in_memory = Predictor(store["base"], store["adapter"], precision="fp32")
    scored = []
    score = in_memory.probabilities
    monkeypatch.setattr(in_memory, "probabilities",
                        lambda texts: scored.append(list(texts)) or score(texts))
    loads = []
    load = spamlora.predictor.load_classifier
    monkeypatch.setattr(spamlora.predictor, "load_classifier",
                        lambda *a, **k: loads.append(a) or load(*a, **k))
    with mlflow.start_run():
        log_model(store["adapter"], store["ref"], in_memory)
    assert loads == []
    assert scored == [INPUT_EXAMPLE]  # MLflow's check ran, on the model in memory
    with mlflow.start_run():
        log_model(store["adapter"], store["ref"])
    assert len(loads) == 1


def models_of(store, run_id: str) -> list:
    return logged_models(mlflow.MlflowClient(store["uri"]), run_id, store["experiment_id"])


def test_logging_again_on_the_same_run_keeps_the_model_it_holds(store):
    """Issue 31, item 8: a training killed after logging its model and resumed logs it
    again on the same run; the run still holds one model, the first."""
    in_memory = Predictor(store["base"], store["adapter"], precision="fp32")
    with mlflow.start_run() as run:
        first = log_model(store["adapter"], store["ref"], in_memory)
        again = log_model(store["adapter"], store["ref"], in_memory)
    (model,) = models_of(store, run.info.run_id)
    assert again == first == model.model_uri
    assert model.tags[ADAPTER_DIGEST_TAG] == file_sha256(store["adapter"])


def spoil(store, run_id: str, how: str) -> str:
    """A model on run `run_id` that must not stand for `store["adapter"]`: its URI."""
    client = mlflow.MlflowClient(store["uri"])
    digest = file_sha256(store["adapter"])
    if how == "cut short":  # killed while logging: PENDING for ever, no files
        return client.create_logged_model(store["experiment_id"], name=MODEL_NAME,
                                          source_run_id=run_id,
                                          tags={ADAPTER_DIGEST_TAG: digest}).model_uri
    uri = log_model(store["adapter"], store["ref"])
    (model,) = models_of(store, run_id)
    if how == "another adapter":
        client.set_logged_model_tags(model.model_id, {ADAPTER_DIGEST_TAG: "0" * 64})
    else:  # its artifacts deleted
        shutil.rmtree(urllib.request.url2pathname(
            model.artifact_location.removeprefix("file://")))
    return uri


@pytest.mark.parametrize("how", ["another adapter", "cut short", "files gone"])
def test_a_model_of_the_run_that_cannot_stand_for_the_adapter_is_replaced(store, how,
                                                                          caplog):
    with mlflow.start_run() as run:
        old = spoil(store, run.info.run_id, how)
        new = log_model(store["adapter"], store["ref"])
    assert new != old
    (model,) = models_of(store, run.info.run_id)  # the old one is deleted
    assert model.model_uri == new and model.status == "READY"
    assert model.tags[ADAPTER_DIGEST_TAG] == file_sha256(store["adapter"])
    assert f"{old} deleted" in caplog.text


# Where in model_config a crafted value goes, the value, and the message refusing it.
CRAFTED = [
    (("base", "name"), "../../../escaped",
     r"model_config base.name must be one of \['gpt2', .*got '../../../escaped'"),
    (("base", "sha256", "model.safetensors"), "../../x",
     r"model_config base.sha256\['model.safetensors'\] must be 64 lowercase hex digits, "
     r"got '../../x'"),
    (("base", "sha256", "model.safetensors"), "A" * 64, "64 lowercase hex digits"),
    (("base", "sha256"), {"model.safetensors": "0" * 64},
     r"model_config base.sha256 must map each of \['config.json'"),
    (("base", "revision"), "../../x", "model_config base.revision must be a Hub revision"),
    (("base", "trained_from"), "relative/base",
     "model_config base.trained_from must be an absolute path, got 'relative/base'"),
    (("base", "url"), 7, "model_config base.url must be a URL or a folder, got 7"),
    (("base", "unexpected"), 1, "model_config base must have exactly the keys"),
    (("base",), [], "model_config base must have exactly the keys"),
    (("base_model",), 7, "model_config base_model must be a folder or null, got 7"),
    (("download", "timeout"), 0, "model_config download.timeout must be a number > 0"),
    (("download", "retries"), 1.5, "download.retries must be an integer >= 0"),
    (("download", "proxy"), "x", "model_config download must be a mapping with keys"),
    (("precision",), "fp16",
     r"model_config precision must be one of \['auto', 'fp32', 'bf16'\], got 'fp16'"),
    (("device",), "", "model_config device must be a device name"),
    (("batch_size",), 0, "model_config batch_size must be an integer >= 1, got 0"),
    (("batch_size",), "64", "batch_size must be an integer >= 1, got '64'"),
    (("threshold",), 1.5, r"model_config threshold must be a number in \[0, 1\], got 1.5"),
    (("threshold",), float("nan"), "model_config threshold must be a number in"),
    (("bacth_size",), 8, r"model_config has unknown keys \['bacth_size'\]"),
]


def crafted_config(store, keys: tuple[str, ...] = (), value: object = None) -> dict:
    """The model_config a logged model holds, with `value` at `keys`."""
    config = mlflow.models.Model.load(logged_folder(store, "low-exp") / "MLmodel").flavors[
        "python_function"]["config"]
    if keys:
        *parents, last = keys
        inner = config
        for key in parents:
            inner = inner[key]
        inner[last] = value
    return config


@pytest.mark.parametrize("keys, value, error", CRAFTED)
def test_each_crafted_model_config_value_is_refused(store, keys, value, error):
    with pytest.raises(ModelConfigError, match=error):
        read_model_config(crafted_config(store, keys, value))


def test_a_model_logged_with_fewer_keys_takes_the_defaults(store):
    config = crafted_config(store)
    for key in ("base_model", "download", "device"):
        del config[key]  # as a model logged by an older spamlora
    read = read_model_config(config)
    assert (read.base_model, read.download.retries, read.device) == (None, 3, "auto")
    assert read.base == store["ref"]


@pytest.mark.parametrize("keys, value, error", [CRAFTED[0], CRAFTED[1], CRAFTED[4]])
def test_a_crafted_model_is_refused_before_it_names_a_path(store, tmp_path, monkeypatch,
                                                           keys, value, error):
    """A model whose MLmodel was edited (a shared store): loading refuses it with a
    message naming the value, and writes nothing (no cache folder, no lock file), inside
    the cache or out of it. Its trained-from folder is gone, so the cache would be next."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = shutil.copytree(logged_folder(store, "low-exp"), tmp_path / "model")
    model = mlflow.models.Model.load(folder / "MLmodel")
    config = crafted_config(store, keys, value)
    config["base"]["trained_from"] = str(tmp_path / "gone")
    model.flavors["python_function"]["config"] = config
    model.save(folder / "MLmodel")
    with pytest.raises(ModelConfigError, match=error):
        mlflow.pyfunc.load_model(str(folder))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.fixture(scope="module")
def mode_adapters(tmp_path_factory, tiny_gpt2):
    """Adapters of other modes on the store's base (`random`: LoRA on a random base),
    trained-like (non-zero)."""
    from spamlora.adapter import AdapterSpec, save_adapter
    from spamlora.classifier import build_classifier, random_base
    from spamlora.weights import base_fingerprint, load_gpt2, read_config

    folder = tmp_path_factory.mktemp("mode_adapters")
    made = {}
    for name, trainable, token in (("all", "all", "first"), ("last_block", "last_block",
                                                               "mean"),
                                   ("random", "lora", "last")):
        if name == "random":
            base, digest = random_base(read_config(tiny_gpt2), 5)
            random = {"weights": "random", "base_seed": 5, "random_sha256": digest}
        else:
            base, random = load_gpt2(tiny_gpt2), {}
        spec = AdapterSpec("gpt2", base.cfg, rank=4, alpha=4, max_length=12,
                           pad_id=50256 if base.cfg.vocab_size == 50257 else 256,
                           base_sha256=base_fingerprint(tiny_gpt2), trainable=trainable,
                           token=token, **random)
        model = build_classifier(base, spec, seed=0)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=generator) * 0.3)
        made[name] = folder / f"{name}.safetensors"
        save_adapter(model, spec, made[name])
    return made


@pytest.mark.parametrize("trainable", ["all", "last_block", "random"])
def test_a_model_of_another_mode_loads_in_a_fresh_process_and_scores_as_its_files(
        store, mode_adapters, trainable):
    """`last_block` references the base as LoRA does; `all` (its own weights) and LoRA
    on a random base (rebuilt from its seed) read no base weights, so they reference
    none: they carry the base's config and tokenizer files."""
    adapter = mode_adapters[trainable]
    no_base = trainable in ("all", "random")
    with mlflow.start_run() as run:
        uri = log_model(adapter, None if no_base else store["ref"],
                        base_files=store["base"] if no_base else None)
    store["runs"][f"mode-{trainable}"] = run.info.run_id
    folder = logged_folder(store, f"mode-{trainable}")
    config = mlflow.models.Model.load(folder / "MLmodel").flavors["python_function"][
        "config"]
    carried = sorted(p.name for p in folder.glob("artifacts/base_files/*"))
    weights_sha256 = file_sha256(store["base"] / "model.safetensors")
    assert weights_sha256 not in {file_sha256(p) for p in folder.rglob("*") if p.is_file()}
    if no_base:
        assert config["base"] is None
        assert carried == ["config.json", "merges.txt", "vocab.json"]
    else:
        assert config["base"]["sha256"] == store["ref"].sha256 and carried == []
    got = in_fresh_process(LOAD_AND_PREDICT.format(uri=uri, messages=MESSAGES), store,
                           XDG_CACHE_HOME=str(store["root"] / "fresh-cache"))
    np.testing.assert_allclose(got["p"], expected(store, adapter), atol=1e-4)


def test_a_model_whose_base_reference_does_not_fit_its_mode_is_refused(store,
                                                                       mode_adapters,
                                                                       tmp_path):
    with mlflow.start_run(), pytest.raises(ValueError, match="reads no base weights is "
                                                             "logged with no base"):
        log_model(mode_adapters["all"], store["ref"])
    with mlflow.start_run(), pytest.raises(ValueError, match="needs `base_files`"):
        log_model(mode_adapters["all"], None)
    # A LoRA model edited to reference no base: refused on loading, naming why.
    folder = shutil.copytree(logged_folder(store, "low-exp"), tmp_path / "model")
    model = mlflow.models.Model.load(folder / "MLmodel")
    model.flavors["python_function"]["config"]["base"] = None
    model.save(folder / "MLmodel")
    with pytest.raises(ModelConfigError, match="base must be null exactly for an adapter "
                                               "that reads no base weights"):
        mlflow.pyfunc.load_model(str(folder))


def test_a_base_folder_or_download_setting_given_at_load_time_is_used(store, tmp_path):
    """`spamlora predict --model ... --weights DIR` and `model_config={"base_model": DIR}`
    name the base to use (MLflow overrides only keys a model was logged with: they are
    logged, as null and the defaults)."""
    uri = f"runs:/{store['runs']['low-exp']}/{MODEL_NAME}"
    changed = shutil.copytree(store["base"], tmp_path / "changed")
    (changed / "config.json").write_text((changed / "config.json").read_text() + " ")
    with pytest.raises(BaseModelError, match="changed/config.json has sha256"):
        load_predictor(uri, changed, precision="fp32")
    with pytest.raises(ModelConfigError, match="download.timeout must be a number > 0"):
        load_predictor(uri, download={"timeout": -1})
    copy = shutil.copytree(store["base"], tmp_path / "copy")
    got = load_predictor(uri, copy, precision="fp32").spam_probabilities(MESSAGES)[0]
    np.testing.assert_allclose(got, expected(store, store["adapter"]), atol=1e-4)


def test_loading_hashes_each_base_file_once(store, tmp_path, monkeypatch):
    """The adapter records its base's hashes (as training writes it); find_base has
    verified them already, so the Predictor does not hash the base a second time."""
    import dataclasses

    from safetensors.torch import save_file

    import spamlora.hub
    import spamlora.mlflow_model
    from spamlora.adapter import read_adapter
    from spamlora.weights import base_fingerprint

    spec, tensors = read_adapter(adapter_path := store["adapter"])
    spec = dataclasses.replace(spec, base_sha256=base_fingerprint(store["base"]))
    save_file(tensors, tmp_path / adapter_path.name, metadata=spec.to_metadata())
    with mlflow.start_run():
        uri = log_model(tmp_path / adapter_path.name, store["ref"])
    hashed = []
    for module in (spamlora.mlflow_model, spamlora.hub):
        real = module.file_sha256
        monkeypatch.setattr(module, "file_sha256",
                            lambda path, real=real: hashed.append(Path(path).name) or real(path))
    mlflow.pyfunc.load_model(uri)
    assert sorted(hashed) == sorted(MODEL_FILES)


def test_a_base_with_one_changed_byte_is_refused(store, tmp_path, monkeypatch):
    changed = shutil.copytree(store["base"], tmp_path / "changed")
    weights = changed / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(BaseModelError, match=r"changed/model.safetensors has sha256"):
        find_base(store["ref"], changed)
    monkeypatch.setenv(BASE_MODEL_ENV, str(changed))
    with pytest.raises(BaseModelError, match="model.safetensors"):
        find_base(store["ref"], None)


def test_the_base_is_found_where_trained_then_in_the_cache_then_downloaded(
        store, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ref = store["ref"]
    assert find_base(ref, None) == store["base"].resolve()
    with local_server() as server:
        server.serve_dir("/hub/gpt2", store["base"])
        moved = BaseReference(ref.name, server.base_url + "/hub/gpt2", ref.revision,
                              ref.sha256, str(tmp_path / "gone"))
        got = find_base(moved, None)
        assert got == tmp_path / "cache" / "spamlora" / "models" / (
            f"gpt2-{ref.sha256['model.safetensors'][:12]}")
        assert not ref.mismatch(got)
        hits = sum(r.hits for r in server.routes.values())
        assert hits == len(MODEL_FILES)
        assert find_base(moved, None) == got  # from the cache: no further request
        assert sum(r.hits for r in server.routes.values()) == hits
        # A damaged cache is fetched again, not used.
        (got / "config.json").write_text("{}")
        assert find_base(moved, None) == got and not ref.mismatch(got)
    wrong = BaseReference(ref.name, "http://127.0.0.1:9/nothing", ref.revision,
                          {**ref.sha256, "model.safetensors": "0" * 64}, str(tmp_path))
    with pytest.raises(BaseModelError, match="could not be downloaded"):
        find_base(wrong, None)


@pytest.mark.parametrize("given, texts", [
    (["a", "b"], ["a", "b"]),
    (pd.DataFrame({"text": ["x", "y"], "id": [1, 2]}), ["x", "y"]),
    (pd.DataFrame({0: ["z"]}), ["z"]),
])
def test_model_input_forms(given, texts):
    assert model_texts(given) == texts


@pytest.mark.parametrize("given, error", [
    ([], "no messages"), (["ok", 3], "message 1 is int"), (["ok", "  "], "message 1 is empty"),
    (pd.DataFrame({"message": ["x"]}), "expected a 'text' column"),
    ({"text": "x"}, "got dict"),
])
def test_bad_model_input_is_a_value_error(given, error):
    with pytest.raises(ValueError, match=error):
        model_texts(given)


def test_promote_by_run_by_experiment_and_by_best_metric(store, adapter):
    runs = store["runs"]
    first = promote(run_id=runs["mid-exp"])
    assert (first.run_id, first.alias_uri) == (runs["mid-exp"], "models:/spamlora-sms@champion")
    client = mlflow.MlflowClient(store["uri"])
    assert str(client.get_model_version_by_alias("spamlora-sms", "champion").version) == \
        first.version
    by_exp = promote(exp="low-exp", alias="candidate")
    assert by_exp.run_id == runs["low-exp"]
    assert str(client.get_model_version_by_alias("spamlora-sms", "candidate").version) == \
        by_exp.version
    best = promote(best="test.accuracy")
    assert best.run_id == runs["high-exp"]
    champion = client.get_model_version_by_alias("spamlora-sms", "champion")
    assert str(champion.version) == best.version and champion.run_id == runs["high-exp"]
    assert promote(best="val_loss", lowest=True, name="other").run_id == runs["high-exp"]
    assert promote(best="val_loss", name="other").run_id == runs["low-exp"]

    got = in_fresh_process(LOAD_AND_PREDICT.format(uri="models:/spamlora-sms@champion",
                                                   messages=MESSAGES), store)
    np.testing.assert_allclose(got["p"], expected(store, adapter), atol=1e-4)


def test_an_evaluation_only_run_promotes_the_model_of_its_training_run(store):
    with mlflow.start_run(tags={TRAINING_RUN_TAG: store["runs"]["mid-exp"]}) as run:
        mlflow.log_metric("test.accuracy", 0.99)
    done = promote(best="test.accuracy", alias="newest")
    assert done.chosen_run_id == run.info.run_id and done.run_id == store["runs"]["mid-exp"]
    mlflow.MlflowClient().delete_run(run.info.run_id)


@pytest.mark.parametrize("kwargs, error", [
    ({"run_id": "0123456789abcdef"}, "no run '0123456789abcdef'"),
    ({"exp": "no-such-exp"}, r"no finished run of DVC experiment 'no-such-exp' \(known: "
                             r"\['high-exp', 'low-exp', 'mid-exp'\]"),
    ({"best": "test.f1"}, "has metric 'test.f1'"),
    ({"best": "test.accuracy", "alias": "latest"}, "--alias 'latest': 'latest' alias name"),
])
def test_promotion_errors_name_what_is_missing(store, kwargs, error):
    client = mlflow.MlflowClient(store["uri"])
    versions = len(client.search_model_versions())
    with pytest.raises(PromotionError, match=error):
        promote(**kwargs)
    assert len(client.search_model_versions()) == versions  # nothing half-done


def test_a_run_without_a_model_cannot_be_promoted(store):
    with mlflow.start_run() as run:
        mlflow.log_metric("test.accuracy", 0.1)
    with pytest.raises(PromotionError, match=f"run {run.info.run_id} has no logged model"):
        promote(run_id=run.info.run_id)
    mlflow.MlflowClient().delete_run(run.info.run_id)


def test_a_training_run_missing_from_the_store_is_an_error_naming_it(store, capsys):
    """Issue 25, item 8: `--best` picks a run that reused a training this store lacks
    (a clone with another store): an error naming the run and the store, no traceback."""
    from spamlora import cli

    missing = "0123456789abcdef0123456789abcdef"
    with mlflow.start_run(tags={TRAINING_RUN_TAG: missing}) as run:
        mlflow.log_metric("validation.accuracy", 0.99)
    try:
        assert cli.main(["promote", "--best", "validation.accuracy"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("spamlora promote: error: ") and "Traceback" not in err
        assert f"run {run.info.run_id} reused the training of run {missing}" in err
        assert f"is not in the tracking store {store['uri']}" in err
        with pytest.raises(PromotionError, match=missing):
            promote(run_id=run.info.run_id)
    finally:
        mlflow.MlflowClient().delete_run(run.info.run_id)


def test_a_deleted_run_is_never_promoted(store):
    """A deleted run (kept until `mlflow gc`) is no candidate, and a run naming a deleted
    training, or a deleted run named by id, is refused with how to restore it."""
    client = mlflow.MlflowClient(store["uri"])
    with mlflow.start_run() as trained:
        log_model(store["adapter"], store["ref"])
        mlflow.log_metric("validation.accuracy", 0.9)
    with mlflow.start_run(tags={TRAINING_RUN_TAG: trained.info.run_id}) as evaluated:
        mlflow.log_metric("validation.accuracy", 0.95)
    trained_id, evaluated_id = trained.info.run_id, evaluated.info.run_id
    versions = len(client.search_model_versions())
    client.delete_run(trained_id)
    try:
        restore = f"MLFLOW_TRACKING_URI={store['uri']} mlflow runs restore --run-id {trained_id}"
        with pytest.raises(PromotionError) as refused:
            promote(best="validation.accuracy")
        assert str(refused.value) == (
            f"run {evaluated_id} reused the training of run {trained_id}, which is deleted "
            f"in the tracking store {store['uri']}: `{restore}` brings it back")
        with pytest.raises(PromotionError, match=f"run {trained_id} is deleted .*{restore}"):
            promote(run_id=trained_id)
        assert len(client.search_model_versions()) == versions  # nothing registered

        client.restore_run(trained_id)
        client.delete_run(evaluated_id)  # the higher metric, but deleted: not a candidate
        done = promote(best="validation.accuracy", alias="restored")
        assert done.run_id == done.chosen_run_id == trained_id
    finally:
        client.delete_run(trained_id)
        client.delete_run(evaluated_id)


def test_choosing_by_a_test_metric_is_warned_about(store, capsys):
    """Issue 25, item 9: selecting on the test split spends it; the warning says so and
    names the validation metric to choose by instead. A validation metric is quiet."""
    from spamlora import cli

    assert cli.main(["promote", "--best", "test.accuracy", "--alias", "by-test"]) == 0
    out, err = capsys.readouterr()
    assert f"from run {store['runs']['high-exp']}" in out
    assert ("warning: choosing by test.accuracy, a test-split metric, fits the choice to "
            "the test messages") in err
    assert "--best validation.accuracy" in err
    assert promote(best="val_loss", lowest=True, name="other").warnings == ()
    run = mlflow.MlflowClient().get_run(store["runs"]["low-exp"])
    (warning,) = selection_warnings("test_unseen.f1", [run], run)
    assert warning.startswith("choosing by test_unseen.f1, a test-split metric")


def test_candidates_evaluated_on_different_splits_are_named(store, tmp_path):
    """Two runs whose validation splits differ (`data.dedupe` changed, say): choosing
    between them by a validation metric says so, naming each run and its split's
    digest."""
    client = mlflow.MlflowClient(store["uri"])
    splits = {}
    for name, rows in (("train", "1,free prize,1\n"), ("validation", "2,hi,0\n"),
                       ("validation-deduped", "3,hello,0\n"), ("test", "4,ok,0\n")):
        splits[name] = tmp_path / f"{name}.csv"
        splits[name].write_text("id,text,label\n" + rows)
    ids = {}
    for which, score in (("validation", 0.9), ("validation-deduped", 0.8)):
        with mlflow.start_run() as run:
            if score == 0.9:
                log_model(store["adapter"], store["ref"])
            mlflow.log_metric("validation.f1", score)
        _log_datasets(client, run.info.run_id,
                      {"train": splits["train"], "validation": splits[which],
                       "test": splits["test"]}, {"data.url": "u"})
        ids[which] = run.info.run_id
    try:
        done = promote(best="validation.f1", alias="by-f1")
        assert done.run_id == ids["validation"]
        (warning,) = done.warnings
        assert warning.startswith("the 2 runs with validation.f1 were not all evaluated on "
                                  "the same validation data")
        chosen, other = ids["validation"], ids["validation-deduped"]
        assert (f"validation {file_md5(splits['validation'])[:12]}: run(s) {chosen} "
                f"(chosen)") in warning
        assert (f"validation {file_md5(splits['validation-deduped'])[:12]}: run(s) "
                f"{other}") in warning
        client.delete_run(other)
        assert promote(best="validation.f1", alias="by-f1").warnings == ()
    finally:
        for run_id in ids.values():
            client.delete_run(run_id)


@pytest.fixture(scope="module")
def served(store):
    """`mlflow models serve` of the registry's `serving` alias on an ephemeral port."""
    promote(run_id=store["runs"]["high-exp"], alias="serving")
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], **NO_PICKLE,  # execs `uvicorn`:
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = open(store["root"] / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m",
         "models:/spamlora-sms@serving", "--env-manager", "local", "--host", "127.0.0.1",
         "-p", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"server exited: {(store['root'] / 'serve.log').read_text()}")
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("server did not answer /ping in 120 s")
        yield url, store["root"] / "serve.log"
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def post(url: str, body: object) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + "/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_mlflow_models_serve_answers_inputs_and_dataframe_split(served, store, adapter):
    url, _ = served
    # The served model's precision is `auto`: whatever this host resolves it to, the
    # server scores these messages in one batch of the same shapes as this Predictor.
    host = str(resolve_precision("auto", resolve_device("auto"))).removeprefix("torch.")
    want = expected(store, adapter, {"bfloat16": "bf16", "float32": "fp32"}[host])
    for body in ({"inputs": MESSAGES},
                 {"dataframe_split": {"columns": ["text"], "data": [[m] for m in MESSAGES]}}):
        status, got = post(url, body)
        assert status == 200, got
        rows = got["predictions"]
        assert [r["label"] for r in rows] == ["spam" if p >= 0.5 else "ham" for p in want]
        np.testing.assert_allclose([r["spam_probability"] for r in rows], want, atol=1e-4)
    for path in ("/ping", "/health"):
        with urllib.request.urlopen(url + path, timeout=10) as r:
            assert r.status == 200


@pytest.mark.parametrize("body", [
    b"{not json", {"inputs": []}, {"inputs": ["fine", ""]}, {"inputs": [{"text": "x"}]},
    {"inputs": ["fine", 7]}, {"inputs": ["fine", None]}, {"inputs": [["fine"], [7]]},
    {"instances": ["fine", 7.5]}, {"inputs": 7},
    {"dataframe_split": {"columns": ["text"], "data": [["fine"], [7]]}},
    {"dataframe_split": {"columns": ["message"], "data": [["x"]]}}, {"wrong_key": ["x"]},
])
def test_bad_requests_get_a_4xx_json_error_and_the_server_goes_on(served, body):
    url, _ = served
    status, got = post(url, body)
    assert 400 <= status < 500 and got.get("message")
    status, got = post(url, {"inputs": ["still serving?"]})
    assert status == 200 and len(got["predictions"]) == 1


def test_a_bad_message_is_named_in_the_served_error(served):
    url, _ = served
    status, got = post(url, {"inputs": ["fine", 7]})
    assert status == 400 and "message 1 is int, not a string" in got["message"]
    status, got = post(url, {"dataframe_split": {"columns": ["text"], "data": [[" "]]}})
    assert status == 400 and "message 0 is empty" in got["message"]


def test_an_over_long_message_is_truncated_with_a_warning(served, adapter):
    url, log = served
    status, got = post(url, {"inputs": ["free prize " * 200]})
    assert status == 200 and got["predictions"][0]["label"] in ("spam", "ham")
    assert "message 0 is longer than 12 tokens and was truncated" in log.read_text()


def test_a_request_that_waited_out_the_server_timeout_is_not_scored(store, monkeypatch):
    model = mlflow.pyfunc.load_model(f"runs:/{store['runs']['low-exp']}/{MODEL_NAME}",
                                     model_config={"precision": "fp32"})
    inner = model.unwrap_python_model()
    assert len(model.predict(["no wait"])) == 1
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "0.2")
    with inner.lock:  # another request being scored all that time
        with pytest.raises(TimeoutError, match="busy for the whole request timeout") as e:
            inner.predict(None, ["waits"])
    assert e.value.get_http_status_code() == 503  # served: "try again later"
    assert len(inner.predict(None, ["after it"])) == 1


def test_a_request_that_would_finish_after_the_server_timeout_is_not_scored(
        store, monkeypatch):
    model = mlflow.pyfunc.load_model(f"runs:/{store['runs']['low-exp']}/{MODEL_NAME}",
                                     model_config={"precision": "fp32"})
    inner = model.unwrap_python_model()
    assert len(model.predict(["measured"])) == 1
    assert 0 < inner.seconds_per_message < 5
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "10")
    assert len(inner.predict(None, ["fits"])) == 1
    inner.seconds_per_message = 1.0  # as if the machine scored a message a second
    with pytest.raises(TimeoutError, match=r"12 messages take ~12 s here, 1\d s of the "
                                           r"request timeout \(10 s\) were left"):
        inner.predict(None, ["too many"] * 12)
    assert len(inner.predict(None, ["few enough"] * 3)) == 3
    monkeypatch.delenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT")  # no server: no limit
    assert len(inner.predict(None, ["not served"] * 12)) == 12


def test_workers_starting_together_download_the_base_once(store, tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ref = store["ref"]
    with local_server() as server:
        server.serve_dir("/hub/gpt2", store["base"])
        moved = BaseReference(ref.name, server.base_url + "/hub/gpt2", ref.revision,
                              ref.sha256, str(tmp_path / "gone"))
        found, errors = [], []

        def worker():
            try:
                found.append(find_base(moved, None))
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(set(found)) == 1
        assert sum(r.hits for r in server.routes.values()) == len(MODEL_FILES)
