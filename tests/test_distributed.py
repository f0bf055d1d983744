"""Training in two processes (torchrun, gloo, loopback) matches one process."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO

pytestmark = pytest.mark.e2e


def run(args, tmp_path):
    # This checkout's code, whichever checkout the installed package points at.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# `last_block` on the two-block model: each process keeps the frozen block's output.
@pytest.mark.parametrize("mode", [("lora", "last"), ("last_two_blocks", "mean"),
                                  ("all", "first"), ("lora", "last", "random"),
                                  ("last_block", "last")])
def test_two_gloo_processes_match_one(tmp_path, tiny_gpt2, mode):
    worker = str(REPO / "tests" / "ddp_worker.py")
    run([worker, str(tiny_gpt2), str(tmp_path / "one"), "cpu", *mode], tmp_path)
    run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
         str(tiny_gpt2), str(tmp_path / "two"), "cpu", *mode], tmp_path)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert (one["world"], two["world"]) == (1, 2)
    assert len(one["step_losses"]) == len(two["step_losses"]) == 2 * 8  # ceil(57 / 8) = 8
    # Same batches, split across processes: equal up to float summation order.
    torch.testing.assert_close(torch.tensor(two["step_losses"]),
                               torch.tensor(one["step_losses"]), atol=1e-4, rtol=0)
    for a, b in zip(one["epochs"], two["epochs"], strict=True):
        assert a["examples_seen"] == b["examples_seen"]
        assert a["train_accuracy"] == b["train_accuracy"]
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4
    tensors_one = load_file(tmp_path / "one.safetensors")
    tensors_two = load_file(tmp_path / "two.safetensors")
    assert set(tensors_one) == set(tensors_two)
    for name in tensors_one:
        # A key bias adds the same q.b to every score of a query's row, which softmax
        # ignores: its gradient is zero in exact arithmetic, so it is float noise that
        # Adam scales up to full steps, differently for each summation order.
        if name.endswith("W_key.bias"):
            continue
        torch.testing.assert_close(tensors_two[name], tensors_one[name], atol=1e-4, rtol=0)


def test_process_group_backend_covers_cpu_tensors_on_gpus():
    from spamlora.distributed import backend

    # all_sum reduces CPU tensors: NCCL alone would fail on the first step.
    assert backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert backend(torch.device("cpu")) == "gloo"
