"""Classifier heads on top of pooled backbone features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEADS = ("linear", "cosine")


class CosineHead(nn.Module):
    """``s * cos(w_j, x)``: the normalised head LDAM needs (without it LDAM diverges).

    The logits it produces are already scaled by ``s``; metrics, calibration and post-hoc
    adjustment all see these logits.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).uniform_(-1.0, 1.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


def build_head(
    kind: str, in_features: int, num_classes: int, scale: float = 30.0, dropout: float = 0.0
) -> nn.Module:
    if kind == "linear":
        head: nn.Module = nn.Linear(in_features, num_classes)
    elif kind == "cosine":
        head = CosineHead(in_features, num_classes, scale)
    else:
        raise ValueError(f"unknown head '{kind}'; valid: {', '.join(HEADS)}")
    return nn.Sequential(nn.Dropout(dropout), head) if dropout > 0 else head
