"""What the datamodule tells the model about the data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DatasetInfo:
    """Class names, per-class training counts and the split's identity.

    Plain data only, so it travels inside checkpoints that load with ``weights_only=True``.
    """

    name: str
    class_names: tuple[str, ...]
    class_counts: tuple[int, ...]  # training split, after any long-tail construction
    split_fingerprint: str
    image_size: int
    # data.val_fraction=0: validation is the test split, so a choice made on it is made on test.
    val_is_test: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def imbalance_ratio(self) -> float:
        present = [c for c in self.class_counts if c > 0]
        return max(present) / min(present) if present else float("nan")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        data["class_counts"] = list(self.class_counts)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetInfo:
        return cls(
            name=data["name"],
            class_names=tuple(data["class_names"]),
            class_counts=tuple(int(c) for c in data["class_counts"]),
            split_fingerprint=data["split_fingerprint"],
            image_size=int(data["image_size"]),
            val_is_test=bool(data.get("val_is_test", False)),  # absent before 2026-12-05
        )
