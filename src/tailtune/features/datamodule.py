"""Serve frozen-backbone features instead of images: the data side of linear probes.

:class:`FeatureDataModule` wraps an image datamodule. At set-up it turns each split into
feature vectors once, with the model's :class:`~tailtune.features.extractor.FeatureExtractor`,
reading them from the on-disk :class:`~tailtune.features.cache.FeatureCache` when a valid entry
exists.
Training then never runs the backbone: batches are ``(features, label)`` rows.

The training sampler is either the image datamodule's own index sampler (the features keep
the training split's row order, so ``sampler=over``, ``class_balanced``, ... work unchanged)
or a feature-space resampler (:mod:`tailtune.imbalance.resampling`, e.g. SMOTE), which is
built here from the training features and draws new rows every epoch (served through
:class:`~tailtune.features.rows.ResampledRows`). Val and test are never resampled.

Under DDP, rank zero (per node) extracts and writes the cache; the other ranks wait for the
verified entries and read them.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from tailtune.console import track
from tailtune.data.datamodule import ImbalancedDataModule, eval_sampler, worker_start_method
from tailtune.data.info import DatasetInfo
from tailtune.features.cache import FeatureCache, cache_key, indices_sha256
from tailtune.features.extractor import FeatureExtractor
from tailtune.features.rows import FeatureRows, ResampledRows
from tailtune.imbalance.samplers import sampled_class_counts

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _local_rank() -> int:
    for name in ("LOCAL_RANK", "SLURM_LOCALID", "JSM_NAMESPACE_LOCAL_RANK"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 0


def dataset_identity(images: ImbalancedDataModule) -> dict[str, Any]:
    """What the images are: the source's own fingerprint if it has one (e.g. a digest of its
    arrays, or of a file list with sizes and mtimes); else its type, plain settings and the
    split fingerprint (which covers the dataset's file-list digest), plus the size and mtime
    of every file the datamodule reads lazily."""
    source = images.source
    hook = getattr(source, "fingerprint", None)
    if callable(hook):
        return {"source": hook()}
    params = {k: v for k, v in vars(source).items()
              if not k.startswith("_") and isinstance(v, (str, int, float, bool, type(None)))}
    identity: dict[str, Any] = {
        "source": f"{type(source).__module__}.{type(source).__qualname__}", "params": params,
        "name": images.info.name, "split_fingerprint": images.info.split_fingerprint}
    files = sorted({str(p) for d in images.datasets.values() for p in getattr(d, "paths", [])})
    if files:
        digest = hashlib.sha256()
        for path in files:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        identity["files"] = digest.hexdigest()[:32]
    return identity


def transform_identity(images: ImbalancedDataModule, augmented: bool = True) -> dict[str, Any]:
    """The image pipeline in front of the extractor: the datamodule's resize, plus whatever a
    datamodule with transforms declares through a ``transform_identity()`` hook
    (``augmented=False``: without the training augmentation)."""
    hook = getattr(images, "transform_identity", None)
    return {
        "datamodule": f"{type(images).__module__}.{type(images).__qualname__}",
        "image_size": int(images.image_size),
        "resize": getattr(images, "resize", None),
        "transform": hook(augmented) if callable(hook) else "uint8-resize-bilinear-antialias",
    }


@torch.no_grad()
def extract_features(dataset: Dataset, extractor: FeatureExtractor, batch_size: int = 256,
                     device: str | torch.device = "cpu", num_workers: int = 0,
                     description: str = "extracting features") -> tuple[Tensor, Tensor]:
    """Features ``[N, D]`` (in the extractor's dtype, on CPU) and labels ``[N]`` of a dataset,
    in its order."""
    # Its own generator: a loader without one draws its base seed from the global RNG, and a
    # cache miss would then initialise the head differently from a hit.
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        generator=torch.Generator(),
                        multiprocessing_context=worker_start_method(num_workers))
    first = next(extractor.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    extractor.to(device).eval()
    features, labels = [], []
    try:
        for images, targets in track(loader, description):
            features.append(extractor(images.to(device)).cpu())
            labels.append(torch.as_tensor(targets, dtype=torch.long))
    finally:
        extractor.to(home)  # the model shares this backbone; the trainer places it later
    if not features:
        return torch.empty(0, extractor.num_features, dtype=extractor.feature_dtype), \
            torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


def unaugmented_train_features(
    images: ImbalancedDataModule, extractor: FeatureExtractor, cache: FeatureCache | None,
    batch_size: int = 256, device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor, bool]:
    """``(features, labels, cache_hit)`` of the training split's images *without* their
    augmentation, in split order: what a fine-tune's head sees while the backbone is frozen,
    minus the random flips and crops. Without augmentation the key is the one
    :class:`FeatureDataModule` uses for the split, so linear probes share the entry."""
    dataset = copy.copy(images.datasets["train"])
    dataset.transform = None
    parts = {"extractor": extractor.identity(), "dataset": dataset_identity(images),
             "transform": transform_identity(images, augmented=False),
             "indices": indices_sha256(images.split_indices["train"])}

    def create() -> tuple[Tensor, Tensor]:
        return extract_features(dataset, extractor, batch_size, device, images.num_workers,
                                description="extracting train features")

    if cache is None:
        return (*create(), False)
    entry, hit = cache.get_or_create(cache_key(parts), create, {"split": "train", "parts": parts})
    return entry.features, entry.labels, hit


class FeatureDataModule(L.LightningDataModule):
    """``(features, label)`` batches of an image datamodule's splits (see the module docstring).

    ``cache``: where features live between runs; None extracts into memory every run.
    ``resampler``: a feature-space resampler factory
    ``(features=, labels=, seed=, num_classes=) -> Sampler`` whose ``draw`` holds the rows it
    serves in the current epoch; None uses the image datamodule's training sampler.
    """

    def __init__(
        self,
        images: ImbalancedDataModule,
        extractor: FeatureExtractor,
        cache: FeatureCache | None = None,
        batch_size: int = 256,
        eval_batch_size: int | None = None,
        extract_batch_size: int = 256,
        resampler: Callable[..., Sampler[int]] | None = None,
        device: str | torch.device = "cpu",
        wait_timeout: float = 3600.0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"feature batch_size must be >= 1, got {batch_size}")
        self.images = images
        self.extractor = extractor
        self.cache = cache
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.extract_batch_size = extract_batch_size
        self.resampler_factory = resampler
        self.device = device
        self.wait_timeout = wait_timeout
        self.features: dict[str, FeatureRows] = {}
        self.train_sampler: Sampler[int] | None = None
        self.cache_report: dict[str, dict[str, Any]] = {}
        self._reported = False

    # -- set-up ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if not self.features:  # idempotent: the build layer sets up before the Trainer does
            self.images.setup(stage)
            self._load_all()
            self.train_sampler = self._build_train_sampler()
        self._report_to_loggers()

    def _load_all(self) -> None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed and self.cache is not None:
            # Rank zero extracts; the others read its verified entries after the barrier.
            if dist.get_rank() == 0:
                self._load_splits(wait=False)
            dist.barrier()
            if dist.get_rank() != 0:
                self._load_splits(wait=False)
            return
        # Before the process group exists (the build layer sets up data first), the node's
        # local rank zero extracts and the other ranks wait for its entries.
        self._load_splits(wait=_local_rank() != 0 and self.cache is not None)

    def _load_splits(self, wait: bool) -> None:
        for split in SPLITS:
            self.features[split] = self._load(split, wait)
        if self.cache is not None:
            total = self.cache.size_bytes() / 2**20
            hits = sum(r["hit"] for r in self.cache_report.values())
            log.info("feature cache %s: %d hit(s), %d miss(es), %.1f MB on disk",
                     self.cache.root, hits, len(self.cache_report) - hits, total)

    def key_parts(self, split: str) -> dict[str, Any]:
        """Everything that changes a split's features; its hash is the cache key. The rows
        are named by their indices, not the split's name, so a val split that is the test
        split (``data.val_fraction=0``) shares its entry."""
        return {
            "extractor": self.extractor.identity(),
            "dataset": dataset_identity(self.images),
            "transform": transform_identity(self.images),
            "indices": indices_sha256(self.images.split_indices[split]),
        }

    def _load(self, split: str, wait: bool) -> FeatureRows:
        dataset = self.images.datasets[split]
        started = time.perf_counter()

        def create() -> tuple[Tensor, Tensor]:
            return extract_features(dataset, self.extractor, self.extract_batch_size,
                                    self.device, self.images.num_workers,
                                    description=f"extracting {split} features")

        if self.cache is None:
            features, labels = create()
            hit, key, nbytes = False, None, features.numel() * features.element_size()
        else:
            parts = self.key_parts(split)
            key = cache_key(parts)
            meta = {"split": split, "parts": parts}
            if wait:
                entry, hit = self.cache.wait_for(key, self.wait_timeout), True
            else:
                entry, hit = self.cache.get_or_create(key, create, meta)
            features, labels, nbytes = entry.features, entry.labels, entry.nbytes
        if len(labels) != len(dataset):
            raise RuntimeError(f"{split}: {len(labels)} cached feature rows for "
                               f"{len(dataset)} images")
        seconds = time.perf_counter() - started
        self.cache_report[split] = {"hit": hit, "key": key, "rows": len(labels),
                                    "dim": int(features.shape[1]), "mb": nbytes / 2**20,
                                    "seconds": seconds}
        log.info("features %s: %s (%d x %d, %.2f MB, %.2f s)", split,
                 "cache hit" if hit else ("cache miss, extracted" if key else "extracted"),
                 len(labels), features.shape[1], nbytes / 2**20, seconds)
        return FeatureRows(features, labels.long())

    def _report_to_loggers(self) -> None:
        trainer = getattr(self, "trainer", None)
        if self._reported or trainer is None or self.cache is None or not trainer.loggers:
            return
        self._reported = True
        hits = sum(r["hit"] for r in self.cache_report.values())
        values = {"features/cache_hits": float(hits),
                  "features/cache_misses": float(len(self.cache_report) - hits),
                  "features/cache_mb": self.cache.size_bytes() / 2**20}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=0)

    def _build_train_sampler(self) -> Sampler[int]:
        if self.resampler_factory is None:
            assert self.images.train_sampler is not None, "the image datamodule builds it"
            return self.images.train_sampler
        train = self.features["train"]
        return self.resampler_factory(features=train.features, labels=train.labels.numpy(),
                                      seed=self.images.seed, num_classes=self.info.num_classes)

    # -- what the rest of tailtune reads ---------------------------------------------------
    @property
    def info(self) -> DatasetInfo:
        return self.images.info

    @property
    def seed(self) -> int:
        return self.images.seed

    def split_features(self, split: str) -> tuple[Tensor, Tensor]:
        """``(features, labels)`` of a split as extracted (never resampled)."""
        rows = self.features[split]
        return rows.features, rows.labels

    def split_labels(self, split: str) -> np.ndarray:
        return self.images.split_labels(split)

    def train_class_counts(self, epoch: int) -> np.ndarray:
        """Expected class counts of ``epoch``'s training rows (after any resampling)."""
        return sampled_class_counts(self.train_sampler, self.info.class_counts, epoch)

    def print_summary(self, console: Console | None = None) -> None:
        self.images.print_summary(console)

    # -- loaders ---------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler[int] | None
                ) -> DataLoader:
        # In-memory rows: workers would only add start-up cost. The loader-owned generator
        # matches the image datamodule (no draw from the global RNG).
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                          num_workers=0, generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        assert self.train_sampler is not None, "setup() builds the sampler"
        sampler = self.train_sampler
        # A feature-space resampler draws rows of its own; an index sampler picks training rows.
        dataset = ResampledRows(sampler) if self.resampler_factory is not None \
            else self.features["train"]
        return self._loader(dataset, self.batch_size, sampler)

    def _eval_loader(self, split: str) -> DataLoader:
        rows = self.features[split]
        return self._loader(rows, self.eval_batch_size, eval_sampler(split, rows))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
