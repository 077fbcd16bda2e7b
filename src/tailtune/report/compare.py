"""Aggregate runs per config: mean ± std over seeds and a bootstrap CI of balanced accuracy."""

from __future__ import annotations

import csv
import math
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tailtune.report.runs import Run

SHOTS = ("many_acc", "medium_acc", "few_acc")


@dataclass
class ConfigSummary:
    key: str
    runs: list[Run]
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    ci: tuple[float, float] | None = None

    @property
    def n(self) -> int:
        return len(self.runs)

    def add(self, name: str, values: list[float]) -> None:
        """Mean and sample std of ``name`` over the runs; one run has no spread: "–", not 0."""
        self.mean[name] = float(np.mean(values))
        if len(values) > 1:
            self.std[name] = float(np.std(values, ddof=1))


def seed_mean_balanced_accuracy(targets: np.ndarray, correct: np.ndarray, num_classes: int
                                ) -> Callable[..., np.ndarray]:
    """The statistic the CI is of: for index arrays ``[..., N]`` into the test images, the
    mean over seeds of the balanced accuracy (macro recall over the classes present) of the
    indexed images. ``correct``: ``[seeds, N]`` booleans."""

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        index = np.moveaxis(np.asarray(index), axis, -1)
        rows = index.reshape(-1, index.shape[-1])
        cells = (np.arange(len(rows))[:, None] * num_classes + targets[rows]).ravel()
        size = len(rows) * num_classes
        counts = np.bincount(cells, minlength=size).reshape(len(rows), num_classes)
        present = counts > 0
        total = np.zeros(len(rows))
        for hit in correct:
            hits = np.bincount(cells, weights=hit[rows].ravel(), minlength=size)
            recall = np.where(present, hits.reshape(counts.shape) / np.maximum(counts, 1), 0.0)
            total += recall.sum(axis=1) / present.sum(axis=1)
        return (total / len(correct)).reshape(index.shape[:-1])

    return statistic


def balanced_accuracy_bootstrap(
    predictions: list[tuple[np.ndarray, np.ndarray]], n_boot: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """BCa confidence interval (``scipy.stats.bootstrap``) of the seed-mean test balanced
    accuracy, resampling test *images*.

    All runs of a config share the test set, so one resample of image indices applies to
    every seed; the CI then reflects test-set noise, which seeds alone do not show. When
    every resample gives the same value (e.g. all images right), the interval is that value.
    """
    from scipy.stats import bootstrap

    targets = predictions[0][0]
    if any(len(t) != len(targets) or not np.array_equal(t, targets) for t, _ in predictions):
        raise ValueError("runs of one config were tested on different test sets")
    correct = np.stack([p.argmax(axis=1) == targets for _, p in predictions])  # [seeds, N]
    statistic = seed_mean_balanced_accuracy(targets, correct, predictions[0][1].shape[1])
    index = np.arange(len(targets))
    point = float(statistic(index))
    if len(targets) < 2 or correct.all() or not correct.any():  # no spread to resample
        return point, point
    with warnings.catch_warnings():  # a degenerate distribution is handled below
        warnings.simplefilter("ignore")
        result = bootstrap((index,), statistic, n_resamples=n_boot, confidence_level=level,
                           method="BCa", vectorized=True, batch=256,
                           rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    if np.isfinite(low) and np.isfinite(high):
        return float(low), float(high)
    spread = result.bootstrap_distribution
    if np.ptp(spread) == 0:  # all resamples equal: BCa is undefined, the CI is that value
        return float(spread[0]), float(spread[0])
    low, high = np.quantile(spread, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)


def _load_predictions(run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    path = run.path / "test_predictions.npz"
    if not path.is_file():
        return None
    with np.load(path) as data:
        return data["targets"], data["probs"]


def summarize(runs: list[Run], n_boot: int = 1000) -> list[ConfigSummary]:
    """Finished runs grouped by config (overrides minus seed), with mean, std and CI."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.status == "done" and run.metrics.get("test"):
            groups[run.config_key].append(run)
    summaries = []
    for key, members in groups.items():
        summary = ConfigSummary(key, members)
        names = sorted({k for r in members for k in r.metrics["test"]})
        for name in names:
            summary.add(name, [r.metrics["test"][name] for r in members
                               if name in r.metrics["test"]])
        walls = [r.wall_s for r in members]
        if all(w is not None for w in walls):
            summary.add("wall_s", walls)
        val = [r.metrics.get("val", {}).get("bal_acc") for r in members]
        if all(v is not None for v in val):
            summary.mean["val_bal_acc"] = float(np.mean(val))
        predictions = [p for p in map(_load_predictions, members) if p is not None]
        if len(predictions) == len(members) and predictions:
            summary.ci = balanced_accuracy_bootstrap(predictions, n_boot=n_boot)
        summaries.append(summary)
    return summaries


def strip_common_overrides(summaries: list[ConfigSummary]) -> list[str]:
    """Shorten keys to what differs between configs; returns the overrides all share."""
    parts = [set(s.key.split(",")) for s in summaries]
    common = sorted(set.intersection(*parts)) if len(parts) > 1 else []
    for summary, own in zip(summaries, parts, strict=True):
        summary.key = ",".join(sorted(own - set(common))) or "(defaults)"
    return common


def _fmt(summary: ConfigSummary, name: str, digits: int = 4) -> str:
    if name not in summary.mean:
        return "–"
    std = summary.std.get(name)
    return f"{summary.mean[name]:.{digits}f} ± " + ("–" if std is None else f"{std:.{digits}f}")


COLUMNS = ("bal_acc", "macro_f1", "gmean", "acc", *SHOTS, "ece")


def table_rows(summaries: list[ConfigSummary]) -> list[list[str]]:
    rows = []
    for s in summaries:
        ci = f"[{s.ci[0]:.4f}, {s.ci[1]:.4f}]" if s.ci else "–"
        rows.append([s.key, str(s.n), *(_fmt(s, c) for c in COLUMNS), ci, _fmt(s, "wall_s", 0)])
    return rows


HEADER = ["config", "n", *(f"test {c}" for c in COLUMNS), "bal_acc 95% CI", "wall s"]


def write_csv(summaries: list[ConfigSummary], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["config", "n", "seeds",
                         *(f"test_{c}_{s}" for c in COLUMNS for s in ("mean", "std")),
                         "bal_acc_ci_low", "bal_acc_ci_high", "wall_s_mean", "wall_s_std"])
        for s in summaries:
            writer.writerow([
                s.key, s.n, " ".join(r.seed for r in s.runs),
                *(_cell(v) for c in COLUMNS for v in (s.mean.get(c), s.std.get(c))),
                *((_cell(v) for v in s.ci) if s.ci else ("", "")),
                _cell(s.mean.get("wall_s")), _cell(s.std.get("wall_s")),
            ])


def _cell(value: float | None) -> str | float:
    """A CSV cell: the number, or empty where there is none (std of one run)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def write_markdown(summaries: list[ConfigSummary], unfinished: list[Run], path: Path,
                   sort_by: str, shared: list[str] | None = None, title: str = "Sweep") -> None:
    """The table (n: runs per config; std "–" for a single run), the overrides every run
    shares (left out of the config names), and the runs that did not finish."""
    lines = [f"# {title}: comparison (sorted by test {sort_by})", ""]
    if shared:
        lines += ["Shared by all runs: " + ", ".join(f"`{o}`" for o in shared), ""]
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summaries)]
    if not summaries:
        lines += ["", "No run finished: nothing to compare."]
    if unfinished:
        lines += ["", "## Not finished", "", "| run | status | error |", "|---|---|---|"]
        lines += [f"| {r.path.name} | {r.status} | {r.error or '–'} |" for r in unfinished]
    path.write_text("\n".join(lines) + "\n")
