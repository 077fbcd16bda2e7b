"""The frozen feature extractor: a backbone with its preprocessing, images in, features out.

Its :meth:`FeatureExtractor.identity` (the backbone's name and a content hash of its weights,
the layer, the stored dtype, the preprocessing) is the extractor's part of a feature-cache key
(:mod:`tailtune.features.cache`), and what a probe's checkpoint records of its backbone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import timm
import torch
from torch import Tensor, nn

from tailtune.backbones import Preprocess, without_idle_adapters
from tailtune.features.cache import tensor_bytes

FEATURE_DTYPES = ("float32", "float16", "bfloat16")


def module_sha256(module: nn.Module) -> str:
    """Content hash of a module's state dict (names, dtypes, shapes and values), leaving out
    LoRA adapters that do not yet change what it computes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(without_idle_adapters(module.state_dict()).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()[:32]


class FeatureExtractor(nn.Module):
    """A frozen backbone with its preprocessing: ``[0, 1]`` images in, feature vectors out.

    ``layer``: ``"pre_logits"`` (the pooled features a timm classifier head sees) or an int,
    an index into ``backbone.feature_info`` whose feature map is average-pooled.
    ``dtype``: the dtype features are stored and served in. Extraction itself always runs in
    float32 with autocast off, so the features do not depend on the trainer's precision, and
    images that go through ``forward`` get exactly the rounding the cache applies.
    """

    def __init__(
        self,
        backbone: nn.Module,
        preprocess: Preprocess,
        backbone_identity: Mapping[str, Any] | None = None,
        layer: str | int = "pre_logits",
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"unknown feature dtype '{dtype}'; valid: {', '.join(FEATURE_DTYPES)}")
        if isinstance(layer, str) and layer != "pre_logits":
            raise ValueError(f"feature layer must be 'pre_logits' or a stage index, got '{layer}'")
        self.backbone = backbone
        self.preprocess = preprocess
        self.layer = layer
        self.dtype_name = dtype
        self.feature_dtype = getattr(torch, dtype)
        if layer == "pre_logits":
            self.num_features = int(backbone.num_features)
        else:
            info = getattr(backbone, "feature_info", None)
            if info is None or not -len(info) <= int(layer) < len(info):
                raise ValueError(f"feature layer {layer} is not a stage index of this backbone")
            self.num_features = int(info[int(layer)]["num_chs"])
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        self.backbone.eval()
        self.backbone_identity = {
            **dict(backbone_identity or {}),
            "sha256": module_sha256(backbone),
            "timm": timm.__version__,
        }

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)  # frozen: BatchNorm statistics and dropout stay in eval mode

    def identity(self) -> dict[str, Any]:
        """Plain data naming exactly which features this extractor computes."""
        return {
            "backbone": self.backbone_identity,
            "layer": self.layer,
            "dtype": self.dtype_name,
            "preprocess": self.preprocess.to_config(),
        }

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        with torch.autocast(images.device.type, enabled=False):
            x = self.preprocess(images.float())
            if self.layer == "pre_logits":
                feats = self.backbone.forward_head(self.backbone.forward_features(x),
                                                   pre_logits=True)
            else:
                maps = self.backbone.forward_intermediates(
                    x, indices=[int(self.layer)], intermediates_only=True)
                feats = maps[0].mean(dim=(2, 3))
        return feats.to(self.feature_dtype)
