"""Fine-tune the classifier, in any `train.trainable` mode: one loop for all.

Recipe (defaults in params.yaml): AdamW over the trainable parameters only (by default
LoRA A, B and the head), as in the LoRA appendix of LLMs-from-scratch; cross-entropy on
the logits the model reads at `train.token` (by default each message's last real token).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import batching, distributed, frozen
from .checkpoint import Checkpoints, LoopState, generator_states
from .config import TrainParams
from .errors import Interrupted
from .inference import predict_logits
from .model import GPTModel
from .packed import packed_for_training
from .precision import attention_kernels, autocast, cast_frozen_linears

# Validation is inference: larger batches cost nothing in accuracy.
EVAL_BATCH_SIZE = 64
# Where PyTorch has a fused AdamW (elsewhere the per-tensor loop: the same update).
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps")


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    examples_seen: int


# Off a terminal (dvc queue logs, CI, a redirected run) the progress bar is off: a line
# this often instead, so a long epoch is not silence.
PROGRESS_SECONDS = 30.0


class Progress:
    """Every PROGRESS_SECONDS a line with where training stands, its running loss and
    its speed; nothing when `enabled` is false (a terminal has the bar)."""

    def __init__(self, enabled: bool, seen: int):
        self.enabled = enabled
        self.last, self.last_seen = time.monotonic(), seen

    def step(self, where: str, loss: float, seen: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < PROGRESS_SECONDS:
            return
        rate = (seen - self.last_seen) / max(now - self.last, 1e-9)
        print(f"{where}: loss {loss:.4f}, {rate:.1f} examples/s", flush=True)
        self.last, self.last_seen = now, seen


@dataclass
class History:
    epochs: list[EpochRecord] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    step_epochs: list[int] = field(default_factory=list)  # the epoch of each step
    step_examples: list[int] = field(default_factory=list)  # examples seen after it
    # The loop's wall time, summed over every process that resumed it: a training
    # stopped and resumed reports what it cost, not its last part's. Its validation
    # passes are counted, as the book's timings count theirs. Not compared: the same
    # training is the same history however long it took.
    seconds: float = field(default=0.0, compare=False)

    @classmethod
    def from_dict(cls, d: dict) -> History:
        return cls([EpochRecord(**e) for e in d["epochs"]], d["step_losses"],
                   d["step_epochs"], d["step_examples"],
                   d.get("seconds", 0.0))  # checkpoints written before it counted


@dataclass
class Resumable:
    """How a training checkpoints: where, how often, for which MLflow run; what it
    calls after each checkpoint (`on_saved(history)`, e.g. to log what it holds); and
    `should_stop()`, polled after every step (a signal asked the training to stop)."""
    checkpoints: Checkpoints
    seconds: float
    run_id: str | None = None
    on_saved: Callable[[History], None] | None = None
    should_stop: Callable[[], bool] = lambda: False


def loss_and_accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    logits_t = torch.from_numpy(logits)
    labels_t = torch.tensor(np.array(labels, dtype=np.int64))
    loss = F.cross_entropy(logits_t, labels_t).item()
    return loss, float((logits.argmax(1) == labels).mean())


def train_classifier(
    model: GPTModel,
    train_ids: list[list[int]],
    train_labels: np.ndarray,
    val_ids: list[list[int]],
    val_labels: np.ndarray,
    params: TrainParams,
    pad_id: int,
    max_length: int,
    device: torch.device,
    dtype: torch.dtype,
    on_step: Callable[[int, float], None] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    resumable: Resumable | None = None,
    cache_frozen: bool = True,
) -> History:
    """Train in place; `on_step(step, loss)` and `on_epoch(record)` report progress.

    Under torchrun every process draws the same batches and takes its share of each
    (rows rank, rank + world, ...); losses are summed and divided by the whole batch's
    size, so the averaged gradient is that of the whole batch, as with one process.

    With `resumable`, the newest valid checkpoint is restored first and the loop
    continues from it exactly (same batches, generator states and sums); a checkpoint
    is written at the end of every epoch and every `resumable.seconds` (rank 0), and
    when `should_stop()` turns true in any process, all stop after that step, with a
    checkpoint, raising `Interrupted`.

    Where the embeddings and the first blocks are frozen (`frozen.frozen_blocks`), the
    hidden states entering the first trained block are computed once for each message
    of both splits and steps run the blocks after them only; `cache_frozen=False`
    computes every step in full (the reference the cached steps are tested against).

    Where oneDNN can (bf16 on a CPU with AVX-512 or AMX), frozen Linears compute from
    pre-packed copies of their weights while training runs, validation and the cache
    included (`packed.packed_for_training`), and are the model's own Linears again after."""
    torch.manual_seed(params.seed)  # LoRA dropout draws from the global generator
    generator = torch.Generator().manual_seed(params.seed)
    cast_frozen_linears(model.to(device), dtype).store_qkv_together()
    # ~7% faster epochs of GPT-2 124M on an AMX Xeon, for ~0.2 GB more peak RSS
    # (benchmarks/README.md)
    with packed_for_training(model):
        rank, world = distributed.rank_and_world()
        net = model
        if world > 1:
            net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                          else None)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # fused: one kernel for all the tensors, where the per-tensor loop ran ~10 small ops
        # on each of LoRA's ~150 (8.9 -> 3.2 ms a step on GPT-2 124M, benchmarks/README.md)
        optimizer = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay,
                                      fused=device.type in FUSED_ADAMW_DEVICES)
        labels_all = torch.tensor(np.array(train_labels), dtype=torch.long)
        lengths = [len(t) for t in train_ids]
        pad_to = max_length if params.padding == "max_length" else None
        context = model.cfg.context_length
        row_multiple = batching.packed_row_multiple(device, dtype)
        state = LoopState(epoch=1, batch=0, step=0, seen=0, loss_sum=0.0, correct=0.0, count=0,
                          history=asdict(History()))
        if resumable:
            restored = resumable.checkpoints.restore(model, optimizer, generator, rank)
            if restored is not None:
                state = restored
                if rank == 0:
                    print(f"resuming from {state.where}")
        history = History.from_dict(state.history)
        # Built after any restore, from weights no checkpoint holds: a resumed training
        # rebuilds the very values an uninterrupted one computed.
        caches = frozen.prefix_caches(model, train_ids, val_ids, pad_id, EVAL_BATCH_SIZE,
                                      device, dtype) if cache_frozen else None
        train_cache, val_cache = caches or (None, None)
        if caches and rank == 0:
            print(f"the embeddings and first {train_cache.block} blocks are frozen: their "
                  f"output is computed once ({(train_cache.nbytes + val_cache.nbytes) / 2**20:.1f}"
                  f" MB kept)", flush=True)
        step, seen, last_save = state.step, state.seen, time.monotonic()
        began, seconds_before = time.perf_counter(), history.seconds

        def clock() -> None:
            history.seconds = seconds_before + time.perf_counter() - began

        def save(epoch: int, batch: int, order_state: torch.Tensor, sums: tuple) -> None:
            """Every process calls it at the same step: each one's generators are gathered
            for rank 0 to write."""
            nonlocal last_save
            last_save = time.monotonic()
            if resumable is None:
                return
            rng_states = distributed.gather_states(generator_states())
            if rank != 0:
                return
            clock()
            loop = LoopState(epoch, batch, step, seen, *sums, history=asdict(history))
            if resumable.checkpoints.save(model, optimizer, order_state, loop,
                                          resumable.run_id, rng_states) and resumable.on_saved:
                resumable.on_saved(history)

        for epoch in range(state.epoch, params.epochs + 1):
            model.train()
            order_state = generator.get_state()
            order = batching.training_order(lengths, params.batch_size, generator,
                                            params.group_by_length)
            skip = state.batch if epoch == state.epoch else 0
            loss_sum, correct, count = ((state.loss_sum, state.correct, state.count) if skip
                                        else (0.0, 0.0, 0))
            bar = tqdm(order[skip:], desc=f"epoch {epoch}/{params.epochs}", initial=skip,
                       total=len(order), disable=None if rank == 0 else True)
            progress = Progress(rank == 0 and bar.disable, seen)
            for batch_number, index in enumerate(bar, start=skip + 1):
                # A process whose share is empty (a last batch smaller than the world) still
                # runs a zero-weighted example: DDP needs every process in every step.
                share = index[rank::world]
                weight = 1.0 if share else 0.0
                rows = share or index[:1]
                if params.padding == "packed":
                    batch = batching.pack(train_ids, rows, pad_id, context, row_multiple)
                else:
                    batch = batching.collate(train_ids, rows, pad_id, pad_to,
                                             batching.PAD_MULTIPLE, max_length)
                batch = (batch if train_cache is None else train_cache.feed(batch)).to(device)
                labels = labels_all[batch.index].to(device)
                with autocast(device, dtype), attention_kernels(device, training=True):
                    logits = batch.logits(net)
                local_sum = F.cross_entropy(logits.float(), labels, reduction="sum") * weight
                optimizer.zero_grad(set_to_none=True)
                (local_sum * world / len(index)).backward()  # DDP averages over processes
                optimizer.step()
                stop = resumable is not None and resumable.should_stop()
                due = resumable is not None and time.monotonic() - last_save >= resumable.seconds
                # Agreed by all processes, as saving gathers from each.
                batch_loss_sum, batch_correct, stops, dues = distributed.all_sum(
                    [local_sum.item(), (logits.argmax(1) == labels).sum().item() * weight,
                     float(stop), float(due)])
                step += 1
                seen += len(index)
                loss_sum += batch_loss_sum
                correct += batch_correct
                count += len(index)
                history.step_losses.append(batch_loss_sum / len(index))
                history.step_epochs.append(epoch)
                history.step_examples.append(seen)
                bar.set_postfix(loss=f"{loss_sum / count:.4f}")
                progress.step(f"epoch {epoch}/{params.epochs}, step {batch_number}/{len(order)}",
                              loss_sum / count, seen)
                if on_step:
                    on_step(step, batch_loss_sum / len(index))
                if stops:
                    save(epoch, batch_number, order_state, (loss_sum, correct, count))
                    raise Interrupted(f"training stopped at {epoch=}, {step=}; rerun to resume")
                if dues:
                    save(epoch, batch_number, order_state, (loss_sum, correct, count))
            val_logits = predict_logits(model, val_ids, pad_id, EVAL_BATCH_SIZE, device, dtype,
                                        val_cache)
            val_loss, val_acc = loss_and_accuracy(val_logits, np.asarray(val_labels))
            record = EpochRecord(epoch, loss_sum / count, correct / count, val_loss, val_acc, seen)
            history.epochs.append(record)
            if rank == 0:
                print(f"epoch {epoch}/{params.epochs}: train loss {record.train_loss:.4f}, "
                      f"accuracy {record.train_accuracy:.4f}; validation loss {val_loss:.4f}, "
                      f"accuracy {val_acc:.4f}", flush=True)
            if on_epoch:
                on_epoch(record)
            # Also after the last: stopped while writing its outputs, the stage resumes here.
            save(epoch + 1, 0, generator.get_state(), (0.0, 0.0, 0))
        clock()
        return history
