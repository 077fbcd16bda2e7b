from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tailtune.imbalance.losses import (
    BalancedSoftmaxLoss,
    ClassBalancedLoss,
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    WeightedCrossEntropyLoss,
    effective_number_weights,
    inverse_frequency_weights,
    ldam_margins,
    posthoc_logit_adjust,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COUNTS = [500, 120, 30, 7, 1]


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, len(COUNTS), generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, len(COUNTS), (64,), generator=g)
    return logits, target


def all_losses(counts, **kw):
    return [
        CrossEntropyLoss(counts, **kw),
        WeightedCrossEntropyLoss(counts, weighting="inverse", **kw),
        WeightedCrossEntropyLoss(counts, weighting="sqrt_inverse", **kw),
        WeightedCrossEntropyLoss(counts, weighting="effective_number", **kw),
        FocalLoss(counts, gamma=2.0, alpha=[1.0] * len(counts), **kw),
        ClassBalancedLoss(counts, base="ce", **kw),
        ClassBalancedLoss(counts, base="focal", gamma=0.5, **kw),
        LDAMLoss(counts, drw_start=0, **kw),
        BalancedSoftmaxLoss(counts, **kw),
        LogitAdjustedLoss(counts, **kw),
    ]


# ------------------------------------------------------------------ equalities with known losses


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_focal_gamma0_equals_cross_entropy(batch, ls):
    logits, target = batch
    got = FocalLoss(COUNTS, gamma=0.0, label_smoothing=ls)(logits, target)
    assert torch.allclose(got, F.cross_entropy(logits, target, label_smoothing=ls))


def test_focal_gamma0_with_alpha_equals_weighted_cross_entropy(batch):
    logits, target = batch
    alpha = [0.1, 0.2, 0.3, 0.4, 2.0]
    got = FocalLoss(COUNTS, gamma=0.0, alpha=alpha)(logits, target)
    want = F.cross_entropy(logits, target, weight=torch.tensor(alpha, dtype=logits.dtype))
    assert torch.allclose(got, want)


def test_focal_matches_definition(batch):
    logits, target = batch
    p = logits.softmax(1).gather(1, target[:, None]).squeeze(1)
    want = (-((1 - p) ** 2) * p.log()).mean()
    assert torch.allclose(FocalLoss(COUNTS, gamma=2.0)(logits, target), want)


def test_focal_with_per_class_alpha_and_gamma_matches_definition(batch):
    # Lin et al. 2017, softmax form: -alpha_y (1 - p_y)^gamma log p_y, mean over sum alpha_y.
    logits, target = batch
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4, 2.0])
    for gamma in (0.5, 2.0):
        p = logits.softmax(1).gather(1, target[:, None]).squeeze(1)
        a = alpha[target]
        want = (-a * (1 - p) ** gamma * p.log()).sum() / a.sum()
        got = FocalLoss(COUNTS, gamma=gamma, alpha=alpha.tolist())(logits, target)
        assert torch.allclose(got, want, atol=1e-6), gamma


def test_class_balanced_focal_matches_cui_et_al(batch):
    # Cui et al. 2019: focal loss weighted by (1 - beta) / (1 - beta^n_y), weights summing to K.
    logits, target = batch
    beta, gamma = 0.999, 0.5
    n = torch.tensor(COUNTS, dtype=torch.float64).clamp_min(1)
    w = (1 - beta) / (1 - beta ** n)
    w = (w * len(n) / w.sum()).float()
    p = logits.softmax(1).gather(1, target[:, None]).squeeze(1)
    a = w[target]
    want = (-a * (1 - p) ** gamma * p.log()).sum() / a.sum()
    got = ClassBalancedLoss(COUNTS, beta=beta, base="focal", gamma=gamma)(logits, target)
    assert torch.allclose(got, want, atol=1e-6)


def test_balanced_softmax_is_ce_on_logits_plus_log_counts(batch):
    logits, target = batch
    shifted = logits + torch.tensor(COUNTS, dtype=logits.dtype).log()
    want = F.cross_entropy(shifted, target)
    assert torch.allclose(BalancedSoftmaxLoss(COUNTS)(logits, target), want)


def test_logit_adjusted_tau0_is_ce_and_tau1_is_balanced_softmax(batch):
    logits, target = batch
    la0 = LogitAdjustedLoss(COUNTS, tau=0.0)(logits, target)
    assert torch.allclose(la0, F.cross_entropy(logits, target))
    la1 = LogitAdjustedLoss(COUNTS, tau=1.0)(logits, target)
    assert torch.allclose(la1, BalancedSoftmaxLoss(COUNTS)(logits, target))


@pytest.mark.parametrize("make", [lambda ls: BalancedSoftmaxLoss(COUNTS, label_smoothing=ls),
                                  lambda ls: LogitAdjustedLoss(COUNTS, tau=1.5,
                                                               label_smoothing=ls)])
def test_smoothing_under_a_prior_shift_is_minimised_by_the_smoothed_balanced_label(make):
    # Smoothing meant for softmax(z), the prediction: the loss must be stationary where
    # softmax(z) = (1 - eps) onehot + eps / K for every class, head or tail. Smoothing in the
    # shifted space (F.cross_entropy(z + shift, label_smoothing=eps)) is not: its optimum for
    # a head-class image predicts the rarest class.
    eps, k = 0.1, len(COUNTS)
    target = torch.arange(k)
    smoothed = torch.full((k, k), eps / k, dtype=torch.float64) + (1 - eps) * torch.eye(k)
    z = smoothed.log().requires_grad_(True)
    make(eps)(z, target).backward()
    assert torch.allclose(z.grad, torch.zeros_like(z.grad), atol=1e-7)
    training_shift = -make(0.0).logit_prior_shift().double()  # without smoothing: -shift
    old = z.detach().clone().requires_grad_(True)  # the same point under the old smoothing
    F.cross_entropy(old + training_shift, target, label_smoothing=eps).backward()
    assert old.grad.abs().max() > 1e-2


@pytest.mark.parametrize("make", [
    lambda ls: CrossEntropyLoss(COUNTS, label_smoothing=ls),
    lambda ls: WeightedCrossEntropyLoss(COUNTS, weighting="sqrt_inverse", label_smoothing=ls),
    lambda ls: BalancedSoftmaxLoss(COUNTS, label_smoothing=ls),
    lambda ls: LogitAdjustedLoss(COUNTS, tau=0.5, label_smoothing=ls),
], ids=["ce", "weighted_ce", "balanced_softmax", "logit_adjusted"])
def test_the_recorded_prior_is_the_one_left_under_the_smoothing_floor(make):
    """A bias-only model fits the prior exactly: with the floor eps / K taken off its softmax,
    what is left must be the prior the loss records (q * exp(logit_prior_shift)), which
    post-hoc logit adjustment removes. Shifted losses with smoothing leave a head lean (the
    rarest class well under its balanced share), not the unsmoothed q * exp(-shift)."""
    eps, k = 0.1, len(COUNTS)
    loss = make(eps)
    target = torch.repeat_interleave(torch.arange(k), torch.tensor(COUNTS))
    bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([bias], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss(bias.expand(len(target), k), target)
        value.backward()
        return value

    opt.step(closure)
    unsmoothed = (bias.detach().softmax(0) - eps / k) / (1 - eps)
    q = torch.tensor(COUNTS, dtype=torch.float64)
    recorded = q * loss.logit_prior_shift().double().exp()
    torch.testing.assert_close(unsmoothed, recorded / recorded.sum(), atol=1e-6, rtol=1e-5)
    unshifted = q * make(0.0).logit_prior_shift().double().exp()
    if isinstance(loss, (BalancedSoftmaxLoss, LogitAdjustedLoss)):
        assert unsmoothed[-1] < 0.75 * unshifted[-1] / unshifted.sum()


def test_prior_shifted_smoothing_is_torch_smoothing_when_the_shift_is_uniform(batch):
    logits, target = batch
    flat = BalancedSoftmaxLoss([40] * len(COUNTS), label_smoothing=0.2)(logits, target)
    assert torch.allclose(flat, F.cross_entropy(logits, target, label_smoothing=0.2))
    la0 = LogitAdjustedLoss(COUNTS, tau=0.0, label_smoothing=0.2)(logits, target)
    assert torch.allclose(la0, F.cross_entropy(logits, target, label_smoothing=0.2))


def test_posthoc_logit_adjust_subtracts_log_prior():
    logits = torch.zeros(2, 3)
    out = posthoc_logit_adjust(logits, [2, 1, 1], tau=2.0)
    # prior = [1/2, 1/4, 1/4] -> -2 * log prior = [2 log 2, 4 log 2, 4 log 2]
    want = torch.tensor([2, 4, 4]) * math.log(2)
    assert torch.allclose(out, want.expand(2, 3))
    # With equal logits, the adjusted argmax picks a tail class, not the head class.
    assert out.argmax(1).tolist() == [1, 1]


def test_weighted_ce_without_smoothing_equals_torch_weighted_ce(batch):
    logits, target = batch
    loss = WeightedCrossEntropyLoss(COUNTS, weighting="inverse")
    n = torch.tensor(COUNTS, dtype=torch.float64)
    want = F.cross_entropy(logits, target, weight=1 / n)  # scale cancels in the weighted mean
    assert torch.allclose(loss(logits, target), want)


def test_weighted_ce_smoothing_weights_each_sample_by_its_own_class(batch):
    logits, target = batch
    eps = 0.2
    loss = WeightedCrossEntropyLoss(COUNTS, weighting="sqrt_inverse", label_smoothing=eps)
    logp = logits.log_softmax(1)
    w = torch.tensor(COUNTS, dtype=torch.float64).rsqrt()[target]
    per = (1 - eps) * -logp.gather(1, target[:, None]).squeeze(1) - eps * logp.mean(1)
    assert torch.allclose(loss(logits, target), (w * per).sum() / w.sum())


# ------------------------------------------------------------------ weight / margin formulas


def test_ldam_margins_are_quarter_power_scaled_to_max_m():
    # n^(1/4) = 1, 2, 3 -> margins ∝ 1, 1/2, 1/3, largest (rarest class) equal to max_m.
    m = ldam_margins([1, 16, 81], max_m=0.5)
    assert torch.allclose(m, torch.tensor([0.5, 0.25, 0.5 / 3]))


def test_class_balanced_weights_match_effective_number_formula():
    counts, beta = [1000, 100, 10, 1], 0.999
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    want = torch.tensor([r * len(counts) / sum(raw) for r in raw])
    assert torch.allclose(effective_number_weights(counts, beta=beta), want)
    assert torch.allclose(ClassBalancedLoss(counts, beta=beta).weight, want)


def test_inverse_frequency_weights_sum_to_k_and_are_inverse():
    w = inverse_frequency_weights([100, 25, 4], power=0.5)
    # 1/sqrt(n) = 1/10, 1/5, 1/2 -> ratio 1 : 2 : 5, sum 8, scaled to sum 3.
    assert torch.allclose(w, torch.tensor([1.0, 2.0, 5.0]) * 3 / 8)


@pytest.mark.parametrize("weighting", ["inverse", "sqrt_inverse", "effective_number"])
def test_weighted_ce_weights_sum_to_k(weighting):
    loss = WeightedCrossEntropyLoss(COUNTS, weighting=weighting)
    assert loss.weight.sum().item() == pytest.approx(len(COUNTS))
    assert torch.all(loss.weight[:-1] <= loss.weight[1:])  # rarer class, larger weight


def test_unknown_weighting_lists_valid_names():
    with pytest.raises(ValueError, match="inverse, sqrt_inverse, effective_number"):
        WeightedCrossEntropyLoss(COUNTS, weighting="balanced")


# ------------------------------------------------------------------ LDAM-DRW


def test_ldam_subtracts_scaled_margin_from_true_class_only(batch):
    logits, target = batch
    loss = LDAMLoss(COUNTS, max_m=0.5, s=30.0, drw_start=None)
    assert (loss.head, loss.head_scale) == ("cosine", 30.0)
    n = torch.tensor(COUNTS, dtype=torch.float64)
    delta = n**-0.25 * (0.5 / (n**-0.25).max())
    adjusted = logits - 30.0 * F.one_hot(target, len(COUNTS)) * delta
    assert torch.allclose(loss(logits, target), F.cross_entropy(adjusted, target))


def test_ldam_drw_uniform_before_start_class_balanced_after(batch):
    logits, target = batch
    loss = LDAMLoss(COUNTS, drw_start=3, beta=0.9999)
    cb = effective_number_weights(COUNTS, beta=0.9999)
    no_drw = LDAMLoss(COUNTS, drw_start=None)(logits, target)
    for epoch in (0, 2):
        loss.set_epoch(epoch)
        assert torch.equal(loss.weight, torch.ones(len(COUNTS)))
        assert torch.allclose(loss(logits, target), no_drw)
    for epoch in (3, 10):
        loss.set_epoch(epoch)
        assert torch.allclose(loss.weight, cb)
        assert not torch.allclose(loss(logits, target), no_drw)
    loss.set_epoch(1)  # state is a function of the epoch only (resume / re-run)
    assert torch.equal(loss.weight, torch.ones(len(COUNTS)))


def test_only_ldam_declares_cosine_head():
    for loss in all_losses(COUNTS):
        want = "cosine" if isinstance(loss, LDAMLoss) else "linear"
        assert loss.head == want
    assert not CrossEntropyLoss.uses_prior and not FocalLoss.uses_prior
    for cls in (
        WeightedCrossEntropyLoss,
        ClassBalancedLoss,
        LDAMLoss,
        BalancedSoftmaxLoss,
        LogitAdjustedLoss,
    ):
        assert cls.uses_prior


# ------------------------------------------------------------------ numerical safety


@pytest.mark.parametrize("counts", [[500, 0, 30, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_zero_and_unit_counts_give_finite_loss_and_gradients(counts, ls):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 5, generator=g) * 5
    target = torch.arange(32) % 5  # includes the empty classes
    for loss in all_losses(counts, label_smoothing=ls):
        z = logits.clone().requires_grad_(True)
        value = loss(z, target)
        value.backward()
        assert torch.isfinite(value), type(loss).__name__
        assert torch.isfinite(z.grad).all(), type(loss).__name__


@pytest.mark.parametrize(
    "loss", [FocalLoss(COUNTS, gamma=0.5), ClassBalancedLoss(COUNTS, base="focal", gamma=0.5)]
)
def test_focal_gamma_half_has_finite_gradients_on_confident_logits(loss):
    target = torch.tensor([0, 1, 2, 3, 4])
    z = (F.one_hot(target, 5) * 1e3 - 1e-4 * torch.arange(5)).float().requires_grad_(True)
    value = loss(z, target)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()
    # Near p -> 1 but representable: still finite and the loss is tiny.
    z2 = (F.one_hot(target, 5) * 12.0).float().requires_grad_(True)
    loss(z2, target).backward()
    assert torch.isfinite(z2.grad).all()


def test_losses_follow_input_dtype_without_moving_module(batch):
    logits, target = batch  # float64, module buffers are float32
    for loss in all_losses(COUNTS, label_smoothing=0.1):
        assert loss(logits, target).dtype == torch.float64, type(loss).__name__
        assert loss(logits.float(), target).dtype == torch.float32, type(loss).__name__


def test_per_class_tensors_are_buffers_outside_state_dict():
    loss = LDAMLoss(COUNTS)
    names = {n for n, _ in loss.named_buffers()}
    assert {"margins", "drw_weight", "class_counts"} <= names
    assert loss.state_dict() == {}


# ------------------------------------------------------------------ validation


def test_focal_rejects_scalar_and_wrong_length_alpha():
    with pytest.raises(ValueError, match="does nothing for class imbalance"):
        FocalLoss(COUNTS, alpha=0.25)
    with pytest.raises(ValueError, match="one entry per class"):
        FocalLoss(COUNTS, alpha=[0.25, 0.75])


def test_probabilities_are_rejected_as_counts():
    with pytest.raises(ValueError, match="probabilities"):
        BalancedSoftmaxLoss([0.7, 0.2, 0.1])


def test_wrong_number_of_classes_raises(batch):
    logits, target = batch
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        CrossEntropyLoss([1, 2, 3])(logits, target)


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("path", sorted((CONFIGS / "loss").glob("*.yaml")), ids=lambda p: p.stem)
def test_loss_configs_instantiate(path, batch):
    logits, target = batch
    loss = instantiate(OmegaConf.load(path))(class_counts=COUNTS)
    value = loss(logits, target)
    assert torch.isfinite(value)


def test_all_loss_options_have_configs():
    stems = {p.stem for p in (CONFIGS / "loss").glob("*.yaml")}
    assert stems == {
        "ce",
        "weighted_ce",
        "focal",
        "class_balanced",
        "ldam_drw",
        "balanced_softmax",
        "logit_adjusted",
    }
