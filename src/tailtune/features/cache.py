"""The on-disk feature cache: verified, atomically written entries of a split's features.

A frozen backbone gives the same features for an image every epoch, every run and every job
of a sweep, so linear probes and decoupled classifiers extract each split once and read it
back. Two rules make that safe:

- **The key covers everything that changes the features**: the backbone's weights (a content
  hash of its state dict, so ``weights=none``, fine-tuned weights and files are all told
  apart), the layer, the stored dtype, the resolution and normalisation, the dataset and the
  split indices, the transform and :data:`CACHE_FORMAT`. Any change gives a new key; stale
  features are never reused.
- **A reader never trusts a file it did not verify.** Entries are written to a temporary
  file and moved into place with ``os.replace`` (atomic on POSIX), and each entry stores the
  sha256 of its payload, checked on every read. A truncated or corrupt file counts as a miss
  and is rebuilt. A file lock keeps concurrent jobs from extracting the same split twice, but
  correctness never depends on it: locks are unreliable on network file systems, and two
  writers of one key both write complete, equal entries.

Entry layout, one file ``<key>.feat``::

    MAGIC (8 bytes) | header length (8 bytes, little endian) | header (JSON) | payload

The payload is the raw bytes of the features ``[N, D]`` followed by the labels ``[N]``; the
header holds their dtypes and shapes, the payload's length and sha256, and free-form metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import Tensor

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MAGIC = b"TTFEAT\x00\x01"
SUFFIX = ".feat"


# -- identities ---------------------------------------------------------------------------------
def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(parts: Mapping[str, Any]) -> str:
    """A short, stable hash of the plain-data ``parts`` and the cache format."""
    text = canonical_json({"cache_format": CACHE_FORMAT, **parts})
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def tensor_bytes(tensor: Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data  # also works for bfloat16, which numpy lacks


def indices_sha256(indices: np.ndarray | Tensor) -> str:
    array = np.ascontiguousarray(np.asarray(indices), dtype=np.int64)
    return hashlib.sha256(array.tobytes()).hexdigest()[:32]


# -- the cache ----------------------------------------------------------------------------------
class CorruptEntryError(ValueError):
    """A cache file that is truncated, altered or not a cache entry."""


@dataclass
class CacheEntry:
    features: Tensor
    labels: Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0


def _encode(key: str, features: Tensor, labels: Tensor, meta: Mapping[str, Any]) -> list[Any]:
    feature_bytes, label_bytes = tensor_bytes(features), tensor_bytes(labels)
    digest = hashlib.sha256()
    digest.update(feature_bytes)
    digest.update(label_bytes)
    header = {
        "format": CACHE_FORMAT,
        "key": key,
        "features": {"dtype": str(features.dtype).removeprefix("torch."),
                     "shape": list(features.shape)},
        "labels": {"dtype": str(labels.dtype).removeprefix("torch."), "shape": list(labels.shape)},
        "payload_bytes": len(feature_bytes) + len(label_bytes),
        "sha256": digest.hexdigest(),
        "meta": dict(meta),
    }
    header_bytes = canonical_json(header).encode()
    return [MAGIC, len(header_bytes).to_bytes(8, "little"), header_bytes, feature_bytes,
            label_bytes]


def _decode(key: str, data: bytes | bytearray) -> CacheEntry:
    if len(data) < 16 or data[:8] != MAGIC:
        raise CorruptEntryError("not a tailtune feature-cache file")
    header_len = int.from_bytes(data[8:16], "little")
    try:
        header = json.loads(bytes(data[16:16 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptEntryError(f"unreadable header ({err})") from err
    if header.get("format") != CACHE_FORMAT or header.get("key") != key:
        raise CorruptEntryError("entry of another format or key")
    start = 16 + header_len
    payload = memoryview(data)[start:]
    if len(payload) != header["payload_bytes"]:
        raise CorruptEntryError(
            f"payload is {len(payload)} bytes, the header says {header['payload_bytes']} "
            "(truncated?)")
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise CorruptEntryError("payload checksum mismatch")

    def tensor(spec: dict[str, Any], offset: int) -> tuple[Tensor, int]:
        dtype = getattr(torch, spec["dtype"])
        count = int(np.prod(spec["shape"])) if spec["shape"] else 1
        size = count * torch.empty((), dtype=dtype).element_size()
        if count == 0:
            return torch.empty(spec["shape"], dtype=dtype), offset
        flat = torch.frombuffer(data, dtype=dtype, count=count, offset=start + offset)
        return flat.reshape(spec["shape"]), offset + size

    features, offset = tensor(header["features"], 0)
    labels, _ = tensor(header["labels"], offset)
    return CacheEntry(features, labels, header.get("meta", {}), len(data))


class FeatureCache:
    """A directory of verified, atomically written feature entries (see the module docstring).

    ``lock_timeout``: seconds a job waits for another job that is extracting the same entry
    before it extracts itself (the atomic write keeps that safe too).
    """

    def __init__(self, root: str | Path, lock_timeout: float = 3600.0) -> None:
        self.root = Path(root).expanduser()
        self.lock_timeout = float(lock_timeout)

    def path(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def get(self, key: str) -> CacheEntry | None:
        """The verified entry, or None when it is missing or corrupt (corrupt ones are logged)."""
        path = self.path(key)
        try:
            data = bytearray(path.read_bytes())  # writable: tensors view it without a copy
        except FileNotFoundError:
            return None
        try:
            return _decode(key, data)
        except CorruptEntryError as err:
            log.warning("feature cache: ignoring corrupt entry %s (%s); it will be rebuilt",
                        path, err)
            return None

    def put(self, key: str, features: Tensor, labels: Tensor,
            meta: Mapping[str, Any] | None = None) -> int:
        """Write an entry atomically; returns its size in bytes."""
        self.root.mkdir(parents=True, exist_ok=True)
        chunks = _encode(key, features, labels, meta or {})
        tmp = self.root / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path(key))
        finally:
            tmp.unlink(missing_ok=True)
        return sum(len(c) for c in chunks)

    def get_or_create(
        self, key: str, create: Callable[[], tuple[Tensor, Tensor]],
        meta: Mapping[str, Any] | None = None,
    ) -> tuple[CacheEntry, bool]:
        """``(entry, hit)``: read the entry, or compute it with ``create`` and store it."""
        entry = self.get(key)
        if entry is not None:
            return entry, True
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path(key)) + ".lock")
        try:
            lock.acquire(timeout=self.lock_timeout)
            locked = True
        except Timeout:
            log.warning("feature cache: lock on %s timed out; extracting without it", key)
            locked = False
        try:
            entry = self.get(key)  # another job may have written it while this one waited
            if entry is not None:
                return entry, True
            features, labels = create()
            nbytes = self.put(key, features, labels, meta)
            return CacheEntry(features, labels, dict(meta or {}), nbytes), False
        finally:
            if locked:
                lock.release()

    def wait_for(self, key: str, timeout: float = 3600.0, poll: float = 1.0) -> CacheEntry:
        """Block until another process (DDP rank zero) has written a valid entry."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.get(key)
            if entry is not None:
                return entry
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"feature cache entry {self.path(key)} did not appear within {timeout:.0f} s; "
                    "is rank zero extracting into the same cache dir?")
            time.sleep(poll)

    def size_bytes(self) -> int:
        """Total size of all entries in the cache dir."""
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.root.glob(f"*{SUFFIX}") if p.is_file())
