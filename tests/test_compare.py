"""tailtune-compare on runs written by hand (no training): what comparison.md, the CSV and the
console say, and the confidence intervals against scipy's own BCa bootstrap."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import bootstrap
from sklearn.metrics import balanced_accuracy_score

from tailtune.cli.compare import main as compare_main
from tailtune.report.compare import (
    balanced_accuracy_bootstrap,
    paired_difference_bootstrap,
    summarize,
)
from tailtune.report.runs import drop_repeats, find_runs, tell_configs_apart

SHARED = ["debug=smoke", "data.imbalance_ratio=20"]


def _predictions(seed: int, n: int = 60, k: int = 3, right: float = 0.7):
    """Test targets (the same for every run) and probabilities with about ``right`` correct."""
    targets = np.arange(n) % k
    rng = np.random.default_rng(seed)
    predicted = np.where(rng.random(n) < right, targets, (targets + 1) % k)
    return targets, np.eye(k)[predicted] * 0.8 + 0.2 / k


def _run(root: Path, name: str, overrides: list[str], status: str = "done", seed: int = 0,
         few: float = 0.5, error: str = "", val: float | None = None,
         threads: int = 2) -> Path:
    run = root / name
    run.mkdir(parents=True)
    state = {"status": status, **({"error": error} if error else {})}
    (run / "status.json").write_text(json.dumps(state))
    if status != "done":
        return run
    targets, probs = _predictions(seed)
    bal_acc = balanced_accuracy_score(targets, probs.argmax(1))
    test = {"bal_acc": bal_acc, "macro_f1": bal_acc - 0.01, "acc": bal_acc, "ece": 0.1,
            "many_acc": 0.9, "few_acc": few, "recall/0": 0.5, "recall/1": 0.6}
    val = bal_acc if val is None else val
    (run / "metrics.json").write_text(json.dumps({"overrides": overrides, "test": test,
                                                  "val": {"bal_acc": val}}))
    np.savez_compressed(run / "test_predictions.npz", targets=targets, probs=probs,
                        class_names=np.array(["a", "b", "c"]))
    (run / "timings.json").write_text(json.dumps({"wall_s": 100.0 + 10 * seed,
                                                  "torch_threads": threads}))
    return run


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """loss=ce with seeds 1 and 2, loss=focal with one seed (few-shot accuracy 0), one failure."""
    root = tmp_path / "my_sweep"
    _run(root, "0_aa", [*SHARED, "loss=ce", "seed=1"], seed=1)
    _run(root, "1_bb", [*SHARED, "loss=ce", "seed=2"], seed=2)
    _run(root, "2_cc", [*SHARED, "loss=focal", "seed=1"], seed=3, few=0.0)
    _run(root, "3_dd", [*SHARED, "loss=ldam_drw", "seed=1"], status="failed",
         error="ValueError: model.lr must be > 0")
    return root


def test_markdown_lists_shared_overrides_and_a_single_run_has_no_std(sweep, capsys):
    compare_main([str(sweep), "--bootstrap", "200"])
    out = capsys.readouterr().out
    markdown = (sweep / "comparison.md").read_text()
    assert markdown.startswith("# my_sweep: comparison")
    assert "Shared by all runs: `data.imbalance_ratio=20`, `debug=smoke`" in markdown
    rows = {line.split(" | ")[0].lstrip("| "): line for line in markdown.splitlines()
            if line.startswith("| loss=")}
    assert set(rows) == {"loss=ce", "loss=focal"}  # the shared overrides left out of the names
    assert rows["loss=ce"].split(" | ")[1] == "2" and "± –" not in rows["loss=ce"]
    assert rows["loss=focal"].split(" | ")[1] == "1"
    assert "± –" in rows["loss=focal"] and "± 0.0000" not in rows["loss=focal"]
    assert "| 3_dd | failed | ValueError: model.lr must be > 0 |" in markdown

    with open(sweep / "comparison.csv", newline="") as handle:
        table = {row["config"]: row for row in csv.DictReader(handle)}
    assert table["loss=focal"]["test_bal_acc_std"] == ""  # no spread to report, not 0
    assert float(table["loss=ce"]["test_bal_acc_std"]) > 0
    # wall time per config, for comparisons at equal time: seeds 1, 2 took 110 s and 120 s
    assert float(table["loss=ce"]["wall_s_mean"]) == pytest.approx(115.0)
    assert rows["loss=ce"].rstrip(" |").endswith("115 ± 7")
    for name in ("comparison_bal_acc.png", "comparison_recall.png", "comparison_shots.png"):
        assert (sweep / name).stat().st_size > 0 and name in out


def test_validation_picks_the_config_not_test(tmp_path, capsys):
    """A sweep is chosen from on val: the report names val's pick (mean over seeds) even where
    test ranks another config first, in the console, the Markdown and the CSV."""
    root = tmp_path / "pick"
    _run(root, "0", ["loss=ce", "seed=1"], seed=1, val=0.80)
    _run(root, "1", ["loss=ce", "seed=2"], seed=2, val=0.90)  # ce: val mean 0.85
    _run(root, "2", ["loss=focal", "seed=1"], seed=3, val=0.84)
    for name in ("0", "1", "2"):  # where each run's model is, as a training run records it
        metrics = json.loads((root / name / "metrics.json").read_text())
        metrics["best_checkpoint"] = f"/runs/{name}/best.ckpt"
        (root / name / "metrics.json").write_text(json.dumps(metrics))
    summaries = summarize(find_runs(root), n_boot=50)
    ce, focal = (next(s for s in summaries if f"loss={n}" in s.key) for n in ("ce", "focal"))
    assert focal.mean["bal_acc"] > ce.mean["bal_acc"]  # test prefers focal, val does not
    assert ce.mean["val_bal_acc"] == pytest.approx(0.85)

    compare_main([str(root), "--bootstrap", "50"])
    out = capsys.readouterr().out
    markdown = (root / "comparison.md").read_text()
    for text in (out, markdown):
        assert "Validation picks `loss=ce` (val bal_acc 0.8500" in text
        assert "Its checkpoints: /runs/0/best.ckpt, /runs/1/best.ckpt." in text  # ce's, not focal's
    row = next(line for line in markdown.splitlines() if line.startswith("| loss=ce |"))
    assert "| 0.8500 (pick) |" in row
    assert "(pick)" not in next(line for line in markdown.splitlines()
                                      if line.startswith("| loss=focal |"))
    with open(root / "comparison.csv", newline="") as handle:
        table = {r["config"]: r for r in csv.DictReader(handle)}
    assert (table["loss=ce"]["val_pick"], table["loss=focal"]["val_pick"]) == ("1", "0")
    assert float(table["loss=focal"]["val_bal_acc_mean"]) == pytest.approx(0.84)
    assert float(table["loss=ce"]["val_bal_acc_std"]) == pytest.approx(0.0707, abs=1e-4)


def test_a_tie_on_validation_picks_nothing(tmp_path, capsys):
    root = tmp_path / "tie"
    _run(root, "0", ["loss=ce", "seed=1"], seed=1, val=0.85)
    _run(root, "1", ["loss=focal", "seed=1"], seed=3, val=0.85)
    _run(root, "2", ["loss=ldam_drw", "seed=1"], seed=2, val=0.80)
    compare_main([str(root), "--bootstrap", "50"])
    out = capsys.readouterr().out
    assert "Validation ties `loss=focal`, `loss=ce`" in out or \
        "Validation ties `loss=ce`, `loss=focal`" in out
    assert "(pick)" not in (root / "comparison.md").read_text()
    with open(root / "comparison.csv", newline="") as handle:
        assert {r["val_pick"] for r in csv.DictReader(handle)} == {"0"}


def test_how_a_run_was_run_does_not_split_a_config(tmp_path):
    """A sweep rerun with resume=auto (or on another launcher or thread count) adds those
    overrides to the runs it finishes; they are still the config the other seeds ran."""
    root = tmp_path / "resumed"
    _run(root, "0", ["loss=ce", "seed=1"], seed=1)
    _run(root, "1", ["loss=ce", "seed=2", "resume=auto", "threads=1", "launcher=joblib",
                     "hydra.sweep.dir=x", "paths.cache_dir=/tmp/c"], seed=2)
    _run(root, "2", ["loss=ce", "seed=3", "ckpt_path=/other/last.ckpt"], seed=3)  # a warm start
    _run(root, "3", ["loss=focal", "seed=4", "loss=ce"], seed=4)  # the last value counts
    summaries = {s.key: s.n for s in summarize(find_runs(root), n_boot=20)}
    assert summaries == {"loss=ce": 3, "ckpt_path=/other/last.ckpt,loss=ce": 1}


def test_runs_with_the_same_overrides_on_other_data_are_other_configs(tmp_path, capsys):
    """A config file edited between sweeps (configs/local/default.yaml, TAILTUNE_CONFIG_DIR)
    leaves the overrides alike: grouped by them alone, two datasets' runs were averaged
    into one row, and the same seed on the other dataset was dropped as a repeat."""
    import os

    def run(sweep: str, seed: int, ratio: int, output: str) -> Path:
        path = _run(tmp_path / sweep, f"{seed}_x", ["loss=ce", f"seed={seed}"], seed=seed)
        (path / "config.yaml").write_text(
            f"seed: {seed}\nthreads: {seed}\ndata:\n  imbalance_ratio: {ratio}\n"
            f"logger:\n  save_dir: {output}\npaths:\n  output_dir: {output}\n")
        os.utime(path / "status.json", (1_000 * seed + ratio, 1_000 * seed + ratio))
        return path

    run("a", 1, 10, "/a/1")
    run("b", 1, 2, "/b/1")
    run("b", 2, 2, "/b/2")  # another seed, thread count and output dir: the same config
    runs = [r for sweep in ("a", "b") for r in find_runs(tmp_path / sweep)]
    notes = tell_configs_apart(runs)
    kept, repeats = drop_repeats(runs)
    assert not repeats and len(notes) == 1 and "data.imbalance_ratio" in notes[0]
    groups = {s.key: s.n for s in summarize(kept, n_boot=20)}
    assert groups == {"loss=ce,data.imbalance_ratio=10": 1, "loss=ce,data.imbalance_ratio=2": 2}
    compare_main([str(tmp_path / "a"), str(tmp_path / "b"), "--bootstrap", "20"])
    out = capsys.readouterr().out
    assert "2 configs, 3 runs" in out and "different configs:" in out
    assert "repeat, not counted" not in out


def test_a_repeat_counts_once_and_eval_dirs_not_at_all(tmp_path, capsys):
    """A sweep rerun into new dirs repeats a config and seed: counted twice it would pass
    for a second seed with zero spread. A run resumed in place (ckpt_path=auto) is its
    config's; an eval dir re-scores a run's checkpoint and is no run of its own."""
    import os

    root = tmp_path / "rerun"
    old = _run(root, "0_old", ["loss=ce", "seed=1"], seed=1)
    new = _run(root, "0_new", ["loss=ce", "seed=1", "threads=1"], seed=1)
    os.utime(old / "status.json", (1_000, 1_000))
    os.utime(new / "status.json", (2_000, 2_000))
    _run(root, "1", ["loss=ce", "seed=2", "ckpt_path=auto"], seed=2)
    scored = _run(root, "eval", ["ckpt_path=/x/best.ckpt"], seed=1)
    (scored / "run.json").write_text(json.dumps({"entry": "eval", "ckpt_path": "/x/best.ckpt"}))
    # A sweep without seed= overrides, run twice: the seed is the one the runs recorded.
    for name, when in (("2_first", 3_000), ("2_again", 4_000)):
        run = _run(root, name, ["loss=focal"], seed=3)
        (run / "config.yaml").write_text("seed: 7\nmodel:\n  lr: 0.001\n")
        os.utime(run / "status.json", (when, when))
    runs, repeats = drop_repeats(find_runs(root))
    assert sorted(r.path.name for r in repeats) == ["0_old", "2_first"]
    assert {s.key: s.n for s in summarize(runs, n_boot=20)} == {"loss=ce": 2, "loss=focal": 1}
    compare_main([str(root), "--bootstrap", "50"])
    out = capsys.readouterr().out
    assert "2 configs, 3 runs" in out and "repeat, not counted" in out and "0_old" in out


def test_an_override_whose_value_holds_commas_stays_whole(tmp_path, capsys):
    root = tmp_path / "lists"
    for seed in (1, 2):
        _run(root, f"a{seed}", [*SHARED, "model.posthoc=[logit_adjust,bias]", f"seed={seed}"],
             seed=seed)
        _run(root, f"b{seed}", [*SHARED, "model.posthoc=[temperature,bias]", f"seed={seed}"],
             seed=seed + 5)
    compare_main([str(root), "--bootstrap", "50", "--baseline",
                  "model.posthoc=[logit_adjust,bias]"])
    with open(root / "comparison.csv", newline="") as handle:
        rows = {row["config"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"model.posthoc=[logit_adjust,bias]", "model.posthoc=[temperature,bias]"}
    assert rows["model.posthoc=[temperature,bias]"]["delta_bal_acc"] != ""
    assert "Shared by all runs: `data.imbalance_ratio=20`, `debug=smoke`\n" in \
        (root / "comparison.md").read_text()
    out = capsys.readouterr().out  # printed as text, not read as rich markup
    assert "model.posthoc=[temperature,bias]" in out and "[paired 95% CI]" in out


def test_validation_picks_on_the_out_of_fold_score_of_tuned_runs(tmp_path, capsys):
    """A per-class bias tuned on val scores high on the images it was tuned on; its run
    records the out-of-fold score too, and the pick (and the column) read that one."""
    root = tmp_path / "tuned"
    _run(root, "0", ["model.posthoc=bias", "seed=1"], seed=1, val=0.95)
    _run(root, "1", ["model.posthoc=none", "seed=1"], seed=2, val=0.90)
    metrics = json.loads((root / "0" / "metrics.json").read_text())
    metrics["val"]["bal_acc_out_of_fold"] = 0.86
    (root / "0" / "metrics.json").write_text(json.dumps(metrics))
    compare_main([str(root), "--bootstrap", "50"])
    assert "Validation picks `model.posthoc=none` (val bal_acc 0.9000" in capsys.readouterr().out
    with open(root / "comparison.csv", newline="") as handle:
        rows = {row["config"]: row for row in csv.DictReader(handle)}
    assert float(rows["model.posthoc=bias"]["val_bal_acc_mean"]) == pytest.approx(0.86)


def test_runs_validated_on_test_offer_no_pick(tmp_path, capsys):
    root = tmp_path / "val_is_test"
    for name, loss, val in (("0", "ce", 0.9), ("1", "focal", 0.8)):
        _run(root, name, [f"loss={loss}", "seed=1", "data.val_fraction=0"], seed=1, val=val)
        metrics = json.loads((root / name / "metrics.json").read_text())
        metrics["dataset"] = {"val_is_test": True}
        (root / name / "metrics.json").write_text(json.dumps(metrics))
    compare_main([str(root), "--bootstrap", "50"])
    out = capsys.readouterr().out
    assert "validated on the test split" in out and "Validation picks" not in out
    assert "(pick)" not in (root / "comparison.md").read_text()


def test_a_resumed_run_has_no_wall_time_to_compare(tmp_path):
    """Its earlier processes' time is unknown: the config's wall time is "–", not the last
    stretch's (timings.json of a resumed run, tailtune.run_record)."""
    root = tmp_path / "wall"
    _run(root, "0", ["loss=ce", "seed=1"], seed=1)
    _run(root, "1", ["loss=ce", "seed=2"], seed=2)
    (root / "1" / "timings.json").write_text(json.dumps(
        {"wall_s_since_resume": 12.0, "resumed_from": "last.ckpt"}))
    (summary,) = summarize(find_runs(root), n_boot=20)
    assert "wall_s" not in summary.mean


def test_console_table_keeps_numbers_and_overrides_whole(tmp_path, capsys):
    """Long override names (a recipe with five switches) once folded every cell mid-number in
    a log file; each override and each mean ± std must read on one line."""
    root = tmp_path / "long"
    recipe = ["experiment=lt_recipe", "loss.label_smoothing=0", "model.probe_epochs=10",
              "model.unfreeze_at=0", "trainer.max_epochs=4"]
    for seed in (1, 2):
        _run(root, f"{seed}_r", [*SHARED, *recipe, f"seed={seed}"], seed=seed)
        _run(root, f"{seed}_p", [*SHARED, "experiment=lt_plain", f"seed={seed}"], seed=seed + 5)
    # With --baseline the paired column makes the table wider than 160 characters; piped,
    # it once squeezed the config column to nothing and cut the intervals short.
    compare_main([str(root), "--bootstrap", "100", "--baseline", "experiment=lt_plain"])
    lines = capsys.readouterr().out.splitlines()
    for override in [*recipe, "experiment=lt_plain"]:
        assert any(override in line for line in lines), override
    with open(root / "comparison.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        mean, low = float(row["test_bal_acc_mean"]), float(row["bal_acc_ci_low"])
        assert any(f"{mean:.4f} ± " in line and f"[{low:.4f}, " in line for line in lines)
        if "experiment=lt_plain" not in row["config"]:  # the baseline's cell says so
            delta = f"{float(row['delta_bal_acc']):+.4f} [{float(row['delta_ci_low']):+.4f}, " \
                    f"{float(row['delta_ci_high']):+.4f}]"
            assert any(delta in line for line in lines), delta


def test_a_narrow_terminal_loses_optional_columns_not_digits():
    """In a terminal too narrow for every column, the optional ones go (and are named), and
    what stays prints whole: the config's overrides, the means and the paired interval."""
    from rich.console import Console

    from tailtune.cli.compare import OPTIONAL, fitted_table
    from tailtune.report.compare import DELTA_HEADER, HEADER

    columns = [*HEADER, DELTA_HEADER]
    row = ["ablation=head_first\nexperiment=lt_recipe", "3", *(["0.8287 ± 0.0023"] * 8),
           "[0.8069, 0.8474]", "0.8509 (pick)", "461 ± 10", "+0.0093 [-0.0072, +0.0269]"]
    console = Console(force_terminal=True, width=120, record=True)
    table, left_out = fitted_table("t", columns, [row], console)
    console.print(table)
    text = console.export_text()
    assert left_out and set(left_out) <= set(OPTIONAL)
    assert left_out == list(OPTIONAL[:len(left_out)])  # in OPTIONAL's order
    assert all(len(line) <= 120 for line in text.splitlines())
    for cell in ["ablation=head_first", "experiment=lt_recipe", "0.8287 ± 0.0023",
                 "0.8509 (pick)", "+0.0093 [-0.0072, +0.0269]"]:
        assert cell in text, cell
    wide = Console(force_terminal=True, width=250, record=True)
    assert fitted_table("t", columns, [row], wide)[1] == []  # room: nothing left out


def test_only_failed_runs_write_no_plots_and_say_so(tmp_path, capsys):
    root = tmp_path / "broken"
    _run(root, "0_aa", ["loss=ce"], status="failed", error="RuntimeError: NaN loss")
    _run(root, "1_bb", ["loss=focal"], status="failed", error="RuntimeError: NaN loss")
    compare_main([str(root)])
    out = capsys.readouterr().out
    assert not list(root.glob("*.png")) and ".png" not in out
    assert "nothing to plot" in out
    assert "No run finished" in (root / "comparison.md").read_text()


def test_single_run_configs_store_no_std(sweep):
    summaries = {s.key: s for s in summarize(find_runs(sweep), n_boot=100)}
    focal = next(s for key, s in summaries.items() if "loss=focal" in key)
    assert focal.n == 1 and "bal_acc" in focal.mean and "bal_acc" not in focal.std


def test_bca_interval_equals_scipy_on_a_known_sample():
    targets, probs = _predictions(seed=7, n=90)
    ours = balanced_accuracy_bootstrap([(targets, probs)], n_boot=500, seed=3)

    predicted = probs.argmax(1)
    reference = bootstrap(
        (targets, predicted), lambda t, p: balanced_accuracy_score(t, p), paired=True,
        vectorized=False, n_resamples=500, method="BCa", batch=256,
        rng=np.random.default_rng(3)).confidence_interval
    assert ours == pytest.approx((reference.low, reference.high), abs=1e-12)
    point = balanced_accuracy_score(targets, predicted)
    assert ours[0] < point < ours[1]


def test_bca_interval_of_all_equal_resamples_is_the_value_not_nan():
    targets, probs = _predictions(seed=0, right=1.0)  # every image right: every resample 1.0
    assert balanced_accuracy_bootstrap([(targets, probs)], n_boot=100) == (1.0, 1.0)


# -- the paired difference from a baseline ------------------------------------------------
def _fixed(targets: np.ndarray, k: int = 3) -> np.ndarray:
    return np.eye(k)[targets] * 0.8 + 0.2 / k


def test_paired_difference_is_the_difference_of_seed_means_and_zero_against_itself():
    a = [_predictions(seed) for seed in (1, 2)]
    b = [_predictions(seed) for seed in (5, 6, 7)]
    point, low, high = paired_difference_bootstrap(a, b, n_boot=200)
    want = np.mean([balanced_accuracy_score(t, p.argmax(1)) for t, p in a]) \
        - np.mean([balanced_accuracy_score(t, p.argmax(1)) for t, p in b])
    assert point == pytest.approx(want, abs=1e-12) and low < point < high
    assert paired_difference_bootstrap(a[:1], a[:1], n_boot=200) == (0.0, 0.0, 0.0)


def test_pairing_resolves_a_difference_that_two_overlapping_cis_cannot():
    """The same images are hard for both configs: B fixes 12 of A's 90 errors and breaks
    none. Each CI alone is wide; the paired difference's excludes 0."""
    targets, probs = _predictions(seed=7, n=300, right=0.7)
    wrong = np.flatnonzero(probs.argmax(1) != targets)
    better = probs.copy()
    better[wrong[:12]] = _fixed(targets[wrong[:12]])
    alone_a = balanced_accuracy_bootstrap([(targets, probs)], n_boot=300)
    alone_b = balanced_accuracy_bootstrap([(targets, better)], n_boot=300)
    assert alone_b[0] < alone_a[1]  # the two CIs overlap
    point, low, high = paired_difference_bootstrap([(targets, better)], [(targets, probs)],
                                                   n_boot=300)
    assert point == pytest.approx(12 / 300, abs=0.01) and low > 0


def test_seed_noise_widens_the_difference_interval():
    targets, steady = _predictions(seed=1, n=300)
    _, lucky = _predictions(seed=2, n=300, right=0.95)
    config = [_predictions(seed=3, n=300)]
    one_kind = paired_difference_bootstrap(config, [(targets, steady)] * 2, n_boot=400)
    mixed = paired_difference_bootstrap(config, [(targets, steady), (targets, lucky)],
                                        n_boot=400)
    assert mixed[2] - mixed[1] > 1.5 * (one_kind[2] - one_kind[1])


def test_baseline_option_adds_the_paired_column_and_refuses_an_unknown_one(sweep, capsys):
    compare_main([str(sweep), "--bootstrap", "100", "--baseline", "loss=ce"])
    out = capsys.readouterr().out
    assert "vs baseline" in out and "baseline" in out
    with open(sweep / "comparison.csv", newline="") as handle:
        rows = {row["config"]: row for row in csv.DictReader(handle)}
    focal = next(row for key, row in rows.items() if "loss=focal" in key)
    ce = next(row for key, row in rows.items() if "loss=ce" in key)
    assert float(focal["delta_bal_acc"]) == pytest.approx(
        float(focal["test_bal_acc_mean"]) - float(ce["test_bal_acc_mean"]), abs=1e-9)
    assert float(focal["delta_ci_low"]) <= float(focal["delta_bal_acc"]) \
        <= float(focal["delta_ci_high"])
    assert "vs baseline" in (sweep / "comparison.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        compare_main([str(sweep), "--baseline", "loss=nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "loss=nope" in err and "loss=focal" in err


def test_the_recall_heatmap_lists_classes_in_training_order():
    """Named classes (Fashion-MNIST's "Ankle boot" last) keep the data's order, not the
    order of their names' lengths; runs without dataset info fall back to numeric order."""
    from tailtune.report.compare import ConfigSummary
    from tailtune.report.plots import class_order
    from tailtune.report.runs import Run

    names = ["T-shirt", "Trouser", "Ankle boot"]
    run = Run(Path("r"), "done", metrics={"dataset": {"class_names": names}})
    summary = ConfigSummary("k", [run], mean={f"recall/{c}": 0.5 for c in names})
    assert class_order([summary]) == names
    bare = ConfigSummary("k", [Run(Path("r"), "done")],
                         mean={f"recall/{c}": 0.5 for c in ("10", "2", "1")})
    assert class_order([bare]) == ["1", "2", "10"]


def test_runs_at_different_thread_counts_are_named(tmp_path, capsys):
    """On a CPU, torch's thread count alone moved the default run's test balanced accuracy
    from 0.886 to 0.928: a comparison across thread counts says so."""
    root = tmp_path / "mixed"
    _run(root, "0", ["loss=ce", "seed=1"], seed=1, threads=1)
    _run(root, "1", ["loss=focal", "seed=1"], seed=1, threads=2)
    compare_main([str(root), "--bootstrap", "50"])
    assert "runs used different torch thread counts ([1, 2])" in capsys.readouterr().out
    same = tmp_path / "same"
    _run(same, "0", ["loss=ce", "seed=1"], seed=1)
    _run(same, "1", ["loss=focal", "seed=1"], seed=1)
    compare_main([str(same), "--bootstrap", "50"])
    assert "thread counts" not in capsys.readouterr().out


def test_an_unknown_sort_metric_is_refused_naming_the_valid_ones(sweep, capsys):
    """--sort-by bal_accc sorted every row as a tie, under a title that named it."""
    with pytest.raises(SystemExit) as exit_info:
        compare_main([str(sweep), "--bootstrap", "100", "--sort-by", "bal_accc"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--sort-by bal_accc is not a test metric of these runs; did you mean bal_acc?" in err
    assert "macro_f1" in err
    compare_main([str(sweep), "--bootstrap", "100", "--sort-by", "macro_f1"])
    assert "sorted by test macro_f1" in capsys.readouterr().out
