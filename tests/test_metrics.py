"""Tests for tailtune.metrics: every reference value comes from scikit-learn / imblearn / numpy."""

from __future__ import annotations

import csv
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from imblearn.metrics import geometric_mean_score
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)
from torchmetrics.classification import MulticlassCalibrationError

from tailtune.metrics import (
    ImbalancedClassificationMetrics,
    confusion_figure,
    shot_groups,
    write_confusion_csv,
)

K = 5
NAMES = [f"c{i}" for i in range(K)]


@pytest.fixture(autouse=True)
def _single_torch_thread() -> Iterator[None]:
    # torch and scikit-learn each ship their own libgomp; once sklearn has run, torch's many
    # tiny parallel regions (binned AUROC loops over thresholds) can stall for tens of seconds
    # on a small shared machine. One torch thread is plenty for these sizes.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _metric(**kw: object) -> ImbalancedClassificationMetrics:
    return ImbalancedClassificationMetrics(NAMES, train_counts=[500, 200, 50, 30, 5], **kw)


def _sk(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Reference values; sklearn warns about absent classes, which is expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "acc": accuracy_score(y, pred),
            "bal_acc": balanced_accuracy_score(y, pred),
            "macro_f1": f1_score(y, pred, average="macro"),
            "gmean": geometric_mean_score(y, pred),
        }


def _ovr_present(y: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """sklearn one-vs-rest AUROC / AP averaged over the classes present in y."""
    present = np.unique(y)
    if len(present) == K:
        auroc = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    else:  # sklearn's ovr refuses missing classes; do the same average by hand
        auroc = np.mean([roc_auc_score(y == k, probs[:, k]) for k in present])
    ap = np.mean([average_precision_score(y == k, probs[:, k]) for k in present])
    return float(auroc), float(ap)


def _batches(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, K, (n,), generator=g)
    # Informative but noisy logits, so every metric is away from its trivial value.
    logits = torch.randn(n, K, generator=g) * 1.5
    logits[torch.arange(n), target] += 1.0
    return logits, target


def test_matches_sklearn_over_several_batches() -> None:
    logits, target = _batches()
    m = _metric()
    for chunk_l, chunk_t in zip(logits.split(97), target.split(97), strict=True):
        m.update(chunk_l, chunk_t)
    out = m.compute()

    y, pred = target.numpy(), logits.argmax(1).numpy()
    ref = _sk(y, pred)
    assert 0.0 < ref["gmean"] < 1.0  # the case exercises a non-trivial G-mean
    for key, value in ref.items():
        assert out[key] == pytest.approx(value, abs=1e-6), key

    auroc, ap = _ovr_present(y, logits.softmax(1).numpy())
    assert out["auroc"] == pytest.approx(auroc, abs=1e-2)
    assert out["ap"] == pytest.approx(ap, abs=1e-2)

    for k in range(K):
        assert out[f"recall/c{k}"] == pytest.approx(float(np.mean(pred[y == k] == k)), abs=1e-6)
    assert torch.equal(
        m.confusion_matrix(),
        torch.from_numpy(
            np.array([[np.sum((y == i) & (pred == j)) for j in range(K)] for i in range(K)])
        ),
    )


def test_absent_but_predicted_class_follows_sklearn() -> None:
    logits, target = _batches(seed=1)
    target[target == 3] = 0  # class 3 is never a target ...
    logits[:20, 3] += 10.0  # ... but it is predicted
    pred = logits.argmax(1)
    assert (pred == 3).any() and not (target == 3).any()

    m = _metric()
    m.update(logits, target)
    out = m.compute()
    y, p = target.numpy(), pred.numpy()
    ref = _sk(y, p)

    assert out["bal_acc"] == pytest.approx(ref["bal_acc"], abs=1e-6)
    assert out["macro_f1"] == pytest.approx(ref["macro_f1"], abs=1e-6)
    assert out["acc"] == pytest.approx(ref["acc"], abs=1e-6)
    # imblearn gives the predicted-but-absent class recall 0, hence a G-mean of exactly 0.
    assert ref["gmean"] == 0.0
    assert out["gmean"] == pytest.approx(ref["gmean"], abs=1e-6)
    # The convention matters: counting the absent class as recall 0 would give a lower value.
    present = [k for k in range(K) if k != 3]
    assert out["bal_acc"] > sum(out[f"recall/c{k}"] for k in present) / K
    assert "recall/c3" not in out

    auroc, ap = _ovr_present(y, logits.softmax(1).numpy())
    assert out["auroc"] == pytest.approx(auroc, abs=1e-2)
    assert out["ap"] == pytest.approx(ap, abs=1e-2)


def test_absent_and_not_predicted_class_is_skipped_everywhere() -> None:
    logits, target = _batches(seed=2)
    keep = target != 4
    logits, target = logits[keep], target[keep]
    logits[:, 4] = -1e4  # never predicted either
    m = _metric()
    m.update(logits, target)
    out = m.compute()
    ref = _sk(target.numpy(), logits.argmax(1).numpy())
    for key, value in ref.items():
        assert out[key] == pytest.approx(value, abs=1e-6), key
    assert out["gmean"] > 0.0
    # class 4 (train count 5) is the only few-shot class, so the few group is omitted.
    assert "few_acc" not in out and "recall/c4" not in out


def test_batch_accumulation_equals_single_update() -> None:
    logits, target = _batches(n=500, seed=3)
    sizes = [1, 7, 150, 42, 300]  # very uneven: per-batch averaging would differ
    one, many = _metric(), _metric()
    one.update(logits, target)
    for chunk_l, chunk_t in zip(logits.split(sizes), target.split(sizes), strict=True):
        many.update(chunk_l, chunk_t)
    a, b = one.compute(), many.compute()
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-6), key


def test_reset_clears_state() -> None:
    logits, target = _batches(seed=4)
    m = _metric()
    m.update(logits, target)
    before = m.compute()
    m.reset()
    assert int(m.confusion_matrix().sum()) == 0
    assert m.compute() == {}
    half = slice(0, 300)
    m.update(logits[half], target[half])
    fresh = _metric()
    fresh.update(logits[half], target[half])
    assert m.compute() == pytest.approx(fresh.compute())
    assert m.compute() != before


def _cifar_lt_counts(imbalance_ratio: float) -> list[int]:
    return [int(500 * imbalance_ratio ** (-i / 99)) for i in range(100)]


def test_shot_groups_cifar100_lt() -> None:
    g100 = shot_groups(_cifar_lt_counts(100), many_threshold=100, few_threshold=20)
    assert {k: len(v) for k, v in g100.items()} == {"many": 35, "medium": 35, "few": 30}
    assert sorted(sum(g100.values(), [])) == list(range(100))

    g10 = shot_groups(_cifar_lt_counts(10))
    assert {k: len(v) for k, v in g10.items()} == {"many": 69, "medium": 31}


def test_shot_accuracies_follow_groups() -> None:
    names = [str(i) for i in range(100)]
    g = torch.Generator().manual_seed(5)
    target = torch.arange(100).repeat(5)
    logits = torch.randn(500, 100, generator=g)
    logits[torch.arange(500), target] += 2.0

    ir10 = ImbalancedClassificationMetrics(names, _cifar_lt_counts(10))
    ir10.update(logits, target)
    out = ir10.compute()
    assert "few_acc" not in out and {"many_acc", "medium_acc"} <= out.keys()

    ir100 = ImbalancedClassificationMetrics(names, _cifar_lt_counts(100))
    ir100.update(logits, target)
    out = ir100.compute()
    y, p = target.numpy(), logits.argmax(1).numpy()
    recall = np.array([np.mean(p[y == k] == k) for k in range(100)])
    groups = shot_groups(_cifar_lt_counts(100))
    for name, idxs in groups.items():
        assert out[f"{name}_acc"] == pytest.approx(recall[idxs].mean(), abs=1e-6)


def _ece_numpy(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == y).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def test_ece_hand_computation_tiny() -> None:
    # Confidences 0.9, 0.9, 0.6, 0.5 (well inside their bins) with correctness 1, 0, 1, 0.
    probs = np.array(
        [[0.9, 0.06, 0.04], [0.9, 0.04, 0.06], [0.3, 0.6, 0.1], [0.3, 0.2, 0.5]], dtype=np.float64
    )
    y = np.array([0, 1, 1, 2])
    # Bin of 0.9: acc 0.5, conf 0.9; bin of 0.6: acc 1, conf 0.6; bin of 0.5: acc 0, conf 0.5.
    expected = 0.5 * 0.4 + 0.25 * 0.4 + 0.25 * 0.5
    assert _ece_numpy(probs, y) == pytest.approx(expected)

    m = ImbalancedClassificationMetrics(["a", "b", "c"], [10, 10, 10])
    m.update(torch.from_numpy(np.log(probs)).float(), torch.from_numpy(y))
    assert m.compute()["ece"] == pytest.approx(expected, abs=1e-6)


def test_ece_orders_calibrated_below_overconfident() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4000, K, generator=g) * 2.0
    # Targets drawn from the model's own softmax: calibrated by construction.
    target = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)
    calibrated, overconfident = _metric(), _metric()
    calibrated.update(logits, target)
    overconfident.update(logits * 5.0, target)  # same ranking, inflated confidence
    ece_cal, ece_over = calibrated.compute()["ece"], overconfident.compute()["ece"]
    assert ece_cal < 0.03 < 0.1 < ece_over

    # Cross-check the general case against numpy and torchmetrics (no confidence is 1.0 here).
    probs = logits.softmax(1)
    assert ece_cal == pytest.approx(_ece_numpy(probs.double().numpy(), target.numpy()), abs=1e-5)
    tm = MulticlassCalibrationError(num_classes=K, n_bins=15, norm="l1")
    assert ece_cal == pytest.approx(float(tm(probs, target)), abs=1e-5)


def test_confusion_figure_and_csv(tmp_path: Path) -> None:
    cm = np.array([[5, 1, 0], [0, 0, 0], [2, 0, 7]])  # row 1 has no samples
    fig = confusion_figure(cm, ["cat", "dog", "eel"])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "eel"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "eel"]
    shown = np.asarray(ax.images[0].get_array())
    assert not np.isnan(shown).any()
    np.testing.assert_allclose(shown[1], 0.0)
    np.testing.assert_allclose(shown.sum(1), [1.0, 0.0, 1.0])
    fig.savefig(tmp_path / "cm.png")  # renders through Agg without pyplot

    big = confusion_figure(torch.eye(30, dtype=torch.long), [f"k{i}" for i in range(30)])
    assert len(big.axes[0].get_xticklabels()) == 30 and not big.axes[0].texts

    path = write_confusion_csv(torch.from_numpy(cm), ["cat", "dog", "eel"], tmp_path / "cm.csv")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["true\\pred", "cat", "dog", "eel"]
    assert [r[0] for r in rows[1:]] == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(np.array([r[1:] for r in rows[1:]], dtype=int), cm)


def test_rejects_bad_shapes() -> None:
    m = _metric()
    with pytest.raises(ValueError):
        m.update(torch.zeros(4, K + 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        m.update(torch.zeros(4, K), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        ImbalancedClassificationMetrics(NAMES, [1, 2, 3])
