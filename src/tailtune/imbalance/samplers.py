"""Epoch-seeded index samplers over the training split.

Each sampler draws a fresh index list per epoch from a generator seeded by ``(seed, epoch)`` alone
(never the rank or the global RNG). Hence:

* the same seed and epoch always give the same list, so a resumed run continues the sequence;
* under DDP, Lightning's ``DistributedSamplerWrapper`` calls ``list(sampler)`` on every rank and
  shards the result (padding it to a multiple of the world size); all ranks draw the same list,
  so the shards are consistent. ``set_epoch`` must be called every epoch
  (:class:`tailtune.callbacks.SamplerEpoch` does; Lightning >= 2.6 forwards it through the
  wrapper, 2.4/2.5 do not).

The generator is ``np.random.default_rng([seed, epoch])`` rather than ``seed + epoch``: with a sum,
seed s at epoch e + 1 would replay seed s + 1 at epoch e, correlating runs that differ in seed.

````expected_class_distribution(epoch)`` is the class distribution the sampler produces in
expectation at an epoch; prior-based losses correct for ``expected_class_counts(epoch)`` of the
epoch they train on (not the raw counts), so the imbalance is not corrected twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from imblearn.over_sampling import RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler
from torch import Tensor
from torch.utils.data import Sampler

from tailtune.imbalance.weights import effective_number_weights

__all__ = [
    "ClassBalancedSampler",
    "EpochSampler",
    "OverSampler",
    "ProgressiveSampler",
    "ShuffleSampler",
    "UnderSampler",
    "WeightedSampler",
    "sampled_class_counts",
]

Labels = Sequence[int] | np.ndarray | Tensor


def _positive_int(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if int(value) != value or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def sampled_class_counts(sampler: Any, class_counts: Sequence[float], epoch: int) -> np.ndarray:
    """The expected class counts a training sampler draws in ``epoch``; the real counts for a
    sampler that does not say (a plain shuffle draws them)."""
    expected = getattr(sampler, "expected_class_counts", None)
    if expected is None:
        return np.asarray(class_counts, dtype=np.float64)
    return np.asarray(expected(epoch), dtype=np.float64)


class EpochSampler(Sampler[int]):
    """Base class: label bookkeeping, per-epoch seeding and logging helpers."""

    # Index samplers pick rows of the training split; feature-space resamplers
    # (:mod:`tailtune.imbalance.resampling`) declare True: they need feature vectors.
    feature_space: ClassVar[bool] = False

    def __init__(self, labels: Labels, seed: int = 0, num_classes: int | None = None) -> None:
        super().__init__()
        if isinstance(labels, Tensor):
            labels = labels.detach().cpu().numpy()
        elif not isinstance(labels, np.ndarray):
            labels = list(labels)
        y = np.asarray(labels)
        if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"labels must be a non-empty 1-D integer sequence, got {y.dtype}{y.shape}"
            )
        if y.min() < 0:
            raise ValueError("labels must be non-negative class indices")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        k = int(y.max()) + 1 if num_classes is None else int(num_classes)
        if k <= y.max():
            raise ValueError(f"num_classes={num_classes} but labels go up to {int(y.max())}")
        self.labels = y.astype(np.int64)
        self.seed = int(seed)
        self.num_classes = k
        self.class_counts = np.bincount(self.labels, minlength=k)
        self.num_samples = len(self.labels)
        self.epoch = 0
        self._last: np.ndarray | None = None
        self._start = 0  # where the next iteration starts in its epoch's order (resume_at)
        # Indices grouped by class, for "pick a class, then an instance" draws.
        self._by_class = np.argsort(self.labels, kind="stable")
        self._class_start = np.concatenate([[0], np.cumsum(self.class_counts)[:-1]])

    # -- subclass API -----------------------------------------------------------------------
    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def expected_class_distribution(self, epoch: int | None = None) -> np.ndarray:
        """K probabilities: the class distribution drawn in expectation at ``epoch`` (default:
        the current one). Only a progressive sampler's depends on the epoch."""
        raise NotImplementedError

    # -- common -----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def resume_at(self, position: int) -> None:
        """Start the next iteration at ``position`` of its epoch's order, once: a run resumed
        mid-epoch then draws the samples the interrupted epoch had not reached, instead of
        replaying the epoch's start. (The length stays the whole epoch's.)"""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        self._start = int(position)

    def __iter__(self):
        self._last = self._draw(self._rng(self.epoch))
        start, self._start = self._start, 0
        return iter(self._last[start:].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def expected_class_counts(self, epoch: int | None = None) -> np.ndarray:
        """Expected per-class counts drawn in ``epoch``: the prior a loss trained on this
        epoch's batches sees (prior-based losses correct for it, not the raw counts)."""
        return len(self) * self.expected_class_distribution(epoch)

    def drawn_class_histogram(self) -> np.ndarray:
        """Per-class counts of the last drawn epoch list (drawn now for this epoch if none yet)."""
        drawn = self._last if self._last is not None else self._draw(self._rng(self.epoch))
        return np.bincount(self.labels[drawn], minlength=self.num_classes)

    def _draw_by_class(self, rng: np.random.Generator, class_probs: np.ndarray) -> np.ndarray:
        # Class first, then a uniform instance inside it: the same distribution as per-sample
        # weights w_i = class_probs[y_i] / n_{y_i}, in O(num_samples), and without
        # torch.multinomial's 2^24-category limit. Zero-probability (e.g. empty) classes are
        # never chosen, so the instance draw never sees n = 0.
        cls = rng.choice(self.num_classes, size=self.num_samples, p=class_probs)
        offset = rng.integers(0, self.class_counts[cls])
        return self._by_class[self._class_start[cls] + offset]

    def _instance_balanced(self) -> np.ndarray:
        return self.class_counts / self.class_counts.sum()

    def _class_balanced(self) -> np.ndarray:
        present = (self.class_counts > 0).astype(np.float64)
        return present / present.sum()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={len(self)}, "
            f"num_classes={self.num_classes}, seed={self.seed})"
        )


class ShuffleSampler(EpochSampler):
    """A plain per-epoch permutation (no re-balancing)."""

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(len(self.labels))

    def expected_class_distribution(self, epoch: int | None = None) -> np.ndarray:
        return self._instance_balanced()


class WeightedSampler(EpochSampler):
    """Sampling with replacement with per-sample weights (``WeightedRandomSampler`` equivalent).

    ``weighting="power"``: ``w_i = n_{y_i}^-q`` (q=1 class-balanced, q=0.5 square-root, q=0
    instance-balanced), so class j is drawn with probability ``∝ n_j^(1-q)``.
    ``weighting="effective_number"``: ``w_i`` = Cui et al.'s ``(1-beta)/(1-beta^n_{y_i})``.
    """

    WEIGHTINGS: ClassVar[tuple[str, ...]] = ("power", "effective_number")

    def __init__(
        self,
        labels: Labels,
        seed: int = 0,
        num_classes: int | None = None,
        q: float = 1.0,
        weighting: str = "power",
        beta: float = 0.9999,
        num_samples: int | None = None,
    ) -> None:
        super().__init__(labels, seed=seed, num_classes=num_classes)
        if weighting not in self.WEIGHTINGS:
            raise ValueError(
                f"unknown weighting {weighting!r}; valid: {', '.join(self.WEIGHTINGS)}"
            )
        self.q, self.weighting, self.beta = float(q), weighting, float(beta)
        self.num_samples = _positive_int("num_samples", num_samples, len(self.labels))
        n = self.class_counts.astype(np.float64)
        if weighting == "power":
            per_sample = np.power(np.maximum(n, 1.0), -self.q)
        else:
            per_sample = effective_number_weights(n, beta=beta).double().numpy()
        mass = n * per_sample  # empty classes get 0 mass
        self._class_probs = mass / mass.sum()

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        return self._draw_by_class(rng, self._class_probs)

    def expected_class_distribution(self, epoch: int | None = None) -> np.ndarray:
        return self._class_probs.copy()


class _ImblearnSampler(EpochSampler):
    """Shared logic for imbalanced-learn's index-based random over/under-samplers."""

    _resampler: ClassVar[type]

    def __init__(
        self,
        labels: Labels,
        seed: int = 0,
        num_classes: int | None = None,
        sampling_strategy: str | float | Mapping[int, int] = "auto",
    ) -> None:
        super().__init__(labels, seed=seed, num_classes=num_classes)
        self.sampling_strategy = self._check_strategy(sampling_strategy)
        self._check_counts()
        # imblearn resamples features; giving it the row index as the only feature lets us
        # read the chosen rows back from ``sample_indices_``.
        self._x = np.arange(len(self.labels))[:, None]
        # Per-class output counts depend only on the strategy, not the random state, so one
        # draw fixes len() for every epoch.
        drawn = self._draw(self._rng(0))
        self._drawn_counts = np.bincount(self.labels[drawn], minlength=self.num_classes)
        self.num_samples = len(drawn)
        self._check_drawn()

    def _check_counts(self) -> None:
        """Hook: reject class counts the resampler cannot handle (before any draw)."""

    def _check_drawn(self) -> None:
        """Hook: reject a strategy whose output is unusable (after the first draw)."""

    def _check_strategy(self, strategy: Any) -> Any:
        if isinstance(strategy, Mapping):  # also an OmegaConf DictConfig, which imblearn rejects
            strategy = {int(k): int(v) for k, v in strategy.items()}
            valid = np.flatnonzero(self.class_counts).tolist()
            unknown = sorted(set(strategy) - set(valid))
            if unknown:
                raise ValueError(
                    f"{type(self).__name__}: sampling_strategy names class(es) {unknown} that "
                    f"have no training samples; valid classes: {valid}"
                )
        return strategy

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        resampler = self._resampler(
            sampling_strategy=self.sampling_strategy, random_state=int(rng.integers(2**31 - 1))
        )
        try:
            resampler.fit_resample(self._x, self.labels)
        except ValueError as err:
            raise ValueError(
                f"{type(self).__name__}: imbalanced-learn rejected "
                f"sampling_strategy={self.sampling_strategy!r} for class counts "
                f"{self.class_counts.tolist()}: {err}"
            ) from err
        # imblearn returns originals then additions in class order; shuffle for SGD.
        return rng.permutation(resampler.sample_indices_)

    def expected_class_distribution(self, epoch: int | None = None) -> np.ndarray:
        return self._drawn_counts / self._drawn_counts.sum()


class OverSampler(_ImblearnSampler):
    """imbalanced-learn ``RandomOverSampler``: duplicate minority samples (fresh per epoch).

    ``"auto"`` raises every class to the majority count. Classes with no samples stay empty.
    """

    _resampler = RandomOverSampler


class UnderSampler(_ImblearnSampler):
    """imbalanced-learn ``RandomUnderSampler``: a fresh random subset per epoch.

    ``"auto"`` keeps exactly the smallest class's count of every class. Empty classes are an
    error, since balancing down to the smallest class would leave nothing.
    """

    _resampler = RandomUnderSampler

    def _check_counts(self) -> None:
        empty = np.flatnonzero(self.class_counts == 0).tolist()
        if empty:
            raise ValueError(
                f"UnderSampler: class(es) {empty} have no training samples, so under-sampling "
                "would balance every class down to zero; drop those classes or use a "
                "weighted/over/class_balanced sampler"
            )

    def _check_drawn(self) -> None:
        emptied = np.flatnonzero((self.class_counts > 0) & (self._drawn_counts == 0)).tolist()
        if emptied:
            raise ValueError(
                f"UnderSampler: sampling_strategy={self.sampling_strategy!r} under-samples "
                f"class(es) {emptied} to zero"
            )


class ClassBalancedSampler(EpochSampler):
    """Pick a class uniformly (among non-empty classes), then an instance uniformly in it."""

    def __init__(
        self,
        labels: Labels,
        seed: int = 0,
        num_classes: int | None = None,
        num_samples: int | None = None,
    ) -> None:
        super().__init__(labels, seed=seed, num_classes=num_classes)
        self.num_samples = _positive_int("num_samples", num_samples, len(self.labels))

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        return self._draw_by_class(rng, self._class_balanced())

    def expected_class_distribution(self, epoch: int | None = None) -> np.ndarray:
        return self._class_balanced()


class ProgressiveSampler(EpochSampler):
    """Progressively balanced sampling (Kang et al. 2020).

    ``p(t) = (1 - t/T) p_IB + (t/T) p_CB`` with t the epoch and ``T = num_epochs - 1``: instance-
    balanced at the first epoch, class-balanced at the last (and after it). With one epoch (T=0)
    that epoch is the last, so it is class-balanced.
    """

    def __init__(
        self,
        labels: Labels,
        seed: int = 0,
        num_classes: int | None = None,
        *,
        num_epochs: int,
        num_samples: int | None = None,
    ) -> None:
        super().__init__(labels, seed=seed, num_classes=num_classes)
        self.num_epochs = _positive_int("num_epochs", num_epochs, 1)
        self.num_samples = _positive_int("num_samples", num_samples, len(self.labels))

    def balance_at(self, epoch: int) -> float:
        """Weight t/T of the class-balanced component at ``epoch``, in [0, 1]."""
        t_max = self.num_epochs - 1
        return 1.0 if t_max == 0 else min(epoch / t_max, 1.0)

    @property
    def balance(self) -> float:
        """:meth:`balance_at` the current epoch."""
        return self.balance_at(self.epoch)

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        return self._draw_by_class(rng, self.expected_class_distribution())

    def expected_class_distribution(self, epoch: int | None = None) -> np.ndarray:
        a = self.balance_at(self.epoch if epoch is None else epoch)
        return (1.0 - a) * self._instance_balanced() + a * self._class_balanced()
