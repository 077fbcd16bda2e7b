"""Frozen-backbone features, computed once and served instead of images.

- :mod:`~tailtune.features.extractor`: :class:`FeatureExtractor`, a frozen backbone with its
  preprocessing (images in, feature vectors out) and its identity (a hash of its weights).
- :mod:`~tailtune.features.cache`: :class:`FeatureCache`, verified, atomically written
  entries of a split's features on disk, keyed by everything that changes them.
- :mod:`~tailtune.features.rows`: :class:`FeatureRows`, feature rows as a dataset, and the
  rows a feature-space resampler serves.
- :mod:`~tailtune.features.datamodule`: :class:`FeatureDataModule`, an image datamodule's
  splits as feature rows (the data side of linear probes and decoupled classifiers).
"""

from tailtune.features.cache import (
    CACHE_FORMAT,
    SUFFIX,
    CacheEntry,
    CorruptEntryError,
    FeatureCache,
    cache_key,
    indices_sha256,
)
from tailtune.features.datamodule import FeatureDataModule, extract_features
from tailtune.features.extractor import FEATURE_DTYPES, FeatureExtractor, module_sha256
from tailtune.features.rows import FeatureRows, ResampledRows

__all__ = [
    "CACHE_FORMAT",
    "FEATURE_DTYPES",
    "SUFFIX",
    "CacheEntry",
    "CorruptEntryError",
    "FeatureCache",
    "FeatureDataModule",
    "FeatureExtractor",
    "FeatureRows",
    "ResampledRows",
    "cache_key",
    "extract_features",
    "indices_sha256",
    "module_sha256",
]
