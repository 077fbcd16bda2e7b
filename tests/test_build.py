"""The build layer: what it builds is what the model classes declare, members and options
come through Hydra's compose API, and its small shared rules (device, plain config)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from tailtune.build.config import compose_option, model_class, plain_config
from tailtune.build.ensemble import member_configs
from tailtune.build.models import build_experiment, load_checkpoint_model
from tailtune.build.results import final_metrics
from tailtune.build.trainer import build_trainer, choose_device, training_callbacks
from tailtune.features import FeatureDataModule
from tailtune.models.decoupled import DecoupledModule
from tailtune.models.ensemble import EnsembleModule
from tailtune.models.finetune import FineTuneModule
from tailtune.models.linear_probe import LinearProbeModule


def test_model_classes_declare_their_kind():
    assert not FineTuneModule.trains_on_features and not FineTuneModule.is_ensemble
    assert LinearProbeModule.trains_on_features and not LinearProbeModule.builds_on_checkpoint
    assert DecoupledModule.trains_on_features and DecoupledModule.builds_on_checkpoint
    assert EnsembleModule.is_ensemble
    assert [c.kind for c in (FineTuneModule, LinearProbeModule, DecoupledModule,
                             EnsembleModule)] == ["finetune", "linear_probe", "decoupled",
                                                  "ensemble"]
    assert DecoupledModule.wants_balanced_sampling({"method": "crt", "class_balanced": True})
    assert not DecoupledModule.wants_balanced_sampling({"method": "tau_norm"})
    assert not LinearProbeModule.wants_balanced_sampling({})


def test_the_kind_comes_from_the_class_not_from_config_keys(smoke_cfg):
    cfg, _ = smoke_cfg("+model.features.layer=pre_logits")  # a finetune config with the key
    assert model_class(cfg) is FineTuneModule
    data, model = build_experiment(cfg)
    assert isinstance(model, FineTuneModule) and not isinstance(data, FeatureDataModule)


def test_a_new_approach_needs_its_module_and_its_config_only(smoke_cfg, tmp_path):
    """tests/helpers/models.py's PlainProbe declares trains_on_features: the build layer
    gives it an extractor and cached features, trains it and reloads its checkpoint."""
    cfg, _ = smoke_cfg("model=linear_probe")
    with open_dict(cfg):
        cfg.model = {"_target_": "helpers.models.PlainProbe", "_partial_": True, "lr": 0.1,
                     "log_figures": False, "features": cfg.model.features}
    data, model = build_experiment(cfg)
    assert type(model).__name__ == "PlainProbe" and isinstance(data, FeatureDataModule)
    assert model.extractor is data.extractor
    trainer = build_trainer(cfg, tmp_path / "run", training_callbacks(cfg, data), loggers=[])
    trainer.fit(model, datamodule=data)
    metrics = final_metrics(trainer, model, data)
    loaded = load_checkpoint_model(metrics["best_checkpoint"])
    assert type(loaded).__name__ == "PlainProbe"
    assert torch.equal(loaded.head.weight, model.head.weight.cpu())


def test_ensemble_members_are_composed_through_hydra(smoke_cfg, tmp_path, monkeypatch):
    """A backbone option of the user's config dir ($TAILTUNE_CONFIG_DIR, added to Hydra's
    search path by tailtune's plugin) is a member like the shipped ones."""
    (tmp_path / "user" / "backbone").mkdir(parents=True)
    (tmp_path / "user" / "backbone" / "tiny_net.yaml").write_text(
        "_target_: tailtune.backbones.create_backbone\nname: test_efficientnet\n"
        "weights: none\nimage_size: ${data.image_size}\n")
    monkeypatch.setenv("TAILTUNE_CONFIG_DIR", str(tmp_path / "user"))
    assert compose_option("backbone", "tiny_net").name == "test_efficientnet"
    cfg, _ = smoke_cfg("model=ensemble", "model.members=[tiny_net,efficientnet_lite1]")
    (_, first), (_, second) = member_configs(cfg)
    assert first.backbone.name == "test_efficientnet"
    assert first.backbone.image_size == cfg.data.image_size  # interpolated in the run config
    assert second.backbone.name == "tf_efficientnet_lite1"
    with pytest.raises(ValueError, match="unknown ensemble member backbone 'nope'.*tiny_net"):
        compose_option("backbone", "nope", "ensemble member backbone")


def test_one_device_rule():
    assert choose_device("cuda:1", "cpu") == "cuda:1"  # an explicit choice wins
    assert choose_device("auto", "cpu") == "cpu"
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert choose_device("auto", "gpu") == expected
    assert choose_device() == expected


def test_plain_config_makes_the_source_checkpoint_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.create({"model": {"init_from": "runs/best.ckpt"}, "hydra": {"x": 1}})
    plain = plain_config(cfg)
    assert plain == {"model": {"init_from": str(tmp_path / "runs" / "best.ckpt")}}
    assert cfg.model.init_from == "runs/best.ckpt"  # the config itself is left as it was
    assert Path(plain["model"]["init_from"]).is_absolute()


def test_reported_metrics_cover_whole_splits_whatever_the_batch_limits(smoke_cfg, tmp_path):
    """debug=smoke limits val and test to 2 batches per epoch; the final passes, the numbers a
    run reports and the post-hoc step tuned on val, still see every image of both splits."""
    cfg, _ = smoke_cfg("model.posthoc=temperature")
    assert cfg.trainer.limit_val_batches == 2 and cfg.trainer.limit_test_batches == 2
    data, model = build_experiment(cfg)
    trainer = build_trainer(cfg, tmp_path / "run", training_callbacks(cfg, data), loggers=[])
    trainer.fit(model, datamodule=data)
    assert len(data.datasets["test"]) > 2 * cfg.data.eval_batch_size  # the limit would bite
    metrics = final_metrics(trainer, model, data)
    assert int(model.test_confusion.sum()) == len(data.datasets["test"])
    val_counts = np.bincount(data.split_labels("val"), minlength=data.info.num_classes)
    assert metrics["posthoc"]["val_min_class_count"] == val_counts.min()
