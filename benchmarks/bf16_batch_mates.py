"""How much a message's bf16 score moves with its batch-mates, on this CPU.

    python benchmarks/bf16_batch_mates.py [--model gpt2|tiny] [--messages N] [--out FILE]

Scores N real SMS messages (../shared/data, tokenized with GPT-2's BPE; generated token
ids where it is absent) with LoRA merged, each alone and in the evaluate stage's batches
of 64, in bf16 and in fp32, on a random GPT-2 with random LoRA B (pretrained weights are
not reachable here; the kernels and shapes are those of the real model). Prints and
writes, per message, the largest difference of its two logits between alone and
batched, next to bf16's own error against fp32, as quantiles.

Why they differ at all: oneDNN and the CPU attention kernel choose their blocking, and
so the order of their bf16 sums, from the number of rows and the sequence length of a
call (measured: a 768 x 2304 bf16 GEMM of one row and of 300 rows differ by one bf16
step in some outputs; attention of a 44-token message alone and padded to 256 among 63
others too). Run it under `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` or `=AVX2` to see the
kernels of other CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from spamlora.adapter import AdapterSpec  # noqa: E402
from spamlora.classifier import build_classifier  # noqa: E402
from spamlora.inference import merged_for_inference, predict_logits  # noqa: E402
from spamlora.lora import LinearWithLoRA  # noqa: E402
from spamlora.model import GPTConfig, GPTModel  # noqa: E402
from spamlora.packed import can_pack_bf16  # noqa: E402
from tests.conftest import BPE_DIR, SMS_FILE  # noqa: E402

QUANTILES = (0.5, 0.9, 0.99, 1.0)


def messages(n: int, vocab: int) -> list[list[int]]:
    if SMS_FILE.is_file() and (BPE_DIR / "encoder.json").is_file():
        from spamlora.tokenizer import Tokenizer
        from tests.conftest import write_tokenizer_files

        folder = Path(tempfile.mkdtemp())
        write_tokenizer_files(folder)
        tokenizer = Tokenizer(folder)
        lines = SMS_FILE.read_text(encoding="utf-8").splitlines()[:n]
        return [ids[:256] for ids in tokenizer.encode_batch([ln.split("\t", 1)[1]
                                                             for ln in lines])]
    rng = np.random.default_rng(0)
    return [rng.integers(1, vocab, size=k).tolist() for k in rng.integers(5, 120, size=n)]


def measure(model_name: str, n: int) -> dict:
    cfg = (GPTConfig.preset("gpt2", context_length=256) if model_name == "gpt2" else
           GPTConfig(context_length=256, emb_dim=32, n_layers=2, n_heads=2))
    torch.manual_seed(0)
    base = GPTModel(cfg)
    spec = AdapterSpec(model_name, cfg, rank=8, alpha=8, max_length=256, pad_id=0)
    model = build_classifier(base, spec, seed=123)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearWithLoRA):
                m.lora.B.normal_(std=0.02)
    ids = messages(n, cfg.vocab_size)
    cpu = torch.device("cpu")
    scores = {}
    for dtype in (torch.float32, torch.bfloat16):
        merged = merged_for_inference(model, dtype)
        together = predict_logits(merged, ids, 0, 64, cpu, dtype)
        alone = np.concatenate([predict_logits(merged, [t], 0, 64, cpu, dtype) for t in ids])
        scores[dtype] = together, alone
    fp32 = scores[torch.float32][0]
    bf16_together, bf16_alone = scores[torch.bfloat16]

    def quantiles(values: np.ndarray) -> dict:
        return {f"q{q:g}": float(np.quantile(values, q)) for q in QUANTILES}

    def p_spam(logits: np.ndarray) -> np.ndarray:
        z = np.exp(logits - logits.max(1, keepdims=True))
        return z[:, 1] / z.sum(1)

    return {
        "model": model_name, "messages": len(ids), "packed_bf16": can_pack_bf16(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "(not set)"),
        "logit_scale_max_abs": float(np.abs(fp32).max()),
        "fp32_batch_mates_max": float(np.abs(scores[torch.float32][0]
                                             - scores[torch.float32][1]).max()),
        "bf16_batch_mates": quantiles(np.abs(bf16_alone - bf16_together).max(1)),
        "bf16_vs_fp32": quantiles(np.abs(bf16_together - fp32).max(1)),
        "bf16_batch_mates_p_spam": quantiles(np.abs(p_spam(bf16_alone)
                                                    - p_spam(bf16_together))),
        "messages_moving": int((np.abs(bf16_alone - bf16_together).max(1) > 0).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["gpt2", "tiny"], default="gpt2")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = measure(args.model, args.messages)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8", newline="\n")


if __name__ == "__main__":
    main()
