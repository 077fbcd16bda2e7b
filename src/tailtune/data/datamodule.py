"""The LightningDataModule: splits, long tail, loaders, and the DatasetInfo for the model."""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from tailtune.data.images import (
    DECODE_VERSION,
    RESIZE_MODES,
    decode_all,
    decode_image,
    resize_uint8,
)
from tailtune.data.info import DatasetInfo
from tailtune.data.longtail import (
    make_long_tailed,
    split_fingerprint,
    stratified_split,
    stratified_subsample,
)
from tailtune.data.sources import LabeledImages

SPLITS = ("train", "val", "test")
DECODE_MODES = ("auto", "eager", "lazy")
# decode=auto decodes image files once into one memory-mapped uint8 array at the served size
# (27 KB an image at 96 px, 147 KB at 224 px) while it stays under this many bytes; above
# it, each item is decoded from its file in the DataLoader workers, every epoch. Decoding a
# phone-size JPEG costs far more than a training step at 96 px on a CPU, so decoding once
# is what makes photo folders train in minutes.
EAGER_MAX_BYTES = 8 * 2**30
Transform = Callable[[torch.Tensor], torch.Tensor]


class ImageSource(Protocol):
    name: str

    def load(self) -> LabeledImages: ...


class EvalShardSampler(DistributedSampler):
    """An eval set's rows in a fixed order (``order``; default: as stored), in contiguous-stride
    shards with no padding.

    Lightning's default distributed sampler pads val/test with duplicates so every rank gets
    the same count, which biases metrics; torchmetrics syncs uneven shards correctly, so
    each sample is counted exactly once here. Being a DistributedSampler, Lightning keeps it.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None,
                 rank: int | None = None, order: Sequence[int] | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        order = list(range(len(dataset))) if order is None else [int(i) for i in order]
        self.indices = order[self.rank::self.num_replicas]
        self.num_samples = len(self.indices)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


def worker_start_method(num_workers: int) -> str | None:
    """How loader workers start: the process's default, except inside a joblib sweep job,
    whose default is loky's own start method; torch cannot start workers with it (a pickling
    error, then Lightning's "Please call `iter(combined_loader)` first"), so such a job starts
    them as a single run would: fork where the platform has it."""
    if num_workers == 0 or multiprocessing.get_start_method(allow_none=True) != "loky":
        return None
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def eval_sampler(split: str, dataset: Dataset) -> EvalShardSampler:
    """Val rows in one fixed shuffled order, so that a per-epoch ``trainer.limit_val_batches``
    scores a sample of every class, not the first classes of a folder sorted by class; test
    rows as stored (``test_predictions.npz`` pairs runs image by image). Sharded under DDP."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    order = np.random.default_rng(0).permutation(len(dataset)) if split == "val" else None
    return EvalShardSampler(dataset, order=order, **({} if distributed else
                                                     {"num_replicas": 1, "rank": 0}))


def _to_float(image: torch.Tensor, transform: Transform | None) -> torch.Tensor:
    """uint8 ``[C, H, W]`` -> float ``[3, H, W]`` in ``[0, 1]``; augmentation runs on uint8."""
    if image.shape[0] == 1:
        image = image.repeat(3, 1, 1)
    if transform is not None:
        image = transform(image)
    return image.float().div_(255.0)


class ArrayImageDataset(Dataset):
    """One split of images decoded once into a uint8 array ``[N, C, H, W]`` (in memory or
    memory-mapped); ``indices`` pick the split's rows, ``labels`` is per row of ``images``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                 transform: Transform | None = None) -> None:
        self.images = images
        self.labels = labels
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.indices[index]
        image = torch.from_numpy(np.array(self.images[row]))  # a copy: memmaps are read-only
        return _to_float(image, self.transform), int(self.labels[row])


class FileImageDataset(Dataset):
    """One split of image files, each decoded (and resized) when it is read, so in the
    DataLoader workers."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, image_size: int,
                 resize: str = "squash", transform: Transform | None = None) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = image_size
        self.resize = resize
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = torch.from_numpy(decode_image(self.paths[index], self.image_size, self.resize))
        return _to_float(image, self.transform), int(self.labels[index])


class ImbalancedDataModule(L.LightningDataModule):
    """Splits a source stratified by ``split_seed``, makes the training split long-tailed, and
    serves unnormalised image tensors at ``image_size``.

    Splits: a split the source defines (CIFAR's test set, a ``test/`` folder) is kept; a
    missing test split is carved from the pool with ``test_fraction``, then val with
    ``val_fraction`` (both fractions of the whole pool when both are carved, else of the
    training pool). Carving happens before the long tail, so val and test keep the source's
    class balance and are never resampled. ``val_fraction=0`` validates on the test split.
    ``sampler`` is a factory ``(labels=, seed=, num_classes=) -> Sampler`` for training only;
    ``train_transform`` augments training images only (uint8 ``[3, H, W]`` in and out).

    Decoded sources stay in memory. Image files are decoded once into a uint8 array
    (memory-mapped under ``cache_dir``) when ``decode=eager``, or per item in the loader
    workers when ``decode=lazy``; ``auto`` picks eager up to 64 px.

    ``subsample`` (quick checks: ``debug=smoke``) keeps about that many images of each split
    after the long tail, in class proportions and at least 6 per class, so that decoding,
    feature extraction and ensemble scoring are bounded too; it changes the split fingerprint.
    """

    def __init__(
        self,
        source: ImageSource,
        image_size: int = 32,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        split_seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        imbalance_ratio: float = 10.0,
        imbalance_profile: str = "exp",
        sampler: Callable[..., Sampler[int]] | None = None,
        seed: int = 0,
        train_transform: Transform | None = None,
        decode: str = "auto",
        resize: str = "squash",
        cache_dir: str | None = None,
        subsample: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if imbalance_ratio < 1:
            raise ValueError(f"data.imbalance_ratio must be >= 1, got {imbalance_ratio}")
        if not 0 <= val_fraction < 1 or not 0 < test_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1) and data.test_fraction in "
                             f"(0, 1), got {val_fraction} and {test_fraction}")
        if decode not in DECODE_MODES:
            raise ValueError(f"data.decode must be one of {', '.join(DECODE_MODES)}, got "
                             f"'{decode}'")
        if resize not in RESIZE_MODES:
            raise ValueError(f"data.resize must be one of {', '.join(RESIZE_MODES)}, got "
                             f"'{resize}'")
        self.source = source
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.split_seed = split_seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.imbalance_ratio = imbalance_ratio
        self.imbalance_profile = imbalance_profile
        self.sampler_factory = sampler
        self.seed = seed
        self.train_transform = train_transform
        self.decode = decode
        self.resize = resize
        self.cache_dir = cache_dir
        self.subsample = subsample
        self.subsampled = False
        self.split_indices: dict[str, np.ndarray] = {}
        self.datasets: dict[str, ArrayImageDataset | FileImageDataset] = {}
        self.train_sampler: Sampler[int] | None = None
        self.skipped: dict[str, list[str]] = {}
        self.decoded: str = "in memory"  # how images are held, for the summary
        self.val_is_test = False
        self._info: DatasetInfo | None = None

    # -- set-up ---------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._info is not None:  # idempotent: the pipeline sets up before the Trainer does
            return
        data = self.source.load()
        labels = data.labels
        num_classes = len(data.class_names)
        self.split_indices = self._split(data)
        self.split_indices["train"] = make_long_tailed(
            self.split_indices["train"], labels, num_classes, self.imbalance_ratio,
            self.imbalance_profile, seed=self.split_seed,
        )
        self.subsampled = False  # whether `subsample` left any image out (the summary says)
        if self.subsample:  # quick checks (debug=smoke): every phase sees a few images
            kept = {split: stratified_subsample(idx, labels, self.subsample, self.split_seed)
                    for split, idx in self.split_indices.items()}
            self.subsampled = any(len(kept[s]) < len(self.split_indices[s]) for s in kept)
            self.split_indices = kept
        counts = np.bincount(labels[self.split_indices["train"]], minlength=num_classes)
        empty = [data.class_names[c] for c in np.flatnonzero(counts == 0)]
        if empty:
            raise ValueError(f"classes with no training samples: {', '.join(empty)}")
        self.datasets = self._datasets(data)
        self.skipped = data.skipped
        name = f"{data.name}:{data.identity}" if data.identity else data.name
        self._info = DatasetInfo(
            name=data.name,
            class_names=tuple(data.class_names),
            class_counts=tuple(int(c) for c in counts),
            split_fingerprint=split_fingerprint(name, self.split_indices),
            image_size=self.image_size,
            val_is_test=self.val_is_test,
        )
        self._split_labels = {s: labels[idx] for s, idx in self.split_indices.items()}
        # Built here, not in train_dataloader, so a sampler that cannot work fails before
        # training and its effective class distribution is known when the loss is built.
        self.train_sampler = self.build_train_sampler()

    def _split(self, data: LabeledImages) -> dict[str, np.ndarray]:
        """Use the source's own splits where it has them; carve the rest, stratified."""
        splits = dict(data.predefined_splits)
        pool = splits.pop("train", np.arange(len(data.labels)))
        carved_test = "test" not in splits
        if carved_test:
            pool, splits["test"] = self._carve(pool, data, self.test_fraction, "test")
        if "val" not in splits and self.val_fraction == 0:
            splits["val"] = splits["test"]
            self.val_is_test = True
            rank_zero_warn("data.val_fraction=0: validating (and picking the best checkpoint) "
                           "on the test split, as the published CIFAR-LT code does")
        elif "val" not in splits:
            fraction = self.val_fraction / (1.0 - self.test_fraction) if carved_test \
                else self.val_fraction
            pool, splits["val"] = self._carve(pool, data, fraction, "val")
        splits["train"] = pool
        return splits

    def _carve(self, pool: np.ndarray, data: LabeledImages, fraction: float,
               split: str) -> tuple[np.ndarray, np.ndarray]:
        """Stratified ``(rest, carved)`` in which every class of the pool is in both parts."""
        labels = data.labels
        classes, counts = np.unique(labels[pool], return_counts=True)
        if (counts < 2).any():
            few = [data.class_names[c] for c in classes[counts < 2]]
            raise ValueError(
                f"cannot carve a stratified {split} split: class(es) {', '.join(few[:10])} have "
                f"a single image left in the pool (carving val and test needs 3 per class); "
                f"add images or give the dataset its own {split} split"
            )
        size: float | int = fraction
        if math.ceil(fraction * len(pool)) < len(classes):  # too few for one of each class
            size = len(classes)
        if len(pool) - math.ceil(size * len(pool) if isinstance(size, float) else size) \
                < len(classes):
            raise ValueError(f"data.{split}_fraction={fraction} leaves fewer training images "
                             f"than classes ({len(classes)}); lower it")
        rest, carved = stratified_split(pool, labels, size, self.split_seed)
        # scikit-learn rounds per class, so a rare class can get no carved image; move one.
        rng = np.random.default_rng(self.split_seed)
        for c in classes:
            if not (labels[carved] == c).any():
                moved = rng.choice(rest[labels[rest] == c])
                rest, carved = rest[rest != moved], np.append(carved, moved)
            elif not (labels[rest] == c).any():
                moved = rng.choice(carved[labels[carved] == c])
                carved, rest = carved[carved != moved], np.append(rest, moved)
        return np.sort(rest), np.sort(carved)

    def _datasets(self, data: LabeledImages) -> dict[str, ArrayImageDataset | FileImageDataset]:
        def transform(split: str) -> Transform | None:
            return self.train_transform if split == "train" else None

        if data.images is not None:
            # Once at set-up, kept uint8: cheap in memory, no per-epoch work.
            images = resize_uint8(torch.from_numpy(np.ascontiguousarray(data.images)),
                                  self.image_size).numpy()
            return {split: ArrayImageDataset(images, data.labels, idx, transform(split))
                    for split, idx in self.split_indices.items()}
        assert data.paths is not None
        # Only the files some split uses: the long tail leaves many training files out.
        used = np.unique(np.concatenate(list(self.split_indices.values())))
        eager = self.decode == "eager" or (
            self.decode == "auto" and len(used) * 3 * self.image_size ** 2 <= EAGER_MAX_BYTES)
        if not eager:
            self.decoded = "per item from files"
            return {split: FileImageDataset([data.paths[i] for i in idx], data.labels[idx],
                                            self.image_size, self.resize, transform(split))
                    for split, idx in self.split_indices.items()}
        cache = Path(self.cache_dir) if self.cache_dir else None
        images = decode_all([data.paths[i] for i in used], self.image_size, self.resize, cache)
        self.decoded = "decoded once, memory-mapped" if cache else "decoded once, in memory"
        return {split: ArrayImageDataset(images, data.labels[used], np.searchsorted(used, idx),
                                         transform(split))
                for split, idx in self.split_indices.items()}

    def transform_identity(self, augmented: bool = True) -> str:
        """How images become tensors (feature caches key on it): torch's antialiased
        bilinear resize of decoded arrays, or PIL's decoding of files, plus any augmentation
        (``augmented=False``: the training images without it)."""
        files = self.decoded != "in memory"
        identity = f"pil-{self.resize}-bilinear-v{DECODE_VERSION}" if files \
            else "uint8-resize-bilinear-antialias"
        augmentation = self.train_transform if augmented else None
        return identity + (f"+train:{augmentation!r}" if augmentation else "")

    @property
    def info(self) -> DatasetInfo:
        if self._info is None:
            raise RuntimeError("call setup() before reading the dataset info")
        return self._info

    def split_labels(self, split: str) -> np.ndarray:
        return self._split_labels[split]

    def train_class_counts(self, epoch: int) -> np.ndarray:
        """Expected class counts the training loader draws in ``epoch`` (after sampling):
        the prior that prior-based losses correct for and post-hoc adjustment removes."""
        from tailtune.imbalance.samplers import sampled_class_counts

        return sampled_class_counts(self.train_sampler, self.info.class_counts, epoch)

    def summary_title(self) -> str:
        return f"{self.info.name}: imbalance ratio {self.info.imbalance_ratio:.1f} (train)"

    def summary_table(self) -> Table:
        """Per-class counts per split."""
        info = self.info
        table = Table()
        table.add_column("class")
        for split in SPLITS:
            label = "val (= test)" if split == "val" and self.val_is_test else split
            table.add_column(label, justify="right")
        per_split = {
            s: np.bincount(self._split_labels[s], minlength=info.num_classes) for s in SPLITS
        }
        for c, name in enumerate(info.class_names):
            table.add_row(name, *(str(per_split[s][c]) for s in SPLITS))
        table.add_row("total", *(str(per_split[s].sum()) for s in SPLITS), style="bold")
        return table

    def summary_notes(self) -> list[str]:
        """How the images are held, and what was subsampled or skipped."""
        notes = [f"images {self.decoded} at {self.image_size} px"]
        if self.subsampled:
            notes.append(f"subsampled to about {self.subsample} images per split (subsample)")
        return notes + [f"skipped {len(files)} file(s): {why}"
                        for why, files in self.skipped.items()]

    def print_summary(self, console: Console | None = None) -> None:
        """The title and notes as lines around the class table (as its title and caption
        they were wrapped to the table's width)."""
        from tailtune.console import CONSOLE, marked  # stderr, with the other diagnostics

        console = console or CONSOLE
        with console:  # one write, whole beside another sweep job's output
            console.print(marked(self.summary_title()), soft_wrap=True, markup=False)
            console.print(self.summary_table())
            for note in self.summary_notes():
                console.print(marked(note), soft_wrap=True, markup=False)

    # -- loaders ---------------------------------------------------------------------------
    def _loader(self, split: str, sampler: Sampler[int] | None = None) -> DataLoader:
        # A loader-owned generator: creating an iterator draws the workers' base seed from it,
        # never from the global RNG that EpochReseed sets (Lightning creates the first iterator
        # of a resumed run before the epoch-start hooks, later ones after them).
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            generator=generator,
            multiprocessing_context=worker_start_method(self.num_workers),
        )

    def build_train_sampler(self) -> Sampler[int]:
        from tailtune.imbalance.samplers import ShuffleSampler

        factory = self.sampler_factory or ShuffleSampler
        return factory(
            labels=self._split_labels["train"], seed=self.seed,
            num_classes=self.info.num_classes,
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_sampler is not None, "setup() builds the sampler"
        return self._loader("train", self.train_sampler)

    def _eval_loader(self, split: str) -> DataLoader:
        return self._loader(split, eval_sampler(split, self.datasets[split]))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
