"""Post-hoc adjustments of a trained classifier, fitted on validation predictions.

Pure functions on logits ``[N, K]`` and integer targets ``[N]``:

- **Logit adjustment** (Menon et al., ICLR 2021): predict ``argmax(z - tau * log pi)``. With a
  model trained on the imbalanced prior ``pi`` and a balanced target, tau = 1 is the Bayes
  correction; :func:`tune_logit_adjustment` picks tau on validation balanced accuracy.
- **Per-class bias** (threshold tuning): ``argmax(z + b)``, ``b`` found by coordinate ascent
  on validation balanced accuracy. More freedom than one tau, so it needs a larger val set.
- **Temperature scaling** (Guo et al., ICML 2017): ``z / T`` with T minimising validation NLL.
  It never changes the argmax, only the calibration (ECE).
- **tau-normalisation** (Kang et al., ICLR 2020): ``w_i / ||w_i||^tau`` for each class's weight
  vector; the scores of a bias-free linear head are then ``(w_i . x) / ||w_i||^tau``.

Tuning on a small validation split fits its noise: :func:`crossfitted_gain` measures, by
K-fold cross-fitting on the validation split itself, whether a tuned adjustment helps on
validation images it was not tuned on; tailtune adopts it only then, and reports the tuned
model's validation score out of fold (:func:`out_of_fold_balanced_accuracy`), since its score on
the images it was tuned on is optimistic.

Balanced accuracy here averages recall over the classes present in the targets, like
``sklearn.metrics.balanced_accuracy_score`` and tailtune's metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import Tensor

__all__ = [
    "balanced_accuracy",
    "cross_fit_folds",
    "crossfitted_gain",
    "expected_calibration_error",
    "fit_temperature",
    "negative_log_likelihood",
    "out_of_fold_balanced_accuracy",
    "tau_norm_logits",
    "tau_normalized_weight",
    "tune_class_bias",
    "tune_logit_adjustment",
    "tune_tau_norm",
]

# Below this many validation images in a class, its recall moves in steps of 5 points or more.
MIN_VAL_PER_CLASS = 20
DEFAULT_TAU_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(41))  # 0 .. 2


def _check(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    logits = torch.as_tensor(logits).detach().float().cpu()
    targets = torch.as_tensor(targets).detach().long().cpu()
    if logits.ndim != 2 or targets.ndim != 1 or len(logits) != len(targets) or len(targets) == 0:
        raise ValueError(f"need logits [N, K] and targets [N] with N > 0, got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    return logits, targets


def _recalls(preds: Tensor, targets: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    support = torch.bincount(targets, minlength=num_classes).double()
    hits = torch.bincount(targets[preds == targets], minlength=num_classes).double()
    present = support > 0
    return hits[present] / support[present], present


def balanced_accuracy(logits: Tensor, targets: Tensor) -> float:
    """Mean recall over the classes present in ``targets`` (predictions are ``argmax``)."""
    logits, targets = _check(logits, targets)
    recall, _ = _recalls(logits.argmax(dim=1), targets, logits.shape[1])
    return float(recall.mean())


def negative_log_likelihood(logits: Tensor, targets: Tensor) -> float:
    logits, targets = _check(logits, targets)
    return float(F.cross_entropy(logits.double(), targets))


def expected_calibration_error(logits: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """Top-label L1 ECE over ``n_bins`` equal-width bins ``[lo, hi)``, the last closed at 1."""
    logits, targets = _check(logits, targets)
    conf, pred = logits.double().softmax(dim=1).max(dim=1)
    idx = (conf * n_bins).long().clamp_(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).double()
    correct = torch.bincount(idx, weights=(pred == targets).double(), minlength=n_bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    return float((correct - conf_sum).abs().sum() / count.sum())


def _pick(grid: Sequence[float], scores: Sequence[float]) -> float:
    """The grid value with the best score; among ties (balanced accuracy is piecewise constant)
    the median one, i.e. the middle of the best plateau rather than its edge."""
    best = max(scores)
    winners = [g for g, s in zip(grid, scores, strict=True) if s >= best - 1e-12]
    return float(winners[(len(winners) - 1) // 2])


def cross_fit_folds(targets: np.ndarray, folds: int, seed: int
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(fit rows, held-out rows)`` of each fold: stratified with as many folds as the
    rarest class allows, plain K-fold when a class has a single row."""
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(targets)
    smallest = int(counts[counts > 0].min())
    folds = min(folds, len(targets))
    splitter: Any = StratifiedKFold(min(folds, smallest), shuffle=True, random_state=seed) \
        if smallest >= 2 else KFold(folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(targets)), targets))


def out_of_fold_balanced_accuracy(
    logits: Tensor, targets: Tensor, fit: Callable[[Tensor, Tensor], Callable[[Tensor], Tensor]],
    folds: int = 5, seed: int = 0,
) -> float | None:
    """Balanced accuracy of out-of-fold predictions: each fold adjusted by what ``fit`` tuned
    on the other folds (``fit(logits, targets) -> adjust``). Stratified folds, at most as many
    as the smallest class has images; None when a class has fewer than 2 (nothing to
    cross-fit). Unlike the score on the images it was tuned on, it is not optimistic."""
    logits, targets = _check(logits, targets)
    counts = torch.bincount(targets)
    if int(counts[counts > 0].min()) < 2:
        return None
    out_of_fold = torch.empty_like(logits)
    for tuned_on, held_out in cross_fit_folds(targets.numpy(), folds, seed):
        adjust = fit(logits[tuned_on], targets[tuned_on])
        out_of_fold[held_out] = adjust(logits[held_out])
    return balanced_accuracy(out_of_fold, targets)


def crossfitted_gain(
    logits: Tensor, targets: Tensor, fit: Callable[[Tensor, Tensor], Callable[[Tensor], Tensor]],
    baseline: Callable[[Tensor], Tensor], folds: int = 5, seed: int = 0,
) -> float | None:
    """:func:`out_of_fold_balanced_accuracy` of ``fit`` minus the balanced accuracy of
    ``baseline`` (the untuned adjustment) on the same images; None where it is None."""
    tuned = out_of_fold_balanced_accuracy(logits, targets, fit, folds, seed)
    if tuned is None:
        return None
    logits, targets = _check(logits, targets)
    return tuned - balanced_accuracy(baseline(logits), targets)


def tune_logit_adjustment(
    logits: Tensor, targets: Tensor, log_prior: Tensor,
    grid: Sequence[float] = DEFAULT_TAU_GRID,
) -> tuple[float, float]:
    """``(tau, balanced accuracy)`` of the best ``argmax(z - tau * log_prior)`` on the grid."""
    logits, targets = _check(logits, targets)
    log_prior = torch.as_tensor(log_prior).float().cpu()
    scores = [balanced_accuracy(logits - tau * log_prior, targets) for tau in grid]
    tau = _pick(grid, scores)
    return tau, balanced_accuracy(logits - tau * log_prior, targets)


def tune_class_bias(
    logits: Tensor, targets: Tensor, init: Tensor | None = None,
    grid: Sequence[float] = tuple(np.linspace(-2.0, 2.0, 41)), sweeps: int = 2,
) -> Tensor:
    """Per-class additive biases ``b`` maximising the balanced accuracy of ``argmax(z + b)``.

    Coordinate ascent: each sweep tries, for one class at a time, every offset in ``grid``
    around its current bias and keeps the best (ties keep the smallest change). Only that
    class's column moves, so each candidate costs O(N): a sample is predicted as class ``c``
    iff ``z_c + b_c`` beats the best other adjusted score.
    """
    logits, targets = _check(logits, targets)
    n, k = logits.shape
    bias = torch.zeros(k) if init is None else torch.as_tensor(init).float().clone()
    offsets = torch.tensor(sorted(grid, key=abs), dtype=torch.float32)  # ties: smallest change
    support = torch.bincount(targets, minlength=k).float()
    present = support > 0
    for _ in range(sweeps):
        for c in range(k):
            scores = logits + bias
            others = scores.clone()
            others[:, c] = -math.inf
            best_other, other_pred = others.max(dim=1)
            candidates = bias[c] + offsets                               # [G]
            wins = (logits[:, c:c + 1] + candidates[None, :]) > best_other[:, None]  # [N, G]
            preds = torch.where(wins, torch.full_like(wins, c, dtype=torch.long),
                                other_pred[:, None].expand(n, len(offsets)))
            correct = (preds == targets[:, None]).float()                 # [N, G]
            hits = torch.zeros(k, len(offsets)).index_add_(0, targets, correct)
            bal = (hits[present] / support[present, None]).mean(dim=0)    # [G]
            bias[c] = candidates[int(torch.argmax(bal))]  # first max = smallest change
    return bias


def fit_temperature(logits: Tensor, targets: Tensor, bounds: tuple[float, float] = (0.05, 20.0)
                    ) -> float:
    """The temperature T minimising the NLL of ``softmax(z / T)`` (bounded 1-D search on log T)."""
    logits, targets = _check(logits, targets)
    z = logits.double()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), targets))

    result = minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])),
                             method="bounded", options={"xatol": 1e-4})
    return float(math.exp(result.x))


def tau_normalized_weight(weight: Tensor, tau: float) -> Tensor:
    """``w_i / ||w_i||^tau`` for each row (class) of a linear head's weight."""
    norms = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return weight / norms.pow(tau)


def tau_norm_logits(dot_logits: Tensor, weight_norms: Tensor, tau: float,
                    bias: Tensor | None = None) -> Tensor:
    """Scores of a tau-normalised head from its bias-free scores ``w_i . x``."""
    scores = dot_logits / weight_norms.clamp_min(1e-12).pow(tau)
    return scores if bias is None else scores + bias


def tune_tau_norm(
    dot_logits: Tensor, targets: Tensor, weight_norms: Tensor, bias: Tensor | None = None,
    grid: Sequence[float] = tuple(round(0.1 * i, 1) for i in range(21)),
) -> tuple[float, float]:
    """``(tau, balanced accuracy)`` of the best tau-normalisation on the grid (0..2 by 0.1)."""
    dot_logits, targets = _check(dot_logits, targets)
    norms = torch.as_tensor(weight_norms).float().cpu()
    b = None if bias is None else torch.as_tensor(bias).float().cpu()
    scores = [balanced_accuracy(tau_norm_logits(dot_logits, norms, t, b), targets) for t in grid]
    tau = _pick(grid, scores)
    return tau, balanced_accuracy(tau_norm_logits(dot_logits, norms, tau, b), targets)
