"""The config schema: one declarative table of every documented setting (its type, range or
choices), checked on the composed config before torch is imported.

Each problem names the key, the value and what is valid, e.g.
``data.image_size must be an integer >= 1, got 'abc'``. Tables are per entry point (the
top-level keys of train/eval/predict) and per group; ``model`` and ``data`` options differ by
class, so their tables are keyed by the class name of ``_target_``. A node whose class is in
the table refuses keys the table does not list (``+model.lrr=1``) and suggests the closest
one; an :class:`Open` node (``trainer``, an optimizer, a dataset source) also takes keys of
its own, which its class then checks. A class not in the table (a user's own, through
``TAILTUNE_CONFIG_DIR``) gets the type checks of the keys it shares with the table.

Nothing here imports torch. tests/test_config_schema.py keeps the tables in step with the
YAML files and with the classes' constructors.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["METRICS", "config_problems", "not_a_setting", "optimized_metric_problem"]


# -- value specs --------------------------------------------------------------------------------
class Spec:
    """What a value may be. ``problem`` returns ``'must be ...'`` text, or None if valid."""

    null: bool = False
    null_means: str = ""

    def describe(self) -> str:
        raise NotImplementedError

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def range_text(self, value: Any) -> str | None:
        """A shorter text when only the range is wrong (the type is right)."""
        return None

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.null else f"must be {self.describe()}, got null"
        if self.accepts(value):
            return None
        short = self.range_text(value)
        text = short or self.describe()
        if self.null:
            text += f" or null{f' ({self.null_means})' if self.null_means else ''}"
        return f"must be {text}, got {_show(value)}"


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bounds(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


@dataclass(frozen=True)
class Number(Spec):
    """A finite number (int or float) in a range; ``integer=True`` allows ints only."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    null: bool = False
    null_means: str = ""

    def _in_range(self, value: float) -> bool:
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return not (self.hi is not None
                    and (value > self.hi or (self.hi_open and value == self.hi)))

    def _right_type(self, value: Any) -> bool:
        if self.integer:
            return _is_int(value)
        return _is_number(value) and math.isfinite(value)

    def accepts(self, value: Any) -> bool:
        return self._right_type(value) and self._in_range(value)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        bounds = _bounds(self.lo, self.hi, self.lo_open, self.hi_open)
        return f"{kind} {bounds}".strip()

    def range_text(self, value: Any) -> str | None:
        if self._right_type(value):
            return _bounds(self.lo, self.hi, self.lo_open, self.hi_open) or None
        return None


def Int(lo: float | None = None, hi: float | None = None, **kw: Any) -> Number:  # noqa: N802
    return Number(lo=lo, hi=hi, integer=True, **kw)


def Float(lo: float | None = None, hi: float | None = None, **kw: Any) -> Number:  # noqa: N802
    return Number(lo=lo, hi=hi, **kw)


@dataclass(frozen=True)
class Bool(Spec):
    null: bool = False

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Choice(Spec):
    options: tuple[Any, ...] = ()
    null: bool = False
    null_means: str = ""

    def accepts(self, value: Any) -> bool:
        return any(value == o and type(value) is type(o) for o in self.options)

    def describe(self) -> str:
        return "one of " + ", ".join(str(o) for o in self.options)


def choice(*options: Any, null: bool = False, null_means: str = "") -> Choice:
    return Choice(options=options, null=null, null_means=null_means)


@dataclass(frozen=True)
class Text(Spec):
    """Any non-empty string (a name, a path)."""

    null: bool = False
    null_means: str = ""

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value.strip() != ""

    def describe(self) -> str:
        return "a non-empty string"


@dataclass(frozen=True)
class Pattern(Spec):
    """A string matching ``regex`` (described as ``text``)."""

    regex: str = ""
    text: str = ""
    null: bool = False

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and re.fullmatch(self.regex, value) is not None

    def describe(self) -> str:
        return self.text


@dataclass(frozen=True)
class AnyOf(Spec):
    """The union of specs, e.g. an int or a fraction."""

    specs: tuple[Spec, ...] = ()
    null: bool = False
    null_means: str = ""

    def accepts(self, value: Any) -> bool:
        return any(s.accepts(value) for s in self.specs)

    def describe(self) -> str:
        return " or ".join(s.describe() for s in self.specs)


def any_of(*specs: Spec, null: bool = False, null_means: str = "") -> AnyOf:
    return AnyOf(specs=specs, null=null, null_means=null_means)


@dataclass(frozen=True)
class ListOf(Spec):
    item: Spec = field(default_factory=Text)
    min_len: int = 0
    null: bool = False

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (list, tuple)) and len(value) >= self.min_len \
            and all(self.item.accepts(v) for v in value)

    def describe(self) -> str:
        size = f" of at least {self.min_len}" if self.min_len else ""
        return f"a list{size} of {_plural(self.item.describe())}"


_NOUNS = ("string", "number", "integer")


def _plural(text: str) -> str:
    """``a non-empty string`` -> ``non-empty strings``: the noun takes the s, not the
    adjective before it (``finite number >= 0`` -> ``finite numbers >= 0``)."""
    for article in ("an ", "a "):
        if text.startswith(article):
            words = text[len(article):].split(" ")
            at = next((i for i, w in enumerate(words) if w in _NOUNS), 0)
            words[at] += "s"
            return " ".join(words)
    return text


@dataclass(frozen=True)
class Anything(Spec):
    """A known key whose value its class checks (a nested ``_target_`` node, a plugin list)."""

    null: bool = True

    def accepts(self, value: Any) -> bool:
        return True

    def describe(self) -> str:
        return "anything"


@dataclass(frozen=True)
class Open(Spec):
    """A node that takes keys of its own as well; listed sub-keys are still type-checked."""

    null: bool = True

    def accepts(self, value: Any) -> bool:
        return True

    def describe(self) -> str:
        return "a mapping"


ANY, OPEN, TEXT, BOOL = Anything(), Open(), Text(), Bool()
SEED = Int(0, 2**32 - 1)
FRACTION = Float(0, 1, hi_open=True)
POSITIVE = Float(0, lo_open=True)
DEVICE = Pattern(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda, cuda:N or mps")

# -- metrics ------------------------------------------------------------------------------------
# What ImbalancedClassificationMetrics.compute() returns (tailtune/metrics.py), plus
# recall/<class>; a test keeps the two in step. All are higher-is-better except ece.
METRICS = ("acc", "bal_acc", "macro_f1", "gmean", "auroc", "ap", "ece", "many_acc",
           "medium_acc", "few_acc")
LOWER_IS_BETTER = ("ece", "loss")


def optimized_metric_problem(name: Any) -> str | None:
    """``optimized_metric`` picks the best checkpoint (the highest value) and is what sweepers
    read from metrics.json: a validation metric of the model where higher is better."""
    valid = [f"val/{m}" for m in METRICS if m not in LOWER_IS_BETTER]
    shown = ", ".join(valid) + ", val/recall/<class>"
    if isinstance(name, str):
        if name in valid or (name.startswith("val/recall/") and name != "val/recall/"):
            return None
        stage, _, metric = name.partition("/")
        if stage == "val" and metric in LOWER_IS_BETTER:
            return (f"optimized_metric={name} is lower-is-better, but the best checkpoint is the "
                    f"one with the highest value; choose one of {shown}")
        if stage in ("train", "test") and metric in (*METRICS, "loss", "recall"):
            return (f"optimized_metric={name} is not allowed: checkpoints are chosen on "
                    f"validation metrics; valid: {shown}")
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"optimized_metric={_show(name)} is not a metric tailtune logs; {hint}valid: {shown}"


# -- the tables ---------------------------------------------------------------------------------
Table = Mapping[str, Spec]

THREADS = Int(1, null=True, null_means="torch's default")
PROCESS: Table = {"threads": THREADS, "keep_freed_memory": BOOL}
TRAIN: Table = {
    "task_name": TEXT,
    "seed": SEED,
    "ckpt_path": Text(null=True),  # existence and format: config.checkpoint_problem
    "optimized_metric": ANY,  # optimized_metric_problem
    "test": BOOL,
    "resume": choice("auto", "never", null=True, null_means="never resume"),
    "requeue_signal": Text(null=True),
    **PROCESS,
    "correct_prior_for_sampler": BOOL,
    "print_config": choice("summary", "full"),
    "subsample": Int(1, null=True, null_means="all images"),  # debug=smoke: 64
}
EVAL: Table = {
    "task_name": TEXT,
    "ckpt_path": Text(null=True),  # required unless model=ensemble model.checkpoints=[...]
    "split": choice("test", "val"),
    **PROCESS,
    "subsample": Int(1, null=True, null_means="the checkpoint's own"),  # set by debug=smoke
}
PREDICT: Table = {
    "task_name": TEXT,
    "ckpt_path": TEXT,
    "input": TEXT,
    "output": Text(null=True, null_means="predictions.csv in the run dir"),
    "batch_size": Int(1),
    "num_workers": Int(0),
    "device": DEVICE,
    **PROCESS,
}
TOP: dict[str, Table] = {"train": TRAIN, "eval": EVAL, "predict": PREDICT}
# Required or not depending on other keys, checked there (config._cross_key_problems):
# tailtune-eval model=ensemble model.checkpoints=[...] takes no ckpt_path.
REQUIRED_ACROSS_KEYS = ("ckpt_path",)

PATHS: Table = {"log_dir": TEXT, "output_dir": ANY, "data_dir": TEXT, "cache_dir": TEXT}

_DATA: Table = {
    "_target_": TEXT,
    "source": OPEN,
    "image_size": Int(1),
    "batch_size": Int(1),
    "eval_batch_size": Int(1, null=True, null_means="data.batch_size"),
    "num_workers": Int(0),
    "pin_memory": BOOL,
    "persistent_workers": BOOL,
    "split_seed": SEED,
    "val_fraction": FRACTION,
    "test_fraction": FRACTION,
    "imbalance_ratio": Float(1),
    "imbalance_profile": choice("exp", "step"),
    "decode": choice("auto", "eager", "lazy"),
    "resize": choice("squash", "center_crop"),
    "cache_dir": Text(null=True),
}
_FILES: Table = {"on_bad_image": choice("error", "skip")}
DATA: dict[str, Table] = {
    "ImbalancedDataModule": _DATA,
    "image_folder_datamodule": {**_DATA, **_FILES, "root": Text(null=True)},
    "csv_datamodule": {**_DATA, **_FILES, "manifest": Text(null=True)},
}

BACKBONE: Table = {
    "_target_": TEXT,
    "name": TEXT,
    "weights": choice("package", "hub", "file", "none"),
    "weights_path": Text(null=True),
    "image_size": Int(1, null=True, null_means="the weights' native size"),
    "drop_path_rate": FRACTION,
}

POSTHOC_STEPS = ("logit_adjust", "bias", "temperature")
_POSTHOC = any_of(choice("none", *POSTHOC_STEPS), ListOf(choice(*POSTHOC_STEPS)), null=True)
_OPTIMIZATION: Table = {
    "lr": POSITIVE,
    "head_dropout": FRACTION,
    "optimizer": OPEN,
    "optimizer.weight_decay": Float(0),
    "scheduler": OPEN,
    "scheduler.warmup_epochs": Float(0),
    "scheduler.min_lr_ratio": Float(0, 1),
}
_CLASSIFIER: Table = {  # ClassifierModule's own settings, shared by every model
    "_target_": TEXT,
    "_partial_": BOOL,
    "logit_adjust_tau": Float(),
    "posthoc": _POSTHOC,
    "posthoc_crossfit": BOOL,
    "many_threshold": Int(0),
    "few_threshold": Int(0),
    "confusion_every_n_epochs": Int(0),
    "log_figures": BOOL,
}
FEATURE_DTYPES = ("float32", "float16", "bfloat16")
_FEATURES: Table = {
    "features": ANY,  # read by the build layer, not passed to the module
    "features.layer": any_of(choice("pre_logits"), Int(0)),
    "features.dtype": choice(*FEATURE_DTYPES),
    "features.cache": BOOL,
    "features.cache_dir": TEXT,
    "features.batch_size": Int(1),
    "features.eval_batch_size": Int(1, null=True),
    "features.extract_batch_size": Int(1),
    "features.device": DEVICE,
}
_PROBE: Table = {
    **_CLASSIFIER, **_OPTIMIZATION, **_FEATURES,
    "hidden_dim": Int(1, null=True, null_means="a linear head"),
    "standardize": any_of(choice("global", "feature", "none"), BOOL),
    "pca_dim": Int(1, null=True, null_means="no PCA"),
}
MODEL: dict[str, Table] = {
    "FineTuneModule": {
        **_CLASSIFIER, **_OPTIMIZATION,
        "unfreeze_at": Int(0),
        "backbone_lr_ratio": Float(0),
        "train_stages": Int(1, null=True, null_means="the whole backbone"),
        "bn_after_unfreeze": choice("frozen", "train"),
        "tune": choice("full", "bitfit", "lora"),
        "lora_rank": Int(1),
        "lora_alpha": POSITIVE,
        "layer_decay": Float(0, 1, lo_open=True),
        "tta_flip": BOOL,
        "probe_epochs": Int(0),
        "feature_cache_dir": Text(null=True),
        "mix": OPEN,  # null, or a tailtune.data.mixing.BatchMix node
        "mix._target_": TEXT,
        "mix.mixup_alpha": Float(0),
        "mix.cutmix_alpha": Float(0),
        "mix.prob": Float(0, 1),
        "mix.switch_prob": Float(0, 1),
        "mix.seed": SEED,
        "channels_last": BOOL,
        "compile": BOOL,
        "compile_backend": TEXT,
    },
    "LinearProbeModule": {**_PROBE, "unfreeze_at": Int(0, null=True)},
    "DecoupledModule": {
        **_PROBE,
        "unfreeze_at": Int(0, null=True),
        "init_from": Text(null=True),
        "method": choice("crt", "tau_norm", "lws"),
        "keep_bias": BOOL,
        "class_balanced": BOOL,
    },
    "EnsembleModule": {
        **_CLASSIFIER,
        "members": ListOf(ANY),  # count and options: config.ensemble_problems
        "member_model": any_of(choice("linear_probe", "finetune"),
                               ListOf(choice("linear_probe", "finetune"))),
        "member_models": ANY,  # each a model node, checked with its own table
        "member_image_size": Int(1, null=True, null_means="each member's own"),
        "training": choice("sequential", "joint"),
        "bagging": choice("none", "under"),
        "boosting": choice("none", "samme"),
        "checkpoints": ListOf(TEXT),
        "unfreeze_at": Int(0, null=True),
        "member_configs": ANY,  # written into ensemble checkpoints by the build layer
        "member_names": ANY,
    },
}

PRECISIONS = ("64-true", "64", "32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16",
              "16-true", "bf16-true", "transformer-engine", "transformer-engine-float16")
_BATCHES = any_of(Int(0), Float(0, 1), null=True, null_means="all")
TRAINER: Table = {  # Lightning's Trainer takes many more keys: it checks those itself
    "_target_": TEXT,
    "accelerator": choice("cpu", "gpu", "cuda", "mps", "tpu", "auto"),
    "devices": any_of(Int(1), choice(-1, "auto"), ListOf(Int(0), min_len=1), Text()),
    "max_epochs": Int(1),
    "max_steps": Int(-1),
    "precision": any_of(choice(*PRECISIONS), choice(64, 32, 16)),
    "log_every_n_steps": Int(1),
    "num_sanity_val_steps": Int(-1),
    "enable_model_summary": BOOL,
    "enable_progress_bar": BOOL,
    "enable_checkpointing": BOOL,
    "deterministic": any_of(BOOL, choice("warn"), null=True),
    "limit_train_batches": _BATCHES,
    "limit_val_batches": _BATCHES,
    "limit_test_batches": _BATCHES,
    "fast_dev_run": any_of(BOOL, Int(0)),
    "overfit_batches": any_of(Int(0), Float(0, 1)),
    "check_val_every_n_epoch": Int(1, null=True),
    "accumulate_grad_batches": Int(1),
    "gradient_clip_val": Float(0, null=True),
    "sync_batchnorm": BOOL,
    "strategy": ANY,
    "plugins": ANY,
    "profiler": ANY,
}

LOSS: Table = {  # every loss's settings; the loss class refuses keys it does not take
    "label_smoothing": Float(0, 1),
    "gamma": Float(0),
    "alpha": any_of(ListOf(Float(0)), null=True, null_means="no class weights"),
    "beta": FRACTION,
    "base": choice("ce", "focal"),
    "weighting": choice("inverse", "sqrt_inverse", "effective_number"),
    "max_m": Float(0),
    "s": POSITIVE,
    "drw_start": Int(0, null=True, null_means="never re-weight"),
    "tau": Float(),
}
SAMPLER: Table = {
    "sampling_strategy": any_of(Text(), Float(0, lo_open=True), OPEN),
    "num_samples": Int(1, null=True, null_means="as many as the training split"),
    "num_epochs": Int(1),
    "q": Float(0),
    "weighting": choice("power", "effective_number"),
    "beta": FRACTION,
    "per_epoch": BOOL,
    "k_neighbors": Int(1),
    "m_neighbors": Int(1),
    "n_neighbors": Int(1),
    "kind": choice("borderline-1", "borderline-2"),
    "kind_sel": choice("all", "mode"),
    "version": choice(1, 2, 3),
}
TRANSFORMS: Table = {
    "image_size": Int(1),
    "padding": Int(0),
    "scale": any_of(ListOf(Float(0, 1)), null=True),
    "hflip": Float(0, 1),
    "erasing": Float(0, 1),
    "num_ops": Int(0),
    "magnitude": Int(0, 30),
}
COMBINER: Table = {
    "weights": any_of(ListOf(Float(0)), null=True, null_means="fitted on validation"),
    "step": Float(0, 1, lo_open=True),
    "grid_max_members": Int(1),
    "sweeps": Int(1),
    "C": POSITIVE,
    "folds": Int(2),
    "max_iter": Int(1),
    "seed": SEED,
}
# Groups whose keys depend on the class: a known class refuses keys its table lacks.
BY_CLASS: dict[str, dict[str, Table]] = {"data": DATA, "model": MODEL}
# Groups with one table: closed ones refuse unknown keys, open ones leave them to the class.
CLOSED: dict[str, Table] = {"backbone": BACKBONE, "paths": PATHS}
OPEN_GROUPS: dict[str, Table] = {"trainer": TRAINER, "loss": LOSS, "sampler": SAMPLER,
                                 "transforms": TRANSFORMS, "combiner": COMBINER}
# Top-level nodes that hold no settings of their own to check here.
FREE = ("hydra", "logger", "callbacks", "ensemble_member")


# -- reading values -----------------------------------------------------------------------------
_SKIP = object()
# Interpolations not resolved here: they import torch (trainer=gpu's precision).
_HEAVY_RESOLVERS = ("tailtune_gpu_precision",)


def _value(node: DictConfig, key: str) -> Any:
    """The resolved plain value, ``_SKIP`` when it cannot be resolved without the run
    (``${hydra:...}`` before Hydra's run starts, a resolver that imports torch)."""
    if OmegaConf.is_missing(node, key):
        return "???"
    if OmegaConf.is_interpolation(node, key):
        raw = str(node._get_node(key)._value())  # type: ignore[union-attr]
        if any(name in raw for name in _HEAVY_RESOLVERS):
            return _SKIP
    try:
        value = node[key]
    except Exception:  # noqa: BLE001 - resolved later, in the run
        return _SKIP
    if isinstance(value, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except Exception:  # noqa: BLE001
            return _SKIP
    return value


def _class_name(node: Any) -> str:
    target = node.get("_target_") if isinstance(node, (DictConfig, Mapping)) else None
    return str(target or "").rsplit(".", 1)[-1]


def not_a_setting(full_key: str, known: list[str], owner: str = "") -> str:
    """``model.lrr is not a setting of FineTuneModule; did you mean model.lr?``"""
    prefix, _, key = full_key.rpartition(".")
    close = difflib.get_close_matches(key, [k for k in known if not k.startswith("_")], n=1,
                                      cutoff=0.6)
    where = f" of {owner}" if owner else ""
    if close:
        hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    else:
        hint = "check its spelling, or remove it"
    return f"{full_key} is not a setting{where}; {hint}"


def _check_node(node: DictConfig, table: Table, path: str, closed: bool,
                owner: str = "") -> Iterator[str]:
    """Problems of ``node`` (at ``path``, e.g. ``model``) against ``table``."""
    for key in node:
        key = str(key)
        full = f"{path}.{key}" if path else key
        spec = table.get(key)
        if spec is None:
            if closed:
                yield not_a_setting(full, [k for k in table if "." not in k], owner)
            continue
        sub = {k[len(key) + 1:]: s for k, s in table.items() if k.startswith(f"{key}.")}
        if sub and isinstance(node.get(key), DictConfig):
            yield from _check_node(node[key], sub, full, closed=not isinstance(spec, Open),
                                   owner=owner)
            continue
        if isinstance(spec, (Anything, Open)):
            continue
        value = _value(node, key)
        if value is _SKIP:
            continue
        if value == "???":
            if full not in REQUIRED_ACROSS_KEYS:
                yield f"{full} is required (it has no default): pass {full}=..."
            continue
        problem = spec.problem(value)
        if problem:
            yield f"{full} {problem}"


def config_problems(cfg: DictConfig, entry: str) -> list[str]:
    """Every schema problem of a composed ``train``/``eval``/``predict`` config."""
    problems: list[str] = []
    top = TOP[entry]
    groups = {*BY_CLASS, *CLOSED, *OPEN_GROUPS, *FREE}
    for key in cfg:
        key = str(key)
        if key in top or key in groups:
            continue
        problems.append(not_a_setting(key, [*top, *(g for g in groups if g in cfg)]))
    problems.extend(_check_node(cfg, top, "", closed=False))
    metric = _value(cfg, "optimized_metric") if "optimized_metric" in cfg else _SKIP
    problem = None if metric is _SKIP else optimized_metric_problem(metric)
    if problem:
        problems.append(problem)
    for group, tables in BY_CLASS.items():
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            problems.extend(_check_class_node(node, tables, group))
    for group, table in (*CLOSED.items(), *OPEN_GROUPS.items()):
        node = cfg.get(group)
        if group in OPEN_GROUPS and isinstance(node, DictConfig) and len(node) \
                and "_target_" not in node:
            # transforms=none +transforms.erasing=0.5: settings with no class to take them
            problems.append(f"{group}: {', '.join(f'{group}.{k}' for k in node)} set, but the "
                            f"chosen {group} option builds nothing to take it; choose an option "
                            f"that does (configs/{group}/)")
        elif isinstance(node, DictConfig):
            problems.extend(_check_node(node, table, group, closed=group in CLOSED,
                                        owner=_class_name(node)))
    return problems


def _check_class_node(node: DictConfig, tables: dict[str, Table], path: str) -> Iterator[str]:
    name = _class_name(node)
    table = tables.get(name)
    if table is None:  # a user's own class: check the keys it shares with ours
        merged: dict[str, Spec] = {}
        for known in tables.values():
            merged.update(known)
        yield from _check_node(node, merged, path, closed=False)
        return
    yield from _check_node(node, table, path, closed=True, owner=name)
    if path == "model" and name == "EnsembleModule":
        for kind, member in (node.get("member_models") or {}).items():
            if isinstance(member, DictConfig):
                yield from _check_class_node(member, tables, f"{path}.member_models.{kind}")


def closed_keys(path: str, node: DictConfig) -> list[str] | None:
    """The valid keys of the node at ``path`` when the schema knows all of them (the top
    level, ``model`` and ``data`` of a known class, ``backbone``, ``paths``), else None."""
    table: Table | None = None
    group = path.split(".", 1)[0]
    if path == "":
        table = {**TOP.get(str(node.get("task_name") or "train"), TRAIN),
                 **{g: ANY for g in (*BY_CLASS, *CLOSED, *OPEN_GROUPS) if g in node}}
    elif path in CLOSED:
        table = CLOSED[path]
    elif path in BY_CLASS or (group == "model" and ".member_models." in f".{path}"):
        table = BY_CLASS[group].get(_class_name(node))
    elif path == "model.features":
        table = {k.split(".", 1)[1]: s for k, s in _FEATURES.items() if "." in k}
    return None if table is None else [k for k in table if "." not in k]


def owner(path: str, node: DictConfig) -> str:
    """The class a node configures, for messages (``FineTuneModule``), or ``''``."""
    return _class_name(node) if path else ""
