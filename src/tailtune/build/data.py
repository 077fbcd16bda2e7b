"""Data and loss from a config: the image datamodule, its training sampler, and the loss,
which reads the class distribution that sampler draws."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from hydra.utils import instantiate
from omegaconf import DictConfig

from tailtune.build.config import call_factory, model_class
from tailtune.data.datamodule import ImbalancedDataModule
from tailtune.data.info import DatasetInfo
from tailtune.imbalance.resampling import is_feature_space
from tailtune.imbalance.samplers import ClassBalancedSampler, ShuffleSampler


def build_datamodule(cfg: DictConfig, sampler: Any = None) -> ImbalancedDataModule:
    """Instantiate and set up the datamodule; set-up (downloads, decoding) runs under a lock,
    so concurrent ranks or sweep jobs do it once, one after another. ``sampler``, a factory
    ``(labels=, seed=, num_classes=) -> Sampler``, replaces the configured one (an ensemble
    member's own draw: bagging, boosting)."""
    if sampler is None:
        sampler = index_sampler(cfg, instantiate(cfg.sampler) if cfg.get("sampler") else None)
    transform = instantiate(cfg.transforms) if cfg.get("transforms") else None  # train only
    limit = {"subsample": int(cfg.subsample)} if cfg.get("subsample") else {}  # debug=smoke
    datamodule = instantiate(cfg.data, sampler=sampler, seed=cfg.get("seed", 0),
                             train_transform=transform, **limit)
    lock_dir = Path(cfg.paths.cache_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / "data-setup.lock")):
        # The datamodule builds the sampler from its partial: name a key it does not take.
        call_factory(datamodule.setup, cfg.get("sampler") or {}, "sampler", stage="fit")
    return datamodule


def index_sampler(cfg: DictConfig, factory: Any) -> Any:
    """The training sampler the image datamodule gets.

    A feature-space resampler (SMOTE, ...) is refused under a model that trains on images, and
    left to the feature datamodule under one that trains on features. A model that wants
    class-balanced sampling (cRT, LWS) gets it with ``sampler=none``.
    """
    model = model_class(cfg)
    if is_feature_space(factory):
        if not model.trains_on_features:
            name = str(cfg.sampler.get("_target_", "")).rsplit(".", 1)[-1]
            raise ValueError(
                f"{name} resamples feature vectors (imbalanced-learn needs them to find "
                "neighbours), which exist only for a frozen backbone: use model=linear_probe or "
                "model=decoupled, or an index sampler (over, under, weighted, class_balanced) "
                "with this model")
        return None
    plain = factory is None or getattr(factory, "func", factory) is ShuffleSampler
    if plain and model.wants_balanced_sampling(cfg.model):
        return ClassBalancedSampler
    return factory


def feature_resampler(cfg: DictConfig) -> Any:
    """The configured feature-space resampler's factory, or None (an index sampler)."""
    factory = instantiate(cfg.sampler) if cfg.get("sampler") else None
    return factory if is_feature_space(factory) else None


# -- the loss -----------------------------------------------------------------------------------
def imbalance_ratio(counts: Any) -> float:
    counts = np.asarray(counts, dtype=np.float64)
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def rebalanced_epochs(datamodule: Any, epochs: int) -> list[int]:
    """The epochs in which the training sampler draws a less imbalanced class distribution
    than the real one (a progressive sampler only late in the run)."""
    raw = imbalance_ratio(datamodule.info.class_counts)
    return [e for e in range(max(1, epochs))
            if imbalance_ratio(datamodule.train_class_counts(e)) < raw * (1 - 1e-6)]


def build_loss(cfg: DictConfig, datamodule: Any) -> torch.nn.Module:
    """The loss, with the real training counts.

    A re-balancing sampler already changes the training prior; prior-based losses (weighted
    CE, class-balanced, balanced softmax, logit-adjusted, LDAM's DRW weights: they declare
    ``uses_prior``) then correct for the distribution the sampler draws in each epoch
    (``sampled_counts``, re-read at every epoch), so the run never corrects twice.
    ``correct_prior_for_sampler=false`` keeps the real prior, and warns if the sampler
    re-balances in any epoch of the run.
    """
    factory = instantiate(cfg.loss)
    kwargs: dict[str, Any] = {"class_counts": list(datamodule.info.class_counts)}
    if getattr(getattr(factory, "func", factory), "uses_prior", False):
        if cfg.get("correct_prior_for_sampler", True):
            kwargs["sampled_counts"] = datamodule.train_class_counts
        else:
            late = rebalanced_epochs(datamodule, int(cfg.trainer.get("max_epochs") or 1))
            if late:
                warnings.warn(f"the sampler re-balances the data (from epoch {late[0]} on) and "
                              "the loss corrects for the original prior too: this run "
                              "corrects twice (correct_prior_for_sampler=false)", stacklevel=2)
    return call_factory(factory, cfg.loss, "loss", **kwargs)


def checkpoint_loss(cfg: DictConfig, info: DatasetInfo) -> torch.nn.Module:
    """The loss of a model rebuilt from its checkpoint's config: the real training counts
    (the prior it was trained under is in the checkpoint's weights)."""
    return call_factory(instantiate(cfg.loss), cfg.loss, "loss",
                        class_counts=list(info.class_counts))


def refuse_tuning_on_test(steps: Any, images: ImbalancedDataModule, owner: str = "the model"
                          ) -> None:
    """Post-hoc steps (logit adjustment, bias, temperature, tau-norm) are fitted on validation
    predictions; with ``data.val_fraction=0`` those are the test predictions, and the test
    metrics reported after them would be fitted on test."""
    steps = list(steps or [])
    if steps and images.val_is_test:
        raise ValueError(
            f"{owner} tunes {', '.join(steps)} on validation predictions, but this data has no "
            "validation split (data.val_fraction=0 validates on test), so its test metrics "
            "would be fitted on test: give it a validation split (data.val_fraction > 0) or "
            "drop the step (model.posthoc=none, model.method=crt|lws)")
