"""LoRA adapters (Hu et al., ICLR 2022) on a timm backbone, through ``peft``.

Each targeted layer keeps its pretrained weight frozen and learns a low-rank update
``(alpha / rank) * B @ A`` beside it; ``B`` starts at zero, so an adapted backbone computes
exactly what the pretrained one did until it trains. On long-tailed data, tuning a few
parameters of a strong backbone keeps the tail from over-fitting (LIFT: Shi et al., ICML 2024).

The targets are the backbone's ``nn.Linear`` layers and its dense ``nn.Conv2d`` layers (groups
= 1): the 1x1 expansions and projections that hold most of a CNN's weights, every convolution
of a ResNet, and the attention and MLP layers of a ViT. Depthwise convolutions and timm's
``Conv2dSame`` (padding computed in ``forward``, which peft's conv adapter would not apply to
its own low-rank path) are left out. ``peft`` is imported here only, when an adapter is made:
its import takes seconds. Adapter parameters are named with
:data:`tailtune.backbones.ADAPTER_MARK`, where the feature cache's weight hash also reads it.
"""

from __future__ import annotations

from torch import nn


def lora_targets(backbone: nn.Module, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """Names of the layers LoRA adapts: dense convolutions and linear layers whose weight name
    starts with one of ``prefixes`` (the stages that train; ``("",)``: all)."""
    return [
        name for name, module in backbone.named_modules()
        if (type(module) is nn.Linear or (type(module) is nn.Conv2d and module.groups == 1))
        and any(f"{name}.weight".startswith(p) for p in prefixes)
    ]


def add_lora(backbone: nn.Module, rank: int, alpha: float,
             prefixes: tuple[str, ...] = ("",)) -> nn.Module:
    """Inject rank-``rank`` LoRA adapters into ``backbone`` in place and return it; only the
    adapters' parameters keep ``requires_grad``."""
    if rank < 1:
        raise ValueError(f"model.lora_rank must be >= 1, got {rank}")
    targets = lora_targets(backbone, prefixes)
    if not targets:
        raise ValueError(
            f"model.tune=lora: {type(backbone).__name__} has no dense Conv2d or Linear layer "
            "in the stages that train (model.train_stages) for LoRA to adapt")
    from peft import LoraConfig, inject_adapter_in_model  # slow import: only when used

    # An exact-name regex: peft's list form matches by suffix, which could catch other layers.
    pattern = "|".join(name.replace(".", r"\.") for name in targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=f"^(?:{pattern})$")
    return inject_adapter_in_model(config, backbone)
