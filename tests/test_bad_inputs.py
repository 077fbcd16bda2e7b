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
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

import tailtune.build.models  # noqa: F401 - Lightning's log handlers bind to the session's stderr
from helpers import compose_config, run_cli
from tailtune.cli import evaluate as eval_cli
from tailtune.cli import predict as predict_cli
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
    in-process, as ``tailtune-train debug=smoke <overrides>`` would, in ``tmp_path``
    (``tailtune-predict`` has no debug group: no ``debug=smoke`` there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(*overrides: str, script: str = "train",
            multirun: bool = False) -> tuple[int | str | None, str]:
        main = {"train": train_cli.main, "eval": eval_cli.main,
                "predict": predict_cli.main}[script]
        smoke = [] if script == "predict" else ["debug=smoke"]
        monkeypatch.setattr(sys, "argv", [f"tailtune-{script}", *(["-m"] * multirun), *smoke,
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
        pytest.param(["loss=nope"], "loss=nope is not an option; loss is one of "
                     "balanced_softmax, ce, class_balanced, focal,", id="unknown-loss-option"),
        pytest.param(["model.lrr=1e-3"], "model.lrr is not a setting of FineTuneModule; "
                     "did you mean model.lr?", id="typo-in-key"),
        # Trainer takes it; the trainer config just does not list it ("not a setting of
        # Trainer" said otherwise).
        pytest.param(["trainer.gradient_clip_val=1"], "trainer.gradient_clip_val is not in the "
                     "trainer config; to pass a setting the config lacks to Trainer, use "
                     "+trainer.gradient_clip_val=1", id="key-an-open-group-lacks"),
        # Lightning would start 4 processes that each re-run the script and fail.
        pytest.param(["trainer.devices=4"], "trainer.devices=4 with trainer.accelerator=cpu "
                     "needs a DDP strategy", id="4-devices-on-cpu"),
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
    assert_one_readable_error(code, err, f"{group}=nope is not an option; {group} is one of ")
    assert valid in err and "Config search path" not in err
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
        pytest.param(["model.unfreeze_at=5", "trainer.max_epochs=2"],
                     "must be < trainer.max_epochs", id="unfreeze-after-last-epoch"),
        # Epochs run 0..max_epochs-1: unfreezing at max_epochs never trains the backbone.
        pytest.param(["model.unfreeze_at=2", "trainer.max_epochs=2"],
                     "must be < trainer.max_epochs", id="unfreeze-at-max-epochs"),
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


def test_a_sweep_over_a_missing_data_folder_is_refused_before_its_sweep_dir(cli, tmp_path):
    # Each job would refuse it, but only after Hydra made the sweep dir and its job dirs.
    code, err = cli("data=image_folder", "data.root=/no/such/folder", "loss=ce,focal",
                    multirun=True)
    assert_one_readable_error(code, err, "data.root does not exist")
    assert not (tmp_path / "logs").exists()


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


def test_a_failed_runs_record_keeps_the_root_cause_and_the_start_of_its_message(tmp_path):
    """status.json (and tailtune-compare, which lists it) kept the last 300 characters of the
    wrapper's message: Hydra's three-line InstantiationException, or the end of a long error
    with the start that says what went wrong cut off."""
    from hydra.errors import InstantiationException

    from tailtune.run_record import RunRecord

    long = "could not download 'resnet18.a1_in1k' weights from the model hub: " + "x" * 400
    for name, err in (("long", ValueError(long)), ("wrapped", None)):
        record = RunRecord(tmp_path / name)
        record.start({"entry": "train"})
        if err is None:
            try:
                try:
                    raise KeyError("unknown timm model 'nope'")
                except KeyError as cause:
                    raise InstantiationException("Error in call to target 'x':\nKeyError(...)"
                                                 "\nfull_key: backbone") from cause
            except InstantiationException as wrapper:
                err = wrapper
        record.fail(err)
    long_error = json.loads((tmp_path / "long" / "status.json").read_text())["error"]
    assert long_error.startswith("ValueError: could not download 'resnet18.a1_in1k' weights")
    assert len(long_error) == len("ValueError: ") + 300 and long_error.endswith("…")
    wrapped = json.loads((tmp_path / "wrapped" / "status.json").read_text())["error"]
    assert wrapped == "KeyError: \"unknown timm model 'nope'\""


def test_nan_loss_stops_the_run_naming_epoch_and_batch(cli, tmp_path, monkeypatch):
    # NaN images in epoch 1, batch 1 (tests/helpers/probes.py): epoch 0 already wrote checkpoints.
    fault = ["+callbacks.nan._target_=helpers.probes.InjectNaN", "+callbacks.nan.epoch=1",
             "+callbacks.nan.batch=1"]
    code, err = cli(*fault)
    assert_one_readable_error(code, err, "loss is nan at epoch 1, batch 1")
    assert_no_complete_run(tmp_path)
    (run_dir,) = (tmp_path / "logs" / "runs").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "epoch 1, batch 1" in status["error"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # resumable, but not "best"

    # Resumed without the fault, it finishes, and only then holds best.ckpt.
    monkeypatch.setenv("TAILTUNE_PROBES_OFF", "1")
    cfg, choices = compose_config("train", ["debug=smoke", *fault, "resume=auto"], run_dir)
    train_cli.train(cfg, choices)
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert not (run_dir / "checkpoints" / "best_so_far.ckpt").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_checkpoint"] == str(run_dir / "checkpoints" / "best.ckpt")


def test_a_run_whose_weights_diverged_is_not_reported_done(cli, tmp_path):
    # At this lr the head's weights overflow while each step's loss stays finite.
    code, err = cli("model.lr=1e12")
    assert_one_readable_error(code, err, "training diverged")
    assert_no_complete_run(tmp_path)


def test_resuming_from_a_checkpoint_of_another_dataset_is_refused(cli, tmp_path,
                                                                  folder_checkpoint):
    _, best = folder_checkpoint  # 3 image-folder classes; this run is on digits
    code, err = cli(f"ckpt_path={best}")
    assert_one_readable_error(code, err, "from different datasets")
    assert_no_complete_run(tmp_path)


def test_evaluating_a_checkpoint_on_changed_data_is_refused(cli, tmp_path, folder_checkpoint):
    data, best = folder_checkpoint
    moved = shutil.copytree(data.parent, tmp_path / "copy")  # keep the fixture intact
    ckpt = torch.load(moved / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["tailtune"]["config"]["data"]["root"] = str(moved / "data")
    torch.save(ckpt, tmp_path / "moved.ckpt")
    make_folder(moved / "data", {"train": ["d"], "val": ["d"]})  # a class added since
    code, err = cli(f"ckpt_path={tmp_path / 'moved.ckpt'}", script="eval")
    assert_one_readable_error(code, err, "from different datasets")
    assert_no_complete_run(tmp_path / "logs")


@pytest.mark.parametrize(("script", "override"), [
    ("eval", "data=image_folder"), ("predict", "data=image_folder"),
    # (tailtune-eval under the fixture's debug=smoke has a data node: the preset's keys)
    ("predict", "data.image_size=64")])
def test_data_without_a_plus_outside_training_says_the_checkpoint_s_data_is_used(
        cli, tmp_path, script, override):
    # Neither has a data group or key (Hydra said "No match in the defaults list", or that
    # `data` is not a setting).
    inputs = ["input=x"] if script == "predict" else []
    code, err = cli("ckpt_path=/no/such/best.ckpt", *inputs, override, script=script)
    assert_one_readable_error(code, err, "use the checkpoint's own data config; tailtune-eval "
                                         "finds moved files with +data.root=DIR")
    assert_no_complete_run(tmp_path)
    # In training, data is a group: a misspelt key of it is still named as one.
    code, err = cli("data.fooo=1")
    assert_one_readable_error(code, err, "data.fooo is not a setting of ImbalancedDataModule")


def test_eval_at_another_image_size_is_refused_and_leaves_no_run_dir(cli, tmp_path,
                                                                    folder_checkpoint):
    _, best = folder_checkpoint
    code, err = cli(f"ckpt_path={best}", "data.image_size=64", script="eval")
    assert_one_readable_error(code, err, "data.image_size=64 (set on the command line or by a "
                                         "debug preset) differs from the checkpoint's")
    assert not list((tmp_path / "logs" / "runs").glob("*")), "an empty run dir was left"


def test_eval_of_a_missing_checkpoint_is_refused(cli, tmp_path):
    code, err = cli("ckpt_path=/no/such/best.ckpt", script="eval")
    assert_one_readable_error(code, err, "ckpt_path does not exist: /no/such/best.ckpt")
    assert_no_complete_run(tmp_path)


def test_ensemble_with_no_members_is_refused(cli, tmp_path):
    if importlib.util.find_spec("tailtune.models.ensemble") is None:
        pytest.skip("model=ensemble does not exist yet (tailtune.models.ensemble)")
    code, err = cli("model=ensemble", "model.members=[]")
    assert_one_readable_error(code, err, "model.members is empty")
    assert_no_complete_run(tmp_path)


# -- config validation: the schema, before torch and before any run dir --------------------------
KEY_NOT_A_SETTING = "model.lrr is not a setting of FineTuneModule; did you mean model.lr?"
BAD_CONFIG = [
    pytest.param("train", ["data.image_size=0"], "data.image_size must be >= 1, got 0",
                 id="image-size-0"),
    pytest.param("train", ["data.image_size=abc"],
                 "data.image_size must be an integer >= 1, got 'abc'", id="image-size-abc"),
    # Once refused only after a whole epoch (ModelCheckpoint's monitor).
    pytest.param("train", ["optimized_metric=val/bogus"],
                 "optimized_metric='val/bogus' is not a metric tailtune logs", id="bogus-metric"),
    # The best checkpoint is the highest value: a loss would keep the worst epoch.
    pytest.param("train", ["optimized_metric=val/loss"],
                 "optimized_metric=val/loss is lower-is-better", id="lower-is-better-metric"),
    pytest.param("train", ["trainer.devices=4"],
                 "trainer.devices=4 with trainer.accelerator=cpu needs a DDP strategy: use "
                 "trainer=ddp_sim", id="4-devices-on-cpu"),
    pytest.param("train", ["threads=-1"], "threads must be >= 1 or null (torch's default), "
                 "got -1", id="threads-negative"),
    pytest.param("train", ["threads=0"], "threads must be >= 1 or null (torch's default), "
                 "got 0", id="threads-0"),
    pytest.param("train", ["seed=-1"], "seed must be in [0, 4294967295], got -1",
                 id="seed-negative"),
    pytest.param("train", ["data.num_workers=-1"], "data.num_workers must be >= 0, got -1",
                 id="num-workers-negative"),
    pytest.param("train", ["model.lr=nan"], "model.lr must be a finite number > 0, got nan",
                 id="lr-nan"),
    pytest.param("train", ["trainer.max_epochs=0"], "trainer.max_epochs must be >= 1, got 0",
                 id="max-epochs-0"),
    pytest.param("train", ["data.imbalance_profile=linear"],
                 "data.imbalance_profile must be one of exp, step, got 'linear'",
                 id="unknown-choice"),
    pytest.param("train", ["model=ensemble", "model.members=[efficientnet_lite0]"],
                 "model.members=[efficientnet_lite0] has 1 member: an ensemble needs at least 2",
                 id="one-member-ensemble"),
    # Hydra itself would advise `+model.lrr=1`; appended that way, it is refused the same.
    pytest.param("train", ["model.lrr=1"], KEY_NOT_A_SETTING, id="misspelt-key"),
    pytest.param("train", ["+model.lrr=1"], KEY_NOT_A_SETTING, id="misspelt-key-appended"),
    pytest.param("train", ["sed=1"], "sed is not a setting; did you mean seed?",
                 id="misspelt-top-level-key"),
    pytest.param("eval", ["ckpt_path={txt}"],
                 "notes.txt is not a checkpoint (not a file written by torch.save)",
                 id="eval-a-txt-file"),
    pytest.param("eval", ["ckpt_path={txt}", "split=train"],
                 "split must be one of test, val, got 'train'", id="eval-unknown-split"),
    pytest.param("eval", [], "ckpt_path is required", id="eval-without-checkpoint"),
    pytest.param("predict", ["ckpt_path={fake}", "input={tmp}"],
                 "fake.ckpt is not a checkpoint (not a file written by torch.save)",
                 id="predict-a-fake-checkpoint"),
    pytest.param("predict", ["ckpt_path={archive}", "input={tmp}"],
                 "archive.zip is not a checkpoint (not a file written by torch.save)",
                 id="predict-a-zip-archive"),
    pytest.param("eval", ["ckpt_path={other}"],
                 "other.ckpt is not a tailtune checkpoint (no 'tailtune' metadata)",
                 id="eval-another-tools-checkpoint"),
    pytest.param("train", ["model=decoupled", "model.init_from={txt}"],
                 "model.init_from=", id="decoupled-from-a-txt-file"),
    pytest.param("predict", ["ckpt_path={fake}", "input={tmp}", "batch_size=0"],
                 "batch_size must be >= 1, got 0", id="predict-batch-size-0"),
    pytest.param("eval", ["ckpt_path={txt}", "threads=0"],
                 "threads must be >= 1 or null (torch's default), got 0", id="eval-threads-0"),
    pytest.param("predict", ["ckpt_path={fake}", "input={tmp}", "threads=0"],
                 "threads must be >= 1 or null (torch's default), got 0", id="predict-threads-0"),
]


@pytest.mark.parametrize(("script", "args", "expected"), BAD_CONFIG)
def test_bad_config_is_refused_before_any_run_dir(cli, tmp_path, script, args, expected):
    """Each bad value: exit 2, one line naming the key, the value and what is valid; refused
    by the Hydra callback before Hydra makes the run dir, so nothing is left behind."""
    txt = tmp_path / "notes.txt"
    txt.write_text("not a checkpoint\n")
    fake = tmp_path / "fake.ckpt"  # random bytes, as a broken download
    fake.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    archive = tmp_path / "archive.zip"  # a zip, but not torch.save's
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("photo.txt", "not a checkpoint")
    other = tmp_path / "other.ckpt"  # torch.save's, without tailtune's metadata
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    files = {"txt": txt, "fake": fake, "archive": archive, "other": other, "tmp": tmp_path}
    code, err = cli(*(a.format(**files) for a in args), script=script)
    assert code == 2, err[-2000:]
    assert_one_readable_error(code, err, expected)
    assert not (tmp_path / "logs").exists()  # no run dir, not even an empty one


def test_several_bad_values_are_reported_together(cli, tmp_path):
    code, err = cli("data.image_size=0", "seed=-1", "model.lr=nan")
    assert_one_readable_error(code, err, "data.image_size must be >= 1, got 0")
    assert "seed must be" in err and "model.lr must be" in err


def test_config_errors_come_before_torch_is_imported(tmp_path):
    """The real console script: validation fails without importing torch (the 10-16 s of
    start-up a range error used to cost)."""
    script = Path(sys.executable).with_name("tailtune-train")
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(script), "debug=smoke", "data.image_size=abc"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "tailtune: error: data.image_size must be an integer >= 1, got 'abc'" in result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "hydra" in imported and "torch" not in imported and "lightning" not in imported
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("args", [["trainer=ddp_sim"], ["trainer=ddp_sim", "trainer.devices=4"],
                                  ["optimized_metric=val/recall/3"],
                                  ["optimized_metric=val/macro_f1"]],
                         ids=["ddp-sim", "ddp-sim-4", "recall-metric", "macro-f1-metric"])
def test_valid_settings_near_the_refused_ones_pass(tmp_path, args):
    from tailtune.cli.config import check_train_config

    cfg, choices = compose_config("train", ["debug=smoke", *args], tmp_path / "run")
    check_train_config(cfg, choices)  # 2 (or 4) CPU processes over gloo are legitimate


@pytest.mark.parametrize(("launcher", "sweeper", "swept", "refused"), [
    # A basic sweep's jobs are each composed and checked: whatever the sweep varies.
    ("basic", "basic", "loss=ce,focal", True),
    ("joblib", "basic", "loss=ce,focal", True),
    ("basic", "basic", "experiment=quick,lt_recipe", True),
    # Compute nodes may mount what the submitting host does not: each job checks its own.
    ("submitit_slurm", "basic", "loss=ce,focal", False),
    # Optuna's jobs are not known in advance: the base config's data folder is checked,
    # unless the sweep varies options that may set the data location themselves.
    ("basic", "optuna", "loss=ce,focal", True),
    ("basic", "optuna", "experiment=quick,lt_recipe", False),
    ("basic", "optuna", "paths.data_dir=/a,/b", False),
])
def test_which_sweeps_refuse_a_missing_data_folder_before_starting(launcher, sweeper, swept,
                                                                    refused):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from helpers import CONFIG_DIR
    from tailtune.cli.config import EarlyChecks

    overrides = ["debug=smoke", f"launcher={launcher}", "data=image_folder",
                 "data.root=/no/such/folder"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        config = compose("train", overrides=overrides, return_hydra_config=True)
        with open_dict(config):
            config.hydra.overrides.task = [*overrides, swept]
            config.hydra.runtime.choices["hydra/sweeper"] = sweeper
        if refused:
            with pytest.raises(SystemExit):
                EarlyChecks().on_multirun_start(config)
        else:
            EarlyChecks().on_multirun_start(config)


def test_a_basic_sweep_refuses_a_bad_job_before_any_job_runs(cli, tmp_path):
    """Job 2 of 4 has a bad value, job 1 an unknown option: refused together before the sweep
    dir exists (else jobs 0 and 1 would train, then the sweep would stop)."""
    code, err = cli("model.lr=1e-3,abc", "loss=ce,nope", multirun=True)
    assert_one_readable_error(code, err, "loss=nope is not an option")
    assert "(sweep jobs 1 (model.lr=0.001 loss=nope), 3 (model.lr=abc loss=nope))" in err
    assert "model.lr must be a finite number > 0, got 'abc' (sweep job 2 " in err
    assert not (tmp_path / "logs").exists()


def test_a_search_space_end_that_cannot_work_is_refused_before_the_study(cli, tmp_path):
    """Optuna draws its trials as it goes: a space reaching model.unfreeze_at=5 with 2 epochs,
    or an lr interval starting below 0, would end the study at the first trial that drew it
    (after earlier trials trained). Each choice and each end of the space is checked first."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    code, err = cli("hparams_search=optuna_imbalance",
                    "model.lr=interval(-1,1e-2)", multirun=True)
    assert_one_readable_error(code, err, "model.unfreeze_at=5 must be < trainer.max_epochs=2")
    assert "(search space value model.unfreeze_at=5)" in err
    assert "model.lr must be > 0, got -1.0 (search space value model.lr=-1.0)" in err
    assert "model.unfreeze_at=0" not in err and "loss=" not in err  # the ends that can work
    assert not (tmp_path / "logs").exists()
    # The command line narrows the space (the sweeper's merge: a key's last value wins).
    code, err = cli("hparams_search=optuna_imbalance", "model.unfreeze_at=range(0,2)",
                    "model.lr=interval(-1,1e-2)", multirun=True)
    assert "unfreeze_at" not in err and "model.lr=-1.0" in err


def test_a_sweep_that_varies_the_data_is_left_to_its_jobs():
    from omegaconf import OmegaConf

    from tailtune.cli.config import _swept_keys

    config = OmegaConf.create({"hydra": {
        "overrides": {"task": ["data.root=/a,/b", "data=image_folder", "seed=1,2", "loss=ce"]},
        "sweeper": {"params": {"model.lr": "interval(1e-4, 1e-2)"}}}})
    assert _swept_keys(config) == {"data.root", "seed", "model.lr"}


def test_a_run_dir_in_use_by_another_process_is_refused(cli, tmp_path):
    import os

    from tailtune.run_record import RunDirLock

    run_dir = tmp_path / "run"
    lock = RunDirLock(run_dir)  # as a live process resuming this run would hold it
    lock.acquire()
    try:
        code, err = cli(f"hydra.run.dir={run_dir}", "resume=auto")
    finally:
        lock.release()
    assert_one_readable_error(code, err, f"is in use by another process (pid {os.getpid()} on")
    assert not (run_dir / "status.json").exists()  # the holder's state is left alone


@pytest.mark.parametrize("end", ["finish", "fail"])
def test_a_run_dir_is_free_again_once_its_run_ends(tmp_path, end):
    from tailtune.run_record import RunDirBusy, RunDirLock, RunRecord

    record = RunRecord(tmp_path / "run")
    record.start()
    with pytest.raises(RunDirBusy):
        RunRecord(tmp_path / "run").start()
    record.finish({}) if end == "finish" else record.fail(ValueError("x"))
    # The file stays (deleting it would let two processes lock two inodes of one path),
    # naming no holder, and is free.
    assert (tmp_path / "run" / RunDirLock.NAME).read_text() == ""
    RunDirLock(tmp_path / "run").acquire()


def test_resuming_a_killed_run_with_other_overrides_is_refused_naming_its_own(cli, tmp_path):
    """`hydra.run.dir=<dir> resume=auto` alone composed the default config and finished the
    run under it, rewriting its config.yaml; a run dir holds one config."""
    from tailtune.build.config import config_yaml

    run_dir = tmp_path / "killed"
    started = ["debug=smoke", "trainer.max_epochs=3", f"paths.log_dir={tmp_path / 'logs'}"]
    cfg, _ = compose_config("train", started, run_dir)
    (run_dir / ".hydra").mkdir(parents=True)  # what the killed run had written
    (run_dir / "config.yaml").write_text(config_yaml(cfg))
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in started))
    code, err = cli(f"hydra.run.dir={run_dir}", "resume=auto", "threads=1")
    assert_one_readable_error(code, err, "holds an unfinished run of another config "
                                         "(trainer.max_epochs: 3 -> ")
    # The command that resumes it: its own overrides, not those of how it ran (paths).
    assert (f"tailtune-train debug=smoke trainer.max_epochs=3 hydra.run.dir={run_dir} "
            "resume=auto") in err
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "config.yaml"]


def test_a_run_from_before_a_new_config_key_is_not_resumed_but_shown_a_way_on(cli, tmp_path):
    """Its own overrides cannot make the configs agree (the key is new): the message pointed
    at exactly the command that had failed. It says what is new and how to go on."""
    import yaml

    from tailtune.build.config import config_yaml

    run_dir = tmp_path / "old"
    started = ["debug=smoke", f"paths.log_dir={tmp_path / 'logs'}"]
    cfg, _ = compose_config("train", started, run_dir)
    stored = yaml.safe_load(config_yaml(cfg))
    del stored["correct_prior_for_sampler"]  # a key tailtune gained after this run started
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(stored))
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in started))
    code, err = cli(f"hydra.run.dir={run_dir}", "resume=auto", "threads=1")
    assert_one_readable_error(
        code, err, "holds an unfinished run whose config lacks keys this one has, added to "
        "tailtune or a config file since it started (correct_prior_for_sampler: (not set) -> "
        "True), so it cannot resume in place")
    assert f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'} and another hydra.run.dir" in err
    assert "Resume it with the overrides it was started with" not in err


def test_config_changes_ignore_how_a_run_runs_and_its_own_dir(tmp_path):
    from tailtune.run_record import config_changes

    (tmp_path / "config.yaml").write_text(
        "seed: 1\nthreads: 2\nresume: null\nckpt_path: null\npaths: {output_dir: /a/run}\n"
        "trainer: {max_epochs: 3, default_root_dir: /a/run}\nmodel: {lr: 0.001}\n")
    same = ("seed: 1\nthreads: 1\nresume: auto\nckpt_path: auto\npaths: {output_dir: run}\n"
            "trainer: {max_epochs: 3, default_root_dir: run}\nmodel: {lr: 0.001}\n")
    assert config_changes(tmp_path, same) == []
    other = same.replace("seed: 1", "seed: 2").replace("lr: 0.001", "lr: 0.01")
    assert config_changes(tmp_path, other) == ["model.lr: 0.001 -> 0.01", "seed: 1 -> 2"]
    assert config_changes(tmp_path / "none", other) == []  # no run there yet


def test_a_finished_run_of_another_config_is_not_skipped_as_this_ones(cli, tmp_path):
    """`resume=auto` skips a finished run and hands its metric on (to a sweeper, say): only
    if it ran this config. Another config's result was returned as this one's, exit 0."""
    from tailtune.build.config import config_yaml

    run_dir = tmp_path / "done"
    cfg, _ = compose_config("train", ["debug=smoke", f"paths.log_dir={tmp_path / 'logs'}"],
                            run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_yaml(cfg))
    (run_dir / "status.json").write_text('{"status": "done"}')
    (run_dir / "metrics.json").write_text('{"val": {"bal_acc": 0.5}, "test": {}}')
    code, err = cli(f"hydra.run.dir={run_dir}", "loss=focal", "resume=auto")
    assert_one_readable_error(code, err, "holds a finished run of another config (loss.")
    assert json.loads((run_dir / "metrics.json").read_text())["val"]["bal_acc"] == 0.5


def test_eval_and_predict_never_write_into_another_runs_dir(tmp_path):
    """In a killed training run's dir they marked it done and replaced its record; resume=auto
    then skipped the run instead of finishing it. Their own fresh dir is fine."""
    from tailtune.run_record import RunRecord

    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "status.json").write_text('{"status": "failed"}')
    with pytest.raises(FileExistsError, match="holds another run"):
        RunRecord(killed).start({"entry": "eval"}, own_dir=True)
    assert json.loads((killed / "status.json").read_text())["status"] == "failed"
    RunRecord(killed).start({"entry": "train"})  # the lock is free: the run can resume
    fresh = tmp_path / "fresh"
    (fresh / ".hydra").mkdir(parents=True)  # what Hydra made before the task ran
    RunRecord(fresh).start({"entry": "eval"}, own_dir=True)
