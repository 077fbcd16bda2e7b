"""The pipeline's ensemble part: config -> members -> combiner -> metrics and checkpoint.

Like :mod:`tailtune.pipeline` (whose builders it reuses for every member), it knows Hydra;
the models and the combiner math below it do not.

- ``model.training=sequential`` (the default, and the only mode for bagging and boosting):
  each member is built and fitted like a single run of its own (its backbone, model kind,
  sampler, Trainer and checkpoints under ``<run>/members/<name>/``), one after another.
- ``joint``: one :class:`EnsembleModule` on one image datamodule; every step feeds the same
  raw batch to all members and sums their losses.

Either way the combiner is then fitted on validation predictions of the members' best
checkpoints, and members and ensemble are reported side by side. ``tailtune-eval
model=ensemble model.checkpoints=[...]`` assembles the same ensemble from trained runs.
"""

from __future__ import annotations

import copy
import glob
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader, Dataset

from tailtune import pipeline
from tailtune.console import track
from tailtune.data.datamodule import ImbalancedDataModule
from tailtune.data.info import DatasetInfo
from tailtune.models.base import ClassifierModule
from tailtune.models.combiners import Combiner, Samme
from tailtune.models.ensemble import EnsembleModule

log = logging.getLogger(__name__)

# cfg.model keys that configure EnsembleModule itself (the rest say how to build members).
MODULE_KEYS = ("_target_", "_partial_", "training", "logit_adjust_tau", "posthoc",
               "many_threshold", "few_threshold", "confusion_every_n_epochs", "log_figures")
# Settings of the ensemble node that every member inherits.
SHARED_KEYS = ("many_threshold", "few_threshold", "log_figures")
BAGGING = ("none", "under")
BOOSTING = ("none", "samme")
REPORTED = ("acc", "bal_acc", "macro_f1")  # per member in TensorBoard, plus recall/<class>


def is_ensemble(cfg: DictConfig) -> bool:
    model = cfg.get("model") or {}
    return str(model.get("_target_", "")).endswith("EnsembleModule")


# -- member configs -------------------------------------------------------------------------
def config_dirs() -> list[Path]:
    """Where group options live: the user's $TAILTUNE_CONFIG_DIR first, then tailtune's."""
    from tailtune.cli.config import CONFIG_PATH

    dirs = [Path(os.environ["TAILTUNE_CONFIG_DIR"])] if os.environ.get("TAILTUNE_CONFIG_DIR") \
        else []
    if CONFIG_PATH.startswith("pkg://"):
        dirs.append(Path(str(resources.files("tailtune") / "configs")))
    else:
        dirs.append(Path(CONFIG_PATH))
    return dirs


def load_option(group: str, option: str) -> DictConfig:
    """A group option's YAML (e.g. ``backbone/efficientnet_lite1.yaml``) as a config node."""
    for root in config_dirs():
        path = root / group / f"{option}.yaml"
        if path.is_file():
            return OmegaConf.load(path)
    options = sorted({p.stem for root in config_dirs() for p in (root / group).glob("*.yaml")})
    raise ValueError(f"unknown ensemble member {group} '{option}'; valid: {', '.join(options)}")


def member_configs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """``(name, full run config)`` per member: the run's config with the member's backbone,
    its model kind's settings (``model.member_models.<kind>``), its own seed (``seed + i``)
    and its own output dir.

    ``model.members`` entries are backbone option names, or mappings
    ``{backbone: NAME, model: KIND, <backbone key>: value, ...}``.
    """
    ens = cfg.model
    entries = list(ens.get("members") or [])
    if not entries:
        raise ValueError("model.members is empty: an ensemble needs at least one member, e.g. "
                         "model.members=[efficientnet_lite0,efficientnet_lite1]")
    kinds = ens.get("member_model", "linear_probe")
    kinds = list(kinds) if isinstance(kinds, (ListConfig, list)) else [kinds] * len(entries)
    if len(kinds) != len(entries):
        raise ValueError(f"model.member_model lists {len(kinds)} kinds for {len(entries)} "
                         "members: give one kind, or one per member")
    available = list(ens.get("member_models") or {})
    out: list[tuple[str, DictConfig]] = []
    for i, (entry, kind) in enumerate(zip(entries, kinds, strict=True)):
        overrides: dict[str, Any] = {}
        if isinstance(entry, (DictConfig, dict)):
            overrides = dict(OmegaConf.to_container(entry, resolve=True)) \
                if isinstance(entry, DictConfig) else dict(entry)
            if "backbone" not in overrides:
                raise ValueError(f"model.members[{i}] needs a 'backbone' option name")
            option = str(overrides.pop("backbone"))
            kind = overrides.pop("model", kind)
        else:
            option = str(entry)
        if kind not in available:
            raise ValueError(f"unknown member model '{kind}'; valid: {', '.join(available)}")
        backbone = load_option("backbone", option)
        if ens.get("member_image_size") is not None:
            backbone.image_size = int(ens.member_image_size)
        backbone = OmegaConf.merge(backbone, overrides)
        name = f"{i}-{option}"
        mcfg = copy.deepcopy(cfg)
        with open_dict(mcfg):
            mcfg.backbone = backbone
            model = OmegaConf.to_container(ens.member_models[kind], resolve=False)
            model.update({k: ens[k] for k in SHARED_KEYS if k in ens})
            mcfg.model = model
            mcfg.seed = int(cfg.seed) + i
            mcfg.paths.output_dir = str(Path(cfg.paths.output_dir) / "members" / name)
            mcfg.ensemble_member = {"name": name, "index": i, "kind": str(kind),
                                    "backbone": option, "bagging": str(ens.get("bagging")),
                                    "boosting": str(ens.get("boosting"))}
            mcfg.pop("combiner", None)
        out.append((name, mcfg))
    return out


def build_combiner(cfg: DictConfig) -> Combiner:
    if (cfg.model.get("boosting") or "none") == "samme":
        return Samme()  # boosting sets its member weights
    node = cfg.get("combiner")
    if not node:
        raise ValueError("no combiner: choose one with combiner=mean_prob|mean_logit|majority|"
                         "weighted|stacking")
    return instantiate(node)


def check_ensemble(cfg: DictConfig, images: ImbalancedDataModule, combiner: Combiner) -> None:
    ens = cfg.model
    bagging, boosting = ens.get("bagging") or "none", ens.get("boosting") or "none"
    if bagging not in BAGGING:
        raise ValueError(f"unknown model.bagging '{bagging}'; valid: {', '.join(BAGGING)}")
    if boosting not in BOOSTING:
        raise ValueError(f"unknown model.boosting '{boosting}'; valid: {', '.join(BOOSTING)}")
    if bagging != "none" and boosting != "none":
        raise ValueError("model.bagging and model.boosting exclude each other: choose one")
    if (bagging != "none" or boosting != "none") and ens.get("training") == "joint":
        raise ValueError("bagging and boosting members each need their own sampler, so they "
                         "train one after another: use model.training=sequential")
    if combiner.needs_validation and images.val_is_test:
        raise ValueError(f"combiner {combiner.name} is fitted on validation predictions, but "
                         "this data has no validation split (data.val_fraction=0 validates on "
                         "test): use combiner=mean_prob|mean_logit|majority, or a val split")
    pipeline.refuse_tuning_on_test(ClassifierModule._posthoc_steps(ens.get("posthoc")), images,
                                   "the ensemble (model.posthoc)")


# -- predictions ------------------------------------------------------------------------------
def device_for(cfg: DictConfig) -> str:
    if cfg.trainer.get("accelerator") == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


@torch.no_grad()
def dataset_logits(model: ClassifierModule, dataset: Dataset, batch_size: int,
                   device: str = "cpu", description: str = "scoring"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(eval logits, targets)`` of a whole dataset, in its order; images or feature rows."""
    model = model.to(device).eval()
    logits, targets = [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for x, y in track(loader, description):
        logits.append(model.eval_logits(x.to(device)).float().cpu())
        targets.append(torch.as_tensor(y).long())
    model.cpu()
    return torch.cat(logits), torch.cat(targets)


def split_logits(members: Sequence[ClassifierModule], images: ImbalancedDataModule,
                 split: str, device: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every member's logits on a split's raw images (each member resizes for itself). The
    same function serves training and assembling from checkpoints, so both agree exactly."""
    outputs = [dataset_logits(m, images.datasets[split], images.eval_batch_size, device,
                              f"scoring member {i + 1}/{len(members)} on {split}")
               for i, m in enumerate(members)]
    return [z for z, _ in outputs], outputs[0][1]


def metrics_of(logits: torch.Tensor, targets: torch.Tensor, info: DatasetInfo,
               many: int = 100, few: int = 20) -> dict[str, float]:
    from tailtune.metrics import ImbalancedClassificationMetrics

    metrics = ImbalancedClassificationMetrics(list(info.class_names), list(info.class_counts),
                                              many, few)
    metrics.update(logits.float(), targets)
    return metrics.compute()


def evaluate_ensemble(ensemble: EnsembleModule, images: ImbalancedDataModule, device: str,
                      extra_members: dict[str, dict[str, Any]] | None = None
                      ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Fit the combiner (and post-hoc steps) on validation, then report val and test of the
    ensemble and of every member. Returns ``(metrics, test targets, test probabilities)``."""
    info = ensemble.info
    many, few = getattr(ensemble, "shot_thresholds", (100, 20))
    val_logits, val_targets = split_logits(ensemble.members, images, "val", device)
    test_logits, test_targets = split_logits(ensemble.members, images, "test", device)
    if ensemble.combiner.needs_validation:
        val_raw = ensemble.fit_combiner(val_logits, val_targets)
    else:
        ensemble.combiner_fitted = True
        val_raw = ensemble.combiner.combine_val(val_logits)
    test_raw = ensemble.combiner.combine(test_logits)
    metrics: dict[str, Any] = {}
    if ensemble.posthoc_steps:
        before = {"val": metrics_of(ensemble.adjust_logits(val_raw), val_targets, info, many,
                                    few),
                  "test": metrics_of(ensemble.adjust_logits(test_raw), test_targets, info,
                                     many, few)}
        metrics["posthoc"] = {**ensemble.fit_posthoc(val_raw, val_targets), "before": before}
    with torch.no_grad():
        val_scores, test_scores = ensemble.adjust_logits(val_raw), ensemble.adjust_logits(test_raw)
    metrics["val"] = metrics_of(val_scores, val_targets, info, many, few)
    metrics["test"] = metrics_of(test_scores, test_targets, info, many, few)
    metrics["members"] = {}
    for i, name in enumerate(ensemble.member_names):
        metrics["members"][name] = {
            "val": metrics_of(val_logits[i], val_targets, info, many, few),
            "test": metrics_of(test_logits[i], test_targets, info, many, few),
            **(extra_members or {}).get(name, {}),
        }
    metrics["combiner"] = ensemble.combiner.state()
    best = max(metrics["members"].values(), key=lambda m: m["test"]["bal_acc"])
    metrics["ensemble_minus_best_member_test_bal_acc"] = \
        metrics["test"]["bal_acc"] - best["test"]["bal_acc"]
    return metrics, test_targets, test_scores.softmax(dim=1)


# -- building members -----------------------------------------------------------------------
def build_member(mcfg: DictConfig, sampler: Callable[..., Any] | None = None
                 ) -> tuple[L.LightningDataModule, ClassifierModule]:
    """A member's data and model, exactly as a single run of its config builds them; with
    ``sampler``, that training sampler replaces the configured one before the loss (which
    reads the sampler's class distribution) and the feature datamodule are built."""
    L.seed_everything(int(mcfg.seed), workers=True)
    images = pipeline.build_datamodule(mcfg)
    if sampler is not None:
        images.train_sampler = sampler(labels=images.split_labels("train"), seed=int(mcfg.seed),
                                       num_classes=images.info.num_classes)
    if pipeline.is_feature_model(mcfg):
        data, model = pipeline.build_feature_experiment(mcfg, images)
    else:
        data, model = images, pipeline.build_model(mcfg, images.info,
                                                   pipeline.build_loss(mcfg, images))
    pipeline.refuse_tuning_on_test(model.posthoc_steps, images,
                                   f"member {mcfg.ensemble_member.name}")
    return data, model


def untrained_member(mcfg: DictConfig, images: ImbalancedDataModule) -> ClassifierModule:
    """A member for joint training on the shared image datamodule (probes: backbone every
    step; their feature standardisation is fitted on the training split's features)."""
    L.seed_everything(int(mcfg.seed), workers=True)
    loss = pipeline.build_loss(mcfg, images)
    if not pipeline.is_feature_model(mcfg):
        model = pipeline.build_model(mcfg, images.info, loss)
    else:
        model = pipeline.feature_model(mcfg, images.info, loss, *pipeline.build_extractor(mcfg))
    pipeline.refuse_tuning_on_test(model.posthoc_steps, images,
                                   f"member {mcfg.ensemble_member.name}")
    if getattr(model, "needs_feature_transform", False):
        from tailtune.data.features import extract_features

        features = extract_features(images.datasets["train"], model.extractor,
                                    mcfg.model.features.extract_batch_size,
                                    pipeline.extraction_device(mcfg))[0]
        model.fit_feature_transform(features)
    return model


def make_ensemble(cfg: DictConfig, members: Sequence[ClassifierModule], names: Sequence[str],
                  info: DatasetInfo, loss: torch.nn.Module, combiner: Combiner
                  ) -> EnsembleModule:
    node = OmegaConf.masked_copy(cfg.model, [k for k in MODULE_KEYS if k in cfg.model])
    ensemble = instantiate(node)(members=list(members), member_names=list(names), info=info,
                                 loss=loss, combiner=combiner)
    ensemble.shot_thresholds = (int(cfg.model.get("many_threshold", 100)),
                                int(cfg.model.get("few_threshold", 20)))
    return ensemble


def ensemble_from_config(cfg: DictConfig, info: DatasetInfo, loss: torch.nn.Module
                         ) -> EnsembleModule:
    """Rebuild a saved ensemble's architecture (``model.member_configs`` in its config), for
    :func:`tailtune.pipeline.model_from_checkpoint`; the weights come from the checkpoint."""
    configs = cfg.model.get("member_configs")
    if not configs:
        raise ValueError("this ensemble config has no model.member_configs: only checkpoints "
                         "that tailtune wrote for an ensemble can be loaded as one")
    members = []
    for node in configs:
        mcfg = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
        if not pipeline.is_feature_model(mcfg):  # its weights are in the checkpoint
            mcfg.backbone.weights, mcfg.backbone.weights_path = "none", None
        member_loss = instantiate(mcfg.loss)(class_counts=list(info.class_counts))
        members.append(pipeline.build_model(mcfg, info, member_loss))
    combiner = instantiate(cfg.combiner) if cfg.get("combiner") else Samme()
    return make_ensemble(cfg, members, list(cfg.model.member_names), info, loss, combiner)


# -- outputs --------------------------------------------------------------------------------
def plain_config(cfg: DictConfig) -> dict[str, Any]:
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    return config


def save_ensemble_checkpoint(ensemble: EnsembleModule, config: dict[str, Any],
                             member_cfgs: Sequence[dict[str, Any]], path: Path) -> None:
    """The ensemble as one checkpoint ``tailtune-eval``/``tailtune.load`` rebuild: the
    run's config plus every member's config, the members' weights and the combiner state."""
    config = copy.deepcopy(config)
    config["model"]["member_configs"] = list(member_cfgs)
    config["model"]["member_names"] = list(ensemble.member_names)
    if isinstance(ensemble.combiner, Samme):
        config["combiner"] = {"_target_": "tailtune.models.combiners.Samme"}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": ensemble.state_dict(),
                "tailtune": {**ensemble.checkpoint_metadata(), "config": config},
                "pytorch-lightning_version": L.__version__}, path)


def write_outputs(metrics: dict[str, Any], targets: torch.Tensor, probs: torch.Tensor,
                  info: DatasetInfo, run_dir: Path, loggers: Sequence[Logger]) -> None:
    """test_confusion.csv, test_predictions.npz, and TensorBoard scalars of the ensemble
    (``val/*``, ``test/*``) and of each member (``member/<name>/<split>/*``)."""
    from tailtune.metrics import write_confusion_csv

    k = info.num_classes
    confusion = torch.bincount(targets * k + probs.argmax(dim=1), minlength=k * k).view(k, k)
    write_confusion_csv(confusion, info.class_names, run_dir / "test_confusion.csv")
    np.savez_compressed(run_dir / "test_predictions.npz", targets=targets.numpy(),
                        probs=probs.numpy(), class_names=np.array(info.class_names))
    values: dict[str, float] = {}
    for stage in ("val", "test"):
        values.update({f"{stage}/{key}": v for key, v in metrics.get(stage, {}).items()})
        for name, member in metrics.get("members", {}).items():
            values.update({f"member/{name}/{stage}/{key}": v
                           for key, v in member.get(stage, {}).items()
                           if key in REPORTED or key.startswith("recall/")})
    hp = {f"hp/{m}": float(metrics[m.split("/")[0]][m.split("/", 1)[1]])
          for m in pipeline.HP_METRICS if m.split("/", 1)[1] in metrics.get(m.split("/")[0], {})}
    for logger in loggers:  # hp/*: once, with the final values (hparams_to_loggers)
        logger.log_metrics({**values, **hp}, step=0)
        logger.finalize("success")


# -- training -------------------------------------------------------------------------------
def fit_ensemble(cfg: DictConfig, run_dir: Path, choices: dict[str, str],
                 overrides: Sequence[str]) -> dict[str, Any]:
    """Train the members (sequentially or jointly), fit the combiner on validation and
    report every member next to the ensemble; writes ``checkpoints/best.ckpt``."""
    L.seed_everything(int(cfg.seed), workers=True)
    specs = member_configs(cfg)
    combiner = build_combiner(cfg)
    images = pipeline.build_datamodule(cfg)
    check_ensemble(cfg, images, combiner)
    if pipeline.is_rank_zero():
        images.print_summary()
    loggers = pipeline.build_loggers(cfg, run_name=pipeline.run_name(list(overrides)))
    pipeline.hparams_to_loggers(loggers, pipeline.hyperparameters(cfg, choices))  # at start
    device = device_for(cfg)
    if cfg.model.get("training", "sequential") == "joint":
        ensemble, extra = _fit_joint(cfg, specs, images, combiner, run_dir)
    else:
        ensemble, extra = _fit_sequential(cfg, specs, images, combiner)
    metrics, targets, probs = evaluate_ensemble(ensemble, images, device, extra)
    best = run_dir / "checkpoints" / "best.ckpt"
    save_ensemble_checkpoint(ensemble, plain_config(cfg), [plain_config(m) for _, m in specs],
                             best)
    metrics.update({"best_checkpoint": str(best), "dataset": images.info.to_dict(),
                    "overrides": list(overrides),
                    "ensemble": {"training": str(cfg.model.get("training")),
                                 "bagging": str(cfg.model.get("bagging")),
                                 "boosting": str(cfg.model.get("boosting")),
                                 "combiner": ensemble.combiner.name}})
    write_outputs(metrics, targets, probs, images.info, run_dir, loggers)
    return metrics


def _train_member(mcfg: DictConfig, sampler: Callable[..., Any] | None
                  ) -> tuple[L.LightningDataModule, ClassifierModule, dict[str, Any]]:
    data, model = build_member(mcfg, sampler)
    member_dir = Path(mcfg.paths.output_dir)
    trainer = pipeline.build_trainer(mcfg, member_dir, pipeline.training_callbacks(mcfg, data),
                                     pipeline.build_loggers(mcfg))
    trainer.fit(model, datamodule=data)
    fitted = pipeline.final_metrics(trainer, model, data, test=False)  # loads the best weights
    return data, model, {"best_checkpoint": fitted["best_checkpoint"],
                         "epochs_trained": fitted["epochs_trained"]}


def _train_split(data: L.LightningDataModule) -> Dataset:
    """The training split as stored (not resampled): feature rows for probes, else images."""
    features = getattr(data, "features", None)
    return features["train"] if features else data.datasets["train"]


def _fit_sequential(cfg: DictConfig, specs: list[tuple[str, DictConfig]],
                    images: ImbalancedDataModule, combiner: Combiner
                    ) -> tuple[EnsembleModule, dict[str, dict[str, Any]]]:
    from tailtune.imbalance import ensembles

    ens = cfg.model
    bagging, boosting = ens.get("bagging") or "none", ens.get("boosting") or "none"
    if (bagging != "none" or boosting != "none") and cfg.get("sampler") and \
            not str(cfg.sampler.get("_target_", "")).endswith("ShuffleSampler"):
        warnings.warn("bagging/boosting members draw their own training samples: the "
                      "configured sampler is not used", stacklevel=2)
    train_labels = images.split_labels("train")
    weights = ensembles.samme_initial_weights(train_labels) if boosting == "samme" else None
    members, names, extra, alphas = [], [], {}, []
    for number, (name, mcfg) in enumerate(specs, start=1):
        log.info("member %d/%d: %s (%s)", number, len(specs), name,
                 mcfg.ensemble_member.kind)
        sampler = None
        if bagging == "under":
            sampler = _partial(ensembles.BalancedBagSampler, draw_seed=int(mcfg.seed))
        elif boosting == "samme":
            sampler = _partial(ensembles.SampleWeightSampler, weights=weights)
        if sampler is not None:
            with open_dict(mcfg):
                mcfg.sampler = None  # the member's own draw replaces it
        data, model, info = _train_member(mcfg, sampler)
        if bagging == "under":
            subset = data.train_sampler.subset if hasattr(data.train_sampler, "subset") else \
                data.images.train_sampler.subset
            info["bag"] = {"draw_seed": int(mcfg.seed), "size": len(subset),
                           "class_counts": np.bincount(train_labels[subset]).tolist()}
        if boosting == "samme":
            logits, targets = dataset_logits(model, _train_split(data), 256)
            assert np.array_equal(targets.numpy(), train_labels)
            weights, error, alpha = ensembles.samme_update(
                weights, logits.argmax(dim=1).numpy(), train_labels, images.info.num_classes)
            alphas.append(alpha)
            info["samme"] = {"weighted_error": error, "alpha": alpha}
        members.append(model)
        names.append(name)
        extra[name] = info
    if boosting == "samme":
        combiner = Samme(alphas)
    loss = pipeline.build_loss(cfg, images)
    return make_ensemble(cfg, members, names, images.info, loss, combiner), extra


def _partial(cls: Callable[..., Any], **bound: Any) -> Callable[..., Any]:
    def factory(**kwargs: Any) -> Any:
        return cls(**kwargs, **bound)

    return factory


def _fit_joint(cfg: DictConfig, specs: list[tuple[str, DictConfig]],
               images: ImbalancedDataModule, combiner: Combiner, run_dir: Path
               ) -> tuple[EnsembleModule, dict[str, dict[str, Any]]]:
    members = [untrained_member(mcfg, images) for _, mcfg in specs]
    L.seed_everything(int(cfg.seed), workers=True)
    ensemble = make_ensemble(cfg, members, [n for n, _ in specs], images.info,
                             pipeline.build_loss(cfg, images), combiner)
    trainer = pipeline.build_trainer(cfg, run_dir, pipeline.training_callbacks(cfg, images),
                                     pipeline.build_loggers(cfg))
    trainer.fit(ensemble, datamodule=images)
    callback = trainer.checkpoint_callback
    best = callback.best_model_path if callback is not None else ""
    if best:  # the members' weights at the best (soft-vote) validation epoch
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        ensemble.load_state_dict(state)
    ensemble.combiner_fitted = not ensemble.combiner.needs_validation
    return ensemble, {n: {"best_checkpoint": best or None} for n, _ in specs}


# -- assembling from checkpoints ----------------------------------------------------------------
def expand_checkpoints(entries: Sequence[str]) -> list[Path]:
    """Paths, globs (``logs/multiruns/X/*/checkpoints/best.ckpt``) or run/sweep dirs (their
    ``best.ckpt`` files, except ensemble checkpoints), in order, without duplicates."""
    found: list[Path] = []
    for entry in entries:
        path = Path(str(entry)).expanduser()
        if path.is_dir():
            hits = sorted(p for p in path.rglob("best.ckpt") if not _is_ensemble_ckpt(p))
        elif any(c in str(entry) for c in "*?["):
            hits = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        else:
            hits = [path]
        if not hits:
            raise ValueError(f"model.checkpoints entry '{entry}' matches no checkpoint")
        found += [h for h in hits if h not in found]
    return found


def _is_ensemble_ckpt(path: Path) -> bool:
    meta = torch.load(path, map_location="cpu", weights_only=True).get("tailtune", {})
    return meta.get("model") == "ensemble"


def check_compatible(paths: Sequence[Path], checkpoints: Sequence[dict[str, Any]]) -> None:
    """Members must share the dataset (class names) and the data split (fingerprint)."""
    first = DatasetInfo.from_dict(checkpoints[0]["tailtune"]["dataset_info"])
    for path, ckpt in zip(paths, checkpoints, strict=True):
        meta = ckpt["tailtune"]
        if meta.get("model") == "ensemble":
            raise ValueError(f"{path} is an ensemble checkpoint; give its members' checkpoints")
        info = DatasetInfo.from_dict(meta["dataset_info"])
        if info.class_names != first.class_names:
            raise ValueError(f"{path} was trained on classes {list(info.class_names)[:5]}..., "
                             f"{paths[0]} on {list(first.class_names)[:5]}...: checkpoints of "
                             "different datasets cannot form an ensemble")
        if info.split_fingerprint != first.split_fingerprint:
            raise ValueError(f"the data split of {path} differs from that of {paths[0]} "
                             f"(fingerprint {info.split_fingerprint} vs "
                             f"{first.split_fingerprint}): one member's test images may be "
                             "another's training images")


def assemble_from_checkpoints(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``tailtune-eval model=ensemble model.checkpoints=[...]``: no retraining. Fits the
    combiner on validation, reports test; writes an ensemble checkpoint of its own."""
    entries = list(cfg.model.get("checkpoints") or [])
    if not entries:
        raise ValueError("model.checkpoints is empty: give the members' checkpoints, e.g. "
                         "model.checkpoints='[logs/multiruns/<sweep>/*/checkpoints/best.ckpt]'")
    paths = expand_checkpoints(entries)
    checkpoints = [pipeline.read_checkpoint(p) for p in paths]
    check_compatible(paths, checkpoints)
    run_cfg = OmegaConf.create(checkpoints[0]["tailtune"]["config"])
    with open_dict(run_cfg):
        run_cfg.paths = cfg.paths  # this eval's own dirs
        run_cfg.trainer = cfg.trainer
    combiner = build_combiner(cfg)
    images = pipeline.build_datamodule(run_cfg)
    pipeline.check_same_split(checkpoints[0], images.info)
    ens_cfg = OmegaConf.create({"model": {k: cfg.model[k] for k in MODULE_KEYS
                                          if k in cfg.model}})
    check_ensemble(OmegaConf.merge(ens_cfg, {"model": {"bagging": "none", "boosting": "none"}}),
                   images, combiner)
    members = [pipeline.model_from_checkpoint(c) for c in checkpoints]
    names = []
    for i, ckpt in enumerate(checkpoints):
        member = ckpt["tailtune"]["config"].get("ensemble_member") or {}
        name = member.get("name") or f"{i}-{Path(paths[i]).parent.parent.name}"
        names.append(name if name not in names else f"{name}-{i}")
    loss = instantiate(run_cfg.loss)(class_counts=list(images.info.class_counts))
    ensemble = make_ensemble(ens_cfg, members, names, images.info, loss, combiner)
    extra = {n: {"checkpoint": str(p)} for n, p in zip(names, paths, strict=True)}
    metrics, targets, probs = evaluate_ensemble(ensemble, images, device_for(cfg), extra)
    config = plain_config(run_cfg)
    config["model"] = OmegaConf.to_container(ens_cfg.model, resolve=True)
    config["combiner"] = OmegaConf.to_container(cfg.combiner, resolve=True)
    best = run_dir / "checkpoints" / "best.ckpt"
    save_ensemble_checkpoint(ensemble, config, [c["tailtune"]["config"] for c in checkpoints],
                             best)
    metrics.update({"checkpoints": [str(p) for p in paths], "best_checkpoint": str(best),
                    "dataset": images.info.to_dict()})
    write_outputs(metrics, targets, probs, images.info, run_dir, pipeline.build_loggers(cfg))
    return metrics
