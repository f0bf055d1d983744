"""Classification metrics with spam (label 1) as the positive class.

Written out in numpy (no scikit-learn dependency); tests check them against hand-worked
cases and the textbook definitions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion(labels: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    return {"tp": int(((predicted == 1) & (labels == 1)).sum()),
            "fp": int(((predicted == 1) & (labels == 0)).sum()),
            "tn": int(((predicted == 0) & (labels == 0)).sum()),
            "fn": int(((predicted == 0) & (labels == 1)).sum())}


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    """False/true positive rates at every distinct score threshold (descending)."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tps = np.cumsum(labels == 1)[last_of_tie]
    fps = np.cumsum(labels == 0)[last_of_tie]
    pos, neg = max(int((labels == 1).sum()), 1), max(int((labels == 0).sum()), 1)
    return pd.DataFrame({
        "threshold": np.r_[np.inf, scores[last_of_tie]],
        "fpr": np.r_[0.0, fps / neg],
        "tpr": np.r_[0.0, tps / pos],
    })


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (trapezoids; ties count half, as in Mann-Whitney U);
    None when only one class is present (undefined, and NaN is not valid JSON)."""
    labels = np.asarray(labels)
    if (labels == 1).all() or (labels == 0).all():
        return None
    curve = roc_curve(labels, scores)
    return float(np.trapezoid(curve["tpr"], curve["fpr"]))


def precision_recall_curve(labels: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    curve = roc_curve(labels, scores).iloc[1:]
    labels = np.asarray(labels)
    pos, neg = int((labels == 1).sum()), int((labels == 0).sum())
    tp, fp = curve["tpr"].to_numpy() * pos, curve["fpr"].to_numpy() * neg
    precision = np.divide(tp, tp + fp, out=np.ones_like(tp), where=(tp + fp) > 0)
    return pd.DataFrame({"threshold": curve["threshold"].to_numpy(),
                         "precision": precision, "recall": curve["tpr"].to_numpy()})


def classification_metrics(labels: np.ndarray, logits: np.ndarray,
                           threshold: float = 0.5) -> dict[str, object]:
    labels = np.asarray(labels)
    probs = softmax(np.asarray(logits, dtype=np.float64))
    spam_prob = probs[:, 1]
    predicted = (spam_prob >= threshold).astype(int)
    counts = confusion(labels, predicted)
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    loss = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {"accuracy": float((predicted == labels).mean()), "loss": loss,
            "precision": precision, "recall": recall, "f1": f1,
            "roc_auc": roc_auc(labels, spam_prob), "confusion": counts,
            "examples": int(len(labels))}
