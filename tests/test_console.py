"""What a user sees on the console, through the console scripts: each message once, no library
noise, the results table at the end (and on failure the run dir and one line); what the run
leaves in TensorBoard."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import run_cli

BOX = tuple("│├└┌┏┃┡┗┣━─╭╰")  # rich tables and the config tree: structure, not messages
NOISE = ("Tip:", "litlogger", "litmodels", "LeafSpec", "in eval mode", "exists and is not empty",
         "INFO:", "[INFO]", "Seed set to", "Restoring states")
ROWS = (("balanced acc", "bal_acc"), ("macro-F1", "macro_f1"), ("few-shot acc", "few_acc"),
        ("ECE", "ece"))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[object, Path]:
    """One `tailtune-train debug=smoke` through the console script, shared by the tests below.
    The overrides put a slash and the log dir where a TensorBoard run name could take them."""
    root = tmp_path_factory.mktemp("console")
    result = run_cli("tailtune-train", "debug=smoke", f"paths.log_dir={root / 'logs'}",
                     "optimized_metric=val/macro_f1", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (root / "logs" / "runs").iterdir()
    return result, run_dir


def _messages(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith(BOX)]


def _assert_results_table(stdout: str, metrics: dict, run_dir: Path) -> None:
    """stdout is the results table, then the run dir, and nothing else."""
    lines = stdout.strip().splitlines()
    assert lines[-1] == f"run dir: {run_dir}"
    assert lines[-2].startswith("└")
    splits = [s for s in ("val", "test") if s in metrics]
    header = next(line for line in lines if line.startswith("┃ metric"))
    assert [c.strip() for c in header.strip("┃").split("┃")] == ["metric", *splits]
    for name, key in ROWS:
        row = next(line for line in lines if line.startswith(f"│ {name} "))
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert cells == [name, *(f"{metrics[s][key]:.4f}" for s in splits)], name


def test_smoke_run_says_each_thing_once_and_ends_with_the_results_table(smoke_run):
    result, run_dir = smoke_run
    output = result.stdout + result.stderr
    repeated = [line for line, n in Counter(_messages(output)).items() if n > 1]
    assert not repeated, repeated
    for noise in NOISE:
        assert noise not in output, noise
    # The config as a few lines (the whole tree is print_config=full), saved where it says.
    assert "├── trainer:" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == ("config: data=digits_lt transforms=none backbone=efficientnet_lite0 "
                        "model=finetune sampler=none loss=ce trainer=cpu logger=tensorboard "
                        "launcher=basic debug=smoke")  # no combiner (read by ensembles only)
    assert lines[1] == f"set: paths.log_dir={run_dir.parents[1]} optimized_metric=val/macro_f1"
    assert lines[2] == f"resolved config: {run_dir / 'config.yaml'}"
    assert (run_dir / "config.yaml").is_file()
    assert "figures off (model.log_figures=false, set by debug=smoke)" in result.stderr
    epochs = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    log = (run_dir / "train.log").read_text()
    assert all(line in log for line in epochs)  # the run's log keeps them
    assert "Trainer.fit` stopped" in result.stderr  # Lightning's own lines still come, once
    metrics = json.loads((run_dir / "metrics.json").read_text())
    _assert_results_table(result.stdout, metrics, run_dir)
    assert "subsampled to about 64 images per split (subsample)" in result.stderr.splitlines()


def test_tensorboard_gets_hparams_at_start_and_final_metrics_once(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, run_dir = smoke_run
    (tb_run,) = (p for p in (run_dir / "tensorboard").iterdir() if p.is_dir())
    assert tb_run.name == "debug=smoke,optimized_metric=val_macro_f1"  # no ∕, no paths.*
    events = EventAccumulator(str(tb_run), size_guidance={"scalars": 0})
    events.Reload()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for tag in ("hp/val/bal_acc", "hp/test/bal_acc", "hp/test/macro_f1", "hp/test/acc"):
        stage, key = tag.split("/")[1:]
        points = events.Scalars(tag)
        assert [p.value for p in points] == [pytest.approx(metrics[stage][key], abs=1e-6)], tag
    experiment = next(
        data.experiment for data in (plugin_data_pb2.HParamsPluginData.FromString(content)
                                     for content in events.PluginTagToContent("hparams").values())
        if data.HasField("experiment"))
    assert "hp/test/bal_acc" in {m.name.tag for m in experiment.metric_infos}
    names = {h.name for h in experiment.hparam_infos}
    assert {"choice/debug", "choice/model", "seed"} <= names
    assert not {n for n in names if n.startswith("choice/local")}  # no local config exists


@pytest.mark.slow  # a CLI run end to end (pyproject's marker)
def test_eval_ends_with_the_test_table_of_its_own_metrics(smoke_run, tmp_path):
    _, run_dir = smoke_run
    result = run_cli("tailtune-eval", f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
                     f"paths.log_dir={tmp_path / 'logs'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    repeated = [line for line, n in Counter(_messages(result.stdout + result.stderr)).items()
                if n > 1]
    assert not repeated, repeated
    (eval_dir,) = (tmp_path / "logs" / "runs").iterdir()
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert "val" not in metrics
    # What is scored, first: the best epoch counted from 1, as the training run's lines count.
    best = run_dir / "checkpoints" / "best.ckpt"
    saved = torch.load(best, map_location="cpu", weights_only=False)
    epoch, step = saved["epoch"] + 1, saved["global_step"]
    assert f"epoch {epoch}/2: " in (run_dir / "train.log").read_text()
    confusion = (eval_dir / "test_confusion.csv").read_text().splitlines()[1:]
    n = sum(int(v) for row in confusion for v in row.split(",")[1:])
    assert result.stderr.startswith(f"scoring {best} (FineTuneModule, saved in epoch {epoch} "
                                    f"at step {step}) on the test split of digits: {n} images")
    _assert_results_table(result.stdout, metrics, eval_dir)


@pytest.mark.slow  # a CLI run end to end (pyproject's marker)
def test_a_failed_run_names_its_dir_and_one_reason(tmp_path):
    from PIL import Image

    for split_class, n in (("a", 4), ("b", 4)):
        folder = tmp_path / "photos" / "train" / split_class
        folder.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(folder / f"{i}.png")
    broken = tmp_path / "photos" / "train" / "b" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 40)  # starts like a PNG, is not one
    result = run_cli("tailtune-train", "debug=smoke", "data=image_folder",
                     f"data.root={tmp_path / 'photos'}", f"paths.log_dir={tmp_path / 'logs'}",
                     cwd=tmp_path)
    assert result.returncode != 0
    (run_dir,) = (tmp_path / "logs" / "runs").iterdir()
    assert f"run failed; run dir: {run_dir}" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tailtune: error:")]
    assert len(errors) == 1 and "broken.png" in errors[0]
    assert "Traceback" not in result.stderr and not result.stdout.strip()
    # The reason is not buried: the config is three lines above it, not a 130-line tree.
    assert len(result.stderr.strip().splitlines()) <= 8, result.stderr
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"


def test_a_stopped_sweep_job_is_resumed_through_its_sweep_dir(tmp_path):
    """A -m run ignores hydra.run.dir: the hint for a stopped sweep job started a new sweep
    that ran every job again. A single run is resumed through its run dir."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    from helpers import CONFIG_DIR
    from tailtune.cli.config import resume_override

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        config = compose("train", overrides=[f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                         return_hydra_config=True)
    try:
        for mode, expected in ((RunMode.RUN, f"hydra.run.dir={tmp_path / 'job'}"),
                               (RunMode.MULTIRUN, f"hydra.sweep.dir={tmp_path / 'sweep'}")):
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.mode = mode
            HydraConfig.instance().set_config(config)
            assert resume_override(tmp_path / "job") == expected
    finally:
        HydraConfig.instance().cfg = None


def test_a_resumed_run_keeps_its_tensorboard_run():
    """How a run is run (resume=auto, threads, launcher) is not in its TensorBoard run's
    name: the resumed half of a run went to a second run with an HParams entry of its own."""
    from tailtune.build.config import run_name

    assert run_name(["loss=focal", "seed=1", "resume=auto", "threads=1", "paths.log_dir=x"]) \
        == run_name(["loss=focal", "seed=1"]) == "loss=focal,seed=1"


def test_the_config_header_names_what_was_chosen_and_full_prints_the_tree(smoke_cfg, tmp_path):
    from rich.tree import Tree

    from tailtune.build.config import config_summary

    overrides = ["model=ensemble", "+data.root=/data/x", "seed=3"]
    cfg, choices = smoke_cfg(*overrides)
    lines = config_summary(cfg, choices, overrides, tmp_path / "config.yaml")
    assert lines[0].startswith("config: data=digits_lt ") and " combiner=mean_prob " in lines[0]
    # Members bring their own backbones; the member options the ensemble config places
    # (model@model.member_models.*) are no choice of the user's.
    assert "backbone=" not in lines[0] and "@" not in lines[0]
    assert lines[1:] == ["set: +data.root=/data/x seed=3",
                         f"resolved config: {tmp_path / 'config.yaml'}"]
    cfg, choices = smoke_cfg("model=decoupled")  # its features come from model.init_from
    assert "backbone=" not in config_summary(cfg, choices, [], tmp_path / "c.yaml")[0]
    cfg, choices = smoke_cfg("print_config=full")
    tree, *lines = config_summary(cfg, choices, ["print_config=full"], tmp_path / "c.yaml")
    assert isinstance(tree, Tree)
    assert any(child.label.code.startswith("trainer:") for child in tree.children)
    assert lines[0].startswith("config: ") and lines[1] == "set: print_config=full"
