"""Checkpoints written before the build layer existed still load, and evaluate to the test
metrics their runs reported (tests/data/checkpoints_v0/README.md says how they were made)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tailtune
from helpers import TESTS, compose_config
from tailtune.build.checkpoints import MOVED, read_checkpoint, upgrade_targets
from tailtune.build.config import target_class
from tailtune.cli.evaluate import evaluate

OLD = TESTS / "data" / "checkpoints_v0"
REPORTED = json.loads((OLD / "metrics.json").read_text())
KINDS = {"finetune": "FineTuneModule", "probe": "LinearProbeModule",
         "decoupled": "DecoupledModule", "ensemble": "EnsembleModule"}


def _old_checkpoint(name: str, tmp_path: Path) -> Path:
    """The checkpoint, with the decoupled one pointing at the fine-tuned checkpoint it was
    trained from (its run stored that file's absolute path on the machine that wrote it)."""
    if name != "decoupled":
        return OLD / f"{name}.ckpt"
    source = shutil.copy(OLD / "finetune.ckpt", tmp_path / "finetune.ckpt")
    checkpoint = torch.load(OLD / "decoupled.ckpt", weights_only=True)
    checkpoint["tailtune"]["config"]["model"]["init_from"] = str(source)
    torch.save(checkpoint, tmp_path / "decoupled.ckpt")
    return tmp_path / "decoupled.ckpt"


@pytest.mark.parametrize("name", list(KINDS))
def test_an_old_checkpoint_loads_and_predicts(name, tmp_path):
    model = tailtune.load(str(_old_checkpoint(name, tmp_path)))
    assert type(model).__name__ == KINDS[name]
    probs = model.predict_images(torch.rand(3, 3, 20, 20))
    assert probs.shape == (3, 10) and torch.allclose(probs.sum(1), torch.ones(3))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KINDS))
def test_an_old_checkpoint_evaluates_to_the_test_metrics_its_run_reported(name, tmp_path):
    path = _old_checkpoint(name, tmp_path)
    cfg, _ = compose_config("eval", [f"ckpt_path={path}", "debug=smoke"], tmp_path / "eval")
    tested = evaluate(cfg)["test"]  # the whole test split, whatever debug=smoke's limit says
    reported = REPORTED[name]["test"]
    if name == "ensemble":  # its run scored the whole split
        for key in ("acc", "bal_acc", "macro_f1"):
            assert tested[key] == pytest.approx(reported[key], abs=1e-6), key
        return
    # The single runs' final test passes obeyed debug=smoke's 2-batch limit (before
    # 2026-12-03): they scored the first 2 batches of the test split as stored.
    saved = np.load(tmp_path / "eval" / "test_predictions.npz")
    rows = 2 * cfg.data.eval_batch_size
    first = tailtune.load(str(path)).score(
        torch.from_numpy(saved["probs"][:rows]).clamp_min(1e-30).log(),
        torch.from_numpy(saved["targets"][:rows]))
    for key in reported:
        assert first[key] == pytest.approx(reported[key], abs=1e-5), key


def test_old_targets_still_name_their_classes():
    config = read_checkpoint(OLD / "probe.ckpt")["tailtune"]["config"]
    assert config["sampler"]["_target_"] == "tailtune.imbalance.resampling.SMOTESampler"
    for node in (config["model"], config["sampler"], config["data"], config["loss"]):
        assert target_class(node) is not None
    ensemble = read_checkpoint(OLD / "ensemble.ckpt")["tailtune"]["config"]
    for member in ensemble["model"]["member_configs"]:
        assert target_class(member["model"]).__name__ == "LinearProbeModule"


def test_targets_of_moved_code_are_mapped_when_a_checkpoint_is_read(tmp_path):
    old = {"_target_": "tailtune.data.features.FeatureDataModule",
           "nested": [{"_target_": "tailtune.imbalance.resampling.FeatureRows"},
                      {"_target_": "tailtune.imbalance.resampling.SMOTESampler"}]}
    new = upgrade_targets(old)
    assert target_class(new).__module__ == "tailtune.features.datamodule"
    assert target_class(new["nested"][0]).__module__ == "tailtune.features.rows"
    assert new["nested"][1] == old["nested"][1]  # not moved: unchanged
    assert len(MOVED) == 2  # a class moved later gets its line in MOVED and a case here
    checkpoint = torch.load(OLD / "probe.ckpt", weights_only=True)
    checkpoint["tailtune"]["config"]["model"]["features"]["_note"] = old  # anywhere in it
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    read = read_checkpoint(tmp_path / "moved.ckpt")["tailtune"]["config"]
    assert read["model"]["features"]["_note"] == new
