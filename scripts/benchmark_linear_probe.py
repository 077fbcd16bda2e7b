"""How much the feature cache buys: a linear probe with cached features vs. the backbone run
every step, plus the cost of a sampler x loss sweep of probes on a warm cache.

    .venv/bin/python scripts/benchmark_linear_probe.py [--epochs 30] [--repeats 3]
        [--sizes default 128] [--no-sweep] [--out DIR]

Every run goes through ``tailtune.cli.train.train`` with the default config (data digits_lt,
lite0, default callbacks and TensorBoard logger; only the progress bar is off), so the times
include what a user pays: set-up, checkpoints, metrics, test. Cached and uncached runs
alternate (interleaved repeats), and medians are reported. The cached runs share one cache
dir: the first is cold (it extracts), the others read the cache; the cold time is printed
too. Both modes train on the same batches (``model.features.batch_size`` follows
``data.batch_size``), so their test metrics agree up to float rounding of the features
(a conv batch of 128 vs 32 images).
"""

from __future__ import annotations

import os

# torch and scikit-learn each bring an OpenMP runtime; spin-waiting pools stall on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import itertools
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
SAMPLERS = ("none", "class_balanced", "over", "smote")
LOSSES = ("ce", "weighted_ce", "focal", "balanced_softmax", "logit_adjusted")
METRICS = ("bal_acc", "acc", "macro_f1")


def compose_run(overrides: list[str], run_dir: Path, cache_dir: Path) -> tuple[DictConfig, dict]:
    from tailtune.cli.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg.hydra
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.cache_dir = str(cache_dir)
    return cfg, choices


def timed_run(overrides: list[str], root: Path, cache_dir: Path) -> dict[str, Any]:
    from tailtune.cli.train import train

    run_dir = Path(tempfile.mkdtemp(dir=root, prefix="run-"))
    cfg, choices = compose_run(overrides, run_dir, cache_dir)
    started = time.perf_counter()
    train(cfg, choices)
    seconds = time.perf_counter() - started
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"seconds": seconds, "test": {k: metrics["test"][k] for k in METRICS},
            "val_bal_acc": metrics["val"]["bal_acc"]}


def compare(size: str, epochs: int, repeats: int, root: Path) -> dict[str, Any]:
    base = ["model=linear_probe", f"trainer.max_epochs={epochs}",
            "trainer.enable_progress_bar=false"]
    if size != "default":
        base.append(f"backbone.image_size={size}")
    cache_dir = root / f"cache-{size}"
    runs: dict[str, list[dict[str, Any]]] = {"cached": [], "uncached": []}
    for repeat in range(repeats):  # interleaved, so drifts in machine load hit both alike
        for mode in ("cached", "uncached"):
            flag = "true" if mode == "cached" else "false"
            result = timed_run([*base, f"model.features.cache={flag}"], root, cache_dir)
            runs[mode].append(result)
            print(f"  {size:>7} px  repeat {repeat + 1}/{repeats}  {mode:8s} "
                  f"{result['seconds']:7.1f} s  test bal_acc {result['test']['bal_acc']:.4f}",
                  flush=True)
    warm = [r["seconds"] for r in runs["cached"][1:]] or [runs["cached"][0]["seconds"]]
    cached = statistics.median(warm)
    uncached = statistics.median(r["seconds"] for r in runs["uncached"])
    first = runs["cached"][0]["test"]
    agree = all(abs(r["test"][k] - first[k]) < 1e-9 for r in runs["cached"] + runs["uncached"]
                for k in METRICS)
    worst = max(abs(r["test"][k] - first[k]) for r in runs["uncached"] for k in METRICS)
    return {"size": size, "cached_cold_s": runs["cached"][0]["seconds"], "cached_s": cached,
            "uncached_s": uncached, "speedup": uncached / cached,
            "speedup_cold": uncached / runs["cached"][0]["seconds"],
            "test_cached": first, "test_uncached": runs["uncached"][0]["test"],
            "metrics_identical": agree, "max_metric_difference": worst}


def sweep(epochs: int, root: Path) -> dict[str, Any]:
    cache_dir = root / "cache-default"  # warm from the comparison above
    results = {}
    started = time.perf_counter()
    for sampler, loss in itertools.product(SAMPLERS, LOSSES):
        result = timed_run(["model=linear_probe", f"trainer.max_epochs={epochs}",
                            "trainer.enable_progress_bar=false", f"sampler={sampler}",
                            f"loss={loss}"], root, cache_dir)
        results[f"{sampler}/{loss}"] = result
        print(f"  sweep {sampler:>14} x {loss:16s} {result['seconds']:6.1f} s  "
              f"test bal_acc {result['test']['bal_acc']:.4f}", flush=True)
    total = time.perf_counter() - started
    return {"runs": len(results), "total_s": total, "per_run_s": total / len(results),
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["default", "128"],
                        help="backbone resolutions: 'default' (the config's) or pixels")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="keep runs here (default: tmp)")
    args = parser.parse_args()

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    root = args.out or Path(tempfile.mkdtemp(prefix="tailtune-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ["COLUMNS"] = "100"
    quiet = open(os.devnull, "w")  # noqa: SIM115 - the config lines and rich tables go here
    report: dict[str, Any] = {"epochs": args.epochs, "repeats": args.repeats, "compare": []}

    print(f"linear probe, {args.epochs} epochs, digits_lt, lite0; runs under {root}", flush=True)
    for size in args.sizes:
        real_stderr, sys.stderr = sys.stderr, quiet
        try:
            result = compare(size, args.epochs, args.repeats, root)
        finally:
            sys.stderr = real_stderr
        report["compare"].append(result)
    if not args.no_sweep:
        real_stderr, sys.stderr = sys.stderr, quiet
        try:
            report["sweep"] = sweep(args.epochs, root)
        finally:
            sys.stderr = real_stderr

    print("\n== cached vs uncached (median wall time of a whole run) ==")
    for r in report["compare"]:
        print(f"{r['size']:>7} px: uncached {r['uncached_s']:7.1f} s | cached "
              f"{r['cached_s']:6.1f} s (cold, extracting: {r['cached_cold_s']:6.1f} s) | speed-up "
              f"{r['speedup']:5.1f}x warm, {r['speedup_cold']:5.1f}x cold")
        print(f"          test cached   {_fmt(r['test_cached'])}")
        print(f"          test uncached {_fmt(r['test_uncached'])}  "
              f"(identical: {r['metrics_identical']}, max diff {r['max_metric_difference']:.2g})")
    if "sweep" in report:
        s = report["sweep"]
        print(f"\n== sweep: {len(SAMPLERS)} samplers x {len(LOSSES)} losses on a warm cache ==")
        print(f"{s['runs']} probes in {s['total_s']:.1f} s ({s['per_run_s']:.1f} s a probe)")
        print(f"{'test bal_acc':>16} " + " ".join(f"{loss:>16}" for loss in LOSSES))
        for sampler in SAMPLERS:
            row = [s["results"][f"{sampler}/{loss}"]["test"]["bal_acc"] for loss in LOSSES]
            print(f"{sampler:>16} " + " ".join(f"{v:16.4f}" for v in row))
    (root / "benchmark.json").write_text(json.dumps(report, indent=2))
    print(f"\nreport: {root / 'benchmark.json'}")


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


if __name__ == "__main__":
    main()
