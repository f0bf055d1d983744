"""Trains the tiny test classifier in this process, or in each process under torchrun,
and (rank 0) writes the history and the trained tensors: used by test_distributed.py."""

import json
import sys

import torch
from safetensors.torch import save_file

from spamlora import distributed
from spamlora.adapter import AdapterSpec, trainable_state
from spamlora.classifier import build_classifier, random_base
from spamlora.config import TrainParams
from spamlora.tokenizer import Tokenizer
from spamlora.train import train_classifier
from spamlora.weights import load_gpt2, read_config
from tests.test_train import separable_task


def main(folder: str, out: str, device_name: str = "cpu", trainable: str = "lora",
         token: str = "last", weights: str = "pretrained") -> None:
    device = torch.device(device_name)
    if distributed.under_torchrun():
        device = distributed.init(device)
    tokenizer = Tokenizer(folder)
    if weights == "random":  # each process rebuilds the same base from the seed
        base, digest = random_base(read_config(folder), 3)
        random = {"weights": "random", "base_seed": 3, "random_sha256": digest}
    else:
        base, random = load_gpt2(folder), {}
    spec = AdapterSpec("tiny", base.cfg, rank=4, alpha=8, max_length=64,
                       pad_id=tokenizer.pad_id, trainable=trainable, token=token, **random)
    model = build_classifier(base, spec, seed=3)
    train_ids, train_labels, val_ids, val_labels = separable_task(tokenizer)
    # 57 examples in batches of 8: the last batch holds one, so under two processes one
    # of them has an empty share of it (and still takes part in the step).
    train_ids, train_labels = train_ids[:57], train_labels[:57]
    params = TrainParams(epochs=2, batch_size=8, lr=5e-3, weight_decay=0.0, seed=3,
                         trainable=trainable, token=token)
    history = train_classifier(model, train_ids, train_labels, val_ids, val_labels, params,
                               tokenizer.pad_id, 64, device, torch.float32)
    if distributed.is_main():
        save_file(trainable_state(model), out + ".safetensors")
        with open(out + ".json", "w") as f:
            json.dump({"world": distributed.rank_and_world()[1],
                       "step_losses": history.step_losses,
                       "epochs": [vars(r) for r in history.epochs]}, f)
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
