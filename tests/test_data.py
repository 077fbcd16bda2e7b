"""Splits and the long-tail construction on the default data."""

from __future__ import annotations

import numpy as np
import pytest

from tailtune.data.datamodule import ImbalancedDataModule
from tailtune.data.longtail import long_tail_counts
from tailtune.data.sources import DigitsSource


def test_cifar10_long_tail_counts_match_the_standard_construction():
    counts = long_tail_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406
    assert sum(long_tail_counts(500, 100, 100)) == 10847


def test_step_profile_and_bad_ratio():
    assert long_tail_counts(100, 4, 10, "step") == [100, 100, 10, 10]
    with pytest.raises(ValueError, match=">= 1"):
        long_tail_counts(100, 4, 0.5)


def _digits(**kwargs) -> ImbalancedDataModule:
    dm = ImbalancedDataModule(DigitsSource(), **{"image_size": 16, **kwargs})
    dm.setup()
    return dm


def test_splits_are_disjoint_and_val_test_keep_their_balance():
    dm = _digits(imbalance_ratio=10)
    train, val, test = (set(dm.split_indices[s]) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    for split in ("val", "test"):
        counts = np.bincount(dm.split_labels(split), minlength=10)
        assert counts.max() - counts.min() <= 3  # stratified from near-balanced digits


def test_only_train_is_long_tailed_with_the_exponential_profile():
    dm = _digits(imbalance_ratio=10)
    counts = dm.info.class_counts
    n_max = counts[0]
    assert list(counts) == [int(n_max * 10 ** (-i / 9)) for i in range(10)]
    assert dm.info.imbalance_ratio == pytest.approx(n_max / counts[-1])


def test_training_seed_does_not_move_the_test_set_but_split_seed_does():
    a, b = _digits(seed=1), _digits(seed=2)
    assert np.array_equal(a.split_indices["test"], b.split_indices["test"])
    assert a.info.split_fingerprint == b.info.split_fingerprint
    c = _digits(split_seed=5)
    assert not np.array_equal(a.split_indices["test"], c.split_indices["test"])
    assert a.info.split_fingerprint != c.info.split_fingerprint


def test_items_are_unnormalised_three_channel_images_at_data_image_size():
    dm = _digits(image_size=24)
    image, label = dm.datasets["train"][0]
    assert image.shape == (3, 24, 24)
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.max() > 0.5
    assert 0 <= label < 10


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        ImbalancedDataModule(DigitsSource(), batch_size=0)


def test_eval_shards_cover_every_sample_once_without_padding():
    from tailtune.data.datamodule import EvalShardSampler

    dataset = list(range(11))
    shards = [list(EvalShardSampler(dataset, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == dataset
    assert [len(s) for s in shards] == [4, 4, 3]


def test_val_is_served_in_a_fixed_shuffled_order_and_test_as_stored():
    """A folder's rows are stored class by class: served so, trainer.limit_val_batches=0.25
    would validate on the first class alone. Test rows keep their order (runs are paired
    image by image in tailtune-compare)."""
    from tailtune.data.datamodule import eval_sampler

    labels = np.repeat(np.arange(4), 30)
    val = list(eval_sampler("val", labels))
    assert sorted(val) == list(range(120)) and val == list(eval_sampler("val", labels))
    assert set(labels[val[:30]]) == {0, 1, 2, 3}
    assert list(eval_sampler("test", labels)) == list(range(120))
