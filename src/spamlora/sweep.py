"""Compare the experiments of a sweep (e.g. `make sweep`: LoRA rank x seed) from
`dvc exp show --json`: one table and one plot of test accuracy and trainable parameters
against rank. `finished` is the one reading of `dvc exp show --json` (the book's
experiments report reads it too)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .data import write_csv
from .fileio import write_text

COLUMNS = ["experiment", "rev", "rank", "seed", "test_accuracy", "test_f1", "trainable"]


@dataclass(frozen=True)
class Finished:
    """One finished experiment (or baseline commit) of `dvc exp show --json`."""
    name: str
    rev: str
    params: dict  # params.yaml as that experiment ran it
    metrics: dict  # metrics file -> its data, e.g. metrics["metrics/eval.json"]["test"]


def finished(exp_show: list[dict]) -> list[Finished]:
    """Every finished experiment with test metrics, then every baseline commit whose
    params no experiment repeats (a sweep that queues the baseline's own settings, e.g.
    rank 8 / seed 123, would otherwise count that configuration twice). Queued, running
    and failed ones are left out; so is the workspace, which holds the same results as
    one of the experiments or the baseline."""
    found, seen, configs = [], set(), set()

    def add(rev: dict, baseline: bool) -> None:
        data = rev.get("data") or {}
        params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
        metrics = {path: (m or {}).get("data", {})
                   for path, m in (data.get("metrics") or {}).items()}
        key = data.get("rev") or rev.get("rev")
        config = json.dumps(params, sort_keys=True)
        if (not metrics.get("metrics/eval.json", {}).get("test") or key in seen
                or rev.get("error") or (baseline and config in configs)):
            return
        seen.add(key)
        configs.add(config)
        found.append(Finished(rev.get("name") or str(key)[:7], key, params, metrics))

    commits = [entry for entry in exp_show if entry.get("rev") != "workspace"]
    for entry in commits:
        for experiment in entry.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                add(rev, baseline=False)
    for entry in commits:
        add(entry, baseline=True)
    return found


# The names of `make experiments`' runs of the book's rows (experiments.py): their
# settings are the book's, not a point of the rank sweep.
BOOK_ROW_PREFIX = "book-row-"


def experiments(exp_show: list[dict]) -> pd.DataFrame:
    """One row per finished LoRA experiment (`finished`) with its rank, seed and
    results; other `train.trainable` modes and the book's rows are not rank-sweep
    points."""
    from .evaluate import headline_f1

    rows = []
    for f in finished(exp_show):
        if (f.params["train"].get("trainable", "lora") != "lora"
                or f.name.startswith(BOOK_ROW_PREFIX)):
            continue
        test = f.metrics["metrics/eval.json"]["test"]
        train = f.metrics.get("metrics/train.json", {})
        rows.append({"experiment": f.name, "rev": f.rev, "rank": f.params["lora"]["rank"],
                     "seed": f.params["train"]["seed"], "test_accuracy": test["accuracy"],
                     "test_f1": headline_f1(test),
                     "trainable": train.get("parameters", {}).get("trainable")})
    return pd.DataFrame(rows, columns=COLUMNS)


def by_rank(df: pd.DataFrame) -> pd.DataFrame:
    return (df.groupby("rank")
            .agg(runs=("test_accuracy", "size"), accuracy_mean=("test_accuracy", "mean"),
                 accuracy_min=("test_accuracy", "min"),
                 accuracy_max=("test_accuracy", "max"), trainable=("trainable", "first"))
            .reset_index())


def markdown(df: pd.DataFrame) -> str:
    lines = ["| LoRA rank | runs | test accuracy (mean) | min | max | trainable params |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in by_rank(df).itertuples():
        trainable = f"{int(r.trainable):,}" if pd.notna(r.trainable) else "?"
        lines.append(f"| {r.rank} | {r.runs} | {r.accuracy_mean:.4f} | {r.accuracy_min:.4f} "
                     f"| {r.accuracy_max:.4f} | {trainable} |")
    return "\n".join(lines) + "\n"


def plot(df: pd.DataFrame, path: Path) -> None:
    from .plots import plt, save_figure

    summary = by_rank(df)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(df["rank"], df["test_accuracy"], alpha=0.5, label="runs")
    ax.plot(summary["rank"], summary["accuracy_mean"], "o-", label="mean test accuracy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(summary["rank"], [str(r) for r in summary["rank"]])
    ax.set_xlabel("LoRA rank")
    ax.set_ylabel("Test accuracy")
    params_ax = ax.twinx()
    params_ax.plot(summary["rank"], summary["trainable"], "s--", color="tab:red",
                   label="trainable parameters")
    params_ax.set_ylabel("Trainable parameters")
    handles = ax.get_legend_handles_labels()[0] + params_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="lower right")
    ax.set_title("Sweep: test accuracy and size against LoRA rank")
    save_figure(fig, path)


def write_report(df: pd.DataFrame, out_dir: Path) -> None:
    if df.empty:
        from .errors import SpamloraError

        raise SpamloraError("no finished experiment with test metrics in `dvc exp show`")
    write_csv(df, out_dir / "experiments.csv")
    write_text(out_dir / "by_rank.md", markdown(df))
    plot(df, out_dir / "accuracy_vs_rank.png")
