"""Reading checkpoints, and the one check that two things share a data split.

A tailtune checkpoint holds plain data only (it loads with ``weights_only=True``): the
weights, the resolved run config and the model's metadata (dataset info, preprocessing,
post-hoc state). Its config names classes by their ``_target_``; a class that has moved since
the checkpoint was written is mapped to its new place here (:data:`MOVED`), so checkpoints
from before a move still load.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from tailtune.data.info import DatasetInfo

# Old ``_target_`` prefix -> where that code lives now.
MOVED = {
    "tailtune.data.features.": "tailtune.features.datamodule.",
    "tailtune.imbalance.resampling.FeatureRows": "tailtune.features.rows.FeatureRows",
}


def upgrade_targets(node: Any) -> Any:
    """``node`` (plain data) with every ``_target_`` of moved code renamed (:data:`MOVED`)."""
    if isinstance(node, dict):
        out = {key: upgrade_targets(value) for key, value in node.items()}
        target = out.get("_target_")
        if isinstance(target, str):
            for old, new in MOVED.items():
                if target.startswith(old):
                    out["_target_"] = new + target[len(old):]
        return out
    if isinstance(node, list):
        return [upgrade_targets(value) for value in node]
    return node


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a tailtune checkpoint with ``weights_only=True``: plain data only, its config's
    targets upgraded (:func:`upgrade_targets`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint does not exist: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a .txt, a truncated download, another tool's pickle
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        if isinstance(err, pickle.UnpicklingError):  # torch's text advises weights_only=False
            reason = "it holds Python objects, not the plain data tailtune writes"
        raise ValueError(f"{path} is not a tailtune checkpoint (torch.load could not read it: "
                         f"{reason})") from err
    if not isinstance(checkpoint, dict) or "tailtune" not in checkpoint \
            or "config" not in checkpoint["tailtune"]:
        raise ValueError(f"{path} is not a tailtune checkpoint (no 'tailtune' metadata)")
    checkpoint["tailtune"]["config"] = upgrade_targets(checkpoint["tailtune"]["config"])
    return checkpoint


def dataset_info(checkpoint: dict[str, Any]) -> DatasetInfo:
    return DatasetInfo.from_dict(checkpoint["tailtune"]["dataset_info"])


def check_same_split(reference: DatasetInfo, other: DatasetInfo,
                     reference_name: str = "the checkpoint", other_name: str = "this data"
                     ) -> None:
    """Refuse ``other`` unless it has the classes and the data split (fingerprint) of
    ``reference``: evaluating, resuming, decoupling or ensembling across splits would test on
    images that trained."""
    if tuple(other.class_names) != tuple(reference.class_names):
        raise ValueError(
            f"{other_name} has classes {list(other.class_names)[:5]}..., {reference_name} "
            f"{list(reference.class_names)[:5]}...: the two are from different datasets")
    if other.split_fingerprint != reference.split_fingerprint:
        raise ValueError(
            f"the data split of {other_name} differs from that of {reference_name} "
            f"(fingerprint {other.split_fingerprint} vs {reference.split_fingerprint}): the "
            "test images of one may be training images of the other (an image folder's "
            "fingerprint holds its folder's name and its files' relative paths: a moved copy "
            "must keep its name)")
