"""How an ensemble turns its members' logits into one prediction. Pure tensor math.

Every combiner has ``fit(val_logits_per_member, val_targets)`` (a no-op where nothing is
fitted) and ``combine(logits_per_member) -> [N, K]``. The output is a *logit-like* score:
``softmax`` of it is the ensemble's class probabilities and ``argmax`` its prediction, so the
metrics, post-hoc logit adjustment and checkpoints of :class:`ClassifierModule` apply
unchanged. Probability combiners return log-probabilities.

Fitted combiners are fitted on validation predictions only (never test) and keep their fitted
state as plain data (:meth:`Combiner.state` / :meth:`Combiner.load_state`), which the
ensemble's checkpoint carries.

- ``mean_prob``: soft vote, ``log mean_m softmax(z_m)``.
- ``mean_logit``: ``mean_m z_m``.
- ``majority``: hard vote; only exact ties go to the higher mean probability.
- ``weighted``: ``log sum_m w_m softmax(z_m)``, weights on the simplex chosen on validation
  to maximise balanced accuracy (or fixed with ``weights=[...]``); its reported validation
  scores are cross-fitted like stacking's.
- ``stacking``: a ``LogisticRegression(class_weight='balanced')`` on the members'
  log-probabilities, with cross-fitting: each validation row's reported prediction comes from
  a model fitted on the other folds, so validation metrics never see their own training rows.
- ``samme``: weighted hard vote with SAMME member weights (set by boosting, not fitted).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

# Vote shares closer than this are ties (float sums of equal weights in another order).
_TIE = 1e-9
# Log-score lead given to a hard vote's winner: above float32 rounding, so argmax finds it.
_WIN = 1e-6
_FLOOR = 1e-12


def _stack(logits_per_member: Sequence[Tensor]) -> Tensor:
    if len(logits_per_member) == 0:
        raise ValueError("an ensemble needs at least one member's logits")
    shapes = {tuple(z.shape) for z in logits_per_member}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"member logits must all be [N, K], got shapes {sorted(shapes)}")
    return torch.stack([z.float() for z in logits_per_member])  # [M, N, K]


def _balanced_accuracy(scores: Tensor, targets: Tensor) -> float:
    from tailtune.imbalance.adjust import balanced_accuracy

    return balanced_accuracy(scores, targets)


class Combiner:
    """Base class. ``needs_validation``: it is fitted on validation predictions.
    ``balances_prior``: its fitted scores carry no class prior (fitted for balanced classes),
    so an ensemble's logit adjustment has none left to remove."""

    name = "combiner"
    needs_validation = False
    balances_prior = False

    def fit(self, val_logits: Sequence[Tensor], val_targets: Tensor) -> Combiner:
        _stack(val_logits)
        return self

    def combine(self, logits_per_member: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    def combine_val(self, val_logits: Sequence[Tensor]) -> Tensor:
        """The validation scores to report: ``combine`` unless cross-fitted (stacking,
        weighted)."""
        return self.combine(val_logits)

    def _cross_fitted(self, oof: Tensor | None, val_logits: Sequence[Tensor]) -> Tensor:
        """The out-of-fold validation scores ``fit`` kept, for the rows it was fitted on."""
        if oof is None or len(oof) != len(val_logits[0]):
            raise ValueError(f"{self.name} reports validation scores only for the rows it "
                             "was fitted on (cross-fitted)")
        return oof.clone()

    def member_weights(self, members: int) -> Tensor:
        """Each member's share of the combined scores, summing to 1 (what the ensemble's
        prior is averaged with): equal, unless the combiner weighs its members."""
        return torch.full((members,), 1.0 / members, dtype=torch.float64)

    def state(self) -> dict[str, Any]:
        """Fitted state as plain data (lists, floats), for ``weights_only`` checkpoints."""
        return {"name": self.name}

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"combiner state of '{state.get('name')}' given to '{self.name}'")


class MeanProb(Combiner):
    """Soft vote: the mean of the members' probabilities."""

    name = "mean_prob"

    def combine(self, logits_per_member: Sequence[Tensor]) -> Tensor:
        probs = _stack(logits_per_member).softmax(dim=2).mean(dim=0)
        return probs.clamp_min(_FLOOR).log()


class MeanLogit(Combiner):
    """The mean of the members' logits."""

    name = "mean_logit"

    def combine(self, logits_per_member: Sequence[Tensor]) -> Tensor:
        return _stack(logits_per_member).mean(dim=0)


def weighted_vote(logits_per_member: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Log of the vote shares ``sum_m w_m onehot(argmax z_m)`` (normalised).

    The order is strictly lexicographic: the largest share wins, however small its lead;
    only classes tied at the top share (within float error) are ordered by the members' mean
    probability. The winner's score gets a lead of ``_WIN`` so that ``argmax`` finds it.
    """
    z = _stack(logits_per_member).double()
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if len(w) != len(z):
        raise ValueError(f"{len(w)} weights for {len(z)} members")
    w = w / w.sum().clamp_min(_FLOOR)
    votes = torch.nn.functional.one_hot(z.argmax(dim=2), z.shape[2]).double()  # [M, N, K]
    share = (w[:, None, None] * votes).sum(dim=0)                                # [N, K]
    tied = share >= share.max(dim=1, keepdim=True).values - _TIE
    mean_prob = z.softmax(dim=2).mean(dim=0)
    winner = torch.where(tied, mean_prob, -1.0).argmax(dim=1)  # lexicographic: share, then p
    score = share.clamp_min(_FLOOR).log()
    score[torch.arange(len(score)), winner] += _WIN
    return score.float()


def _shares(weights: Sequence[float], members: int) -> Tensor:
    w = torch.as_tensor(list(weights), dtype=torch.float64).clamp_min(0.0)
    if len(w) != members:
        raise ValueError(f"{len(w)} weights for {members} members")
    return w / w.sum()


class Majority(Combiner):
    """Hard vote: each member votes for its argmax."""

    name = "majority"

    def combine(self, logits_per_member: Sequence[Tensor]) -> Tensor:
        return weighted_vote(logits_per_member, [1.0] * len(logits_per_member))


class Samme(Combiner):
    """Multi-class AdaBoost (SAMME): a hard vote weighted by each member's ``alpha``."""

    name = "samme"

    def __init__(self, alphas: Sequence[float] | None = None) -> None:
        self.alphas = [float(a) for a in alphas] if alphas is not None else None

    def combine(self, logits_per_member: Sequence[Tensor]) -> Tensor:
        if self.alphas is None:
            raise ValueError("samme combiner has no member weights: train with "
                             "model.boosting=samme")
        if sum(self.alphas) <= 0:  # every member at chance: fall back to a plain vote
            return weighted_vote(logits_per_member, [1.0] * len(logits_per_member))
        return weighted_vote(logits_per_member, self.alphas)

    def member_weights(self, members: int) -> Tensor:
        return _shares(self.alphas, members) if self.alphas is not None and \
            sum(self.alphas) > 0 else super().member_weights(members)

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "alphas": self.alphas}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.alphas = state["alphas"]


def simplex_grid(members: int, step: float) -> list[tuple[float, ...]]:
    """All weight vectors on the simplex with coordinates in multiples of ``step``."""
    n = round(1 / step)
    points = [c for c in itertools.product(range(n + 1), repeat=members - 1) if sum(c) <= n]
    return [tuple(v / n for v in (*c, n - sum(c))) for c in points]


class Weighted(Combiner):
    """Weighted soft vote; weights fitted on validation for balanced accuracy.

    Search: the simplex grid (``step``) for up to ``grid_max_members`` members, else
    coordinate ascent from uniform weights. Among equally good weights, the one closest to
    uniform wins (a plateau's centre generalises better than its edge). ``weights=[...]``
    fixes them and skips fitting.
    """

    name = "weighted"

    def __init__(self, weights: Sequence[float] | None = None, step: float = 0.1,
                 grid_max_members: int = 4, sweeps: int = 3, folds: int = 5,
                 seed: int = 0) -> None:
        if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ValueError(f"combiner.weights must be >= 0 with a positive sum, got "
                             f"{list(weights)}")
        self.fixed = weights is not None
        self.weights = [float(w) for w in weights] if weights is not None else None
        self.needs_validation = not self.fixed
        self.step = step
        self.grid_max_members = grid_max_members
        self.sweeps = sweeps
        self.folds = folds
        self.seed = seed
        self.val_bal_acc: float | None = None  # in sample, on the images it was fitted on
        self._oof: Tensor | None = None

    @staticmethod
    def _scores(probs: Tensor, weights: Sequence[float]) -> Tensor:
        w = torch.as_tensor(list(weights), dtype=probs.dtype)
        return (w[:, None, None] * probs).sum(dim=0) / w.sum().clamp_min(_FLOOR)

    def fit(self, val_logits: Sequence[Tensor], val_targets: Tensor) -> Weighted:
        probs = _stack(val_logits).softmax(dim=2)
        m = len(probs)
        if self.fixed:
            if len(self.weights) != m:
                raise ValueError(f"combiner.weights has {len(self.weights)} entries for {m} "
                                 "members")
            return self
        from tailtune.imbalance.adjust import cross_fit_folds

        targets = torch.as_tensor(val_targets).long()
        self.weights = list(self._search(probs, targets))
        self.val_bal_acc = _balanced_accuracy(self._scores(probs, self.weights), targets)
        # Validation scores of weights searched on the other folds: scored on the images
        # they were searched on, they beat the plain mean on noise (0.30 vs 0.24, 5 classes).
        self._oof = torch.empty(probs.shape[1:])
        for searched, held in cross_fit_folds(targets.numpy(), self.folds, self.seed):
            fold_weights = self._search(probs[:, searched], targets[searched])
            self._oof[held] = self._scores(probs[:, held], fold_weights).clamp_min(_FLOOR).log()
        return self

    def _search(self, probs: Tensor, targets: Tensor) -> tuple[float, ...]:
        """The weights with the best balanced accuracy of ``probs [M, N, K]``."""
        m = len(probs)
        uniform = np.full(m, 1.0 / m)

        def score(w: Sequence[float]) -> tuple[float, float]:
            acc = _balanced_accuracy(self._scores(probs, w), targets)
            return acc, -float(np.abs(np.asarray(w) - uniform).sum())  # ties: nearer uniform

        if m == 1:
            return (1.0,)
        if m <= self.grid_max_members:
            return tuple(float(w) for w in max(simplex_grid(m, self.step), key=score))
        best = tuple(uniform)
        for _ in range(self.sweeps):
            for i in range(m):
                candidates = []
                for v in np.linspace(0.0, 1.0, round(1 / self.step) + 1):
                    w = np.asarray(best, dtype=float)
                    w[i] = v
                    if w.sum() > 0:
                        candidates.append(tuple(w / w.sum()))
                best = max([best, *candidates], key=score)
        return tuple(float(w) for w in best)

    def combine_val(self, val_logits: Sequence[Tensor]) -> Tensor:
        if self.fixed:  # nothing was fitted on val
            return self.combine(val_logits)
        return self._cross_fitted(self._oof, val_logits)

    def combine(self, logits_per_member: Sequence[Tensor]) -> Tensor:
        if self.weights is None:
            raise ValueError("the weighted combiner is not fitted: it needs validation "
                             "predictions")
        probs = _stack(logits_per_member).softmax(dim=2)
        if len(self.weights) != len(probs):
            raise ValueError(f"{len(self.weights)} weights for {len(probs)} members")
        return self._scores(probs, self.weights).clamp_min(_FLOOR).log()

    def member_weights(self, members: int) -> Tensor:
        return _shares(self.weights, members) if self.weights is not None \
            else super().member_weights(members)

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.weights, "val_bal_acc": self.val_bal_acc}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.weights = state["weights"]
        self.val_bal_acc = state.get("val_bal_acc")


def stacking_features(logits_per_member: Sequence[Tensor]) -> np.ndarray:
    """``[N, M*K]``: each member's log-probabilities side by side."""
    z = _stack(logits_per_member).log_softmax(dim=2)  # [M, N, K]
    return z.permute(1, 0, 2).reshape(z.shape[1], -1).double().numpy()


class Stacking(Combiner):
    """A class-balanced logistic regression on the members' log-probabilities, cross-fitted.

    ``fit`` fits one model per fold on the other folds (stratified) and keeps its
    out-of-fold validation scores (:meth:`combine_val`), then the final model on all of
    validation, which :meth:`combine` applies to new data (test).
    """

    name = "stacking"
    balances_prior = True  # class_weight="balanced"
    needs_validation = True

    def __init__(self, C: float = 1.0, folds: int = 5, max_iter: int = 1000,
                 seed: int = 0) -> None:
        if folds < 2:
            raise ValueError(f"combiner.folds must be >= 2 (cross-fitting), got {folds}")
        self.C = C
        self.folds = folds
        self.max_iter = max_iter
        self.seed = seed
        self.num_classes: int | None = None
        self.coef: list[list[float]] | None = None
        self.intercept: list[float] | None = None
        self.classes: list[int] | None = None
        self.fold_of_row: list[int] | None = None
        self._oof: Tensor | None = None

    def _fit_lr(self, x: np.ndarray, y: np.ndarray) -> Any:
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(class_weight="balanced", C=self.C, max_iter=self.max_iter)
        return model.fit(x, y)

    def _scores(self, x: np.ndarray, coef: np.ndarray, intercept: np.ndarray,
                classes: Sequence[int]) -> Tensor:
        """The fitted model's class log-probabilities as ``[N, K]`` logits (classes the
        model never saw get a very low score)."""
        assert self.num_classes is not None
        decision = x @ coef.T + intercept
        if decision.shape[1] == 1:  # binary: scikit-learn keeps one column, p = sigmoid(d)
            decision = np.concatenate([np.zeros_like(decision), decision], axis=1)
        out = np.full((len(x), self.num_classes), -1e4)
        out[:, list(classes)] = decision - decision.max(axis=1, keepdims=True)
        return torch.from_numpy(out).float().log_softmax(dim=1)

    def fit(self, val_logits: Sequence[Tensor], val_targets: Tensor) -> Stacking:
        from tailtune.imbalance.adjust import cross_fit_folds

        x = stacking_features(val_logits)
        y = torch.as_tensor(val_targets).long().numpy()
        self.num_classes = int(_stack(val_logits).shape[2])
        if len(y) < 4:
            raise ValueError(f"stacking needs at least 4 validation samples for cross-fitting, "
                             f"got {len(y)}")
        oof = torch.empty(len(y), self.num_classes)
        fold_of_row = np.empty(len(y), dtype=int)
        for fold, (train_rows, held_rows) in enumerate(cross_fit_folds(y, self.folds,
                                                                       self.seed)):
            model = self._fit_lr(x[train_rows], y[train_rows])
            oof[held_rows] = self._scores(x[held_rows], model.coef_, model.intercept_,
                                          model.classes_)
            fold_of_row[held_rows] = fold
        self._oof = oof
        self.fold_of_row = fold_of_row.tolist()
        final = self._fit_lr(x, y)
        self.coef = final.coef_.tolist()
        self.intercept = final.intercept_.tolist()
        self.classes = [int(c) for c in final.classes_]
        return self

    def combine(self, logits_per_member: Sequence[Tensor]) -> Tensor:
        if self.coef is None:
            raise ValueError("the stacking combiner is not fitted: it needs validation "
                             "predictions")
        return self._scores(stacking_features(logits_per_member), np.asarray(self.coef),
                            np.asarray(self.intercept), self.classes)

    def combine_val(self, val_logits: Sequence[Tensor]) -> Tensor:
        return self._cross_fitted(self._oof, val_logits)

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "coef": self.coef,
                "intercept": self.intercept, "classes": self.classes}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.num_classes = state["num_classes"]
        self.coef, self.intercept = state["coef"], state["intercept"]
        self.classes = state["classes"]

