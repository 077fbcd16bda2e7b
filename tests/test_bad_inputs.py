"""Bad input, as a user gives it: each case exits non-zero with one short, readable message
(no traceback; at most a one-line hint on how to see one) and leaves no run dir that looks
complete (no metrics.json, no checkpoints/best.ckpt, no status "done").

A few cases go through the real console script in a subprocess; the rest call the entry point
in-process (through Hydra, exactly as the script does) and check its SystemExit and output.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

import tailtune.pipeline  # noqa: F401 - Lightning's log handlers bind to the session's stderr
from conftest import compose_config, run_cli
from tailtune.cli import evaluate as eval_cli
from tailtune.cli import train as train_cli

TAILTUNE_HINT = "(set TAILTUNE_DEBUG=1 to see the traceback)"
HYDRA_HINT = "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."


# -- checks ------------------------------------------------------------------------------------
def assert_one_readable_error(code: int | str | None, err: str, expected: str) -> None:
    """Exit 2 and one ``tailtune: error:`` line plus the hint (tailtune's own checks), or
    exit 1 and Hydra's composition error (it lists the valid options) plus its hint."""
    assert code not in (0, None), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert expected in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 2:
        errors = [line for line in lines if line.startswith("tailtune: error:")]
        assert len(errors) == 1, err[-2000:]
        assert lines[-2:] == [errors[0], TAILTUNE_HINT] or lines[-1] == errors[0]
        assert expected in errors[0] and len(errors[0]) < 600
    else:
        assert code == 1 and lines[-1] == HYDRA_HINT, err[-2000:]
        assert len(lines) <= 40  # the message, the valid options, the search path


def assert_no_complete_run(root: Path) -> None:
    assert not list(root.rglob("metrics.json"))
    assert not list(root.rglob("best.ckpt"))
    for status in root.rglob("status.json"):
        assert json.loads(status.read_text())["status"] != "done"


# -- in-process entry points ---------------------------------------------------------------------
@pytest.fixture
def cli(tmp_path, monkeypatch, capfd) -> Callable[..., tuple[int | str | None, str]]:
    """``cli(*overrides, script="train")`` -> (exit code, stderr) of the entry point run
    in-process, as ``tailtune-train debug=smoke <overrides>`` would, in ``tmp_path``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(*overrides: str, script: str = "train") -> tuple[int | str | None, str]:
        main = {"train": train_cli.main, "eval": eval_cli.main}[script]
        monkeypatch.setattr(sys, "argv", [f"tailtune-{script}", "debug=smoke",
                                          f"paths.log_dir={tmp_path / 'logs'}", *overrides])
        GlobalHydra.instance().clear()  # as in a fresh process
        root, handlers, level = logging.getLogger(), logging.getLogger().handlers[:], \
            logging.getLogger().level
        capfd.readouterr()
        try:
            with pytest.raises(SystemExit) as exit_info:
                main()
            return exit_info.value.code, capfd.readouterr().err
        finally:
            # Hydra's job logging points root handlers at this test's captured streams.
            for handler in root.handlers[:]:
                if handler not in handlers:
                    root.removeHandler(handler)
                    handler.close()
            root.setLevel(level)

    return run


# -- image folders -----------------------------------------------------------------------------
def make_folder(root: Path, splits: dict[str, list[str]], per_class: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


THREE = {"train": ["a", "b", "c"], "val": ["a", "b", "c"]}


@pytest.fixture(scope="module")
def folder_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A finished smoke run on a 3-class image folder: (its folder, its best checkpoint)."""
    root = tmp_path_factory.mktemp("folder_run")
    data = make_folder(root / "data", THREE)
    cfg, choices = compose_config(
        "train", ["debug=smoke", "data=image_folder", f"data.root={data}",
                  "trainer.max_epochs=1", "model.unfreeze_at=0"], root / "run")
    train_cli.train(cfg, choices)
    best = root / "run" / "checkpoints" / "best.ckpt"
    assert best.is_file()
    return data, best


# -- the console script, in a subprocess -------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["loss=nope"], "Available options in 'loss'", id="unknown-loss-option"),
        pytest.param(["model.lrr=1e-3"], "Could not override 'model.lrr'", id="typo-in-key"),
        pytest.param(["ckpt_path=/no/such/run/last.ckpt"], "ckpt_path does not exist",
                     id="missing-ckpt-path"),
    ],
)
def test_console_script_refuses_bad_config(tmp_path, args, expected):
    result = run_cli("tailtune-train", "debug=smoke", *args, cwd=tmp_path)
    assert_one_readable_error(result.returncode, result.stderr, expected)
    assert_no_complete_run(tmp_path)


def test_console_script_refuses_an_unwritable_cache_dir_before_any_run_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_cli("tailtune-train", "debug=smoke", f"paths.cache_dir={blocker}/cache",
                     cwd=tmp_path)
    assert_one_readable_error(result.returncode, result.stderr,
                              "paths.cache_dir=")
    assert "is not writable" in result.stderr
    assert not (tmp_path / "logs").exists()  # refused before Hydra made the run dir


def test_console_script_hub_weights_offline_says_no_network_and_what_to_use(tmp_path):
    # An empty hub cache and offline mode: no weights can come from anywhere.
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "torch")}
    result = run_cli("tailtune-train", "debug=smoke", "backbone=resnet18", cwd=tmp_path, env=env)
    assert_one_readable_error(result.returncode, result.stderr, "there is no network")
    assert "backbone.weights=package" in result.stderr
    assert "backbone.weights=file backbone.weights_path=" in result.stderr
    assert_no_complete_run(tmp_path)


# -- the entry point, in-process -----------------------------------------------------------------
@pytest.mark.parametrize(("group", "valid"), [("backbone", "efficientnet_lite0"),
                                               ("sampler", "class_balanced"),
                                               ("model", "finetune"),
                                               ("data", "digits_lt")])
def test_unknown_option_lists_the_valid_ones(cli, tmp_path, group, valid):
    code, err = cli(f"{group}=nope")
    assert_one_readable_error(code, err, f"Could not find '{group}/nope'")
    assert f"Available options in '{group}'" in err and valid in err
    assert_no_complete_run(tmp_path)


def test_a_typo_appended_with_plus_names_the_key(cli, tmp_path):
    # Hydra answers `model.lrr=1` with "use +model.lrr=1"; that must not end in a TypeError.
    code, err = cli("+model.lrr=1e-3")
    assert_one_readable_error(code, err, "model.lrr is not a setting of FineTuneModule")
    assert_no_complete_run(tmp_path)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["data.imbalance_ratio=0.5"], "data.imbalance_ratio must be >= 1",
                     id="imbalance-ratio-below-1"),
        pytest.param(["model.unfreeze_at=5", "trainer.max_epochs=2"], "after the last epoch",
                     id="unfreeze-after-last-epoch"),
        pytest.param(["model.backbone_lr_ratio=-0.1"], "model.backbone_lr_ratio must be >= 0",
                     id="negative-backbone-lr-ratio"),
        pytest.param(["data.batch_size=0"], "data.batch_size must be >= 1", id="batch-size-0"),
        pytest.param(["backbone.weights=file", "backbone.weights_path=/no/such/weights.pth"],
                     "backbone.weights_path does not exist", id="weights-file-missing"),
        pytest.param(["sampler=smote"], "resamples feature vectors",
                     id="feature-space-sampler-under-finetune"),
        pytest.param(["data=image_folder", "data.root=/no/such/folder"],
                     "data.root does not exist", id="missing-data-root"),
    ],
)
def test_bad_setting_is_refused_before_training(cli, tmp_path, args, expected):
    code, err = cli(*args)
    assert_one_readable_error(code, err, expected)
    assert_no_complete_run(tmp_path)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        pytest.param("empty_class", "has no images", id="empty-class-folder"),
        pytest.param("corrupt_jpeg", "unreadable image", id="corrupt-jpeg"),
        pytest.param("classes_differ", "has class folder(s) that train/ lacks: d",
                     id="classes-differ-between-splits"),
    ],
)
def test_broken_image_folder_is_refused_with_what_is_wrong(cli, tmp_path, damage, expected):
    splits = {"train": ["a", "b", "c"], "val": ["a", "b", "d"]} if damage == "classes_differ" \
        else THREE
    root = make_folder(tmp_path / "data", splits, per_class=6)
    if damage == "empty_class":
        for image in (root / "train" / "b").iterdir():
            image.unlink()
    elif damage == "corrupt_jpeg":
        jpeg = root / "train" / "a" / "photo.jpg"
        Image.new("RGB", (64, 64), (200, 30, 30)).save(jpeg, quality=95)
        jpeg.write_bytes(jpeg.read_bytes()[:300])  # cut off mid-scan, as a failed copy
    code, err = cli("data=image_folder", f"data.root={root}")
    assert_one_readable_error(code, err, expected)
    if damage == "corrupt_jpeg":
        assert "train/a/photo.jpg" in err and "data.on_bad_image=skip" in err
    assert_no_complete_run(tmp_path)


def test_unwritable_feature_cache_dir_is_refused(cli, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = cli("model=linear_probe", f"model.features.cache_dir={blocker}/features")
    assert_one_readable_error(code, err, "model.features.cache_dir=")
    assert_no_complete_run(tmp_path)


def test_cache_dir_without_write_permission_is_refused(cli, tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes through any permission bits")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, err = cli(f"paths.cache_dir={locked}/cache")
    assert_one_readable_error(code, err, "no permission to write")


def test_nan_loss_stops_the_run_naming_epoch_and_batch(cli, tmp_path):
    # NaN images in epoch 1, batch 1 (tests/probes.py): epoch 0 already wrote checkpoints.
    code, err = cli("+callbacks.nan._target_=probes.InjectNaN", "+callbacks.nan.epoch=1",
                    "+callbacks.nan.batch=1")
    assert_one_readable_error(code, err, "loss is nan at epoch 1, batch 1")
    assert_no_complete_run(tmp_path)
    (run_dir,) = (tmp_path / "logs" / "runs").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "epoch 1, batch 1" in status["error"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # resumable, but not "best"

    # Resumed without the fault, it finishes, and only then holds best.ckpt.
    cfg, choices = compose_config("train", ["debug=smoke", "resume=auto"], run_dir)
    train_cli.train(cfg, choices)
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert not (run_dir / "checkpoints" / "best_so_far.ckpt").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_checkpoint"] == str(run_dir / "checkpoints" / "best.ckpt")


def test_resuming_from_a_checkpoint_of_another_dataset_is_refused(cli, tmp_path,
                                                                  folder_checkpoint):
    _, best = folder_checkpoint  # 3 image-folder classes; this run is on digits
    code, err = cli(f"ckpt_path={best}")
    assert_one_readable_error(code, err, "a checkpoint from a different dataset")
    assert_no_complete_run(tmp_path)


def test_evaluating_a_checkpoint_on_changed_data_is_refused(cli, tmp_path, folder_checkpoint):
    data, best = folder_checkpoint
    moved = shutil.copytree(data.parent, tmp_path / "copy")  # keep the fixture intact
    ckpt = torch.load(moved / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["tailtune"]["config"]["data"]["root"] = str(moved / "data")
    torch.save(ckpt, tmp_path / "moved.ckpt")
    make_folder(moved / "data", {"train": ["d"], "val": ["d"]})  # a class added since
    code, err = cli(f"ckpt_path={tmp_path / 'moved.ckpt'}", script="eval")
    assert_one_readable_error(code, err, "a checkpoint from a different dataset")
    assert_no_complete_run(tmp_path / "logs")


def test_eval_of_a_missing_checkpoint_is_refused(cli, tmp_path):
    code, err = cli("ckpt_path=/no/such/best.ckpt", script="eval")
    assert_one_readable_error(code, err, "checkpoint does not exist")
    assert_no_complete_run(tmp_path)


def test_ensemble_with_no_members_is_refused(cli, tmp_path):
    if importlib.util.find_spec("tailtune.models.ensemble") is None:
        pytest.skip("model=ensemble does not exist yet (tailtune.models.ensemble)")
    code, err = cli("model=ensemble", "model.members=[]")
    assert_one_readable_error(code, err, "model.members is empty")
    assert_no_complete_run(tmp_path)
