"""download_model: pinned revision and checksums, and reuse of a local Hugging Face cache
(a cache folder built here with the Hub's real layout: blobs, snapshots, refs)."""

import hashlib
import logging
import os
import shutil
from pathlib import Path

import pytest
import yaml

from spamlora.config import ModelParams, Params, ParamsError
from spamlora.download import DownloadError
from spamlora.fileio import OutputExistsError, read_json
from spamlora.hub import MODEL_FILES, PINS, file_sha256
from spamlora.weights import fetch_model, load_gpt2, read_config

from .conftest import BPE_DIR, REPO, make_hf_gpt2

REVISION = "1234567890abcdef1234567890abcdef12345678"
HUB_CONFIG = Path(__file__).parent / "fixtures" / "gpt2_hub_config.json"


@pytest.fixture
def hub(http_server, tiny_gpt2):
    """The tiny model's four files served at /openai-community/gpt2/resolve/<REVISION>/,
    and their sha256 as a pin mapping."""
    for name in MODEL_FILES:
        http_server.serve(f"/openai-community/gpt2/resolve/{REVISION}/{name}",
                          (tiny_gpt2 / name).read_bytes())
    pins = {name: file_sha256(tiny_gpt2 / name) for name in MODEL_FILES}
    return http_server, pins


def url(server) -> str:
    return server.base_url + "/openai-community/{name}/resolve/{revision}"


def fetch(server, dest, pins, revision=REVISION):
    model = ModelParams(name="gpt2", url=url(server), revision=revision, sha256=pins)
    return fetch_model("gpt2", model.base_url, dest, timeout=5, retries=0,
                       revision=model.resolved_revision, sha256=model.expected_sha256)


def hits(server) -> int:
    return sum(route.hits for route in server.routes.values())


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def add_snapshot(cache: Path, folder: Path, revision: str, repo="openai-community/gpt2",
                 lfs: bool = True) -> Path:
    """`folder`'s files cached as huggingface_hub lays them out: content in blobs/ (LFS
    files named by their sha256, others by their git blob id), symlinks from
    snapshots/<revision>/, and refs/main."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "snapshots" / revision).mkdir(parents=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    for name in MODEL_FILES:
        data = (folder / name).read_bytes()
        if lfs and name == "model.safetensors":
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (root / "blobs" / blob).write_bytes(data)
        os.symlink(Path("..", "..", "blobs", blob), root / "snapshots" / revision / name)
    return root


def test_download_verifies_and_records_every_file(hub, tmp_path, hf_cache):
    server, pins = hub
    record = fetch(server, tmp_path / "base", pins)
    assert hits(server) == 4
    saved = read_json(tmp_path / "base" / "download.json")
    assert saved == record and set(record) == set(MODEL_FILES)
    for name, entry in record.items():
        assert entry["source"] == f"{server.base_url}/openai-community/gpt2/resolve/" \
                                  f"{REVISION}/{name}"
        assert entry["sha256"] == pins[name] and entry["verified"] is True
        assert entry["bytes"] == (tmp_path / "base" / name).stat().st_size
    load_gpt2(tmp_path / "base")


@pytest.mark.parametrize("bad", MODEL_FILES)
def test_a_checksum_mismatch_on_any_file_is_refused_and_leaves_nothing(hub, tmp_path, bad,
                                                                      hf_cache):
    server, pins = hub
    wrong = "0" * 64
    with pytest.raises(DownloadError) as e:
        fetch(server, tmp_path / "base", {**pins, bad: wrong})
    message = str(e.value)
    assert bad in message and wrong in message and pins[bad] in message
    assert not (tmp_path / "base").exists()
    assert not list(tmp_path.glob(".base.tmp-*"))


def test_a_truncated_weights_file_is_refused(hub, tmp_path, tiny_gpt2, hf_cache):
    server, pins = hub
    weights = (tiny_gpt2 / "model.safetensors").read_bytes()
    server.serve(f"/openai-community/gpt2/resolve/{REVISION}/model.safetensors",
                 weights[: len(weights) // 2])
    with pytest.raises(DownloadError, match="model.safetensors.*does not match"):
        fetch(server, tmp_path / "base", pins)
    assert not (tmp_path / "base").exists()


def test_a_wrong_revision_is_a_clear_error(hub, tmp_path, hf_cache):
    server, pins = hub
    with pytest.raises(DownloadError, match="resolve/" + "f" * 40 + "/config.json: HTTP 404"):
        fetch(server, tmp_path / "base", pins, revision="f" * 40)


@pytest.mark.parametrize("repo", ["openai-community/gpt2", "gpt2"])  # current and legacy
def test_files_in_the_hf_cache_are_used_without_any_request(hub, tmp_path, tiny_gpt2,
                                                           hf_cache, repo):
    server, pins = hub
    cached = add_snapshot(hf_cache, tiny_gpt2, REVISION, repo=repo)
    record = fetch(server, tmp_path / "base", pins)
    assert hits(server) == 0
    for name in MODEL_FILES:
        assert Path(record[name]["source"]).parent == cached / "blobs"
        assert record[name]["verified"] and record[name]["sha256"] == pins[name]
        assert (tmp_path / "base" / name).read_bytes() == (tiny_gpt2 / name).read_bytes()
    # Hard-linked, not copied: 0.5-6 GB of weights are not stored twice.
    weights = tmp_path / "base" / "model.safetensors"
    assert os.path.samefile(weights, record["model.safetensors"]["source"])
    load_gpt2(tmp_path / "base")


def test_a_cache_of_another_revision_with_other_files_is_not_used(hub, tmp_path, tiny_gpt2,
                                                                   hf_cache):
    server, pins = hub
    other = make_hf_gpt2(tmp_path / "other", seed=7)  # same shapes, other weights
    add_snapshot(hf_cache, other, "e" * 40)
    record = fetch(server, tmp_path / "base", pins)
    assert server.routes[f"/openai-community/gpt2/resolve/{REVISION}/model.safetensors"] \
        .hits == 1
    assert record["model.safetensors"]["source"].startswith(server.base_url)
    assert file_sha256(tmp_path / "base" / "model.safetensors") == pins["model.safetensors"]


def test_a_corrupt_cached_blob_is_not_used_but_downloaded_with_a_warning(
        hub, tmp_path, tiny_gpt2, hf_cache, caplog):
    server, pins = hub
    cached = add_snapshot(hf_cache, tiny_gpt2, REVISION)
    blob = cached / "blobs" / pins["model.safetensors"]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        record = fetch(server, tmp_path / "base", pins)
    assert record["model.safetensors"]["source"].startswith(server.base_url)
    assert record["config.json"]["source"].startswith(str(cached))
    assert hits(server) == 1
    assert "corrupt" in caplog.text and "model.safetensors" in caplog.text
    assert file_sha256(tmp_path / "base" / "model.safetensors") == pins["model.safetensors"]


def test_unchecked_files_never_come_from_the_cache(hub, tmp_path, tiny_gpt2, hf_cache):
    server, _ = hub
    add_snapshot(hf_cache, tiny_gpt2, REVISION)
    record = fetch(server, tmp_path / "base", None)
    assert hits(server) == 4 and not any(r["verified"] for r in record.values())


def test_params_pin_gpt2_by_default_and_can_override_or_skip():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    model = Params.from_dict(raw).model
    assert model.base_url == ("https://huggingface.co/openai-community/gpt2/resolve/"
                              "607a30d783dfa663caf39e06633721c8d4cfcd7e")
    assert model.expected_sha256 == PINS["gpt2"].sha256
    assert model.expected_sha256["model.safetensors"] == \
        "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"
    medium = ModelParams(name="gpt2-medium")  # no confirmed pins: unchecked, main
    assert medium.expected_sha256 is None and medium.base_url.endswith("/resolve/main")
    assert ModelParams(revision="v1.0").base_url.endswith("/gpt2/resolve/v1.0")
    assert ModelParams(sha256=None).expected_sha256 is None
    mapping = {"config.json": "a" * 64}
    assert ModelParams(sha256=mapping).expected_sha256 == mapping
    for value, message in [({"model.bin": "a" * 64}, r"model\.sha256\.model\.bin is not"),
                           ({"config.json": "xyz"}, r"model\.sha256\.config\.json must be 64"),
                           ("sometimes", r"model\.sha256 must be auto, null or a mapping"),
                           (["a"], r"model\.sha256 must be")]:
        raw["model"]["sha256"] = value
        with pytest.raises(ParamsError, match=message):
            Params.from_dict(raw, "params.yaml")


def test_the_hubs_own_gpt2_config_is_read_as_the_gpt2_preset(tmp_path):
    assert file_sha256(HUB_CONFIG) == PINS["gpt2"].sha256["config.json"]
    from spamlora.model import GPTConfig

    folder = make_hf_gpt2(tmp_path, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                          tokenizer=False, vocab_size=50257)  # with or without ../shared
    shutil.copy(HUB_CONFIG, folder / "config.json")
    assert read_config(folder) == GPTConfig.preset("gpt2")
    assert load_gpt2(folder).cfg == GPTConfig.preset("gpt2")


def test_pinned_tokenizer_files_are_gpt2s_own():
    if not (BPE_DIR / "encoder.json").is_file():
        pytest.skip(f"{BPE_DIR} not present")
    assert file_sha256(BPE_DIR / "encoder.json") == PINS["gpt2"].sha256["vocab.json"]
    assert file_sha256(BPE_DIR / "vocab.bpe") == PINS["gpt2"].sha256["merges.txt"]


def test_a_killed_downloads_temp_folder_is_removed_by_the_next(hub, tmp_path, hf_cache):
    server, pins = hub
    stale = tmp_path / ".base.tmp-killed"
    (stale / "model.safetensors").parent.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half of 6 GB")
    fetch(server, tmp_path / "base", pins)
    assert not stale.exists() and (tmp_path / "base" / "download.json").is_file()


def test_a_folder_spamlora_did_not_write_is_refused_and_left_alone(hub, tmp_path, hf_cache):
    """`spamlora download-model ~/models` once emptied the folder (issue 25)."""
    server, pins = hub
    mine = tmp_path / "models"
    (mine / ".git").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match=r"models: is a folder spamlora did not "
                                                r"write \(no download.json in it\)"):
        fetch(server, mine, pins)
    assert sorted(p.name for p in mine.iterdir()) == [".git", "notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputExistsError, match="a-file: is a file"):
        fetch(server, tmp_path / "a-file", pins)
    assert (tmp_path / "a-file").read_text() == "x"


def test_the_cli_refuses_the_current_folder(hub, tmp_path, hf_cache, monkeypatch, capsys):
    from spamlora.cli import main

    server, _ = hub
    (tmp_path / ".git").mkdir()
    (tmp_path / "README.md").write_text("a project")
    monkeypatch.chdir(tmp_path)
    code = main(["download-model", ".", "--url", url(server), "--revision", REVISION,
                 "--no-checksums", "--retries", "0"])
    assert code == 1
    assert "spamlora download-model: error:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf") == [
        ".git", "README.md"]


def test_a_previous_download_is_updated_file_by_file(hub, tmp_path, hf_cache):
    server, pins = hub
    dest = tmp_path / "base"
    fetch(server, dest, pins)
    (dest / "notes.txt").write_text("mine")
    (dest / "model.safetensors").write_bytes(b"damaged")
    fetch(server, dest, pins)
    assert (dest / "notes.txt").read_text() == "mine"
    assert file_sha256(dest / "model.safetensors") == pins["model.safetensors"]
    load_gpt2(dest)
    (empty := tmp_path / "empty").mkdir()
    fetch(server, empty, pins)
    assert (empty / "download.json").is_file()


def test_a_running_writers_temp_folder_is_left_alone(hub, tmp_path, hf_cache):
    server, pins = hub
    running = tmp_path / f".base.tmp-{os.getpid()}-other"
    running.mkdir()
    (running / "model.safetensors").write_bytes(b"in progress")
    dead = tmp_path / ".base.tmp-999999999-gone"  # above any pid Linux hands out
    dead.mkdir()
    fetch(server, tmp_path / "base", pins)
    assert (running / "model.safetensors").read_bytes() == b"in progress"
    assert not dead.exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_a_downloaded_folder_gets_the_users_umask_not_0700(hub, tmp_path, hf_cache):
    server, pins = hub
    old = os.umask(0o022)
    try:
        fetch(server, tmp_path / "base", pins)
    finally:
        os.umask(old)
    assert (tmp_path / "base").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "base" / "download.json").stat().st_mode & 0o777 == 0o644
