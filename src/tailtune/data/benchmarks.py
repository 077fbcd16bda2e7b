"""Benchmark datasets with a fixed balanced test set: CIFAR-10/100 and Fashion-MNIST.

Both are small images, held decoded in memory as uint8; the datamodule makes their training
split long-tailed (the standard CIFAR-LT construction) and keeps the test set balanced.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from tailtune.data.sources import LabeledImages, channels_first

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


def _with_test(name: str, train: tuple[np.ndarray, np.ndarray],
               test: tuple[np.ndarray, np.ndarray], class_names: list[str]) -> LabeledImages:
    """Train and test in one array; the predefined splits say which rows are which."""
    n_train, n_test = len(train[1]), len(test[1])
    return LabeledImages(
        name=name,
        images=np.concatenate([channels_first(train[0]), channels_first(test[0])]),
        labels=np.concatenate([train[1], test[1]]).astype(np.int64),
        class_names=list(class_names),
        predefined_splits={"train": np.arange(n_train),
                           "test": np.arange(n_train, n_train + n_test)},
    )


def _download_error(what: str, data_dir: str, err: Exception) -> OSError:
    return OSError(
        f"could not get {what} into {os.path.abspath(data_dir)} ({type(err).__name__}: {err}); "
        "offline? Put "
        f"torchvision's copy there, or set data.source.data_dir to where it is"
    )


class CifarSource:
    """torchvision's CIFAR-10 or CIFAR-100 (50,000 train + 10,000 test, 32x32 RGB), downloaded
    once into ``data_dir``."""

    def __init__(self, num_classes: int = 10, data_dir: str = "data",
                 download: bool = True) -> None:
        if num_classes not in (10, 100):
            raise ValueError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes}")
        self.num_classes = num_classes
        self.data_dir = data_dir
        self.download = download
        self.name = f"cifar{num_classes}"

    def load(self) -> LabeledImages:
        from torchvision import datasets

        cls = datasets.CIFAR10 if self.num_classes == 10 else datasets.CIFAR100
        root = Path(self.data_dir).expanduser()
        try:
            train = cls(str(root), train=True, download=self.download)
            test = cls(str(root), train=False, download=self.download)
        except (OSError, RuntimeError) as err:  # no network, or not there with download=false
            raise _download_error(f"CIFAR-{self.num_classes}", str(root), err) from err
        return _with_test(self.name, (np.asarray(train.data), np.asarray(train.targets)),
                          (np.asarray(test.data), np.asarray(test.targets)), train.classes)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not, as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {array.size} values")
    return array.reshape(shape)


class FashionMnistSource:
    """Fashion-MNIST (60,000 train + 10,000 test, 28x28 grayscale, 10 balanced classes).

    Reads the IDX files from ``local_dir`` when all four are there (Debian's
    ``dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist: works offline);
    otherwise downloads through torchvision into ``data_dir``.
    """

    name = "fashion_mnist"
    FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def __init__(self, data_dir: str = "data", local_dir: str | None = FASHION_MNIST_DIR,
                 download: bool = True) -> None:
        self.data_dir = data_dir
        self.local_dir = local_dir
        self.download = download

    def _local_file(self, stem: str) -> Path | None:
        for suffix in (".gz", ""):
            path = Path(self.local_dir).expanduser() / f"{stem}{suffix}"
            if path.is_file():
                return path
        return None

    def load(self) -> LabeledImages:
        if self.local_dir:
            files = {split: [self._local_file(stem) for stem in stems]
                     for split, stems in self.FILES.items()}
            if all(p is not None for pair in files.values() for p in pair):
                train, test = ((read_idx(files[s][0]), read_idx(files[s][1])) for s in ("train",
                                                                                        "test"))
                return _with_test(self.name, train, test, FASHION_MNIST_CLASSES)
        from torchvision import datasets

        root = Path(self.data_dir).expanduser()
        try:
            train = datasets.FashionMNIST(str(root), train=True, download=self.download)
            test = datasets.FashionMNIST(str(root), train=False, download=self.download)
        except (OSError, RuntimeError) as err:
            raise _download_error("Fashion-MNIST", str(root), err) from err
        return _with_test(self.name, (train.data.numpy(), train.targets.numpy()),
                          (test.data.numpy(), test.targets.numpy()), list(train.classes))
