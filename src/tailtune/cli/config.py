"""Hydra plumbing shared by the entry points: resolvers, early checks, readable errors.

Nothing here imports torch, so a bad config fails in about a second.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def _config_path() -> str:
    """Packaged configs after ``pip install .``; the repo's own ``configs/`` in a checkout
    (an editable install leaves the package dir without them)."""
    package_dir = Path(__file__).resolve().parents[1]
    if (package_dir / "configs" / "train.yaml").is_file():
        return "pkg://tailtune.configs"
    return str(package_dir.parents[1] / "configs")


CONFIG_PATH = _config_path()
T = TypeVar("T")


def _gpu_precision() -> str:
    import torch

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16-mixed" if bf16 else "16-mixed"


def register_resolvers() -> None:
    # use_cache: Hydra copies the resolver cache into every job of a sweep, so all jobs
    # share one sweep dir, and a run's dir is drawn exactly once.
    resolvers: dict[str, Callable[..., Any]] = {
        "tailtune_uid": lambda: secrets.token_hex(3),
        "tailtune_hash": lambda text: hashlib.sha1(str(text).encode()).hexdigest()[:8],
        "tailtune_gpu_precision": _gpu_precision,
        # An epoch at a fraction of the run, e.g. LDAM-DRW's re-weighting at 80% (160 of 200).
        "tailtune_epochs_fraction": lambda epochs, fraction: max(
            0, int(round(float(epochs) * float(fraction)))),
        # joblib's n_jobs=-1 means one job per core: each then gets one thread.
        "tailtune_threads_per_job": lambda n_jobs: max(
            1, (os.cpu_count() or 1) // (int(n_jobs) if int(n_jobs) > 0 else (os.cpu_count() or 1))
        ),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)


class ConfigError(ValueError):
    """A config that cannot work; raised before anything heavy is imported."""


def _multi_process(trainer: Any) -> bool:
    devices = trainer.get("devices", 1)
    many = devices in (-1, "auto") or (isinstance(devices, int) and devices > 1)
    return many or "ddp" in str(trainer.get("strategy", ""))


def check_train_config(cfg: DictConfig, choices: dict[str, str] | None = None) -> None:
    """Range and file checks that need no torch. Names are checked by Hydra itself."""
    problems: list[str] = []
    launcher = (choices or {}).get("hydra/launcher", "basic")
    if launcher in ("joblib", "submitit_local") and _multi_process(cfg.trainer):
        problems.append(
            f"DDP cannot run inside the {launcher} launcher (its ranks would re-launch the "
            "worker process, not this job); use the basic launcher locally, or "
            "launcher=submitit_slurm with one task per GPU"
        )
    epochs = cfg.trainer.get("max_epochs")
    model = cfg.get("model") or {}
    data = cfg.get("data") or {}
    if epochs is not None and epochs < 1:
        problems.append(f"trainer.max_epochs must be >= 1, got {epochs}")
    unfreeze = model.get("unfreeze_at")
    if unfreeze is not None and epochs is not None and unfreeze > epochs:
        problems.append(
            f"model.unfreeze_at={unfreeze} is after the last epoch (trainer.max_epochs={epochs}); "
            "the backbone would never train"
        )
    ratio = model.get("backbone_lr_ratio")
    if ratio is not None and ratio < 0:
        problems.append(f"model.backbone_lr_ratio must be >= 0, got {ratio}")
    if model.get("lr") is not None and model.get("lr") <= 0:
        problems.append(f"model.lr must be > 0, got {model.get('lr')}")
    for key in ("batch_size", "eval_batch_size"):
        value = data.get(key)
        if value is not None and value < 1:
            problems.append(f"data.{key} must be >= 1, got {value}")
    if data.get("imbalance_ratio") is not None and data.imbalance_ratio < 1:
        problems.append(f"data.imbalance_ratio must be >= 1, got {data.imbalance_ratio}")
    backbone = cfg.get("backbone") or {}
    if backbone.get("weights") == "file":
        path = backbone.get("weights_path")
        if not path:
            problems.append("backbone.weights=file needs backbone.weights_path=/path/to/weights")
        elif not Path(path).expanduser().is_file():
            problems.append(f"backbone.weights_path does not exist: {path}")
    ckpt = cfg.get("ckpt_path")
    if ckpt not in (None, "auto") and not Path(ckpt).expanduser().is_file():
        problems.append(f"ckpt_path does not exist: {ckpt}")
    if cfg.get("resume") not in (None, "auto", "never"):
        problems.append(f"resume must be auto or null, got {cfg.get('resume')}")
    problems.extend(unwritable_dirs(cfg))
    if problems:
        raise ConfigError("; ".join(problems))


def _unwritable(path: str | Path) -> str | None:
    """Why ``path`` cannot be created or written to, or None if it can."""
    folder = Path(path).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    return None


def unwritable_dirs(cfg: DictConfig) -> list[str]:
    """The run's writable dirs (logs, the data-setup lock and caches), checked before any
    work: else the run fails minutes later, on the first write."""
    paths = cfg.get("paths") or {}
    dirs = {"paths.log_dir": paths.get("log_dir"), "paths.cache_dir": paths.get("cache_dir")}
    features = (cfg.get("model") or {}).get("features") or {}
    if features.get("cache"):
        dirs["model.features.cache_dir"] = features.get("cache_dir")
    problems = []
    for key, path in dirs.items():
        reason = _unwritable(path) if path else None
        if reason:
            problems.append(f"{key}={path} is not writable ({reason}); point it to a "
                            "writable folder")
    return problems


class EarlyChecks(Callback):
    """Hydra callback: refuse unwritable dirs before Hydra creates the run dir in them
    (Hydra's own error there is a stack trace)."""

    def _check(self, config: DictConfig) -> None:
        problems = unwritable_dirs(config)
        if problems and os.environ.get("TAILTUNE_DEBUG") != "1":
            print(f"tailtune: error: {'; '.join(problems)}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)


def _root_cause(err: BaseException) -> BaseException:
    """Hydra's InstantiationException wraps the real error (e.g. a BackboneError)."""
    while err.__cause__ is not None and isinstance(err, InstantiationException):
        err = err.__cause__
    return err


def _one_line(err: BaseException) -> str:
    """The root cause's message."""
    err = _root_cause(err)
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0] if type(err).__name__ == "InstantiationException" else text


def readable_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn bad input into one readable line and exit code 2, unless TAILTUNE_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, FloatingPointError, LookupError, RuntimeError,
                InstantiationException) as err:
            if os.environ.get("TAILTUNE_DEBUG") == "1":
                raise
            if isinstance(_root_cause(err), RuntimeError):
                raise  # a real bug: keep the traceback
            print(f"tailtune: error: {_one_line(err)}", file=sys.stderr)
            print("(set TAILTUNE_DEBUG=1 to see the traceback)", file=sys.stderr)
            sys.exit(2)

    return wrapper


def ddp_relaunch_as_single_run(output_dir: str) -> None:
    """Make Lightning's DDP re-launch start *this job*, not the whole sweep.

    Lightning starts each extra rank by re-running ``sys.argv`` plus
    ``hydra.run.dir=<HydraConfig.run.dir>``. Inside a multirun, ``sys.argv`` holds the sweep
    (``-m`` and comma lists) and ``run.dir`` is not the job's dir. Rewrite both to the job's
    own overrides and dir, so every rank composes the same single-run config.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = output_dir
