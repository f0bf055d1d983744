"""The CUDA paths, for the day a GPU is lent: one short script, one JSON report.

    python benchmarks/gpu_check.py            # on a machine with 1+ CUDA GPUs

Trains the tiny test model and GPT-2 124M (random weights; the cost and the numerics are
those of pretrained ones) for a few steps of packed random batches:
- on CPU in fp32 (the reference), on CUDA in fp32 and in bf16 autocast, one process;
- on CUDA with two processes (torchrun, NCCL for gradients, gloo for the loss sums),
  when two GPUs are there, else two processes sharing GPU 0 (NCCL refuses that: the
  report says so).
It prints the per-step losses' largest difference to the CPU run and the seconds a step
takes. Then it scores 72 messages with LoRA merged on CUDA, each alone and in batches of
64, in fp32 and bf16: how far a message's logits move with its batch-mates, and bf16's
distance from the CPU's fp32 result (benchmarks/bf16_batch_mates.py does this on CPU).
Nothing here is a test: the suite runs on CPU machines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEPS = 20


def train(folder: str, device_name: str, precision: str, out: str) -> None:
    """One training of STEPS steps; rank 0 writes {losses, seconds_per_step} to `out`."""
    import numpy as np
    import torch

    from spamlora import distributed
    from spamlora.adapter import AdapterSpec
    from spamlora.classifier import build_classifier
    from spamlora.config import TrainParams
    from spamlora.train import train_classifier
    from spamlora.weights import load_gpt2

    device = torch.device(device_name)
    if distributed.under_torchrun():
        device = distributed.init(device)
    base = load_gpt2(folder)
    spec = AdapterSpec("check", base.cfg, rank=8, alpha=8, max_length=128, pad_id=0)
    model = build_classifier(base, spec, seed=123)
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=STEPS * 8)
    ids = [rng.integers(1, base.cfg.vocab_size, size=n).tolist() for n in lengths]
    labels = (lengths > 40).astype(int)  # length predicts the label, as in the SMS data
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    times = []
    params = TrainParams(epochs=1, batch_size=8, lr=8e-4, weight_decay=0.1, seed=123)
    start = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter())

    history = train_classifier(model, ids, labels, ids[:16], labels[:16], params, 0, 128,
                               device, dtype, on_step=on_step)
    if distributed.is_main():
        steady = np.diff(times[2:]) if len(times) > 3 else [times[-1] - start]
        Path(out).write_text(json.dumps({"losses": history.step_losses,
                                         "seconds_per_step": float(np.median(steady))}),
                             encoding="utf-8", newline="\n")
    distributed.shutdown()


def score(folder: str, out: str) -> None:
    """Writes {case: {batch_mates_max, vs_cpu_fp32_max, logit_scale}} for CUDA fp32 and bf16."""
    import copy

    import numpy as np
    import torch

    from spamlora.adapter import AdapterSpec
    from spamlora.classifier import build_classifier
    from spamlora.inference import merged_for_inference, predict_logits
    from spamlora.lora import LinearWithLoRA
    from spamlora.weights import load_gpt2

    base = load_gpt2(folder)
    spec = AdapterSpec("check", base.cfg, rank=8, alpha=8, max_length=256, pad_id=0)
    model = build_classifier(base, spec, seed=123)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearWithLoRA):
                m.lora.B.normal_(std=0.02)
    rng = np.random.default_rng(0)
    lengths = [*rng.integers(1, 120, size=70), 256, 1]
    ids = [rng.integers(1, base.cfg.vocab_size, size=n).tolist() for n in lengths]
    cpu = torch.device("cpu")
    reference = predict_logits(merged_for_inference(copy.deepcopy(model)), ids, 0, 64, cpu)
    report = {"logit_scale": float(np.abs(reference).max())}
    cuda = torch.device("cuda")
    for name, dtype in (("cuda-fp32", torch.float32), ("cuda-bf16", torch.bfloat16)):
        merged = merged_for_inference(copy.deepcopy(model).to(cuda), dtype)
        together = predict_logits(merged, ids, 0, 64, cuda, dtype)
        alone = np.concatenate([predict_logits(merged, [t], 0, 64, cuda, dtype)
                                for t in ids])
        report[name] = {"batch_mates_max": float(np.abs(alone - together).max()),
                        "vs_cpu_fp32_max": float(np.abs(together - reference).max())}
    Path(out).write_text(json.dumps(report), encoding="utf-8", newline="\n")


def run(args: list[str], nproc: int = 1, mode: str = "--train") -> dict:
    out = tempfile.mktemp(suffix=".json")
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launcher, __file__, mode, *args, out], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    # torchrun's own traceback ends the output; the failing rank's error comes before it.
    errors = [line for line in proc.stderr.splitlines()
              if "Error" in line and "ChildFailedError" not in line]
    result = ({"error": errors[:3] or proc.stderr[-1500:]} if proc.returncode != 0
              else json.loads(Path(out).read_text()))
    print(mode, args[1:], nproc, json.dumps(result)[:300], file=sys.stderr, flush=True)
    return result


def main() -> None:
    import torch
    import transformers

    if not torch.cuda.is_available():
        sys.exit("no CUDA device here")
    report = {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
              "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for size, dims in (("tiny", dict(n_embd=64, n_layer=2, n_head=2)),
                           ("gpt2", dict(n_embd=768, n_layer=12, n_head=12))):
            folder = Path(tmp) / size
            torch.manual_seed(0)
            transformers.GPT2LMHeadModel(transformers.GPT2Config(**dims)).save_pretrained(
                folder)
            cases = {"cpu-fp32": run([str(folder), "cpu", "fp32"]),
                     "cuda-fp32": run([str(folder), "cuda", "fp32"]),
                     "cuda-bf16": run([str(folder), "cuda", "bf16"]),
                     "cuda-fp32-2proc": run([str(folder), "cuda", "fp32"], nproc=2)}
            reference = cases["cpu-fp32"].get("losses")
            for case in cases.values():
                if reference and "losses" in case:
                    case["max_abs_loss_diff_vs_cpu"] = max(
                        abs(a - b) for a, b in zip(case["losses"], reference, strict=True))
                    del case["losses"]
            cases["inference"] = run([str(folder)], mode="--score")
            report[size] = cases
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--train"]:
        train(*sys.argv[2:])
    elif sys.argv[1:2] == ["--score"]:
        score(*sys.argv[2:])
    else:
        main()
