"""The pipeline's figures, drawn with matplotlib's file-only backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed: figures only go to files
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .fileio import atomic_path  # noqa: E402


def save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_history(history: pd.DataFrame, steps: pd.DataFrame, path: Path) -> None:
    """The training loss at every step (raw, and smoothed over a window of ~5% of the
    steps; epoch boundaries dashed; examples seen on the top axis) beside the loss and
    accuracy per epoch, train and validation, with examples seen on a second x axis (as
    in the book's `plot_values`)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    window = max(1, len(steps) // 20)
    ax.plot(steps["step"], steps["loss"], color="tab:blue", alpha=0.3, lw=1,
            label="Training loss (step)")
    ax.plot(steps["step"], steps["loss"].rolling(window, min_periods=1).mean(),
            color="tab:blue", label=f"Smoothed ({window} steps)")
    ends = steps.groupby("epoch")["step"].max()
    for end in ends.iloc[:-1]:
        ax.axvline(end + 0.5, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("Step")
    ax.set_ylabel("Loss")
    ax.legend()
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    ticks = steps.iloc[:: max(1, len(steps) // 5)]
    top.set_xticks(ticks["step"])
    top.set_xticklabels([f"{int(n):,}" for n in ticks["examples_seen"]])
    top.set_xlabel("Examples seen")
    for ax, metric, label in ((axes[1], "loss", "Loss"), (axes[2], "accuracy", "Accuracy")):
        ax.plot(history["epoch"], history[f"train_{metric}"], "o-", label=f"Training {label}")
        ax.plot(history["epoch"], history[f"val_{metric}"], "s--",
                label=f"Validation {label}")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.set_xticks(history["epoch"])
        ax.legend()
        top = ax.twiny()
        top.set_xlim(ax.get_xlim())
        top.set_xticks(history["epoch"])
        top.set_xticklabels([f"{int(n):,}" for n in history["examples_seen"]])
        top.set_xlabel("Examples seen")
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion(counts: dict[str, int], path: Path) -> None:
    matrix = [[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow(matrix, cmap="Blues")
    for i in range(2):
        for j in range(2):
            value = matrix[i][j]
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > max(map(max, matrix)) / 2 else "black")
    ax.set_xticks([0, 1], ["ham", "spam"])
    ax.set_yticks([0, 1], ["ham", "spam"])
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Actual")
    ax.set_title("Test confusion matrix")
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)


def plot_roc(roc: pd.DataFrame, auc: float | None, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(roc["fpr"], roc["tpr"],
            label="ROC" if auc is None else f"ROC (AUC = {auc:.4f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="Chance")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate (spam recall)")
    ax.set_title("Test ROC curve")
    ax.legend(loc="lower right")
    save_figure(fig, path)
