"""Losses for class-imbalanced classification.

Every loss subclasses :class:`ImbalanceLoss` and is built as ``Loss(class_counts=..., **hparams)``
with ``forward(logits[N, K], target[N]) -> scalar`` (mean reduction).

``class_counts``
    Per-class training counts (length K). Zeros are allowed: counts are clamped to >= 1 wherever a
    log, power or reciprocal is taken, so an empty class never yields inf/NaN. Fractional values
    (expected counts) are fine, but probabilities are rejected: clamping would silently flatten
    them. Pass ``len(sampler) * sampler.expected_class_distribution()`` instead.

``uses_prior`` and ``sampled_counts``
    True for losses whose correction is derived from the class prior (weighted CE, class-balanced,
    balanced softmax, logit-adjusted, LDAM's deferred re-weighting). A re-balancing sampler already
    changes the class distribution the loss sees, so these losses take ``sampled_counts``: a
    function ``epoch -> expected class counts the sampler draws in that epoch``. They correct for
    that distribution, re-derived at every :meth:`~ImbalanceLoss.set_epoch` (a progressive
    sampler's changes every epoch); otherwise the imbalance would be corrected twice. Without it
    they correct for ``class_counts``. ``class_counts`` are always the real training counts:
    LDAM's margins come from them (Cao et al. 2019), whatever the sampler.

``logit_prior_shift()``
    Per-class log shift of the class prior the trained logits are calibrated to: a model
    trained with this loss on batches with prior ``q`` fits ``p(y|x)`` under the prior
    ``q * exp(shift)`` (weighted CE with weights ``w``: ``q * w``; balanced softmax: ``q / n``;
    logit-adjusted: ``q / pi^tau``). Post-hoc logit adjustment subtracts this prior, so it
    never corrects what the sampler or the loss already corrected.

``head`` / ``head_scale``
    ``"linear"`` for all losses except LDAM, which needs a cosine-normalised head emitting
    ``head_scale * cos`` logits (its margins are on the cosine scale; on raw logits it diverges).

``set_epoch(epoch)``
    Called by the model at every epoch start. Schedule state (LDAM's deferred re-weighting) is a
    pure function of the epoch, so a resumed run behaves exactly like an uninterrupted one.

Class weights and label smoothing
    PyTorch's ``F.cross_entropy(weight=w, label_smoothing=eps)`` weights the smoothing term of
    sample i by the weights of *all* classes (pytorch issue 104776), so a rare class's weight leaks
    into every sample. Here a weight is a per-*sample* factor ``w[y_i]`` applied to the whole
    smoothed loss ``(1 - eps) * nll_i + eps * mean_j(-log p_ij)``, and the mean is normalised by
    ``sum_i w[y_i]`` as in PyTorch. Without smoothing this is identical to ``F.cross_entropy``.

Prior shifts and label smoothing
    Balanced softmax and the logit-adjusted loss train ``z + shift`` and predict with ``z``.
    Smoothing the label uniformly in the shifted (training) space, as
    ``F.cross_entropy(z + shift, y, label_smoothing=eps)`` does, puts ``eps / K`` of every
    sample's target on each rare class *before* the shift is taken off: at the optimum a
    confidently labelled head-class image is predicted as the rarest class (Fashion-MNIST-LT at
    imbalance ratio 100: a T-shirt's ``softmax(z)`` peaks at Ankle boot). Here the smoothed label
    ``(1 - eps) onehot + eps / K`` is the target of ``softmax(z)``, the balanced prediction, and
    is carried to the training space by the same shift: ``t ~ smoothed * exp(shift)``. With a
    uniform shift, or ``eps = 0``, it is ``F.cross_entropy``'s smoothing exactly.

Label smoothing and the prior left in the logits
    With smoothing, ``softmax(z)`` fits ``(1 - eps) * w + eps / K``: a floor of ``eps / K`` on
    every class over probabilities ``w``. Post-hoc logit adjustment must take the floor off
    before it divides by a prior (else a rare class's floor, divided by its tiny prior, wins:
    a confident head-class image is predicted as the rarest class); the model does
    (:meth:`~tailtune.models.base.ClassifierModule.adjust_logits`). For CE and weighted CE,
    ``w`` is the posterior under ``q * w_class``. For the shifted losses it is under
    ``q / Z`` with ``Z_y = (1 - eps) exp(a_y) + (eps / K) sum_c exp(a_c)`` (``a`` the training
    shift), not ``q * exp(-a)``: the smoothed label carried through the shift weighs a rare
    class's own images less, so smoothing leaves a lean towards the head (Fashion-MNIST-LT,
    imbalance ratio 100, eps 0.1: the rarest class at about 1/4 of its balanced weight).
    :meth:`logit_prior_shift` reports that prior, so ``tau = 1`` removes it.

Per-class buffers are non-persistent: they are recomputed from data + config, and keeping them out
of ``state_dict`` lets a checkpoint load into a module configured with a different loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import ClassVar, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tailtune.imbalance.weights import (
    Counts,
    as_counts,
    clamped_counts,
    effective_number_weights,
    inverse_frequency_weights,
)

__all__ = [
    "BalancedSoftmaxLoss",
    "ClassBalancedLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "ImbalanceLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "WeightedCrossEntropyLoss",
    "effective_number_weights",
    "inverse_frequency_weights",
    "ldam_margins",
    "posthoc_logit_adjust",
]

WEIGHTINGS = ("inverse", "sqrt_inverse", "effective_number")

# epoch -> the expected class counts a training sampler draws in that epoch.
CountsSchedule: TypeAlias = Callable[[int], Counts]


# --------------------------------------------------------------------------- helpers


def ldam_margins(class_counts: Counts, max_m: float = 0.5) -> Tensor:
    """Cao et al. 2019: ``Delta_j = C / n_j^(1/4)`` with C chosen so that ``max Delta = max_m``."""
    if max_m < 0:
        raise ValueError(f"max_m must be >= 0, got {max_m}")
    m = clamped_counts(class_counts) ** -0.25
    return torch.as_tensor(m * (max_m / m.max()), dtype=torch.float32)


def _log_prior(class_counts: Counts) -> Tensor:
    n = clamped_counts(class_counts)
    return torch.as_tensor(np.log(n / n.sum()), dtype=torch.float32)


def posthoc_logit_adjust(
    logits: Tensor, class_counts: Counts, tau: float = 1.0
) -> Tensor:
    """Menon et al. 2021 post-hoc correction: ``logits - tau * log prior`` (counts clamped >= 1)."""
    log_prior = _log_prior(class_counts).to(device=logits.device, dtype=logits.dtype)
    if logits.shape[-1] != log_prior.numel():
        raise ValueError(f"logits have {logits.shape[-1]} classes, counts {log_prior.numel()}")
    return logits - tau * log_prior


def _smoothed_nll(logp: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
    """Per-sample ``(1 - eps) * nll + eps * mean_j(-log p_j)``, as in ``F.cross_entropy``."""
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    if label_smoothing == 0.0:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(dim=1)


def _shifted_cross_entropy(
    logits: Tensor, target: Tensor, shift: Tensor, label_smoothing: float
) -> Tensor:
    """``CE(z + shift, y)`` with the label smoothed for ``softmax(z)`` (module docstring)."""
    shift = shift.to(logits.dtype)
    shifted = logits + shift
    if label_smoothing == 0.0:
        return F.cross_entropy(shifted, target)
    smoothed = torch.full_like(logits, label_smoothing / logits.shape[1])
    smoothed.scatter_add_(1, target[:, None],
                          torch.full_like(smoothed[:, :1], 1.0 - label_smoothing))
    return F.cross_entropy(shifted, torch.softmax(smoothed.log() + shift, dim=1))


def _smoothed_prior_shift(shift: Tensor, label_smoothing: float) -> Tensor:
    """``-log Z`` for training shift ``a``: the log prior shift of the un-smoothed
    probabilities a shifted loss fits (module docstring); ``-a`` when ``eps = 0``."""
    shift = shift.detach().float().cpu()
    if label_smoothing == 0.0:
        return -shift
    own = math.log1p(-label_smoothing) + shift if label_smoothing < 1.0 \
        else torch.full_like(shift, -math.inf)
    floor = math.log(label_smoothing / shift.numel()) + torch.logsumexp(shift, dim=0)
    return -torch.logaddexp(own, floor.expand_as(shift))


def _weighted_mean(per_sample: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
    if weight is None:
        return per_sample.mean()
    w = weight.to(per_sample.dtype)[target]
    return (w * per_sample).sum() / w.sum()


def _cross_entropy(
    logits: Tensor, target: Tensor, weight: Tensor | None, label_smoothing: float
) -> Tensor:
    """CE with per-sample class weights (see module docstring for the smoothing semantics)."""
    if weight is None or label_smoothing == 0.0:
        w = None if weight is None else weight.to(logits.dtype)
        return F.cross_entropy(logits, target, weight=w, label_smoothing=label_smoothing)
    per_sample = _smoothed_nll(F.log_softmax(logits, dim=1), target, label_smoothing)
    return _weighted_mean(per_sample, target, weight)


def _focal(
    logits: Tensor, target: Tensor, gamma: float, weight: Tensor | None, label_smoothing: float
) -> Tensor:
    """Softmax focal loss ``w_y (1 - p_y)^gamma * CE_smoothed``, weighted mean as in CE."""
    # Work in >= float32: (1 - p) underflows quickly in half precision.
    logp = F.log_softmax(logits, dim=1, dtype=torch.promote_types(logits.dtype, torch.float32))
    logp_y = logp.gather(1, target[:, None]).squeeze(1)
    # 1 - p from log p without cancellation; clamped away from 0 so that d/dp (1-p)^gamma stays
    # finite for gamma < 1 when p -> 1 (the unclamped gradient would be inf * 0 = NaN).
    one_minus_p = (-torch.expm1(logp_y)).clamp(min=torch.finfo(logp.dtype).eps)
    modulator = one_minus_p.pow(gamma)  # exactly 1 for gamma = 0, so focal(0) == CE
    per_sample = modulator * _smoothed_nll(logp, target, label_smoothing)
    return _weighted_mean(per_sample, target, weight)


# --------------------------------------------------------------------------- losses


class ImbalanceLoss(nn.Module):
    """Base class: stores the counts and the options shared by all losses.

    Prior-based subclasses set ``uses_prior = True``, take ``sampled_counts`` and derive their
    per-class buffers in :meth:`_set_prior` (called at construction and every epoch).
    """

    uses_prior: ClassVar[bool] = False
    head: ClassVar[str] = "linear"
    # With label smoothing eps, softmax(z) fits (1 - eps) w + eps / K (module docstring): the
    # floor post-hoc logit adjustment takes off. Not so under focal's modulation or LDAM's
    # margins, whose smoothed optimum has no such closed form.
    smoothing_has_floor: bool = True

    def __init__(
        self,
        class_counts: Counts,
        label_smoothing: float = 0.0,
        sampled_counts: CountsSchedule | None = None,
    ) -> None:
        super().__init__()
        counts = as_counts(class_counts)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.num_classes = int(counts.size)
        self.label_smoothing = float(label_smoothing)
        self.head_scale: float = 1.0
        self.epoch = 0
        self.sampled_counts = sampled_counts
        self.register_buffer(
            "class_counts", torch.as_tensor(counts, dtype=torch.float32), persistent=False
        )

    def prior_counts(self, epoch: int | None = None) -> np.ndarray:
        """The class counts the loss corrects for at ``epoch``: the sampler's draw if
        ``sampled_counts`` is given, else the real training counts."""
        if self.sampled_counts is None:
            return self.class_counts.double().cpu().numpy()
        counts = as_counts(self.sampled_counts(self.epoch if epoch is None else epoch))
        if counts.size != self.num_classes:
            raise ValueError(f"sampled_counts gave {counts.size} classes, expected "
                             f"{self.num_classes}")
        return counts

    def set_epoch(self, epoch: int) -> None:
        """Record the current epoch; schedules (deferred re-weighting, the prior of a
        progressive sampler) derive their state from it, so resume is exact."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        if self.sampled_counts is not None:
            self._set_prior(self.prior_counts(epoch))

    def _set_prior(self, counts: np.ndarray) -> None:
        """Derive the per-class buffers from the counts the loss corrects for."""

    def _set_buffer(self, name: str, value: Tensor) -> None:
        # Re-derived every epoch: keep the device the module was moved to.
        old = self._buffers.get(name)
        self.register_buffer(name, value if old is None else value.to(old.device),
                             persistent=False)

    def logit_prior_shift(self) -> Tensor:
        """Per-class log shift of the prior the trained logits fit (see the module docstring);
        zero for losses that do not re-weight or shift the classes."""
        return torch.zeros(self.num_classes)

    def _check(self, logits: Tensor, target: Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"expected logits of shape [N, {self.num_classes}], got {tuple(logits.shape)}"
            )

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, label_smoothing={self.label_smoothing}"


class CrossEntropyLoss(ImbalanceLoss):
    """Plain (optionally label-smoothed) cross-entropy; the baseline."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)


class WeightedCrossEntropyLoss(ImbalanceLoss):
    """Cross-entropy with fixed per-class weights (normalised to sum to K).

    ``weighting``: ``"inverse"`` (1/n), ``"sqrt_inverse"`` (1/sqrt n) or ``"effective_number"``
    (Cui et al., uses ``beta``).
    """

    uses_prior = True

    def __init__(
        self,
        class_counts: Counts,
        weighting: str = "inverse",
        beta: float = 0.9999,
        label_smoothing: float = 0.0,
        sampled_counts: CountsSchedule | None = None,
    ) -> None:
        super().__init__(class_counts, label_smoothing, sampled_counts)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        self.weighting, self.beta = weighting, float(beta)
        self._set_prior(self.prior_counts(0))

    def _set_prior(self, counts: np.ndarray) -> None:
        if self.weighting == "effective_number":
            weight = effective_number_weights(counts, beta=self.beta)
        else:
            weight = inverse_frequency_weights(counts, 1.0 if self.weighting == "inverse" else 0.5)
        self._set_buffer("weight", weight)

    def logit_prior_shift(self) -> Tensor:
        return self.weight.detach().float().cpu().log()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        return _cross_entropy(logits, target, self.weight, self.label_smoothing)


class FocalLoss(ImbalanceLoss):
    """Softmax focal loss (Lin et al. 2017): ``-alpha_y (1 - p_y)^gamma log p_y``.

    ``alpha`` is a per-class list (length K) or None. A scalar alpha only rescales the softmax-form
    loss and does nothing for imbalance, so it is rejected. With alpha the mean is normalised by
    ``sum alpha_{y_i}`` (like weighted CE), so gamma=0 equals ``F.cross_entropy(weight=alpha)``.
    Label smoothing is applied to the CE term; the modulating factor uses the true-class p.
    """

    def __init__(
        self,
        class_counts: Counts,
        gamma: float = 1.0,
        alpha: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(class_counts, label_smoothing=label_smoothing)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.smoothing_has_floor = self.gamma == 0.0  # gamma 0: (weighted) CE
        weight = None
        if alpha is not None:
            if isinstance(alpha, Real) or (isinstance(alpha, Tensor) and alpha.ndim == 0):
                raise ValueError(
                    f"scalar alpha={float(alpha)} only rescales the softmax focal loss and does "
                    f"nothing for class imbalance; pass a per-class list of length "
                    f"{self.num_classes} or null"
                )
            weight = torch.as_tensor(np.asarray(list(alpha), dtype=np.float64), dtype=torch.float32)
            if weight.ndim != 1 or weight.numel() != self.num_classes:
                raise ValueError(
                    f"alpha must have one entry per class ({self.num_classes}), "
                    f"got {weight.numel()}"
                )
            if not torch.all(torch.isfinite(weight)) or torch.any(weight < 0):
                raise ValueError(f"alpha must be finite and non-negative, got {weight.tolist()}")
        self.register_buffer("alpha", weight, persistent=False)

    def logit_prior_shift(self) -> Tensor:
        if self.alpha is None:
            return super().logit_prior_shift()
        return self.alpha.detach().float().cpu().clamp_min(1e-12).log()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        return _focal(logits, target, self.gamma, self.alpha, self.label_smoothing)


class ClassBalancedLoss(ImbalanceLoss):
    """Class-balanced loss (Cui et al. 2019): effective-number weights on CE or focal loss."""

    uses_prior = True
    BASES: ClassVar[tuple[str, ...]] = ("ce", "focal")

    def __init__(
        self,
        class_counts: Counts,
        beta: float = 0.9999,
        base: str = "ce",
        gamma: float = 1.0,
        label_smoothing: float = 0.0,
        sampled_counts: CountsSchedule | None = None,
    ) -> None:
        super().__init__(class_counts, label_smoothing, sampled_counts)
        if base not in self.BASES:
            raise ValueError(f"unknown base {base!r}; valid: {', '.join(self.BASES)}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.base, self.beta, self.gamma = base, float(beta), float(gamma)
        self.smoothing_has_floor = base == "ce" or self.gamma == 0.0
        self._set_prior(self.prior_counts(0))

    def _set_prior(self, counts: np.ndarray) -> None:
        self._set_buffer("weight", effective_number_weights(counts, beta=self.beta))

    def logit_prior_shift(self) -> Tensor:
        return self.weight.detach().float().cpu().log()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        if self.base == "focal":
            return _focal(logits, target, self.gamma, self.weight, self.label_smoothing)
        return _cross_entropy(logits, target, self.weight, self.label_smoothing)


class LDAMLoss(ImbalanceLoss):
    """LDAM with deferred re-weighting (Cao et al. 2019).

    Expects logits from a cosine head already scaled by ``s`` (``head = "cosine"``,
    ``head_scale = s``) and computes ``CE(logits - s * Delta_y * onehot(y), weight)`` with
    ``Delta_j = C / n_j^(1/4)``, ``max Delta = max_m``. DRW: unweighted before epoch ``drw_start``,
    class-balanced (``beta``) weights from it on; ``drw_start=None`` never re-weights.

    The margins come from the real training counts ``class_counts`` even under a re-balancing
    sampler (Cao et al. use the same margins with re-sampling), so LDAM stays
    label-distribution-aware; only the DRW weights follow ``sampled_counts``.
    """

    uses_prior = True
    smoothing_has_floor = False  # its margins move the smoothed optimum
    head = "cosine"

    def __init__(
        self,
        class_counts: Counts,
        max_m: float = 0.5,
        s: float = 30.0,
        drw_start: int | None = 160,
        beta: float = 0.9999,
        label_smoothing: float = 0.0,
        sampled_counts: CountsSchedule | None = None,
    ) -> None:
        super().__init__(class_counts, label_smoothing, sampled_counts)
        if s <= 0:
            raise ValueError(f"s must be > 0, got {s}")
        if drw_start is not None and drw_start < 0:
            raise ValueError(f"drw_start must be >= 0 or None, got {drw_start}")
        self.head_scale = float(s)
        self.max_m, self.beta = float(max_m), float(beta)
        self.drw_start = None if drw_start is None else int(drw_start)
        self.register_buffer("margins", ldam_margins(class_counts, max_m=max_m), persistent=False)
        self._set_prior(self.prior_counts(0))

    def _set_prior(self, counts: np.ndarray) -> None:
        self._set_buffer("drw_weight", effective_number_weights(counts, beta=self.beta))

    def logit_prior_shift(self) -> Tensor:
        # The margins favour the tail a little too; the prior shift counts the re-weighting.
        if not self.drw_active:
            return super().logit_prior_shift()
        return self.drw_weight.detach().float().cpu().log()

    @property
    def drw_active(self) -> bool:
        return self.drw_start is not None and self.epoch >= self.drw_start

    @property
    def weight(self) -> Tensor:
        """Class weights in force at the current epoch (all ones before DRW starts)."""
        return self.drw_weight if self.drw_active else torch.ones_like(self.drw_weight)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        margin = self.head_scale * self.margins.to(logits.dtype)[target]
        adjusted = logits.scatter_add(1, target[:, None], -margin[:, None])
        weight = self.drw_weight if self.drw_active else None
        return _cross_entropy(adjusted, target, weight, self.label_smoothing)


class BalancedSoftmaxLoss(ImbalanceLoss):
    """Balanced softmax (Ren et al. 2020): ``CE(z + log n)``; predict with plain ``z``."""

    uses_prior = True

    def __init__(
        self,
        class_counts: Counts,
        label_smoothing: float = 0.0,
        sampled_counts: CountsSchedule | None = None,
    ) -> None:
        super().__init__(class_counts, label_smoothing, sampled_counts)
        self._set_prior(self.prior_counts(0))

    def _set_prior(self, counts: np.ndarray) -> None:
        self._set_buffer("log_counts",
                         torch.as_tensor(np.log(clamped_counts(counts)), dtype=torch.float32))

    def logit_prior_shift(self) -> Tensor:
        return _smoothed_prior_shift(self.log_counts, self.label_smoothing)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        return _shifted_cross_entropy(logits, target, self.log_counts, self.label_smoothing)


class LogitAdjustedLoss(ImbalanceLoss):
    """Logit-adjusted loss (Menon et al. 2021): ``CE(z + tau * log prior)``.

    tau=1 is balanced softmax (``log n`` and ``log prior`` differ by a constant); tau=0 is CE.
    """

    uses_prior = True

    def __init__(
        self,
        class_counts: Counts,
        tau: float = 1.0,
        label_smoothing: float = 0.0,
        sampled_counts: CountsSchedule | None = None,
    ) -> None:
        super().__init__(class_counts, label_smoothing, sampled_counts)
        if not math.isfinite(tau):
            raise ValueError(f"tau must be finite, got {tau}")
        self.tau = float(tau)
        self._set_prior(self.prior_counts(0))

    def _set_prior(self, counts: np.ndarray) -> None:
        self._set_buffer("log_prior", _log_prior(counts))

    def logit_prior_shift(self) -> Tensor:
        return _smoothed_prior_shift(self.tau * self.log_prior, self.label_smoothing)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        self._check(logits, target)
        return _shifted_cross_entropy(logits, target, self.tau * self.log_prior,
                                      self.label_smoothing)
