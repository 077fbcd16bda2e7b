"""Determinism and concurrency.

- The same seed, config, launcher and thread count on one machine give identical metrics
  (metrics.json holds no timings: those are in timings.json).
- Different seeds give different sampler draws (and equal seeds equal ones).
- Jobs of a joblib sweep that share one feature cache and one sweep dir corrupt nothing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from helpers import assert_test_metrics_match_sklearn, run_cli
from tailtune.build.data import build_datamodule
from tailtune.cli.train import train
from tailtune.features import SUFFIX, FeatureCache

INDEX_SAMPLERS = ["none", "over", "under", "weighted", "weighted_sqrt", "class_balanced",
                  "progressive"]


def _metrics(run_dir: Path) -> dict[str, Any]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # The one path in it: equal relative to each run's own dir.
    metrics["best_checkpoint"] = str(Path(metrics["best_checkpoint"]).relative_to(run_dir))
    return metrics


def _job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


# -- same inputs, same metrics -----------------------------------------------------------------
def test_same_seed_and_config_give_identical_metrics_json(smoke_cfg):
    # A resampling sampler and augmentation: every source of randomness a run has.
    args = ("sampler=over", "transforms=flip_crop", "seed=7")
    runs = []
    for name in ("a", "b"):
        cfg, choices = smoke_cfg(*args, name=name)
        train(cfg, choices)
        runs.append(Path(cfg.paths.output_dir))
    first, second = (_metrics(r) for r in runs)
    assert first == second
    assert first["epochs_trained"] == 2
    assert_test_metrics_match_sklearn(runs[0], first)
    # Wall times live apart, or no two metrics.json could ever be equal.
    timings = json.loads((runs[0] / "timings.json").read_text())
    assert "wall_s" in timings and "wall_s" not in json.dumps(first)
    # So is the thread count, on which CPU numbers depend (a comparison names a mix).
    assert timings["torch_threads"] == torch.get_num_threads()


@pytest.mark.parametrize("sampler", INDEX_SAMPLERS)
def test_sampler_draws_follow_the_seed(smoke_cfg, sampler):
    def draws(seed: int, epoch: int) -> list[int]:
        cfg, _ = smoke_cfg(f"sampler={sampler}", f"seed={seed}", name=f"s{seed}")
        train_sampler = build_datamodule(cfg).train_sampler
        train_sampler.set_epoch(epoch)
        return list(train_sampler)

    assert draws(1, 0) == draws(1, 0)  # same seed and epoch: the same list
    assert draws(1, 0) != draws(2, 0)  # another seed: another list
    assert draws(1, 0) != draws(1, 1)  # another epoch: another list


@pytest.mark.slow
def test_same_seed_gives_identical_metrics_under_joblib_and_basic_launchers(tmp_path):
    # Two identical jobs side by side (1 thread each), then the same run alone, 1 thread.
    # With a loader worker: inside a joblib job torch could not start one (loky's start method).
    sweep = tmp_path / "sweep"
    result = run_cli("tailtune-train", "-m", "debug=smoke", "launcher=joblib",
                     "hydra.launcher.n_jobs=2", "sampler=over", "seed=3,3", "data.num_workers=1",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _job_dirs(sweep)
    assert len(jobs) == 2 and _metrics(jobs[0]) == _metrics(jobs[1])
    assert "threads: 1" in (jobs[0] / "config.yaml").read_text()
    alone = tmp_path / "alone"
    result = run_cli("tailtune-train", "debug=smoke", "sampler=over", "seed=3", "threads=1",
                     "data.num_workers=1", f"hydra.run.dir={alone}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    solo, joblib = _metrics(alone), _metrics(jobs[0])
    assert solo["val"] == joblib["val"] and solo["test"] == joblib["test"]


# -- concurrency -------------------------------------------------------------------------------
@pytest.mark.slow
def test_four_joblib_jobs_share_one_feature_cache_and_sweep_dir_safely(tmp_path):
    if importlib.util.find_spec("tailtune.models.linear_probe") is None:
        pytest.skip("model=linear_probe does not exist yet (tailtune.models.linear_probe)")
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    args = ("tailtune-train", "-m", "debug=smoke", "model=linear_probe", "launcher=joblib",
            "hydra.launcher.n_jobs=4", "sampler=none,over", "loss=ce,focal",
            f"hydra.sweep.dir={sweep}", f"paths.cache_dir={cache}")
    result = run_cli(*args, cwd=tmp_path)  # a cold cache: the four jobs race to fill it
    assert result.returncode == 0, result.stderr[-3000:]

    jobs = _job_dirs(sweep)
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        assert json.loads((job / "status.json").read_text())["status"] == "done"
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert _metrics(job)["overrides"] == overrides  # its own metrics, not a neighbour's
        config = yaml.safe_load((job / "config.yaml").read_text())
        sampler = next(o.split("=")[1] for o in overrides if o.startswith("sampler="))
        assert config["sampler"]["_target_"].endswith(
            {"none": "ShuffleSampler", "over": "OverSampler"}[sampler])
        assert (job / "checkpoints" / "best.ckpt").is_file()
        seen.add(tuple(sorted(overrides)))
    assert len(seen) == 4
    assert len({json.loads((j / "run.json").read_text())["pid"] for j in jobs}) == 4

    # One verified entry per split, no temporary file left behind.
    features = cache / "features"
    entries = sorted(features.glob(f"*{SUFFIX}"))
    assert len(entries) == 3
    assert not [p for p in features.iterdir() if p.name.endswith(".tmp")]
    store = FeatureCache(features)
    assert {store.get(p.name[: -len(SUFFIX)]).meta["split"] for p in entries} == \
        {"train", "val", "test"}

    # A job rerun alone, on a fresh cache, with the jobs' thread count: the same metrics.
    job = next(j for j in jobs if {"loss=ce", "sampler=none"} <= set(_metrics(j)["overrides"]))
    alone = tmp_path / "alone"
    result = run_cli("tailtune-train", "debug=smoke", "model=linear_probe", "sampler=none",
                     "loss=ce", "threads=1", f"hydra.run.dir={alone}",
                     f"paths.cache_dir={tmp_path / 'fresh'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _metrics(alone)["test"] == _metrics(job)["test"]
    assert np.isfinite(_metrics(alone)["val"]["bal_acc"])
