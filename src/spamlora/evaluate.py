"""Classification metrics: of two classes, those of the positive one (spam, label 1, for
the SMS data); of more, macro averages, each class's, and the n x n confusion matrix.

scikit-learn's (a dependency of MLflow, declared); tests check them against hand-worked
cases and the textbook definitions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics

from .inference import predictions, softmax
from .tracking import metric_name


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """False/true positive rates at every distinct score threshold (descending), from
    (inf, 0, 0) to (lowest score, 1, 1)."""
    fpr, tpr, thresholds = metrics.roc_curve(labels, np.asarray(scores, dtype=np.float64),
                                             pos_label=1, drop_intermediate=False)
    return pd.DataFrame({"threshold": thresholds, "fpr": fpr, "tpr": tpr})


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half, as in Mann-Whitney U); None when only
    one class is present (undefined, and NaN is not valid JSON)."""
    labels = np.asarray(labels)
    if (labels == 1).all() or (labels == 0).all():
        return None
    return float(metrics.roc_auc_score(labels, scores))


def precision_recall_curve(labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """Precision and recall at every distinct score threshold, descending."""
    precision, recall, thresholds = metrics.precision_recall_curve(
        labels, np.asarray(scores, dtype=np.float64), pos_label=1)
    # scikit-learn lists thresholds ascending and appends the (precision 1, recall 0) end.
    return pd.DataFrame({"threshold": thresholds[::-1], "precision": precision[-2::-1],
                         "recall": recall[-2::-1]})


def classification_metrics(labels: np.ndarray, logits: np.ndarray,
                           threshold: float = 0.5, classes: tuple[str, ...] | None = None,
                           positive_index: int | None = 1) -> dict[str, object]:
    """Of two classes: accuracy, loss, and the positive class's precision, recall, F1,
    ROC AUC and confusion counts (the names and values the SMS pipeline has always
    reported). Of more (`classes` names them): accuracy, loss, macro precision / recall
    / F1, ROC AUC one-vs-rest (macro), each class's, and the confusion matrix as
    {actual: {predicted: count}}."""
    labels = np.asarray(labels)
    probs = softmax(np.asarray(logits, dtype=np.float64))
    n = probs.shape[1]
    predicted = predictions(probs, positive_index, threshold)
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    head = {"accuracy": float(metrics.accuracy_score(labels, predicted)), "loss": loss}
    if n == 2:
        pos = 1 if positive_index is None else positive_index
        is_pos, said_pos = labels == pos, predicted == pos
        (tn, fp), (fn, tp) = metrics.confusion_matrix(is_pos, said_pos, labels=[False, True])
        precision, recall, f1, _ = metrics.precision_recall_fscore_support(
            is_pos, said_pos, average="binary", pos_label=True, zero_division=0.0)
        return {**head, "precision": float(precision), "recall": float(recall),
                "f1": float(f1), "roc_auc": roc_auc(is_pos.astype(int), probs[:, pos]),
                "confusion": {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)},
                "examples": int(len(labels))}
    names = classes or tuple(str(i) for i in range(n))
    indices = list(range(n))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predicted, labels=indices, average=None, zero_division=0.0)
    aucs = [roc_auc((labels == i).astype(int), probs[:, i]) for i in indices]
    defined = [a for a in aucs if a is not None]
    matrix = metrics.confusion_matrix(labels, predicted, labels=indices)
    # Macro averages over every class, as scikit-learn's average="macro" (a class absent
    # from `labels` counts with recall 0, as it does there); the AUC only over classes
    # present, as it is undefined for the others.
    return {**head,
            "macro": {"precision": float(np.mean(precision)), "recall": float(np.mean(recall)),
                      "f1": float(np.mean(f1))},
            "roc_auc": float(np.mean(defined)) if defined else None,
            "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                                 "f1": float(f1[i]), "roc_auc": aucs[i],
                                 "support": int(support[i])}
                          for i, name in enumerate(names)},
            "confusion": {actual: {said: int(matrix[i][j]) for j, said in enumerate(names)}
                          for i, actual in enumerate(names)},
            "examples": int(len(labels))}


def micro_average(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest pooled over the classes: every (message, class) pair is a case, the
    class's probability its score: the one ROC or precision-recall curve for n classes."""
    onehot = np.eye(probs.shape[1], dtype=int)[np.asarray(labels)]
    return onehot.ravel(), probs.ravel()


def flat_metrics(tree: dict, prefix: str) -> dict[str, float]:
    """The float metrics of `tree` (nested: macro, per_class) as `prefix.key.key`, the
    class names made MLflow-safe; counts (int) and undefined (None) values left out."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{metric_name(str(key))}"
        if isinstance(value, dict):
            out.update(flat_metrics(value, name))
        elif isinstance(value, float):
            out[name] = value
    return out


def headline_f1(split_metrics: dict) -> float:
    """A split's F1 in eval.json: the positive class's of two, the macro average of more."""
    return split_metrics["f1"] if "f1" in split_metrics else split_metrics["macro"]["f1"]
