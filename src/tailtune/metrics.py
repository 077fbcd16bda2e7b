"""Epoch-level metrics for class-imbalanced classification.

:class:`ImbalancedClassificationMetrics` accumulates a whole epoch (never averages of
per-batch values) in torchmetrics states, so under DDP every rank reports the metric of
the full, gathered evaluation set.

Absent-class convention (read this before comparing numbers)
-------------------------------------------------------------
A class that has no sample in the evaluation *targets* has no defined recall. We follow
scikit-learn / imbalanced-learn exactly, which is **not** what torchmetrics does by default
(torchmetrics counts such a class as recall 0 when it is predicted, dragging macro averages
down on small or subsampled validation sets):

- ``bal_acc`` (macro recall) averages over classes present in the targets, like
  ``sklearn.metrics.balanced_accuracy_score``. Note that sklearn's own
  ``recall_score(average='macro')`` differs: it counts a predicted-but-absent class as 0.
- ``macro_f1`` averages over classes present in the targets **or** the predictions, like
  ``sklearn.metrics.f1_score(average='macro')``: a predicted-but-absent class has F1 = 0
  (all its predictions are false positives); a class neither present nor predicted is skipped.
- ``gmean`` follows ``imblearn.metrics.geometric_mean_score`` (multiclass, ``correction=0``):
  the geometric mean of per-class recalls over classes present in the targets **or**
  predictions, where a predicted-but-absent class gets recall 0. Hence ``gmean`` is 0 as soon
  as any such class exists, or any present class has recall 0. This is imblearn's behaviour,
  kept on purpose so numbers are comparable with papers/tools that use it.
- ``auroc`` / ``ap`` average the one-vs-rest scores over classes present in the targets
  (``auroc`` additionally needs at least one negative, i.e. two present classes; otherwise it
  is omitted). They use ``auroc_thresholds`` fixed thresholds, so they approximate
  ``roc_auc_score(..., multi_class='ovr')`` / ``average_precision_score`` to ~1e-2 with
  constant memory; pass ``auroc_thresholds=None`` for exact values with growing memory.
- ``recall/<class>`` is reported only for classes present in the targets.
- ``many_acc`` / ``medium_acc`` / ``few_acc`` are the mean recall over the classes of that
  shot group (by TRAINING count: many > ``many_threshold``, medium in
  [``few_threshold``, ``many_threshold``], few < ``few_threshold``) that are present in the
  targets. A group with no such class is omitted from the dict rather than reported as 0
  (e.g. CIFAR-100-LT at imbalance ratio 10 has no few-shot class).

``ece`` is the top-label expected calibration error with ``ece_bins`` equal-width bins and
L1 norm on softmax probabilities. Bins are ``[lo, hi)`` with the last bin closed at 1.0;
torchmetrics' ``MulticlassCalibrationError`` instead puts confidence exactly 1.0 into an
extra bin and stores every sample, which is why a fixed-size state is used here.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import (
    MulticlassAUROC,
    MulticlassAveragePrecision,
    MulticlassConfusionMatrix,
)

__all__ = [
    "ImbalancedClassificationMetrics",
    "confusion_figure",
    "shot_groups",
    "write_confusion_csv",
]

SHOT_GROUPS: tuple[str, ...] = ("many", "medium", "few")


def shot_groups(
    train_counts: Sequence[int], many_threshold: int = 100, few_threshold: int = 20
) -> dict[str, list[int]]:
    """Split class indices by training count into ``many`` / ``medium`` / ``few`` shot groups.

    many: count > ``many_threshold``; medium: ``few_threshold`` <= count <= ``many_threshold``;
    few: count < ``few_threshold``. Empty groups are omitted (so callers never report a
    meaningless 0 for a group that does not exist).
    """
    if few_threshold > many_threshold:
        raise ValueError(
            f"few_threshold ({few_threshold}) must be <= many_threshold ({many_threshold})"
        )
    groups: dict[str, list[int]] = {name: [] for name in SHOT_GROUPS}
    for idx, count in enumerate(train_counts):
        count = int(count)
        if count > many_threshold:
            groups["many"].append(idx)
        elif count >= few_threshold:
            groups["medium"].append(idx)
        else:
            groups["few"].append(idx)
    return {name: idxs for name, idxs in groups.items() if idxs}


class _BinnedCalibrationError(Metric):
    """Top-label L1 ECE with fixed-size per-bin sums (constant memory, DDP ``sum`` reduce)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    count: Tensor
    conf_sum: Tensor
    correct_sum: Tensor

    def __init__(self, n_bins: int = 15) -> None:
        super().__init__()
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = n_bins
        # Counts are exact integers; confidence sums are float32 (float64 states cannot live on
        # MPS devices).
        self.add_state("count", torch.zeros(n_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("correct_sum", torch.zeros(n_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("conf_sum", torch.zeros(n_bins, dtype=torch.float32), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:  # type: ignore[override]
        conf, pred = probs.float().max(dim=1)
        # Bins [lo, hi), last one closed at 1.0. Computed arithmetically rather than from an
        # edge buffer, which `.to(bfloat16)` (Lightning "bf16-true") would silently round.
        idx = (conf * self.n_bins).long().clamp_(0, self.n_bins - 1)
        if self.conf_sum.dtype != torch.float32:  # undo a half-precision cast of the module
            self.conf_sum = self.conf_sum.float()
        self.count += torch.bincount(idx, minlength=self.n_bins)
        self.correct_sum += torch.bincount(idx[pred.eq(target)], minlength=self.n_bins)
        self.conf_sum.index_add_(0, idx, conf)

    def compute(self) -> Tensor:
        total = self.count.sum().clamp_min(1)
        # sum_b (n_b/N) * |acc_b - conf_b| == sum_b |correct_b - conf_b| / N
        return (self.correct_sum - self.conf_sum).abs().sum() / total


@contextmanager
def _quiet_empty_rank() -> Iterator[None]:
    """A DDP rank that saw no batch must still join every sync; silence torchmetrics'
    "compute called before update" warning for that legitimate case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*compute.*called before.*update.*")
        yield


class ImbalancedClassificationMetrics(nn.Module):
    """Epoch-level metrics that stay honest under class imbalance (see module docstring).

    Usage: call ``update(logits, target)`` every batch, ``compute()`` at epoch end (returns
    plain floats, ready for ``LightningModule.log_dict``), then ``reset()``. It is an
    ``nn.Module`` of torchmetrics children, so it moves with the LightningModule and every
    child syncs its own states across DDP ranks in ``compute()``.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        train_counts: Sequence[int],
        many_threshold: int = 100,
        few_threshold: int = 20,
        auroc_thresholds: int | None = 200,
        ece_bins: int = 15,
    ) -> None:
        super().__init__()
        self.class_names: list[str] = [str(n) for n in class_names]
        self.num_classes = len(self.class_names)
        if self.num_classes < 2:
            raise ValueError("need at least 2 classes")
        counts = [int(c) for c in train_counts]
        if len(counts) != self.num_classes:
            raise ValueError(
                f"train_counts has {len(counts)} entries but there are {self.num_classes} classes"
            )
        self.train_counts = counts
        self.groups = shot_groups(counts, many_threshold, few_threshold)
        k = self.num_classes
        # validate_args=False: torchmetrics' checks call torch.unique (a GPU sync) every
        # batch; we check shapes ourselves, and out-of-range targets still fail in bincount.
        self.confmat = MulticlassConfusionMatrix(k, validate_args=False)
        # average="none" so we can average over present classes ourselves (torchmetrics'
        # macro would include absent classes as 0).
        self.auroc = MulticlassAUROC(
            k, average="none", thresholds=auroc_thresholds, validate_args=False
        )
        self.ap = MulticlassAveragePrecision(
            k, average="none", thresholds=auroc_thresholds, validate_args=False
        )
        self.calibration = _BinnedCalibrationError(ece_bins)

    def update(self, logits: Tensor, target: Tensor) -> None:
        """Accumulate a batch of raw logits ``[N, K]`` and integer targets ``[N]``."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be [N, {self.num_classes}], got {tuple(logits.shape)}")
        if target.ndim != 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(f"target must be [{logits.shape[0]}], got {tuple(target.shape)}")
        target = target.long()
        # Softmax ourselves in fp32: torchmetrics only applies softmax when values fall
        # outside [0, 1], so logits that happen to lie in [0, 1] would be misread as probs.
        probs = logits.detach().float().softmax(dim=1)
        self.confmat.update(probs.argmax(dim=1), target)
        self.auroc.update(probs, target)
        self.ap.update(probs, target)
        self.calibration.update(probs, target)

    def forward(self, logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        """Alias of :meth:`update` (accumulates; returns nothing, unlike torchmetrics)."""
        self.update(logits, target)

    def reset(self) -> None:
        """Clear all accumulated state (call after ``compute()`` at epoch end)."""
        for metric in (self.confmat, self.auroc, self.ap, self.calibration):
            metric.reset()

    def confusion_matrix(self) -> Tensor:
        """Counts ``[K, K]`` (rows = true class, columns = predicted), synced across ranks."""
        with _quiet_empty_rank():
            return self.confmat.compute().detach().clone()

    def compute(self) -> dict[str, float]:
        """Metrics of everything accumulated since the last reset (empty dict if nothing)."""
        with _quiet_empty_rank():
            return self._compute()

    def _compute(self) -> dict[str, float]:
        # Sync the confusion matrix first on every rank: the decision below is then the same
        # on all ranks, so no rank skips a collective the others enter.
        cm = self.confusion_matrix().cpu().to(torch.float64)
        total = float(cm.sum())
        if total == 0:
            return {}
        tp = cm.diag()
        support = cm.sum(dim=1)
        predicted = cm.sum(dim=0)
        present = support > 0
        recall = torch.where(present, tp / support.clamp_min(1), torch.zeros_like(tp))

        out: dict[str, float] = {
            "acc": float(tp.sum() / total),
            "bal_acc": float(recall[present].mean()),
        }
        # sklearn's label set for F1 / imblearn's for G-mean: present in targets OR predictions.
        labelled = present | (predicted > 0)
        fp = predicted - tp
        fn = support - tp
        f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
        out["macro_f1"] = float(f1[labelled].mean())
        r = recall[labelled]  # predicted-but-absent classes enter with recall 0 (imblearn)
        out["gmean"] = 0.0 if bool((r == 0).any()) else float(torch.exp(torch.log(r).mean()))

        auroc = self.auroc.compute().detach().cpu().to(torch.float64)
        ap = self.ap.compute().detach().cpu().to(torch.float64)
        has_neg = support < total
        if bool((present & has_neg).any()):
            out["auroc"] = float(auroc[present & has_neg].mean())
        out["ap"] = float(ap[present].mean())
        out["ece"] = float(self.calibration.compute())

        for group, idxs in self.groups.items():
            members = [i for i in idxs if bool(present[i])]
            if members:  # a group with no evaluable class is omitted, never 0
                out[f"{group}_acc"] = float(recall[members].mean())
        for i, name in enumerate(self.class_names):
            if bool(present[i]):
                out[f"recall/{name}"] = float(recall[i])
        return out


def _to_numpy(cm: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(cm, Tensor):
        cm = cm.detach().cpu().numpy()
    arr = np.asarray(cm)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"confusion matrix must be square [K, K], got {arr.shape}")
    return arr


def confusion_figure(cm: Tensor | np.ndarray, class_names: Sequence[str]) -> Figure:
    """Row-normalised confusion matrix as a standalone Agg ``Figure`` (no pyplot state).

    Rows with no samples stay all-zero (never NaN). Cell annotations are drawn only when
    K <= 20; beyond that they are unreadable and the colour map carries the information.
    """
    counts = _to_numpy(cm).astype(np.float64)
    names = [str(n) for n in class_names]
    k = counts.shape[0]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}x{k} confusion matrix")
    row_sums = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)

    # Grow the canvas with K but cap it so 100 classes stay a loggable image.
    side = float(min(max(6.0, 0.18 * k + 2.0), 24.0))
    fig = Figure(figsize=(side, side), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg canvas: savefig/draw work without pyplot
    ax = fig.add_subplot()
    image = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fontsize = float(min(10.0, max(4.0, 300.0 / k)))
    ax.set_xticks(range(k), labels=names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(k), labels=names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                value = norm[i, j]
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=fontsize - 1,
                    color="white" if value > 0.5 else "black",
                )
    return fig


def write_confusion_csv(
    cm: Tensor | np.ndarray, class_names: Sequence[str], path: str | Path
) -> Path:
    """Write raw counts: header ``true\\pred,<names...>``, then one row per true class."""
    counts = _to_numpy(cm)
    names = [str(n) for n in class_names]
    if len(names) != counts.shape[0]:
        raise ValueError(f"{len(names)} class names for a {counts.shape[0]}-class matrix")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["true\\pred", *names])
        for name, row in zip(names, counts, strict=True):
            # Counts are integral; write them without a trailing ".0" even from float input.
            writer.writerow([name, *(_fmt_count(v) for v in row)])
    return path


def _fmt_count(value: float | int) -> str:
    value = float(value)
    return str(int(value)) if math.isfinite(value) and value.is_integer() else repr(value)
