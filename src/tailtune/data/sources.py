"""Image sources: each returns a whole dataset as decoded uint8 images or as image files, plus
labels, class names and any splits the dataset defines itself."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class LabeledImages:
    """A whole dataset: either ``images``, decoded uint8 ``[N, C, H, W]`` with ``C`` 1 or 3,
    or ``paths``, image files the datamodule decodes (once, or per item)."""

    name: str
    labels: np.ndarray
    class_names: list[str]
    images: np.ndarray | None = None
    paths: list[Path] | None = None
    # Splits the dataset defines itself (e.g. a fixed test set); the rest is carved.
    predefined_splits: dict[str, np.ndarray] = field(default_factory=dict)
    # Files left out, by reason ("not an image", "unreadable"): shown in the summary.
    skipped: dict[str, list[str]] = field(default_factory=dict)
    # What the content is, beyond its name (a digest of the file list): part of the split
    # fingerprint, so a checkpoint is not evaluated on a folder whose files changed.
    identity: str = ""

    def __post_init__(self) -> None:
        if (self.images is None) == (self.paths is None):
            raise ValueError("LabeledImages needs exactly one of images or paths")
        count = len(self.images) if self.images is not None else len(self.paths)
        if count != len(self.labels):
            raise ValueError(f"{self.name}: {count} images but {len(self.labels)} labels")
        shape = None if self.images is None else self.images.shape
        if shape is not None and (len(shape) != 4 or shape[1] not in (1, 3)):
            raise ValueError(f"{self.name}: images must be [N, 1|3, H, W], got {shape}")

    def __len__(self) -> int:
        return len(self.labels)


class DigitsSource:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), as 3-channel uint8."""

    name = "digits"

    def load(self) -> LabeledImages:
        from sklearn.datasets import load_digits

        digits = load_digits()
        gray = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)  # values are 0..16
        images = np.repeat(gray[:, None, :, :], 3, axis=1)
        return LabeledImages(
            name=self.name,
            images=images,
            labels=digits.target.astype(np.int64),
            class_names=[str(c) for c in digits.target_names],
        )


class ArraySource:
    """Images already in memory (a notebook, a benchmark, a test).

    ``images`` is uint8 ``[N, H, W, C]``, ``[N, C, H, W]`` or ``[N, H, W]`` (grayscale);
    ``test_images``/``test_labels`` optionally give a fixed test set, as CIFAR has.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 class_names: list[str] | None = None, name: str = "arrays",
                 test_images: np.ndarray | None = None,
                 test_labels: np.ndarray | None = None) -> None:
        self.images = images
        self.labels = labels
        self.class_names = class_names
        self.name = name
        self.test_images = test_images
        self.test_labels = test_labels

    def fingerprint(self) -> str:
        """A digest of the arrays themselves: what feature caches key on."""
        digest = hashlib.sha256(self.name.encode())
        for array in (self.images, self.labels, self.test_images, self.test_labels):
            if array is not None:
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    def load(self) -> LabeledImages:
        images = [channels_first(self.images)]
        labels = [np.asarray(self.labels, dtype=np.int64)]
        splits: dict[str, np.ndarray] = {}
        if self.test_images is not None:
            if self.test_labels is None:
                raise ValueError("test_images needs test_labels")
            images.append(channels_first(self.test_images))
            labels.append(np.asarray(self.test_labels, dtype=np.int64))
            n_train, n_test = len(labels[0]), len(labels[1])
            splits = {"train": np.arange(n_train), "test": np.arange(n_train, n_train + n_test)}
        all_labels = np.concatenate(labels)
        names = self.class_names or [str(c) for c in range(int(all_labels.max()) + 1)]
        # The arrays' digest in the split fingerprint: other arrays of the same size and name
        # must not pass for this data when a checkpoint is resumed, ensembled or built on.
        return LabeledImages(name=self.name, images=np.concatenate(images), labels=all_labels,
                             class_names=list(names), predefined_splits=splits,
                             identity=self.fingerprint())


def channels_first(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` from ``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]``."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        return images.transpose(0, 3, 1, 2)
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images
    raise ValueError(f"cannot tell the channel axis of images shaped {images.shape}")
