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
