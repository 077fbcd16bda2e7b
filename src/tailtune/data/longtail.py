"""Stratified splits and the standard long-tail construction, on label arrays only."""

from __future__ import annotations

import hashlib

import numpy as np
from sklearn.model_selection import train_test_split

PROFILES = ("exp", "step")


def long_tail_counts(
    n_max: int, num_classes: int, imbalance_ratio: float, profile: str = "exp"
) -> list[int]:
    """Per-class counts of the standard CIFAR-LT construction.

    ``exp``: ``n_i = int(n_max * ratio^(-i/(K-1)))`` (CIFAR-10 at ratio 100 gives
    5000, 2997, ..., 50). ``step``: the first half keeps ``n_max``, the rest ``n_max / ratio``.
    """
    if imbalance_ratio < 1:
        raise ValueError(f"data.imbalance_ratio must be >= 1, got {imbalance_ratio}")
    if profile not in PROFILES:
        raise ValueError(f"unknown long-tail profile '{profile}'; valid: {', '.join(PROFILES)}")
    if num_classes == 1:
        return [n_max]
    if profile == "exp":
        k = num_classes - 1
        return [int(n_max * imbalance_ratio ** (-i / k)) for i in range(num_classes)]
    half = num_classes // 2
    return [n_max if i < half else int(n_max / imbalance_ratio) for i in range(num_classes)]


def make_long_tailed(
    indices: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    imbalance_ratio: float,
    profile: str = "exp",
    seed: int = 0,
) -> np.ndarray:
    """Subsample ``indices`` (into ``labels``) so class ``i`` keeps the profile's count.

    ``n_max`` is the smallest per-class count available, so every class can supply its share;
    which samples are kept is drawn with ``seed``.
    """
    if imbalance_ratio == 1:
        return np.sort(indices)
    by_class = [indices[labels[indices] == c] for c in range(num_classes)]
    n_max = min(len(idx) for idx in by_class)
    targets = long_tail_counts(n_max, num_classes, imbalance_ratio, profile)
    if min(targets) < 1:
        raise ValueError(
            f"data.imbalance_ratio={imbalance_ratio} leaves a class with no training samples "
            f"(largest class {n_max}); lower the ratio"
        )
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(idx)[:n] for idx, n in zip(by_class, targets, strict=True)]
    return np.sort(np.concatenate(kept))


def stratified_split(
    indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split off ``fraction`` of ``indices``, stratified by label. Returns (rest, carved)."""
    rest, carved = train_test_split(
        indices, test_size=fraction, stratify=labels[indices], random_state=seed
    )
    return np.sort(rest), np.sort(carved)


# A subsample keeps at least this many images of a class (or all it has): neighbour-based
# samplers (SMOTE, ADASYN: k=5) need k + 1 of each class.
SUBSAMPLE_MIN_PER_CLASS = 6


def stratified_subsample(indices: np.ndarray, labels: np.ndarray, size: int, seed: int
                         ) -> np.ndarray:
    """About ``size`` of ``indices`` in their class proportions, but never fewer than
    :data:`SUBSAMPLE_MIN_PER_CLASS` of a class (or all it has), drawn with ``seed``, sorted:
    the ``subsample`` of quick checks."""
    indices = np.asarray(indices)
    if len(indices) <= size:
        return indices
    y = labels[indices]
    classes, counts = np.unique(y, return_counts=True)
    quota = np.floor(counts * size / len(indices)).astype(int)
    quota = np.minimum(counts, np.maximum(quota, SUBSAMPLE_MIN_PER_CLASS))
    rng = np.random.default_rng(seed)
    kept = [rng.choice(indices[y == c], q, replace=False)
            for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(kept))


def split_fingerprint(name: str, splits: dict[str, np.ndarray]) -> str:
    """Short hash of the dataset name and the exact split indices."""
    digest = hashlib.sha256(name.encode())
    for split in sorted(splits):
        digest.update(split.encode())
        digest.update(np.ascontiguousarray(splits[split], dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]
