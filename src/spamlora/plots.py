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


def confusion_matrix(counts: dict, names: tuple[str, ...]) -> tuple[list[list[int]],
                                                                   list[str]]:
    """The matrix (rows actual, columns predicted) of eval.json's `confusion` and its
    labels: of two classes its tp/fp/tn/fn, negative first; of more, {actual:
    {predicted: n}} in class order."""
    if set(counts) == {"tp", "fp", "tn", "fn"}:
        return [[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]], list(names)
    return [[counts[a][p] for p in names] for a in names], list(names)


def plot_confusion(counts: dict, path: Path,
                   names: tuple[str, ...] = ("ham", "spam")) -> None:
    """`names`: the classes in the matrix's order (of two: negative, positive)."""
    matrix, labels = confusion_matrix(counts, names)
    n = len(labels)
    size = max(4.5, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size - 0.5))
    image = ax.imshow(matrix, cmap="Blues")
    top = max(map(max, matrix))
    for i in range(n):
        for j in range(n):
            value = matrix[i][j]
            ax.text(j, i, str(value), ha="center", va="center",
                    color="white" if value > top / 2 else "black")
    ax.set_xticks(range(n), labels, rotation=45 if n > 4 else 0,
                  ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Actual")
    ax.set_title("Test confusion matrix")
    fig.colorbar(image, ax=ax)
    save_figure(fig, path)


def plot_roc(roc: pd.DataFrame, auc: float | None, path: Path,
             positive: str = "spam") -> None:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(roc["fpr"], roc["tpr"],
            label="ROC" if auc is None else f"ROC (AUC = {auc:.4f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="Chance")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel(f"True positive rate ({positive} recall)")
    ax.set_title("Test ROC curve")
    ax.legend(loc="lower right")
    save_figure(fig, path)


def one_vs_rest_curves(scored: pd.DataFrame, names: tuple[str, ...]
                       ) -> dict[str, pd.DataFrame]:
    """Each class's ROC curve against the rest, from test predictions (`label`, the class
    index, and `<class>_probability` columns); classes absent from them have none."""
    # Imported here: ~0.7 s of the plot stage's ~3 s of CPU, and only these figures need it.
    from sklearn import metrics

    curves = {}
    for i, name in enumerate(names):
        truth = (scored["label"] == i).astype(int)
        if 0 < truth.sum() < len(truth):
            fpr, tpr, _ = metrics.roc_curve(truth, scored[f"{name}_probability"])
            curves[name] = pd.DataFrame({"fpr": fpr, "tpr": tpr})
    return curves


def plot_roc_per_class(curves: dict[str, pd.DataFrame], aucs: dict[str, float | None],
                       path: Path) -> None:
    """One one-vs-rest ROC curve per class (more than two classes)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, roc in curves.items():
        auc = aucs.get(name)
        ax.plot(roc["fpr"], roc["tpr"],
                label=name if auc is None else f"{name} (AUC = {auc:.4f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="Chance")
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate (recall)")
    ax.set_title("Test ROC curves, each class against the rest")
    ax.legend(loc="lower right", fontsize="small")
    save_figure(fig, path)
