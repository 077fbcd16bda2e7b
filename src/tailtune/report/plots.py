"""PNG plots of a sweep comparison (matplotlib's object API: no global pyplot state)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tailtune.report.compare import SHOTS, ConfigSummary


def _save(figure: Figure, path: Path) -> Path:
    """Laid out tight; labels too long for that (a config's many overrides) widen the image
    instead (``bbox_inches="tight"``), without matplotlib's "Tight layout not applied"."""
    FigureCanvasAgg(figure)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Tight layout not applied")
        figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _label(summary: ConfigSummary) -> str:
    return f"{summary.key} (n={summary.n})"


def balanced_accuracy_plot(summaries: list[ConfigSummary], path: Path, title: str = "") -> Path:
    """Mean test balanced accuracy per config: std over seeds as error bars, the bootstrap
    CI (test-set noise) as a grey band."""
    figure = Figure(figsize=(8, 0.35 * len(summaries) + 1.5))
    ax = figure.add_subplot()
    y = np.arange(len(summaries))
    means = [s.mean.get("bal_acc", np.nan) for s in summaries]
    for i, s in enumerate(summaries):
        if s.ci:
            ax.plot(s.ci, [i, i], color="0.75", linewidth=6, solid_capstyle="butt")
    ax.errorbar(means, y, xerr=[s.std.get("bal_acc", 0.0) for s in summaries], fmt="o",
                capsize=3, color="C0")
    ax.set_yticks(y, [_label(s) for s in summaries], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("test balanced accuracy (mean ± std over n seeds; grey: 95% BCa bootstrap CI)")
    ax.set_title(f"{title}: test balanced accuracy" if title else "test balanced accuracy",
                 fontsize=9)
    return _save(figure, path)


def class_order(summaries: list[ConfigSummary]) -> list[str]:
    """The classes with a recall, in the training data's order (``metrics.json``'s dataset);
    any a run lacks that info for after them, numbers in numeric order."""
    found = {k.split("/", 1)[1] for s in summaries for k in s.mean if k.startswith("recall/")}
    trained = next((list(run.metrics["dataset"]["class_names"]) for s in summaries
                    for run in s.runs if run.metrics.get("dataset", {}).get("class_names")), [])
    return [c for c in trained if c in found] + sorted(found.difference(trained),
                                                       key=lambda c: (len(c), c))


def recall_heatmap(summaries: list[ConfigSummary], path: Path, title: str = "") -> Path:
    """Mean per-class test recall, configs × classes."""
    classes = class_order(summaries)
    grid = np.array([[s.mean.get(f"recall/{c}", np.nan) for c in classes] for s in summaries])
    figure = Figure(figsize=(max(6, 0.4 * len(classes) + 3), 0.35 * len(summaries) + 1.5))
    ax = figure.add_subplot()
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 20 else 0,
                  fontsize=7)
    ax.set_yticks(range(len(summaries)), [_label(s) for s in summaries], fontsize=7)
    ax.set_xlabel("class (training order)")
    ax.set_title(f"{title}: mean test recall per class" if title else "mean test recall per class",
                 fontsize=9)
    figure.colorbar(image, ax=ax, label="test recall")
    return _save(figure, path)


def shot_bars(summaries: list[ConfigSummary], path: Path, title: str = "") -> Path:
    """Many / medium / few-shot accuracy per config (groups with no class are left out). Each
    bar carries its value, so an accuracy of 0 shows as a labelled tick, not as nothing."""
    shots = [s for s in SHOTS if any(s in c.mean for c in summaries)]
    figure = Figure(figsize=(8, 0.35 * len(summaries) + 1.5))
    ax = figure.add_subplot()
    y = np.arange(len(summaries))
    height = 0.8 / max(1, len(shots))
    for j, shot in enumerate(shots):
        values = np.array([c.mean.get(shot, np.nan) for c in summaries])
        bars = ax.barh(y + j * height, values, height, label=shot.replace("_acc", ""))
        colour = bars.patches[0].get_facecolor() if bars.patches else None
        zero = np.flatnonzero(values == 0)  # a bar of width 0 would not show: a sliver
        ax.barh(y[zero] + j * height, 0.008, height, color=colour)
        ax.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.2f}" for v in values],
                     padding=2, fontsize=6)
    ax.set_yticks(y + height * (len(shots) - 1) / 2, [_label(s) for s in summaries], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("test accuracy within the shot group (mean over n seeds)")
    ax.set_title(f"{title}: accuracy per shot group" if title else "accuracy per shot group",
                 fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    return _save(figure, path)
