"""Write a long-tailed folder of phone-size JPEG photos, offline, for timing folder runs.

The photos are views of scikit-learn's two bundled sample photographs (``china.jpg``,
``flower.jpg``): each class is one region of one photo, and each image a random crop around
it (scale, position, flip, colour, blur and sensor noise vary), resized to phone size and
saved as a JPEG. Real photographic content, real JPEG decoding cost, no download.

    python scripts/make_photo_folder.py /tmp/photos --images 3000 --classes 10 --ratio 10
    tailtune-train data=image_folder data.root=/tmp/photos

``--test-per-class N`` also writes a balanced ``test/`` split (N photos a class, as long-tailed
benchmarks test: CIFAR-LT, ImageNet-LT), from its own random stream, so ``train/`` is the same
photos with or without it; ``--no-train`` writes only that split. A balanced held-out set for
runs trained on an existing folder (``tailtune-predict`` on its ``labels.csv``):

    python scripts/make_photo_folder.py /tmp/heldout --no-train --test-per-class 100
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from rich.progress import track
from sklearn.datasets import load_sample_images


def class_counts(total: int, classes: int, ratio: float) -> list[int]:
    """Exponential profile ``n_i = n_max * ratio^(-i/(K-1))`` summing to about ``total``."""
    shape = np.asarray([ratio ** (-i / max(1, classes - 1)) for i in range(classes)])
    return [max(1, int(round(n))) for n in shape * total / shape.sum()]


def regions(classes: int, rng: np.random.Generator) -> list[tuple[int, float, float]]:
    """``(photo, centre x, centre y)`` per class, spread over both photos."""
    return [(c % 2, float(rng.uniform(0.25, 0.75)), float(rng.uniform(0.25, 0.75)))
            for c in range(classes)]


def view(photo: Image.Image, cx: float, cy: float, size: tuple[int, int],
         rng: np.random.Generator) -> Image.Image:
    width, height = photo.size
    side = int(min(width, height) * rng.uniform(0.35, 0.6))
    x = int(np.clip(cx * width + rng.normal(0, 0.05) * width - side / 2, 0, width - side))
    y = int(np.clip(cy * height + rng.normal(0, 0.05) * height - side * 0.375, 0,
                    height - int(side * 0.75)))
    image = photo.crop((x, y, x + side, y + int(side * 0.75))).resize(size, Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))
    noise = rng.normal(0, rng.uniform(2, 8), (size[1], size[0], 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--ratio", type=float, default=10.0, help="largest / smallest class")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-per-class", type=int, default=0,
                        help="also write a balanced test/ split with this many photos a class")
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                        help="write train/ (--no-train: only the test split)")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    where = regions(args.classes, rng)  # drawn first: the classes depend on the seed only

    def write(split: str, counts: list[int], rng: np.random.Generator) -> None:
        jobs = [(c, i) for c, n in enumerate(counts) for i in range(n)]
        for c, i in track(jobs, description=f"writing {len(jobs)} {split} photos"):
            folder = args.root / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            photo, cx, cy = where[c]
            view(photos[photo], cx, cy, (args.width, args.height), rng).save(
                folder / f"{i:05d}.jpg", quality=90)
        print(f"{len(jobs)} photos in {args.root}/{split}, per class {counts}")

    if args.train:
        write("train", class_counts(args.images, args.classes, args.ratio), rng)
    if args.test_per_class:
        write("test", [args.test_per_class] * args.classes, np.random.default_rng([args.seed, 1]))
        with open(args.root / "labels.csv", "w") as manifest:
            manifest.write("path,label\n")
            for path in sorted((args.root / "test").glob("*/*.jpg")):
                manifest.write(f"test/{path.parent.name}/{path.name},{path.parent.name}\n")


if __name__ == "__main__":
    main()
