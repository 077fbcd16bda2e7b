"""What every tailtune classifier shares: loss, epoch metrics, logging, checkpoint contract."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from tailtune.data.info import DatasetInfo
from tailtune.metrics import ImbalancedClassificationMetrics, confusion_figure

POSTHOC_STEPS = ("logit_adjust", "bias", "temperature")
log = logging.getLogger(__name__)


# Checkpoint metadata: the post-hoc adjustment takes label smoothing's floor off (2026-12-03).
SMOOTHING_FLOOR_KEY = "smoothing_floor_removed"


class ClassifierModule(L.LightningModule):
    """Base class: subclasses implement ``forward(images) -> logits`` and the optimizer.

    ``images`` are unnormalised ``[0, 1]`` tensors; each model resizes and normalises them
    itself, so checkpoints carry their own preprocessing.

    Post-hoc adjustment: val/test/predict logits are ``(z - tau log prior + b) / T``. ``tau``
    starts at ``logit_adjust_tau``, ``b`` at 0 and ``T`` at 1; the steps named in ``posthoc``
    (``logit_adjust``, ``bias``, ``temperature``) are tuned on validation predictions after
    training (:meth:`fit_posthoc`). All three are buffers, so checkpoints carry them. With
    ``posthoc_crossfit`` (the default) a tuned tau or bias is adopted only if it also helps on
    validation images it was not tuned on (5-fold cross-fitting on val): on small val splits
    the full-val optimum is mostly noise.

    ``prior`` is the class prior the logits were *trained* under (:meth:`trained_log_prior`):
    the distribution the sampler drew in the epoch, shifted by what the loss corrects (a
    re-weighted or balanced-softmax loss already removes it). So ``tau = 1`` is the Bayes
    correction towards balanced classes for any sampler and loss, and logit adjustment never
    corrects what training already corrected. It is updated every epoch and checkpointed.

    What a model is, the build layer (:mod:`tailtune.build`) reads from these class
    attributes, never from config keys: ``kind`` names it in checkpoints;
    ``trains_on_features``: it is built on a frozen :class:`FeatureExtractor
    <tailtune.features.extractor.FeatureExtractor>` (``extractor=``) and trains on that
    extractor's (cached) features, served as ``model.features`` says; otherwise it gets the
    backbone group's ``backbone``, ``preprocess`` and ``backbone_identity``;
    ``builds_on_checkpoint``: its extractor and ``source_head`` come from the trained
    checkpoint ``model.init_from``; ``is_ensemble``: it is built from member models.
    """

    kind: ClassVar[str] = "classifier"
    trains_on_features: ClassVar[bool] = False
    builds_on_checkpoint: ClassVar[bool] = False
    is_ensemble: ClassVar[bool] = False

    @classmethod
    def wants_balanced_sampling(cls, settings: Mapping[str, Any]) -> bool:
        """Whether a model configured with ``settings`` (its config node) trains with
        class-balanced sampling when no sampler is chosen (``sampler=none``)."""
        return False

    def __init__(
        self,
        info: DatasetInfo,
        loss: nn.Module,
        logit_adjust_tau: float = 0.0,
        many_threshold: int = 100,
        few_threshold: int = 20,
        confusion_every_n_epochs: int = 5,
        log_figures: bool = True,
        posthoc: str | Sequence[str] | None = None,
        posthoc_crossfit: bool = True,
    ) -> None:
        super().__init__()
        self.info = info
        self.criterion = loss
        self.logit_adjust_tau = logit_adjust_tau
        self.many_threshold = many_threshold  # shot groups of the metrics
        self.few_threshold = few_threshold
        self.confusion_every_n_epochs = confusion_every_n_epochs
        self.log_figures = log_figures
        # Until the first epoch says otherwise: the loss's first-epoch counts (a sampler's
        # draw when it was given one), the counts its shift was derived from.
        prior_counts = getattr(loss, "prior_counts", None)
        self.register_buffer("log_prior", self.trained_log_prior(
            prior_counts(0) if prior_counts else info.class_counts))
        self.posthoc = self._posthoc_steps(posthoc)
        self.posthoc_crossfit = posthoc_crossfit
        self.register_buffer("posthoc_tau", torch.tensor(float(logit_adjust_tau)))
        self.remove_smoothing_floor = True  # False for checkpoints older than the floor
        self.register_buffer("posthoc_bias", torch.zeros(info.num_classes))
        self.register_buffer("posthoc_temperature", torch.tensor(1.0))
        # Checkpoints from before these buffers existed load with their defaults.
        self.register_load_state_dict_pre_hook(_default_posthoc_state)
        self._val_outputs: list[tuple[Tensor, Tensor]] | None = None
        self.val_metrics = self._metrics()
        self.test_metrics = self._metrics()
        self.val_results: dict[str, float] = {}
        self.test_results: dict[str, float] = {}
        self.test_confusion: Tensor | None = None
        self.test_predictions: tuple[Tensor, Tensor] | None = None
        self.test_raw_logits: Tensor | None = None
        self._test_outputs: list[tuple[Tensor, Tensor]] = []

    def _metrics(self) -> ImbalancedClassificationMetrics:
        return ImbalancedClassificationMetrics(
            class_names=list(self.info.class_names), train_counts=list(self.info.class_counts),
            many_threshold=self.many_threshold, few_threshold=self.few_threshold,
        )

    @staticmethod
    def _posthoc_steps(posthoc: str | Sequence[str] | None) -> tuple[str, ...]:
        steps = [posthoc] if isinstance(posthoc, str) else list(posthoc or [])
        steps = [s for s in steps if s not in ("none", None)]
        unknown = [s for s in steps if s not in POSTHOC_STEPS]
        if unknown:
            raise ValueError(f"unknown model.posthoc step(s) {unknown}; valid: none, "
                             f"{', '.join(POSTHOC_STEPS)} (or a list of them)")
        return tuple(s for s in POSTHOC_STEPS if s in steps)  # applied in this order

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    # -- inference ------------------------------------------------------------------------
    def adjust_logits(self, logits: Tensor,
                      adjustment: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        """The post-hoc adjustment ``(z - tau log prior + b) / T`` of raw model outputs, with
        the model's ``(tau, b, T)`` or those of ``adjustment`` (:meth:`posthoc_adjustment`)."""
        tau, bias, temperature = adjustment if adjustment is not None else (
            self.posthoc_tau, self.posthoc_bias, self.posthoc_temperature)
        unsmoothed = self.without_smoothing_floor(logits)
        if unsmoothed is not logits:  # only where tau != 0; no host sync on the buffer
            logits = torch.where(tau.to(logits.device) != 0, unsmoothed, logits)
        return self.shift_and_scale(logits, (tau, bias, temperature))

    def shift_and_scale(self, scores: Tensor, adjustment: tuple[Tensor, Tensor, Tensor]
                        ) -> Tensor:
        """``(scores - tau log prior + b) / T``: the adjustment's linear part."""
        tau, bias, temperature = adjustment
        z = scores - tau.to(scores) * self.log_prior.to(scores)
        return (z + bias.to(scores)) / temperature.to(scores)

    @property
    def has_smoothing_floor(self) -> bool:
        """Whether this model's logits carry label smoothing's floor to take off."""
        eps = float(getattr(self.criterion, "label_smoothing", 0.0))
        return (0.0 < eps < 1.0 and self.remove_smoothing_floor
                and bool(getattr(self.criterion, "smoothing_has_floor", False)))

    def without_smoothing_floor(self, logits: Tensor) -> Tensor:
        """Log-probabilities with label smoothing's floor ``eps / K`` taken off
        ``softmax(logits)``: dividing the floor by a rare class's prior would make it win
        (tailtune.imbalance.losses, "Label smoothing and the prior left in the logits").
        Unchanged without smoothing, for losses whose optimum is not ``(1 - eps) w + eps / K``
        (focal, LDAM), and for checkpoints written before 2026-12-03, whose post-hoc steps
        were tuned on the smoothed logits."""
        if not self.has_smoothing_floor:
            return logits
        eps, k = float(self.criterion.label_smoothing), logits.shape[1]
        probs = logits.float().softmax(dim=1).sub(eps / k).div(1.0 - eps)
        # Below 1 % of the floor a class's share is noise of the fit, not evidence: clamping
        # there keeps temperature scaling from chasing it (test ECE 0.044 at float32 eps).
        return probs.clamp_min(0.01 * eps / k / (1.0 - eps)).log().to(logits.dtype)

    def posthoc_adjustment(self) -> tuple[Tensor, Tensor, Tensor]:
        """A copy of the current ``(tau, b, T)``: the adjustment before :meth:`fit_posthoc`."""
        return (self.posthoc_tau.detach().clone(), self.posthoc_bias.detach().clone(),
                self.posthoc_temperature.detach().clone())

    def eval_logits(self, images: Tensor) -> Tensor:
        """Logits as reported at val/test time: with the post-hoc adjustment."""
        return self.adjust_logits(self(images))

    @torch.no_grad()
    def predict_images(self, images: Tensor) -> Tensor:
        """Class probabilities for a batch ``[N, 3, H, W]`` of any size: floats in ``[0, 1]``
        or uint8. They are served as training served in-memory images (resized to the
        data's ``image_size``, :func:`~tailtune.data.images.serve_images`), then the model
        resizes and normalises them for its backbone, as in training."""
        from tailtune.data.images import serve_images

        return self.predict_proba(serve_images(images, self.info.image_size))

    @torch.no_grad()
    def predict_proba(self, inputs: Tensor) -> Tensor:
        """Class probabilities for inputs as the data loaders serve them."""
        return self.eval_logits(inputs.to(self.device)).float().softmax(dim=1)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.predict_proba(inputs)

    # -- training -------------------------------------------------------------------------
    def trained_log_prior(self, sampled_counts: Sequence[float]) -> Tensor:
        """Log of the class prior the logits fit when trained on batches drawn with
        ``sampled_counts`` under the current loss state (normalised)."""
        counts = torch.as_tensor(np.asarray(sampled_counts, dtype=np.float64)).float()
        shift = getattr(self.criterion, "logit_prior_shift", None)
        log_prior = counts.clamp_min(1.0).log() + (shift() if shift else 0.0)
        return log_prior.log_softmax(dim=0)

    def sampled_class_counts(self, epoch: int) -> Sequence[float]:
        """What the training loader draws in ``epoch``, as its datamodule says (the real
        training counts when it does not)."""
        datamodule = getattr(self._trainer, "datamodule", None)
        counts = getattr(datamodule, "train_class_counts", None)
        return counts(epoch) if counts is not None else self.info.class_counts

    def on_train_start(self) -> None:
        # Lightning skips on_train_epoch_start when it resumes mid-epoch (from a preemption
        # checkpoint), which would leave the loss at epoch 0; on a fresh start this runs twice.
        self.on_train_epoch_start()

    def on_train_epoch_start(self) -> None:
        # Schedules (deferred re-weighting, a progressive sampler's prior) derive from the
        # epoch, so resume is exact.
        if hasattr(self.criterion, "set_epoch"):
            self.criterion.set_epoch(self.current_epoch)
        prior = self.trained_log_prior(self.sampled_class_counts(self.current_epoch))
        self.log_prior.copy_(prior.to(self.log_prior))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        logits, loss = self.training_loss(images, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at epoch {self.current_epoch}, batch {batch_idx}; "
                "lower model.lr or check the data"
            )
        acc = (logits.argmax(dim=1) == targets).float().mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=len(targets))
        self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=len(targets))
        return loss

    def training_loss(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, loss)`` of a training batch; a model that mixes batches overrides it."""
        logits = self(images)
        return logits, self.criterion(logits, targets)

    # -- evaluation -----------------------------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, targets = batch
        raw = self(images)
        if self._val_outputs is not None:  # kept for fit_posthoc
            self._val_outputs.append((raw.detach().float().cpu(), targets.cpu()))
        logits = self.adjust_logits(raw)
        self.log("val/loss", self.criterion(logits, targets), on_epoch=True,
                 batch_size=len(targets), sync_dist=True)
        self.val_metrics.update(logits.float(), targets)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, targets = batch
        raw = self(images).float()
        logits = self.adjust_logits(raw)
        self.test_metrics.update(logits, targets)
        # Raw logits: the probabilities derive from them, and rescore_test scores them under
        # another adjustment.
        self._test_outputs.append((targets.cpu(), raw.cpu()))

    def on_test_epoch_start(self) -> None:
        self._test_outputs: list[tuple[Tensor, Tensor]] = []

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # sanity batches must not leak into epoch 0
            self.val_metrics.reset()
            return
        values = self.val_results = self.val_metrics.compute()
        self.log_dict({f"val/{k}": v for k, v in values.items() if k != "bal_acc"})
        self.log("val/bal_acc", values["bal_acc"], prog_bar=True)
        every = self.confusion_every_n_epochs
        if every and (self.current_epoch + 1) % every == 0:
            self._log_confusion("val", self.val_metrics.confusion_matrix())
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        self.test_results = self.test_metrics.compute()
        self.test_confusion = self.test_metrics.confusion_matrix().cpu()
        self.test_predictions = self._gather_predictions()
        self.log_dict({f"test/{k}": v for k, v in self.test_results.items()})
        self._log_confusion("test", self.test_confusion)
        self.test_metrics.reset()

    def _gather_predictions(self) -> tuple[Tensor | None, Tensor | None]:
        """Per-sample (targets, probabilities) of the whole test set, for bootstrap CIs;
        gathered as objects because unpadded DDP shards differ in length."""
        outputs = self._test_outputs
        columns = [torch.cat(c) for c in zip(*outputs, strict=True)] if outputs else [None] * 2
        if self.trainer.world_size > 1:
            import torch.distributed as dist

            shards: list = [None] * self.trainer.world_size
            dist.all_gather_object(shards, tuple(columns))
            shards = [s for s in shards if s[0] is not None]
            columns = [torch.cat(c) for c in zip(*shards, strict=True)]
        self._test_outputs = []
        targets, self.test_raw_logits = columns
        if targets is None:
            return None, None
        return targets, self.adjust_logits(self.test_raw_logits).softmax(dim=1)

    def score(self, logits: Tensor, targets: Tensor) -> dict[str, float]:
        """The metrics of whole-split ``logits``, outside a loop (fresh metric state)."""
        metrics = self._metrics()
        metrics.update(logits.float(), targets)
        return metrics.compute()

    def rescore_test(self, adjustment: tuple[Tensor, Tensor, Tensor]) -> dict[str, float]:
        """Test metrics of the last test pass's raw logits under another post-hoc
        ``adjustment`` (:meth:`posthoc_adjustment`), without a second pass over the images."""
        targets, _ = self.test_predictions
        return self.score(self.adjust_logits(self.test_raw_logits, adjustment), targets)

    def _log_confusion(self, stage: str, matrix: Tensor) -> None:
        if not self.log_figures or self.trainer.global_rank != 0:
            return
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                figure = confusion_figure(matrix.cpu(), self.info.class_names)
                logger.experiment.add_figure(f"{stage}/confusion", figure, self.current_epoch)

    @property
    def some_parameters_idle(self) -> bool:
        """Whether some trainable parameters get no gradient in some training steps (a frozen
        backbone before it unfreezes): DDP must then look for them every step. True unless
        a model knows otherwise."""
        return True

    # -- post-hoc adjustment ------------------------------------------------------------
    @property
    def posthoc_steps(self) -> tuple[str, ...]:
        """What :meth:`fit_posthoc` tunes after training; empty: nothing to tune."""
        return self.posthoc

    def collect_val_outputs(self, on: bool = True) -> None:
        """Keep the raw logits and targets of the next validation passes (for fit_posthoc)."""
        self._val_outputs = [] if on else None

    def take_val_outputs(self) -> tuple[Tensor, Tensor]:
        """The collected raw logits and targets of the whole val set (gathered from all DDP
        ranks, whose unpadded shards differ in length); stops collecting."""
        outputs, self._val_outputs = self._val_outputs or [], None
        logits = torch.cat([z for z, _ in outputs]) if outputs else torch.empty(0)
        targets = torch.cat([t for _, t in outputs]) if outputs else torch.empty(0)
        if self._trainer is not None and self.trainer.world_size > 1:
            import torch.distributed as dist

            shards: list = [None] * self.trainer.world_size
            dist.all_gather_object(shards, (logits, targets))
            logits = torch.cat([z for z, t in shards if len(t)])
            targets = torch.cat([t for z, t in shards if len(t)])
        return logits, targets.long()

    @torch.no_grad()
    def fit_posthoc(self, logits: Tensor, targets: Tensor) -> dict[str, Any]:
        """Tune the ``posthoc`` steps on raw validation logits (model outputs before any
        adjustment), in order: logit-adjustment tau and per-class bias for balanced accuracy,
        then the temperature for NLL. Stores them in the buffers; returns a report with the
        validation balanced accuracy, ECE and NLL before and after."""
        from tailtune.imbalance import adjust

        logits, targets = logits.float().cpu(), targets.long().cpu()
        log_prior = self.log_prior.float().cpu()
        report: dict[str, Any] = {"steps": list(self.posthoc),
                                  "val_before": _calibration(self.adjust_logits(logits), targets)}
        counts = torch.bincount(targets, minlength=self.info.num_classes)
        report["val_min_class_count"] = smallest = int(counts.min())
        report["val_too_small"] = smallest < adjust.MIN_VAL_PER_CLASS
        if report["val_too_small"] and {"logit_adjust", "bias"} & set(self.posthoc):
            log.warning("validation has only %d image(s) in its smallest class: post-hoc tuning "
                        "on it is noisy%s", smallest, "; tuned steps are kept only where "
                        "cross-fitting shows they help" if self.posthoc_crossfit else "")
        gains = report["crossfit_gain"] = {}
        tau = untuned_tau = float(self.posthoc_tau)
        untuned_bias = self.posthoc_bias.float().cpu()
        # tau is tuned on the logits adjust_logits shifts (smoothing's floor off when tau != 0;
        # at tau = 0 the argmax is the same either way).
        unsmoothed = self.without_smoothing_floor(logits)
        if "logit_adjust" in self.posthoc:
            def fit_tau(z: Tensor, t: Tensor) -> Callable[[Tensor], Tensor]:
                tuned, _ = adjust.tune_logit_adjustment(z, t, log_prior)
                return lambda q: q - tuned * log_prior

            if self._adopt("logit_adjust", unsmoothed, targets, fit_tau, gains,
                           baseline=lambda q: q - untuned_tau * log_prior):
                tau, _ = adjust.tune_logit_adjustment(unsmoothed, targets, log_prior)
        z = (unsmoothed if tau != 0.0 else logits) - tau * log_prior
        bias = untuned_bias
        if "bias" in self.posthoc:
            def fit_bias(z: Tensor, t: Tensor) -> Callable[[Tensor], Tensor]:
                tuned = adjust.tune_class_bias(z, t)
                return lambda q: q + tuned

            if self._adopt("bias", z, targets, fit_bias, gains,
                           baseline=lambda q: q + untuned_bias):
                bias = adjust.tune_class_bias(z, targets)
        z = z + bias
        temperature = adjust.fit_temperature(z, targets) if "temperature" in self.posthoc \
            else float(self.posthoc_temperature)
        report["val_bal_acc_out_of_fold"] = self._out_of_fold_score(
            logits, targets, tuned_tau=tau != untuned_tau, tau=tau,
            tuned_bias=not torch.equal(bias, untuned_bias), bias=bias)
        self.posthoc_tau.fill_(tau)
        self.posthoc_bias.copy_(bias)
        self.posthoc_temperature.fill_(temperature)
        report.update({"logit_adjust_tau": tau, "class_bias": [float(b) for b in bias],
                       "temperature": temperature,
                       "val_after": _calibration(self.adjust_logits(logits), targets)})
        return report

    def _out_of_fold_score(self, logits: Tensor, targets: Tensor, *, tuned_tau: bool,
                           tau: float, tuned_bias: bool, bias: Tensor) -> float | None:
        """Validation balanced accuracy of the adopted tuning, out of fold: each fold scored
        with tau and bias tuned (as adopted) on the other folds. The score on the images they
        were tuned on is optimistic, more so the more classes a bias has to fit (a config
        with a tuned bias would win validation's pick for that alone). None when nothing was
        tuned (val's own score is then honest) or a class has < 2 val images."""
        from tailtune.imbalance import adjust

        if not (tuned_tau or tuned_bias):
            return None
        return adjust.out_of_fold_balanced_accuracy(
            logits, targets, self._fold_refit(tuned_tau=tuned_tau, tau=tau,
                                              tuned_bias=tuned_bias, bias=bias))

    def _fold_refit(self, *, tuned_tau: bool, tau: float, tuned_bias: bool, bias: Tensor
                    ) -> Callable[[Tensor, Tensor], Callable[[Tensor], Tensor]]:
        """``fit(raw logits, targets) -> adjust``: the adopted tau and bias, refitted on one
        fold's rows where they were tuned, kept where they were not."""
        from tailtune.imbalance import adjust

        log_prior = self.log_prior.float().cpu()

        def fit(raw: Tensor, t: Tensor) -> Callable[[Tensor], Tensor]:
            fold_tau = adjust.tune_logit_adjustment(self.without_smoothing_floor(raw), t,
                                                    log_prior)[0] if tuned_tau else tau

            def shift(q: Tensor) -> Tensor:
                return (self.without_smoothing_floor(q) if fold_tau != 0.0 else q) \
                    - fold_tau * log_prior

            fold_bias = adjust.tune_class_bias(shift(raw), t) if tuned_bias else bias
            return lambda q: shift(q) + fold_bias

        return fit

    def _adopt(self, step: str, logits: Tensor, targets: Tensor,
               fit: Callable[[Tensor, Tensor], Callable[[Tensor], Tensor]],
               gains: dict[str, float | None], baseline: Callable[[Tensor], Tensor]) -> bool:
        """Whether to adopt ``step`` tuned on all of val: always, or with ``posthoc_crossfit``
        only when its cross-fitted gain over the untuned ``baseline`` is positive."""
        from tailtune.imbalance import adjust

        if not self.posthoc_crossfit:
            return True
        gain = gains[step] = adjust.crossfitted_gain(logits, targets, fit, baseline)
        if gain is not None and gain > 0:
            return True
        log.warning("post-hoc %s not adopted: tuned on part of val, it %s on the rest", step,
                    "cannot be checked (a class has < 2 val images)" if gain is None
                    else f"changes balanced accuracy by {gain:+.4f}")
        return False

    # -- checkpoint contract --------------------------------------------------------------
    def checkpoint_metadata(self) -> dict[str, Any]:
        """Plain data describing the model; subclasses add what they own."""
        return {
            "dataset_info": self.info.to_dict(),
            SMOOTHING_FLOOR_KEY: self.remove_smoothing_floor,
            "logit_adjust_tau": float(self.posthoc_tau),
            "posthoc": {"steps": list(self.posthoc), "tau": float(self.posthoc_tau),
                        "bias": [float(b) for b in self.posthoc_bias],
                        "temperature": float(self.posthoc_temperature)},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault("tailtune", {}).update(self.checkpoint_metadata())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Written before 2026-12-03: its (tau, b, T) and prior were fitted to smoothed logits.
        self.remove_smoothing_floor = bool(
            checkpoint.get("tailtune", {}).get(SMOOTHING_FLOOR_KEY, False))


def _calibration(logits: Tensor, targets: Tensor) -> dict[str, float]:
    from tailtune.imbalance import adjust

    return {"bal_acc": adjust.balanced_accuracy(logits, targets),
            "ece": adjust.expected_calibration_error(logits, targets),
            "nll": adjust.negative_log_likelihood(logits, targets)}


def _default_posthoc_state(module: ClassifierModule, state_dict: dict[str, Tensor], prefix: str,
                           *args: Any) -> None:
    for name in ("posthoc_tau", "posthoc_bias", "posthoc_temperature"):
        state_dict.setdefault(prefix + name, getattr(module, name).detach().clone())
    # Checkpoints from before the trained prior was stored adjusted with the raw prior.
    counts = torch.tensor(module.info.class_counts, dtype=torch.float32).clamp_min(1.0)
    state_dict.setdefault(prefix + "log_prior", (counts / counts.sum()).log())
