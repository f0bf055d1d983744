"""Multi-process training with PyTorch's own engine (torchrun + DistributedDataParallel).

The train stage relaunches itself under `torch.distributed.run` when `train.nproc > 1`;
each process then joins the group from torchrun's environment: NCCL on GPUs (one GPU a
process), gloo on CPU. Only rank 0 writes outputs and talks to MLflow.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(script: str, nproc: int) -> int:
    """Run `script` in `nproc` processes on this machine; their exit status."""
    return subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={nproc}", script])


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


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
