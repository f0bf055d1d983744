"""Multi-process training with PyTorch's own engine (torchrun + DistributedDataParallel).

The train stage relaunches itself under `torch.distributed.run` when `train.nproc > 1`;
each process then joins the group from torchrun's environment: NCCL on GPUs (one GPU a
process), gloo on CPU. Only rank 0 writes outputs and talks to MLflow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from .errors import Interrupted
from .process import pid_alive, start_time, stop_signals


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(script: str, nproc: int) -> int:
    """Run `script` in `nproc` processes on this machine; their exit status.

    torchrun and its workers get a process group of their own, and a stop signal to
    this process (`process.stop_signals`) is passed on to the whole group, so stopping
    the stage stops them all (they would otherwise keep training, orphaned, holding
    memory and cores); then this raises `Interrupted` (the stage exits 130, as a
    single-process one does) once they have saved and ended. On Windows the group is a
    console process group, reached with CTRL_BREAK_EVENT."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", script]
    env = {**os.environ, STAGE_PID: str(os.getpid()),
           STAGE_STARTED: start_time(os.getpid()) or ""}
    if os.name == "posix":
        proc = subprocess.Popen(command, start_new_session=True, env=env)
    else:
        proc = subprocess.Popen(command, creationflags=subprocess.CREATE_NEW_PROCESS_GROUP,
                                env=env)

    stopped = []

    def forward(signum, frame):
        stopped.append(signal.Signals(signum).name)
        if proc.poll() is not None:
            return
        if os.name == "posix":
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signal.CTRL_BREAK_EVENT)

    previous = {signum: signal.signal(signum, forward) for signum in stop_signals()}
    try:
        status = proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stopped:
        raise Interrupted(f"training in {nproc} processes stopped by {stopped[0]} (exit "
                          f"{status}); rerun to resume from its checkpoint")
    return status


# The stage process a worker belongs to (set by `relaunch`), which `watch_stage` follows.
STAGE_PID, STAGE_STARTED = "SPAMLORA_STAGE_PID", "SPAMLORA_STAGE_STARTED"
WATCH_SECONDS = 1.0


def watch_stage() -> threading.Thread | None:
    """In a worker: once the stage that launched torchrun is gone (SIGKILL, a crash; no
    signal was passed on), stop this worker as a passed-on SIGTERM would: a checkpoint,
    the run ended KILLED, exit. Otherwise workers train on, orphaned, writing outputs DVC
    never records and blocking the rerun with "running already"."""
    pid = os.environ.get(STAGE_PID, "")
    if not pid.isdigit():
        return None
    started = os.environ.get(STAGE_STARTED) or None

    def watch() -> None:
        while pid_alive(int(pid), started):
            time.sleep(WATCH_SECONDS)
        print(f"the stage (process {pid}) is gone: stopping", file=sys.stderr, flush=True)
        signal.raise_signal(signal.SIGTERM)

    thread = threading.Thread(target=watch, name="watch-stage", daemon=True)
    thread.start()
    return thread


def backend(device: torch.device) -> str:
    """NCCL for CUDA tensors (gradients) and gloo for CPU ones (the step's loss and
    accuracy sums, `all_sum`): NCCL alone has no backend for CPU tensors."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun describes; this process's device."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend(device))
    watch_stage()
    return device


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over all processes (the values themselves with one)."""
    if rank_and_world()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_states(states: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Every process's `states` (the same names and shapes in each), in rank order, in
    every process; a collective call: all processes make it together."""
    world = rank_and_world()[1]
    if world == 1:
        return [states]
    gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]
    for name in sorted(states):
        mine = states[name].cpu().contiguous()
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        for rank, part in enumerate(parts):
            gathered[rank][name] = part
    return gathered


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
