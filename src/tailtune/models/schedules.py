"""Learning-rate schedules as per-step factors, so each param group can start its own.

The fine-tuning module keeps every parameter in the optimizer from step 0 and gives the
backbone group a factor of 0 until its unfreeze step. A factor depends only on the step
count, which Lightning checkpoints restore, so resumed runs follow the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def stepping_batches(trainer: Any) -> tuple[int, int]:
    """``(optimizer steps of the whole fit, optimizer steps per epoch)``.

    Per epoch from the loader's length, not ``total // max_epochs``: where
    ``trainer.max_steps`` cuts the fit short, that quotient shrinks every epoch and moves an
    unfreeze step (and its warm-up) into epochs where the backbone is still frozen.
    """
    total = int(trainer.estimated_stepping_batches)  # sets up the train loader if need be
    batches = trainer.num_training_batches
    if math.isinf(batches):  # a loader of unknown length
        return total, max(1, total // max(1, int(trainer.max_epochs or 1)))
    return total, max(1, math.ceil(batches / trainer.accumulate_grad_batches))


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up for ``warmup_epochs``, then cosine decay to ``min_lr_ratio``."""

    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0

    def factor(self, step: int, start: int, end: int, steps_per_epoch: int) -> float:
        if step < start:
            return 0.0
        warmup = int(self.warmup_epochs * steps_per_epoch)
        t = step - start
        if t < warmup:
            return (t + 1) / warmup
        progress = min(1.0, (t - warmup) / max(1, end - start - warmup))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine


@dataclass(frozen=True)
class Constant:
    """A constant learning rate from the group's start step on."""

    def factor(self, step: int, start: int, end: int, steps_per_epoch: int) -> float:
        return 0.0 if step < start else 1.0
