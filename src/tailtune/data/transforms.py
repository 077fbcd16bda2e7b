"""Training augmentations (``transforms=flip_crop|randaugment``), for the training split only.

They take and return uint8 ``[3, H, W]`` tensors at ``data.image_size`` and never normalise:
the datamodule scales to ``[0, 1]`` afterwards and each model normalises for its own weights.
Built from torchvision's v2 transforms rather than timm's ``create_transform``: those work on
PIL images and end with ``Normalize``, and their ImageNet crop (scale 0.08-1) destroys 32 px
images; v2 runs on the uint8 tensors the datamodule already holds.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchvision.transforms import v2


def _crop(image_size: int, padding: int, scale: Sequence[float] | None) -> list[v2.Transform]:
    if scale is not None:
        lo, hi = (float(v) for v in scale)
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"transforms.scale must be 0 < min <= max <= 1, got {list(scale)}")
        return [v2.RandomResizedCrop(image_size, scale=(lo, hi), antialias=True)]
    if padding < 0:
        raise ValueError(f"transforms.padding must be >= 0, got {padding}")
    return [v2.RandomCrop(image_size, padding=padding)] if padding else []


def _erase(erasing: float) -> list[v2.Transform]:
    """Random erasing (Zhong et al., AAAI 2020) with probability ``erasing``: one rectangle of
    2-33 % of the image set to 0."""
    if not 0 <= erasing <= 1:
        raise ValueError(f"transforms.erasing must be a probability in [0, 1], got {erasing}")
    # value 0: black, the background of clothing and digit images (Zhong et al. used noise).
    return [v2.RandomErasing(p=erasing, value=0)] if erasing else []


def flip_crop(image_size: int, padding: int = 4, scale: Sequence[float] | None = None,
              hflip: float = 0.5, erasing: float = 0.0) -> v2.Compose:
    """The CIFAR recipe (He et al. 2016): zero-pad by ``padding``, random crop back to size,
    horizontal flip. With ``scale`` (e.g. ``[0.35, 1]``) a random-resized crop instead, for
    photos; with ``erasing`` > 0, random erasing last."""
    return v2.Compose([*_crop(image_size, padding, scale), v2.RandomHorizontalFlip(hflip),
                       *_erase(erasing)])


def randaugment(image_size: int, num_ops: int = 2, magnitude: int = 9, padding: int = 4,
                scale: Sequence[float] | None = None, hflip: float = 0.5,
                erasing: float = 0.0) -> v2.Compose:
    """Crop and flip as :func:`flip_crop`, then RandAugment (Cubuk et al. 2020; N=2, M=9 is
    timm's ``rand-m9-n2``, used by PaCo and BCL on CIFAR-LT)."""
    return v2.Compose([*_crop(image_size, padding, scale), v2.RandomHorizontalFlip(hflip),
                       v2.RandAugment(num_ops=num_ops, magnitude=magnitude), *_erase(erasing)])
