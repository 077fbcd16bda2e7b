"""Modules of the tests' own. PlainProbe is a transfer approach: a module and a config are all
it takes (tests/test_build.py builds and trains it through the build layer, which knows nothing
of it). Identity's "images" are its logits, for checks of the post-hoc and ensemble maths."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tailtune.data.info import DatasetInfo
from tailtune.features.extractor import FeatureExtractor
from tailtune.models.base import ClassifierModule


class PlainProbe(ClassifierModule):
    """A linear head on raw frozen features, trained with plain SGD."""

    kind = "plain_probe"
    trains_on_features = True  # the build layer gives it an extractor and cached features

    def __init__(self, extractor: FeatureExtractor, info: DatasetInfo, loss: nn.Module,
                 lr: float = 0.1, **base_kwargs: Any) -> None:
        super().__init__(info=info, loss=loss, **base_kwargs)
        self.extractor = extractor
        self.head = nn.Linear(extractor.num_features, info.num_classes)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.extractor(x) if x.ndim == 4 else x.float())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=self.lr)


class Identity(ClassifierModule):
    """Its inputs are its logits."""

    def forward(self, x: Tensor) -> Tensor:
        return x
