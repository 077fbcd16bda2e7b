"""Decoupled classifier re-balancing (Kang et al., ICLR 2020) on a fine-tuned checkpoint.

Representation and classifier are learned apart: the fine-tuned backbone is frozen (its
features come from the feature cache, keyed by a hash of these fine-tuned weights), and only
the classifier is re-balanced:

- ``crt``: classifier re-training. A freshly initialised head, trained on the frozen
  features with class-balanced sampling (ImageNet-LT, ResNeXt-50: 44.4 joint -> 49.6).
- ``tau_norm``: no training. The source head's weights become ``w_i / ||w_i||^tau``, with tau
  picked on validation balanced accuracy from 0..2 (49.4). Kang et al. drop the bias
  (``keep_bias=False``); with the bias kept, tau = 0 is exactly the source model.
- ``lws``: learnable weight scaling. The source head stays fixed and only one scale per class
  is learned, again with class-balanced sampling (49.9).

Like the linear probe's, checkpoints hold the head and the backbone's identity (the source
checkpoint's path and a hash of its backbone weights), not the weights: loading rebuilds them
from ``init_from`` and refuses a source whose weights changed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tailtune.backbones import Preprocess
from tailtune.data.info import DatasetInfo
from tailtune.features.extractor import FeatureExtractor
from tailtune.imbalance import adjust
from tailtune.models.base import ClassifierModule
from tailtune.models.heads import CosineHead
from tailtune.models.linear_probe import LinearProbeModule

METHODS = ("crt", "tau_norm", "lws")
# cRT and LWS retrain with class-balanced sampling (Kang et al.).
BALANCED_SAMPLING_METHODS = ("crt", "lws")


def source_parts(model: ClassifierModule) -> tuple[nn.Module, Preprocess, nn.Module, Tensor]:
    """``(backbone, preprocess, head, log_prior)`` of a fine-tuned source model: the last is
    the class prior its logits were trained under."""
    parts = [getattr(model, name, None) for name in ("backbone", "preprocess", "head")]
    if isinstance(model, LinearProbeModule) or any(p is None for p in parts):
        raise ValueError(
            f"model.init_from must be a fine-tuned checkpoint (model=finetune), not a "
            f"{type(model).__name__} one: decoupling re-balances the classifier of features "
            "that were trained; for an untouched backbone, train model=linear_probe instead")
    return parts[0], parts[1], parts[2], model.log_prior.detach().clone()


def final_layer(head: nn.Module) -> nn.Module:
    """The layer that produces the logits (a head may be ``Sequential(Dropout, Linear)``)."""
    return head[-1] if isinstance(head, nn.Sequential) else head


class TauNormHead(nn.Module):
    """A fixed linear head scored as ``x . w_i / ||w_i||^tau (+ b_i if keep_bias)``."""

    def __init__(self, weight: Tensor, bias: Tensor | None, keep_bias: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", (bias.detach().clone() if bias is not None
                                      else torch.zeros(len(weight))))
        self.register_buffer("tau", torch.tensor(0.0))
        self.keep_bias = keep_bias

    def forward(self, x: Tensor) -> Tensor:
        weight = adjust.tau_normalized_weight(self.weight, float(self.tau))
        return F.linear(x, weight, self.bias if self.keep_bias else None)


class LWSHead(nn.Module):
    """Learnable weight scaling: a fixed head whose logits get one learned scale per class."""

    def __init__(self, head: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.fixed = copy.deepcopy(head)
        for param in self.fixed.parameters():
            param.requires_grad_(False)
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.fixed(x) * self.scales


class DecoupledModule(LinearProbeModule):
    """Re-balance a fine-tuned model's classifier on its frozen features (``method``)."""

    kind = "decoupled"
    builds_on_checkpoint = True  # the fine-tuned model.init_from: extractor and source head

    @classmethod
    def wants_balanced_sampling(cls, settings: Mapping[str, Any]) -> bool:
        """cRT and LWS retrain with class-balanced sampling (Kang et al.), unless
        ``class_balanced=false``."""
        return bool(settings.get("class_balanced", True)) and \
            settings.get("method", "crt") in BALANCED_SAMPLING_METHODS

    def __init__(
        self,
        extractor: FeatureExtractor,
        info: DatasetInfo,
        loss: nn.Module,
        source_head: nn.Module,
        method: str = "crt",
        init_from: str | None = None,
        keep_bias: bool = False,
        class_balanced: bool = True,
        source_log_prior: Tensor | None = None,
        **probe_kwargs: Any,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown model.method '{method}'; valid: {', '.join(METHODS)}")
        if extractor.layer != "pre_logits":
            raise ValueError("the source head reads the pooled pre-logits features; keep "
                             "model.features.layer=pre_logits")
        # The source head reads raw features: no standardisation or PCA in front of it.
        super().__init__(extractor, info, loss, standardize="none", pca_dim=None, **probe_kwargs)
        self.method = method
        self.init_from = init_from
        self.keep_bias = keep_bias
        self.class_balanced = class_balanced
        self.source_log_prior = source_log_prior
        self._untuned_tau: float | None = None  # tau_norm: the head's tau before fit_posthoc
        final = final_layer(source_head)
        if method == "tau_norm":
            if not isinstance(final, nn.Linear):
                kind = "a cosine head (LDAM), whose weights are already normalised" \
                    if isinstance(final, CosineHead) else type(final).__name__
                raise ValueError(f"tau_norm needs a linear source head, not {kind}")
            self.head = TauNormHead(final.weight, final.bias, keep_bias)
        elif method == "lws":
            self.head = LWSHead(final, info.num_classes)
        # crt keeps the freshly initialised head the probe built.

    # -- tau-norm: nothing trains; tau is chosen on validation after "fitting" -------------
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.method == "tau_norm" and self.source_log_prior is not None:
            # Its logits are the source head's: they carry the prior the source was trained
            # under (uniform for a logit-adjusted source), not this run's loss and sampler's.
            self.log_prior.copy_(self.source_log_prior.to(self.log_prior))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        if self.method == "tau_norm":
            return None  # no trainable parameter; Lightning skips the step
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        if self.method == "tau_norm":
            self.trainer.should_stop = True  # one pass is all there is to do

    def configure_optimizers(self) -> dict[str, Any] | None:
        if self.method == "tau_norm":
            return None
        return super().configure_optimizers()

    @property
    def posthoc_steps(self) -> tuple[str, ...]:
        return ("tau_norm", *self.posthoc) if self.method == "tau_norm" else self.posthoc

    @torch.no_grad()
    def fit_posthoc(self, logits: Tensor, targets: Tensor) -> dict[str, Any]:
        """For tau_norm, pick tau on validation first, then tune the configured post-hoc
        steps on the tau-normalised logits."""
        if self.method != "tau_norm":
            return super().fit_posthoc(logits, targets)
        from tailtune.models.base import _calibration

        logits, targets = logits.float().cpu(), targets.long().cpu()
        before = _calibration(self.adjust_logits(logits), targets)
        norms, bias, dots = self._tau_norm_parts(logits)
        self._untuned_tau = float(self.head.tau)
        tau, bal_acc = adjust.tune_tau_norm(dots, targets, norms, bias)
        self.head.tau.fill_(tau)
        untuned_la_tau, untuned_bias = float(self.posthoc_tau), self.posthoc_bias.clone()
        report = super().fit_posthoc(adjust.tau_norm_logits(dots, norms, tau, bias), targets)
        # tau is always tuned on val here, so val's own score is optimistic: score each fold
        # with tau (and any adopted tau / bias on top) refitted on the other folds.
        refit_rest = self._fold_refit(
            tuned_tau=report["logit_adjust_tau"] != untuned_la_tau,
            tau=report["logit_adjust_tau"],
            tuned_bias=not torch.equal(self.posthoc_bias.cpu(), untuned_bias.cpu()),
            bias=self.posthoc_bias.float().cpu())

        def fit(fold_dots: Tensor, t: Tensor) -> Callable[[Tensor], Tensor]:
            fold_tau = adjust.tune_tau_norm(fold_dots, t, norms, bias)[0]
            rest = refit_rest(adjust.tau_norm_logits(fold_dots, norms, fold_tau, bias), t)
            return lambda q: rest(adjust.tau_norm_logits(q, norms, fold_tau, bias))

        report["val_bal_acc_out_of_fold"] = adjust.out_of_fold_balanced_accuracy(
            dots, targets, fit)
        report.update({"steps": ["tau_norm", *report["steps"]], "val_before": before,
                       "tau_norm": {"tau": tau, "val_bal_acc": bal_acc}})
        return report

    @property
    def has_smoothing_floor(self) -> bool:
        # tau_norm's logits are the source head's, rescaled: no floor of this run's loss.
        return self.method != "tau_norm" and super().has_smoothing_floor

    def _tau_norm_parts(self, logits: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """The head's weight norms and bias, and the bias-free dot products ``w_i . x`` behind
        ``logits`` scored at the head's current tau."""
        head: TauNormHead = self.head  # type: ignore[assignment]
        norms = head.weight.float().cpu().norm(dim=1)
        bias = head.bias.float().cpu() if self.keep_bias else None
        shifted = logits.float().cpu() - (bias if bias is not None else 0.0)
        return norms, bias, shifted * norms.clamp_min(1e-12).pow(float(head.tau))

    def rescore_test(self, adjustment: tuple[Tensor, Tensor, Tensor]) -> dict[str, float]:
        """For tau_norm, "before" is also before the tau tuned on val: the test pass ran
        with it, so its logits are rescored at the head's tau from before the tuning."""
        if self.method != "tau_norm" or self._untuned_tau is None:
            return super().rescore_test(adjustment)
        norms, bias, dots = self._tau_norm_parts(self.test_raw_logits)
        logits = adjust.tau_norm_logits(dots, norms, self._untuned_tau, bias)
        return self.score(self.adjust_logits(logits, adjustment), self.test_predictions[0])

    def checkpoint_metadata(self) -> dict[str, Any]:
        meta = super().checkpoint_metadata()
        meta.update({"model": self.kind,
                     "decoupled": {"method": self.method, "init_from": self.init_from,
                                   "keep_bias": self.keep_bias,
                                   "tau": float(getattr(self.head, "tau", 0.0))}})
        return meta
