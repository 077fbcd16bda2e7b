"""Per-class weights from class counts, shared by the losses and the weighted samplers.

Both re-weight by the same formulas (a weighted sampler draws a sample of class ``j`` with
probability ``∝ w_j``, a weighted loss scales its term by ``w_j``), so they live here, below
both: :mod:`~tailtune.imbalance.losses` re-exports them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import torch
from torch import Tensor

__all__ = ["Counts", "as_counts", "clamped_counts", "effective_number_weights",
           "inverse_frequency_weights"]

Counts: TypeAlias = Sequence[float] | np.ndarray | Tensor


def as_counts(class_counts: Counts) -> np.ndarray:
    """Validate ``class_counts`` and return them as a float64 array (unclamped)."""
    if isinstance(class_counts, Tensor):
        class_counts = class_counts.detach().cpu().numpy()
    elif not isinstance(class_counts, np.ndarray):
        class_counts = list(class_counts)  # also unwraps OmegaConf ListConfig
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"class_counts must be a non-empty 1-D sequence, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"class_counts must be finite and non-negative, got {counts.tolist()}")
    total = counts.sum()
    if 0 < total <= 1 + 1e-6 and not np.allclose(counts, np.round(counts)):
        raise ValueError(
            "class_counts look like probabilities (they sum to 1); pass counts instead, e.g. "
            "len(sampler) * sampler.expected_class_distribution()"
        )
    return counts


def clamped_counts(class_counts: Counts) -> np.ndarray:
    # An empty class is treated as having one sample: finite logs/powers, largest weight.
    return np.maximum(as_counts(class_counts), 1.0)


def _normalise_to_k(w: np.ndarray) -> Tensor:
    return torch.as_tensor(w * (w.size / w.sum()), dtype=torch.float32)


def inverse_frequency_weights(
    class_counts: Counts, power: float = 1.0
) -> Tensor:
    """``w_j ∝ n_j^-power`` normalised to sum to K (power 1: inverse, 0.5: sqrt-inverse)."""
    return _normalise_to_k(clamped_counts(class_counts) ** -power)


def effective_number_weights(
    class_counts: Counts, beta: float = 0.9999
) -> Tensor:
    """Cui et al. 2019: ``w_j = (1 - beta) / (1 - beta^n_j)`` normalised to sum to K."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = clamped_counts(class_counts)
    # 1 - beta^n via expm1 keeps precision for beta close to 1 (beta^n ~ 1 - n(1-beta)).
    one_minus_beta_n = -np.expm1(n * math.log(beta)) if beta > 0 else np.ones_like(n)
    return _normalise_to_k((1.0 - beta) / one_minus_beta_n)
