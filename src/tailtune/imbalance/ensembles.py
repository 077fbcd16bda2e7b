"""Training-set resampling for ensemble members: balanced bagging and SAMME boosting.

- :class:`BalancedBagSampler` (EasyEnsemble-style balanced bagging, Liu et al. 2009): one
  random balanced under-sample of the training split, drawn once with imbalanced-learn's
  ``RandomUnderSampler`` from the member's ``draw_seed`` and kept for every epoch (shuffled
  per epoch). Different members draw different subsets.
- :class:`SampleWeightSampler`: draws each epoch's list with replacement in proportion to
  per-sample weights: boosting by resampling, which works with any loss and sampler-less model.
- :func:`samme_initial_weights`, :func:`samme_alpha`, :func:`samme_update`: multi-class
  AdaBoost (SAMME, Zhu et al. 2009) with class-balanced initial weights.

Pure numpy; no Lightning, no models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from imblearn.under_sampling import RandomUnderSampler

from tailtune.imbalance.samplers import EpochSampler, Labels


def balanced_bag(labels: np.ndarray, draw_seed: int, num_classes: int | None = None
                 ) -> np.ndarray:
    """Sorted training indices of one balanced random under-sample (every class at the
    smallest class's count). A class with no training sample would balance every class down
    to zero, so it is an error (``num_classes`` says how many classes there are)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes or 0)
    empty = np.flatnonzero(counts == 0).tolist()
    if empty:
        raise ValueError(f"balanced bagging (model.bagging=under) needs every class in the "
                         f"training split; class(es) {empty} have no training sample")
    sampler = RandomUnderSampler(sampling_strategy="auto", random_state=int(draw_seed))
    sampler.fit_resample(np.arange(len(labels))[:, None], labels)
    return np.sort(sampler.sample_indices_)


class BalancedBagSampler(EpochSampler):
    """One fixed balanced under-sample (see the module docstring), reshuffled each epoch."""

    def __init__(self, labels: Labels, seed: int = 0, num_classes: int | None = None,
                 draw_seed: int = 0) -> None:
        super().__init__(labels, seed=seed, num_classes=num_classes)
        self.draw_seed = int(draw_seed)
        self.subset = balanced_bag(self.labels, self.draw_seed, self.num_classes)
        self.num_samples = len(self.subset)

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(self.subset)

    def expected_class_distribution(self, epoch: int | None = None) -> np.ndarray:
        counts = np.bincount(self.labels[self.subset], minlength=self.num_classes)
        return counts / counts.sum()


class SampleWeightSampler(EpochSampler):
    """Each epoch: ``len(labels)`` indices drawn with replacement, ``P(i) ∝ weights[i]``."""

    def __init__(self, labels: Labels, seed: int = 0, num_classes: int | None = None,
                 weights: Sequence[float] | np.ndarray = ()) -> None:
        super().__init__(labels, seed=seed, num_classes=num_classes)
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != self.labels.shape or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"need one non-negative weight per training sample "
                             f"({len(self.labels)}), with a positive sum; got shape {w.shape}")
        self.weights = w / w.sum()

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(len(self.labels), size=self.num_samples, p=self.weights)

    def expected_class_distribution(self, epoch: int | None = None) -> np.ndarray:
        return np.bincount(self.labels, weights=self.weights, minlength=self.num_classes)


def samme_initial_weights(labels: np.ndarray) -> np.ndarray:
    """Class-balanced start: every present class holds the same total weight; sums to 1."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    present = int((counts > 0).sum())
    return 1.0 / (present * counts[labels])


def samme_alpha(error: float, num_classes: int) -> float:
    """SAMME member weight ``log((1 - err) / err) + log(K - 1)``; ``err`` is clipped to
    ``[1e-10, 1 - 1e-10]``, so a perfect member gets a large, finite weight."""
    err = min(max(float(error), 1e-10), 1 - 1e-10)
    return math.log((1 - err) / err) + math.log(num_classes - 1)


def samme_update(weights: np.ndarray, predictions: np.ndarray, labels: np.ndarray,
                 num_classes: int) -> tuple[np.ndarray, float, float]:
    """One boosting round: ``(new weights, weighted error, alpha)``.

    ``err = sum_i w_i [pred_i != y_i] / sum_i w_i``; misclassified samples are multiplied by
    ``exp(alpha)``, then all renormalised. A member no better than chance
    (``err >= 1 - 1/K``) gets ``alpha <= 0``: it is kept with weight 0 and the sample
    weights stay as they were (scikit-learn stops boosting there instead).
    """
    w = np.asarray(weights, dtype=np.float64)
    miss = np.asarray(predictions) != np.asarray(labels)
    error = float((w * miss).sum() / w.sum())
    alpha = samme_alpha(error, num_classes)
    if alpha <= 0:
        return w / w.sum(), error, 0.0
    new = w * np.exp(alpha * miss)
    return new / new.sum(), error, alpha
