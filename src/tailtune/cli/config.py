"""Hydra plumbing shared by the entry points: resolvers, early checks, readable errors.

Nothing here imports torch, so a bad config fails in about a second.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
import secrets
import signal
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# CONFIG_PATH: the entry points' config_path, re-exported for them.
from tailtune.build.config import CONFIG_PATH, config_dirs  # noqa: F401
from tailtune.report.runs import job_dir_hash
from tailtune.run_record import root_cause

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
        "tailtune_job_hash": lambda overrides: job_dir_hash(list(overrides)),
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
    return many or "ddp" in str(trainer.get("strategy", "")).lower()


def checkpoint_problem(path: Any, key: str = "ckpt_path") -> str | None:
    """A checkpoint path that cannot be a checkpoint: missing, a folder, or not the zip
    archive that ``torch.save`` writes (a ``.txt``, a truncated or fake file)."""
    file = Path(str(path)).expanduser()
    if not file.exists():
        return f"{key} does not exist: {path}"
    if not file.is_file():
        return f"{key}={path} is a folder, not a checkpoint file (give its checkpoints/best.ckpt)"
    hint = "give a run's checkpoints/best.ckpt or last.ckpt"
    if not zipfile.is_zipfile(file):
        return f"{key}={path} is not a checkpoint (not a file written by torch.save); {hint}"
    try:  # torch.save's archive: <name>/data.pkl holds the dict, tensors are stored apart
        with zipfile.ZipFile(file) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            header = archive.read(pickles[0]) if len(pickles) == 1 else b""
    except (OSError, zipfile.BadZipFile) as err:
        return f"{key}={path} cannot be read ({err}); {hint}"
    if not header:
        return f"{key}={path} is not a checkpoint (not a file written by torch.save); {hint}"
    if b"tailtune" not in header:
        return f"{key}={path} is not a tailtune checkpoint (no 'tailtune' metadata); {hint}"
    return None


def _options(group: str) -> list[str]:
    return sorted({p.stem for root in config_dirs() for p in (root / group).glob("*.yaml")})


def ensemble_problems(model: Any) -> list[str]:
    """``model=ensemble model.members=[...]``: at least two members, each a backbone option."""
    members = list(model.get("members") or [])
    example = "e.g. model.members=[efficientnet_lite0,efficientnet_lite1]"
    if not members:
        return [f"model.members is empty: an ensemble needs at least 2 members, {example}"]
    if len(members) == 1:
        return [f"model.members={_listed(members)} has 1 member: an ensemble needs at least 2, "
                f"{example} (or the same backbone twice with model.bagging=under)"]
    options = _options("backbone")
    problems = []
    for i, member in enumerate(members):
        name = member.get("backbone") if isinstance(member, (DictConfig, dict)) else member
        if isinstance(name, str) and options and name not in options:
            close = difflib.get_close_matches(name, options, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"model.members[{i}]={name} is not a backbone option; {hint}"
                            f"valid: {', '.join(options)}")
    return problems


def _listed(values: list[Any]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def _trainer_problems(trainer: Any) -> list[str]:
    """Several processes on CPU only through a DDP strategy (trainer=ddp_sim): Lightning's
    own choice there re-launches the script per device and fails in every one of them."""
    devices = trainer.get("devices", 1)
    accelerator = trainer.get("accelerator")
    many = devices == -1 or (isinstance(devices, int) and not isinstance(devices, bool)
                             and devices > 1)
    ddp = "ddp" in str(trainer.get("strategy") or "").lower()
    if accelerator == "cpu" and many and not ddp:
        return [f"trainer.devices={devices} with trainer.accelerator=cpu needs a DDP strategy: "
                "use trainer=ddp_sim trainer.devices=N (N CPU processes over gloo), or "
                "trainer.devices=1"]
    return []


def check_config(cfg: DictConfig, choices: dict[str, str] | None = None,
                 entry: str | None = None, cross_keys: bool = True) -> None:
    """Types, ranges, choices (the schema, :mod:`tailtune.cli.schema`), then the checks that
    span keys or look at files; raises one :class:`ConfigError` listing every problem.
    Needs no torch, so a bad config fails in about a second. ``cross_keys=False`` for a
    sweep's base config, whose swept keys still hold their defaults."""
    from tailtune.cli import schema

    entry = entry or str(cfg.get("task_name") or "train")
    if entry not in schema.TOP:
        return
    problems = schema.config_problems(cfg, entry)
    if cross_keys:
        try:
            problems.extend(_cross_key_problems(cfg, choices or {}, entry))
        except (TypeError, ValueError, AttributeError):
            if not problems:  # only a value the schema already refused may break these
                raise
    problems.extend(unwritable_dirs(cfg))
    if problems:
        raise ConfigError("; ".join(problems))


def check_train_config(cfg: DictConfig, choices: dict[str, str] | None = None) -> None:
    """The checks of :func:`check_config` for tailtune-train."""
    check_config(cfg, choices, "train")


def _cross_key_problems(cfg: DictConfig, choices: dict[str, str], entry: str) -> list[str]:
    problems: list[str] = []
    model = cfg.get("model") or {}
    trainer = cfg.get("trainer") or {}
    data = cfg.get("data") or {}
    ckpt = cfg.get("ckpt_path") if "ckpt_path" in cfg and not OmegaConf.is_missing(
        cfg, "ckpt_path") else None
    # Before torch loads, the class a config names cannot be imported to read what it
    # declares (the build layer does): these early checks go by the class name.
    ensemble = str(model.get("_target_", "")).endswith("EnsembleModule")
    if entry == "train":
        launcher = choices.get("hydra/launcher", "basic")
        if launcher in ("joblib", "submitit_local") and _multi_process(trainer):
            problems.append(
                f"DDP cannot run inside the {launcher} launcher (its ranks would re-launch the "
                "worker process, not this job); use the basic launcher locally, or "
                "launcher=submitit_slurm with one task per GPU"
            )
        epochs = trainer.get("max_epochs")
        unfreeze = model.get("unfreeze_at")
        fine_tune = str(model.get("_target_", "")).endswith("FineTuneModule")
        if fine_tune and unfreeze is not None and epochs is not None and unfreeze >= epochs:
            # Epochs are 0-based: unfreeze_at == max_epochs would unfreeze after the last epoch.
            problems.append(
                f"model.unfreeze_at={unfreeze} must be < trainer.max_epochs={epochs} (epochs run "
                f"0..{epochs - 1}); otherwise the backbone never trains. Use model=linear_probe "
                "for a frozen backbone"
            )
        if model.get("few_threshold", 0) > model.get("many_threshold", math.inf):
            problems.append(f"model.few_threshold={model.few_threshold} must be <= "
                            f"model.many_threshold={model.many_threshold}")
        fractions = data.get("val_fraction", 0) + data.get("test_fraction", 0)
        if "test_fraction" in data and fractions >= 1:
            problems.append(f"data.val_fraction + data.test_fraction must be < 1 (the rest "
                            f"trains), got {data.val_fraction} + {data.test_fraction}")
        if ensemble:
            problems.extend(ensemble_problems(model))
        problems.extend(_data_location_problems(data))
        backbone = cfg.get("backbone") or {}
        if backbone.get("weights") == "file":
            path = backbone.get("weights_path")
            if not path:
                problems.append("backbone.weights=file needs "
                                "backbone.weights_path=/path/to/weights")
            elif not Path(path).expanduser().is_file():
                problems.append(f"backbone.weights_path does not exist: {path}")
        if ckpt == "auto":
            ckpt = None
        if model.get("init_from"):  # model=decoupled: the fine-tuned run it starts from
            problem = checkpoint_problem(model.init_from, "model.init_from")
            if problem:
                problems.append(problem)
    if trainer:
        problems.extend(_trainer_problems(trainer))
    if entry == "eval" and ensemble:
        if not list(model.get("checkpoints") or []):
            problems.append("model.checkpoints is empty: give the members' checkpoints, e.g. "
                            "\"model.checkpoints=[logs/multiruns/<sweep>/*/checkpoints/best.ckpt]\"")
    elif entry in ("eval", "predict") and ckpt is None:
        problems.append(f"ckpt_path is required: tailtune-{entry} ckpt_path=PATH")
    if entry == "predict" and cfg.get("input") and not OmegaConf.is_missing(cfg, "input"):
        problems.extend(_predict_input_problems(str(cfg.input)))
    if ckpt is not None:
        problem = checkpoint_problem(ckpt)
        if problem:
            problems.append(problem)
    signal_name = cfg.get("requeue_signal") if entry == "train" else None
    if signal_name and not hasattr(signal, str(signal_name)):
        problems.append(f"requeue_signal={signal_name} is not a signal name (e.g. SIGUSR2)")
    return problems


def _data_location_problems(data: Any) -> list[str]:
    """An image folder or manifest that is not set or not there: refused before the run dir
    exists (what is inside it is checked when it is read)."""
    needs = {"root": "data.root=DIR, a folder holding train/<class>/<images> (optional val/ "
                     "and test/)",
             "manifest": "data.manifest=FILE.csv with columns path,label[,split]"}
    problems = []
    for key, hint in needs.items():
        if key not in data:
            continue
        if not data.get(key):
            problems.append(f"data.{key} is not set: pass {hint}")
        elif not Path(str(data.get(key))).expanduser().exists():
            problems.append(f"data.{key} does not exist: {data.get(key)}")
    return problems


def _predict_input_problems(spec: str) -> list[str]:
    """tailtune-predict's input= that is not there (a glob may match nothing: the task says
    so): refused before the run dir exists."""
    if any(ch in spec for ch in "*?[") or Path(spec).expanduser().exists():
        return []
    return [f"input does not exist: {spec}"]


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
    """Hydra callback: check the config (:func:`check_config`) before Hydra creates the run
    dir, so bad input leaves no run dir behind (and an unwritable dir is not Hydra's stack
    trace). A sweep's jobs are checked again in the task, with their own overrides."""

    def _check(self, config: DictConfig, sweep: bool = False) -> None:
        _release_hydra_errors()  # composed: sweep workers must not inherit HYDRA_FULL_ERROR
        if os.environ.get("TAILTUNE_DEBUG") == "1":
            return
        hydra_node = config.get("hydra") or {}
        choices = dict((hydra_node.get("runtime") or {}).get("choices") or {})
        local = choices.get("hydra/launcher", "basic") in LOCAL_LAUNCHERS
        try:
            check_config(config, choices, cross_keys=not sweep)
            basic = choices.get("hydra/sweeper", "basic") == "basic"
            searched = not basic and (hydra_node.get("sweeper") or {}).get("params")
            if sweep and local and (basic or searched):
                # Every job (of a search, each end of its space), checked in full before the
                # sweep dir exists: a bad value in job 5 would otherwise stop the sweep after
                # jobs 0-4 ran, and a sampler's trial out of bounds stops its study.
                problems = _sweep_job_problems(config, _basic_sweep_jobs(config), "sweep job") \
                    if basic else _sweep_job_problems(config, _search_space_ends(config),
                                                      "search space value")
                if problems:
                    raise ConfigError("; ".join(problems))
            # Of the cross-key checks, a sweep's base config answers the data location for
            # every job (of a sweeper whose jobs are not known in advance), unless the sweep
            # varies it or runs its jobs on other hosts (a path that only SLURM's compute
            # nodes mount): a missing folder is refused before Hydra creates the sweep dir.
            elif sweep and local and str(config.get("task_name") or "train") == "train" \
                    and not any(key.split(".")[0] in MAY_MOVE_DATA
                                for key in _swept_keys(config)):
                problems = _data_location_problems(config.get("data") or {})
                if problems:
                    raise ConfigError("; ".join(problems))
        except ConfigError as err:
            print(f"tailtune: error: {err}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, sweep=True)


class SweepDir(Callback):
    """Hydra callback (``configs/hydra/default.yaml``): a multirun prints its sweep dir once, on
    stderr, at the start. Hydra's basic launcher names only each job's dir; the joblib and
    submitit launchers print the sweep dir themselves, so it is not printed twice there."""

    PRINTED_BY_LAUNCHER = ("hydra_joblib_launcher", "hydra_submitit_launcher")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        hydra_node = config.hydra
        if "optuna" in str((hydra_node.get("sweeper") or {}).get("_target_") or ""):
            import optuna  # its INFO lines, coloured even into a file, repeat the sweeper's

            optuna.logging.set_verbosity(optuna.logging.WARNING)
        launcher = str((hydra_node.get("launcher") or {}).get("_target_") or "")
        from tailtune.console import CONSOLE, rank

        if rank() != 0 or any(name in launcher for name in self.PRINTED_BY_LAUNCHER):
            return
        # Resolved here first: Hydra caches ${now:...}, so the launcher gets the same dir.
        sweep_dir = Path(str(hydra_node.sweep.dir)).absolute()
        CONSOLE.print(f"sweep dir: {sweep_dir}", soft_wrap=True, markup=False)


LOCAL_LAUNCHERS = ("basic", "joblib", "submitit_local")
# Swept keys that may change data.root or data.manifest: the data itself, the paths it
# interpolates, and groups whose options set data keys.
MAY_MOVE_DATA = ("data", "paths", "experiment", "debug")


def _swept_keys(config: DictConfig) -> set[str]:
    """The keys a multirun varies: sweep overrides on the command line (``data.root=a,b``,
    ``data=x,y``) and a sweeper's search space (``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_node = config.get("hydra") or {}
    overrides = OverridesParser.create().parse_overrides(
        list((hydra_node.get("overrides") or {}).get("task") or []))
    params = (hydra_node.get("sweeper") or {}).get("params") or {}
    return ({o.key_or_group for o in overrides if o.is_sweep_override()}
            | {str(key) for key in params})


def _sweep_overrides(config: DictConfig) -> list[Any]:
    """A sweep's overrides as its sweeper sees them: its search space, then the command line."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_node = config.hydra
    params = [f"{key}={value}"
              for key, value in (hydra_node.sweeper.get("params") or {}).items()]
    return OverridesParser.create(
        config_loader=GlobalHydra.instance().config_loader()).parse_overrides(
        [*params, *hydra_node.overrides.task])


def _basic_sweep_jobs(config: DictConfig) -> list[tuple[str, list[str]]]:
    """Each job of a basic sweep, named by its number and the values it sweeps."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    swept = _swept_keys(config)
    batches = BasicSweeper.split_arguments(_sweep_overrides(config), None)
    jobs = []
    for number, job in enumerate(job for batch in batches for job in batch):
        values = " ".join(o for o in job if o.split("=", 1)[0].lstrip("+~") in swept)
        jobs.append((f"{number} ({values})" if values else str(number), list(job)))
    return jobs


def _search_space_ends(config: DictConfig) -> list[tuple[str, list[str]]]:
    """For a sweeper that samples its jobs (Optuna): each value of a choice and both ends of
    a range or interval, the other keys at the base config's values. Bounds that cannot work
    with the rest of the config (``model.unfreeze_at`` up to 5 with 2 epochs) are refused
    before the study starts instead of ending it at the first trial that draws them."""
    from hydra.core.override_parser.types import IntervalSweep, RangeSweep

    # As the sweeper merges them: a key's last override wins, a fixed value leaves the space.
    overrides = {o.get_key_element(): o for o in _sweep_overrides(config)}.values()
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    jobs = []
    for override in (o for o in overrides if o.is_sweep_override()):
        space = override.value()
        if isinstance(space, IntervalSweep):
            values = [str(space.start), str(space.end)]
        else:
            values = list(override.sweep_string_iterator())
            values = values[:: max(len(values) - 1, 1)] if isinstance(space, RangeSweep) \
                else values
        key = override.get_key_element()
        jobs.extend((f"{key}={value}", [*fixed, f"{key}={value}"])
                    for value in values)
    return jobs


def _sweep_job_problems(config: DictConfig, jobs: list[tuple[str, list[str]]],
                        what: str) -> list[str]:
    """The problems of each of a sweep's ``(name, overrides)`` jobs, composed as the sweeper
    will compose it and checked as its run will be (types, ranges, cross-key checks, files);
    jobs sharing a problem are named together."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    named: dict[str, list[str]] = {}  # problem -> the jobs that have it
    for name, job in jobs:
        try:
            job_cfg = loader.load_sweep_config(config, job)
            check_config(job_cfg, dict(job_cfg.hydra.runtime.choices))
            continue
        except ConfigError as err:
            problem = str(err)
        except Exception as err:  # noqa: BLE001 - composition: Hydra's errors, made readable
            problem = _override_error(err) or _unknown_option_error(err) or ""
            if not problem:
                raise
        named.setdefault(problem, []).append(name)
    return [f"{problem} ({what}{'s' * (len(names) > 1)} {', '.join(names[:3])}"
            f"{f' and {len(names) - 3} more' if len(names) > 3 else ''})"
            for problem, names in named.items()]


def _one_line(err: BaseException) -> str:
    """The root cause's message."""
    err = root_cause(err)
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0] if type(err).__name__ == "InstantiationException" else text


def _sweep_job() -> DictConfig | None:
    """Hydra's config of this job when it is one job of a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return HydraConfig.get()


def sweep_job_mark() -> str:
    """``"#3 "`` in job 3 of a sweep (Hydra's number, as its launch line names the
    job), else ``""``: what marks this job's console lines (tailtune.console.job_mark)."""
    job = _sweep_job()
    return "" if job is None else f"#{job.job.num} "


def readable_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn bad input into one readable line and exit code 2, unless TAILTUNE_DEBUG=1. A task
    that fails before writing anything leaves no run dir (Hydra made it before the task)."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig, *args: Any, **kwargs: Any) -> T:
        from tailtune.console import job_mark, marked

        _release_hydra_errors()  # the config composed: Hydra reports the rest as usual
        with job_mark(sweep_job_mark()):
            try:
                try:
                    return fn(cfg, *args, **kwargs)
                except BaseException:
                    remove_empty_run_dir(Path(str(cfg.paths.output_dir)))
                    raise
            except (ValueError, OSError, FloatingPointError, LookupError, RuntimeError,
                    InstantiationException) as err:
                if os.environ.get("TAILTUNE_DEBUG") == "1":
                    raise
                if isinstance(root_cause(err), RuntimeError):
                    raise  # a real bug: keep the traceback
                print(marked(f"tailtune: error: {_one_line(err)}"), file=sys.stderr)
                print(marked("(set TAILTUNE_DEBUG=1 to see the traceback)"), file=sys.stderr)
                sys.exit(2)

    return wrapper


# HYDRA_FULL_ERROR=1 while Hydra composes the config, so that its errors reach
# :func:`readable_config_errors` as exceptions instead of being printed; unset once the task
# starts (DDP ranks and sweep workers do not inherit it; Hydra reports the run's errors).
_HYDRA_FULL_ERROR = "HYDRA_FULL_ERROR"
_full_error_set_here = False


def _release_hydra_errors() -> None:
    global _full_error_set_here
    if _full_error_set_here:
        os.environ.pop(_HYDRA_FULL_ERROR, None)
        _full_error_set_here = False


# Only tailtune-train chooses data: the other entry points lack the group and the key.
DATA_FROM_CHECKPOINT = (
    "tailtune-eval and tailtune-predict use the checkpoint's own data config; tailtune-eval "
    "finds moved files with +data.root=DIR (a +, as for its other keys; those that change "
    "the images are refused), and other images are scored with tailtune-predict "
    "ckpt_path=... input=DIR")


def _override_error(err: BaseException) -> str | None:
    """Hydra's ``Could not override 'model.lrr'. To append to your config use +model.lrr=1``
    as a message that says the key is not a setting, with the closest valid key."""
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    overridden = re.match(r"Could not override '([^']+)'", str(err))
    if isinstance(err, ConfigCompositionException) and overridden \
            and overridden.group(1).split(".")[0] == "data" \
            and ("No match in the defaults list" in str(err)
                 or str(getattr(cause, "full_key", "")) == "data"):  # no data group or key
        return f"{overridden.group(1)}=... is not taken here: {DATA_FROM_CHECKPOINT}"
    if not (isinstance(err, ConfigCompositionException)
            and isinstance(cause, (ConfigAttributeError, ConfigKeyError))
            and overridden):
        return None
    from tailtune.cli import schema

    full_key = str(cause.full_key or "")
    parent = cause.parent_node
    if not full_key or not isinstance(parent, DictConfig):
        return None
    path = full_key.rpartition(".")[0]
    known = [str(k) for k in parent]
    closed = schema.closed_keys(path, parent)
    if closed is not None:
        return schema.not_a_setting(full_key, [*known, *closed], schema.owner(path, parent))
    added = re.search(r"use (\+\S+)", str(err))
    owner = schema.owner(path, parent)
    # An open group's class takes more than its YAML lists (Trainer's gradient_clip_val): the
    # key is not in the config, which is not to say its class refuses it.
    message = schema.not_a_setting(full_key, known).replace(
        " is not a setting", f" is not in the {path} config" if path else " is not in the config")
    message = message.replace("; check its spelling, or remove it", "")
    append = added.group(1) if added else f"+{full_key}=..."
    tail = f"to pass a setting the config lacks to {owner or 'its class'}, use {append}"
    return f"{message} Or, {tail}" if message.endswith("?") else f"{message}; {tail}"


def _unknown_option_error(err: BaseException) -> str | None:
    """Hydra's ``Could not find 'loss/nope'`` (with its options and config search path) as
    one line: the option, the valid ones, the closest."""
    from hydra.errors import MissingConfigException

    if not (isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file):
        return None
    group, _, name = str(err.missing_cfg_file).rpartition("/")
    if not group:
        return None
    options = sorted(str(o) for o in err.options)
    close = difflib.get_close_matches(name, options, n=1)
    hint = f"; did you mean {group}={close[0]}?" if close else ""
    return f"{group}={name} is not an option; {group} is one of {', '.join(options)}{hint}"


def readable_config_errors(hydra_main: Callable[..., T]) -> Callable[..., T]:
    """Put over ``@hydra.main``: a misspelt key (``model.lrr=1``) is named as a key that is not
    a setting, with the closest valid one, instead of Hydra's advice to append it with ``+``;
    an unknown option is one line with the valid ones. Hydra's other composition errors are
    reported as Hydra reports them."""

    @functools.wraps(hydra_main)
    def main(*args: Any, **kwargs: Any) -> T:
        global _full_error_set_here
        if _HYDRA_FULL_ERROR not in os.environ and os.environ.get("TAILTUNE_DEBUG") != "1":
            os.environ[_HYDRA_FULL_ERROR] = "1"
            _full_error_set_here = True
        try:
            return hydra_main(*args, **kwargs)
        except Exception as err:
            if not _full_error_set_here:  # from the task, or the user asked for tracebacks
                raise
            _release_hydra_errors()
            message = _override_error(err) or _unknown_option_error(err)
            if message:
                print(f"tailtune: error: {message}", file=sys.stderr)
                sys.exit(2)
            from hydra._internal.utils import run_and_report

            error = err

            def reraise() -> None:
                raise error

            run_and_report(reraise)  # Hydra's own report (and exit 1), as without us
            raise
        finally:
            _release_hydra_errors()

    return main


# Before Hydra creates a run dir: every entry point imports this module first.
_PROCESS_STARTED = time.time()


def remove_empty_run_dir(run_dir: Path) -> None:
    """Remove the run dir Hydra made for this process, if nothing was written to it (input
    refused after Hydra made it): an empty dir that existed before this process started
    (its mtime is older) is left alone."""
    try:
        if run_dir.is_dir() and not any(run_dir.iterdir()) \
                and run_dir.stat().st_mtime >= _PROCESS_STARTED:
            run_dir.rmdir()
    except OSError:
        pass  # only tidying


def save_hydra_files(cfg: DictConfig, output_dir: str | Path) -> None:
    """What Hydra's ``output_subdir`` would hold (``.hydra/config.yaml``, ``hydra.yaml``,
    ``overrides.yaml``), written by the entry point once it knows the run dir holds no
    finished run (configs/hydra/default.yaml turns Hydra's own copy off)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = Path(output_dir) / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    files = {"config.yaml": cfg, "hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
             "overrides.yaml": hydra_cfg.overrides.task}
    for name, node in files.items():
        (folder / name).write_text(OmegaConf.to_yaml(node))


def resume_override(run_dir: str | Path) -> str:
    """The override that points the same command at a stopped run's dir: ``hydra.run.dir``;
    in a multirun, which ignores that, ``hydra.sweep.dir``: rerun with ``resume=auto``, the
    sweep finds its jobs' dirs again, skips the finished ones and resumes the others."""
    job = _sweep_job()
    if job is not None:
        return f"hydra.sweep.dir={Path(str(job.sweep.dir)).absolute()}"
    return f"hydra.run.dir={run_dir}"


def ddp_relaunch_as_single_run(output_dir: str) -> None:
    """Make Lightning's DDP re-launch start *this job*, not the whole sweep.

    Lightning starts each extra rank by re-running ``sys.argv`` plus
    ``hydra.run.dir=<HydraConfig.run.dir>``. Inside a multirun, ``sys.argv`` holds the sweep
    (``-m`` and comma lists) and ``run.dir`` is not the job's dir. Rewrite both to the job's
    own overrides and dir, so every rank composes the same single-run config.
    """
    from omegaconf import open_dict, read_write

    hydra_cfg = _sweep_job()
    if hydra_cfg is None:
        return
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = output_dir
