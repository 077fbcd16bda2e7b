"""Paired differences in balanced accuracy on a held-out labelled file list, with a
stratified bootstrap: how the README's held-out photo tables were computed.

Each config is a glob of prediction CSVs (``path,label,pred``, as ``tailtune-predict
output=`` and ``scripts/plain_loop.py --heldout`` write them), one per seed; the seed is read
from ``_s<N>`` in each path. For every other config against the first (the baseline), over
the seeds both have: the mean over seeds of its balanced accuracy minus the baseline's, with a
95 % interval from resampling held-out images within each class (the held-out list is
balanced by design, so its class counts stay fixed), the same draws for every run.

    python scripts/heldout_delta.py 'logs/runs/loop15_s*/heldout_predictions.csv' \\
        'preds/recipe_s*.csv' 'preds/head_first_s*.csv'
"""

from __future__ import annotations

import argparse
import csv
import glob
import re

import numpy as np


def load(pattern: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{seed: (labels, predictions)}`` of the CSVs the glob matches, rows in path order."""
    runs = {}
    for path in sorted(glob.glob(pattern)):
        seed = re.findall(r"_s(\d+)", path)
        if not seed:
            raise SystemExit(f"heldout_delta: no _s<seed> in {path}")
        with open(path, newline="") as handle:
            rows = sorted(csv.DictReader(handle), key=lambda row: row["path"])
        runs[seed[-1]] = (np.array([r["label"] for r in rows]),
                          np.array([r["pred"] for r in rows]))
    if not runs:
        raise SystemExit(f"heldout_delta: {pattern} matches no file")
    return runs


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray, index: np.ndarray) -> float:
    y, p = labels[index], preds[index]
    return float(np.mean([np.mean(p[y == c] == c) for c in np.unique(y)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", help="glob of the baseline's per-seed CSVs")
    parser.add_argument("others", nargs="+", help="globs of the configs to compare")
    parser.add_argument("--boot", type=int, default=1000)
    args = parser.parse_args()
    base = load(args.baseline)
    labels = next(iter(base.values()))[0]
    rng = np.random.default_rng(0)
    strata = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    draws = [np.concatenate([rng.choice(s, len(s)) for s in strata]) for _ in range(args.boot)]
    whole = np.arange(len(labels))
    base_mean = np.mean([balanced_accuracy(*run, whole) for run in base.values()])
    print(f"baseline {args.baseline}: mean {base_mean:.3f} over seeds {','.join(sorted(base))}")
    for pattern in args.others:
        other = load(pattern)
        seeds = sorted(set(base) & set(other))
        if not seeds:
            raise SystemExit(f"heldout_delta: {pattern} shares no seed with the baseline")
        for seed in seeds:
            if not np.array_equal(other[seed][0], labels):
                raise SystemExit(f"heldout_delta: {pattern} seed {seed} scored other files")

        def deltas(index: np.ndarray, other=other, seeds=seeds) -> list[float]:
            return [balanced_accuracy(*other[s], index) - balanced_accuracy(*base[s], index)
                    for s in seeds]

        boot = np.array([np.mean(deltas(d)) for d in draws])
        low, high = np.percentile(boot, [2.5, 97.5])
        mean = np.mean([balanced_accuracy(*other[s], whole) for s in seeds])
        per_seed = ", ".join(f"{100 * d:+.1f}" for d in deltas(whole))
        print(f"{pattern}: seeds {','.join(seeds)} mean {mean:.3f}  "
              f"delta {100 * np.mean(deltas(whole)):+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]  "
              f"per seed {per_seed}")


if __name__ == "__main__":
    main()
