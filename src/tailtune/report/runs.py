"""Find the runs under a dir and read what each left: status, overrides, metrics."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from tailtune.run_record import (
    SEED_KEYS,
    computed_config,
    is_config_override,
    says_how_to_run,
    selection_value,
)


def job_dir_hash(overrides: Sequence[str]) -> str:
    """A sweep job dir's hash: of the job's overrides (sorted, as Hydra's override_dirname
    joins them) without those that say how it is run, so a sweep rerun with resume=auto,
    threads=1 or another launcher finds its jobs' dirs again."""
    kept = sorted(str(o) for o in overrides if not says_how_to_run(str(o)))
    return hashlib.sha1(",".join(kept).encode()).hexdigest()[:8]


# Entry points whose run dirs re-score a trained run's checkpoint: not runs of a config.
RESCORING_ENTRIES = ("eval", "predict")


@dataclass
class Run:
    path: Path
    status: str  # done | failed | running | unknown
    overrides: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    wall_s: float | None = None  # the run's wall time (timings.json), for equal-time comparisons
    threads: int | None = None  # torch's CPU threads (timings.json): CPU numbers depend on it
    # Resolved values that tell this run's config from another's with the same overrides
    # (set by tell_configs_apart).
    config_values: tuple[str, ...] = ()

    @property
    def config_key(self) -> tuple[str, ...]:
        """The run's config as compare groups it: its overrides (:attr:`config_parts`), plus
        any resolved values that tell it apart from runs with the same overrides."""
        return self.config_parts + self.config_values

    @cached_property
    def config(self) -> dict[str, Any] | None:
        """The run's resolved ``config.yaml``; None without one."""
        try:
            config = yaml.safe_load((self.path / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return None
        return config if isinstance(config, dict) else None

    @cached_property
    def computed(self) -> dict[str, Any] | None:
        """What the run computed: its config, flat, without how it was run or its seed
        (:func:`tailtune.run_record.computed_config`)."""
        if self.config is None:
            return None
        return {k: v for k, v in computed_config(self.config).items() if k not in SEED_KEYS}

    @property
    def config_parts(self) -> tuple[str, ...]:
        """The run's overrides that define its config, sorted: runs differing only in seed
        (or in how they were run) are one config. A tuple, since an override's value may
        itself hold commas (``model.posthoc=[logit_adjust,bias]``)."""
        last: dict[str, str] = {}  # a key given twice takes its last value, as in Hydra
        for override in self.overrides:
            if is_config_override(override):
                last[override.split("=", 1)[0].lstrip("+~")] = override
        return tuple(sorted(last.values()))

    @property
    def val_score(self) -> float | None:
        """Validation balanced accuracy as selection reads it (out of fold where post-hoc
        steps were tuned on val: :func:`tailtune.run_record.selection_value`)."""
        value = selection_value(self.metrics, "val/bal_acc")
        return None if math.isnan(value) else value

    @property
    def val_is_test(self) -> bool:
        return bool(self.metrics.get("dataset", {}).get("val_is_test", False))

    @cached_property
    def seed(self) -> str:
        """The run's seed: its override, else what it recorded (metrics.json; config.yaml
        for runs written before metrics.json held it); "" if unknown."""
        for o in self.overrides:
            key, _, value = o.partition("=")
            if key.lstrip("+~") in SEED_KEYS:
                return value
        if self.metrics.get("seed") is not None:
            return str(self.metrics["seed"])
        seed = (self.config or {}).get("seed")
        return "" if seed is None else str(seed)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _overrides(run_dir: Path, metrics: dict[str, Any]) -> list[str]:
    if metrics.get("overrides") is not None:
        return list(metrics["overrides"])
    hydra_file = run_dir / ".hydra" / "overrides.yaml"
    if hydra_file.is_file():
        return list(yaml.safe_load(hydra_file.read_text()) or [])
    return list(_read_json(run_dir / "run.json").get("overrides", []))


def metrics_from_events(run_dir: Path) -> dict[str, Any]:
    """Last value of each scalar in the run's TensorBoard events: the fallback for runs
    without metrics.json (still running, or crashed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[str, float]] = {}
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            stage, _, key = tag.partition("/")
            if stage in ("val", "test") and key:
                out.setdefault(stage, {})[key] = accumulator.Scalars(tag)[-1].value
        break  # one event dir per run
    return out


def _rescores_a_checkpoint(run_dir: Path) -> bool:
    """A tailtune-eval (of one checkpoint) or tailtune-predict dir: its numbers are another
    run's, counted there."""
    record = _read_json(run_dir / "run.json")
    if "entry" in record:
        return record["entry"] in RESCORING_ENTRIES
    # Written before run.json named its entry point: only training records its choices.
    return "ckpt_path" in record and "choices" not in record


def find_runs(root: Path) -> list[Run]:
    """Every training run dir under ``root`` (a sweep dir, or a dir of runs), finished or not;
    eval and predict dirs, which re-score a run's checkpoint, are left out."""
    root = Path(root)
    candidates = {p.parent for p in root.rglob("status.json")}
    candidates |= {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    runs = []
    for run_dir in sorted(candidates):
        if _rescores_a_checkpoint(run_dir):
            continue
        status = _read_json(run_dir / "status.json")
        metrics = _read_json(run_dir / "metrics.json")
        state = status.get("status", "unknown" if not metrics else "done")
        if state != "done" or not metrics.get("test"):
            fallback = metrics_from_events(run_dir)
            metrics = {**fallback, **metrics}
        timings = _read_json(run_dir / "timings.json")
        runs.append(Run(run_dir, state, _overrides(run_dir, metrics), metrics,
                        status.get("error", ""), timings.get("wall_s"),
                        timings.get("torch_threads")))
    tell_configs_apart(runs)
    return runs


def tell_configs_apart(runs: list[Run], shown: int = 3) -> list[str]:
    """Runs with the same overrides that computed different configs (a config file edited
    between sweeps, another ``configs/local/default.yaml`` or ``TAILTUNE_CONFIG_DIR``) are
    different configs: each gets the resolved values that differ (``config_values``, at most
    ``shown`` of them, then a short hash of the rest). Returns one note per such set of runs.
    Runs without a ``config.yaml`` keep their overrides alone."""
    by_parts: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        run.config_values = ()
        if run.computed is not None:
            by_parts.setdefault(run.config_parts, []).append(run)
    notes = []
    for parts, members in by_parts.items():
        configs = [run.computed for run in members]
        keys = sorted(k for k in {k for c in configs for k in c}
                      if len({repr(c.get(k, "(not set)")) for c in configs}) > 1)
        if not keys:
            continue
        for run, config in zip(members, configs, strict=True):
            values = [f"{k}={config.get(k, '(not set)')}" for k in keys[:shown]]
            if len(keys) > shown:
                rest = json.dumps({k: config.get(k) for k in keys[shown:]}, default=str)
                values.append(f"+{len(keys) - shown} more keys "
                              f"#{hashlib.sha1(rest.encode()).hexdigest()[:6]}")
            run.config_values = tuple(values)
        notes.append(f"runs with the same overrides ({', '.join(parts) or 'defaults'}) computed "
                     f"different configs, shown apart: they differ in {', '.join(keys[:8])}"
                     f"{' and more' if len(keys) > 8 else ''} (a config file changed between "
                     "sweeps?)")
    return notes


def drop_repeats(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """``(kept, dropped)``: of finished runs with the same config and seed (a sweep rerun into
    new job dirs, a copy), only the newest counts. Counted twice, a repeat would pass for a
    second seed, with a spread of zero."""
    newest: dict[tuple[tuple[str, ...], str], Run] = {}
    dropped = []
    for run in runs:
        if run.status != "done" or not run.seed:
            continue
        key = (run.config_key, run.seed)
        other = newest.get(key)
        if other is None:
            newest[key] = run
            continue
        older, newer = sorted((other, run), key=_finished_at)
        newest[key] = newer
        dropped.append(older)
    gone = {id(r) for r in dropped}
    return [r for r in runs if id(r) not in gone], dropped


def _finished_at(run: Run) -> float:
    try:
        return (run.path / "status.json").stat().st_mtime
    except OSError:
        return 0.0
