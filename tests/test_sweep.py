"""The sweep report's reading of `dvc exp show --json`."""

import pytest

from spamlora.errors import SpamloraError
from spamlora.sweep import by_rank, experiments, markdown, write_report


def rev(name, sha, rank, seed, accuracy, trainable, error=None):
    return {"rev": sha, "name": name, "error": error, "data": {
        "rev": sha,
        "params": {"params.yaml": {"data": {"lora": {"rank": rank}, "train": {"seed": seed}}}},
        "metrics": {
            "metrics/eval.json": {"data": {"test": {"accuracy": accuracy, "f1": accuracy}}},
            "metrics/train.json": {"data": {"parameters": {"trainable": trainable}}}}}}


EXP_SHOW = [
    {**rev(None, "workspace", 8, 123, 0.9, 800), "rev": "workspace"},
    {**rev("main", "aaa", 8, 123, 0.9, 800), "experiments": [
        {"revs": [rev("exp-a", "bbb", 2, 123, 0.8, 200)]},
        {"revs": [rev("exp-b", "ccc", 2, 7, 0.84, 200)]},
        {"revs": [rev("exp-c", "ddd", 4, 7, 0.1, 400, error={"msg": "failed"})]},
        {"revs": [{"rev": "eee", "name": "queued", "data": None, "error": None}]},
    ]},
]


def test_experiments_one_row_per_finished_run(tmp_path):
    df = experiments(EXP_SHOW)
    assert df["experiment"].tolist() == ["exp-a", "exp-b", "main"]
    summary = by_rank(df)
    assert summary["rank"].tolist() == [2, 8]
    assert summary["runs"].tolist() == [2, 1]
    assert summary["accuracy_mean"].tolist() == pytest.approx([0.82, 0.9])
    assert "| 2 | 2 | 0.8200 | 0.8000 | 0.8400 | 200 |" in markdown(df)
    write_report(df, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"experiments.csv", "by_rank.md",
                                                   "accuracy_vs_rank.png"}
    with pytest.raises(SpamloraError, match="no finished experiment"):
        write_report(experiments([]), tmp_path / "empty")


def test_a_sweep_that_repeats_the_baselines_settings_counts_them_once():
    repeated = [{**EXP_SHOW[1], "experiments": [
        *EXP_SHOW[1]["experiments"], {"revs": [rev("exp-8", "fff", 8, 123, 0.92, 800)]}]}]
    df = experiments(repeated)
    assert df["experiment"].tolist() == ["exp-a", "exp-b", "exp-8"]  # not "main" too
    assert by_rank(df).set_index("rank").loc[8, "runs"] == 1


def test_other_modes_and_the_books_rows_are_not_rank_points_and_n_classes_read_macro_f1():
    """A `make experiments` row or a non-LoRA mode on the same commit is not a point of
    the rank sweep; an experiment of three classes reports its macro F1."""
    def with_train(entry, **train):
        entry["data"]["params"]["params.yaml"]["data"]["train"].update(train)
        return entry

    three = rev("exp-n", "ggg", 4, 123, 0.7, 400)
    three["data"]["metrics"]["metrics/eval.json"]["data"]["test"] = {
        "accuracy": 0.7, "macro": {"f1": 0.65}}
    shown = [{**EXP_SHOW[1], "experiments": [
        {"revs": [rev("exp-a", "bbb", 2, 123, 0.8, 200)]},
        {"revs": [with_train(rev("exp-block", "hhh", 8, 123, 0.95, 7_000_000),
                             trainable="last_block")]},
        {"revs": [rev("book-row-09-lora", "iii", 16, 123, 0.97, 2_000_000)]},
        {"revs": [three]}]}]
    df = experiments(shown)
    assert df["experiment"].tolist() == ["exp-a", "exp-n", "main"]
    assert df.set_index("experiment").loc["exp-n", "test_f1"] == 0.65
