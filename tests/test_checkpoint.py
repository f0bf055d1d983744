"""Checkpoint files: atomic, verified, the newest two kept, keyed by what they depend on."""

import errno
import logging

import pytest
import torch

from spamlora import checkpoint
from spamlora.checkpoint import CheckpointError, Checkpoints, LoopState, computation_key


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def state(step):
    return LoopState(epoch=1, batch=step, step=step, seen=8 * step, loss_sum=0.5 * step,
                     correct=3.0, count=8 * step, history={"epochs": [], "step_losses": []})


def test_restore_gives_back_weights_optimizer_and_generators(tmp_path):
    model, optimizer = model_and_optimizer()
    order = torch.Generator().manual_seed(7)
    order_state = order.get_state()
    torch.manual_seed(11)
    ckpt = Checkpoints(tmp_path, "key")
    assert ckpt.save(model, optimizer, order_state, state(3), "run-1")
    expected_draw = torch.rand(3)

    other, other_opt = model_and_optimizer(seed=1)
    fresh = torch.Generator()
    restored = ckpt.restore(other, other_opt, fresh)
    assert restored == state(3)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b) or not a.requires_grad
    assert torch.equal(fresh.get_state(), order_state)
    assert torch.equal(torch.rand(3), expected_draw)  # the global generator too
    saved, loaded = optimizer.state_dict(), other_opt.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for i, entry in saved["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(loaded["state"][i][name]))
    assert ckpt.newest()["run_id"] == "run-1"


def test_the_newest_two_are_kept_and_a_damaged_one_is_skipped(tmp_path, caplog):
    model, optimizer = model_and_optimizer()
    ckpt = Checkpoints(tmp_path, "key")
    for step in (1, 2, 3):
        ckpt.save(model, optimizer, torch.Generator().get_state(), state(step), None)
    files = sorted(p.name for p in ckpt.folder.glob("step-*.safetensors"))
    assert [int(f.split("-")[1]) for f in files] == [2, 3]
    newest = ckpt.folder / files[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # cut short
    with caplog.at_level(logging.WARNING):
        assert ckpt.restore(*model_and_optimizer(), torch.Generator()).step == 2
    assert f"checkpoint {newest} skipped" in caplog.text
    (ckpt.folder / files[0]).with_suffix(".sha256").unlink()  # a write cut before this
    assert ckpt.restore(*model_and_optimizer(), torch.Generator()) is None


def test_a_failed_write_is_a_warning_and_leaves_no_file(tmp_path, monkeypatch, caplog):
    model, optimizer = model_and_optimizer()
    ckpt = Checkpoints(tmp_path, "key")
    ckpt.check_writable()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with caplog.at_level(logging.WARNING):
        assert not ckpt.save(model, optimizer, torch.Generator().get_state(), state(1), None)
    assert "No space left on device" in caplog.text and "training goes on" in caplog.text
    assert not any(ckpt.folder.iterdir())


def test_an_unwritable_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / ".spamlora").write_text("not a folder")
    with pytest.raises(CheckpointError, match="checkpoints/key is not writable"):
        Checkpoints(tmp_path, "key").check_writable()


def test_the_key_follows_params_and_the_content_of_dependencies(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.bin").write_bytes(b"1")
    (tmp_path / "train.csv").write_text("x")
    deps = {"folder": tmp_path / "folder", "train.csv": tmp_path / "train.csv"}
    key = computation_key({"lora.rank": 8}, deps)
    assert key == computation_key({"lora.rank": 8}, deps)
    assert key != computation_key({"lora.rank": 4}, deps)
    (tmp_path / "train.csv").write_text("y")
    changed = computation_key({"lora.rank": 8}, deps)
    assert changed != key
    (tmp_path / "folder" / "a.bin").write_bytes(b"2")
    assert computation_key({"lora.rank": 8}, deps) != changed


def test_prune_removes_only_stopped_and_old_never_running_or_starting(tmp_path, monkeypatch,
                                                                      capsys):
    """Other computations' checkpoints are work a rerun resumes (issue 25, item 2):
    they go only on request, by age, and never while their training runs or starts."""
    import json
    import os
    import socket
    import time

    from spamlora.cli import main

    now = time.time()
    day = 86400

    def folder(name, age_days, pid=None, host=None):
        path = tmp_path / checkpoint.FOLDER / name
        path.mkdir(parents=True)
        (path / "step-000000007-epoch-0002.safetensors").write_bytes(b"x" * 1000)
        if pid is not None:
            (path / checkpoint.OWNER_FILE).write_text(json.dumps(
                {"run_id": f"run-{name}", "host": host or socket.gethostname(), "pid": pid}))
        for p in [*path.iterdir(), path]:
            os.utime(p, (now - age_days * day, now - age_days * day))
        return path

    dead = 999_999_999  # above any pid Linux hands out
    running = folder("running", 30, pid=os.getpid())
    stopped_old = folder("stopped-old", 30, pid=dead)
    stopped_new = folder("stopped-new", 0.5, pid=dead)
    starting = folder("starting", 0.01)  # no owner.json yet: minutes old
    abandoned = folder("abandoned", 3)  # no owner.json, days old
    elsewhere = folder("elsewhere", 30, pid=dead, host="another-machine")

    listed = {e.folder.name: e for e in checkpoint.stored(tmp_path)}
    assert set(listed) == {"running", "stopped-old", "stopped-new", "starting", "abandoned",
                           "elsewhere"}
    assert listed["running"].running and not listed["stopped-old"].running
    assert listed["stopped-old"].where() == "epoch 2, step 7"
    assert listed["stopped-old"].bytes == 1000 + len((stopped_old / "owner.json").read_bytes())

    would = checkpoint.prune(tmp_path, 2 * day, now, dry_run=True)
    assert {e.folder.name for e in would} == {"stopped-old", "abandoned"}
    assert stopped_old.exists() and abandoned.exists() and stopped_new.exists()
    gone = checkpoint.prune(tmp_path, 0, now)
    assert not stopped_new.exists()
    assert {e.folder.name for e in gone} == {"stopped-old", "stopped-new", "abandoned"}
    for kept in (running, starting, elsewhere):
        assert kept.is_dir()

    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert main(["checkpoints", "list"]) == 0
    out = capsys.readouterr().out
    assert f"{running}: running (process {os.getpid()}" in out and "epoch 2, step 7" in out
    assert main(["checkpoints", "prune"]) == 1
    assert "prune needs --older-than DAYS" in capsys.readouterr().err
    assert main(["checkpoints", "prune", "--older-than", "0"]) == 0
    assert "removed 0 checkpoint folder(s)" in capsys.readouterr().out


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/stat").is_file(),
                    reason="needs Linux /proc")
def test_a_reused_pid_is_not_the_process_that_wrote_the_record():
    """A pid handed out again (containers do it quickly) blocked resume with "running
    already" (issue 25, item 13): the start time tells the two processes apart."""
    import socket
    import subprocess
    import sys

    from spamlora.checkpoint import Owner
    from spamlora.process import pid_alive, start_time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    host = socket.gethostname()
    try:
        started = start_time(child.pid)
        assert started is not None and started == start_time(child.pid)
        assert pid_alive(child.pid, started) and pid_alive(child.pid)
        later = str(int(started) + 1)  # the same pid, a process started after it
        assert not pid_alive(child.pid, later)
        assert not Owner("run", host, child.pid, later).alive()
        assert Owner("run", host, child.pid, started).alive()
        assert Owner("run", host, child.pid).alive()  # an older owner.json: pid only
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid, started)
    assert Owner.me("run").started == start_time(__import__("os").getpid())
