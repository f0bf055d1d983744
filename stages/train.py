"""Stage train: GPT-2 + LoRA classifier, every step and epoch logged to one MLflow run.

With `train.nproc > 1` the stage reruns itself under torchrun (DistributedDataParallel);
only rank 0 writes outputs and talks to MLflow.
"""

import contextlib
import time

import mlflow
import pandas as pd

from spamlora import distributed, stage, tracking
from spamlora.adapter import AdapterSpec, save_adapter
from spamlora.batching import encode, truncate
from spamlora.classifier import build_classifier, format_summary, parameter_counts
from spamlora.config import Params
from spamlora.data import read_labelled_csv, write_csv
from spamlora.errors import SpamloraError
from spamlora.fileio import write_json
from spamlora.mlflow_model import BaseReference, log_model
from spamlora.paths import Paths
from spamlora.precision import resolve_device, resolve_precision, run_facts
from spamlora.tokenizer import Tokenizer
from spamlora.train import train_classifier
from spamlora.weights import base_fingerprint, load_gpt2


def main(params: Params) -> None:
    paths, tp = Paths(), params.train
    if tp.nproc > 1 and not distributed.under_torchrun():
        if status := distributed.relaunch(__file__, tp.nproc):
            raise SpamloraError(f"training in {tp.nproc} processes failed (exit {status})")
        return
    device = resolve_device(tp.device)
    if distributed.under_torchrun():
        device = distributed.init(device)
    main_process = distributed.is_main()
    run_id = tracking.create_run("train", params.flat(), params.model.name,
                                 tracking.run_inputs("train", params.data, paths)) \
        if main_process else None
    with tracking.active_run(run_id) if main_process else contextlib.nullcontext():
        dtype = resolve_precision(tp.precision, device)
        tokenizer = Tokenizer(paths.base_model)
        base = load_gpt2(paths.base_model)
        train_df = read_labelled_csv(paths.split("train"))
        val_df = read_labelled_csv(paths.split("validation"))
        train_ids, _ = encode(tokenizer, train_df["text"].tolist(), None)
        longest = max(map(len, train_ids))
        max_length = min(tp.max_length or longest, base.cfg.context_length)
        train_ids, cut = truncate(train_ids, max_length)
        val_ids, val_cut = encode(tokenizer, val_df["text"].tolist(), max_length)
        if (cut or val_cut) and main_process:
            print(f"warning: {len(cut)} training and {len(val_cut)} validation messages "
                  f"truncated to {max_length} tokens")

        lora = params.lora
        spec = AdapterSpec(params.model.name, base.cfg, lora.rank, lora.alpha, lora.dropout,
                           tuple(lora.targets), num_classes=2, max_length=max_length,
                           pad_id=tokenizer.pad_id, init=lora.init,
                           base_sha256=base_fingerprint(paths.base_model))
        model = build_classifier(base, spec, seed=tp.seed)
        counts = parameter_counts(model)
        if main_process:
            summary = format_summary(model, counts)
            print(summary)
            mlflow.log_text(summary, "model_summary.txt")
            mlflow.log_params({
                "resolved.max_length": max_length, "resolved.device": str(device),
                "resolved.precision": str(dtype).removeprefix("torch."),
                **{f"parameters.{k}": v for k, v in counts.as_dict().items()}})

        def on_step(step, loss):
            mlflow.log_metric("step_loss", loss, step=step, synchronous=False)

        def on_epoch(record):
            mlflow.log_metrics({k: v for k, v in vars(record).items() if k != "epoch"},
                               step=record.epoch)

        start = time.perf_counter()
        history = train_classifier(
            model, train_ids, train_df["label"].to_numpy(), val_ids,
            val_df["label"].to_numpy(), tp, tokenizer.pad_id, max_length, device, dtype,
            on_step=on_step if main_process else None,
            on_epoch=on_epoch if main_process else None)
        if main_process:
            mlflow.log_metric("train_seconds", time.perf_counter() - start)
            save_adapter(model, spec, paths.adapter)
            log_model(paths.adapter, BaseReference.of_folder(paths.base_model, params.model))
            write_csv(pd.DataFrame([vars(r) for r in history.epochs]),
                      paths.plot_data("history"))
            write_csv(pd.DataFrame({
                "step": range(1, len(history.step_losses) + 1), "epoch": history.step_epochs,
                "examples_seen": history.step_examples, "loss": history.step_losses}),
                paths.plot_data("steps"))
            last = history.epochs[-1]
            write_json(paths.metrics("train"), {
                "train_loss": last.train_loss, "train_accuracy": last.train_accuracy,
                "val_loss": last.val_loss, "val_accuracy": last.val_accuracy,
                "examples_seen": last.examples_seen, "parameters": counts.as_dict(),
                "run": run_facts(device, dtype), tracking.RUN_ID_KEY: run_id})
    distributed.shutdown()


if __name__ == "__main__":
    stage.run(main)
