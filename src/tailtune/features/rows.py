"""Feature rows as a dataset: what a feature datamodule's loaders serve instead of images."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.utils.data import Dataset


class FeatureRows(Dataset):
    """Feature rows ``[N, D]`` and their labels ``[N]``, in memory: a split's features."""

    def __init__(self, features: Tensor, labels: Tensor) -> None:
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.features[index], self.labels[index]


class ResampledRows(Dataset):
    """The rows a feature-space resampler (:mod:`tailtune.imbalance.resampling`) serves in
    the current epoch: its latest draw (``resampler.draw``), which it replaces each time the
    loader iterates it, before any row of that epoch is read."""

    def __init__(self, resampler: Any) -> None:
        self.resampler = resampler

    def __len__(self) -> int:
        return len(self.resampler.draw.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        draw = self.resampler.draw
        return draw.features[index], draw.labels[index]
