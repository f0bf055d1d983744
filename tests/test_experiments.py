"""The book's chapter 6 experiments (`make experiments`): each row's flags as DVC applies
them, and the report read from a synthetic `dvc exp show --json` (two rows queued, run
by two workers and reported for real: test_pipeline.py)."""

import shutil
import subprocess

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from spamlora import experiments as book
from spamlora.config import load_params
from spamlora.errors import SpamloraError

from .conftest import REPO


def applied(row, tmp_path, overrides=None):
    """params.yaml after `dvc exp run` applied the row's -S flags (DVC's own parser)."""
    params_file = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_file)
    command = book.queue_command(row, overrides or {})
    apply_overrides(str(params_file), [command[i + 1] for i, arg in enumerate(command)
                                       if arg == "-S"])
    return load_params(params_file), yaml.safe_load(params_file.read_text())


def test_every_row_is_named_and_numbered_as_in_the_book():
    assert [row.number for row in book.ROWS] == list(range(1, 13))
    assert book.ROWS[0].name == "book-row-01-last-block"
    assert len(set(book.BY_NAME)) == 12
    assert all(row.name.startswith(f"book-row-{row.number:02d}-") for row in book.ROWS)


@pytest.mark.parametrize("row", book.ROWS, ids=lambda row: row.name)
def test_each_row_runs_with_the_books_settings(row, tmp_path):
    params, raw = applied(row, tmp_path)
    t = params.train
    assert (t.epochs, t.lr, t.weight_decay, t.batch_size if row.number != 11 else 8,
            t.seed) == (5, 5e-5, 0.1, 8, 123)
    assert (t.precision, params.evaluate.precision, t.group_by_length) == ("fp32", "fp32",
                                                                           False)
    d = params.data  # the book's split
    assert (d.dedupe, d.stratify, d.seed, d.train_frac, d.val_frac) == (False, False, 123,
                                                                        0.7, 0.1)
    assert book.overridden(row, raw) == {}


def test_the_rows_say_what_the_book_varies(tmp_path):
    def params(number):
        return applied(book.BY_NUMBER[number], tmp_path)[0]

    first = params(1)
    assert (first.model.name, first.model.weights, first.train.trainable, first.train.token,
            first.train.max_length, first.train.padding) == (
        "gpt2", "pretrained", "last_block", "last", None, "max_length")
    assert params(2).train.token == "first"
    assert params(3).train.trainable == "last_layer"
    assert params(4).train.trainable == "all"
    assert [params(n).model.name for n in (5, 6, 7)] == ["gpt2-medium", "gpt2-large",
                                                          "gpt2-xl"]
    random = params(8)
    assert (random.model.weights, random.train.trainable) == ("random", "all")
    lora = params(9).lora
    assert params(9).train.trainable == "lora" and lora.rank == 16
    assert lora.alpha / lora.rank == 8  # the book scales by alpha alone
    assert lora.init == "textbook"
    assert (params(10).train.max_length, params(10).train.padding) == ("model", "max_length")
    no_padding = params(11).train
    assert (no_padding.batch_size, no_padding.padding, no_padding.max_length) == (
        1, "packed", "model")
    accumulated = params(12).train
    assert (accumulated.batch_size, accumulated.padding) == (8, "packed")


def test_what_each_row_needs_is_said():
    assert book.BY_NUMBER[1].needs == "pretrained gpt2 weights (about 0.5 GB)"
    assert "gpt2-xl weights (about 6.2 GB)" in book.BY_NUMBER[7].needs
    assert "not read" in book.BY_NUMBER[8].needs
    assert [r.number for r in book.ROWS if r.flags["model.weights"] == "random"] == [8]


def test_an_override_replaces_the_rows_value_once(tmp_path):
    row = book.BY_NUMBER[1]
    command = book.queue_command(row, book.parse_overrides(["train.epochs=1"]))
    assert command[:6] == ["dvc", "exp", "run", "--queue", "-n", row.name]
    assert [a for a in command if a.startswith("train.epochs=")] == ["train.epochs=1"]
    params, raw = applied(row, tmp_path, {"train.epochs": "1"})
    assert params.train.epochs == 1
    assert book.overridden(row, raw) == {"train.epochs": 1}


def test_bad_rows_and_overrides_are_refused():
    assert book.select(None) == list(book.ROWS)
    assert [r.number for r in book.select([8, 1, 8])] == [1, 8]
    with pytest.raises(book.UnknownRow, match="no row 0, 13 in the book's table"):
        book.select([13, 0, 1])
    for bad in ("train.epochs", "train.epoch=1", "epochs=1"):
        with pytest.raises(book.UnknownRow, match="a key of params.yaml"):
            book.parse_overrides([bad])


def rev(name, sha, params, test_accuracy, seconds, error=None):
    return {"rev": sha, "name": name, "error": error, "data": {
        "rev": sha,
        "params": {"params.yaml": {"data": params}},
        "metrics": {
            "metrics/eval.json": {"data": {
                "train": {"accuracy": 0.99}, "validation": {"accuracy": 0.98},
                "test": {"accuracy": test_accuracy, "f1": test_accuracy},
                "test_unseen": {"accuracy": test_accuracy - 0.01}}},
            "metrics/train.json": {"data": {"train_seconds": seconds,
                                            "run": {"hardware": "x86_64 AVX2"}}}}}}


def params_of(row, tmp_path, overrides=None):
    return applied(row, tmp_path, overrides)[1]


def exp_show(tmp_path):
    row1, row8 = book.BY_NUMBER[1], book.BY_NUMBER[8]
    baseline = yaml.safe_load((REPO / "params.yaml").read_text())
    return [
        {**rev(None, "workspace", baseline, 0.9, 1.0), "rev": "workspace"},
        {**rev("main", "aaa", baseline, 0.9, 1.0), "experiments": [
            {"revs": [rev(row8.name, "bbb", params_of(row8, tmp_path), 0.9367, 0.0312)]},
            {"revs": [rev(row1.name, "ccc", params_of(row1, tmp_path, {"train.epochs": "1"}),
                          0.875, 12.5)]},
            {"revs": [rev("book-row-04-all", "ddd", baseline, 0.5, 1.0,
                          error={"msg": "failed"})]},
            {"revs": [{"rev": "eee", "name": "book-row-05-gpt2-medium", "data": None,
                       "error": None}]},  # queued
            {"revs": [rev("exp-rank-4", "fff", baseline, 0.8, 3.0)]},
        ]},
    ]


def test_a_row_run_or_queued_is_taken_a_failed_one_is_not(tmp_path):
    shown = exp_show(tmp_path)
    shown[1]["experiments"][2]["executor"] = {"state": "failed"}  # book-row-04-all
    shown[1]["experiments"][3]["executor"] = {"state": "queued"}  # book-row-05-gpt2-medium
    for experiment in shown[1]["experiments"]:
        experiment["name"] = experiment["revs"][0]["name"]
    assert book.taken(shown) == {"book-row-08-random-all", "book-row-01-last-block",
                                 "book-row-05-gpt2-medium", "exp-rank-4"}


def test_the_report_has_each_row_run_beside_the_books(tmp_path):
    df = book.results(exp_show(tmp_path))
    assert df["experiment"].tolist() == ["book-row-01-last-block", "book-row-08-random-all"]
    assert df["overridden"].tolist() == ["train.epochs=1", ""]
    assert df["test_accuracy"].tolist() == [0.875, 0.9367]
    assert df["book_test_accuracy"].tolist() == [0.95, 0.9367]
    assert df["train_seconds"].tolist() == [12.5, 0.0312]
    assert df["book_train_seconds"].tolist() == pytest.approx([0.28 * 60, 0.69 * 60])

    table = book.markdown(df)
    assert book.TABLE_URL in table and book.COMMIT in table
    assert book.TABLE_URL == ("https://github.com/rasbt/LLMs-from-scratch/blob/"
                              "00a466f0b949139f3076d50d59a2fc3efd516135/ch06/"
                              "02_bonus_additional-experiments/README.md")
    line = next(x for x in table.splitlines() if "| book-row-01" in x)
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[:3] == ["1", "gpt2-small (124M), pretrained, last, last_block, longest "
                         "train ex. (120)", "book-row-01-last-block"]
    assert cells[3].endswith("**train.epochs=1**")
    assert cells[4:] == ["99.00%", "96.63%", "98.00%", "99.33%", "87.50%", "95.00%",
                         "86.50%", "12.5", "16.8", "x86_64 AVX2"]
    assert "| book-row-08-random-all | `" in table
    row8 = next(x for x in table.splitlines() if "| book-row-08" in x)
    assert [c.strip() for c in row8.split("|")[1:-1]][11] == "0.031"  # not "0.0"
    assert "| book-row-05-gpt2-medium (not run) |" in table  # queued, not finished
    assert "| book-row-04-all (not run) |" in table  # failed
    assert "exp-rank-4" not in table
    assert "- Row 7 (not run): pretrained gpt2-xl weights (about 6.2 GB)." in table
    assert "- Row 12: gradient accumulation is no param here" in table
    # the padded rows whose `last` the book read at a padding position
    assert "- Rows 1, 3, 4, 5, 6, 7, 8, 9, 10: `last` is each message's last real" in table

    book.write_report(df, tmp_path / "out")
    assert (tmp_path / "out" / "table.md").read_text() == table
    assert (tmp_path / "out" / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "experiments.csv").is_file()
    with pytest.raises(SpamloraError, match="no finished experiment named after a row"):
        book.write_report(book.results([]), tmp_path / "empty")


def test_make_experiments_queues_the_rows_and_runs_the_queue_as_make_sweep(tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make (Windows)")
    venv = tmp_path / "venv"

    def dry_run(*args: str) -> list[str]:
        proc = subprocess.run([make, "-n", *args, f"VENV={venv}"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [line for line in proc.stdout.splitlines() if str(venv) in line]

    experiments = dry_run("experiments", "ROWS=1 8", "EXTRA=-S train.epochs=1",
                          "EXPERIMENTS_JOBS=3", "EXPERIMENTS_THREADS=5")
    queue = [line for line in experiments if "spamlora experiments" in line]
    assert queue[0].endswith("/bin/spamlora experiments queue 1 8 -S train.epochs=1")
    assert queue[1].endswith("/bin/spamlora experiments report")
    start = next(line for line in experiments if "dvc queue start" in line)
    assert "OMP_NUM_THREADS=5 " in start and start.endswith("dvc queue start -j 3")
    # The same workers and wait as `make sweep`'s, not a copy of them
    sweep = dry_run("sweep", "SWEEP_JOBS=3", "SWEEP_THREADS=5")
    ran = experiments[experiments.index(start):-1]
    assert sweep[sweep.index(start):sweep.index(start) + len(ran)] == ran
