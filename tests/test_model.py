"""GPT-2 parity with `transformers` (the reference no one here wrote), on random weights."""

import pytest
import torch
import transformers

from spamlora.model import GPTConfig, GPTModel, side_by_side
from spamlora.tokenizer import Tokenizer
from spamlora.weights import load_gpt2

from .conftest import make_hf_gpt2

SMS = [
    "Go until jurong point, crazy.. Available only in bugis n great world la e buffet...",
    "Ok lar... Joking wif u oni...",
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121 "
    "to receive entry question(std txt rate)T&C's apply 08452810075over18's",
    "U dun say so early hor... U c already then say...",
]


def padded_batch(tokenizer: Tokenizer, texts: list[str], extra: int = 0):
    ids = tokenizer.encode_batch(texts)
    width = max(map(len, ids)) + extra
    batch = torch.full((len(ids), width), tokenizer.pad_id)
    for row, seq in enumerate(ids):
        batch[row, : len(seq)] = torch.tensor(seq)
    return batch, torch.tensor([len(s) for s in ids])


def reference(folder):
    return transformers.GPT2LMHeadModel.from_pretrained(folder).eval()


@pytest.mark.parametrize("size", ["tiny", "gpt2"])
def test_logits_match_transformers_on_a_padded_batch(tmp_path, size):
    if size == "tiny":
        # 256 positions: with the byte-level stand-in tokenizer an SMS is ~150 tokens.
        folder = make_hf_gpt2(tmp_path, n_embd=48, n_layer=3, n_head=4, n_positions=256)
    else:  # the full 124M configuration
        folder = make_hf_gpt2(tmp_path, n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    tokenizer = Tokenizer(folder)
    ids, lengths = padded_batch(tokenizer, SMS)
    ours = load_gpt2(folder)
    with torch.no_grad():
        want = reference(folder)(ids).logits
        got = ours(ids)
    assert got.shape == (len(SMS), ids.shape[1], tokenizer.vocab_size)
    # Only real tokens are compared: HF masks nothing here either, and both are causal.
    for row, n in enumerate(lengths):
        torch.testing.assert_close(got[row, :n], want[row, :n], atol=1e-4, rtol=0)


def test_last_real_token_ignores_extra_right_padding(tiny_gpt2):
    tokenizer = Tokenizer(tiny_gpt2)
    model = load_gpt2(tiny_gpt2)
    ids, lengths = padded_batch(tokenizer, SMS)
    more_ids, _ = padded_batch(tokenizer, SMS, extra=17)
    with torch.no_grad():
        short = model(ids, lengths)
        long = model(more_ids, lengths)
        alone = torch.cat([model(ids[i: i + 1, : n], lengths[i: i + 1])
                           for i, n in enumerate(lengths)])
        want = reference(tiny_gpt2)(ids).logits[torch.arange(len(SMS)), lengths - 1]
    assert short.shape == (len(SMS), tokenizer.vocab_size)
    torch.testing.assert_close(long, short, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, short, atol=1e-5, rtol=0)
    torch.testing.assert_close(short, want, atol=1e-4, rtol=0)


def test_presets_and_custom_sizes():
    assert GPTConfig.preset("gpt2-medium").n_layers == 24
    assert GPTConfig.preset("gpt2-xl").emb_dim == 1600
    tiny = GPTModel(GPTConfig(vocab_size=100, context_length=16, emb_dim=8, n_layers=1,
                              n_heads=2))
    assert tiny(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 100)
    with pytest.raises(ValueError, match="context length"):
        tiny(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(emb_dim=10, n_heads=3)
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        GPTConfig.preset("gpt5")


def test_public_entry_point():
    import spamlora
    from spamlora import weights

    assert spamlora.load_gpt2 is weights.load_gpt2


def test_output_head_is_tied_to_token_embedding(tiny_gpt2):
    model = load_gpt2(tiny_gpt2)
    assert model.out_head.weight is model.tok_emb.weight


def test_dropout_is_configurable_and_off_by_default(tiny_gpt2):
    assert load_gpt2(tiny_gpt2).cfg.drop_rate == 0.0
    model = load_gpt2(tiny_gpt2, drop_rate=0.5).train()
    ids = torch.randint(0, 100, (2, 12))
    assert not torch.equal(model(ids), model(ids))  # dropout active in training
    model.eval()
    assert torch.equal(model(ids), model(ids))


def test_qkv_stored_together_is_read_without_a_copy_and_changes_nothing():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, context_length=16, emb_dim=32, n_layers=2, n_heads=4)
    model = GPTModel(cfg).eval().requires_grad_(False)
    idx = torch.randint(0, 50, (3, 10))
    before = model(idx)
    att = model.trf_blocks[0].att
    qkv = [att.W_query.weight, att.W_key.weight, att.W_value.weight]
    assert side_by_side(qkv).data_ptr() != qkv[0].data_ptr()  # separate tensors: a copy
    model.store_qkv_together()
    qkv = [att.W_query.weight, att.W_key.weight, att.W_value.weight]
    joint = side_by_side(qkv)
    assert joint.data_ptr() == qkv[0].data_ptr() and joint.shape == (96, 32)
    torch.testing.assert_close(joint, torch.cat(qkv), rtol=0, atol=0)
    torch.testing.assert_close(model(idx), before, rtol=0, atol=0)
    assert side_by_side(qkv[1:]).data_ptr() == qkv[1].data_ptr()
    # Not one after another, or trainable: concatenated as usual.
    torch.testing.assert_close(side_by_side([qkv[2], qkv[0]]), torch.cat([qkv[2], qkv[0]]))
    qkv[0].requires_grad_(True)
    assert side_by_side(qkv).data_ptr() != qkv[0].data_ptr()
    model.double()  # new storage for every parameter: still correct
    torch.testing.assert_close(model(idx).float(), before, rtol=1e-5, atol=1e-5)
