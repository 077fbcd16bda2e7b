"""scripts/plain_loop.py, the baseline a user writes: it scores the same test images that
tailtune serves, and tailtune-compare reads its runs beside tailtune's with a paired interval."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from tailtune.cli.train import train
from tailtune.report.compare import summarize
from tailtune.report.runs import find_runs

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plain_loop.py"


def test_loop_runs_compare_paired_with_tailtune_runs(smoke_cfg, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    cfg, choices = smoke_cfg("experiment=lt_plain", "trainer.limit_test_batches=1.0", "seed=1",
                             name="runs/tailtune")
    train(cfg, choices)
    loop_dir = root / "loop"
    monkeypatch.setattr(sys, "argv", ["plain_loop.py", "debug=smoke", "--epochs", "2",
                                      "--seed", "1", "--out", str(loop_dir)])
    from tailtune.imbalance.samplers import EpochSampler

    epochs, set_epoch = [], EpochSampler.set_epoch  # the loop reshuffles every epoch
    monkeypatch.setattr(EpochSampler, "set_epoch",
                        lambda self, e: epochs.append(e) or set_epoch(self, e))
    runpy.run_path(str(SCRIPT), run_name="__main__")
    assert epochs == [0, 1]

    metrics = json.loads((loop_dir / "metrics.json").read_text())
    with np.load(loop_dir / "test_predictions.npz") as saved:
        targets, probs = saved["targets"], saved["probs"]
    assert probs.shape == (len(targets), 10)  # digits
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert {"macro_f1", "few_acc", "ece"} <= set(metrics["test"])  # tailtune's metric set
    assert metrics["test"]["bal_acc"] == pytest.approx(
        balanced_accuracy_score(targets, probs.argmax(1)))

    runs = find_runs(root)
    assert sorted(r.status for r in runs) == ["done", "done"]
    summaries = {s.key: s for s in summarize(runs, n_boot=50, baseline="loop=plain")}
    loop = next(s for k, s in summaries.items() if "loop=plain" in k)
    tailtune = next(s for k, s in summaries.items() if "loop=plain" not in k)
    # Same test images (summarize raises otherwise), so the paired difference is defined.
    point, low, high = tailtune.delta
    expected = tailtune.mean["bal_acc"] - loop.mean["bal_acc"]
    assert point == pytest.approx(expected) and low <= point <= high
    assert loop.mean["wall_s"] > 0


def test_loop_scores_a_heldout_list_as_its_own_test_split(tmp_path, monkeypatch):
    # A folder with its own test/ and that split's labels.csv: the same photos read two ways
    # (the datamodule's test loader, and --heldout's files decoded as tailtune-predict does)
    # must score the same, or the loop's held-out row is not comparable with tailtune's.
    folder = tmp_path / "photos"
    maker = SCRIPT.parent / "make_photo_folder.py"
    monkeypatch.setattr(sys, "argv", ["make_photo_folder.py", str(folder), "--images", "60",
                                      "--classes", "3", "--ratio", "3", "--width", "40",
                                      "--height", "30", "--test-per-class", "4"])
    runpy.run_path(str(maker), run_name="__main__")
    out = tmp_path / "loop"
    monkeypatch.setattr(sys, "argv", ["plain_loop.py", "debug=smoke", "data=image_folder",
                                      f"data.root={folder}", "--epochs", "1", "--out", str(out),
                                      "--heldout", str(folder / "labels.csv")])
    runpy.run_path(str(SCRIPT), run_name="__main__")

    metrics = json.loads((out / "metrics.json").read_text())
    lines = (out / "heldout_predictions.csv").read_text().splitlines()
    assert lines[0] == "path,label,pred" and len(lines) == 1 + 12
    assert metrics["heldout"]["bal_acc"] == pytest.approx(metrics["test"]["bal_acc"])

    # An unreadable held-out file stops the run by name; it is not scored as a black image.
    (folder / "broken.jpg").write_bytes(b"not a jpeg")  # outside the splits tailtune reads
    listing = folder / "with_broken.csv"  # paths relative to the CSV, as in labels.csv
    listing.write_text((folder / "labels.csv").read_text() + "broken.jpg,class_00\n")
    argv = [*sys.argv[:-1], str(listing)]
    argv[argv.index("--out") + 1] = str(tmp_path / "loop_broken")
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="1 unreadable files, e.g. .*broken.jpg"):
        runpy.run_path(str(SCRIPT), run_name="__main__")


def test_heldout_delta_pairs_seeds_on_the_same_files(tmp_path, monkeypatch, capsys):
    """scripts/heldout_delta.py: per seed, other minus baseline on the same held-out files
    (rows matched by path whatever their order), the mean over seeds inside its interval."""
    import csv

    labels = ["a"] * 10 + ["b"] * 10
    def write(name: str, seed: int, wrong: int, reverse: bool = False) -> None:
        rows = [(f"/h/{i:02d}.jpg", y, ("b" if y == "a" else "a") if i < wrong else y)
                for i, y in enumerate(labels)]
        path = tmp_path / f"{name}_s{seed}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerows([("path", "label", "pred"), *(rows[::-1] if reverse else rows)])

    for seed, (base_wrong, other_wrong) in {1: (4, 2), 2: (6, 2)}.items():
        write("base", seed, base_wrong)  # class a: 6/10 and 4/10 right, b: all
        write("other", seed, other_wrong, reverse=True)  # a: 8/10 both seeds
    monkeypatch.setattr(sys, "argv", ["heldout_delta.py", str(tmp_path / "base_s*.csv"),
                                      str(tmp_path / "other_s*.csv"), "--boot", "200"])
    runpy.run_path(str(SCRIPT.parent / "heldout_delta.py"), run_name="__main__")
    out = capsys.readouterr().out
    # balanced accuracy: base 0.8 and 0.7, other 0.9 and 0.9: +10 and +20 points, mean +15
    assert "mean 0.900  delta +15.0 [" in out and "per seed +10.0, +20.0" in out


def test_loop_schedule_is_tailtunes_warmup_then_cosine():
    """The loop's lr follows the recipe's shape (warmup, then a cosine over the remaining
    steps), so neither side trains hotter; tailtune's ends at min_lr_ratio, here 0."""
    from tailtune.models.schedules import WarmupCosine

    warmup_cosine = runpy.run_path(str(SCRIPT))["warmup_cosine"]
    total, warmup = 5 * 114, 114  # Fashion-MNIST-LT: 5 epochs of 114 batches
    reference = WarmupCosine(warmup_epochs=1.0, min_lr_ratio=0.0)
    factors = [warmup_cosine(s, warmup, total) for s in range(total)]
    assert factors == pytest.approx([reference.factor(s, 0, total, warmup)
                                     for s in range(total)])
    assert factors[warmup - 1] == 1.0 and factors[warmup] == 1.0  # the peak, then the decay
    assert factors[warmup + (total - warmup) // 2] == pytest.approx(0.5)
