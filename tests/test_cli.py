"""The command line as a user runs it: composing, training, evaluating, loading, DDP."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import tailtune
from helpers import (
    CONFIG_DIR,
    PROBES_ENV,
    assert_test_metrics_match_sklearn,
    compose_config,
    run_cli,
)
from tailtune.cli import schema
from tailtune.cli.config import check_train_config
from tailtune.cli.evaluate import evaluate
from tailtune.cli.train import train

GROUPS = ["data", "transforms", "backbone", "model", "combiner", "sampler", "loss", "trainer",
          "logger", "callbacks", "launcher", "debug", "experiment", "ablation", "hparams_search"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group, tmp_path):
    assert _options(group), f"configs/{group} is empty"
    if group == "hparams_search":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\n")
    # The data a user points to, which no shipped option can know (refused when missing).
    location = {"image_folder": [f"data.root={tmp_path}"], "csv": [f"data.manifest={manifest}"]}
    for option in _options(group):
        overrides = [f"{group}={option}", *(location.get(option, []) if group == "data" else [])]
        cfg, choices = compose_config("train", overrides, tmp_path / option)
        assert choices[group] == option
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        # Every shipped option passes the schema and the cross-key checks as it is.
        assert not schema.config_problems(cfg, "train"), (option, schema.config_problems(
            cfg, "train"))
        check_train_config(cfg, choices)


def test_smoke_train_writes_a_complete_run_and_eval_reproduces_it(smoke_cfg, tmp_path):
    cfg, choices = smoke_cfg()
    value = train(cfg, choices)
    run_dir = Path(cfg.paths.output_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert value == metrics["val"]["bal_acc"]
    assert_test_metrics_match_sklearn(run_dir, metrics)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "done"
    record = json.loads((run_dir / "run.json").read_text())
    assert "commit" in record["git"] and record["packages"]["torch"]
    assert (run_dir / "test_confusion.csv").is_file()

    # The checkpoint contract: plain data that loads with weights_only=True.
    best = run_dir / "checkpoints" / "best.ckpt"
    ckpt = torch.load(best, weights_only=True)
    meta = ckpt["tailtune"]
    assert meta["config"]["backbone"]["name"] == "tf_efficientnet_lite0"
    assert meta["dataset_info"]["class_names"] == [str(i) for i in range(10)]
    assert meta["preprocess"]["image_size"] == 32
    assert meta["dataset_info"]["split_fingerprint"] == metrics["dataset"]["split_fingerprint"]

    eval_cfg, _ = compose_config("eval", [f"ckpt_path={best}", "debug=smoke"], tmp_path / "ev")
    results = evaluate(eval_cfg)
    for key, value in metrics["test"].items():
        assert results["test"][key] == pytest.approx(value, abs=1e-6), key

    # The Python API predicts from raw images of any size.
    model = tailtune.load(str(best))
    probs = model.predict_images(torch.rand(3, 3, 20, 20))
    assert probs.shape == (3, 10)
    assert torch.allclose(probs.sum(dim=1), torch.ones(3))
    assert model.class_names == tuple(str(i) for i in range(10))


def test_eval_refuses_a_checkpoint_of_another_split(smoke_cfg, tmp_path):
    cfg, choices = smoke_cfg()
    train(cfg, choices)
    best = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    ckpt = torch.load(best, weights_only=True)
    ckpt["tailtune"]["config"]["data"]["split_seed"] = 7  # as if trained on another split
    other = tmp_path / "other.ckpt"
    torch.save(ckpt, other)
    eval_cfg, _ = compose_config("eval", [f"ckpt_path={other}", "debug=smoke"], tmp_path / "ev")
    with pytest.raises(ValueError, match="data split of .* differs") as err:
        evaluate(eval_cfg)
    # What to do about a moved folder (renamed, its fingerprint changed): keep its name.
    assert "a moved copy must keep its name" in str(err.value)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["loss=nope"], "loss=nope is not an option; loss is one of balanced_softmax, ce,"),
        (["loss=focall"], "did you mean loss=focal?"),
        (["backbone=nope"], "efficientnet_lite0"),
        (["sampler=nope"], "weighted"),
        (["model.lrr=1"], "model.lrr is not a setting of FineTuneModule; did you mean model.lr?"),
        (["backbone.name=tf_efficientnet_lite9"], "unknown timm model"),
        (["backbone.weights=file", "backbone.weights_path=/no/such.pth"], "does not exist"),
        (["model.unfreeze_at=50"], "must be < trainer.max_epochs"),
        (["data.batch_size=0"], "data.batch_size must be >= 1"),
    ],
)
def test_bad_input_is_one_readable_message_and_a_nonzero_exit(tmp_path, args, expected):
    result = run_cli("tailtune-train", "debug=smoke", *args, cwd=tmp_path)
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("metrics.json")) and not list(tmp_path.rglob("best.ckpt"))


@pytest.mark.slow
def test_console_script_runs_from_any_directory(tmp_path):
    result = run_cli("tailtune-train", "debug=smoke", "trainer.max_epochs=1",
                     "model.unfreeze_at=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dirs = list((tmp_path / "logs" / "runs").iterdir())
    assert len(run_dirs) == 1 and str(run_dirs[0]) in result.stdout + result.stderr
    assert (run_dirs[0] / "metrics.json").is_file()
    assert list((run_dirs[0] / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_ddp_sim_two_processes_end_with_identical_weights_and_one_run_dir(tmp_path):
    probe = tmp_path / "probe"
    result = run_cli(
        "tailtune-train", "debug=smoke", "trainer=ddp_sim", "trainer.max_epochs=2",
        "model.unfreeze_at=1", "sampler=over", "trainer.limit_test_batches=null",
        "data.test_fraction=0.2505",  # 451 test images: an odd count that padding would skew
        "+callbacks.probe._target_=helpers.probes.WeightDigest",
        f"+callbacks.probe.out_dir={probe}",
        cwd=tmp_path, env=PROBES_ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = list((tmp_path / "logs" / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    assert (probe / "rank0.txt").read_text() == (probe / "rank1.txt").read_text()
    # Both ranks drew the same epoch list and took disjoint shards of it: together the
    # shards are that list plus at most one padded duplicate (2 ranks).
    full = [_read(probe / f"full{r}.txt") for r in (0, 1)]
    assert full[0] == full[1]
    shards = Counter(_read(probe / "shard0.txt")) + Counter(_read(probe / "shard1.txt"))
    assert not Counter(full[0]) - shards
    assert sum((shards - Counter(full[0])).values()) <= 1
    # Test metrics over 2 unpadded shards equal a single-process evaluation of the same model.
    metrics = json.loads((run_dirs[0] / "metrics.json").read_text())
    single = evaluate(compose_config(
        "eval", [f"ckpt_path={metrics['best_checkpoint']}", "debug=smoke",
                 "trainer.limit_test_batches=null"], tmp_path / "ev")[0])
    assert sum(metrics["dataset"]["class_counts"]) > 0 and len(full[0]) > 0
    ddp = metrics["test"]
    assert ddp["bal_acc"] == pytest.approx(single["test"]["bal_acc"], abs=1e-6)
    # tailtune-eval under DDP: rank one re-runs the command; only rank zero holds the run dir.
    result = run_cli("tailtune-eval", f"ckpt_path={metrics['best_checkpoint']}", "debug=smoke",
                     "trainer=ddp_sim", "trainer.limit_test_batches=null",
                     f"hydra.run.dir={tmp_path / 'ev_ddp'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp_eval = json.loads((tmp_path / "ev_ddp" / "metrics.json").read_text())["test"]
    assert ddp_eval["bal_acc"] == pytest.approx(single["test"]["bal_acc"], abs=1e-6)


def _read(path: Path) -> list[int]:
    return [int(v) for v in path.read_text().split()]


def test_user_config_dir_adds_options_and_per_launcher_settings(tmp_path):
    user = tmp_path / "my_configs"
    (user / "loss").mkdir(parents=True)
    (user / "loss" / "my_focal.yaml").write_text(
        "_target_: tailtune.imbalance.losses.FocalLoss\n_partial_: true\ngamma: 3.0\n")
    (user / "local" / "launcher").mkdir(parents=True)
    (user / "local" / "launcher" / "submitit_slurm.yaml").write_text(
        "# @package _global_\nhydra:\n  launcher:\n    partition: my_partition\n")
    env = {"TAILTUNE_CONFIG_DIR": str(user)}
    job = run_cli("tailtune-train", "loss=my_focal", "--cfg", "job", cwd=tmp_path, env=env)
    assert job.returncode == 0, job.stderr
    assert "gamma: 3.0" in job.stdout
    slurm = run_cli("tailtune-train", "launcher=submitit_slurm", "--cfg", "hydra", cwd=tmp_path,
                    env=env)
    assert "partition: my_partition" in slurm.stdout
    basic = run_cli("tailtune-train", "--cfg", "hydra", cwd=tmp_path, env=env)
    assert basic.returncode == 0 and "my_partition" not in basic.stdout
