"""The Trainer, its callbacks and loggers, the device, and what goes to the loggers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from omegaconf import DictConfig

from tailtune.allocator import keep_freed_memory
from tailtune.build.config import option_exists, plain_config
from tailtune.callbacks import (
    CheckpointConfig,
    EpochLog,
    EpochReseed,
    PreemptionCheckpoint,
    SamplerEpoch,
)
from tailtune.callbacks import ProgressBar as TailtuneProgressBar

if TYPE_CHECKING:
    from tailtune.models.base import ClassifierModule

# The final metrics every run reports to the loggers as hp/<metric> (TensorBoard's HParams).
HP_METRICS = ("val/bal_acc", "test/bal_acc", "test/macro_f1", "test/acc")
INTERRUPTED_CHECKPOINT = "interrupted.ckpt"  # the state a stopping signal saved


def choose_device(requested: Any = "auto", accelerator: Any = None) -> str:
    """Where work outside the Trainer runs (feature extraction, prediction): ``requested``
    unless it is ``auto``; then the CPU when the trainer is on it (``accelerator``) or no GPU
    is there, else this process's GPU (``LOCAL_RANK`` under DDP)."""
    requested = str(requested or "auto")
    if requested != "auto":
        return requested
    if accelerator == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


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
                  loggers: list[Logger] | None = None, whole_splits: bool = False,
                  model: ClassifierModule | None = None) -> L.Trainer:
    """The configured Trainer. ``whole_splits``: validate and test on every batch, whatever
    ``trainer.limit_val_batches``/``limit_test_batches`` say (an ensemble's combiner is
    fitted on the whole validation split). A DDP strategy's ``find_unused_parameters: auto``
    asks ``model`` (the one it will fit) whether some of its parameters sit out some steps."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    callbacks.extend(extra_callbacks)
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a bar it can't show
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    elif not any(isinstance(c, ProgressBar) for c in callbacks):
        # Lightning's default bar draws on stdout, which holds the results only (tailtune-eval,
        # an ensemble's assessment, a config with callbacks.progress_bar=null).
        callbacks.append(TailtuneProgressBar())
    whole = {"limit_val_batches": None, "limit_test_batches": None} if whole_splits else {}
    return instantiate(
        _unused_parameters_answered(cfg.trainer, model), callbacks=callbacks,
        logger=build_loggers(cfg) if loggers is None else loggers,
        default_root_dir=str(run_dir), _convert_="partial", **whole,
    )


def _unused_parameters_answered(trainer: DictConfig, model: ClassifierModule | None
                                ) -> DictConfig:
    """The trainer config with DDP's ``find_unused_parameters: auto`` answered by the model:
    the search costs an extra pass over the autograd graph every step, and DDP warns when it
    finds nothing (the recipe trains every parameter from its first step). Without a model
    (no backward pass: evaluation), the search stays on."""
    strategy = trainer.get("strategy")
    if not isinstance(strategy, DictConfig) or strategy.get("find_unused_parameters") != "auto":
        return trainer
    trainer = trainer.copy()
    trainer.strategy.find_unused_parameters = model is None or model.some_parameters_idle
    return trainer


def training_callbacks(cfg: DictConfig, datamodule: Any) -> list[L.Callback]:
    return [
        EpochReseed(cfg.seed),
        SamplerEpoch(datamodule.train_sampler, datamodule.info.class_names),
        CheckpointConfig(plain_config(cfg)),
        PreemptionCheckpoint(Path(cfg.paths.output_dir) / "checkpoints" / INTERRUPTED_CHECKPOINT,
                             cfg.get("requeue_signal")),
        EpochLog(),
    ]


# -- what the loggers get ---------------------------------------------------------------------
def hyperparameters(cfg: DictConfig, choices: dict[str, str]) -> dict[str, Any]:
    """Every group's choice plus every scalar setting: no whitelist to maintain."""
    params: dict[str, Any] = {f"choice/{group}": str(option) for group, option in choices.items()
                              if not group.startswith("hydra") and option_exists(group, option)}
    skip = {"hydra", "paths", "callbacks", "logger"}

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

    walk(plain_config(cfg), "")
    return params


def log_hyperparameters(loggers: list[Logger], params: dict[str, Any]) -> None:
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


def log_final_metrics(loggers: list[Logger], metrics: dict[str, Any], step: int = 0) -> None:
    """The final ``hp/*`` values (:data:`HP_METRICS`), once; then the loggers are done."""
    values = {}
    for name in HP_METRICS:
        stage, key = name.split("/", 1)
        if key in metrics.get(stage, {}):
            values[f"hp/{name}"] = float(metrics[stage][key])
    for logger in loggers:
        logger.log_metrics(values, step=step)
        logger.finalize("success")


# -- the process --------------------------------------------------------------------------------
def is_rank_zero() -> bool:
    """Before the Trainer exists: Lightning's DDP launcher sets LOCAL_RANK/NODE_RANK for
    the ranks it starts, SLURM sets SLURM_PROCID."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


# The DDP variables this process started with: a rank that Lightning started has them; the
# launching process has not, but Lightning writes them into its environment while launching.
_DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_DDP_ENV_AT_START = {key: os.environ.get(key) for key in _DDP_ENV}


def configure_process(cfg: DictConfig) -> None:
    """torch threads for this process (``threads``; null keeps torch's default), and glibc's
    allocator keeping freed memory (``keep_freed_memory``; tailtune.allocator says why)."""
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if cfg.get("keep_freed_memory"):
        keep_freed_memory()


def reset_process_state(cfg: DictConfig) -> None:
    """State that leaks from one job of a sweep into the next one run in the same process
    (the basic launcher, joblib's reused workers): threads, the process group, DDP env."""
    for key, value in _DDP_ENV_AT_START.items():
        if value is None:
            os.environ.pop(key, None)  # else the next DDP job thinks its ranks already exist
        else:
            os.environ[key] = value
    configure_process(cfg)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Lightning leaves the previous job's process group up; a new DDP job would reuse it
        # and talk to ranks that have exited.
        torch.distributed.destroy_process_group()
    torch.use_deterministic_algorithms(bool(cfg.trainer.get("deterministic")), warn_only=True)


def requeued() -> bool:
    """Whether this process may be a requeued job's restart: a SLURM job's (its restart
    count), or any job of submitit's local executor, which restarts a timed-out job with no
    count to tell (a fresh job's dir holds no checkpoint to resume from)."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "local":
        return True
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def resume_checkpoint(ckpt_path: str | None, run_dir: Path, auto: bool = False) -> str | None:
    """An explicit path wins; with ``auto`` (or ``ckpt_path=auto``, or in a requeued job,
    :func:`requeued`), the newest of the run dir's last, interrupted and ``hpc_ckpt_*``
    checkpoints."""
    if ckpt_path not in (None, "auto"):
        return ckpt_path
    auto = auto or requeued()
    if not auto and ckpt_path != "auto":
        return None
    candidates = [run_dir / "checkpoints" / "last.ckpt",
                  run_dir / "checkpoints" / INTERRUPTED_CHECKPOINT,
                  *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else None
