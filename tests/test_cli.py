"""`spamlora summary` and `spamlora predict`."""

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from spamlora.adapter import read_adapter
from spamlora.cli import main
from spamlora.config import load_params
from spamlora.paths import Paths

from .conftest import REPO, downloaded, flip_bytes, make_hf_gpt2
from .test_tracking import stage_main, workspace  # noqa: F401 (fixture)


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_summary_random_init_prints_the_seed_figures(capsys):
    code, out, _ = run_cli(capsys, "summary", "--model", "gpt2", "--lora-rank", "8",
                           "--random-init")
    assert code == 0
    assert "1,327,104" in out and "164,364,288" in out and "0.81%" in out
    assert "1,328,642" in out and "125,768,450" in out and "1.06%" in out
    assert "LinearWithLoRA" in out


def test_summary_prints_the_chosen_mode_and_the_counts_of_every_mode(capsys):
    code, out, _ = run_cli(capsys, "summary", "--random-init", "--trainable", "last_block")
    assert code == 0 and "LinearWithLoRA" not in out
    table = out.split("The classifier in every mode (`last_block` above):")[1]
    rows = {line.split()[0]: line.split()[1:3] for line in table.strip().splitlines()[1:]}
    assert rows == {"lora": ["1,328,642", "125,768,450"],
                    "all": ["124,441,346", "124,441,346"],
                    "last_block": ["7,090,946", "124,441,346"],
                    "last_two_blocks": ["14,178,818", "124,441,346"],
                    "last_layer": ["1,538", "124,441,346"]}
    assert "Classifier (2-class head)            7,090,946     124,441,346" in out


def test_summary_of_a_weights_folder(capsys, tiny_gpt2):
    code, out, _ = run_cli(capsys, "summary", "--weights", str(tiny_gpt2), "--lora-rank",
                           "2", "--num-classes", "3")
    assert code == 0 and "Classifier (3-class head)" in out


def predict(capsys, adapter, tiny_gpt2, *argv):
    return run_cli(capsys, "predict", "--adapter", str(adapter), "--weights", str(tiny_gpt2),
                   "--precision", "fp32", *argv)


MESSAGES = ["WINNER!! claim your free prize now", "ok see you at 5",
            "Congratulations, you have been selected for a cash reward of 1000 pounds"]


def test_formats_agree_and_keep_input_order(capsys, adapter, tiny_gpt2, tmp_path):
    code, out, _ = predict(capsys, adapter, tiny_gpt2, "--format", "jsonl", *MESSAGES)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == MESSAGES
    for r in rows:
        assert r["label"] == ("spam" if r["spam_probability"] >= 0.5 else "ham")
    _, out, _ = predict(capsys, adapter, tiny_gpt2, "--format", "csv", *MESSAGES)
    as_csv = list(csv.DictReader(io.StringIO(out)))
    assert [float(r["spam_probability"]) for r in as_csv] == pytest.approx(
        [r["spam_probability"] for r in rows], abs=1e-12)
    _, out, _ = predict(capsys, adapter, tiny_gpt2, *MESSAGES)
    assert out.splitlines()[0].split() == ["label", "spam_prob", "message"]
    assert len(out.splitlines()) == 4
    (tmp_path / "m.txt").write_text("\n".join(MESSAGES) + "\n")
    _, out, _ = predict(capsys, adapter, tiny_gpt2, "--format", "jsonl", "--file",
                        str(tmp_path / "m.txt"))
    assert [json.loads(x) for x in out.splitlines()] == rows
    pd.DataFrame({"n": [1, 2, 3], "body": MESSAGES}).to_csv(tmp_path / "m.csv", index=False)
    _, out, _ = predict(capsys, adapter, tiny_gpt2, "--format", "jsonl", "--file",
                        str(tmp_path / "m.csv"), "--text-column", "body")
    assert [json.loads(x) for x in out.splitlines()] == rows
    threshold = sorted(r["spam_probability"] for r in rows)[1]
    _, out, _ = predict(capsys, adapter, tiny_gpt2, "--format", "jsonl", "--threshold",
                        str(threshold), *MESSAGES)
    labels = [json.loads(x)["label"] for x in out.splitlines()]
    assert labels == ["spam" if r["spam_probability"] >= threshold else "ham" for r in rows]


EMOJI = ["WINNER 🎉 claim your £100, \"free\" prize", "ok see you at 5, café?"]


def test_predict_writes_utf8_with_lf_to_a_windows_stdout(monkeypatch, adapter, tiny_gpt2):
    """Redirected on Windows, stdout encodes with the code page and writes "\n" as
    "\r\n" (emulated by `_pyio`, which takes the line end from os.linesep): an emoji
    must not fail half-way, nor CSV rows end with "\r\r\n"."""
    import _pyio

    monkeypatch.setattr(os, "linesep", "\r\n")
    probe = _pyio.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    probe.write("a\n")
    probe.flush()
    assert probe.buffer.getvalue() == b"a\r\n"  # the emulation is Windows' stdout
    with pytest.raises(UnicodeEncodeError):
        probe.write("🎉")
    for fmt in ("csv", "jsonl", "table"):
        stdout = _pyio.TextIOWrapper(io.BytesIO(), encoding="cp1252")
        monkeypatch.setattr(sys, "stdout", stdout)
        code = main(["predict", "--adapter", str(adapter), "--weights", str(tiny_gpt2),
                     "--precision", "fp32", "--format", fmt, *EMOJI])
        stdout.flush()
        written = stdout.buffer.getvalue()
        assert code == 0 and b"\r" not in written, (fmt, written)
        text = written.decode("utf-8")
        if fmt == "csv":
            assert [r["text"] for r in csv.DictReader(io.StringIO(text))] == EMOJI
        elif fmt == "jsonl":
            assert [json.loads(line)["text"] for line in text.splitlines()] == EMOJI
        else:
            assert len(text.splitlines()) == 3 and "🎉" in text and "café" in text


def test_predict_output_is_utf8_whatever_the_locale_encoding(adapter, tiny_gpt2):
    """A real interpreter whose stdout is cp1252 (PYTHONIOENCODING), as a redirected
    stdout on a Western-European Windows."""
    env = {**os.environ, "PYTHONIOENCODING": "cp1252"}
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from spamlora.cli import main; sys.exit(main())",
         "predict", "--adapter", str(adapter), "--weights", str(tiny_gpt2), "--precision",
         "fp32", "--format", "jsonl", *EMOJI], capture_output=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    rows = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]
    assert [r["text"] for r in rows] == EMOJI


def test_batching_does_not_change_probabilities(capsys, adapter, tiny_gpt2):
    texts = [("free " * n).strip() + f" msg {n}" for n in range(1, 30)]
    _, one, _ = predict(capsys, adapter, tiny_gpt2, "--format", "jsonl", "--batch-size",
                        "1", *texts)
    _, many, _ = predict(capsys, adapter, tiny_gpt2, "--format", "jsonl", "--batch-size",
                         "64", *texts)
    p1 = [json.loads(x)["spam_probability"] for x in one.splitlines()]
    p64 = [json.loads(x)["spam_probability"] for x in many.splitlines()]
    np.testing.assert_allclose(p64, p1, atol=1e-5, rtol=0)


def test_stdin_and_truncation_warning(capsys, adapter, tiny_gpt2, monkeypatch):
    long = "this message is far longer than twelve tokens, so it will be cut short " * 3
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"ok\n{long}\n".encode())))
    code, out, err = predict(capsys, adapter, tiny_gpt2, "--format", "jsonl", "-")
    assert code == 0 and len(out.splitlines()) == 2
    assert "<stdin>, line 2 is longer than 12 tokens and was truncated" in err
    assert "line 1" not in err


@pytest.mark.parametrize("argv, message", [
    (["", "ok"], "empty message at argument 1"),
    (["--threshold", "1.5", "x"], "--threshold must lie in [0, 1]"),
    ([], "no messages given"),
    (["--file", "/nonexistent/m.txt"], "/nonexistent/m.txt: not found"),
])
def test_bad_input_is_a_clear_error(capsys, adapter, tiny_gpt2, argv, message):
    code, out, err = predict(capsys, adapter, tiny_gpt2, *argv)
    assert code == 1 and out == ""
    assert message in err and "Traceback" not in err


def test_lines_end_at_newline_only_and_bad_rows_stop_before_any_output(
        capsys, adapter, tiny_gpt2, tmp_path):
    (tmp_path / "m.txt").write_bytes("page\x0cbreak\nnext\x85line\u2028sep\r\nok\n"
                                      .encode())
    code, out, _ = predict(capsys, adapter, tiny_gpt2, "--format", "jsonl", "--file",
                           str(tmp_path / "m.txt"))
    assert code == 0
    assert [json.loads(x)["text"] for x in out.rstrip("\n").split("\n")] == [
        "page\x0cbreak", "next\x85line\u2028sep", "ok"]
    (tmp_path / "short.csv").write_text("n,body\n1,fine\n2\n3,also fine\n")
    code, out, err = predict(capsys, adapter, tiny_gpt2, "--file", str(tmp_path / "short.csv"),
                             "--text-column", "body")
    assert code == 1 and out == "" and "Traceback" not in err
    assert "short.csv, row 3: 1 field(s), but the header has 2" in err
    (tmp_path / "gap.txt").write_text("fine\n" * 3000 + "\n" + "late\n")
    code, out, err = predict(capsys, adapter, tiny_gpt2, "--file", str(tmp_path / "gap.txt"))
    assert code == 1 and out == "" and "empty message at " in err and "line 3001" in err


STREAM = """
import resource, sys
from spamlora.cli import main
code = main(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="peak RSS via resource (POSIX)")
def test_a_large_file_is_streamed_in_input_order_with_bounded_memory(adapter, tiny_gpt2,
                                                                     tmp_path):
    def run(n):
        path = tmp_path / f"m{n}.txt"
        path.write_text("".join(f"msg {i} free prize\n" if i % 3 else f"see you {i}\n"
                                for i in range(n)))
        proc = subprocess.run(
            [sys.executable, "-c", STREAM, "predict", "--adapter", str(adapter),
             "--weights", str(tiny_gpt2), "--precision", "fp32", "--format", "csv",
             "--file", str(path)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout, int(proc.stderr.split()[-1]) * 1024  # ru_maxrss: KiB

    small_out, small_rss = run(1_000)
    large_out, large_rss = run(200_000)
    rows = list(csv.DictReader(io.StringIO(large_out)))
    assert len(rows) == 200_000 and len(small_out.splitlines()) == 1_001
    assert [r["text"] for r in rows[1020:1030]] == [
        f"msg {i} free prize" if i % 3 else f"see you {i}" for i in range(1020, 1030)]
    assert rows[-1]["text"] == "msg 199999 free prize"
    assert large_rss - small_rss < 200 * 2**20, (small_rss, large_rss)


def test_missing_adapter_and_adapter_for_another_base(capsys, adapter, tiny_gpt2, tmp_path):
    code, _, err = run_cli(capsys, "predict", "--adapter", str(tmp_path / "none"),
                           "--weights", str(tiny_gpt2), "x")
    assert code == 1 and "adapter not found" in err
    other = make_hf_gpt2(tmp_path / "other", n_embd=48, n_layer=2, n_head=2)
    code, _, err = run_cli(capsys, "predict", "--adapter", str(adapter), "--weights",
                           str(other), "x")
    assert code == 1 and "made for a base model with config" in err
    spec, tensors = read_adapter(adapter)
    first = next(k for k in tensors if k.endswith(".lora.A"))
    tensors[first] = torch.zeros(tensors[first].shape[0], 7)  # the spec says rank 4
    save_file(tensors, tmp_path / "bad.safetensors", metadata=spec.to_metadata())
    code, _, err = run_cli(capsys, "predict", "--adapter", str(tmp_path / "bad.safetensors"),
                           "--weights", str(tiny_gpt2), "x")
    assert code == 1 and "has shape" in err


def test_predict_refuses_a_damaged_base_in_one_line(capsys, adapter, tiny_gpt2, tmp_path):

    base = downloaded(tiny_gpt2, tmp_path / "base")
    code, _, _ = predict(capsys, adapter, base, "x")
    assert code == 0  # and the base's digests are cached
    weights = base / "model.safetensors"
    original, stat = weights.read_bytes(), weights.stat()
    flip_bytes(weights)
    code, out, err = predict(capsys, adapter, base, "x")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{weights}: damaged" in err and "dvc checkout" in err
    # Bytes flipped and the mtime set back (same size and inode): only --strict, which
    # hashes every file, sees it.
    weights.write_bytes(original)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    flip_bytes(weights, keep_mtime=True)
    code, _, err = predict(capsys, adapter, base, "--strict", "x")
    assert code == 1 and f"{weights}: damaged" in err


def test_download_model_then_predict_with_the_adapter_alone(capsys, adapter, tiny_gpt2,
                                                             tmp_path, http_server):
    http_server.serve_dir("/hub/gpt2", tiny_gpt2)
    dest = tmp_path / "gpt2"
    code, _, err = run_cli(capsys, "predict", "--adapter", str(adapter), "--weights",
                           str(dest), "x")
    assert code == 1 and "spamlora download-model --name gpt2" in err
    code, _, err = run_cli(capsys, "download-model", str(dest), "--url",
                           http_server.base_url + "/hub/{name}")
    assert code == 1 and "does not match the expected" in err  # not GPT-2's real files
    assert not dest.exists()
    code, out, _ = run_cli(capsys, "download-model", str(dest), "--url",
                           http_server.base_url + "/hub/{name}", "--no-checksums")
    assert code == 0 and "model.safetensors" in out and "unchecked" in out
    _, here, _ = predict(capsys, adapter, tiny_gpt2, "--format", "jsonl", *MESSAGES)
    _, there, _ = predict(capsys, adapter, dest, "--format", "jsonl", *MESSAGES)
    assert there == here


def test_console_script_exits_non_zero_without_traceback(tmp_path):
    script = Path(sys.executable).parent / "spamlora"
    proc = subprocess.run([str(script), "predict", "--adapter", str(tmp_path / "none"),
                           "hello"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert "adapter not found" in proc.stderr and "Traceback" not in proc.stderr


def test_predictions_equal_the_evaluate_stage(workspace, capsys):  # noqa: F811
    params = load_params(REPO / "params.yaml")
    params = dataclasses.replace(
        params, train=dataclasses.replace(params.train, epochs=1, precision="fp32"),
        evaluate=dataclasses.replace(params.evaluate, precision="fp32"))
    for stage in ("train", "evaluate"):
        stage_main(stage)(params)
    paths = Paths(workspace)
    want = pd.read_csv(paths.test_predictions)
    capsys.readouterr()  # drop what the stages printed
    code, out, _ = run_cli(capsys, "predict", "--file", str(paths.split("test")),
                           "--text-column", "text", "--format", "csv", "--precision", "fp32")
    assert code == 0
    got = pd.read_csv(io.StringIO(out), keep_default_na=False)
    np.testing.assert_allclose(got["spam_probability"], want["spam_probability"],
                               atol=1e-6, rtol=0)
    assert (got["label"] == np.where(want["predicted"] == 1, "spam", "ham")).all()


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="needs /dev/fd")
def test_a_pipe_is_read_once_and_an_excel_bom_is_dropped(capsys, adapter, tiny_gpt2,
                                                         tmp_path):
    """--file on a pipe (`<(...)`, /dev/stdin, a FIFO) gave "no messages given": it was
    read twice (issue 25, item 14). Excel's "CSV UTF-8" starts with a BOM, which hid the
    header's first column."""
    read_end, write_end = os.pipe()  # what `<(printf ...)` hands a command
    os.write(write_end, b"see you at lunch\nWIN now\n")
    os.close(write_end)
    try:
        code, out, err = predict(capsys, adapter, tiny_gpt2, "--format", "jsonl", "--file",
                                 f"/dev/fd/{read_end}")
    finally:
        os.close(read_end)
    assert code == 0, err
    assert [json.loads(x)["text"] for x in out.splitlines()] == ["see you at lunch",
                                                                 "WIN now"]
    (tmp_path / "excel.csv").write_bytes("\ufefftext,id\nhello there,1\n".encode())
    code, out, err = predict(capsys, adapter, tiny_gpt2, "--format", "jsonl", "--file",
                             str(tmp_path / "excel.csv"), "--text-column", "text")
    assert code == 0, err
    assert [json.loads(x)["text"] for x in out.splitlines()] == ["hello there"]
    (tmp_path / "bom.txt").write_bytes("\ufeffhello\n".encode())
    _, out, _ = predict(capsys, adapter, tiny_gpt2, "--format", "jsonl", "--file",
                        str(tmp_path / "bom.txt"))
    assert json.loads(out)["text"] == "hello"


def test_ctrl_c_in_predict_stops_with_130_and_no_traceback(capsys, adapter, tiny_gpt2,
                                                           monkeypatch, tmp_path):
    """Issue 31, item 12: exit 130 was right, the KeyboardInterrupt traceback was not."""
    from spamlora.predictor import Predictor

    def interrupted(self, texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(Predictor, "probabilities", interrupted)
    (tmp_path / "m.txt").write_text("one\ntwo\n")
    code, out, err = predict(capsys, adapter, tiny_gpt2, "--file", str(tmp_path / "m.txt"))
    assert code == 130 and err.strip() == "spamlora predict: stopped"
