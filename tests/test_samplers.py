from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from omegaconf import OmegaConf

from tailtune.imbalance.samplers import (
    ClassBalancedSampler,
    OverSampler,
    ProgressiveSampler,
    ShuffleSampler,
    UnderSampler,
    WeightedSampler,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COUNTS = np.array([400, 160, 64, 0, 16])  # class 3 is empty
FULL_COUNTS = np.array([400, 160, 64, 30, 16])  # no empty class (for under-sampling)


def make_labels(counts: np.ndarray) -> np.ndarray:
    # Shuffled so that no sampler can rely on labels being sorted.
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(123).permutation(labels)


LABELS = make_labels(COUNTS)
FULL_LABELS = make_labels(FULL_COUNTS)


def uniform_over(counts: np.ndarray) -> np.ndarray:
    present = (counts > 0).astype(float)
    return present / present.sum()


def power_target(counts: np.ndarray, q: float) -> np.ndarray:
    # Per-sample weight n^-q -> class mass n * n^-q = n^(1-q); empty classes get nothing.
    mass = np.where(counts > 0, counts.astype(float) ** (1 - q), 0.0)
    return mass / mass.sum()


def effective_target(counts: np.ndarray, beta: float) -> np.ndarray:
    mass = np.array([n * (1 - beta) / (1 - beta**n) if n else 0.0 for n in counts])
    return mass / mass.sum()


CASES = {
    "shuffle": (lambda: ShuffleSampler(LABELS, seed=1), COUNTS / COUNTS.sum()),
    "weighted_q1": (lambda: WeightedSampler(LABELS, seed=1, q=1.0), power_target(COUNTS, 1.0)),
    "weighted_sqrt": (lambda: WeightedSampler(LABELS, seed=1, q=0.5), power_target(COUNTS, 0.5)),
    "weighted_effective": (
        lambda: WeightedSampler(LABELS, seed=1, weighting="effective_number", beta=0.99),
        effective_target(COUNTS, 0.99),
    ),
    "over": (lambda: OverSampler(LABELS, seed=1), uniform_over(COUNTS)),
    "under": (lambda: UnderSampler(FULL_LABELS, seed=1), uniform_over(FULL_COUNTS)),
    "class_balanced": (lambda: ClassBalancedSampler(LABELS, seed=1), uniform_over(COUNTS)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_drawn_frequencies_match_expected_and_known_target(name):
    make, target = CASES[name]
    sampler = make()
    expected = sampler.expected_class_distribution()
    assert expected.shape == target.shape and expected.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(expected, target, atol=1e-6)
    total = np.zeros(len(target))
    for epoch in range(50):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        total += np.bincount(sampler.labels[drawn], minlength=len(target))
    np.testing.assert_allclose(total / total.sum(), target, atol=0.01)


def test_under_yields_exactly_min_count_per_class_and_distinct_indices():
    sampler = UnderSampler(FULL_LABELS, seed=0)
    assert len(sampler) == FULL_COUNTS.min() * len(FULL_COUNTS)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        assert len(set(drawn)) == len(drawn)  # a subset, no duplicates
        assert np.bincount(FULL_LABELS[drawn]).tolist() == [FULL_COUNTS.min()] * len(FULL_COUNTS)


def test_over_keeps_every_original_sample_and_matches_majority():
    sampler = OverSampler(LABELS, seed=0)
    drawn = list(sampler)
    assert set(drawn) == set(range(len(LABELS)))
    assert np.bincount(LABELS[drawn], minlength=5).tolist() == [400, 400, 400, 0, 400]


def test_over_and_under_output_is_shuffled():
    # imblearn returns originals-then-duplicates (over) or class-grouped rows (under); fed as is,
    # batches would be ordered or single-class.
    for sampler in (OverSampler(FULL_LABELS), UnderSampler(FULL_LABELS)):
        drawn = np.array(list(sampler))
        head = drawn[: len(drawn) // 2]
        assert not np.all(np.diff(head) > 0), type(sampler).__name__
        assert np.count_nonzero(np.diff(FULL_LABELS[drawn])) > 4 * len(FULL_COUNTS)


def all_samplers(labels=LABELS, seed=0):
    return [
        ShuffleSampler(labels, seed=seed),
        WeightedSampler(labels, seed=seed),
        WeightedSampler(labels, seed=seed, weighting="effective_number"),
        OverSampler(labels, seed=seed),
        ClassBalancedSampler(labels, seed=seed, num_samples=300),
        ProgressiveSampler(labels, seed=seed, num_epochs=4),
    ]


def test_epochs_differ_same_epoch_repeats_and_seeds_differ():
    trios = zip(all_samplers(seed=0), all_samplers(seed=0), all_samplers(seed=1), strict=True)
    for sampler, resumed, other_seed in trios:
        name = type(sampler).__name__
        sampler.set_epoch(0)
        e0 = list(sampler)
        sampler.set_epoch(1)
        e1 = list(sampler)
        assert e0 != e1, name
        sampler.set_epoch(0)
        assert list(sampler) == e0, name
        resumed.set_epoch(1)  # a fresh instance jumping straight to epoch 1, as after a resume
        assert list(resumed) == e1, name
        assert list(other_seed) != e0, name


def test_seed_and_epoch_are_not_interchangeable():
    # seed + epoch seeding would make (seed=0, epoch=1) replay (seed=1, epoch=0).
    a, b = ShuffleSampler(LABELS, seed=0), ShuffleSampler(LABELS, seed=1)
    a.set_epoch(1)
    assert list(a) != list(b)


def test_len_is_constant_across_epochs():
    for sampler in [*all_samplers(), UnderSampler(FULL_LABELS)]:
        lengths = set()
        for epoch in range(4):
            sampler.set_epoch(epoch)
            lengths.add(len(list(sampler)))
        assert lengths == {len(sampler)}, type(sampler).__name__


def test_rebalancing_samplers_do_not_depend_on_global_rng():
    sampler = WeightedSampler(LABELS, seed=5)
    np.random.seed(0)
    torch.manual_seed(0)
    a = list(sampler)
    np.random.seed(1)
    torch.manual_seed(1)
    assert list(sampler) == a


def test_resume_at_starts_one_iteration_mid_epoch_and_keeps_the_epochs_histogram():
    for sampler in all_samplers():
        sampler.set_epoch(2)
        order = list(sampler)
        histogram = sampler.drawn_class_histogram()
        sampler.resume_at(7)
        assert list(sampler) == order[7:], type(sampler).__name__
        np.testing.assert_array_equal(sampler.drawn_class_histogram(), histogram)
        assert len(sampler) == len(order)
        assert list(sampler) == order  # once only


def test_progressive_moves_from_instance_to_class_balanced():
    sampler = ProgressiveSampler(LABELS, seed=0, num_epochs=5, num_samples=20_000)
    ib, cb = COUNTS / COUNTS.sum(), uniform_over(COUNTS)
    for epoch, want in [(0, ib), (2, (ib + cb) / 2), (4, cb), (7, cb)]:
        sampler.set_epoch(epoch)
        np.testing.assert_allclose(sampler.expected_class_distribution(), want, atol=1e-12)
        list(sampler)
        freq = sampler.drawn_class_histogram() / len(sampler)
        np.testing.assert_allclose(freq, want, atol=0.015)


def test_progressive_single_epoch_is_class_balanced():
    sampler = ProgressiveSampler(LABELS, num_epochs=1)
    np.testing.assert_allclose(sampler.expected_class_distribution(), uniform_over(COUNTS))


def test_expected_class_counts_scale_distribution_by_epoch_length():
    sampler = ClassBalancedSampler(LABELS, num_samples=100)
    np.testing.assert_allclose(sampler.expected_class_counts(), [25, 25, 25, 0, 25])


def test_num_classes_pads_trailing_empty_classes():
    sampler = ClassBalancedSampler(LABELS, num_classes=7)
    assert sampler.expected_class_distribution().shape == (7,)
    assert set(LABELS[list(sampler)]) == {0, 1, 2, 4}
    with pytest.raises(ValueError, match="num_classes"):
        ShuffleSampler(LABELS, num_classes=3)


# ------------------------------------------------------------------ errors


def test_under_with_empty_class_raises():
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have no training samples"):
        UnderSampler(LABELS)
    with pytest.raises(ValueError, match=r"\[5\] have no training samples"):
        UnderSampler(FULL_LABELS, num_classes=6)


def test_under_strategy_that_empties_a_class_raises():
    with pytest.raises(ValueError, match="to zero"):
        UnderSampler(FULL_LABELS, sampling_strategy={4: 0})


@pytest.mark.parametrize("cls", [OverSampler, UnderSampler])
def test_unknown_class_in_strategy_lists_valid_classes(cls):
    with pytest.raises(ValueError, match=r"\[9\].*valid classes: \[0, 1, 2, 3, 4\]"):
        cls(FULL_LABELS, sampling_strategy={0: 400, 9: 10})


def test_imblearn_errors_are_reworded():
    # Over-sampling cannot shrink a class; imblearn's message is kept but attributed.
    with pytest.raises(ValueError, match="OverSampler: imbalanced-learn rejected"):
        OverSampler(FULL_LABELS, sampling_strategy={0: 10})


def test_strategy_from_hydra_dictconfig_is_accepted():
    strategy = OmegaConf.create({"sampling_strategy": {4: 100}}).sampling_strategy
    sampler = OverSampler(FULL_LABELS, sampling_strategy=strategy)
    assert np.bincount(FULL_LABELS[list(sampler)]).tolist() == [400, 160, 64, 30, 100]


# ------------------------------------------------------------------ DDP sharding


@pytest.mark.parametrize(
    "make",
    [
        lambda: WeightedSampler(LABELS, seed=3, num_samples=101),  # odd: forces padding
        lambda: UnderSampler(FULL_LABELS, seed=3),
    ],
)
def test_distributed_wrapper_shards_the_same_epoch_list(make):
    reference = make()
    inners = [make(), make()]
    wrappers = [
        DistributedSamplerWrapper(s, num_replicas=2, rank=r, shuffle=False)
        for r, s in enumerate(inners)
    ]
    previous = None
    for epoch in (0, 1):
        reference.set_epoch(epoch)
        full = list(reference)
        shards = []
        for wrapper, inner in zip(wrappers, inners, strict=True):
            wrapper.set_epoch(epoch)
            inner.set_epoch(epoch)
            shards.append(list(wrapper))
        pad = (-len(full)) % 2
        assert len(shards[0]) == len(shards[1]) == (len(full) + pad) // 2
        # Position-wise the shards partition the padded list: multiset union == padded list.
        assert Counter(shards[0]) + Counter(shards[1]) == Counter(full + full[:pad])
        assert shards[0] == (full + full[:pad])[0::2]
        assert shards != previous
        previous = shards


# ------------------------------------------------------------------ configs


# Index samplers; the feature-space ones (SMOTE, ...) are tested with the linear probe.
INDEX_SAMPLERS = ("none", "weighted", "weighted_sqrt", "weighted_effective", "over", "under",
                  "class_balanced", "progressive")


@pytest.mark.parametrize("path", [CONFIGS / "sampler" / f"{n}.yaml" for n in INDEX_SAMPLERS],
                         ids=lambda p: p.stem)
def test_sampler_configs_instantiate(path):
    root = OmegaConf.create({"trainer": {"max_epochs": 3}, "sampler": OmegaConf.load(path)})
    sampler = instantiate(root.sampler)(labels=FULL_LABELS, seed=0, num_classes=5)
    drawn = list(sampler)
    assert len(drawn) == len(sampler) > 0
    assert sampler.expected_class_distribution().sum() == pytest.approx(1.0)


def test_all_index_sampler_options_have_configs():
    stems = {p.stem for p in (CONFIGS / "sampler").glob("*.yaml")}
    assert set(INDEX_SAMPLERS) <= stems
