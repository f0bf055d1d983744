"""Stage train: the GPT-2 classifier (LoRA or `train.trainable`'s weights), every step and
epoch logged to one MLflow run.

With `train.nproc > 1` the stage reruns itself under torchrun (DistributedDataParallel);
only rank 0 writes outputs, checkpoints and talks to MLflow.

Checkpoints (`spamlora.checkpoint`) make an interrupted training a non-event: SIGINT or
SIGTERM stops it after the current step with a checkpoint and ends its run as KILLED;
rerunning the stage resumes the same run from the newest checkpoint of the same
computation and gives bit-identical outputs. Step losses reach MLflow at each checkpoint
(and the end), so none is ever logged twice.
"""

import contextlib
import dataclasses
import os
import signal

import mlflow
import pandas as pd
import torch

from spamlora import distributed, stage, tracking
from spamlora.adapter import AdapterSpec, save_adapter
from spamlora.batching import encode, resolve_max_length, truncate
from spamlora.checkpoint import Checkpoints, computation_key, read_owner, stored
from spamlora.classifier import build_classifier, format_summary, parameter_counts, random_base
from spamlora.config import Params
from spamlora.data import Classes, read_labelled_csv, write_csv
from spamlora.errors import SpamloraError
from spamlora.fileio import write_json
from spamlora.mlflow_model import BaseReference, log_model
from spamlora.paths import Paths
from spamlora.precision import resolve_device, resolve_precision, run_facts
from spamlora.predictor import Predictor
from spamlora.process import stop_signals
from spamlora.tokenizer import Tokenizer
from spamlora.train import Resumable, train_classifier
from spamlora.weights import CONFIG_FILE, WEIGHTS_FILE, base_fingerprint, load_gpt2, read_config


def main(params: Params) -> None:
    paths, tp = Paths(), params.train
    if tp.nproc > 1 and not distributed.under_torchrun():
        if status := distributed.relaunch(__file__, tp.nproc):  # Interrupted if stopped
            raise SpamloraError(f"training in {tp.nproc} processes failed (exit {status})")
        return
    device = resolve_device(tp.device)
    keyed_device = device  # the same in every process: init gives each its own GPU
    if distributed.under_torchrun():
        device = distributed.init(device)
    dtype = resolve_precision(tp.precision, device)
    main_process = distributed.is_main()
    checkpoints = Checkpoints(tracking.repo_root(),
                              checkpoint_key(params, paths, keyed_device, dtype))
    run_id = start_run(params, paths, checkpoints) if main_process else None
    stop = StopRequest()
    with tracking.active_run(run_id) if main_process else contextlib.nullcontext():
        tokenizer = Tokenizer(paths.base_model)
        random = params.model.weights == "random"
        if random:
            base, random_sha256 = random_base(read_config(paths.base_model), tp.seed)
        else:
            base, random_sha256 = load_gpt2(paths.base_model), None
        train_df = read_labelled_csv(paths.split("train"))
        val_df = read_labelled_csv(paths.split("validation"))
        train_ids, _ = encode(tokenizer, train_df["text"].tolist(), None)
        longest = max(map(len, train_ids))
        max_length = resolve_max_length(tp.max_length, longest, base.cfg.context_length)
        train_ids, cut = truncate(train_ids, max_length)
        val_ids, val_cut = encode(tokenizer, val_df["text"].tolist(), max_length)
        if tp.batch_size > len(train_ids) and main_process:
            print(f"warning: train.batch_size ({tp.batch_size}) is larger than the training "
                  f"split ({len(train_ids)} messages): every epoch is a single step")
        if (cut or val_cut) and main_process:
            print(f"warning: {len(cut)} training and {len(val_cut)} validation messages "
                  f"truncated to {max_length} tokens")

        lora, classes = params.lora, Classes.read(paths.classes)
        spec = AdapterSpec(params.model.name, base.cfg, lora.rank, lora.alpha, lora.dropout,
                           tuple(lora.targets), num_classes=len(classes.names),
                           classes=classes.names, positive=classes.positive,
                           max_length=max_length,
                           pad_id=tokenizer.pad_id, init=lora.init,
                           base_sha256=base_fingerprint(
                               paths.base_model, (CONFIG_FILE,) if random else
                               (CONFIG_FILE, WEIGHTS_FILE)),
                           trainable=tp.trainable, token=tp.token,
                           weights=params.model.weights,
                           base_seed=tp.seed if random else None,
                           random_sha256=random_sha256)
        model = build_classifier(base, spec, seed=tp.seed)
        counts = parameter_counts(model)
        if main_process:
            summary = format_summary(model, counts)
            print(summary)
            tracking.log_text(summary, "model_summary.txt")
            mlflow.log_params({
                "resolved.max_length": max_length, "resolved.device": str(device),
                "resolved.precision": str(dtype).removeprefix("torch."),
                **{f"parameters.{k}": v for k, v in counts.as_dict().items()}})

        steps = tracking.StepLog(run_id) if main_process else None
        history = train_classifier(
            model, train_ids, train_df["label"].to_numpy(), val_ids,
            val_df["label"].to_numpy(), tp, tokenizer.pad_id, max_length, device, dtype,
            resumable=Resumable(checkpoints, tp.checkpoint_seconds, run_id,
                                on_saved=steps.sync if steps else None,
                                should_stop=stop.requested))
        stop.restore()
        if main_process:
            with tracking.unanswered_is_resumable():  # the checkpoint is kept
                steps.sync(history, final=True)
                mlflow.log_metric("train_seconds", history.seconds)
                save_adapter(model, spec, paths.adapter)
                # MLflow's check of the input example scores it with this model, in
                # memory. One that reads no base weights (every weight trained, or a random
                # base) has none to reference: it carries the base's config and tokenizer.
                reads_base = spec.reads_base_weights
                log_model(paths.adapter, base_reference(params, paths) if reads_base else None,
                          Predictor.of_model(model, spec, tokenizer, device, dtype),
                          base_files=None if reads_base else paths.base_model)
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
                "examples_seen": last.examples_seen, "train_seconds": history.seconds,
                "parameters": counts.as_dict(),
                "run": run_facts(device, dtype), tracking.RUN_ID_KEY: run_id})
            checkpoints.remove()
    distributed.shutdown()


def base_reference(params: Params, paths: Paths) -> BaseReference:
    """The base the logged model references. A `--temp` or `--queue` experiment's own
    folder vanishes after it: the main workspace's copy is named instead (loading
    checks its content, and downloads the base if it differs)."""
    ref = BaseReference.of_folder(paths.base_model, params.model)
    main_copy = Paths(tracking.repo_root()).base_model
    if main_copy.is_dir():
        ref = dataclasses.replace(ref, trained_from=str(main_copy.resolve()))
    return ref


def checkpoint_key(params: Params, paths: Paths, device: torch.device,
                   dtype: torch.dtype) -> str:
    """What this training's result depends on, as dvc.yaml declares it: its params
    (less how often it checkpoints) and the content of its deps, code included; and the
    device and precision `train.device` / `train.precision` resolved to on this host
    (`device` as resolved before torchrun's processes take one GPU each). So a
    checkpoint made in bf16 is never resumed in fp32 or the other way round, and a
    resumed run is never asked to log `resolved.*` params other than its own (MLflow
    refuses to change a param).

    The params stay in the key as written: `auto` resolving to bf16 is the same
    computation as `bf16` pinned, but the run stores the params it was created with and
    evaluate continues a run only when they equal the current ones, so sharing the
    checkpoint would leave the DVC experiment's params and its MLflow run's disagreeing."""
    definition = tracking.stage_definition("train", paths)
    prefixes = tuple(definition["params"])
    flat = {k: v for k, v in params.flat().items()
            if k.startswith(prefixes) and k != "train.checkpoint_seconds"}
    flat["resolved.device"] = str(device)
    flat["resolved.precision"] = str(dtype).removeprefix("torch.")
    return computation_key(flat, {d: paths.root / d for d in definition["deps"]})


def start_run(params: Params, paths: Paths, checkpoints: Checkpoints) -> str:
    """The MLflow run to train in: the one the newest valid checkpoint of this
    computation names (resumed), else a new one. Runs whose process is gone are marked
    KILLED, with a note naming their checkpoint where one is kept: other computations'
    checkpoints are never removed here (`spamlora checkpoints prune` does that). First of
    all, `params` must be those DVC applied for this experiment (a concurrent
    `dvc exp run` may have replaced them)."""
    tracking.check_experiment_params(params.flat())
    checkpoints.check_writable()
    reasons = {}
    for entry in stored(checkpoints.root):
        if entry.owner is not None and entry.owner.run_id and not entry.running:
            reasons[entry.owner.run_id] = (
                f"process {entry.owner.pid} on {entry.owner.host} ended without closing "
                f"this run; its checkpoint ({entry.where()}) is kept in {entry.folder}: "
                f"the same params, data and code resume it, `spamlora checkpoints prune` "
                f"removes it")
    owner = read_owner(checkpoints.folder)
    if owner is not None and owner.alive() and owner.pid != os.getpid():
        raise SpamloraError(f"this training is running already (process {owner.pid} on "
                            f"{owner.host} holds {checkpoints.folder})")
    newest = checkpoints.newest()
    run_id = newest["run_id"] if newest else None
    if run_id and not tracking.run_exists(run_id):
        run_id = None  # e.g. the store was deleted: a new run gets the whole history
    tracking.end_stale_runs(keep={run_id} if run_id else set(), reasons=reasons)
    if run_id is None:
        run_id = tracking.create_run("train", params.flat(), params.model.name,
                                     tracking.run_inputs("train", params.data, paths))
    checkpoints.claim(run_id)
    return run_id


class StopRequest:
    """A stop signal during training (Ctrl-C, SIGTERM, SIGHUP, SIGBREAK): the first asks
    the loop to stop after its current step, with a checkpoint; a second stops at once."""

    def __init__(self):
        self.signals = 0
        self.previous = {s: signal.signal(s, self.handle) for s in stop_signals()}

    def handle(self, signum, frame):
        self.signals += 1
        if self.signals > 1:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        print(f"{signal.Signals(signum).name}: stopping after this step, with a checkpoint",
              flush=True)

    def requested(self) -> bool:
        return self.signals > 0

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    stage.run(main)
