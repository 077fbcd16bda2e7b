"""Config helpers of the build layer: where the configs live, Hydra's compose API, the model
class a config names, and the config as plain data.

Nothing here imports torch (the entry points check a config with it before torch loads);
:func:`target_class` imports the class a config names, and with it what that class needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tailtune.run_record import says_how_to_run


def _config_path() -> str:
    """Packaged configs after ``pip install .``; the repo's own ``configs/`` in a checkout
    (an editable install leaves the package dir without them)."""
    package_dir = Path(__file__).resolve().parents[1]
    if (package_dir / "configs" / "train.yaml").is_file():
        return "pkg://tailtune.configs"
    return str(package_dir.parents[1] / "configs")


CONFIG_PATH = _config_path()


def config_dirs() -> list[Path]:
    """Where group options live: the user's $TAILTUNE_CONFIG_DIR first, then tailtune's."""
    dirs = [Path(os.environ["TAILTUNE_CONFIG_DIR"])] if os.environ.get("TAILTUNE_CONFIG_DIR") \
        else []
    if CONFIG_PATH.startswith("pkg://"):
        dirs.append(Path(str(resources.files("tailtune") / "configs")))
    else:
        dirs.append(Path(CONFIG_PATH))
    return dirs


# -- Hydra's compose API ----------------------------------------------------------------------
@contextlib.contextmanager
def _hydra() -> Iterator[Any]:
    """Hydra's global state: the running app's (its search path, the user's config dir
    included), or tailtune's configs for the time of the block (tests, notebooks)."""
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield GlobalHydra.instance()
        return
    if CONFIG_PATH.startswith("pkg://"):
        context = initialize_config_module(CONFIG_PATH.removeprefix("pkg://"),
                                           version_base="1.3")
    else:
        context = initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3")
    with context:
        yield GlobalHydra.instance()


def group_options(group: str) -> list[str]:
    """The options Hydra finds for a config group."""
    with _hydra() as hydra:
        return sorted(hydra.config_loader().get_group_options(group))


def compose_option(group: str, option: str, what: str = "") -> DictConfig:
    """A group option (``backbone``, ``efficientnet_lite1``) as Hydra composes it (its own
    defaults, its package, the user's config dir), unresolved: its interpolations resolve
    in the config it is put into."""
    from hydra import compose
    from hydra.errors import MissingConfigException

    with _hydra():
        try:
            composed = compose(overrides=[f"+{group}={option}"])
        except MissingConfigException as err:
            raise ValueError(f"unknown {what or group} '{option}'; valid: "
                             f"{', '.join(group_options(group))}") from err
    return composed[group]


def option_exists(group: str, option: Any) -> bool:
    """Whether a group choice names a config that was found: an optional default whose file
    is absent (``optional local: default`` without a ``configs/local/default.yaml``) still
    shows up in Hydra's choices."""
    if option is None:
        return True
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return option in GlobalHydra.instance().config_loader().get_group_options(group)
    return any((root / group / f"{option}.yaml").is_file() for root in config_dirs())


# -- the classes a config names -----------------------------------------------------------------
def target_class(node: Any) -> type | None:
    """The class a config node's ``_target_`` names (imported), or None without one."""
    target = node.get("_target_") if isinstance(node, (DictConfig, dict)) else None
    if not target:
        return None
    from hydra.utils import get_class

    return get_class(str(target))


def model_class(cfg: DictConfig) -> type:
    """The model class of a run config; its class attributes say what kind of model it is
    (:class:`tailtune.models.base.ClassifierModule`): the build layer reads those, never
    the presence of config keys."""
    cls = target_class(cfg.get("model"))
    if cls is None:
        raise ValueError("the config has no model: choose one with model=finetune|"
                         "linear_probe|decoupled|ensemble")
    return cls


# Model-config keys the build layer applies itself; the module's constructor never sees them.
BUILD_KEYS = ("features", "channels_last", "compile", "compile_backend")


def module_config(node: DictConfig) -> DictConfig:
    """The model node without :data:`BUILD_KEYS`, its interpolations resolved (a detached
    copy could not reach ``paths`` or other groups any more)."""
    keys = [k for k in node if k not in BUILD_KEYS]
    if len(keys) == len(node):
        return node
    resolved = OmegaConf.to_container(node, resolve=True)
    return OmegaConf.create({k: resolved[k] for k in keys})


def call_factory(factory: Any, node: Any, group: str, **kwargs: Any) -> Any:
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


# -- the config as plain data -------------------------------------------------------------------
def absolute_path(path: Any) -> str:
    return str(Path(str(path)).expanduser().resolve())


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data, without Hydra's own node: what ``config.yaml``,
    checkpoints and the HParams tab hold. The checkpoint a model is built from
    (``model.init_from``) is made absolute, so a checkpoint that names it loads from any
    working dir."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    model = plain.get("model")
    if isinstance(model, dict) and model.get("init_from"):
        model["init_from"] = absolute_path(model["init_from"])
    return plain


def config_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(plain_config(cfg))


def config_tree(cfg: DictConfig) -> Any:
    """The resolved config as a rich tree, one branch per group."""
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, value in plain_config(cfg).items():
        text = OmegaConf.to_yaml({key: value}).rstrip()
        tree.add(Syntax(text, "yaml", background_color="default"))
    return tree


def _is_group_choice(group: str, choices: dict[str, Any], cfg: DictConfig) -> bool:
    """A group worth a word in the run's header: chosen, read by this run's model, and not
    Hydra's own, the per-user settings, a ``default`` option (paths, callbacks) that no one
    swaps to compare, or an option a config file places inside another (``model@...``)."""
    if choices.get(group) in (None, "default") or group in ("hydra", "local") or \
            group.startswith(("hydra/", "local/")) or "@" in group:
        return False
    if group == "combiner":  # read by ensembles only
        return model_class(cfg).is_ensemble
    if group == "backbone":  # ensemble members and decoupled models bring their own
        model = model_class(cfg)
        return not (model.is_ensemble or model.builds_on_checkpoint)
    return True


def config_summary(cfg: DictConfig, choices: dict[str, Any], overrides: list[str],
                   saved_to: Path) -> list[Any]:
    """What the console shows of the config: a few lines in place of the whole config (each
    group's option, the other values the command line set, where the resolved config is
    saved), after the whole tree with ``print_config=full``. Lines, not a table: printed
    soft-wrapped, a path stays whole to copy."""
    groups = [f"{group}={choices[group]}" for group in reversed(list(choices))
              if _is_group_choice(group, choices, cfg)]
    chosen = {f"{group}={option}" for group, option in choices.items()}
    values = [o for o in overrides if o.lstrip("+~") not in chosen]
    lines: list[Any] = [config_tree(cfg)] if cfg.get("print_config") == "full" else []
    lines.append(f"config: {' '.join(groups)}")
    if values:
        lines.append(f"set: {' '.join(values)}")
    lines.append(f"resolved config: {saved_to}")
    return lines


def run_name(overrides: list[str] | None) -> str:
    """A TensorBoard run name from the job's overrides, safe as a dir name (slashes become
    underscores; the exact overrides are in metrics.json)."""
    if not overrides:
        return ""
    # How a run is run (resume=auto, threads, launcher, hydra.*, paths.*) is not what it
    # computes: a resumed run keeps writing to its own TensorBoard run.
    kept = [o for o in overrides if not says_how_to_run(o)]
    if not kept:
        return ""
    name = ",".join(kept).replace("/", "_").replace(os.sep, "_")  # a slash would nest dirs
    if len(name) <= 120:
        return name
    return f"{name[:100]}…{hashlib.sha1(name.encode()).hexdigest()[:8]}"


# Data keys that change how an image is prepared, not where it is.
PREPROCESSING_KEYS = ("image_size", "resize")


def eval_data_config(trained: DictConfig, requested: DictConfig | None) -> DictConfig:
    """The data a checkpoint is evaluated on: the one it was trained with, with the keys the
    user set (``+data.root=/moved/copy``) applied; the split check then refuses anything but
    the same classes and split. A different dataset (``data=image_folder``) is refused
    here: its metrics would not be this checkpoint's test metrics."""
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
    for key in PREPROCESSING_KEYS:  # the split check cannot see these: the images change
        if key in requested and requested[key] != trained.get(key):
            raise ValueError(
                f"data.{key}={requested[key]} (set on the command line or by a debug preset) "
                f"differs from the checkpoint's data.{key}={trained.get(key)}: metrics at "
                f"another setting would not be this run's test metrics; drop it, or set "
                f"+data.{key}={trained.get(key)}")
    return OmegaConf.merge(trained, requested)
