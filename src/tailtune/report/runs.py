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

from tailtune.run_record import SEED_KEYS, is_config_override, says_how_to_run, selection_value


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
        config = self.path / "config.yaml"
        try:
            seed = (yaml.safe_load(config.read_text()) or {}).get("seed")
        except (OSError, yaml.YAMLError, AttributeError):
            seed = None
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
    return runs


def drop_repeats(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """``(kept, dropped)``: of finished runs with the same config and seed (a sweep rerun into
    new job dirs, a copy), only the newest counts. Counted twice, a repeat would pass for a
    second seed, with a spread of zero."""
    newest: dict[tuple[tuple[str, ...], str], Run] = {}
    dropped = []
    for run in runs:
        if run.status != "done" or not run.seed:
            continue
        key = (run.config_parts, run.seed)
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
