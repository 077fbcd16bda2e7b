"""Datasets of image files: a folder per class (``train/``, ``val/``, ``test/``), or a CSV
manifest; plus the inputs of ``tailtune-predict`` (a folder, a glob or a CSV).

Every file is checked once at set-up (results cached by size and mtime): files that are not
images (no image format claims them, nor are they named like one: ``.DS_Store``, ``notes.txt``)
are skipped and counted; broken images, including a file named ``.png``/``.jpg``/... that holds
no image, stop the run before training (or are skipped with ``on_bad_image=skip``); and every
split must hold the same classes.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tailtune.data.datamodule import ImbalancedDataModule
from tailtune.data.images import is_junk, scan_images
from tailtune.data.sources import LabeledImages

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
SPLIT_ALIASES = {"": "train", "train": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test"}
_LIST_AT_MOST = 10  # files named in one message


@dataclass(frozen=True)
class _Entry:
    split: str
    label: int
    path: Path


def _content_fingerprint(data: LabeledImages) -> str:
    """The file list plus each file's size and mtime: changes when any image changes."""
    digest = hashlib.sha256(data.identity.encode())
    for path in data.paths or []:
        stat = path.stat()
        digest.update(f"\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _listing(paths: list[str]) -> str:
    more = len(paths) - _LIST_AT_MOST
    return ", ".join(paths[:_LIST_AT_MOST]) + (f" and {more} more" if more > 0 else "")


def _check_policy(on_bad_image: str) -> None:
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"data.on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, "
                         f"got '{on_bad_image}'")


def _scan_cache(cache_dir: str | None, key: Path) -> Path | None:
    if not cache_dir:
        return None
    digest = hashlib.sha1(str(key.resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir) / "image-scan" / f"{digest}.json"


def _walk_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """All files below ``folder`` (sorted; symlinks followed), and the junk among them."""
    files: list[Path] = []
    junk: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        hidden = [d for d in dirnames if d.startswith(".")]  # .ipynb_checkpoints, .git, ...
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(os.path.realpath(dirpath))
        for d in dirnames:  # a link to a folder above it: os.walk would go round 40 times
            target = Path(os.path.realpath(Path(dirpath) / d))
            if target == here or target in here.parents:
                raise ValueError(f"{Path(dirpath) / d} is a symlink loop (it points to "
                                 f"{target}, a folder above it); remove it")
        junk.extend(Path(dirpath) / d for d in hidden)
        for name in sorted(filenames):
            (junk if is_junk(Path(name)) else files).append(Path(dirpath) / name)
    return files, junk


def _assemble(name: str, entries: list[_Entry], class_names: list[str], base: Path,
              on_bad_image: str, cache_file: Path | None, junk: list[Path],
              stray: list[Path]) -> LabeledImages:
    """Check every file, apply the bad-image policy, and refuse empty classes or splits."""
    def rel(path: Path) -> str:
        try:
            return str(path.relative_to(base))
        except ValueError:
            return str(path)

    scan = scan_images([e.path for e in entries], cache_file)
    skipped: dict[str, list[str]] = {}
    not_images = [rel(p) for p in junk] + [rel(p) for p in scan.not_images]
    if not_images:
        skipped["not an image"] = not_images
        log.warning("%s: skipped %d non-image file(s): %s", name, len(not_images),
                    _listing(not_images))
    if stray:
        skipped["outside a class folder"] = [rel(p) for p in stray]
        log.warning("%s: skipped %d file(s) outside any class folder: %s", name, len(stray),
                    _listing(skipped["outside a class folder"]))
    if scan.bad:
        bad = [f"{rel(p)} ({reason})" for p, reason in scan.bad.items()]
        if on_bad_image == "error":
            raise ValueError(
                f"{len(bad)} unreadable image(s) under {base}: {_listing(bad)}; fix or remove "
                "them, or set data.on_bad_image=skip"
            )
        skipped["unreadable"] = [rel(p) for p in scan.bad]
        log.warning("%s: skipped %d unreadable image(s) (data.on_bad_image=skip): %s",
                    name, len(bad), _listing(bad))
    readable = set(scan.images)
    kept = [e for e in entries if e.path in readable]
    first: dict[Path, Path] = {}
    for entry in kept:  # a symlink or another spelling of a path: in two splits, a leak
        real = entry.path.resolve()
        if real in first:
            raise ValueError(f"{name}: {rel(first[real])} and {rel(entry.path)} are the same "
                             f"file ({real}); list each image once")
        first[real] = entry.path
    splits = sorted({e.split for e in entries}, key=["train", "val", "test"].index)
    for split in splits:
        counts = np.bincount([e.label for e in kept if e.split == split],
                             minlength=len(class_names))
        empty = [class_names[c] for c in np.flatnonzero(counts == 0)]
        if empty:
            raise ValueError(f"{name}: no readable images of class(es) {_listing(empty)} in "
                             f"the {split} split (under {base})")
    digest = hashlib.sha256()  # names only: a copied dataset keeps its split fingerprint
    for entry in kept:
        digest.update(f"{entry.split}\0{entry.label}\0{rel(entry.path)}\n".encode())
    splits_of = np.array([e.split for e in kept])
    return LabeledImages(
        name=name,
        labels=np.array([e.label for e in kept], dtype=np.int64),
        class_names=class_names,
        paths=[e.path for e in kept],
        predefined_splits={s: np.flatnonzero(splits_of == s) for s in splits},
        skipped=skipped,
        identity=digest.hexdigest()[:16],
    )


class _CheckedFileSource:
    """What folder and manifest sources share: the bad-image policy, where file checks are
    cached, and the fingerprint of the files the last load kept."""

    def __init__(self, on_bad_image: str = "error", cache_dir: str | None = None) -> None:
        _check_policy(on_bad_image)
        self.on_bad_image = on_bad_image
        self.cache_dir = cache_dir
        self._fingerprint: str | None = None

    def load(self) -> LabeledImages:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """The files (split, class, path, size, mtime) the last load kept: what feature
        caches key on, so a changed folder is never served stale features."""
        if self._fingerprint is None:
            self.load()
        assert self._fingerprint is not None
        return self._fingerprint


class ImageFolderSource(_CheckedFileSource):
    """``root/train/<class>/*`` plus optional ``root/val/`` (or ``validation/``) and
    ``root/test/`` with the same class folders. Class names and order: the sorted folder
    names of ``train/``. Files below a class folder are found recursively."""

    def __init__(self, root: str | None, on_bad_image: str = "error",
                 cache_dir: str | None = None) -> None:
        super().__init__(on_bad_image, cache_dir)
        self.root = root

    @property
    def name(self) -> str:
        return f"image_folder:{Path(self.root).name}" if self.root else "image_folder"

    def _split_dirs(self, root: Path) -> dict[str, Path]:
        dirs = {"train": root / "train"}
        vals = [root / d for d in ("val", "validation") if (root / d).is_dir()]
        if len(vals) == 2:
            raise ValueError(f"{root} has both val/ and validation/; keep one")
        if vals:
            dirs["val"] = vals[0]
        if (root / "test").is_dir():
            dirs["test"] = root / "test"
        return dirs

    def load(self) -> LabeledImages:
        if not self.root:
            raise ValueError("data.root is not set: pass data.root=DIR, a folder holding "
                             "train/<class>/<images> (optional val/ and test/)")
        root = Path(self.root).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"data.root does not exist: {root}")
        if not root.is_dir():
            raise ValueError(f"data.root is not a folder: {root}")
        found = sorted(p.name for p in root.iterdir() if not is_junk(p))
        if not found:
            raise ValueError(f"data.root is empty: {root} (expected train/<class>/<images>, "
                             "optional val/ and test/)")
        if not (root / "train").is_dir():
            raise ValueError(f"data.root has no train/ folder: {root} holds {_listing(found)}; "
                             "expected train/<class>/<images>, optional val/ and test/")
        split_dirs = self._split_dirs(root)
        classes: dict[str, list[str]] = {}
        junk: list[Path] = []
        stray: list[Path] = []  # files directly in train/, val/, test/
        for split, folder in split_dirs.items():
            children = sorted(folder.iterdir())
            classes[split] = [p.name for p in children if p.is_dir() and not is_junk(p)]
            junk.extend(p for p in children if is_junk(p))
            stray.extend(p for p in children if not p.is_dir() and not is_junk(p))
            if not classes[split]:
                raise ValueError(f"{folder} has no class folders (expected {folder}/<class>/"
                                 "<images>)")
        class_names = classes["train"]
        if len(class_names) < 2:  # before any image is checked or decoded
            raise ValueError(f"{split_dirs['train']} has one class folder ({class_names[0]}): "
                             "a classifier needs at least 2 classes")
        for split in ("val", "test"):
            if split not in classes:
                continue
            extra = sorted(set(classes[split]) - set(class_names))
            if extra:
                raise ValueError(f"{split_dirs[split]} has class folder(s) that train/ lacks: "
                                 f"{_listing(extra)}")
            missing = sorted(set(class_names) - set(classes[split]))
            if missing:
                raise ValueError(f"{split_dirs[split]} lacks class folder(s) that train/ has: "
                                 f"{_listing(missing)}")
        entries: list[_Entry] = []
        for split, folder in split_dirs.items():
            for label, class_name in enumerate(class_names):
                files, class_junk = _walk_files(folder / class_name)
                junk.extend(class_junk)
                if not files:
                    raise ValueError(f"class folder {folder / class_name} has no images"
                                     + (f" (only {_listing([p.name for p in class_junk])})"
                                        if class_junk else ""))
                entries.extend(_Entry(split, label, path) for path in files)
        data = _assemble(self.name, entries, class_names, root, self.on_bad_image,
                         _scan_cache(self.cache_dir, root), junk, stray)
        self._fingerprint = _content_fingerprint(data)
        return data


def _sorted_labels(labels: set[str]) -> list[str]:
    """Numeric labels in numeric order (2 before 10), others alphabetically."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))  # "1" and "01": stable
    return sorted(labels)


class CsvManifestSource(_CheckedFileSource):
    """A CSV with columns ``path,label`` and optionally ``split`` (train, val or test; empty
    means train). Paths are relative to the manifest's folder unless absolute."""

    def __init__(self, manifest: str | None, on_bad_image: str = "error",
                 cache_dir: str | None = None) -> None:
        super().__init__(on_bad_image, cache_dir)
        self.manifest = manifest

    @property
    def name(self) -> str:
        return f"csv:{Path(self.manifest).stem}" if self.manifest else "csv"

    def load(self) -> LabeledImages:
        if not self.manifest:
            raise ValueError("data.manifest is not set: pass data.manifest=FILE.csv with "
                             "columns path,label[,split]")
        manifest = Path(self.manifest).expanduser()
        if not manifest.is_file():
            raise FileNotFoundError(f"data.manifest does not exist: {manifest}")
        rows = read_manifest(manifest, require_label=True)
        class_names = _sorted_labels({label for _, label, _ in rows})
        if len(class_names) < 2:
            raise ValueError(f"{manifest} has one label ({class_names[0]}): a classifier needs "
                             "at least 2 classes")
        index = {name: i for i, name in enumerate(class_names)}
        entries = [_Entry(split, index[label], path) for path, label, split in rows]
        entries.sort(key=lambda e: (["train", "val", "test"].index(e.split), e.label))
        present = {s: {e.label for e in entries if e.split == s} for s in ("train", "val", "test")}
        if not present["train"]:
            raise ValueError(f"{manifest} has no training rows (split empty or 'train')")
        for split in ("val", "test"):
            extra = sorted(present[split] - present["train"])
            if extra:
                raise ValueError(f"{manifest}: class(es) in the {split} split but not in train: "
                                 f"{_listing([class_names[c] for c in extra])}")
        data = _assemble(self.name, entries, class_names, manifest.parent, self.on_bad_image,
                         _scan_cache(self.cache_dir, manifest), [], [])
        self._fingerprint = _content_fingerprint(data)
        return data


def read_manifest(manifest: Path, require_label: bool) -> list[tuple[Path, str, str]]:
    """``(path, label, split)`` rows of a manifest; paths resolved against its folder."""
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        needed = ["path", "label"] if require_label else ["path"]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(f"{manifest} needs column(s) {', '.join(missing)}; its header is "
                             f"{','.join(columns) or '(empty)'}")
        rows: list[tuple[Path, str, str]] = []
        seen: dict[Path, int] = {}
        for number, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not row.get("path"):
                raise ValueError(f"{manifest}, line {number}: empty path")
            split = row.get("split", "").lower()
            if split not in SPLIT_ALIASES:
                raise ValueError(f"{manifest}, line {number}: unknown split '{row['split']}' "
                                 "(train, val or test)")
            if require_label and not row.get("label"):
                raise ValueError(f"{manifest}, line {number}: empty label")
            path = Path(row["path"]).expanduser()
            path = path if path.is_absolute() else manifest.parent / path
            real = path.resolve()  # a/../x.png, a symlink: still the same image
            if real in seen:  # in two splits it would leak test images into training
                raise ValueError(f"{manifest}: {row['path']} is listed twice (lines "
                                 f"{seen[real]} and {number})")
            seen[real] = number
            rows.append((path, row.get("label", ""), SPLIT_ALIASES[split]))
    if not rows:
        raise ValueError(f"{manifest} lists no images")
    return rows


def image_folder_datamodule(root: str | None = None, on_bad_image: str = "error",
                            **datamodule: Any) -> ImbalancedDataModule:
    """``data=image_folder``: an :class:`ImageFolderSource` in an ImbalancedDataModule;
    ``datamodule`` holds the module's own arguments."""
    source = ImageFolderSource(root, on_bad_image, cache_dir=datamodule.get("cache_dir"))
    return ImbalancedDataModule(source, **datamodule)


def csv_datamodule(manifest: str | None = None, on_bad_image: str = "error",
                   **datamodule: Any) -> ImbalancedDataModule:
    """``data=csv``: a :class:`CsvManifestSource` in an ImbalancedDataModule."""
    source = CsvManifestSource(manifest, on_bad_image, cache_dir=datamodule.get("cache_dir"))
    return ImbalancedDataModule(source, **datamodule)


def _refuse_unknown_labels(labels: list[str], class_names: list[str], what: str, spec: str,
                           way_out: str) -> None:
    """Refuse labels that are not classes of the model, naming a few of each."""
    unknown = sorted(set(labels) - set(class_names))
    if not unknown:
        return
    many = len(unknown) > 1
    raise ValueError(f"input={spec}: {what}{'s' * many} {_listing(_sorted_labels(set(unknown)))} "
                      f"{'are not classes' if many else 'is not a class'} of "
                      f"the model (its classes: {_listing(list(class_names))}); {way_out}")


def _class_folder_labels(folder: Path, files: list[Path], class_names: list[str],
                         spec: str) -> list[str] | None:
    """Labels from class sub-folders: each file's first folder below ``folder``, when the
    sub-folders are named after the model's classes. ``None`` when none of them is (a folder
    of images, sorted any way); refused when only some are. Files outside the class folders
    get an empty label: predicted, not scored."""
    subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and not is_junk(p))
    if not set(subfolders) & set(class_names):
        return None
    _refuse_unknown_labels(subfolders, class_names, "sub-folder", spec,
                           "name every sub-folder after a class to score the images by "
                           f"folder, or give input='{spec.rstrip('/')}/**/*' to predict "
                           "without labels")
    parts = [f.relative_to(folder).parts for f in files]
    labels = [p[0] if len(p) > 1 else "" for p in parts]
    loose = [str(f.relative_to(folder)) for f, label in zip(files, labels, strict=True)
             if not label]
    if loose:
        log.warning("input: %d file(s) outside the class folders are predicted but not "
                    "scored: %s", len(loose), _listing(loose))
    return labels


def list_inputs(spec: str, class_names: list[str] | tuple[str, ...] | None = None
                ) -> tuple[list[Path], list[str] | None]:
    """The files ``tailtune-predict input=`` names: a folder (recursively), a glob, a CSV
    with a ``path`` column (and optionally ``label``), or one file. Returns the files and
    their labels, if they have them: a CSV's ``label`` column, or, given the model's
    ``class_names``, a folder's class sub-folders (``input/<class>/...``, as ``test/`` of an
    image-folder dataset). Labels that are not classes of the model are refused."""
    path = Path(spec).expanduser()
    classes = list(class_names) if class_names is not None else None
    if path.suffix.lower() == ".csv" and path.is_file():
        rows = read_manifest(path, require_label=False)
        labels = [label for _, label, _ in rows]
        if classes is not None and all(labels):
            _refuse_unknown_labels(labels, classes, "label", spec,
                                   "fix the labels, or leave out the label column to predict "
                                   "without an accuracy")
        return [p for p, _, _ in rows], labels if all(labels) else None
    if path.is_dir():
        files, _ = _walk_files(path)
        if files and classes is not None:
            return files, _class_folder_labels(path, files, classes, spec)
    elif any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)
                       if Path(p).is_file() and not is_junk(Path(p)))
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"input does not exist: {spec}")
    if not files:
        raise ValueError(f"input={spec} matches no files")
    return files, None
