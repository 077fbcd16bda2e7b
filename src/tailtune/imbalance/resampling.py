"""Feature-space resampling with imbalanced-learn: SMOTE and friends on training features.

SMOTE, Borderline-SMOTE and ADASYN synthesise new points; Tomek links, ENN and NearMiss pick
points by distance. All of them need feature vectors, so they work only where training
batches are features: ``model=linear_probe`` and ``model=decoupled``. Each class here is
marked ``feature_space = True``, which the build layer reads to refuse them, with the reason,
under a model that trains on images.

A resampler is a :class:`~torch.utils.data.Sampler` that owns the rows it serves: at each
epoch (``set_epoch``) it resamples the training features with a random state drawn from
``(seed, epoch)``, keeps them as its :attr:`FeatureResampler.draw`, and yields a permutation
of them (the feature datamodule serves the draw's rows, :mod:`tailtune.features.rows`).
``per_epoch=False`` draws once (from epoch 0) and reuses that set. Val and test
features never pass through here.

Epoch length. Most methods give the same number of rows every epoch (SMOTE, ADASYN and
NearMiss fix the per-class counts from the labels; Tomek links and ENN are deterministic).
SMOTE-Tomek and SMOTE-ENN clean a random synthetic set, so their size varies a little; the
epoch length is fixed to the first draw's (needed by DDP sharding and Lightning's batch
count), and later epochs are truncated or topped up with rows drawn uniformly from their own
resampled set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from imblearn.combine import SMOTEENN, SMOTETomek
from imblearn.over_sampling import ADASYN, SMOTE, BorderlineSMOTE
from imblearn.under_sampling import EditedNearestNeighbours, NearMiss, TomekLinks
from torch import Tensor
from torch.utils.data import Sampler

__all__ = [
    "ADASYNSampler",
    "BorderlineSMOTESampler",
    "ENNSampler",
    "Draw",
    "FeatureResampler",
    "NearMissSampler",
    "SMOTEENNSampler",
    "SMOTESampler",
    "SMOTETomekSampler",
    "TomekLinksSampler",
    "is_feature_space",
]


def is_feature_space(factory: Any) -> bool:
    """True for a resampler (class or ``functools.partial`` of one) that needs features."""
    return bool(getattr(getattr(factory, "func", factory), "feature_space", False))


class Draw(NamedTuple):
    """The rows a resampler serves in an epoch: features ``[M, D]`` and labels ``[M]``."""

    features: Tensor
    labels: Tensor


class FeatureResampler(Sampler[int]):
    """Base class: resample ``(features, labels)`` per epoch, serve a permutation of the result.

    Subclasses set ``_imblearn`` (the imbalanced-learn class) and ``_randomised`` (whether it
    takes a ``random_state``); extra keyword arguments go to the imbalanced-learn class.
    """

    feature_space: ClassVar[bool] = True
    _imblearn: ClassVar[type]
    _randomised: ClassVar[bool] = True

    def __init__(
        self,
        features: Tensor | np.ndarray,
        labels: Tensor | np.ndarray,
        seed: int = 0,
        num_classes: int | None = None,
        per_epoch: bool = True,
        sampling_strategy: str | float | Mapping[int, int] = "auto",
        **params: Any,
    ) -> None:
        super().__init__()
        x = features.detach().cpu().float().numpy() if isinstance(features, Tensor) \
            else np.asarray(features, dtype=np.float32)
        y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
            raise ValueError(f"{type(self).__name__} needs features [N, D] and labels [N], got "
                             f"{x.shape} and {y.shape}")
        self.features = np.ascontiguousarray(x, dtype=np.float32)
        self.labels = y.astype(np.int64)
        self.seed = int(seed)
        self.num_classes = int(num_classes) if num_classes is not None else int(y.max()) + 1
        self.class_counts = np.bincount(self.labels, minlength=self.num_classes)
        self.per_epoch = bool(per_epoch)
        if isinstance(sampling_strategy, Mapping):  # also a DictConfig, which imblearn rejects
            sampling_strategy = {int(k): int(v) for k, v in sampling_strategy.items()}
        self.sampling_strategy = sampling_strategy
        self.params = dict(params)
        self.epoch = 0
        self._memo: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        x0, y0 = self.resample(0)
        self.num_samples = len(y0)
        self._first_counts = np.bincount(y0, minlength=self.num_classes)
        self.draw = Draw(torch.from_numpy(x0), torch.from_numpy(y0))
        self._last_labels: np.ndarray | None = None

    # -- resampling ----------------------------------------------------------------------------
    def _build(self, random_state: int) -> Any:
        kwargs = dict(self.params, sampling_strategy=self.sampling_strategy)
        if self._randomised:
            kwargs["random_state"] = random_state
        return self._imblearn(**kwargs)

    def _draw_epoch(self, epoch: int) -> int:
        """The epoch whose draw serves ``epoch``: itself, or 0 for a fixed set or a
        deterministic method."""
        return epoch if self.per_epoch and self._randomised else 0

    def resample(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(features, labels)`` after resampling for ``epoch``: originals kept by the method
        first, then any synthetic rows (imbalanced-learn's order)."""
        epoch = self._draw_epoch(epoch)
        if epoch in self._memo:
            return self._memo[epoch]
        random_state = int(np.random.default_rng([self.seed, epoch]).integers(2**31 - 1))
        try:
            x, y = self._build(random_state).fit_resample(self.features, self.labels)
        except (ValueError, RuntimeError) as err:  # ADASYN raises RuntimeError on some data
            raise ValueError(
                f"{type(self).__name__}: imbalanced-learn rejected {self.params or 'the defaults'}"
                f" for training class counts {self.class_counts.tolist()}: {err}") from err
        result = (np.ascontiguousarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64))
        self._memo = {epoch: result}  # keep only the current draw
        return result

    # -- Sampler protocol -------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __iter__(self):
        x, y = self.resample(self.epoch)
        self.draw = Draw(torch.from_numpy(x), torch.from_numpy(y))
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        order = rng.permutation(len(y))
        if len(order) > self.num_samples:
            order = order[: self.num_samples]
        elif len(order) < self.num_samples:
            order = np.concatenate([order, rng.integers(0, len(y), self.num_samples - len(y))])
        self._last_labels = y[order]
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.num_samples

    # -- what the loss and the logs read ----------------------------------------------------
    def expected_class_distribution(self, epoch: int | None = None) -> np.ndarray:
        """Class distribution of the resampled set (the first draw's: the per-class counts
        follow from the strategy, not the epoch)."""
        return self._first_counts / self._first_counts.sum()

    def expected_class_counts(self, epoch: int | None = None) -> np.ndarray:
        return len(self) * self.expected_class_distribution(epoch)

    def drawn_class_histogram(self) -> np.ndarray:
        if self._last_labels is None:
            return self._first_counts.copy()
        return np.bincount(self._last_labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rows={len(self)}, num_classes={self.num_classes}, "
                f"seed={self.seed}, per_epoch={self.per_epoch}, params={self.params})")


class SMOTESampler(FeatureResampler):
    """SMOTE (Chawla et al., JAIR 2002): new minority points on segments to k same-class
    neighbours. ``k_neighbors`` (default 5) must be below the smallest class's count."""

    _imblearn = SMOTE


class BorderlineSMOTESampler(FeatureResampler):
    """Borderline-SMOTE (Han et al., ICIC 2005): SMOTE only from minority points near the class
    border ("in danger": most of their ``m_neighbors`` belong to other classes)."""

    _imblearn = BorderlineSMOTE


class ADASYNSampler(FeatureResampler):
    """ADASYN (He et al., IJCNN 2008): more synthetic points where a minority class is harder to
    learn (more other-class points among its ``n_neighbors``)."""

    _imblearn = ADASYN


class _SMOTEThenClean(FeatureResampler):
    """SMOTE, then a cleaning step; ``k_neighbors`` and ``sampling_strategy`` go to the inner
    SMOTE (imbalanced-learn reads the outer strategy only when it builds SMOTE itself)."""

    def _build(self, random_state: int) -> Any:
        params = dict(self.params)
        smote = SMOTE(sampling_strategy=self.sampling_strategy,
                      k_neighbors=params.pop("k_neighbors", 5), random_state=random_state)
        return self._imblearn(sampling_strategy=self.sampling_strategy, smote=smote,
                              random_state=random_state, **params)


class SMOTETomekSampler(_SMOTEThenClean):
    """SMOTE followed by removing Tomek links (Batista et al., SIGKDD Explorations 2004)."""

    _imblearn = SMOTETomek


class SMOTEENNSampler(_SMOTEThenClean):
    """SMOTE followed by Edited Nearest Neighbours cleaning (Batista et al., 2004)."""

    _imblearn = SMOTEENN


class TomekLinksSampler(FeatureResampler):
    """Remove Tomek links (Tomek, 1976): pairs of mutual nearest neighbours of different classes
    lose their majority member. Deterministic, so every epoch serves the same rows."""

    _imblearn = TomekLinks
    _randomised = False


class ENNSampler(FeatureResampler):
    """Edited Nearest Neighbours (Wilson, 1972): drop non-minority points whose ``n_neighbors``
    disagree with their label. Deterministic."""

    _imblearn = EditedNearestNeighbours
    _randomised = False


class NearMissSampler(FeatureResampler):
    """NearMiss (Mani & Zhang, ICML 2003 workshop): under-sample every class to the minority's
    count, keeping the points nearest to the minority (``version`` 1, 2 or 3). Deterministic."""

    _imblearn = NearMiss
    _randomised = False
