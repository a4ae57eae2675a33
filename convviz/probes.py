"""Linear probes on frozen features and the metrics the paper reports for them (Sec. 5.2).

A probe is a linear layer trained on fixed feature vectors: a softmax (multinomial logistic
regression, Tables 4-5 and 7), a one-vs-rest linear SVM (Table 7) or independent sigmoids for
multi-label data (PASCAL VOC, Table 6). Every probe is fitted full-batch with L-BFGS on
features standardised with the training set's mean and std, so the result is deterministic and
a few hundred iterations suffice. Objectives (n training vectors, W the weights, bias free):

    softmax   mean_i CE(W x_i + b, y_i)                               + l2 * ||W||^2
    svm       mean_i sum_c max(0, 1 - t_ic (W x_i + b)_c)^2            + l2 * ||W||^2
              (t_ic = +1 for the true class, -1 otherwise: the L2-loss linear SVM that
              liblinear / scikit-learn's LinearSVC use by default, one-vs-rest)
    sigmoid   mean_i sum_c BCE((W x_i + b)_c, y_ic)                    + l2 * ||W||^2

Metrics: `mean_class_accuracy` (the paper's "mean of the per-class accuracies") and
`average_precision` (PASCAL VOC's AP since 2010: area under the precision/recall curve with
precision made monotone from the right).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PROBES = ("softmax", "svm", "sigmoid")
# Below this many multiply-adds per objective evaluation (N x D x C) a probe runs on one thread:
# OpenMP's start-up dominates such small ops, and on a busy CPU every parallel region can wait a
# time slice (measured on 2 busy cores: 0.13 s per fit on one thread, 1.7-3.5 s on two).
ONE_THREAD_BELOW = 50_000_000


@contextlib.contextmanager
def _threads(count: int):
    previous = torch.get_num_threads()
    if count == previous:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class LinearProbe:
    """A fitted probe: scores(x) = ((x - mean) / std) @ weight.T + bias, [N, C]."""

    kind: str
    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]
    iterations: int

    def scores(self, features) -> torch.Tensor:
        x = (torch.as_tensor(features, dtype=torch.float32) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def predict(self, features) -> torch.Tensor:
        """Class index per vector (softmax, svm) [N] int64."""
        return self.scores(features).argmax(dim=1)


def _objective(kind: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if kind == "softmax":
        return F.cross_entropy(logits, targets)
    if kind == "svm":
        signs = torch.full_like(logits, -1.0)
        signs[torch.arange(len(targets)), targets] = 1.0
        return F.relu(1.0 - signs * logits).pow(2).sum(dim=1).mean()
    if kind == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=1).mean()
    raise ValueError(f"unknown probe {kind!r}; choose one of {PROBES}")


def fit_probe(
    features,
    targets,
    num_classes: int,
    kind: str = "softmax",
    l2: float = 1e-3,
    max_iter: int = 200,
) -> LinearProbe:
    """Fit a linear probe on frozen features.

    features: [N, D] float. targets: [N] int class indices (softmax, svm) or [N, C] 0/1
    (sigmoid). l2: weight of the squared-norm penalty on W (not b). Returns a LinearProbe whose
    scores are logits (softmax, sigmoid) or SVM margins (svm).
    """
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; choose one of {PROBES}")
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must be a non-empty [N, D] array, got shape {tuple(x.shape)}")
    if kind == "sigmoid":
        y = torch.as_tensor(np.asarray(targets), dtype=torch.float32)
        if y.shape != (len(x), num_classes):
            raise ValueError(f"sigmoid targets must be [N, {num_classes}] 0/1, got {tuple(y.shape)}")
    else:
        y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        if y.shape != (len(x),) or int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"targets must be [N] class indices in [0, {num_classes}), got {tuple(y.shape)}")
    mean = x.mean(dim=0)
    # A constant feature (a dead unit) gets std 1: it stays 0 after centring and never matters.
    std = x.std(dim=0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    z = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-4, tolerance_change=1e-7,
    )
    evaluations = 0

    def closure():
        nonlocal evaluations
        evaluations += 1
        optimizer.zero_grad()
        loss = _objective(kind, z @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    small = x.shape[0] * x.shape[1] * num_classes < ONE_THREAD_BELOW
    with torch.enable_grad(), _threads(1 if small else torch.get_num_threads()):
        optimizer.step(closure)
    return LinearProbe(kind, weight.detach(), bias.detach(), mean, std, evaluations)


def mean_class_accuracy(predictions, labels, classes=None) -> float:
    """Mean over classes of the fraction of that class's test images predicted correctly.

    classes: the classes to average over (default: every class present in ``labels``); a class
    without test images is an error rather than a silent zero.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ in shape")
    classes = np.unique(labels) if classes is None else np.asarray(list(classes))
    per_class = []
    for c in classes:
        mask = labels == c
        if not mask.any():
            raise ValueError(f"class {c} has no test images")
        per_class.append(float((predictions[mask] == c).mean()))
    return float(np.mean(per_class))


def average_precision(scores, positives) -> float:
    """PASCAL VOC (2010+) average precision of one class.

    scores: [N] higher = more confident; positives: [N] bool. Ranked by descending score
    (ties keep input order); precision at each rank is made monotone non-increasing from the
    right and integrated over recall. NaN when there is no positive.
    """
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    if scores.shape != positives.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must be equal 1-D shapes")
    n_pos = int(positives.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positives[order]
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / n_pos
    # VOCdevkit: mpre[i] = max(mpre[i], mpre[i+1]) from the right, then sum over recall steps.
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
