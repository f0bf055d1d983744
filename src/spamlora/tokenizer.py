"""GPT-2 byte-pair encoding with tiktoken, built from a model folder's own files.

Hugging Face GPT-2 folders ship `vocab.json` and `merges.txt`, which are GPT-2's original
`encoder.json` and `vocab.bpe`, so nothing is fetched at run time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from .errors import SpamloraError

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
END_OF_TEXT = "<|endoftext|>"


class TokenizerError(SpamloraError, ValueError):
    pass


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Tokenizer:
    """GPT-2 BPE; `<|endoftext|>` (50256 in GPT-2) doubles as the padding id."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        vocab, merges = folder / VOCAB_FILE, folder / MERGES_FILE
        for path in (vocab, merges):
            if not path.is_file():
                raise TokenizerError(f"{path}: missing (GPT-2 tokenizer file)")
        try:
            special_id = json.loads(vocab.read_text(encoding="utf-8"))[END_OF_TEXT]
            # tiktoken caches files by the sha1 of their path; passing the content hash
            # makes it re-read a file whose content changed behind the same path.
            ranks = data_gym_to_mergeable_bpe_ranks(
                vocab_bpe_file=str(merges), encoder_json_file=str(vocab),
                vocab_bpe_hash=_sha256(merges), encoder_json_hash=_sha256(vocab))
        except KeyError:
            raise TokenizerError(f"{vocab}: has no {END_OF_TEXT!r} entry") from None
        except (AssertionError, ValueError) as e:
            raise TokenizerError(f"{vocab} and {merges} do not form a GPT-2 byte-pair "
                                 f"encoding ({type(e).__name__}: {e})") from None
        self.encoding = tiktoken.Encoding(
            name=f"gpt2@{folder}", pat_str=r50k_pat_str, mergeable_ranks=ranks,
            special_tokens={END_OF_TEXT: special_id})
        self.pad_id: int = special_id
        self.vocab_size: int = self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        # SMS text is data: a literal "<|endoftext|>" in it is encoded as plain text.
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Not tiktoken's encode_ordinary_batch: it hands every text to a thread pool,
        # which costs more than encoding an SMS (200,000 messages: 11.8 s against 1.4 s
        # in one thread; the real collection repeated: 14.1 s against 4.2 s).
        return [self.encoding.encode_ordinary(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)
