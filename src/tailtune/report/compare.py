"""Aggregate runs per config: mean ± std over seeds and a bootstrap CI of balanced accuracy."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
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


def balanced_accuracy_bootstrap(
    predictions: list[tuple[np.ndarray, np.ndarray]], n_boot: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile CI of the seed-mean test balanced accuracy, resampling test *images*.

    All runs of a config share the test set, so one resample of image indices applies to
    every seed; the CI then reflects test-set noise, which seeds alone do not show.
    """
    targets = predictions[0][0]
    if any(len(t) != len(targets) or not np.array_equal(t, targets) for t, _ in predictions):
        raise ValueError("runs of one config were tested on different test sets")
    num_classes = predictions[0][1].shape[1]
    correct = np.stack([p.argmax(axis=1) == targets for _, p in predictions])  # [seeds, N]
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, len(targets), len(targets))
        y = targets[idx]
        per_class_n = np.bincount(y, minlength=num_classes)
        present = per_class_n > 0
        recalls = []
        for row in correct[:, idx]:
            hits = np.bincount(y, weights=row, minlength=num_classes)
            recalls.append((hits[present] / per_class_n[present]).mean())
        values[b] = np.mean(recalls)
    low, high = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
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
            values = [r.metrics["test"][name] for r in members if name in r.metrics["test"]]
            summary.mean[name] = float(np.mean(values))
            summary.std[name] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
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


def _fmt(summary: ConfigSummary, name: str) -> str:
    if name not in summary.mean:
        return "–"
    mean, std = summary.mean[name], summary.std.get(name, 0.0)
    return f"{mean:.4f} ± {std:.4f}" if summary.n > 1 else f"{mean:.4f}"


COLUMNS = ("bal_acc", "macro_f1", "gmean", "acc", *SHOTS, "ece")


def table_rows(summaries: list[ConfigSummary]) -> list[list[str]]:
    rows = []
    for s in summaries:
        ci = f"[{s.ci[0]:.4f}, {s.ci[1]:.4f}]" if s.ci else "–"
        rows.append([s.key, str(s.n), *(_fmt(s, c) for c in COLUMNS), ci])
    return rows


HEADER = ["config", "n", *(f"test {c}" for c in COLUMNS), "bal_acc 95% CI"]


def write_csv(summaries: list[ConfigSummary], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["config", "n", "seeds",
                         *(f"test_{c}_{s}" for c in COLUMNS for s in ("mean", "std")),
                         "bal_acc_ci_low", "bal_acc_ci_high"])
        for s in summaries:
            writer.writerow([
                s.key, s.n, " ".join(r.seed for r in s.runs),
                *(v for c in COLUMNS for v in (s.mean.get(c, math.nan), s.std.get(c, math.nan))),
                *(s.ci if s.ci else (math.nan, math.nan)),
            ])


def write_markdown(summaries: list[ConfigSummary], unfinished: list[Run], path: Path,
                   sort_by: str) -> None:
    lines = [f"# Sweep comparison (sorted by test {sort_by})", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summaries)]
    if unfinished:
        lines += ["", "## Not finished", "", "| run | status | error |", "|---|---|---|"]
        lines += [f"| {r.path.name} | {r.status} | {r.error or '–'} |" for r in unfinished]
    path.write_text("\n".join(lines) + "\n")
