"""Aggregate runs per config: mean ± std over seeds, a bootstrap CI of balanced accuracy, and
against a baseline config the paired difference with its own CI."""

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
    parts: tuple[str, ...]  # the config's overrides (Run.config_key; shortened by
    runs: list[Run]         # strip_common_overrides to what differs between configs)
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    ci: tuple[float, float] | None = None
    # Each run's (targets, probs) on the test set, when all were saved.
    predictions: list[tuple[np.ndarray, np.ndarray]] | None = None
    # Seed-mean balanced accuracy minus the baseline's, with its paired 95 % CI.
    delta: tuple[float, float, float] | None = None
    is_baseline: bool = False
    val_is_test: bool = False  # a run validated on the test split: no val score to choose by

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def key(self) -> str:
        """The config's name: its overrides joined by commas."""
        return self.joined(",")

    def joined(self, sep: str) -> str:
        return sep.join(self.parts) or "(defaults)"

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
    targets, statistic, correct = _statistic(predictions)
    point = float(statistic(np.arange(len(targets))))
    if len(targets) < 2 or correct.all() or not correct.any():  # no spread to resample
        return point, point
    return _bca(statistic, len(targets), n_boot, seed, level)


def paired_difference_bootstrap(
    predictions: list[tuple[np.ndarray, np.ndarray]],
    baseline: list[tuple[np.ndarray, np.ndarray]], n_boot: int = 1000, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """``(difference, low, high)``: the seed-mean test balanced accuracy of ``predictions``
    minus that of ``baseline``, with a percentile interval from a two-level bootstrap.

    Each resample draws test images *jointly* for both configs (they were scored on the same
    images, so the luck of the test draw they share cancels: a paired comparison, narrower
    than two CIs side by side) and each config's *seeds* with replacement (training noise,
    which an image bootstrap alone leaves out; a config of one run has none to draw)."""
    targets, ours, correct = _statistic(predictions)
    base_targets, theirs, base_correct = _statistic(baseline)
    if not np.array_equal(targets, base_targets):
        raise ValueError("the config and the baseline were tested on different test sets")
    k = predictions[0][1].shape[1]
    rng = np.random.default_rng(seed)
    images = rng.integers(len(targets), size=(n_boot, len(targets)))

    def resampled_means(hits: np.ndarray) -> np.ndarray:  # [n_boot] seed-means
        per_seed = np.stack([seed_mean_balanced_accuracy(targets, row[None], k)(images)
                             for row in hits], axis=1)  # [n_boot, seeds]
        draw = rng.integers(len(hits), size=per_seed.shape)
        return np.take_along_axis(per_seed, draw, axis=1).mean(axis=1)

    whole = np.arange(len(targets))
    point = float(ours(whole) - theirs(whole))
    spread = resampled_means(correct) - resampled_means(base_correct)
    low, high = np.quantile(spread, [(1 - level) / 2, 1 - (1 - level) / 2])
    return point, float(low), float(high)


def _statistic(predictions: list[tuple[np.ndarray, np.ndarray]]
               ) -> tuple[np.ndarray, Callable[..., np.ndarray], np.ndarray]:
    """``(targets, seed-mean balanced accuracy of an index, correct[seeds, N])``."""
    targets = predictions[0][0]
    if any(len(t) != len(targets) or not np.array_equal(t, targets) for t, _ in predictions):
        raise ValueError("runs of one config were tested on different test sets")
    correct = np.stack([p.argmax(axis=1) == targets for _, p in predictions])  # [seeds, N]
    return targets, seed_mean_balanced_accuracy(
        targets, correct, predictions[0][1].shape[1]), correct


def _bca(statistic: Callable[..., np.ndarray], n: int, n_boot: int, seed: int,
         level: float) -> tuple[float, float]:
    """BCa interval of ``statistic`` over resamples of ``n`` test image indices."""
    from scipy.stats import bootstrap

    index = np.arange(n)
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


def summarize(runs: list[Run], n_boot: int = 1000, baseline: str | None = None
              ) -> list[ConfigSummary]:
    """Finished runs grouped by config (:attr:`Run.config_key`: overrides minus seed, and
    resolved values where the same overrides computed different configs), with mean, std
    and CI; with
    ``baseline`` (an override that names one config, e.g. ``experiment=lt_plain``) each other
    config's paired difference from it."""
    groups: dict[tuple[str, ...], list[Run]] = defaultdict(list)
    for run in runs:
        if run.status == "done" and run.metrics.get("test"):
            groups[run.config_key].append(run)
    summaries = []
    for parts, members in groups.items():
        summary = ConfigSummary(parts, members)
        names = sorted({k for r in members for k in r.metrics["test"]})
        for name in names:
            summary.add(name, [r.metrics["test"][name] for r in members
                               if name in r.metrics["test"]])
        walls = [r.wall_s for r in members]
        if all(w is not None for w in walls):
            summary.add("wall_s", walls)
        # Out of fold where post-hoc steps were tuned on val; none where val is the test split
        # (data.val_fraction=0): a choice made there is made on test.
        val = [r.val_score for r in members]
        summary.val_is_test = any(r.val_is_test for r in members)
        if all(v is not None for v in val) and not summary.val_is_test:
            summary.add("val_bal_acc", val)
        predictions = [p for p in map(_load_predictions, members) if p is not None]
        if len(predictions) == len(members) and predictions:
            summary.predictions = predictions
            summary.ci = balanced_accuracy_bootstrap(predictions, n_boot=n_boot)
        summaries.append(summary)
    if baseline is not None:
        _add_differences(summaries, baseline, n_boot)
    return summaries


def _add_differences(summaries: list[ConfigSummary], baseline: str, n_boot: int) -> None:
    matches = [s for s in summaries if baseline in s.parts]
    if len(matches) != 1:
        keys = "; ".join(s.key for s in summaries) or "none finished"
        raise ValueError(f"--baseline {baseline} names {len(matches)} configs, not one; "
                         f"the configs: {keys}")
    base = matches[0]
    base.is_baseline = True
    if base.predictions is None:
        raise ValueError(f"the baseline {baseline} has runs without test_predictions.npz")
    for summary in summaries:
        if summary is not base and summary.predictions is not None:
            summary.delta = paired_difference_bootstrap(summary.predictions, base.predictions,
                                                        n_boot=n_boot)


def strip_common_overrides(summaries: list[ConfigSummary]) -> list[str]:
    """Shorten keys to what differs between configs; returns the overrides all share."""
    parts = [set(s.parts) for s in summaries]
    common = sorted(set.intersection(*parts)) if len(parts) > 1 else []
    for summary, own in zip(summaries, parts, strict=True):
        summary.parts = tuple(sorted(own - set(common)))
    return common


def _fmt(summary: ConfigSummary, name: str, digits: int = 4) -> str:
    if name not in summary.mean:
        return "–"
    std = summary.std.get(name)
    return f"{summary.mean[name]:.{digits}f} ± " + ("–" if std is None else f"{std:.{digits}f}")


COLUMNS = ("bal_acc", "macro_f1", "gmean", "acc", *SHOTS, "ece")


def _delta(summary: ConfigSummary) -> str:
    if summary.is_baseline:
        return "baseline"
    if summary.delta is None:
        return "–"
    point, low, high = summary.delta
    return f"{point:+.4f} [{low:+.4f}, {high:+.4f}]"


def val_pick(summaries: list[ConfigSummary]) -> ConfigSummary | None:
    """The config with the highest mean val balanced accuracy (out of fold where a run tuned
    post-hoc steps on val, whose in-sample score would favour it): the one to choose. Test ranks
    configs too, but a choice made on test makes its own test score optimistic (the sweep's
    best of several noisy scores). None unless two or more configs have val scores."""
    best = val_best(summaries)
    return best[0] if len(best) == 1 else None


def val_best(summaries: list[ConfigSummary]) -> list[ConfigSummary]:
    """The configs sharing the highest mean val balanced accuracy (more than one: a tie);
    empty unless two or more configs have val scores, or any validated on test."""
    if any(s.val_is_test for s in summaries):
        return []
    scored = [s for s in summaries if "val_bal_acc" in s.mean]
    if len(scored) < 2:
        return []
    top = max(s.mean["val_bal_acc"] for s in scored)
    return [s for s in scored if s.mean["val_bal_acc"] == top]


PICK = " (pick)"


def table_rows(summaries: list[ConfigSummary], config_sep: str = ",") -> list[list[str]]:
    """One row per config, its overrides joined by ``config_sep``; with a baseline, a last
    column: the paired difference."""
    paired = any(s.is_baseline for s in summaries)
    pick = val_pick(summaries)
    rows = []
    for s in summaries:
        ci = f"[{s.ci[0]:.4f}, {s.ci[1]:.4f}]" if s.ci else "–"
        # The mean alone (its std is in the CSV): the column stays narrow beside the others.
        val = (f"{s.mean['val_bal_acc']:.4f}" if "val_bal_acc" in s.mean else "–") \
            + (PICK if s is pick else "")
        rows.append([s.joined(config_sep), str(s.n), *(_fmt(s, c) for c in COLUMNS), ci, val,
                     _fmt(s, "wall_s", 0), *([_delta(s)] if paired else [])])
    return rows


HEADER = ["config", "n", *(f"test {c}" for c in COLUMNS), "bal_acc 95% CI", "val bal_acc",
          "wall s"]
DELTA_HEADER = "Δ bal_acc vs baseline [paired 95% CI]"


def header(summaries: list[ConfigSummary]) -> list[str]:
    return HEADER + ([DELTA_HEADER] if any(s.is_baseline for s in summaries) else [])


def write_csv(summaries: list[ConfigSummary], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["config", "n", "seeds",
                         *(f"test_{c}_{s}" for c in COLUMNS for s in ("mean", "std")),
                         "bal_acc_ci_low", "bal_acc_ci_high", "wall_s_mean", "wall_s_std",
                         "delta_bal_acc", "delta_ci_low", "delta_ci_high",
                         "val_bal_acc_mean", "val_bal_acc_std", "val_pick"])
        pick = val_pick(summaries)
        for s in summaries:
            writer.writerow([
                s.key, s.n, " ".join(r.seed for r in s.runs),
                *(_cell(v) for c in COLUMNS for v in (s.mean.get(c), s.std.get(c))),
                *((_cell(v) for v in s.ci) if s.ci else ("", "")),
                _cell(s.mean.get("wall_s")), _cell(s.std.get("wall_s")),
                *((_cell(v) for v in s.delta) if s.delta else
                  ((0.0, 0.0, 0.0) if s.is_baseline else ("", "", ""))),
                _cell(s.mean.get("val_bal_acc")), _cell(s.std.get("val_bal_acc")),
                int(s is pick),
            ])


def _cell(value: float | None) -> str | float:
    """A CSV cell: the number, or empty where there is none (std of one run)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def pick_sentence(summaries: list[ConfigSummary]) -> str | None:
    """What validation chooses, said once under the table (Markdown and console alike)."""
    if any(s.val_is_test for s in summaries):
        return ("Runs here validated on the test split (data.val_fraction=0): there is no "
                "validation score to choose a config by, and the config best on test has an "
                "optimistic test score. Give the data a validation split to choose.")
    best = val_best(summaries)
    if len(best) > 1:
        tied = ", ".join(f"`{s.key}`" for s in best)
        return (f"Validation ties {tied} (val bal_acc {best[0].mean['val_bal_acc']:.4f}): it "
                "picks none of them; more seeds or a larger val split can separate them.")
    if not best:
        return None
    pick = best[0]
    # Where the chosen model is: what tailtune-predict (or an ensemble of the seeds) takes.
    checkpoints = [r.metrics["best_checkpoint"] for r in pick.runs
                   if r.metrics.get("best_checkpoint")]
    where = f" Its checkpoints: {', '.join(checkpoints)}." if checkpoints else ""
    return (f"Validation picks `{pick.key}` (val bal_acc {pick.mean['val_bal_acc']:.4f}, "
            f"test {pick.mean['bal_acc']:.4f}). Choose by val: its test score then estimates "
            f"how the choice does on new data; the config that is best on test does not.{where}")


def write_markdown(summaries: list[ConfigSummary], unfinished: list[Run], path: Path,
                   sort_by: str, shared: list[str] | None = None, title: str = "Sweep") -> None:
    """The table (n: runs per config; std "–" for a single run), the overrides every run
    shares (left out of the config names), and the runs that did not finish."""
    lines = [f"# {title}: comparison (sorted by test {sort_by})", ""]
    if shared:
        lines += ["Shared by all runs: " + ", ".join(f"`{o}`" for o in shared), ""]
    columns = header(summaries)
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summaries)]
    if (pick := pick_sentence(summaries)):
        lines += ["", pick]
    if not summaries:
        lines += ["", "No run finished: nothing to compare."]
    if unfinished:
        lines += ["", "## Not finished", "", "| run | status | error |", "|---|---|---|"]
        lines += [f"| {r.path.name} | {r.status} | {r.error or '–'} |" for r in unfinished]
    path.write_text("\n".join(lines) + "\n")
