"""Post-hoc adjustment: logit adjustment, per-class bias, temperature, tau-norm, and how a
model stores them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from tailtune.data.info import DatasetInfo
from tailtune.imbalance import adjust
from tailtune.imbalance.losses import CrossEntropyLoss
from tailtune.metrics import ImbalancedClassificationMetrics
from tailtune.models.base import ClassifierModule

PRIOR = torch.tensor([0.70, 0.20, 0.07, 0.03])


def gaussian_task(n_per_class: int, seed: int, prior: torch.Tensor | None = None):
    """Four unit-variance 2-D Gaussian classes; logits are the Bayes posterior under the
    imbalanced training prior, i.e. what a well-fitted model trained on that prior outputs."""
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([[math.cos(a), math.sin(a)] for a in
                          np.linspace(0, 2 * math.pi, 4, endpoint=False)]) * 1.5
    counts = [n_per_class] * 4 if prior is None else [int(n_per_class * p / prior.max())
                                                      for p in prior]
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    x = means[y] + torch.randn(len(y), 2, generator=g)
    log_lik = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1)
    return log_lik + PRIOR.log(), y


class SmallModule(ClassifierModule):
    def __init__(self, info: DatasetInfo, **kwargs) -> None:
        super().__init__(info=info, loss=CrossEntropyLoss([1] * info.num_classes), **kwargs)
        self.layer = torch.nn.Linear(2, info.num_classes)

    def forward(self, x):
        return self.layer(x)


def _info(counts=(700, 200, 70, 30)) -> DatasetInfo:
    return DatasetInfo(name="toy", class_names=tuple("abcd"), class_counts=tuple(counts),
                       split_fingerprint="x", image_size=8)


def test_tuned_tau_undoes_a_known_prior_shift_and_helps_on_test():
    val_logits, val_y = gaussian_task(1500, seed=0)      # balanced val and test
    test_logits, test_y = gaussian_task(1500, seed=1)
    tau, val_acc = adjust.tune_logit_adjustment(val_logits, val_y, PRIOR.log())
    assert tau == pytest.approx(1.0, abs=0.25)
    before = adjust.balanced_accuracy(test_logits, test_y)
    after = adjust.balanced_accuracy(test_logits - tau * PRIOR.log(), test_y)
    assert after > before + 0.05
    assert val_acc >= adjust.balanced_accuracy(val_logits, val_y)


def test_balanced_accuracy_and_ece_agree_with_reference_implementations():
    logits, y = gaussian_task(200, seed=3, prior=PRIOR)
    assert adjust.balanced_accuracy(logits, y) == pytest.approx(
        balanced_accuracy_score(y.numpy(), logits.argmax(1).numpy()))
    metrics = ImbalancedClassificationMetrics(list("abcd"), [700, 200, 70, 30],
                                              auroc_thresholds=None)
    metrics.update(logits, y)
    assert adjust.expected_calibration_error(logits, y) == pytest.approx(
        metrics.compute()["ece"], abs=1e-5)


def test_class_bias_finds_a_shift_and_never_lowers_validation_balanced_accuracy():
    logits, y = gaussian_task(800, seed=4)
    shifted = logits.clone()
    shifted[:, 0] += 2.0  # a model that over-predicts class 0
    bias = adjust.tune_class_bias(shifted, y)
    base = adjust.balanced_accuracy(shifted, y)
    tuned = adjust.balanced_accuracy(shifted + bias, y)
    assert tuned >= base
    # Only differences between biases matter: class 0's must come down relative to the rest.
    assert (bias[0] - bias[1:].mean()).item() < -1.0
    assert tuned >= adjust.balanced_accuracy(shifted - 2.0 * torch.eye(4)[0], y) - 0.01


def test_temperature_recovers_a_known_overconfidence_and_lowers_ece():
    logits, y = gaussian_task(1000, seed=5, prior=PRIOR)  # calibrated: the true posterior
    hot = logits * 3.0
    temperature = adjust.fit_temperature(hot, y)
    assert temperature == pytest.approx(3.0, rel=0.15)
    assert adjust.expected_calibration_error(hot / temperature, y) < \
        adjust.expected_calibration_error(hot, y)
    assert (hot / temperature).argmax(1).equal(hot.argmax(1))  # accuracy unchanged


def test_tau_normalisation():
    weight = torch.tensor([[3.0, 4.0], [0.6, 0.8]])  # norms 5 and 1
    assert torch.equal(adjust.tau_normalized_weight(weight, 0.0), weight)
    unit = adjust.tau_normalized_weight(weight, 1.0)
    assert torch.allclose(unit.norm(dim=1), torch.ones(2))
    x = torch.randn(6, 2)
    dots = x @ weight.T
    for tau in (0.0, 0.5, 1.3):
        expected = x @ adjust.tau_normalized_weight(weight, tau).T
        assert torch.allclose(adjust.tau_norm_logits(dots, weight.norm(dim=1), tau), expected,
                              atol=1e-6)
    # A head whose large-norm class swamps the other: normalising helps balanced accuracy.
    y = torch.randint(0, 2, (400,), generator=torch.Generator().manual_seed(0))
    feats = torch.nn.functional.one_hot(y, 2).float() + 0.3 * torch.randn(400, 2)
    head = torch.tensor([[5.0, 0.0], [0.0, 1.0]]) + torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    tau, acc = adjust.tune_tau_norm(feats @ head.T, y, head.norm(dim=1))
    assert tau > 0.0 and acc > adjust.balanced_accuracy(feats @ head.T, y)


def test_module_stores_the_tuned_adjustment_and_applies_it_everywhere():
    info = _info()
    model = SmallModule(info, posthoc=["temperature", "logit_adjust"])
    assert model.posthoc_steps == ("logit_adjust", "temperature")  # applied in a fixed order
    x = torch.randn(600, 2)
    y = torch.randint(0, 4, (600,))
    raw = model(x).detach()
    report = model.fit_posthoc(raw, y)
    assert report["val_after"]["nll"] <= report["val_before"]["nll"] + 1e-9
    expected = (raw - report["logit_adjust_tau"] * model.log_prior) / report["temperature"]
    assert torch.allclose(model.eval_logits(x), expected, atol=1e-5)
    assert torch.allclose(model.predict_proba(x), expected.softmax(1), atol=1e-5)

    clone = SmallModule(info)
    clone.load_state_dict(model.state_dict())
    assert torch.allclose(clone.eval_logits(x), model.eval_logits(x))
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("posthoc_")}
    fresh = SmallModule(info)
    fresh.load_state_dict(old, strict=True)  # checkpoints from before the buffers existed
    assert float(fresh.posthoc_temperature) == 1.0


def test_unknown_posthoc_step_is_refused():
    with pytest.raises(ValueError, match="unknown model.posthoc"):
        SmallModule(_info(), posthoc="platt")


def test_finetune_run_tunes_posthoc_on_val_and_its_checkpoint_carries_it(smoke_cfg):
    from pathlib import Path

    import tailtune
    from tailtune.cli.train import train

    cfg, choices = smoke_cfg("model.posthoc=[logit_adjust,bias,temperature]",
                             "trainer.limit_val_batches=null")
    train(cfg, choices)
    run_dir = Path(cfg.paths.output_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = metrics["posthoc"]
    assert report["steps"] == ["logit_adjust", "bias", "temperature"]
    assert report["val_after"]["bal_acc"] >= report["val_before"]["bal_acc"]
    assert report["val_after"]["nll"] <= report["val_before"]["nll"] + 1e-6
    assert metrics["val"]["bal_acc"] == pytest.approx(report["val_after"]["bal_acc"], abs=1e-6)
    assert "test" in report["before"] and "ece" in report["before"]["test"]
    model = tailtune.load(str(run_dir / "checkpoints" / "best.ckpt"))
    assert float(model.posthoc_tau) == pytest.approx(report["logit_adjust_tau"])
    assert float(model.posthoc_temperature) == pytest.approx(report["temperature"], rel=1e-5)
    assert model.posthoc_bias.tolist() == pytest.approx(report["class_bias"], abs=1e-6)
    # At the served size and on the uint8 grid, as the loader serves them.
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8).float() / 255
    with torch.no_grad():
        raw = model(images)
    expected = ((raw - model.posthoc_tau * model.log_prior + model.posthoc_bias)
                / model.posthoc_temperature).softmax(1)
    assert torch.allclose(model.predict_images(images), expected, atol=1e-6)
    # posthoc.before.test is scored from the final test pass's raw logits (one pass, not
    # two): a real test pass of the untuned model over the same batches gives the same numbers.
    from tailtune.build.models import build_experiment
    from tailtune.build.trainer import build_trainer

    datamodule, _ = build_experiment(cfg)
    with torch.no_grad():
        model.posthoc_tau.zero_()
        model.posthoc_bias.zero_()
        model.posthoc_temperature.fill_(1.0)
    tester = build_trainer(cfg, run_dir / "untuned", [], loggers=[], whole_splits=True)
    tester.test(model, datamodule=datamodule, verbose=False)
    for key in ("bal_acc", "ece", "auroc", "macro_f1"):
        assert model.test_results[key] == pytest.approx(report["before"]["test"][key], abs=1e-6)


def _fit_tau(z, t):
    tau, _ = adjust.tune_logit_adjustment(z, t, PRIOR.log())
    return lambda q: q - tau * PRIOR.log()


def test_crossfitted_gain_is_positive_for_a_real_shift_and_not_for_noise():
    logits, y = gaussian_task(200, seed=0)  # a model trained on PRIOR: tau = 1 really helps
    gain = adjust.crossfitted_gain(logits, y, _fit_tau, baseline=lambda q: q)
    assert gain > 0.03
    # Pure noise: tuning tau on val always finds an in-sample "gain"; out of fold there is
    # none on average.
    in_sample, out_of_fold = [], []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        noise, y_noise = torch.randn(120, 4, generator=g), torch.arange(4).repeat(30)
        _, tuned = adjust.tune_logit_adjustment(noise, y_noise, PRIOR.log())
        in_sample.append(tuned - adjust.balanced_accuracy(noise, y_noise))
        out_of_fold.append(adjust.crossfitted_gain(noise, y_noise, _fit_tau, lambda q: q))
    assert min(in_sample) > -1e-9 and np.mean(in_sample) > 0.03
    assert np.mean(out_of_fold) < 0.005
    assert adjust.crossfitted_gain(noise[:5], y_noise[:5], _fit_tau, lambda q: q) is None


@pytest.mark.parametrize("gain", [-0.01, 0.0, 0.01, None])
def test_module_adopts_a_tuned_step_only_when_it_helps_out_of_fold(monkeypatch, gain):
    monkeypatch.setattr(adjust, "crossfitted_gain", lambda *args, **kwargs: gain)
    logits, y = gaussian_task(200, seed=0)
    model = SmallModule(_info(), posthoc=["logit_adjust", "bias"])
    report = model.fit_posthoc(logits, y)
    assert report["crossfit_gain"] == {"logit_adjust": gain, "bias": gain}
    adopted = gain is not None and gain > 0
    assert (float(model.posthoc_tau) != 0) == adopted
    assert bool(model.posthoc_bias.abs().sum() > 0) == adopted
    unchecked = SmallModule(_info(), posthoc=["logit_adjust"], posthoc_crossfit=False)
    report = unchecked.fit_posthoc(logits, y)
    assert report["crossfit_gain"] == {}
    assert report["logit_adjust_tau"] == pytest.approx(1.0, abs=0.25)


def test_a_tuned_model_reports_its_validation_score_out_of_fold():
    """A per-class bias tuned on noise fits it: in sample the val score rises well above
    chance; the out-of-fold score that selection reads (val.bal_acc_out_of_fold) stays near
    chance. A real shift (the prior) is found out of fold too. Nothing tuned: no such score."""
    in_sample, out_of_fold = [], []
    for seed in range(6):  # chance is 0.25
        g = torch.Generator().manual_seed(seed)
        noise, y = torch.randn(80, 4, generator=g), torch.arange(4).repeat(20)
        tuned = SmallModule(_info(), posthoc=["bias"], posthoc_crossfit=False)
        out_of_fold.append(tuned.fit_posthoc(noise, y)["val_bal_acc_out_of_fold"])
        in_sample.append(adjust.balanced_accuracy(tuned.adjust_logits(noise), y))
    assert np.mean(in_sample) - np.mean(out_of_fold) > 0.05 and np.mean(out_of_fold) < 0.29
    shifted, y_shifted = gaussian_task(1200, seed=0)
    model = SmallModule(_info(), posthoc=["bias"])
    report = model.fit_posthoc(shifted, y_shifted)
    assert report["val_bal_acc_out_of_fold"] == pytest.approx(
        adjust.balanced_accuracy(model.adjust_logits(shifted), y_shifted), abs=0.02)
    assert report["val_bal_acc_out_of_fold"] > adjust.balanced_accuracy(shifted, y_shifted) + 0.05
    untuned = SmallModule(_info(), posthoc=["temperature"])
    assert untuned.fit_posthoc(shifted, y_shifted)["val_bal_acc_out_of_fold"] is None


def test_small_validation_split_is_reported(caplog):
    model = SmallModule(_info(), posthoc=["logit_adjust"])
    logits, y = gaussian_task(12, seed=0)
    with caplog.at_level("WARNING"):
        report = model.fit_posthoc(logits, y)
    assert report["val_too_small"] and report["val_min_class_count"] == 12
    assert "only 12 image(s) in its smallest class" in caplog.text
