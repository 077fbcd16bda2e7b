"""Fine-tuning with freeze-then-unfreeze: the head first, then the backbone at a lower lr.

Design (it avoids the known bugs of Lightning's ``BackboneFinetuning`` and timm's ``freeze``):

- Every parameter is in the optimizer from step 0, in two groups. The backbone group's lr
  factor is 0 until ``unfreeze_at``; no param group is ever added mid-run, so schedulers,
  ``LearningRateMonitor`` and optimizer-state resume all keep working.
- ``requires_grad`` is never flipped after construction (DDP would drop flipped weights from
  gradient averaging). The frozen backbone instead runs under ``no_grad``, so its weights get
  no gradient, no weight decay and no optimizer state: they stay bit-identical. DDP then
  needs ``find_unused_parameters=True`` (``some_parameters_idle``: when ``unfreeze_at > 0``).
- BatchNorm mode is enforced in ``train()``: Lightning calls ``.train()`` at fit start, which
  would otherwise set the frozen backbone's BatchNorm to update its running statistics.
- All schedule state derives from ``current_epoch`` and the optimizer step count, both of which
  checkpoints restore, so a run resumed before or after the boundary behaves like an
  uninterrupted one.

The long-tail recipe's switches (configs/experiment/lt_recipe.yaml) live here too:
``layer_decay`` (one param group per timm block, lrs decaying from the top), ``tune="bitfit"``
(only the backbone's biases train), ``tune="lora"`` (only low-rank adapters train,
:mod:`tailtune.models.lora`), ``mix`` (a :class:`~tailtune.data.mixing.BatchMix`: mixup/CutMix
with the mixed criterion), ``tta_flip`` (eval logits averaged with the mirror
image's) and ``probe_epochs`` (LP-FT's linear probe, fitted on cached features before the
first epoch instead of in image epochs with a frozen backbone).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from timm.models import group_parameters
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tailtune.backbones import ADAPTER_MARK, Preprocess
from tailtune.data.info import DatasetInfo
from tailtune.data.mixing import BatchMix
from tailtune.features.cache import FeatureCache
from tailtune.features.datamodule import unaugmented_train_features
from tailtune.features.extractor import FeatureExtractor
from tailtune.models.base import ClassifierModule
from tailtune.models.heads import build_head
from tailtune.models.lora import add_lora
from tailtune.models.schedules import WarmupCosine, stepping_batches

log = logging.getLogger(__name__)
TTA_MEAN_PROBABILITY_KEY = "tta_flip_mean_probability"

BN_MODES = ("frozen", "train")
TUNE_MODES = ("full", "bitfit", "lora")
OptimizerFactory = Callable[[Iterable[dict[str, Any]]], torch.optim.Optimizer]


class FineTuneModule(ClassifierModule):
    """A timm backbone plus a fresh head, trained head-first then end to end."""

    kind = "finetune"

    def __init__(
        self,
        backbone: nn.Module,
        preprocess: Preprocess,
        info: DatasetInfo,
        loss: nn.Module,
        backbone_identity: dict[str, Any] | None = None,
        lr: float = 1e-3,
        unfreeze_at: int = 5,
        backbone_lr_ratio: float = 0.1,
        train_stages: int | None = None,
        tune: str = "full",
        layer_decay: float = 1.0,
        lora_rank: int = 32,
        lora_alpha: float = 64.0,
        bn_after_unfreeze: str = "frozen",
        head_dropout: float = 0.0,
        mix: BatchMix | None = None,
        tta_flip: bool = False,
        probe_epochs: int = 0,
        feature_cache_dir: str | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: Any = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(info=info, loss=loss, **base_kwargs)
        if unfreeze_at < 0:
            raise ValueError(f"model.unfreeze_at must be >= 0, got {unfreeze_at}")
        if backbone_lr_ratio < 0:
            raise ValueError(f"model.backbone_lr_ratio must be >= 0, got {backbone_lr_ratio}")
        if bn_after_unfreeze not in BN_MODES:
            raise ValueError(
                f"unknown model.bn_after_unfreeze '{bn_after_unfreeze}'; "
                f"valid: {', '.join(BN_MODES)}"
            )
        if tune not in TUNE_MODES:
            raise ValueError(f"unknown model.tune '{tune}'; valid: {', '.join(TUNE_MODES)}")
        if not 0 < layer_decay <= 1:
            raise ValueError(f"model.layer_decay must be in (0, 1], got {layer_decay}")
        if probe_epochs < 0:
            raise ValueError(f"model.probe_epochs must be >= 0, got {probe_epochs}")
        self.backbone = backbone
        self.preprocess = preprocess
        self.backbone_identity = dict(backbone_identity or {})
        self.head_kind = getattr(loss, "head", "linear")  # the loss declares the head it needs
        self.head_scale = float(getattr(loss, "head_scale", 30.0))
        self.head = build_head(
            self.head_kind, backbone.num_features, info.num_classes, self.head_scale, head_dropout
        )
        self.lr = lr
        self.unfreeze_at = unfreeze_at
        self.backbone_lr_ratio = backbone_lr_ratio
        self.bn_after_unfreeze = bn_after_unfreeze
        self.tune = tune
        self.layer_decay = layer_decay
        self.mix = mix
        self.tta_flip = tta_flip
        # False for checkpoints older than it (their steps were tuned on mean logits).
        self.tta_mean_probability = True
        self.probe_epochs = probe_epochs
        self.feature_cache_dir = feature_cache_dir
        self.optimizer_factory = optimizer or (lambda groups: torch.optim.AdamW(groups))
        self.schedule = scheduler if scheduler is not None else WarmupCosine()
        self.trainable_prefixes = self._select_stages(train_stages)
        if tune == "lora":  # adapters on the layers of the stages that train
            add_lora(self.backbone, lora_rank, lora_alpha, self.trainable_prefixes)
        for name, param in self.backbone.named_parameters():
            # Set once, before any DDP wrapping: stages outside `train_stages` never train.
            param.requires_grad_(self._is_trainable(name))

    # -- which parts of the backbone train --------------------------------------------------
    def _select_stages(self, train_stages: int | None) -> tuple[str, ...]:
        """Parameter-name prefixes of the last ``train_stages`` coarse timm groups (all if None)."""
        if train_stages is None:
            return ("",)
        groups = group_parameters(self.backbone, self.backbone.group_matcher(coarse=True))
        ordered = list(groups.values())
        if not 0 <= train_stages <= len(ordered):
            raise ValueError(
                f"model.train_stages must be in [0, {len(ordered)}] for this backbone, "
                f"got {train_stages}"
            )
        chosen = ordered[len(ordered) - train_stages:] if train_stages else []
        return tuple(name for group in chosen for name in group)

    def _is_trainable(self, param_name: str) -> bool:
        if self.tune == "lora":  # LoRA (Hu et al. 2022): only the adapters
            return ADAPTER_MARK in param_name
        if self.tune == "bitfit" and not param_name.endswith("bias"):
            return False  # BitFit (Ben Zaken et al. 2022): only the biases of the backbone
        return any(param_name.startswith(p) for p in self.trainable_prefixes)

    @property
    def some_parameters_idle(self) -> bool:
        """The frozen backbone runs under no_grad until ``unfreeze_at``; untrained parameters
        (LoRA, BitFit, stages left out) have no ``requires_grad``, which DDP skips anyway."""
        return self.unfreeze_at > 0

    @property
    def backbone_unfrozen(self) -> bool:
        """True from epoch ``unfreeze_at`` on, while fitting."""
        trainer = self._trainer
        return trainer is not None and trainer.training and self.current_epoch >= self.unfreeze_at

    def train(self, mode: bool = True) -> FineTuneModule:
        super().train(mode)
        if not mode:
            return self
        if not self.backbone_unfrozen:
            self.backbone.eval()  # a fixed feature extractor: no BN updates, no dropout
            return self
        for name, module in self.backbone.named_modules():
            own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
            if isinstance(module, _BatchNorm):
                # Statistics follow bn_after_unfreeze in every stage that trains, whether its
                # affine parameters train (full, BitFit) or not (LoRA trains adapters only).
                in_trained_stage = not own or any(
                    p.startswith(prefix) for p in own for prefix in self.trainable_prefixes)
                if not in_trained_stage or self.bn_after_unfreeze == "frozen":
                    module.eval()
            elif own and not any(self._is_trainable(p) for p in own):
                module.eval()
        return self

    # -- forward ---------------------------------------------------------------------------
    def features(self, images: Tensor) -> Tensor:
        x = self.preprocess(images)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.backbone_unfrozen):
            return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, images: Tensor) -> Tensor:
        logits = self.head(self.features(images))
        if self.tta_flip and not self.training:
            # Test-time flip: the log of the two views' mean probability. Not their mean logits:
            # label smoothing's floor eps / K, which the post-hoc steps take off before the
            # prior, is exact only for a mean of smoothed distributions (softmax of mean
            # logits lifts every class the views disagree on above it).
            mirrored = self.head(self.features(images.flip(-1)))
            if not self.tta_mean_probability:
                return (logits + mirrored) / 2
            views = torch.stack([logits.log_softmax(dim=1), mirrored.log_softmax(dim=1)])
            logits = views.logsumexp(dim=0) - math.log(2.0)
        return logits

    def training_loss(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.mix is None:
            return super().training_loss(images, targets)
        mixed, partner, lam = self.mix(images, targets)
        logits = self(mixed)
        # Zhang et al.'s mixed criterion: any loss, prior-corrected ones included.
        return logits, (lam * self.criterion(logits, targets)
                        + (1 - lam) * self.criterion(logits, partner))

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.train()  # the BatchNorm/dropout mode depends on the epoch
        if self.mix is not None:
            # From the global generator, which EpochReseed has just seeded from (run seed,
            # epoch): each seed mixes differently, and a resumed epoch as the uninterrupted one.
            self.mix.reseed(int(torch.randint(2**62, ()).item()))

    # -- the head on cached features (LP-FT's probe) ---------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        # A resumed run restores the probed head with the rest of the weights.
        if self.probe_epochs and self.trainer.ckpt_path is None:
            self.fit_head_on_features(self.trainer.datamodule)

    def fit_head_on_features(self, datamodule: Any) -> None:
        """Fit the head for ``probe_epochs`` on the frozen backbone's features of the
        un-augmented training images: LP-FT's linear probe (Kumar et al., ICLR 2022), run to
        convergence for about the cost of one forward pass. The features come from the feature
        cache when ``feature_cache_dir`` is set, so the other seeds and configs of a sweep on
        the same backbone, data and resolution skip even that pass. Batches follow the
        datamodule's training sampler, so the loss sees the class mix it is corrected for."""
        started = time.perf_counter()
        trainable = [p.requires_grad for p in self.backbone.parameters()]
        try:  # the extractor freezes the backbone's parameters: give them back afterwards
            extractor = FeatureExtractor(self.backbone, self.preprocess, self.backbone_identity)
            cache = FeatureCache(self.feature_cache_dir) if self.feature_cache_dir else None
            features, labels, hit = unaugmented_train_features(
                datamodule, extractor, cache, datamodule.eval_batch_size, self.device)
        finally:
            for param, flag in zip(self.backbone.parameters(), trainable, strict=True):
                param.requires_grad_(flag)
        features, labels = features.to(self.device).float(), labels.to(self.device)
        sampler, batch_size = datamodule.train_sampler, datamodule.batch_size
        steps = self.probe_epochs * math.ceil(len(sampler) / batch_size)
        optimizer = self.optimizer_factory([{"params": list(self.head.parameters()),
                                             "lr": self.lr}])
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
        self.head.train()
        for epoch in range(self.probe_epochs):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            if hasattr(self.criterion, "set_epoch"):  # correct for what the sampler draws now
                self.criterion.set_epoch(epoch)
            for rows in torch.as_tensor(list(iter(sampler))).split(batch_size):
                rows = rows.to(self.device)
                loss = self.criterion(self.head(features[rows]), labels[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        log.info("head fitted on %s train features for %d epochs in %.1f s (last loss %.3f)",
                 "cached" if hit else "extracted", self.probe_epochs,
                 time.perf_counter() - started, loss.item())

    # -- optimisation ----------------------------------------------------------------------
    def backbone_param_groups(self) -> list[dict[str, Any]]:
        """The trainable backbone parameters, one group, or with ``layer_decay < 1`` one per
        timm block (``group_matcher``), the lr decaying by ``layer_decay`` per block from the
        top (layer-wise lr decay: Clark et al. 2020, Bao et al. 2022). The lrs are set here,
        not as timm's ``lr_scale``, which torch schedulers ignore."""
        base = self.lr * self.backbone_lr_ratio
        if self.layer_decay == 1.0:
            params = [p for p in self.backbone.parameters() if p.requires_grad]
            return [{"params": params, "lr": base, "name": "backbone"}] if params else []
        named = dict(self.backbone.named_parameters())
        blocks = list(group_parameters(self.backbone,
                                       self.backbone.group_matcher(coarse=False)).values())
        groups = []
        for depth, names in enumerate(blocks):
            params = [named[n] for n in names if named[n].requires_grad]
            if params:
                scale = self.layer_decay ** (len(blocks) - 1 - depth)
                groups.append({"params": params, "lr": base * scale,
                               "name": f"backbone.{depth}"})
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [{"params": list(self.head.parameters()), "lr": self.lr, "name": "head"},
                  *self.backbone_param_groups()]
        optimizer = self.optimizer_factory(groups)
        total, per_epoch = stepping_batches(self.trainer)
        unfreeze_step = self.unfreeze_at * per_epoch

        def head_factor(step: int) -> float:
            return self.schedule.factor(step, 0, total, per_epoch)

        def backbone_factor(step: int) -> float:
            return self.schedule.factor(step, unfreeze_step, total, per_epoch)

        lambdas = [head_factor] + [backbone_factor] * (len(groups) - 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def checkpoint_metadata(self) -> dict[str, Any]:
        meta = super().checkpoint_metadata()
        meta.update({
            "model": self.kind,
            "preprocess": self.preprocess.to_config(),
            "backbone": self.backbone_identity,
            "head": {"kind": self.head_kind, "scale": self.head_scale},
            TTA_MEAN_PROBABILITY_KEY: self.tta_mean_probability,
        })
        return meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # Written before 2026-12-05: its post-hoc steps were tuned on the flip's mean logits.
        self.tta_mean_probability = bool(
            checkpoint.get("tailtune", {}).get(TTA_MEAN_PROBABILITY_KEY, False))
