"""Tokenizer: tiktoken's BPE built from local files, no network."""

import hashlib
import shutil

import pytest
import tiktoken

from spamlora.tokenizer import Tokenizer, TokenizerError

from .conftest import write_tokenizer_files

TEXTS = ["Hello, world", "WINNER!! As a valued network customer you have been selected",
         "Ü-bahn 😀 naïve café", "  spaces   and\ttabs\n", "<|endoftext|> is plain text"]


@pytest.fixture
def gpt2_folder(tmp_path, gpt2_bpe):
    shutil.copy(gpt2_bpe / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(gpt2_bpe / "vocab.bpe", tmp_path / "merges.txt")
    return tmp_path


def test_known_ids(gpt2_folder):
    tok = Tokenizer(gpt2_folder)
    assert tok.encode("Hello, world") == [15496, 11, 995]
    assert tok.pad_id == 50256
    assert tok.vocab_size == 50257


def test_parity_with_tiktokens_published_gpt2(gpt2_folder, gpt2_bpe, tmp_path,
                                              monkeypatch, sms_file):
    # tiktoken's own "gpt2" encoding, served from its cache (named by the sha1 of the
    # URL) so nothing is downloaded; the hashes it pins are checked by tiktoken itself.
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1((base + name).encode()).hexdigest()
        shutil.copy(gpt2_bpe / name, cache / key)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    published = tiktoken.get_encoding("gpt2")
    ours = Tokenizer(gpt2_folder)
    messages = [line.split("\t", 1)[1] for line in
                sms_file.read_text(encoding="utf-8").splitlines()]
    for text in TEXTS + messages:
        assert ours.encode(text) == published.encode_ordinary(text), text
    assert ours.decode(ours.encode(TEXTS[2])) == TEXTS[2]


def test_byte_level_stand_in_round_trips(tmp_path, monkeypatch):
    monkeypatch.setattr("tests.conftest.BPE_DIR", tmp_path / "absent")
    write_tokenizer_files(tmp_path)
    tok = Tokenizer(tmp_path)
    assert tok.pad_id == 256
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
        assert len(tok.encode(text)) == len(text.encode("utf-8"))


def test_missing_and_mismatched_files(tmp_path, gpt2_folder):
    with pytest.raises(TokenizerError, match=r"vocab\.json: missing"):
        Tokenizer(tmp_path / "nowhere")
    (gpt2_folder / "merges.txt").write_text("#version: 0.2\nĠ t\n")
    with pytest.raises(TokenizerError, match="do not form a GPT-2 byte-pair encoding"):
        Tokenizer(gpt2_folder)


def test_a_changed_file_at_the_same_path_is_reread(tmp_path, gpt2_bpe, monkeypatch):
    # tiktoken caches by path; the content hash we pass must defeat a stale entry.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "tok"
    monkeypatch.setattr("tests.conftest.BPE_DIR", tmp_path / "absent")
    write_tokenizer_files(folder)
    assert Tokenizer(folder).vocab_size == 257
    shutil.copy(gpt2_bpe / "encoder.json", folder / "vocab.json")
    shutil.copy(gpt2_bpe / "vocab.bpe", folder / "merges.txt")
    assert Tokenizer(folder).vocab_size == 50257
