"""scripts/make_photo_folder.py: the balanced held-out test split leaves train/ as it was, and
its manifest is what tailtune-predict reads (paths relative to it, labels scored)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from tailtune.data.folders import list_inputs

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_photo_folder.py"
TINY = ["--images", "12", "--classes", "3", "--ratio", "3", "--width", "40", "--height", "30"]


def make(root: Path, *args: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["make_photo_folder.py", str(root), *TINY, *args])
    runpy.run_path(str(SCRIPT), run_name="__main__")


def files(root: Path, split: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / split).rglob("*.jpg"))}


def test_test_split_is_balanced_and_leaves_train_unchanged(tmp_path, monkeypatch):
    make(tmp_path / "plain", monkeypatch=monkeypatch)
    make(tmp_path / "with_test", "--test-per-class", "2", monkeypatch=monkeypatch)
    make(tmp_path / "only_test", "--no-train", "--test-per-class", "2", monkeypatch=monkeypatch)

    train = files(tmp_path / "plain", "train")
    per_class = [len(list((tmp_path / "plain/train").glob(f"class_0{c}/*"))) for c in range(3)]
    assert per_class == [6, 4, 2]  # the long tail: 12 photos at ratio 3
    assert files(tmp_path / "with_test", "train") == train  # same photos with or without test/
    assert not (tmp_path / "plain" / "test").exists()
    assert not (tmp_path / "only_test" / "train").exists()
    test = files(tmp_path / "with_test", "test")
    assert len(test) == 6 and files(tmp_path / "only_test", "test") == test
    assert not set(test.values()) & set(train.values())  # held out: no photo of train

    paths, labels = list_inputs(str(tmp_path / "only_test" / "labels.csv"))
    assert labels == ["class_00"] * 2 + ["class_01"] * 2 + ["class_02"] * 2
    assert all(p.is_file() and p.parent.name == label
               for p, label in zip(paths, labels, strict=True))
