"""The one place that turns a composed config into datamodule, model and trainer.

train, eval and ``tailtune.load`` all build through here, so evaluation always rebuilds a
model exactly as training built it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from filelock import FileLock
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from tailtune.callbacks import CheckpointConfig, EpochReseed, PreemptionCheckpoint, SamplerEpoch
from tailtune.data.datamodule import ImbalancedDataModule
from tailtune.data.features import FeatureDataModule, extract_features
from tailtune.data.info import DatasetInfo
from tailtune.features import FeatureCache, FeatureExtractor
from tailtune.imbalance.resampling import is_feature_space
from tailtune.imbalance.samplers import ClassBalancedSampler, ShuffleSampler
from tailtune.models.base import ClassifierModule

HP_METRICS = ("val/bal_acc", "test/bal_acc", "test/macro_f1", "test/acc")


# -- data -------------------------------------------------------------------------------------
def build_datamodule(cfg: DictConfig) -> ImbalancedDataModule:
    """Instantiate and set up the datamodule; set-up (downloads, decoding) runs under a lock,
    so concurrent ranks or sweep jobs do it once, one after another."""
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


# -- model ------------------------------------------------------------------------------------
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
    CE, class-balanced, balanced softmax, logit-adjusted, LDAM's DRW weights) then correct
    for the distribution the sampler draws in each epoch (``sampled_counts``, re-read at
    every epoch), so the run never corrects twice. ``correct_prior_for_sampler=false`` keeps
    the real prior, and warns if the sampler re-balances in any epoch of the run.
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


def build_model(cfg: DictConfig, info: DatasetInfo, loss: torch.nn.Module) -> ClassifierModule:
    if str((cfg.get("model") or {}).get("_target_", "")).endswith("EnsembleModule"):
        from tailtune.ensemble_pipeline import ensemble_from_config  # its members build here

        return ensemble_from_config(cfg, info, loss)
    if is_feature_model(cfg):
        return feature_model(cfg, info, loss, *build_extractor(cfg))
    backbone, preprocess, identity = instantiate(cfg.backbone)
    model = call_factory(
        instantiate(module_config(cfg.model)), cfg.model, "model",
        backbone=backbone, preprocess=preprocess, backbone_identity=identity, info=info,
        loss=loss,
    )
    return apply_speedups(model, cfg.model)


# Model-config keys the pipeline applies itself; the module's constructor never sees them.
PIPELINE_KEYS = ("features", "channels_last", "compile", "compile_backend")


def module_config(node: DictConfig) -> DictConfig:
    """The model node without :data:`PIPELINE_KEYS`."""
    keys = [k for k in node if k not in PIPELINE_KEYS]
    return node if len(keys) == len(node) else OmegaConf.masked_copy(node, keys)


def call_factory(factory: Any, node: DictConfig, group: str, **kwargs: Any) -> Any:
    """Call a config's partial. A key its class does not take (``+model.lrr=1``, as Hydra
    suggests for a typo) is a config error named as such, not a TypeError traceback."""
    try:
        return factory(**kwargs)
    except TypeError as err:
        match = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if match is None or match.group(1) not in node:
            raise
        target = str(node.get("_target_", "")).rsplit(".", 1)[-1]
        raise ValueError(f"{group}.{match.group(1)} is not a setting of {target}; check its "
                         "spelling, or remove it") from err


def _channels_last(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
    return output.contiguous(memory_format=torch.channels_last) if output.dim() == 4 else output


def apply_speedups(model: ClassifierModule, node: DictConfig) -> ClassifierModule:
    """The model's GPU switches, in this one place: ``model.channels_last`` (NHWC weights and
    inputs: faster convolutions under bf16 on tensor cores) and ``model.compile``
    (``torch.compile`` of the module's forward with ``model.compile_backend``). Neither
    changes parameter names, so checkpoints are the same with and without them."""
    if node.get("channels_last"):
        model.to(memory_format=torch.channels_last)
        preprocess = getattr(model, "preprocess", None)
        if isinstance(preprocess, torch.nn.Module):  # images leave it NHWC
            preprocess.register_forward_hook(_channels_last)
    if node.get("compile"):
        model.compile(backend=node.get("compile_backend") or "inductor")
    return model


def build_experiment(cfg: DictConfig) -> tuple[ImbalancedDataModule, ClassifierModule]:
    """Seed, then build the datamodule and the model it describes (the head's init draws
    from the seeded RNG, so equal seeds give equal models)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    if is_feature_model(cfg):
        data, model = build_feature_experiment(cfg, datamodule)
    else:
        data, model = datamodule, build_model(cfg, datamodule.info, build_loss(cfg, datamodule))
    refuse_tuning_on_test(model.posthoc_steps, datamodule)
    return data, model


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


# -- frozen-feature models (linear probe, decoupled) -----------------------------------------
def is_feature_model(cfg: DictConfig) -> bool:
    """Models that train on a frozen backbone's features say how to serve them (model.features)."""
    return "features" in (cfg.get("model") or {})


def index_sampler(cfg: DictConfig, factory: Any) -> Any:
    """The training sampler the image datamodule gets.

    A feature-space resampler (SMOTE, ...) is refused under a model that trains on images, and
    left to the feature datamodule under a frozen-feature one. cRT and LWS retrain with
    class-balanced sampling, so with ``sampler=none`` they get it.
    """
    if is_feature_space(factory):
        if not is_feature_model(cfg):
            name = str(cfg.sampler.get("_target_", "")).rsplit(".", 1)[-1]
            raise ValueError(
                f"{name} resamples feature vectors (imbalanced-learn needs them to find "
                "neighbours), which exist only for a frozen backbone: use model=linear_probe or "
                "model=decoupled, or an index sampler (over, under, weighted, class_balanced) "
                "with this model")
        return None
    from tailtune.models.decoupled import BALANCED_SAMPLING_METHODS

    model = cfg.get("model") or {}
    plain = factory is None or getattr(factory, "func", factory) is ShuffleSampler
    if plain and model.get("class_balanced") and model.get("method") in BALANCED_SAMPLING_METHODS:
        return ClassBalancedSampler
    return factory


def build_extractor(cfg: DictConfig) -> tuple[FeatureExtractor, dict[str, Any]]:
    """The frozen feature extractor, and for ``model=decoupled`` the source head: both from
    the fine-tuned ``model.init_from`` checkpoint (whose weights the cache key hashes)."""
    spec = cfg.model.features
    extra: dict[str, Any] = {}
    if "init_from" in cfg.model:
        from tailtune.models.decoupled import source_parts

        if not cfg.model.init_from:
            raise ValueError("model=decoupled needs model.init_from=PATH of a model=finetune "
                             "checkpoint")
        source = read_checkpoint(cfg.model.init_from)
        backbone, preprocess, extra["source_head"] = source_parts(model_from_checkpoint(source))
        identity = {"name": source["tailtune"]["config"]["backbone"]["name"],
                    "weights": "fine-tuned checkpoint"}
    else:
        backbone, preprocess, identity = instantiate(cfg.backbone)
    return FeatureExtractor(backbone, preprocess, identity, spec.layer, spec.dtype), extra


def feature_model(cfg: DictConfig, info: DatasetInfo, loss: torch.nn.Module,
                  extractor: FeatureExtractor, extra: dict[str, Any]) -> ClassifierModule:
    model = call_factory(instantiate(module_config(cfg.model)), cfg.model, "model",
                         extractor=extractor, info=info, loss=loss, **extra)
    return apply_speedups(model, cfg.model)


def extraction_device(cfg: DictConfig) -> str:
    device = str(cfg.model.features.get("device", "auto"))
    if device != "auto":
        return device
    if cfg.trainer.get("accelerator") == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def build_feature_experiment(cfg: DictConfig, images: ImbalancedDataModule
                             ) -> tuple[L.LightningDataModule, ClassifierModule]:
    """A frozen-feature model and its data: cached features (each split extracted once), or
    with ``model.features.cache=false`` or augmentation, images through the backbone each step.
    The probe's feature preprocessing is fitted on the training features only."""
    spec = cfg.model.features
    if cfg.model.get("init_from"):
        # Absolute, so the checkpoints (which rebuild the backbone from it) load from anywhere.
        cfg.model.init_from = str(Path(cfg.model.init_from).expanduser().resolve())
        check_same_split(read_checkpoint(cfg.model.init_from), images.info)
    extractor, extra = build_extractor(cfg)
    resampler = instantiate(cfg.sampler) if cfg.get("sampler") else None
    resampler = resampler if is_feature_space(resampler) else None
    augmented = getattr(images, "train_transform", None) is not None
    if augmented and spec.cache:
        warnings.warn("training augmentation changes the features every epoch: the probe runs "
                      "the backbone every step instead of reading the feature cache",
                      stacklevel=2)
    cached = bool(spec.cache) and not augmented
    if resampler is not None and not cached:
        raise ValueError("feature-space samplers resample cached training features: they need "
                         "model.features.cache=true and transforms=none")
    device = extraction_device(cfg)
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
    model = feature_model(cfg, data.info, build_loss(cfg, data), extractor, extra)
    if model.needs_feature_transform:
        model.fit_feature_transform(train_features)
    return data, model


# -- trainer ----------------------------------------------------------------------------------
def build_loggers(cfg: DictConfig, run_name: str = "") -> list[Logger]:
    """Loggers; under a sweep, the TensorBoard run is named by the job's overrides."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        if not node:
            continue
        if run_name and "version" in node:
            loggers.append(instantiate(node, version=run_name))
        else:
            loggers.append(instantiate(node))
    return loggers


def build_trainer(cfg: DictConfig, run_dir: Path, extra_callbacks: list[L.Callback] = (),
                  loggers: list[Logger] | None = None) -> L.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a bar it can't show
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks.extend(extra_callbacks)
    return instantiate(
        cfg.trainer, callbacks=callbacks,
        logger=build_loggers(cfg) if loggers is None else loggers,
        default_root_dir=str(run_dir), _convert_="partial",
    )


def training_callbacks(cfg: DictConfig, datamodule: ImbalancedDataModule) -> list[L.Callback]:
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    return [
        EpochReseed(cfg.seed),
        SamplerEpoch(datamodule.train_sampler, datamodule.info.class_names),
        CheckpointConfig(config),
        PreemptionCheckpoint(Path(cfg.paths.output_dir) / "checkpoints" / "interrupted.ckpt",
                             cfg.get("requeue_signal")),
    ]


def hyperparameters(cfg: DictConfig, choices: dict[str, str]) -> dict[str, Any]:
    """Every group's choice plus every scalar setting: no whitelist to maintain."""
    params: dict[str, Any] = {f"choice/{group}": str(option) for group, option in choices.items()
                              if not group.startswith("hydra") and option_exists(group, option)}
    skip = {"hydra", "paths", "callbacks", "logger"}
    plain = OmegaConf.to_container(cfg, resolve=True)

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("_target_", "_partial_", "_convert_") or (not prefix and key in skip):
                    continue
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, (bool, int, float, str)) or node is None:
            params[prefix.rstrip(".")] = "null" if node is None else node
        else:
            params[prefix.rstrip(".")] = str(node)

    walk(plain, "")
    return params


def option_exists(group: str, option: Any) -> bool:
    """Whether a group choice names a config that was found: an optional default whose file
    is absent (``optional local: default`` without a ``configs/local/default.yaml``) still
    shows up in Hydra's choices."""
    if option is None:
        return True
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return option in GlobalHydra.instance().config_loader().get_group_options(group)
    from tailtune.ensemble_pipeline import config_dirs

    return any((root / group / f"{option}.yaml").is_file() for root in config_dirs())


def log_hyperparameters(trainer: L.Trainer, params: dict[str, Any]) -> None:
    """Every logger gets the run's settings at the start; see :func:`hparams_to_loggers`."""
    hparams_to_loggers(trainer.loggers, params)


def hparams_to_loggers(loggers: list[Logger], params: dict[str, Any]) -> None:
    """The run's settings to every logger, and TensorBoard's HParams entry naming the final
    metrics (``hp/*``) without values, written at the start so that a run that crashes still
    shows up in the HParams tab. :func:`log_final_metrics` logs the values once, at the end
    (no placeholder value first, so the ``hp/*`` charts hold one real point)."""
    from torch.utils.tensorboard.summary import hparams

    from tailtune.console import rank

    for logger in loggers:
        logger.log_hyperparams(params)  # TensorBoard: hparams.yaml (default_hp_metric: false)
        if isinstance(logger, TensorBoardLogger) and rank() == 0:
            writer = logger.experiment._get_file_writer()
            for summary in hparams(params, {f"hp/{m}": 0.0 for m in HP_METRICS}):
                writer.add_summary(summary)


# -- checkpoints ------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a tailtune checkpoint with ``weights_only=True``: plain data only."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint does not exist: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a .txt, a truncated download, another tool's pickle
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if isinstance(err, pickle.UnpicklingError):  # torch's text advises weights_only=False
            reason = "it holds Python objects, not the plain data tailtune writes"
        raise ValueError(f"{path} is not a tailtune checkpoint (torch.load could not read it: "
                         f"{reason})") from err
    if not isinstance(checkpoint, dict) or "tailtune" not in checkpoint \
            or "config" not in checkpoint["tailtune"]:
        raise ValueError(f"{path} is not a tailtune checkpoint (no 'tailtune' metadata)")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any]) -> ClassifierModule:
    """Rebuild the module a checkpoint was trained as, and load its weights.

    The backbone is built without downloading or reading weights (``weights=none``): the
    checkpoint's state dict holds them. A frozen-feature model's checkpoint holds no backbone
    weights: its backbone is rebuilt from the config, and must hash as it did in training.
    """
    meta = checkpoint["tailtune"]
    cfg = OmegaConf.create(meta["config"])
    if not is_feature_model(cfg):
        cfg.backbone.weights = "none"
        cfg.backbone.weights_path = None
    info = DatasetInfo.from_dict(meta["dataset_info"])
    loss = instantiate(cfg.loss)(class_counts=list(info.class_counts))
    model = build_model(cfg, info, loss)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    model.on_load_checkpoint(checkpoint)  # lets a model refuse weights it was not trained on
    return model


def load_checkpoint_model(path: str | Path, map_location: str = "cpu") -> ClassifierModule:
    model = model_from_checkpoint(read_checkpoint(path))
    return model.to(map_location).eval()


# -- run dir ----------------------------------------------------------------------------------
def config_yaml(cfg: DictConfig) -> str:
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    return OmegaConf.to_yaml(plain)


def config_tree(cfg: DictConfig) -> Any:
    """The resolved config as a rich tree, one branch per group."""
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    for key, value in plain.items():
        text = OmegaConf.to_yaml({key: value}).rstrip()
        tree.add(Syntax(text, "yaml", background_color="default"))
    return tree


def is_rank_zero() -> bool:
    """Before the Trainer exists: Lightning's DDP launcher sets LOCAL_RANK/NODE_RANK for
    the ranks it starts, SLURM sets SLURM_PROCID."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


# The DDP variables this process started with: a rank that Lightning started has them; the
# launching process has not, but Lightning writes them into its environment while launching.
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_DDP_ENV_AT_START = {key: os.environ.get(key) for key in _DDP_ENV}


def reset_process_state(cfg: DictConfig) -> None:
    """State that leaks from one job of a sweep into the next one run in the same process
    (the basic launcher, joblib's reused workers): threads, the process group, DDP env."""
    for key, value in _DDP_ENV_AT_START.items():
        if value is None:
            os.environ.pop(key, None)  # else the next DDP job thinks its ranks already exist
        else:
            os.environ[key] = value
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Lightning leaves the previous job's process group up; a new DDP job would reuse it
        # and talk to ranks that have exited.
        torch.distributed.destroy_process_group()
    torch.use_deterministic_algorithms(bool(cfg.trainer.get("deterministic")), warn_only=True)


def optimized_value(metrics: dict[str, Any], name: str) -> float:
    """``val/bal_acc`` -> metrics["val"]["bal_acc"]."""
    stage, _, key = name.partition("/")
    return float(metrics.get(stage, {}).get(key, float("nan")))


def run_name(overrides: list[str] | None) -> str:
    """A TensorBoard run name from the job's overrides, safe as a dir name (slashes become
    underscores; the exact overrides are in metrics.json)."""
    if not overrides:
        return ""
    # Where outputs go (hydra.*, paths.*) is not what the run computes.
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "paths."))]
    if not kept:
        return ""
    name = ",".join(kept).replace("/", "_").replace(os.sep, "_")  # a slash would nest dirs
    if len(name) <= 120:
        return name
    return f"{name[:100]}…{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def resume_checkpoint(ckpt_path: str | None, run_dir: Path, auto: bool = False) -> str | None:
    """An explicit path wins; with ``auto`` (or ``ckpt_path=auto``, or in a requeued SLURM
    job), the newest of the run dir's last, interrupted and ``hpc_ckpt_*`` checkpoints."""
    if ckpt_path not in (None, "auto"):
        return ckpt_path
    auto = auto or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    if not auto and ckpt_path != "auto":
        return None
    candidates = [run_dir / "checkpoints" / "last.ckpt",
                  run_dir / "checkpoints" / "interrupted.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None


def final_metrics(trainer: L.Trainer, model: ClassifierModule,
                  datamodule: ImbalancedDataModule, test: bool = True) -> dict[str, Any]:
    """Val (and test) metrics of the best checkpoint, from full single passes.

    A model with post-hoc steps (``model.posthoc``, tau-norm) has them tuned on the best
    checkpoint's validation predictions, then stored in that checkpoint, so eval and predict
    reuse them; the metrics before the adjustment are reported under ``posthoc.before``.
    """
    callback = trainer.checkpoint_callback
    best = callback.best_model_path if callback is not None and callback.best_model_path else None
    if model.posthoc_steps:
        model.collect_val_outputs()
    trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)
    metrics: dict[str, Any] = {
        "val": dict(model.val_results),
        "best_checkpoint": best,
        "epochs_trained": trainer.current_epoch,
        "dataset": datamodule.info.to_dict(),
    }
    if model.posthoc_steps:
        before = {"val": dict(model.val_results)}
        logits, targets = model.take_val_outputs()
        if test:
            model.test_stage = "test_before_posthoc"
            trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
            before["test"] = dict(model.test_results)
            model.test_stage = "test"
        metrics["posthoc"] = {**model.fit_posthoc(logits, targets), "before": before}
        if best:
            trainer.save_checkpoint(best)
        trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        metrics["val"] = dict(model.val_results)
    if test:
        trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        metrics["test"] = dict(model.test_results)
    metrics["best_checkpoint"] = publish_best_checkpoint(trainer, best)
    return metrics


BEST_CHECKPOINT = "best.ckpt"


def publish_best_checkpoint(trainer: L.Trainer, path: str | None) -> str | None:
    """Give the best checkpoint its final name, ``best.ckpt``, once it has been tested.

    While training it is ``best_so_far.ckpt`` (configs/callbacks/default.yaml), so a run that
    fails (a NaN loss in epoch 5) or is killed never leaves a ``best.ckpt`` that looks like a
    finished run's result; resume reads ``last.ckpt``, whose callback state names the
    in-progress file. Rank zero renames, after every rank has tested.
    """
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    if not path or not dirpath or Path(path).parent != Path(dirpath):
        return path  # e.g. the best of another run this one resumed from: not ours to rename
    final = Path(path).with_name(BEST_CHECKPOINT)
    if final != Path(path) and trainer.is_global_zero:
        os.replace(path, final)
    return str(final)


def write_test_artifacts(model: ClassifierModule, run_dir: Path) -> None:
    from tailtune.metrics import write_confusion_csv

    if not model.trainer.is_global_zero:
        return
    if model.test_confusion is not None:
        write_confusion_csv(model.test_confusion, model.class_names, run_dir / "test_confusion.csv")
    if model.test_predictions is not None and model.test_predictions[0] is not None:
        # Per-sample predictions: tailtune-compare bootstraps confidence intervals from them.
        targets, probs = model.test_predictions
        np.savez_compressed(run_dir / "test_predictions.npz", targets=targets.numpy(),
                            probs=probs.numpy(), class_names=np.array(model.class_names))


def log_final_metrics(trainer: L.Trainer, metrics: dict[str, Any]) -> None:
    values = {}
    for name in HP_METRICS:
        stage, key = name.split("/", 1)
        if key in metrics.get(stage, {}):
            values[f"hp/{name}"] = float(metrics[stage][key])
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step)
        logger.finalize("success")


def eval_data_config(trained: DictConfig, requested: DictConfig | None) -> DictConfig:
    """The data a checkpoint is evaluated on: the one it was trained with, with the keys the
    user set (``+data.root=/moved/copy``) applied; :func:`check_same_split` then refuses
    anything but the same classes and split. A different dataset (``data=image_folder``)
    is refused here: its metrics would not be this checkpoint's test metrics."""
    if not requested:
        return trained
    if "_target_" in requested:
        raise ValueError(
            "tailtune-eval tests a checkpoint on the data split it was trained with, so it "
            "takes no other dataset (data=...); to move that data, set its keys "
            "(+data.root=/new/place); to score other images, use tailtune-predict "
            "ckpt_path=... input=DIR (class folders give accuracy)")
    unknown = sorted(set(requested) - set(trained))
    if unknown:
        raise ValueError(f"data.{unknown[0]} is not a setting of the checkpoint's data "
                         f"({', '.join(sorted(trained))})")
    return OmegaConf.merge(trained, requested)


def check_same_split(checkpoint: dict[str, Any], info: DatasetInfo) -> None:
    """Refuse to evaluate on data other than the split the checkpoint was trained with."""
    stored = DatasetInfo.from_dict(checkpoint["tailtune"]["dataset_info"])
    if stored.class_names != info.class_names:
        raise ValueError(
            f"the checkpoint was trained on classes {list(stored.class_names)[:5]}..., "
            f"but the data has {list(info.class_names)[:5]}...: "
            "a checkpoint from a different dataset"
        )
    if stored.split_fingerprint != info.split_fingerprint:
        raise ValueError(
            f"the data split differs from the checkpoint's (fingerprint {info.split_fingerprint} "
            f"vs {stored.split_fingerprint}): its test set may overlap the training images"
        )
