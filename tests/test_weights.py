"""`load_gpt2`: both published layouts load; every malformed folder is a clear error.
`base_fingerprint`: a base's files checked against its download record, digests cached
by (size, mtime, inode) in the user's cache, never in the folder."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import spamlora.hub
from spamlora.hub import DIGEST_CACHE, spamlora_cache_dir
from spamlora.weights import (
    DamagedBaseError,
    WeightsError,
    base_fingerprint,
    load_gpt2,
    read_config,
)

from .conftest import downloaded, flip_bytes, make_hf_gpt2


@pytest.fixture
def folder(tmp_path):
    return make_hf_gpt2(tmp_path / "m", n_embd=16, n_layer=2, n_head=2, n_positions=32,
                        tokenizer=False, vocab_size=300)


def rewrite(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def test_hub_layout_without_prefix_with_mask_buffers_and_lm_head(folder, tmp_path):
    hub = tmp_path / "hub"
    shutil.copytree(folder, hub)

    def to_hub_layout(t):
        for key in list(t):
            t[key.removeprefix("transformer.")] = t.pop(key)
        for i in range(2):  # causal-mask buffers of the published checkpoints
            t[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
            t[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        t["lm_head.weight"] = t["wte.weight"].clone()

    rewrite(hub, to_hub_layout)
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(load_gpt2(hub)(ids), load_gpt2(folder)(ids))


def test_truncated_file(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors: unreadable"):
        load_gpt2(folder)


def test_garbage_file(folder):
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="unreadable"):
        load_gpt2(folder)


def test_missing_tensor_is_named(folder):
    rewrite(folder, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(WeightsError, match=r"missing tensor\(s\) h\.1\.mlp\.c_fc\.bias"):
        load_gpt2(folder)


def test_extra_tensor_is_named(folder):
    rewrite(folder, lambda t: t.update({"transformer.h.2.ln_1.weight": torch.ones(16)}))
    with pytest.raises(WeightsError, match=r"unexpected tensor 'transformer\.h\.2\.ln_1"):
        load_gpt2(folder)


def test_wrong_shape_is_named(folder):
    rewrite(folder, lambda t: t.update({"transformer.ln_f.weight": torch.ones(17)}))
    with pytest.raises(WeightsError, match=r"'transformer\.ln_f\.weight' has shape \(17,\)"):
        load_gpt2(folder)


def test_config_that_does_not_match_the_tensors(folder):
    config = json.loads((folder / "config.json").read_text())
    config["n_embd"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"has shape .* expected .* from config\.json"):
        load_gpt2(folder)


def test_missing_and_broken_config(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config\.json: not valid JSON"):
        read_config(folder)
    (folder / "config.json").write_text(json.dumps({"n_embd": 16}))
    with pytest.raises(WeightsError, match="missing key"):
        read_config(folder)
    (folder / "config.json").unlink()
    with pytest.raises(WeightsError, match=r"config\.json: missing"):
        load_gpt2(folder)


def test_missing_weights_file(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"model\.safetensors: missing"):
        load_gpt2(folder)


def test_no_pickle_is_ever_read(folder):
    # A pytorch_model.bin beside it is ignored; without safetensors the load fails.
    torch.save({"x": torch.ones(1)}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="safetensors"):
        load_gpt2(folder)


def test_loading_initialises_nothing_and_restores_torch_init(folder):
    init_fns = {name: getattr(torch.nn.init, name) for name in ("normal_", "uniform_",
                                                                 "kaiming_uniform_")}
    rng = torch.random.get_rng_state()
    model = load_gpt2(folder)
    assert torch.equal(torch.random.get_rng_state(), rng)  # no random init drew from it
    assert {name: getattr(torch.nn.init, name) for name in init_fns} == init_fns
    assert model.out_head.weight is model.tok_emb.weight
    want = load_file(folder / "model.safetensors")
    torch.testing.assert_close(model.tok_emb.weight, want["transformer.wte.weight"])
    torch.testing.assert_close(model.trf_blocks[1].norm2.weight,
                               want["transformer.h.1.ln_2.weight"])
    torch.manual_seed(0)
    torch.nn.Linear(4, 4)  # init works again after loading
    assert torch.nn.Linear(4, 4).weight.abs().sum() > 0


@pytest.fixture
def hashed(monkeypatch):
    """The names of the files `base_fingerprint` reads in full, in order."""
    calls = []
    real = spamlora.hub.file_sha256
    monkeypatch.setattr(spamlora.hub, "file_sha256",
                        lambda path: calls.append(path.name) or real(path))
    return calls


def test_fingerprint_hashes_once_per_file_state_and_strict_always(tiny_gpt2, tmp_path,
                                                                   hashed):
    base = downloaded(tiny_gpt2, tmp_path / "base")
    files_before = sorted(os.listdir(base))
    first = base_fingerprint(base)
    assert hashed == ["config.json", "model.safetensors"]
    record = json.loads((base / "download.json").read_text())
    assert first == {name: record[name]["sha256"] for name in first}
    assert base_fingerprint(base) == first and len(hashed) == 2  # unchanged: not re-read
    assert base_fingerprint(base, strict=True) == first
    assert hashed[2:] == ["config.json", "model.safetensors"]  # strict: read in full
    # The cache lives in the user's cache folder; the base folder gains nothing.
    assert sorted(os.listdir(base)) == files_before
    cache = spamlora_cache_dir() / DIGEST_CACHE
    assert str((base / "model.safetensors").resolve()) in cache.read_text()
    # A file rewritten with the same content gets a new mtime: read again.
    (base / "config.json").write_bytes((base / "config.json").read_bytes())
    assert base_fingerprint(base) == first and hashed[4:] == ["config.json"]


def test_md5_digests_are_cached_beside_the_sha256_while_the_file_is_unchanged(
        tiny_gpt2, tmp_path, monkeypatch, hashed):
    """The train stage tags its run with DVC's md5 of the base model folder: hashed once
    per state of each file, as its sha256 is (issue 27, item 3)."""
    import hashlib

    from spamlora.hub import file_digests
    from spamlora.tracking import dir_md5

    md5_reads = []
    real_md5 = spamlora.hub.file_md5
    monkeypatch.setattr(spamlora.hub, "file_md5",
                        lambda path: md5_reads.append(path.name) or real_md5(path))
    base = downloaded(tiny_gpt2, tmp_path / "base")
    weights = base / "model.safetensors"
    expected = hashlib.md5(weights.read_bytes()).hexdigest()
    sha256 = base_fingerprint(base)["model.safetensors"]
    assert file_digests([weights], algorithm="md5") == [expected]
    assert md5_reads == ["model.safetensors"]
    folder_digest = dir_md5(base)
    assert md5_reads.count("model.safetensors") == 1  # cached
    assert len(hashed) == 2 and base_fingerprint(base)["model.safetensors"] == sha256
    assert len(hashed) == 2  # the md5 entry kept the sha256 beside it
    # Another content, its mtime set an hour back: another state, hashed again.
    weights.write_bytes(weights.read_bytes() + b"\0")
    os.utime(weights, (weights.stat().st_atime - 3600, weights.stat().st_mtime - 3600))
    assert dir_md5(base) != folder_digest
    assert md5_reads.count("model.safetensors") == 2
    assert file_digests([weights], algorithm="md5") == [
        hashlib.md5(weights.read_bytes()).hexdigest()]
    assert md5_reads.count("model.safetensors") == 2


def test_a_damaged_weights_file_is_refused_naming_it_and_how_to_restore_it(tiny_gpt2,
                                                                           tmp_path):
    base = downloaded(tiny_gpt2, tmp_path / "base")
    base_fingerprint(base)  # cached
    flip_bytes(base / "model.safetensors")
    with pytest.raises(DamagedBaseError, match=r"base/model\.safetensors: damaged: its "
                       r"sha256 is [0-9a-f]{64}, but download\.json recorded") as e:
        base_fingerprint(base)
    assert "dvc checkout" in str(e.value) and "spamlora download-model" in str(e.value)
    with pytest.raises(DamagedBaseError):  # not cached as good by the failed check
        base_fingerprint(base)


def test_a_flip_that_keeps_size_mtime_and_inode_is_caught_by_strict(tiny_gpt2, tmp_path):
    base = downloaded(tiny_gpt2, tmp_path / "base")
    good = base_fingerprint(base)
    flip_bytes(base / "model.safetensors", keep_mtime=True)
    # What DVC's stat cache cannot see either: the digest of the unchanged stat is used.
    assert base_fingerprint(base) == good
    with pytest.raises(DamagedBaseError, match=r"model\.safetensors: damaged"):
        base_fingerprint(base, strict=True)
    with pytest.raises(DamagedBaseError):  # strict's digest replaced the stale one
        base_fingerprint(base)


def test_an_absent_corrupt_or_unwritable_digest_cache_only_costs_hashing(
        tiny_gpt2, tmp_path, monkeypatch, hashed):
    base = downloaded(tiny_gpt2, tmp_path / "base")
    good = base_fingerprint(base)
    cache = spamlora_cache_dir() / DIGEST_CACHE
    for content in ("{not json", "[]", '{"format": "spamlora-file-digests/1", "files": 5}'):
        cache.write_text(content)
        del hashed[:]
        assert base_fingerprint(base) == good and len(hashed) == 2
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # no folder can be made
    del hashed[:]
    assert base_fingerprint(base) == good and base_fingerprint(base) == good
    assert len(hashed) == 4
    flip_bytes(base / "model.safetensors")
    with pytest.raises(DamagedBaseError):
        base_fingerprint(base)


def test_fingerprint_of_a_folder_without_a_record_or_a_file(folder):
    digests = base_fingerprint(folder)  # nothing recorded: computed, nothing to check
    assert set(digests) == {"config.json", "model.safetensors"}
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"model\.safetensors: missing"):
        base_fingerprint(folder)
