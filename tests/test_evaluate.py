"""Metrics against hand-worked cases and brute-force definitions."""

import itertools

import numpy as np
import pytest

from spamlora.evaluate import (
    classification_metrics,
    precision_recall_curve,
    roc_auc,
    roc_curve,
)
from spamlora.inference import softmax


def logits_for(spam_prob):
    p = np.asarray(spam_prob, dtype=np.float64)
    return np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=1)


def test_hand_worked_confusion_precision_recall_f1():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    probs = np.array([0.9, 0.8, 0.3, 0.6, 0.1, 0.2, 0.4, 0.7])
    m = classification_metrics(labels, logits_for(probs))
    assert m["confusion"] == {"tp": 3, "fp": 1, "tn": 3, "fn": 1}
    assert m["accuracy"] == 6 / 8
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    want_loss = -np.mean(np.log(np.where(labels == 1, probs, 1 - probs)))
    assert m["loss"] == pytest.approx(want_loss)
    assert m["examples"] == 8


def brute_force_auc(labels, scores):
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_equals_the_probability_of_ranking_spam_above_ham():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 2, size=50)
        if labels.min() == labels.max():
            continue
        scores = np.round(rng.random(50), 1)  # many ties
        assert roc_auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores))


def test_curves_are_monotone_and_end_at_the_corners():
    labels = np.array([0, 1, 1, 0, 1, 0])
    scores = np.array([0.1, 0.9, 0.8, 0.7, 0.3, 0.3])
    roc = roc_curve(labels, scores)
    assert (roc["fpr"].iloc[0], roc["tpr"].iloc[0]) == (0.0, 0.0)
    assert (roc["fpr"].iloc[-1], roc["tpr"].iloc[-1]) == (1.0, 1.0)
    assert roc["fpr"].is_monotonic_increasing and roc["tpr"].is_monotonic_increasing
    pr = precision_recall_curve(labels, scores)
    assert pr["recall"].iloc[-1] == 1.0 and pr["precision"].iloc[-1] == 0.5
    assert pr["precision"].iloc[0] == 1.0


def test_one_class_auc_is_undefined_and_perfect_scores():
    assert roc_auc(np.array([1, 1]), np.array([0.2, 0.9])) is None
    m = classification_metrics(np.array([0, 1]), logits_for([0.1, 0.9]))
    assert m["accuracy"] == 1.0 and m["roc_auc"] == 1.0 and m["f1"] == 1.0


def test_softmax_is_stable_for_large_logits():
    p = softmax(np.array([[1000.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(p, [[1.0, 0.0], [0.5, 0.5]])


def test_curves_keep_the_hand_computed_points():
    """Worked by hand (and what the numpy version wrote before scikit-learn computed
    them): every distinct score is a threshold, descending, ties taken together."""
    labels = np.array([0, 1, 1, 0, 1, 0, 1, 0])
    scores = np.array([0.1, 0.9, 0.8, 0.7, 0.3, 0.3, 0.3, 0.05])
    roc = roc_curve(labels, scores)
    assert roc["threshold"].tolist() == [np.inf, 0.9, 0.8, 0.7, 0.3, 0.1, 0.05]
    assert roc["fpr"].tolist() == [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0]
    assert roc["tpr"].tolist() == [0.0, 0.25, 0.5, 0.5, 1.0, 1.0, 1.0]
    pr = precision_recall_curve(labels, scores)
    assert pr["threshold"].tolist() == [0.9, 0.8, 0.7, 0.3, 0.1, 0.05]
    np.testing.assert_allclose(pr["precision"], [1, 1, 2 / 3, 2 / 3, 4 / 7, 0.5])
    assert pr["recall"].tolist() == [0.25, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert roc_auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores))
