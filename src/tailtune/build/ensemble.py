"""Ensembles: config -> members -> combiner -> metrics and checkpoint.

Every member is built and trained as a single run of its own config would be
(:func:`~tailtune.build.models.build_experiment`); its config is the run's, with the
member's backbone option composed through Hydra (:func:`member_configs`).

- ``model.training=sequential`` (the default, and the only mode for bagging and boosting):
  each member is built and fitted like a single run (its backbone, model kind, sampler,
  Trainer and checkpoints under ``<run>/members/<name>/``), one after another.
- ``joint``: one :class:`EnsembleModule` on one image datamodule; every step feeds the same
  raw batch to all members and sums their losses.

Either way the ensemble is then assessed through the Trainer's ``validate`` and ``test``
(:func:`assess`): the combiner is fitted on validation predictions of the members' best
checkpoints, and members and ensemble are reported side by side. ``tailtune-eval
model=ensemble model.checkpoints=[...]`` assembles the same ensemble from trained runs.
"""

from __future__ import annotations

import copy
import functools
import glob
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from tailtune.build.checkpoints import check_same_split, dataset_info, read_checkpoint
from tailtune.build.config import compose_option, plain_config, run_name
from tailtune.build.data import (
    build_datamodule,
    build_loss,
    checkpoint_loss,
    refuse_tuning_on_test,
)
from tailtune.build.models import (
    ENSEMBLE_MODULE_KEYS,
    build_experiment,
    build_model,
    make_ensemble,
    model_from_checkpoint,
)
from tailtune.build.results import (
    BEST_CHECKPOINT,
    final_metrics,
    publish_best_checkpoint,
    refuse_non_finite_weights,
    remove_resume_leftovers,
    write_test_artifacts,
)
from tailtune.build.trainer import (
    build_loggers,
    build_trainer,
    choose_device,
    hyperparameters,
    is_rank_zero,
    log_final_metrics,
    log_hyperparameters,
    requeued,
    training_callbacks,
)
from tailtune.data.datamodule import ImbalancedDataModule
from tailtune.features import extract_features
from tailtune.imbalance import ensembles
from tailtune.models.base import ClassifierModule
from tailtune.models.combiners import Combiner, Samme
from tailtune.models.ensemble import EnsembleModule

log = logging.getLogger(__name__)

# Settings of the ensemble node that every member inherits.
SHARED_KEYS = ("many_threshold", "few_threshold", "log_figures")
BAGGING = ("none", "under")
BOOSTING = ("none", "samme")


# -- member configs -------------------------------------------------------------------------
def member_configs(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """``(name, full run config)`` per member: the run's config with the member's backbone
    option (composed by Hydra), its model kind's settings (``model.member_models.<kind>``,
    composed with the ensemble's node), its own seed (``seed + i``) and its own output dir;
    no sampler under bagging or boosting (each member gets its own draw).

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
    own_draw = (ens.get("bagging") or "none") != "none" or (ens.get("boosting") or "none") != "none"
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
        backbone = compose_option("backbone", option, "ensemble member backbone")
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
            if own_draw:  # bagging and boosting members draw their own training samples
                mcfg.sampler = None
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


def check_ensemble(node: DictConfig, images: ImbalancedDataModule, combiner: Combiner) -> None:
    """The ensemble's model node ``node`` works with this data and combiner."""
    bagging, boosting = node.get("bagging") or "none", node.get("boosting") or "none"
    if bagging not in BAGGING:
        raise ValueError(f"unknown model.bagging '{bagging}'; valid: {', '.join(BAGGING)}")
    if boosting not in BOOSTING:
        raise ValueError(f"unknown model.boosting '{boosting}'; valid: {', '.join(BOOSTING)}")
    if bagging != "none" and boosting != "none":
        raise ValueError("model.bagging and model.boosting exclude each other: choose one")
    if (bagging != "none" or boosting != "none") and node.get("training") == "joint":
        raise ValueError("bagging and boosting members each need their own sampler, so they "
                         "train one after another: use model.training=sequential")
    if combiner.needs_validation and images.val_is_test:
        raise ValueError(f"combiner {combiner.name} is fitted on validation predictions, but "
                         "this data has no validation split (data.val_fraction=0 validates on "
                         "test): use combiner=mean_prob|mean_logit|majority, or a val split")
    refuse_tuning_on_test(ClassifierModule._posthoc_steps(node.get("posthoc")), images,
                          "the ensemble (model.posthoc)")


def members_tuned_on_val(combiner: Combiner, steps: dict[str, Sequence[str]]) -> str | None:
    """Why a combiner fitted on validation must not combine members whose own post-hoc
    steps (``steps``: name -> steps) were tuned there, or None: it would weigh them by
    in-sample scores, and the ensemble's val score would be optimistic."""
    tuned = {name: s for name, s in steps.items() if s}
    if not combiner.needs_validation or not tuned:
        return None
    listed = "; ".join(f"{name}: {', '.join(s)}" for name, s in tuned.items())
    return (f"combiner {combiner.name} is fitted on the validation split that members' own "
            f"post-hoc steps were tuned on ({listed}), so it weighs in-sample scores; tune "
            "them on the ensemble instead (model.posthoc=...), or use "
            "combiner=mean_prob|mean_logit|majority")


# -- assessment -------------------------------------------------------------------------------
def assess(ensemble: EnsembleModule, images: ImbalancedDataModule, trainer: L.Trainer,
           extra_members: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Fit the combiner (and post-hoc steps) on validation, then report val and test of the
    ensemble and of every member, through the Trainer's validate and test passes on the
    whole splits (see :meth:`EnsembleModule.start_assessment`)."""
    ensemble.start_assessment()
    trainer.validate(ensemble, datamodule=images, verbose=False)
    trainer.test(ensemble, datamodule=images, verbose=False)
    metrics = ensemble.finish_assessment()
    for name, extra in (extra_members or {}).items():
        metrics["members"][name].update(extra)
    return metrics


def assessment_trainer(cfg: DictConfig, run_dir: Path, loggers: list[Any]) -> L.Trainer:
    return build_trainer(cfg, run_dir, loggers=loggers, whole_splits=True)


def finish(ensemble: EnsembleModule, metrics: dict[str, Any], run_dir: Path,
           loggers: list[Any], config: dict[str, Any], member_cfgs: Sequence[dict[str, Any]]
           ) -> None:
    """The test artifacts and the final ``hp/*`` values, as a single run writes them, then
    the checkpoint ``metrics["best_checkpoint"]``: last, just before the run is marked done,
    so a run that failed holds none."""
    write_test_artifacts(ensemble, run_dir)
    log_final_metrics(loggers, metrics)
    if is_rank_zero():
        save_ensemble_checkpoint(ensemble, config, member_cfgs, Path(metrics["best_checkpoint"]))


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
    partial = path.with_name(f"{path.name}.part")  # renamed into place: never a truncated file
    torch.save({"state_dict": ensemble.state_dict(),
                "tailtune": {**ensemble.checkpoint_metadata(), "config": config},
                "pytorch-lightning_version": L.__version__}, partial)
    os.replace(partial, path)


# -- training -------------------------------------------------------------------------------
def fit_ensemble(cfg: DictConfig, run_dir: Path, choices: dict[str, str],
                 overrides: Sequence[str]) -> dict[str, Any]:
    """Train the members (sequentially or jointly), fit the combiner on validation and
    report every member next to the ensemble; writes ``checkpoints/best.ckpt``."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and ckpt_path != "auto":
        raise ValueError("model=ensemble does not resume from a checkpoint (ckpt_path): its "
                         "members train from the start. To combine trained runs, use "
                         "tailtune-eval model=ensemble 'model.checkpoints=[...]'")
    if (ckpt_path == "auto" or cfg.get("resume") == "auto" or requeued()) \
            and any((run_dir / "members").glob("*")):
        log.warning("an ensemble run does not resume: %s trains its members again from the "
                    "start", run_dir)
    L.seed_everything(int(cfg.seed), workers=True)
    specs = member_configs(cfg)
    combiner = build_combiner(cfg)
    problem = members_tuned_on_val(combiner, {
        name: ClassifierModule._posthoc_steps(mcfg.model.get("posthoc")) for name, mcfg in specs})
    if problem:  # before any member trains
        raise ValueError(problem)
    images = build_datamodule(cfg)
    check_ensemble(cfg.model, images, combiner)
    if is_rank_zero():
        images.print_summary()
    loggers = build_loggers(cfg, run_name=run_name(list(overrides)))
    log_hyperparameters(loggers, hyperparameters(cfg, choices))  # at start
    if cfg.model.get("training", "sequential") == "joint":
        ensemble, extra = _fit_joint(cfg, specs, images, combiner, run_dir)
    else:
        ensemble, extra = _fit_sequential(cfg, specs, images, combiner)
    metrics = assess(ensemble, images, assessment_trainer(cfg, run_dir, loggers), extra)
    best = run_dir / "checkpoints" / BEST_CHECKPOINT
    metrics.update({"best_checkpoint": str(best), "dataset": images.info.to_dict(),
                    "overrides": list(overrides),
                    "ensemble": {"training": str(cfg.model.get("training")),
                                 "bagging": str(cfg.model.get("bagging")),
                                 "boosting": str(cfg.model.get("boosting")),
                                 "combiner": ensemble.combiner.name}})
    finish(ensemble, metrics, run_dir, loggers, plain_config(cfg),
           [plain_config(m) for _, m in specs])
    return metrics


def _train_member(mcfg: DictConfig, sampler: Any
                  ) -> tuple[L.LightningDataModule, ClassifierModule, L.Trainer, dict[str, Any]]:
    """A member built and fitted as a single run of its config; ``sampler`` (a factory)
    replaces its configured training sampler before its loss reads the drawn distribution."""
    data, model = build_experiment(mcfg, sampler, owner=f"member {mcfg.ensemble_member.name}")
    member_dir = Path(mcfg.paths.output_dir)
    trainer = build_trainer(mcfg, member_dir, training_callbacks(mcfg, data),
                            build_loggers(mcfg), model=model)
    trainer.fit(model, datamodule=data)
    fitted = final_metrics(trainer, model, data, test=False)  # loads the best weights
    fitted["best_checkpoint"] = publish_best_checkpoint(trainer, fitted["best_checkpoint"])
    if trainer.is_global_zero:
        remove_resume_leftovers(member_dir)
    return data, model, trainer, {"best_checkpoint": fitted["best_checkpoint"],
                                  "epochs_trained": fitted["epochs_trained"]}


def _train_split(data: L.LightningDataModule) -> Any:
    """The training split as stored (not resampled, not augmented): feature rows for probes,
    else images. SAMME scores a member on it: a random crop there would weigh the next
    member by errors on images nobody trained or tests on."""
    features = getattr(data, "features", None)
    if features:
        return features["train"]
    plain = copy.copy(data.datasets["train"])
    plain.transform = None
    return plain


def _train_predictions(trainer: L.Trainer, model: ClassifierModule,
                       data: L.LightningDataModule) -> np.ndarray:
    """The fitted member's class predictions of its training split, in order."""
    loader = torch.utils.data.DataLoader(_train_split(data), batch_size=256, shuffle=False)
    probs = trainer.predict(model, dataloaders=loader)
    return torch.cat(probs).argmax(dim=1).numpy()


def _fit_sequential(cfg: DictConfig, specs: list[tuple[str, DictConfig]],
                    images: ImbalancedDataModule, combiner: Combiner
                    ) -> tuple[EnsembleModule, dict[str, dict[str, Any]]]:
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
            sampler = functools.partial(ensembles.BalancedBagSampler, draw_seed=int(mcfg.seed))
        elif boosting == "samme":
            sampler = functools.partial(ensembles.SampleWeightSampler, weights=weights)
        data, model, trainer, info = _train_member(mcfg, sampler)
        if bagging == "under":
            subset = data.train_sampler.subset
            info["bag"] = {"draw_seed": int(mcfg.seed), "size": len(subset),
                           "class_counts": np.bincount(train_labels[subset]).tolist()}
        if boosting == "samme":
            weights, error, alpha = ensembles.samme_update(
                weights, _train_predictions(trainer, model, data), train_labels,
                images.info.num_classes)
            alphas.append(alpha)
            info["samme"] = {"weighted_error": error, "alpha": alpha}
        members.append(model)
        names.append(name)
        extra[name] = info
    if boosting == "samme":
        combiner = Samme(alphas)
    loss = build_loss(cfg, images)
    return make_ensemble(cfg.model, members, names, images.info, loss, combiner), extra


def untrained_member(mcfg: DictConfig, images: ImbalancedDataModule) -> ClassifierModule:
    """A member for joint training on the shared image datamodule (probes: backbone every
    step; their feature standardisation is fitted on the training split's features)."""
    L.seed_everything(int(mcfg.seed), workers=True)
    model = build_model(mcfg, images.info, build_loss(mcfg, images))
    if model.posthoc_steps:
        # Only a member that trains alone is tested alone, which is where its steps are tuned.
        raise ValueError(
            f"member {mcfg.ensemble_member.name} has post-hoc steps "
            f"({', '.join(model.posthoc_steps)}), which are tuned only when members train one "
            "after another (model.training=sequential); under model.training=joint tune them "
            "on the ensemble instead (model.posthoc=...)")
    if getattr(model, "needs_feature_transform", False):
        device = choose_device(mcfg.model.features.get("device", "auto"),
                               mcfg.trainer.get("accelerator"))
        features = extract_features(images.datasets["train"], model.extractor,
                                    mcfg.model.features.extract_batch_size, device)[0]
        model.fit_feature_transform(features)
    return model


def _fit_joint(cfg: DictConfig, specs: list[tuple[str, DictConfig]],
               images: ImbalancedDataModule, combiner: Combiner, run_dir: Path
               ) -> tuple[EnsembleModule, dict[str, dict[str, Any]]]:
    members = [untrained_member(mcfg, images) for _, mcfg in specs]
    L.seed_everything(int(cfg.seed), workers=True)
    ensemble = make_ensemble(cfg.model, members, [n for n, _ in specs], images.info,
                             build_loss(cfg, images), combiner)
    trainer = build_trainer(cfg, run_dir, training_callbacks(cfg, images), build_loggers(cfg),
                            model=ensemble)
    trainer.fit(ensemble, datamodule=images)
    callback = trainer.checkpoint_callback
    best = callback.best_model_path if callback is not None else ""
    if best:  # the members' weights at the best (soft-vote) validation epoch
        ensemble.load_state_dict(read_checkpoint(best)["state_dict"])
    refuse_non_finite_weights(ensemble)
    # No file of their own: their weights are in the ensemble's best.ckpt (the in-progress
    # file the callback names is removed once the run is done).
    return ensemble, {n: {"best_checkpoint": None} for n, _ in specs}


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
    return meta.get("model") == EnsembleModule.kind


def check_members(paths: Sequence[Path], checkpoints: Sequence[dict[str, Any]]) -> None:
    """Members are single models of one dataset (class names) and one data split."""
    first = dataset_info(checkpoints[0])
    for path, ckpt in zip(paths, checkpoints, strict=True):
        if ckpt["tailtune"].get("model") == EnsembleModule.kind:
            raise ValueError(f"{path} is an ensemble checkpoint; give its members' checkpoints")
        check_same_split(first, dataset_info(ckpt), str(paths[0]), str(path))


def assemble_from_checkpoints(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``tailtune-eval model=ensemble model.checkpoints=[...]``: no retraining. Fits the
    combiner on validation, reports test; writes an ensemble checkpoint of its own."""
    entries = list(cfg.model.get("checkpoints") or [])
    if not entries:
        raise ValueError("model.checkpoints is empty: give the members' checkpoints, e.g. "
                         "model.checkpoints='[logs/multiruns/<sweep>/*/checkpoints/best.ckpt]'")
    paths = expand_checkpoints(entries)
    checkpoints = [read_checkpoint(p) for p in paths]
    check_members(paths, checkpoints)
    run_cfg = OmegaConf.create(checkpoints[0]["tailtune"]["config"])
    with open_dict(run_cfg):
        run_cfg.paths = cfg.paths  # this eval's own dirs
        run_cfg.trainer = cfg.trainer
    combiner = build_combiner(cfg)
    images = build_datamodule(run_cfg)
    check_same_split(dataset_info(checkpoints[0]), images.info)
    node = OmegaConf.create({k: cfg.model[k] for k in ENSEMBLE_MODULE_KEYS if k in cfg.model})
    check_ensemble(OmegaConf.merge(node, {"bagging": "none", "boosting": "none"}), images,
                   combiner)
    members = [model_from_checkpoint(c) for c in checkpoints]
    names = []
    for i, ckpt in enumerate(checkpoints):
        member = ckpt["tailtune"]["config"].get("ensemble_member") or {}
        name = member.get("name") or f"{i}-{Path(paths[i]).parent.parent.name}"
        names.append(name if name not in names else f"{name}-{i}")
    problem = members_tuned_on_val(combiner, {
        name: m.posthoc_steps for name, m in zip(names, members, strict=True)})
    if problem:  # the runs are done: say what their ensemble's val score means
        log.warning("%s; its test score is unaffected, its val score is optimistic", problem)
    ensemble = make_ensemble(node, members, names, images.info,
                             checkpoint_loss(run_cfg, images.info), combiner)
    loggers = build_loggers(cfg)
    extra = {n: {"checkpoint": str(p)} for n, p in zip(names, paths, strict=True)}
    metrics = assess(ensemble, images, assessment_trainer(cfg, run_dir, loggers), extra)
    config = plain_config(run_cfg)
    config["model"] = OmegaConf.to_container(node, resolve=True)
    config["combiner"] = OmegaConf.to_container(cfg.combiner, resolve=True)
    best = run_dir / "checkpoints" / BEST_CHECKPOINT
    metrics.update({"checkpoints": [str(p) for p in paths], "best_checkpoint": str(best),
                    "dataset": images.info.to_dict()})
    finish(ensemble, metrics, run_dir, loggers, config,
           [c["tailtune"]["config"] for c in checkpoints])
    return metrics
