"""The on-disk feature cache: hits skip the backbone, any change of input misses, concurrent
writers and damaged files never hand out wrong features."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from tailtune.backbones import Preprocess
from tailtune.data.datamodule import ImbalancedDataModule
from tailtune.data.sources import ArraySource
from tailtune.features import FeatureCache, FeatureDataModule, FeatureExtractor, cache_key


class TinyBackbone(nn.Module):
    """A timm-shaped backbone that counts the images it has seen."""

    num_features = 8

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3)
        self.images_seen = 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(x)
        return torch.relu(self.conv(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def images_datamodule(split_seed: int = 0) -> ImbalancedDataModule:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 60)
    images = rng.integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8)
    return ImbalancedDataModule(ArraySource(images, labels, name="toy"), image_size=8,
                                batch_size=16, imbalance_ratio=4, split_seed=split_seed)


def all_images(data: FeatureDataModule) -> int:
    return sum(len(d) for d in data.images.datasets.values())


def feature_data(cache_dir, backbone=None, size: int = 12, dtype: str = "float32",
                 split_seed: int = 0) -> FeatureDataModule:
    backbone = backbone or TinyBackbone()
    extractor = FeatureExtractor(backbone, Preprocess(size, (0.5,) * 3, (0.5,) * 3),
                                 {"name": "tiny"}, dtype=dtype)
    return FeatureDataModule(images_datamodule(split_seed), extractor, FeatureCache(cache_dir),
                             batch_size=16, extract_batch_size=32)


def test_second_run_reads_the_cache_and_never_calls_the_backbone(tmp_path):
    first = feature_data(tmp_path)
    first.setup("fit")
    assert first.extractor.backbone.images_seen == all_images(first)  # every split, once
    assert not any(r["hit"] for r in first.cache_report.values())

    second = feature_data(tmp_path)
    second.setup("fit")
    assert second.extractor.backbone.images_seen == 0
    assert all(r["hit"] for r in second.cache_report.values())
    for split in ("train", "val", "test"):
        a, b = first.split_features(split), second.split_features(split)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Batches of the training loader are feature rows, and never run the backbone either.
    features, labels = next(iter(second.train_dataloader()))
    assert features.shape == (16, 8) and labels.dtype == torch.long
    assert second.extractor.backbone.images_seen == 0


def test_cached_features_are_what_the_extractor_computes_from_the_images(tmp_path):
    data = feature_data(tmp_path, dtype="float16")
    data.setup("fit")
    images, labels = next(iter(data.images.test_dataloader()))
    features, cached_labels = data.split_features("test")
    assert features.dtype == torch.float16
    assert torch.equal(cached_labels[: len(labels)], labels)
    assert torch.allclose(data.extractor(images).float(), features[: len(labels)].float(),
                          atol=1e-3)


@pytest.mark.parametrize("change", ["resolution", "weights"])
def test_a_change_of_resolution_or_weights_misses(tmp_path, change):
    feature_data(tmp_path).setup("fit")
    if change == "resolution":
        data = feature_data(tmp_path, size=16)
    else:
        backbone = TinyBackbone()
        with torch.no_grad():
            backbone.conv.bias[0] += 1e-3  # the same architecture, other weights
        data = feature_data(tmp_path, backbone=backbone)
    data.setup("fit")
    assert data.extractor.backbone.images_seen == all_images(data)
    assert not any(r["hit"] for r in data.cache_report.values())
    assert len(list(tmp_path.glob("*.feat"))) == 6


def test_every_input_of_the_features_is_in_the_key(tmp_path):
    def key(data: FeatureDataModule, split: str = "train") -> str:
        data.images.setup("fit")
        return cache_key(data.key_parts(split))

    base = key(feature_data(tmp_path))
    assert key(feature_data(tmp_path)) == base  # deterministic
    assert key(feature_data(tmp_path, dtype="float16")) != base
    assert key(feature_data(tmp_path, split_seed=1)) != base  # other split indices
    assert key(feature_data(tmp_path), "val") != base
    other_layer = feature_data(tmp_path)
    other_layer.extractor.layer = 0
    assert key(other_layer) != base


def _write_many(root: str, value: float, rounds: int, start) -> None:
    cache = FeatureCache(root)
    features = torch.from_numpy(np.full((2000, 256), value, dtype=np.float32))  # 2 MB
    labels = torch.from_numpy(np.full(2000, int(value), dtype=np.int64))
    start.wait()
    for _ in range(rounds):
        cache.put("k" * 32, features, labels, {"writer": value})


def test_two_concurrent_writers_leave_one_valid_entry(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the writers touch no OpenMP code
    start = ctx.Barrier(3)
    writers = [ctx.Process(target=_write_many, args=(str(tmp_path), v, 15, start))
               for v in (1.0, 2.0)]
    for w in writers:
        w.start()
    start.wait()
    cache, seen = FeatureCache(tmp_path), set()
    while any(w.is_alive() for w in writers):  # read while they write: whole entries or none
        entry = cache.get("k" * 32)
        if entry is not None:
            value = float(entry.features[0, 0])
            assert torch.all(entry.features == value) and torch.all(entry.labels == int(value))
            seen.add(value)
    for w in writers:
        w.join(timeout=60)
        assert w.exitcode == 0
    entry = cache.get("k" * 32)
    assert entry is not None and entry.features.shape == (2000, 256)
    assert torch.all(entry.features == entry.features[0, 0])
    assert entry.meta["writer"] == float(entry.features[0, 0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k" * 32 + ".feat"]  # no temp files


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte"])
def test_a_damaged_entry_is_detected_and_rebuilt_not_loaded(tmp_path, damage):
    first = feature_data(tmp_path)
    first.setup("fit")
    train_key = first.cache_report["train"]["key"]
    path = FeatureCache(tmp_path).path(train_key)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        data[-100] ^= 0xFF
        path.write_bytes(data)
    assert FeatureCache(tmp_path).get(train_key) is None

    second = feature_data(tmp_path)
    second.setup("fit")
    assert not second.cache_report["train"]["hit"]
    assert second.cache_report["val"]["hit"] and second.cache_report["test"]["hit"]
    assert second.extractor.backbone.images_seen == len(second.split_features("train")[1])
    assert torch.equal(second.split_features("train")[0], first.split_features("train")[0])
    assert FeatureCache(tmp_path).get(train_key) is not None  # rebuilt, valid again


def test_other_ranks_wait_for_rank_zero_instead_of_extracting(tmp_path, monkeypatch):
    leader = feature_data(tmp_path / "leader")
    leader.setup("fit")  # the entries rank zero will write, computed elsewhere first

    def rank_zero_writes_later() -> None:
        time.sleep(0.5)
        for path in (tmp_path / "leader").glob("*.feat"):
            os.replace(path, tmp_path / "shared" / path.name)

    (tmp_path / "shared").mkdir()
    monkeypatch.setenv("LOCAL_RANK", "1")
    follower = feature_data(tmp_path / "shared")
    follower.wait_timeout = 30
    writer = threading.Thread(target=rank_zero_writes_later)
    writer.start()
    follower.setup("fit")
    writer.join()
    assert follower.extractor.backbone.images_seen == 0
    assert torch.equal(follower.split_features("test")[0], leader.split_features("test")[0])

    alone = feature_data(tmp_path / "empty")
    alone.wait_timeout = 0.2
    with pytest.raises(TimeoutError, match="rank zero"):
        alone.setup("fit")
