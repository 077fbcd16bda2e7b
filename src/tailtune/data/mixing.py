"""Batch mixing: mixup (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019).

A :class:`BatchMix` mixes each training batch with a shuffled copy of itself and returns the
partner labels and the mixing weight ``lam``; the model then trains on
``lam * loss(z, y) + (1 - lam) * loss(z, y_partner)`` (Zhang et al.'s mixed criterion), which
works with every tailtune loss, the prior-corrected ones included, where timm's ``Mixup``
would need soft-target losses. The CutMix box is drawn as in timm's ``rand_bbox``, but from the
mixer's own generator (timm draws from numpy's global state), and ``lam`` is corrected to the
area actually left after clipping.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class BatchMix:
    """Mixup with ``Beta(mixup_alpha, mixup_alpha)`` weights, CutMix with
    ``Beta(cutmix_alpha, cutmix_alpha)`` box areas; with both on, each batch picks one, CutMix
    with probability ``switch_prob``. ``prob``: the share of batches that are mixed at all.
    ``seed`` makes the draws reproducible (they come from their own generator, so they do not
    shift the data order or dropout of a run)."""

    def __init__(self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, switch_prob: float = 0.5, seed: int = 0) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mix alphas must be >= 0, got mixup_alpha={mixup_alpha}, "
                             f"cutmix_alpha={cutmix_alpha}")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError("mix needs mixup_alpha > 0 or cutmix_alpha > 0 (or mix: null)")
        for name, value in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0 <= value <= 1:
                raise ValueError(f"mix.{name} must be in [0, 1], got {value}")
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int) -> None:
        """Restart the draws from ``seed`` (the model does at every epoch start)."""
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, float]:
        """``(mixed images, partner targets, lam)``; ``lam = 1`` leaves the batch as it is."""
        if self.rng.random() >= self.prob:
            return images, targets, 1.0
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha == 0 or self.rng.random() < self.switch_prob)
        order = torch.from_numpy(self.rng.permutation(len(targets))).to(targets.device)
        partner_images, partner = images[order], targets[order]
        if use_cutmix:
            y0, y1, x0, x1 = self._box(images.shape[-2:])
            mixed = images.clone()
            mixed[..., y0:y1, x0:x1] = partner_images[..., y0:y1, x0:x1]
            area = (y1 - y0) * (x1 - x0) / (images.shape[-2] * images.shape[-1])
            return mixed, partner, 1.0 - area
        lam = float(self.rng.beta(self.mixup_alpha, self.mixup_alpha))
        return lam * images + (1 - lam) * partner_images, partner, lam

    def _box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        """A box covering ``1 - lam`` of the image, ``lam ~ Beta(cutmix_alpha, cutmix_alpha)``,
        centred uniformly and clipped to the image."""
        height, width = int(size[0]), int(size[1])
        cut = np.sqrt(1.0 - self.rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        cy, cx = self.rng.integers(height), self.rng.integers(width)
        half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
        return (int(np.clip(cy - half_h, 0, height)), int(np.clip(cy + half_h, 0, height)),
                int(np.clip(cx - half_w, 0, width)), int(np.clip(cx + half_w, 0, width)))
