"""Real datasets: the CIFAR-LT construction, Fashion-MNIST, image folders, CSV manifests,
robust loading, decoding once vs per item, and training-only augmentation.

Nothing here downloads: CIFAR and torchvision's Fashion-MNIST are replaced by fakes with the
same attributes, and image folders are written by the tests.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from helpers import compose_config, run_cli
from tailtune.data import images as images_module
from tailtune.data.benchmarks import CifarSource, FashionMnistSource, read_idx
from tailtune.data.datamodule import ImbalancedDataModule
from tailtune.data.folders import CsvManifestSource, ImageFolderSource
from tailtune.data.images import NOT_IMAGE, check_image, decode_image, scan_images
from tailtune.data.sources import ArraySource
from tailtune.data.transforms import flip_crop, randaugment

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


# -- fakes and folders --------------------------------------------------------------------------
class _FakeCifar:
    """torchvision's CIFAR interface (``data`` NHWC uint8, ``targets``, ``classes``) over
    generated images whose pixels encode their label, so a kept image's class can be checked."""

    calls: list[tuple[str, bool, bool]] = []
    per_class = {True: 5000, False: 1000}
    num_classes = 10
    size = 2

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        type(self).calls.append((root, train, download))
        k, n = self.num_classes, self.per_class[train]
        self.targets = [c for c in range(k) for _ in range(n)]
        rng = np.random.default_rng(int(train))
        order = rng.permutation(len(self.targets))  # CIFAR's files are not sorted by class
        self.targets = [self.targets[i] for i in order]
        self.data = np.repeat(np.array(self.targets, dtype=np.uint8)[:, None, None, None],
                              self.size * self.size * 3, axis=1).reshape(-1, self.size,
                                                                         self.size, 3)
        self.classes = [f"class{c}" for c in range(k)]


def _fake_cifar(monkeypatch: pytest.MonkeyPatch, num_classes: int = 10) -> type[_FakeCifar]:
    per_class = {10: {True: 5000, False: 1000}, 100: {True: 500, False: 100}}[num_classes]
    fake = type("FakeCifar", (_FakeCifar,), {"calls": [], "num_classes": num_classes,
                                              "per_class": per_class})
    monkeypatch.setattr(f"torchvision.datasets.CIFAR{num_classes}", fake)
    return fake


def _digit_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images / 16.0 * 255).astype(np.uint8), digits.target


def write_digit_folder(root: Path, counts: dict[str, dict[int, int]], size: int = 8) -> None:
    """``root/<split>/<digit>/<i>.png`` with the given per-class counts: real scanned digits,
    in a mix of PNG modes (grayscale, palette, RGBA, RGB)."""
    gray, target = _digit_images()
    for split, per_class in counts.items():
        for digit, n in per_class.items():
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            pool = np.flatnonzero(target == digit)
            offset = {"train": 0, "val": 100, "test": 130}.get(split, 0)
            for i in range(n):
                image = Image.fromarray(gray[pool[(offset + i) % len(pool)]], mode="L")
                if size != 8:
                    image = image.resize((size, size), Image.Resampling.NEAREST)
                image = [image, image.convert("P"), image.convert("RGBA"),
                         image.convert("RGB")][i % 4]
                image.save(folder / f"{i:03d}.png")


def write_photo_folder(root: Path, counts: dict[str, dict[str, int]], seed: int = 0) -> None:
    """``root/<split>/<class>/<i>.jpg``: random crops, flips and rotations of scikit-learn's
    two bundled photos (``china`` and ``flower``), of varied sizes and aspect ratios."""
    from sklearn.datasets import load_sample_images

    photos = dict(zip(("china", "flower"), load_sample_images().images, strict=True))
    rng = np.random.default_rng(seed)
    for split, per_class in counts.items():
        for name, n in per_class.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            photo = photos[name]
            for i in range(n):
                h, w = rng.integers(90, 300), rng.integers(90, 300)
                top, left = rng.integers(0, 427 - h), rng.integers(0, 640 - w)
                image = Image.fromarray(photo[top:top + h, left:left + w])
                image = image.rotate(float(rng.uniform(-20, 20))) if i % 3 else image
                if i % 5 == 4:
                    image = image.convert("L")  # grayscale JPEGs happen
                image.save(folder / f"{i:03d}.jpg", quality=90)


def _truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _broken_png(path: Path, where: bytes = b"IDAT") -> None:
    """A PNG with one flipped byte in a chunk: pixel data (IDAT) or its header (IHDR)."""
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[data.index(where) + 6] ^= 0xFF
    path.write_bytes(bytes(data))


def _folder_dm(root: Path, **kwargs) -> ImbalancedDataModule:
    source_args = {k: kwargs.pop(k) for k in ("on_bad_image",) if k in kwargs}
    dm = ImbalancedDataModule(
        ImageFolderSource(str(root), cache_dir=kwargs.get("cache_dir"), **source_args),
        **{"image_size": 8, "imbalance_ratio": 1, "val_fraction": 0.2, "test_fraction": 0.2,
           **kwargs})
    dm.setup()
    return dm


# -- CIFAR-LT ---------------------------------------------------------------------------------
def test_cifar10_lt_at_ratio_100_is_the_published_training_set(monkeypatch, tmp_path):
    fake = _fake_cifar(monkeypatch)
    dm = ImbalancedDataModule(CifarSource(10, data_dir=str(tmp_path)), image_size=2,
                              val_fraction=0, imbalance_ratio=100)
    dm.setup()
    assert list(dm.info.class_counts) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert len(dm.split_indices["train"]) == 12406
    assert dm.info.class_names == tuple(f"class{c}" for c in range(10))
    assert {(str(tmp_path), True, True), (str(tmp_path), False, True)} <= set(fake.calls)
    # The test split is CIFAR's own 10,000 balanced test images; val is that same set here.
    assert np.array_equal(dm.split_indices["test"], np.arange(50000, 60000))
    assert np.bincount(dm.split_labels("test")).tolist() == [1000] * 10
    assert dm.val_is_test and np.array_equal(dm.split_indices["val"], dm.split_indices["test"])
    # Every kept image is of its label's class (the fake's pixels encode the class).
    train = dm.datasets["train"]
    for i in np.random.default_rng(0).choice(len(train), 50, replace=False):
        image, label = train[int(i)]
        assert torch.allclose(image, torch.full_like(image, label / 255.0))


def test_cifar100_lt_at_ratio_100_has_10847_training_images(monkeypatch, tmp_path):
    _fake_cifar(monkeypatch, 100)
    dm = ImbalancedDataModule(CifarSource(100, data_dir=str(tmp_path)), image_size=2,
                              val_fraction=0, imbalance_ratio=100)
    dm.setup()
    assert len(dm.split_indices["train"]) == 10847
    assert dm.info.class_counts[0] == 500 and dm.info.class_counts[-1] == 5


def test_cifar_val_is_balanced_and_carved_before_the_long_tail(monkeypatch, tmp_path):
    _fake_cifar(monkeypatch)
    dm = ImbalancedDataModule(CifarSource(10, data_dir=str(tmp_path)), image_size=2,
                              val_fraction=0.02, imbalance_ratio=100, imbalance_profile="step")
    dm.setup()
    val, train = set(dm.split_indices["val"]), set(dm.split_indices["train"])
    assert np.bincount(dm.split_labels("val")).tolist() == [100] * 10
    assert not val & train and max(val | train) < 50000  # both from CIFAR's training images
    # n_max is what the carve left per class: 4,900, then the step profile halves the classes.
    assert list(dm.info.class_counts) == [4900] * 5 + [49] * 5
    assert not dm.val_is_test


def test_cifar_that_cannot_be_downloaded_is_one_readable_oserror(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise RuntimeError("Dataset not found or corrupted. You can use download=True")

    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OSError, match="could not get CIFAR-10 into") as err:
        CifarSource(10, data_dir="data", download=False).load()
    # Where, whatever dir the run started in (data_dir is relative by default).
    assert f"into {tmp_path / 'data'} (" in str(err.value)


def test_cifar_configs_compose_to_the_documented_construction(tmp_path):
    cfg, _ = compose_config("train", ["data=cifar100_lt"], tmp_path / "run")
    assert cfg.data.source.num_classes == 100 and cfg.data.imbalance_ratio == 100
    assert cfg.data.source.data_dir == cfg.paths.data_dir


# -- Fashion-MNIST ----------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_local_idx_files_and_makes_train_long_tailed(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 20)):
        labels = np.repeat(np.arange(10), n // 10)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels  # a pixel that names the class
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
    data = FashionMnistSource(data_dir=str(tmp_path / "nowhere"), local_dir=str(tmp_path),
                              download=False).load()
    assert data.images.shape == (80, 1, 28, 28)
    assert np.array_equal(data.images[:, 0, 0, 0], data.labels)
    assert data.class_names[0] == "T-shirt/top" and len(data.class_names) == 10
    dm = ImbalancedDataModule(FashionMnistSource(local_dir=str(tmp_path)), image_size=28,
                              val_fraction=0, imbalance_ratio=6)
    dm.setup()
    assert dm.info.class_counts[0] == 6 and dm.info.class_counts[-1] == 1
    image, label = dm.datasets["train"][0]
    assert image.shape == (3, 28, 28) and torch.equal(image[0], image[2])  # gray, as RGB
    assert round(float(image[0, 0, 0]) * 255) == label


def test_fashion_mnist_falls_back_to_torchvision_without_local_files(monkeypatch, tmp_path):
    calls = []

    class FakeFashion:
        classes = ["a"] * 10

        def __init__(self, root, train, download):
            calls.append((root, train, download))
            n = 30 if train else 10
            self.data = torch.zeros(n, 28, 28, dtype=torch.uint8)
            self.targets = torch.arange(n) % 10

    monkeypatch.setattr("torchvision.datasets.FashionMNIST", FakeFashion)
    data = FashionMnistSource(data_dir=str(tmp_path), local_dir=str(tmp_path / "absent")).load()
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    assert len(data.predefined_splits["test"]) == 10


def test_a_file_that_is_not_idx_is_refused(tmp_path):
    bad = tmp_path / "x-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 12)
    with pytest.raises(ValueError, match="not a uint8 IDX"):
        read_idx(bad)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_lt_trains_offline(tmp_path):
    # test=false: the final passes score whole splits, and 10,000 test images would add a
    # minute; the metrics' agreement with scikit-learn is checked on the other datasets.
    result = run_cli("tailtune-train", "data=fashion_mnist_lt", "debug=smoke", "subsample=null",
                     "data.source.download=false", "test=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(next((tmp_path / "logs").rglob("metrics.json")).read_text())
    assert metrics["dataset"]["class_counts"][0] == 5880  # 6,000 less the 2% balanced val
    assert metrics["dataset"]["class_counts"][-1] == 58
    assert 0.0 <= metrics["val"]["bal_acc"] <= 1.0 and "test" not in metrics


# -- image folders ----------------------------------------------------------------------------
def test_image_folder_classes_splits_and_natural_imbalance(tmp_path):
    counts = {0: 30, 1: 12, 2: 5}
    write_digit_folder(tmp_path, {"train": counts, "test": {0: 4, 1: 4, 2: 4}})
    dm = _folder_dm(tmp_path)
    assert dm.info.class_names == ("0", "1", "2")
    # test/ is taken as it is; val is carved from train/ stratified, every class in both.
    assert np.bincount(dm.split_labels("test")).tolist() == [4, 4, 4]
    train_val = np.bincount(dm.split_labels("train")) + np.bincount(dm.split_labels("val"))
    assert train_val.tolist() == [30, 12, 5]  # ratio 1 keeps the natural imbalance
    assert set(dm.split_labels("val")) == {0, 1, 2} and set(dm.split_labels("train")) == {0, 1, 2}
    splits = [set(dm.split_indices[s]) for s in ("train", "val", "test")]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    # Each served image is the digit its folder says (a real image, not a re-labelled one).
    paths = {s: dm.datasets[s] for s in ("train", "val", "test")}
    assert all(0.0 <= float(paths[s][0][0].min()) for s in paths)


def test_missing_val_and_test_are_carved_stratified_with_every_class_present(tmp_path):
    write_digit_folder(tmp_path, {"train": {0: 40, 1: 9, 2: 3}})
    for seed in range(4):
        dm = _folder_dm(tmp_path, split_seed=seed)
        for split in ("train", "val", "test"):
            assert set(dm.split_labels(split)) == {0, 1, 2}, (seed, split)
        sizes = sum(len(dm.split_indices[s]) for s in ("train", "val", "test"))
        assert sizes == 52 and len(set(np.concatenate(list(dm.split_indices.values())))) == 52


def test_a_class_too_small_to_carve_is_a_clear_error(tmp_path):
    write_digit_folder(tmp_path, {"train": {0: 20, 1: 2}})
    with pytest.raises(ValueError, match="class\\(es\\) 1 have a single image"):
        _folder_dm(tmp_path)


def test_the_long_tail_can_be_imposed_on_a_folder(tmp_path):
    write_digit_folder(tmp_path, {"train": {0: 30, 1: 30, 2: 30},
                                  "val": {0: 2, 1: 2, 2: 2}, "test": {0: 2, 1: 2, 2: 2}})
    dm = _folder_dm(tmp_path, imbalance_ratio=10)
    assert list(dm.info.class_counts) == [30, 9, 3]


@pytest.mark.parametrize(("layout", "error", "match"), [
    ({"val": ["0", "1", "7"]}, ValueError, "has class folder\\(s\\) that train/ lacks: 7"),
    ({"test": ["0"]}, ValueError, "lacks class folder\\(s\\) that train/ has: 1"),
])
def test_class_folders_must_agree_across_splits(tmp_path, layout, error, match):
    write_digit_folder(tmp_path, {"train": {0: 5, 1: 5}})
    for split, classes in layout.items():
        write_digit_folder(tmp_path, {split: {int(c): 3 for c in classes}})
    with pytest.raises(error, match=match):
        _folder_dm(tmp_path)


def test_one_class_is_refused_before_any_image_is_decoded(tmp_path, monkeypatch):
    """It stopped only when the model was built, after every image was checked and decoded,
    with "need at least 2 classes" and no word of the data."""
    write_digit_folder(tmp_path, {"train": {3: 6}})
    monkeypatch.setattr(images_module, "check_image", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(ValueError, match="has one class folder \\(3\\): a classifier needs"):
        ImageFolderSource(str(tmp_path)).load()
    manifest = tmp_path / "one.csv"
    manifest.write_text("path,label\nx.png,cat\ny.png,cat\n")
    with pytest.raises(ValueError, match="has one label \\(cat\\)"):
        CsvManifestSource(str(manifest)).load()


def test_an_image_above_pillows_pixel_limit_is_called_too_large(tmp_path, monkeypatch):
    """Pillow's guard said "could be decompression bomb DOS attack" of a large photo."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    Image.new("L", (2100, 1000)).save(tmp_path / "panorama.png")
    reason = check_image(tmp_path / "panorama.png")
    assert reason.startswith("too large to decode (2 megapixels, above Pillow's limit of 2)")


def test_a_symlink_loop_in_a_class_folder_is_named(tmp_path):
    """os.walk followed it 40 levels deep, pulled other classes' images into the class and
    ended in a 1,000-character "unreadable image"."""
    write_digit_folder(tmp_path, {"train": {0: 4, 1: 4}})
    (tmp_path / "train" / "0" / "up").symlink_to("..")
    with pytest.raises(ValueError, match="train/0/up is a symlink loop"):
        ImageFolderSource(str(tmp_path)).load()


def test_bad_roots_and_empty_classes_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root does not exist"):
        ImageFolderSource(str(tmp_path / "absent")).load()
    with pytest.raises(ValueError, match="data.root is not set"):
        ImageFolderSource(None).load()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with pytest.raises(ValueError, match="data.root is empty"):
        ImageFolderSource(str(tmp_path / "empty")).load()
    (tmp_path / "flat" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match="no train/ folder.*cats"):
        ImageFolderSource(str(tmp_path / "flat")).load()
    write_digit_folder(tmp_path / "ok", {"train": {0: 4}})
    (tmp_path / "ok" / "train" / "9").mkdir()
    (tmp_path / "ok" / "train" / "9" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(ValueError, match="train/9 has no images \\(only .DS_Store\\)") as err:
        ImageFolderSource(str(tmp_path / "ok")).load()
    assert "\n" not in str(err.value)


def test_non_image_files_are_skipped_and_counted(tmp_path):
    write_digit_folder(tmp_path, {"train": {0: 6, 1: 6}, "test": {0: 3, 1: 3}})
    (tmp_path / "train" / "0" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "train" / "1" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (tmp_path / "train" / "1" / "notes.txt").write_text("scanned at 300 dpi")
    (tmp_path / "train" / "1" / "labels.csv").write_bytes(b"")  # empty, not named an image
    (tmp_path / "test" / "README.txt").write_text("digits")
    dm = _folder_dm(tmp_path)
    assert sorted(dm.skipped["not an image"]) == [
        "train/0/.DS_Store", "train/1/Thumbs.db", "train/1/labels.csv", "train/1/notes.txt"]
    assert dm.skipped["outside a class folder"] == ["test/README.txt"]
    assert sum(len(dm.split_indices[s]) for s in ("train", "val", "test")) == 18
    assert "skipped 4 file(s): not an image" in dm.summary_notes()


def test_broken_images_stop_the_run_at_setup_listing_every_one(tmp_path):
    write_digit_folder(tmp_path, {"train": {0: 6, 1: 6}, "test": {0: 3, 1: 3}})
    _truncated_jpeg(tmp_path / "train" / "0" / "cut.jpg")
    _broken_png(tmp_path / "test" / "1" / "flipped.png")
    _broken_png(tmp_path / "test" / "0" / "header.png", b"IHDR")
    (tmp_path / "train" / "1" / "empty.jpg").write_bytes(b"")
    # Named like an image but text (an error page saved as one): broken, not a stray file.
    (tmp_path / "train" / "1" / "broken.png").write_text("not an image\n")
    (tmp_path / "test" / "0" / "banner.gif").write_text("<html>404 not found</html>")
    with pytest.raises(ValueError) as err:
        _folder_dm(tmp_path)
    message = str(err.value)
    assert "6 unreadable image(s)" in message and "data.on_bad_image=skip" in message
    assert "train/1/broken.png (not an image, despite its .png extension)" in message
    assert "test/0/banner.gif (not an image, despite its .gif extension)" in message
    assert "train/0/cut.jpg (OSError" in message and "train/1/empty.jpg (empty file)" in message
    assert "test/1/flipped.png (SyntaxError: broken PNG file" in message
    assert "test/0/header.png (damaged image header)" in message and "\n" not in message


def test_on_bad_image_skip_leaves_them_out_and_reports_them(tmp_path):
    write_digit_folder(tmp_path, {"train": {0: 6, 1: 6}, "test": {0: 3, 1: 3}})
    _truncated_jpeg(tmp_path / "train" / "0" / "cut.jpg")
    dm = _folder_dm(tmp_path, on_bad_image="skip")
    assert dm.skipped["unreadable"] == ["train/0/cut.jpg"]
    assert sum(len(dm.split_indices[s]) for s in ("train", "val", "test")) == 18
    with pytest.raises(ValueError, match="on_bad_image must be one of error, skip"):
        ImageFolderSource(str(tmp_path), on_bad_image="ignore")


def test_image_modes_all_become_rgb_with_their_colours(tmp_path):
    gray = Image.fromarray(np.full((8, 8), 100, np.uint8), "L")
    palette = Image.new("P", (8, 8))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 1
    rgba = Image.fromarray(np.full((8, 8, 4), (10, 20, 30, 0), np.uint8), "RGBA")
    deep = Image.fromarray(np.full((8, 8), 257 * 200, np.uint16))  # 16-bit grayscale
    # A dark 16-bit image is dark: scaled by its mode, not its own values (250 came out as
    # 250 and 260 as 1 when only values above 255 were taken for 16-bit data).
    dark = Image.fromarray(np.full((8, 8), 250, np.uint16))
    unit = Image.fromarray(np.full((8, 8), 0.5, np.float32))  # floats in 0..1 (mode F)
    cases = {"gray.png": (gray, (100, 100, 100)), "palette.png": (palette, (255, 0, 0)),
             "rgba.png": (rgba, (10, 20, 30)), "deep.png": (deep, (200, 200, 200)),
             "dark.png": (dark, (1, 1, 1)), "unit.tif": (unit, (128, 128, 128)),
             "bw.bmp": (Image.new("1", (8, 8), 1), (255, 255, 255))}
    for name, (image, colour) in cases.items():
        image.save(tmp_path / name)
        out = decode_image(tmp_path / name, 8)
        assert out.shape == (3, 8, 8) and out.dtype == np.uint8, name
        assert out[:, 4, 4].tolist() == list(colour), name
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(cmyk)
    out = decode_image(cmyk, 8)
    assert out.shape == (3, 8, 8) and out[0, 4, 4] > 200 and out[1, 4, 4] < 60  # red


def test_center_crop_keeps_the_middle_and_squash_the_whole(tmp_path):
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255  # a white middle third
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert decode_image(tmp_path / "wide.png", 10, "center_crop").min() == 255
    squashed = decode_image(tmp_path / "wide.png", 10, "squash")
    assert squashed[:, :, 0].max() == 0 and squashed[:, :, 5].min() == 255


def test_the_file_check_is_cached_until_a_file_changes(tmp_path):
    write_digit_folder(tmp_path / "d", {"train": {0: 3}})
    files = sorted((tmp_path / "d").rglob("*.png"))
    checked: list[Path] = []

    def counting(path: Path) -> str | None:
        checked.append(path)
        return check_image(path)

    cache = tmp_path / "scan.json"
    assert len(scan_images(files, cache, counting).images) == 3 and len(checked) == 3
    assert len(scan_images(files, cache, counting).images) == 3 and len(checked) == 3
    _truncated_jpeg(files[1])  # replaced by a broken file: size and mtime change
    result = scan_images(files, cache, counting)
    assert checked[3:] == [files[1]] and list(result.bad) == [files[1]]
    # A verdict an older check cached (no version) is not trusted: a text file named .png,
    # which that check skipped as "not an image", is checked again and is a broken image.
    text = tmp_path / "d" / "train" / "0" / "broken.png"
    text.write_text("not an image\n")
    stat = text.stat()
    cache.write_text(json.dumps({str(text): [stat.st_size, stat.st_mtime_ns, NOT_IMAGE]}))
    result = scan_images([text], cache, counting)
    assert checked[-1] == text and list(result.bad) == [text]


def test_eager_and_lazy_decoding_serve_identical_images(tmp_path, monkeypatch):
    write_photo_folder(tmp_path / "photos", {"train": {"china": 6, "flower": 4},
                                             "test": {"china": 2, "flower": 2}})
    common = {"image_size": 48, "val_fraction": 0.2, "cache_dir": str(tmp_path / "cache")}
    lazy = _folder_dm(tmp_path / "photos", decode="lazy", **common)
    eager = _folder_dm(tmp_path / "photos", decode="eager", **common)
    assert lazy.decoded == "per item from files"
    assert eager.decoded == "decoded once, memory-mapped"
    assert len(list((tmp_path / "cache" / "decoded").glob("*.npy"))) == 1
    for split in ("train", "val", "test"):
        assert np.array_equal(lazy.split_indices[split], eager.split_indices[split])
        for i in range(len(lazy.datasets[split])):
            a, b = lazy.datasets[split][i], eager.datasets[split][i]
            assert torch.equal(a[0], b[0]) and a[1] == b[1]
    # A second set-up reads the memory-mapped array: nothing is decoded again.
    monkeypatch.setattr(images_module, "decode_image", lambda *a, **k: pytest.fail("decoded"))
    again = _folder_dm(tmp_path / "photos", decode="eager", **common)
    assert isinstance(again.datasets["train"].images, np.memmap)
    assert torch.equal(again.datasets["test"][0][0], eager.datasets["test"][0][0])


def test_auto_decode_picks_by_the_size_of_the_decoded_array(tmp_path, monkeypatch):
    from tailtune.data import datamodule

    write_digit_folder(tmp_path, {"train": {0: 5, 1: 5}, "test": {0: 2, 1: 2}})
    # Photos of any resolution are decoded once while the array fits the budget ...
    assert _folder_dm(tmp_path, image_size=224).decoded == "decoded once, in memory"
    # ... and per item above it: 14 files at 64 px fit, at 72 px they do not.
    monkeypatch.setattr(datamodule, "EAGER_MAX_BYTES", 14 * 3 * 64 * 64)
    assert _folder_dm(tmp_path, image_size=64).decoded == "decoded once, in memory"
    assert _folder_dm(tmp_path, image_size=72).decoded == "per item from files"


def test_folder_changes_change_the_split_and_content_fingerprints(tmp_path):
    write_digit_folder(tmp_path, {"train": {0: 5, 1: 5}, "test": {0: 2, 1: 2}})
    first = _folder_dm(tmp_path, val_fraction=0.3)
    split, content = first.info.split_fingerprint, first.source.fingerprint()
    # Same names, new pixels: the split is the same, but cached features would be stale.
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "test" / "0" / "000.png")
    again = _folder_dm(tmp_path, val_fraction=0.3)
    assert again.info.split_fingerprint == split and again.source.fingerprint() != content
    shutil.copy(tmp_path / "test" / "0" / "000.png", tmp_path / "test" / "0" / "zzz.png")
    assert _folder_dm(tmp_path, val_fraction=0.3).info.split_fingerprint != split


# -- CSV manifests ----------------------------------------------------------------------------
def _manifest(tmp_path: Path, rows: list[str], header: str = "path,label,split") -> Path:
    path = tmp_path / "lists" / "manifest.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_manifest_paths_labels_and_splits(tmp_path):
    write_digit_folder(tmp_path / "img", {"all": {2: 8, 3: 8}})
    # Labels "2" and "10" (the 3s, relabelled): class order must be numeric, not "10" < "2".
    rows = [f"../img/all/{d}/{i:03d}.png,{label},{'test' if i >= 6 else ''}"
            for d, label in ((3, 10), (2, 2)) for i in range(8)]
    source = CsvManifestSource(str(_manifest(tmp_path, rows)))
    dm = ImbalancedDataModule(source, image_size=8, imbalance_ratio=1, val_fraction=0.25)
    dm.setup()
    assert dm.info.class_names == ("2", "10")  # numeric labels in numeric order
    assert np.bincount(dm.split_labels("test")).tolist() == [2, 2]
    assert len(dm.split_indices["train"]) + len(dm.split_indices["val"]) == 12
    image, label = dm.datasets["test"][0]
    expected = decode_image(tmp_path / "img/all/2/006.png", 8)
    assert torch.equal(image, torch.from_numpy(expected).float() / 255) and label == 0


@pytest.mark.parametrize(("rows", "header", "match"), [
    (["a.png,cat,train", "a.png,cat,test"], "path,label,split", "listed twice"),
    (["a.png,cat,train", "sub/../a.png,cat,test"], "path,label,split", "listed twice"),
    (["a.png,cat,holdout"], "path,label,split", "unknown split 'holdout'"),
    (["a.png,cat,train", "b.png,dog,test"], "path,label,split",
     "in the test split but not in train: dog"),
    (["a.png"], "path", "needs column\\(s\\) label"),
    ([], "path,label", "lists no images"),
])
def test_bad_manifests_are_refused(tmp_path, rows, header, match):
    with pytest.raises(ValueError, match=match):
        CsvManifestSource(str(_manifest(tmp_path, rows, header))).load()


def test_one_image_under_two_names_is_refused(tmp_path):
    """A symlink in test/ to a training image would test on a training image."""
    write_digit_folder(tmp_path, {"train": {0: 3, 1: 3}, "test": {0: 2, 1: 2}})
    (tmp_path / "test/1/link.png").symlink_to(tmp_path / "train/1/000.png")
    with pytest.raises(ValueError, match="train/1/000.png and test/1/link.png are the same file"):
        ImageFolderSource(str(tmp_path)).load()
    rows = ["../train/0/000.png,zero,train", f"{tmp_path}/train/0/000.png,zero,test"]
    with pytest.raises(ValueError, match="listed twice"):  # relative and absolute
        CsvManifestSource(str(_manifest(tmp_path, rows))).load()


def test_numeric_labels_that_compare_equal_keep_one_order():
    from tailtune.data.folders import _sorted_labels

    assert _sorted_labels({"1", "01", "10", "2"}) == ["01", "1", "2", "10"]


def test_other_arrays_of_the_same_shape_get_another_split_fingerprint():
    """Resume, ensembles and init_from compare fingerprints: arrays' content must count."""
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    prints = []
    for _ in range(2):
        dm = ImbalancedDataModule(
            ArraySource(rng.integers(0, 256, (60, 8, 8), dtype=np.uint8), labels),
            image_size=8, imbalance_ratio=1)
        dm.setup()
        prints.append(dm.info.split_fingerprint)
    assert prints[0] != prints[1]


def test_a_manifest_naming_missing_files_lists_them(tmp_path):
    write_digit_folder(tmp_path, {"all": {0: 3, 1: 3}})
    rows = [f"../all/{c}/{i:03d}.png,{name}" for c, name in ((0, "zero"), (1, "one"))
            for i in range(3)] + ["../all/0/gone.png,zero"]
    with pytest.raises(ValueError, match="1 unreadable image.*gone.png \\(FileNotFoundError"):
        CsvManifestSource(str(_manifest(tmp_path, rows, "path,label"))).load()


# -- augmentation -----------------------------------------------------------------------------
def _array_dm(transform=None) -> ImbalancedDataModule:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (120, 16, 16, 3), dtype=np.uint8)
    dm = ImbalancedDataModule(ArraySource(images, np.arange(120) % 3), image_size=16,
                              imbalance_ratio=1, train_transform=transform)
    dm.setup()
    return dm


@pytest.mark.parametrize("build", [flip_crop, randaugment])
def test_augmentation_touches_training_images_only_and_never_normalises(build):
    plain, augmented = _array_dm(), _array_dm(build(16))
    for split in ("val", "test"):
        for i in range(5):
            assert torch.equal(plain.datasets[split][i][0], augmented.datasets[split][i][0])
    torch.manual_seed(0)
    changed = 0
    for i in range(20):
        image, label = augmented.datasets["train"][i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert label == plain.datasets["train"][i][1]
        changed += not torch.equal(image, plain.datasets["train"][i][0])
    assert changed >= 10


@pytest.mark.parametrize("option", ["none", "flip_crop", "randaugment"])
def test_transform_options_compose_and_reach_the_training_set_only(tmp_path, option):
    from tailtune.build.data import build_datamodule

    cfg, choices = compose_config("train", ["debug=smoke", f"transforms={option}"],
                                  tmp_path / "run")
    assert choices["transforms"] == option
    dm = build_datamodule(cfg)
    train_transform = dm.datasets["train"].transform
    assert (train_transform is None) == (option == "none")
    assert dm.datasets["val"].transform is None and dm.datasets["test"].transform is None
    if option != "none":
        out = instantiate(cfg.transforms)(torch.zeros(3, 16, 16, dtype=torch.uint8))
        assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)


# -- the command line -------------------------------------------------------------------------
@pytest.mark.slow  # a CLI run end to end (pyproject's marker)
def test_a_broken_image_fails_the_cli_before_training_in_one_line(tmp_path):
    write_digit_folder(tmp_path / "data", {"train": {0: 5, 1: 5}})
    _truncated_jpeg(tmp_path / "data" / "train" / "1" / "cut.jpg")
    result = run_cli("tailtune-train", "data=image_folder", f"data.root={tmp_path / 'data'}",
                     "debug=smoke", cwd=tmp_path)
    assert result.returncode == 2
    line = next(x for x in result.stderr.splitlines() if x.startswith("tailtune: error:"))
    assert "1 unreadable image(s)" in line and "train/1/cut.jpg" in line
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.json"))


def test_random_erasing_blacks_out_one_rectangle_of_the_expected_size():
    torch.manual_seed(0)
    image = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    erased = [flip_crop(32, padding=0, hflip=0.0, erasing=1.0)(image) for _ in range(50)]
    for out in erased:
        zero = (out == 0).all(0)
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(zero.sum()) == height * width  # one solid rectangle, on every channel
        assert 0.02 * 1024 - 32 <= height * width <= 0.33 * 1024 + 32  # torchvision's scale
        assert ((out == 0) | (out == 200)).all()
    assert torch.equal(flip_crop(32, padding=0, hflip=0.0, erasing=0.0)(image), image)
    with pytest.raises(ValueError, match=r"transforms.erasing must be a probability"):
        randaugment(32, erasing=1.5)


def test_the_summary_says_subsampled_only_when_images_were_left_out():
    """A folder smaller than debug=smoke's 64 images per split was reported subsampled."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (120, 16, 16, 3), dtype=np.uint8)
    notes = {}
    for subsample in (None, 500, 20):
        dm = ImbalancedDataModule(ArraySource(images, np.arange(120) % 3), image_size=16,
                                  imbalance_ratio=1, subsample=subsample)
        dm.setup()
        notes[subsample] = dm.summary_notes()
    note = "subsampled to about 20 images per split (subsample)"
    assert note in notes[20]
    assert not [n for n in notes[None] + notes[500] if n.startswith("subsampled")]
