"""Classification metrics with spam (label 1) as the positive class.

scikit-learn's (a dependency of MLflow, declared); tests check them against hand-worked
cases and the textbook definitions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics

from .inference import softmax


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
                           threshold: float = 0.5) -> dict[str, object]:
    labels = np.asarray(labels)
    probs = softmax(np.asarray(logits, dtype=np.float64))
    spam_prob = probs[:, 1]
    predicted = (spam_prob >= threshold).astype(int)
    (tn, fp), (fn, tp) = metrics.confusion_matrix(labels, predicted, labels=[0, 1])
    precision, recall, f1, _ = metrics.precision_recall_fscore_support(
        labels, predicted, labels=[1], average="binary", pos_label=1, zero_division=0.0)
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {"accuracy": float(metrics.accuracy_score(labels, predicted)), "loss": loss,
            "precision": float(precision), "recall": float(recall), "f1": float(f1),
            "roc_auc": roc_auc(labels, spam_prob),
            "confusion": {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn)},
            "examples": int(len(labels))}
