"""Image files: decoding to RGB at a fixed size, checking them once, and decoding them once.

Everything that reads an image file goes through :func:`decode_image`, so training, evaluation
and ``tailtune-predict`` see exactly the same pixels for the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from tailtune.console import track

RESIZE_MODES = ("squash", "center_crop")
# Files an OS or a file manager leaves behind; never read.
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"})
NOT_IMAGE = "not an image"
# Extensions of the image files people keep: such a file that cannot be decoded is a broken
# image (it stops a training run), never a stray file to skip.
IMAGE_SUFFIXES = frozenset({
    ".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".webp", ".avif", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".ico", ".qoi",
})
CHECK_VERSION = 3  # bump when check_image's verdicts change, to re-check cached files
DECODE_VERSION = "2"  # bump when decode_image's output changes, to invalidate decoded caches


def is_junk(path: Path) -> bool:
    """Hidden files (``.DS_Store``, AppleDouble ``._x.jpg``) and OS thumbnail databases."""
    return path.name.startswith(".") or path.name.lower() in JUNK_NAMES


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: grayscale is repeated, palettes expanded, alpha dropped
    (as torchvision's loader does), 16-bit and float grayscale scaled to 0..255."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        # Scaled by what the mode holds, never by an image's own values (a dark 16-bit scan
        # would come out bright, and brightness would flip between images of one set):
        # integers are 16-bit data (I;16 PNGs and TIFFs, which PIL may open as I),
        # 65535 -> 255; floats are 0..1 if they fit there, else 0..255.
        if image.mode.startswith("I"):
            values = values / 257.0
        elif values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        gray = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
    return image.convert("RGB")


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> uint8 ``[N, C, size, size]`` (bilinear, antialiased, rounded):
    how in-memory sources (digits, CIFAR, Fashion-MNIST) are served for training, and so how
    :func:`serve_images` serves tensors given to a trained model."""
    if images.shape[-2:] == (size, size):
        return images
    chunks = []
    for chunk in images.split(1024):
        resized = F.interpolate(chunk.float(), size=(size, size), mode="bilinear",
                                antialias=True, align_corners=False)
        chunks.append(resized.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(chunks)


def serve_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images handed to a trained model -> float ``[N, 3, size, size]`` in ``[0, 1]``, exactly
    as the training loader served in-memory images at ``size`` (quantised to uint8, then
    :func:`resize_uint8`). Takes a batch ``[N, 1|3, H, W]`` of floats in ``[0, 1]`` or of uint8
    (0-255); anything else is refused with what to change."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        hint = "; for one image pass x[None]" if getattr(images, "ndim", 0) == 3 else ""
        raise ValueError(f"images must be a batch [N, 3, H, W] (or [N, 1, H, W]), got {shape}"
                         f"{hint}")
    if images.dtype == torch.uint8:
        quantised = images.cpu()
    elif images.is_floating_point():
        low, high = float(images.min()), float(images.max())
        if low < -1e-6 or high > 1 + 1e-6:
            raise ValueError(f"float images must be in [0, 1], got values in [{low:.4g}, "
                             f"{high:.4g}]: divide 0-255 images by 255 (or pass uint8); "
                             "normalisation is the model's own step")
        quantised = images.detach().float().cpu().mul(255).round_().clamp_(0, 255)
        quantised = quantised.to(torch.uint8)
    else:
        raise ValueError(f"images must be float in [0, 1] or uint8, got {images.dtype}")
    served = resize_uint8(quantised, size).float().div_(255.0)
    return served.expand(-1, 3, -1, -1) if served.shape[1] == 1 else served


def decode_image(path: str | Path, size: int, resize: str = "squash") -> np.ndarray:
    """One file as uint8 ``[3, size, size]``.

    ``squash`` resizes the whole image (aspect ratio not kept); ``center_crop`` resizes the
    shorter side to ``size`` and crops the centre. EXIF orientation is applied.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown data.resize '{resize}'; valid: {', '.join(RESIZE_MODES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF and palette chatter, once per file
        with Image.open(path) as image:
            if image.format == "JPEG":
                # DCT scaling: decode at 1/2..1/8 scale, still >= size; several times faster.
                image.draft("RGB", (size, size))
            image = to_rgb(ImageOps.exif_transpose(image))
    if resize == "center_crop":
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)  # antialiased when shrinking
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


# The first bytes of the formats people keep images in: a file that starts like an image but
# cannot be read is a broken image, not a stray non-image file.
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM",
               b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x0cjP  ")


def _looks_like_image(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(16)
    return head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def named_like_image(path: Path) -> bool:
    """Whether the file's extension says it is an image (:data:`IMAGE_SUFFIXES`)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def unidentified_reason(path: Path) -> str:
    """Why a file no image format claims cannot be read: :data:`NOT_IMAGE` for a stray file
    (``notes.txt``), a reason for one that starts like an image or is named like one (an
    HTML error page saved as ``photo.jpg``): those are broken images, not strays."""
    if _looks_like_image(path):
        return "damaged image header"
    if named_like_image(path):
        return f"not an image, despite its {path.suffix} extension"
    return NOT_IMAGE


def check_image(path: Path) -> str | None:
    """``None`` for a readable image, :data:`NOT_IMAGE` for a file that is not an image at
    all (no image format claims it, it does not start like one and its extension is not an
    image's), else why the image cannot be read (truncated, bad checksum, damaged header,
    not an image despite an image extension, empty, unreadable file).

    ``verify`` checks the structure and checksums (PNG CRCs); ``load`` decodes every byte,
    which is what catches a truncated JPEG. JPEGs decode at reduced scale: just as strict.
    """
    try:
        if path.stat().st_size == 0:  # an interrupted copy or download
            return "empty file" if named_like_image(path) else NOT_IMAGE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                if image.format == "JPEG":
                    image.draft("RGB", (64, 64))
                image.load()
    except UnidentifiedImageError:
        return unidentified_reason(path)
    except Image.DecompressionBombError as err:  # Pillow's guard against hostile files
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(pixels.group(1)) / 1e6:.0f} megapixels, " if pixels else ""
        return (f"too large to decode ({size}above Pillow's limit of "
                f"{2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f}): downscale it")
    except Exception as err:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError...
        return f"{type(err).__name__}: {str(err).strip() or 'unreadable'}"
    return None


@dataclass
class ScanResult:
    """Which files are images, which are not, and which images are broken."""

    images: list[Path] = field(default_factory=list)
    not_images: list[Path] = field(default_factory=list)
    bad: dict[Path, str] = field(default_factory=dict)


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))  # PIL releases the GIL while decoding


def scan_images(paths: Sequence[Path], cache_file: Path | None = None,
                check: Callable[[Path], str | None] = check_image) -> ScanResult:
    """Check every file once; results are cached by (path, size, mtime) in ``cache_file``,
    so a later run re-checks only new or changed files (and all of them when
    :data:`CHECK_VERSION` changed)."""
    cached: dict[str, list] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cached = {}  # a damaged cache is only a cache
    stats: dict[str, list[int]] = {}
    for path in paths:
        try:
            stat = path.stat()
            stats[str(path)] = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            stats[str(path)] = [-1, -1]

    def fresh(path: Path) -> bool:  # [size, mtime, verdict, CHECK_VERSION]; old ones lack it
        entry = cached.get(str(path), [])
        return entry[:2] == stats[str(path)] and entry[3:] == [CHECK_VERSION]

    todo = [p for p in paths if not fresh(p)]
    with ThreadPoolExecutor(_workers()) as pool:
        checked = track(pool.map(check, todo), "checking image files", total=len(todo))
        for path, status in zip(todo, checked, strict=True):
            cached[str(path)] = [*stats[str(path)], status, CHECK_VERSION]
    result = ScanResult()
    for path in paths:
        status = cached[str(path)][2]
        if status is None:
            result.images.append(path)
        elif status == NOT_IMAGE:
            result.not_images.append(path)
        else:
            result.bad[path] = status
    if cache_file is not None and todo:
        kept = {str(p): cached[str(p)] for p in paths}
        _atomic_write(cache_file, json.dumps(kept).encode())
    return result


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def decoded_cache_key(paths: Sequence[Path], size: int, resize: str) -> str:
    """Names the decoded array: the files (path, size, mtime) and how they were decoded."""
    digest = hashlib.sha256(f"{DECODE_VERSION}:{size}:{resize}".encode())
    for path in paths:
        stat = path.stat()
        digest.update(f"\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def decode_all(paths: Sequence[Path], size: int, resize: str = "squash",
               cache_dir: Path | None = None) -> np.ndarray:
    """All files decoded once into uint8 ``[N, 3, size, size]``.

    With ``cache_dir`` the array is written once as ``.npy`` and memory-mapped from then on:
    later runs, DDP ranks and DataLoader workers share its pages instead of each decoding.
    """
    shape = (len(paths), 3, size, size)
    if cache_dir is None:
        images = np.empty(shape, dtype=np.uint8)
    else:
        cache_file = Path(cache_dir) / "decoded" / f"{decoded_cache_key(paths, size, resize)}.npy"
        if cache_file.is_file():
            return np.load(cache_file, mmap_mode="r")
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Decoded straight into the file (no copy of the whole array in memory), then renamed:
        # a killed run never leaves a half-written cache entry under the final name.
        tmp = cache_file.with_name(f".{cache_file.stem}.{os.getpid()}.tmp.npy")
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)

    def fill(item: tuple[int, Path]) -> None:
        images[item[0]] = decode_image(item[1], size, resize)

    with ThreadPoolExecutor(_workers()) as pool:
        list(track(pool.map(fill, enumerate(paths)), "decoding images", total=len(paths)))
    if cache_dir is None:
        return images
    images.flush()
    os.replace(tmp, cache_file)
    return np.load(cache_file, mmap_mode="r")


class ImageFiles(Dataset):
    """Files decoded on demand, for prediction: an unreadable file is reported, not raised.

    Items are ``(image, index, error)``: a float ``[0, 1]`` image (zeros when unreadable), the
    file's position, and ``""`` or the reason it could not be read.
    """

    def __init__(self, paths: Sequence[Path], size: int, resize: str = "squash") -> None:
        self.paths = list(paths)
        self.size = size
        self.resize = resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        path = self.paths[index]
        try:
            if is_junk(path):
                raise UnidentifiedImageError(NOT_IMAGE)
            array = decode_image(path, self.size, self.resize)
        except UnidentifiedImageError:  # as the training check words it
            reason = NOT_IMAGE if is_junk(path) else unidentified_reason(path)
            return torch.zeros(3, self.size, self.size), index, reason
        except Exception as err:  # noqa: BLE001 - any decoder failure becomes an error row
            reason = f"{type(err).__name__}: {str(err).strip() or 'unreadable'}"
            return torch.zeros(3, self.size, self.size), index, reason
        return torch.from_numpy(array).float().div_(255.0), index, ""
