"""configs/ablation: each option changes exactly the ingredient of experiment=lt_recipe it
names, nothing else, and is the same config as the plain overrides the README's study ran."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import CONFIG_DIR, compose_config


def _flat(overrides: list[str], tmp_path) -> dict:
    cfg, _ = compose_config("train", ["experiment=lt_recipe", *overrides], tmp_path / "run")
    flat: dict = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else key)
        else:
            flat[prefix] = node

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return flat


def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>")}


# option -> (the keys it must change, the plain overrides of the measured runs)
ABLATIONS = {
    "none": (set(), []),
    "head_first": ({"model.unfreeze_at", "model.backbone_lr_ratio", "model.bn_after_unfreeze"},
                   ["model.unfreeze_at=1", "model.backbone_lr_ratio=0.3",
                    "model.bn_after_unfreeze=frozen"]),
    "no_smoothing": ({"loss.label_smoothing"}, ["loss.label_smoothing=0"]),
    "no_flip": ({"transforms", "transforms._target_", "transforms.image_size",
                 "transforms.padding", "transforms.scale", "transforms.hflip", "model.tta_flip"},
                ["transforms=none", "model.tta_flip=false"]),
    "la_loss": ({"loss._target_", "loss.tau"}, ["loss=logit_adjusted"]),
    "no_balancing": ({"model.logit_adjust_tau"}, ["model.logit_adjust_tau=0"]),
}


def test_every_ablation_option_is_listed_here():
    shipped = {p.stem for p in (Path(CONFIG_DIR) / "ablation").glob("*.yaml")}
    assert shipped == set(ABLATIONS)


@pytest.mark.parametrize("option", sorted(ABLATIONS))
def test_an_ablation_changes_only_its_ingredient_and_equals_its_plain_overrides(option, tmp_path):
    keys, overrides = ABLATIONS[option]
    recipe = _flat([], tmp_path)
    ablated = _flat([f"ablation={option}"], tmp_path)
    assert _changed(recipe, ablated) == keys
    assert ablated == _flat(overrides, tmp_path)
