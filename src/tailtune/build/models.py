"""Models from a config, and from a checkpoint's config.

What to build is read from the model class's declared kind (:class:`ClassifierModule`'s
``trains_on_features``, ``builds_on_checkpoint``, ``is_ensemble``), resolved from the
config's ``_target_``; the constructor then gets what that kind needs:

- a model that trains on images: the backbone group's ``backbone``, ``preprocess`` and
  ``backbone_identity`` (:func:`backbone_parts`);
- one that trains on frozen features: an ``extractor`` (:func:`feature_parts`), from the
  backbone group or, for one that builds on a checkpoint, from the fine-tuned
  ``model.init_from`` (with its ``source_head``); its data are that extractor's features
  (:func:`build_feature_experiment`);
- an ensemble: its members (:mod:`tailtune.build.ensemble` trains them; a saved ensemble's
  config lists them, :func:`rebuild_ensemble`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tailtune.build.checkpoints import check_same_split, dataset_info, read_checkpoint
from tailtune.build.config import (
    absolute_path,
    call_factory,
    model_class,
    module_config,
)
from tailtune.build.data import (
    build_datamodule,
    build_loss,
    checkpoint_loss,
    feature_resampler,
    refuse_tuning_on_test,
)
from tailtune.build.trainer import choose_device
from tailtune.data.datamodule import ImbalancedDataModule
from tailtune.data.info import DatasetInfo
from tailtune.features import FeatureCache, FeatureDataModule, FeatureExtractor, extract_features
from tailtune.models.base import ClassifierModule
from tailtune.models.combiners import Combiner, Samme
from tailtune.models.ensemble import EnsembleModule


# -- what each kind of model is built with ----------------------------------------------------
def backbone_parts(cfg: DictConfig) -> dict[str, Any]:
    backbone, preprocess, identity = instantiate(cfg.backbone)
    return {"backbone": backbone, "preprocess": preprocess, "backbone_identity": identity}


def feature_parts(cfg: DictConfig) -> dict[str, Any]:
    """The frozen feature extractor, and for a model that builds on a checkpoint (decoupled)
    the source head and the checkpoint's absolute path: both from the fine-tuned
    ``model.init_from`` checkpoint (whose weights the cache key hashes)."""
    spec = cfg.model.features
    parts: dict[str, Any] = {}
    if model_class(cfg).builds_on_checkpoint:
        from tailtune.models.decoupled import source_parts

        if not cfg.model.get("init_from"):
            raise ValueError("model=decoupled needs model.init_from=PATH of a model=finetune "
                             "checkpoint")
        # Absolute, so the checkpoints (which rebuild the backbone from it) load from anywhere.
        parts["init_from"] = absolute_path(cfg.model.init_from)
        source = read_checkpoint(parts["init_from"])
        backbone, preprocess, parts["source_head"], parts["source_log_prior"] = source_parts(
            model_from_checkpoint(source))
        identity = {"name": source["tailtune"]["config"]["backbone"]["name"],
                    "weights": "fine-tuned checkpoint"}
    else:
        backbone, preprocess, identity = instantiate(cfg.backbone)
    parts["extractor"] = FeatureExtractor(backbone, preprocess, identity, spec.layer, spec.dtype)
    return parts


def build_model(cfg: DictConfig, info: DatasetInfo, loss: torch.nn.Module,
                parts: dict[str, Any] | None = None) -> ClassifierModule:
    """The model ``cfg.model`` names, untrained; ``parts`` (as :func:`feature_parts` gives
    them) when they were built already."""
    cls = model_class(cfg)
    if cls.is_ensemble:
        return rebuild_ensemble(cfg, info, loss)
    if parts is None:
        parts = feature_parts(cfg) if cls.trains_on_features else backbone_parts(cfg)
    model = call_factory(instantiate(module_config(cfg.model)), cfg.model, "model",
                         info=info, loss=loss, **parts)
    return apply_speedups(model, cfg.model)


def _channels_last(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
    return output.contiguous(memory_format=torch.channels_last) if output.dim() == 4 else output


def apply_speedups(model: ClassifierModule, node: DictConfig) -> ClassifierModule:
    """The model's speed switches, in this one place: ``model.channels_last`` (NHWC weights and
    inputs: faster convolutions under bf16 on tensor cores, and with oneDNN on CPU) and
    ``model.compile`` (``torch.compile`` of the module's forward with
    ``model.compile_backend``). Neither
    changes parameter names, so checkpoints are the same with and without them."""
    if node.get("channels_last"):
        model.to(memory_format=torch.channels_last)
        preprocess = getattr(model, "preprocess", None)
        if isinstance(preprocess, torch.nn.Module):  # images leave it NHWC
            preprocess.register_forward_hook(_channels_last)
    if node.get("compile"):
        model.compile(backend=node.get("compile_backend") or "inductor")
    return model


# -- a model and its data ---------------------------------------------------------------------
def build_experiment(cfg: DictConfig, sampler: Any = None, owner: str = "the model"
                     ) -> tuple[L.LightningDataModule, ClassifierModule]:
    """Seed, then build the datamodule and the model it describes (the head's init draws
    from the seeded RNG, so equal seeds give equal models). ``sampler`` replaces the
    configured training sampler (see :func:`~tailtune.build.data.build_datamodule`)."""
    L.seed_everything(cfg.seed, workers=True)
    images = build_datamodule(cfg, sampler)
    if model_class(cfg).trains_on_features:
        data, model = build_feature_experiment(cfg, images)
    else:
        data, model = images, build_model(cfg, images.info, build_loss(cfg, images))
    refuse_tuning_on_test(model.posthoc_steps, images, owner)
    return data, model


def build_feature_experiment(cfg: DictConfig, images: ImbalancedDataModule
                             ) -> tuple[L.LightningDataModule, ClassifierModule]:
    """A frozen-feature model and its data: cached features (each split extracted once), or
    with ``model.features.cache=false`` or augmentation, images through the backbone each step.
    The probe's feature preprocessing is fitted on the training features only."""
    spec = cfg.model.features
    if model_class(cfg).builds_on_checkpoint and cfg.model.get("init_from"):
        check_same_split(dataset_info(read_checkpoint(cfg.model.init_from)), images.info,
                         "the checkpoint model.init_from")
    parts = feature_parts(cfg)
    extractor = parts["extractor"]
    resampler = feature_resampler(cfg)
    augmented = getattr(images, "train_transform", None) is not None
    if augmented and spec.cache:
        warnings.warn("training augmentation changes the features every epoch: the probe runs "
                      "the backbone every step instead of reading the feature cache",
                      stacklevel=2)
    cached = bool(spec.cache) and not augmented
    if resampler is not None and not cached:
        raise ValueError("feature-space samplers resample cached training features: they need "
                         "model.features.cache=true and transforms=none")
    device = choose_device(spec.get("device", "auto"), cfg.trainer.get("accelerator"))
    if cached:
        data: Any = FeatureDataModule(
            images, extractor, FeatureCache(spec.cache_dir), batch_size=spec.batch_size,
            eval_batch_size=spec.eval_batch_size, extract_batch_size=spec.extract_batch_size,
            resampler=resampler, device=device)
        data.setup("fit")
        train_features = data.split_features("train")[0]
    else:
        data = images
        train_features = extract_features(images.datasets["train"], extractor,
                                          spec.extract_batch_size, device)[0]
    model = build_model(cfg, data.info, build_loss(cfg, data), parts)
    if getattr(model, "needs_feature_transform", False):
        model.fit_feature_transform(train_features)
    return data, model


# -- ensembles ------------------------------------------------------------------------------
def _ensemble_module_keys() -> tuple[str, ...]:
    """The settings EnsembleModule's constructor (and ClassifierModule's, which it passes
    on) takes, read from their signatures so a new one is never silently dropped."""
    built_here = {"self", "members", "member_names", "info", "loss", "combiner"}
    names = [p.name for cls in (EnsembleModule, ClassifierModule)
             for p in inspect.signature(cls.__init__).parameters.values()
             if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in built_here]
    return ("_target_", "_partial_", *dict.fromkeys(names))


# cfg.model keys that configure EnsembleModule itself (the rest say how to build members).
ENSEMBLE_MODULE_KEYS = _ensemble_module_keys()


def make_ensemble(node: DictConfig, members: Sequence[ClassifierModule], names: Sequence[str],
                  info: DatasetInfo, loss: torch.nn.Module, combiner: Combiner
                  ) -> EnsembleModule:
    """The :class:`EnsembleModule` an ensemble's model node configures, of ``members``."""
    module = OmegaConf.masked_copy(node, [k for k in ENSEMBLE_MODULE_KEYS if k in node])
    return instantiate(module)(members=list(members), member_names=list(names), info=info,
                               loss=loss, combiner=combiner)


def rebuild_ensemble(cfg: DictConfig, info: DatasetInfo, loss: torch.nn.Module
                     ) -> EnsembleModule:
    """A saved ensemble's architecture (``model.member_configs`` in its config), for
    :func:`model_from_checkpoint`; the weights come from the checkpoint."""
    configs = cfg.model.get("member_configs")
    if not configs:
        raise ValueError("this ensemble config has no model.member_configs: only checkpoints "
                         "that tailtune wrote for an ensemble can be loaded as one")
    members = [model_from_config(OmegaConf.create(OmegaConf.to_container(node, resolve=True)),
                                 info) for node in configs]
    combiner = instantiate(cfg.combiner) if cfg.get("combiner") else Samme()
    return make_ensemble(cfg.model, members, list(cfg.model.member_names), info, loss, combiner)


# -- from checkpoints -------------------------------------------------------------------------
def model_from_config(cfg: DictConfig, info: DatasetInfo) -> ClassifierModule:
    """The untrained model of a checkpoint's config, to load its weights into. A model that
    trains on images is built without downloading or reading weights (``weights=none``): the
    checkpoint holds them. A frozen-feature model's checkpoint holds no backbone weights: its
    backbone is rebuilt from the config, and must hash as it did in training."""
    if not model_class(cfg).trains_on_features and "backbone" in cfg:
        cfg.backbone.weights = "none"
        cfg.backbone.weights_path = None
    return build_model(cfg, info, checkpoint_loss(cfg, info))


def model_from_checkpoint(checkpoint: dict[str, Any]) -> ClassifierModule:
    """Rebuild the module a checkpoint was trained as, and load its weights."""
    cfg = OmegaConf.create(checkpoint["tailtune"]["config"])
    model = model_from_config(cfg, dataset_info(checkpoint))
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    model.on_load_checkpoint(checkpoint)  # lets a model refuse weights it was not trained on
    return model


def load_checkpoint_model(path: str | Path, map_location: str = "cpu") -> ClassifierModule:
    model = model_from_checkpoint(read_checkpoint(path))
    return model.to(map_location).eval()
