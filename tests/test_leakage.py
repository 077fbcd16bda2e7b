"""Leakage guards: no test (or val) information reaches training or anything fitted.

- train / val / test never share an image, whatever the data source and split settings;
- samplers and augmentation act on the training split only: val and test batches are the
  plain images, in order, each exactly once;
- post-hoc adjustment (and an ensemble's stacking) is fitted on validation only: poisoning
  the test split changes nothing that was fitted;
- the feature cache serves each split its own entry.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image
from torch.utils.data import Dataset

from tailtune.build.data import build_datamodule
from tailtune.build.models import build_experiment
from tailtune.cli.train import train
from tailtune.data.datamodule import ImbalancedDataModule
from tailtune.features import FeatureCache

SPLITS = ("train", "val", "test")


def _build(smoke_cfg, *overrides: str, name: str = "run") -> ImbalancedDataModule:
    cfg, _ = smoke_cfg(*overrides, name=name)
    return build_datamodule(cfg)


def _assert_disjoint(dm: ImbalancedDataModule, keys: list[Any] | None = None) -> None:
    """No index (or file) in two splits; ``keys`` maps a source index to its identity."""
    seen: dict[Any, str] = {}
    for split in SPLITS:
        indices = dm.split_indices[split]
        ids = list(indices) if keys is None else [keys[i] for i in indices]
        assert len(set(ids)) == len(ids), f"{split} holds an image twice"
        for item in ids:
            assert item not in seen, f"{item} is in both {seen[item]} and {split}"
            seen[item] = split


# -- disjoint splits ---------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    [], ["data.split_seed=3"], ["data.imbalance_ratio=100"],
    ["data.imbalance_profile=step", "data.imbalance_ratio=5"],
    ["data.val_fraction=0.3", "data.test_fraction=0.4"],
], ids=["default", "split-seed-3", "ratio-100", "step-profile", "large-val-test"])
def test_train_val_test_indices_are_disjoint_on_the_default_data(smoke_cfg, overrides):
    dm = _build(smoke_cfg, *overrides)
    _assert_disjoint(dm)
    # Every split is non-empty, and the long tail only ever removed training images.
    assert all(len(dm.split_indices[s]) for s in SPLITS)
    assert sum(dm.info.class_counts) == len(dm.split_indices["train"])


def _images(folder: Path, n: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_image_folder_and_csv_splits_share_no_file(smoke_cfg, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        _images(tmp_path / "folder" / "train" / name, 12, rng)  # test is carved from train/
        _images(tmp_path / "folder" / "val" / name, 3, rng)
    dm = _build(smoke_cfg, "data=image_folder", f"data.root={tmp_path / 'folder'}")
    paths = dm.source.load().paths
    _assert_disjoint(dm, [str(p) for p in paths])
    assert {Path(paths[i]).parts[-3] for i in dm.split_indices["val"]} == {"val"}

    rows = [(p.relative_to(tmp_path / "folder"), p.parent.name) for p in
            sorted((tmp_path / "folder").rglob("*.png"))]
    manifest = tmp_path / "folder" / "labels.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for path, label in rows:
            writer.writerow([path, label, "val" if path.parts[0] == "val" else ""])
    dm = _build(smoke_cfg, "data=csv", f"data.manifest={manifest}", name="csv")
    _assert_disjoint(dm, [str(p) for p in dm.source.load().paths])


# -- samplers and augmentation touch only train ------------------------------------------------
def _batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("sampler", ["over", "under", "weighted", "class_balanced",
                                     "progressive"])
def test_samplers_and_augmentation_change_only_training_batches(smoke_cfg, sampler):
    plain = _build(smoke_cfg, name="plain")
    dm = _build(smoke_cfg, f"sampler={sampler}", "transforms=flip_crop", name=sampler)
    assert np.array_equal(plain.split_indices["val"], dm.split_indices["val"])
    for split, loader, plain_loader in [("val", dm.val_dataloader(), plain.val_dataloader()),
                                        ("test", dm.test_dataloader(), plain.test_dataloader())]:
        images, labels = _batches(loader)
        plain_images, _ = _batches(plain_loader)
        # Each image once, in the eval order (val shuffled once, test as stored), exactly as
        # without sampler or augmentation.
        order = list(loader.sampler)
        assert sorted(order) == list(range(len(order))) and order == list(plain_loader.sampler)
        assert torch.equal(labels, torch.as_tensor(dm.split_labels(split))[order])
        assert torch.equal(images, plain_images), f"{split} images were augmented"
    # The training side did change: the sampler draws its own list, flip_crop moves pixels.
    drawn = list(dm.train_sampler)
    assert drawn != list(range(len(drawn))) and max(drawn) < len(dm.datasets["train"])
    first = torch.stack([dm.datasets["train"][i][0] for i in range(16)])
    plain_first = torch.stack([plain.datasets["train"][i][0] for i in range(16)])
    assert not torch.equal(first, plain_first)


# -- fitted on validation only -----------------------------------------------------------------
class Poisoned(Dataset):
    """A test split whose images are inverted and labels shifted: anything fitted on it
    would come out different."""

    def __init__(self, base: Dataset, num_classes: int) -> None:
        self.base = base
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return 1.0 - image, (int(label) + 1) % self.num_classes

    def __getattr__(self, name: str) -> Any:  # paths, indices, ... for cache identities
        return getattr(self.__dict__["base"], name)


@pytest.fixture
def poison_test_split(monkeypatch):
    original = ImbalancedDataModule._datasets

    def datasets(self, data):
        made = original(self, data)
        made["test"] = Poisoned(made["test"], len(data.class_names))
        return made

    return lambda: monkeypatch.setattr(ImbalancedDataModule, "_datasets", datasets)


def _run(smoke_cfg, name: str, *overrides: str) -> dict[str, Any]:
    cfg, choices = smoke_cfg(*overrides, name=name)
    with open_dict(cfg):  # its own caches: features of the poisoned split are not the clean ones
        cfg.paths.cache_dir = str(Path(cfg.paths.output_dir) / "cache")
    train(cfg, choices)
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


def test_posthoc_adjustment_is_fitted_on_validation_only(smoke_cfg, poison_test_split):
    args = ("model.posthoc=[logit_adjust,bias,temperature]", "trainer.max_epochs=1",
            "model.unfreeze_at=0")
    clean = _run(smoke_cfg, "clean", *args)
    poison_test_split()
    poisoned = _run(smoke_cfg, "poisoned", *args)
    assert poisoned["test"] != clean["test"]  # the poison reached the test split
    fitted = ("logit_adjust_tau", "class_bias", "temperature", "val_before", "val_after")
    assert {k: poisoned["posthoc"][k] for k in fitted} == {k: clean["posthoc"][k] for k in fitted}
    assert poisoned["val"] == clean["val"]


@pytest.mark.slow
def test_ensemble_stacking_is_fitted_on_validation_only(smoke_cfg, poison_test_split):
    if importlib.util.find_spec("tailtune.models.ensemble") is None:
        pytest.skip("model=ensemble does not exist yet (tailtune.models.ensemble)")
    args = ("model=ensemble", "combiner=stacking",
            "model.members=[efficientnet_lite0,efficientnet_lite1]")
    clean = _run(smoke_cfg, "clean", *args)
    poison_test_split()
    poisoned = _run(smoke_cfg, "poisoned", *args)
    assert poisoned["test"] != clean["test"]
    assert poisoned["val"] == clean["val"]
    assert poisoned.get("members", {}).keys() == clean.get("members", {}).keys()
    for name, member in clean.get("members", {}).items():
        assert poisoned["members"][name].get("val") == member.get("val"), name


# -- the feature cache -------------------------------------------------------------------------
def test_each_split_reads_only_its_own_feature_cache_entry(smoke_cfg, monkeypatch):
    if importlib.util.find_spec("tailtune.models.linear_probe") is None:
        pytest.skip("model=linear_probe does not exist yet (tailtune.models.linear_probe)")
    cfg, _ = smoke_cfg("model=linear_probe")
    cold, _ = build_experiment(cfg)  # extracts and writes the three entries
    keys = {split: cold.cache_report[split]["key"] for split in SPLITS}
    assert len(set(keys.values())) == 3

    reads: list[tuple[str, str]] = []
    get = FeatureCache.get

    def spy(self, key):
        entry = get(self, key)
        reads.append((key, entry.meta["split"] if entry else "miss"))
        return entry

    monkeypatch.setattr(FeatureCache, "get", spy)
    warm, _ = build_experiment(cfg)
    assert all(warm.cache_report[s]["hit"] for s in SPLITS)
    assert sorted(reads) == sorted((keys[s], s) for s in SPLITS)  # each its own, once
    for split in SPLITS:
        features, labels = warm.split_features(split)
        assert torch.equal(labels, torch.as_tensor(cold.split_labels(split)))
        assert torch.equal(features, cold.split_features(split)[0])
