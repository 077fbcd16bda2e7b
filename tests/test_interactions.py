"""How the imbalance methods combine: sampler x prior-based loss x post-hoc adjustment.

Each method is right on its own (test_losses, test_samplers, test_adjust); these tests check
that combining them corrects the class prior exactly once, that nothing is tuned on test, and
that eval, predict and the Python API report numbers for the data the user asked for.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tailtune
from helpers import compose_config
from tailtune.build.data import build_datamodule, build_loss
from tailtune.build.models import build_experiment
from tailtune.build.trainer import build_trainer, training_callbacks
from tailtune.cli.evaluate import evaluate
from tailtune.cli.train import train
from tailtune.imbalance import losses
from tailtune.models.combiners import Majority, Samme, weighted_vote
from tailtune.models.heads import CosineHead
from test_bad_inputs import assert_no_complete_run, cli  # noqa: F401 - the fixture


def _loss(cfg):
    datamodule = build_datamodule(cfg)
    return datamodule, build_loss(cfg, datamodule)


def _batch(k: int = 10, n: int = 64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, k, generator=g) * 3, torch.randint(0, k, (n,), generator=g)


# -- the loss corrects for what the sampler draws ---------------------------------------------
@pytest.mark.parametrize("loss", ["balanced_softmax", "logit_adjusted", "weighted_ce"])
def test_over_sampler_turns_prior_losses_into_plain_ce(smoke_cfg, loss):
    cfg, _ = smoke_cfg("sampler=over", f"loss={loss}")
    datamodule, criterion = _loss(cfg)
    assert len(set(datamodule.info.class_counts)) > 1  # the data is imbalanced
    logits, y = _batch()
    assert torch.allclose(criterion(logits, y), F.cross_entropy(logits, y), atol=1e-6)


def test_without_sampler_balanced_softmax_shifts_by_the_real_log_counts(smoke_cfg):
    cfg, _ = smoke_cfg("loss=balanced_softmax")
    datamodule, criterion = _loss(cfg)
    logits, y = _batch()
    log_n = torch.tensor(datamodule.info.class_counts, dtype=torch.float32).log()
    assert torch.allclose(criterion(logits, y), F.cross_entropy(logits + log_n, y), atol=1e-6)


class PriorProbe(L.Callback):
    """What the loss and the model hold at each epoch's first training step."""

    def __init__(self) -> None:
        self.log_counts: list[torch.Tensor] = []
        self.model_prior: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.log_counts.append(pl_module.criterion.log_counts.clone())
            self.model_prior.append(pl_module.log_prior.clone())


def _fit(cfg, *callbacks):
    datamodule, model = build_experiment(cfg)
    trainer = build_trainer(
        cfg, Path(cfg.paths.output_dir),
        training_callbacks(cfg, datamodule) + list(callbacks), loggers=[])
    trainer.fit(model, datamodule=datamodule)
    return datamodule, model


def test_progressive_sampler_prior_reaches_the_loss_every_epoch(smoke_cfg):
    cfg, _ = smoke_cfg("sampler=progressive", "loss=balanced_softmax", "trainer.max_epochs=3",
                       "trainer.limit_val_batches=1")
    probe = PriorProbe()
    datamodule, _ = _fit(cfg, probe)
    counts = np.asarray(datamodule.info.class_counts, dtype=np.float64)
    k = len(counts)
    # Kang et al.: p(t) = (1 - t/T) n/N + (t/T) / K, T = 2; epoch length N.
    for epoch, got in enumerate(probe.log_counts):
        t = epoch / 2
        want = np.log(counts.sum() * ((1 - t) * counts / counts.sum() + t / k))
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    # Last epoch: balanced batches, so balanced softmax is plain CE there.
    assert torch.allclose(probe.log_counts[-1], probe.log_counts[-1][0].expand(k))


def test_double_correction_warning_looks_at_the_whole_schedule(smoke_cfg):
    # A progressive sampler draws the raw prior at epoch 0 and balanced batches later.
    cfg, _ = smoke_cfg("sampler=progressive", "loss=balanced_softmax", "trainer.max_epochs=4",
                       "correct_prior_for_sampler=false")
    datamodule = build_datamodule(cfg)
    with pytest.warns(UserWarning, match=r"from epoch 1 on.*corrects twice"):
        criterion = build_loss(cfg, datamodule)
    criterion.set_epoch(3)  # it keeps the real prior, as asked
    log_n = torch.tensor(datamodule.info.class_counts, dtype=torch.float32).log()
    assert torch.allclose(criterion.log_counts, log_n)

    plain, _ = smoke_cfg("loss=balanced_softmax", "correct_prior_for_sampler=false")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no re-balancing sampler: nothing corrects twice
        build_loss(plain, build_datamodule(plain))


# -- LDAM-DRW --------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["over", "under", "weighted", "class_balanced"])
def test_ldam_margins_come_from_real_counts_under_any_sampler(smoke_cfg, sampler):
    # The whole long tail (imbalance ratio 10): debug=smoke's subsample keeps >= 6 a class.
    cfg, _ = smoke_cfg(f"sampler={sampler}", "loss=ldam_drw", "subsample=null")
    datamodule, criterion = _loss(cfg)
    n = np.asarray(datamodule.info.class_counts, dtype=np.float64)
    want = n ** -0.25 * (0.5 / (n ** -0.25).max())  # Cao et al.: C / n^(1/4), max 0.5
    np.testing.assert_allclose(criterion.margins.numpy(), want, rtol=1e-5)
    assert criterion.margins.min() < 0.6 * criterion.margins.max()  # IR 10: 10^-1/4 = 0.56
    # DRW re-weights for the sampled distribution: balanced samplers leave nothing to re-weight.
    sampled = datamodule.train_class_counts(0)
    np.testing.assert_allclose(criterion.drw_weight.numpy(),
                               losses.effective_number_weights(sampled).numpy(), rtol=1e-5)


class DRWProbe(L.Callback):
    def __init__(self) -> None:
        self.active: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.active.append(pl_module.criterion.drw_active)


def test_ldam_drw_end_to_end_builds_a_cosine_head_and_reweights_at_its_epoch(smoke_cfg):
    cfg, _ = smoke_cfg("loss=ldam_drw", "loss.drw_start=2", "trainer.max_epochs=3",
                       "trainer.limit_val_batches=1")
    probe = DRWProbe()
    datamodule, model = _fit(cfg, probe)
    assert isinstance(model.head, CosineHead) and model.head.scale == 30.0
    assert probe.active == [False, False, True]
    # After DRW the model's trained prior carries the class-balanced weights (n * w).
    n = torch.tensor(datamodule.info.class_counts, dtype=torch.float64)
    w = losses.effective_number_weights(n.numpy()).double()
    want = (n * w / (n * w).sum()).log()
    assert torch.allclose(model.log_prior.double(), want, atol=1e-5)


# -- logit adjustment subtracts the prior the model was trained under --------------------------
def test_trained_prior_follows_sampler_and_loss(smoke_cfg):
    cfg, _ = smoke_cfg("model.logit_adjust_tau=1")
    datamodule, model = build_experiment(cfg)
    n = np.asarray(datamodule.info.class_counts, dtype=np.float64)
    uniform = torch.full((len(n),), -np.log(len(n)))
    # Plain CE on the real prior: tau = 1 subtracts log(n / N) (Menon et al.).
    assert torch.allclose(model.trained_log_prior(n), torch.tensor(np.log(n / n.sum())).float(),
                          atol=1e-6)
    # A balanced sampler draws a uniform prior: nothing is left to subtract.
    assert torch.allclose(model.trained_log_prior(np.full(len(n), n.mean())), uniform, atol=1e-6)
    # Balanced softmax on the real prior, logit-adjusted with tau 0.5: pi^(1 - tau).
    for name, kwargs, want in [("BalancedSoftmaxLoss", {}, uniform),
                               ("LogitAdjustedLoss", {"tau": 0.5},
                                torch.tensor(0.5 * np.log(n) - np.log((n ** 0.5).sum())).float()),
                               ("WeightedCrossEntropyLoss", {}, uniform)]:
        model.criterion = getattr(losses, name)(n, **kwargs)
        assert torch.allclose(model.trained_log_prior(n), want, atol=1e-5), name


@pytest.mark.parametrize("name", ["CrossEntropyLoss", "LogitAdjustedLoss"])
def test_logit_adjustment_takes_the_smoothing_floor_off_before_the_prior(name):
    """At the smoothed optimum a confident head-class image has softmax(z) = 0.9 onehot +
    eps / K: dividing the floor eps / K by the rarest class's prior made it the prediction
    (head recall 0.018 on a 4-class toy). The floor comes off first; without smoothing the
    adjustment is z - tau log prior, as before."""
    from tailtune.data.info import DatasetInfo
    from tailtune.models.base import ClassifierModule

    counts = np.array([1000.0, 200.0, 40.0, 8.0])
    info = DatasetInfo("toy", tuple("abcd"), tuple(int(c) for c in counts), "x", 8)
    for eps in (0.1, 0.0):
        loss = getattr(losses, name)(counts, label_smoothing=eps, **(
            {"tau": 0.5} if name == "LogitAdjustedLoss" else {}))
        model = ClassifierModule(info, loss, logit_adjust_tau=1.0)
        model.log_prior.copy_(model.trained_log_prior(counts))
        for label in range(4):
            z = torch.full((1, 4), eps / 4).index_add_(1, torch.tensor([label]),
                                                       torch.tensor([[1 - eps]])).log()
            assert int(model.adjust_logits(z).argmax()) == label, (eps, label)
        z = torch.randn(8, 4)
        if eps == 0.0:
            torch.testing.assert_close(model.adjust_logits(z), z - model.log_prior)
    # A checkpoint from before the floor was taken off keeps the adjustment it was tuned with.
    model.criterion = getattr(losses, name)(counts, label_smoothing=0.1)
    assert model.has_smoothing_floor
    model.on_load_checkpoint({"tailtune": {}})
    assert not model.has_smoothing_floor
    torch.testing.assert_close(model.adjust_logits(z), z - model.log_prior)


def test_only_losses_whose_smoothed_optimum_has_a_floor_take_it_off():
    counts = [100, 10, 1]
    floored = [losses.CrossEntropyLoss(counts, label_smoothing=0.1),
               losses.WeightedCrossEntropyLoss(counts, label_smoothing=0.1),
               losses.ClassBalancedLoss(counts, base="ce", label_smoothing=0.1),
               losses.FocalLoss(counts, gamma=0.0, label_smoothing=0.1)]
    not_floored = [losses.FocalLoss(counts, gamma=2.0, label_smoothing=0.1),
                   losses.ClassBalancedLoss(counts, base="focal", gamma=1.0,
                                            label_smoothing=0.1),
                   losses.LDAMLoss(counts, label_smoothing=0.1)]
    assert all(loss.smoothing_has_floor for loss in floored)
    assert not any(loss.smoothing_has_floor for loss in not_floored)


def test_an_ensemble_leaves_the_floor_to_its_members_and_warns_when_they_leave_it(caplog):
    from helpers.models import Identity
    from tailtune.data.info import DatasetInfo
    from tailtune.models.ensemble import EnsembleModule

    counts = (1000, 100, 10)
    info = DatasetInfo("toy", ("head", "mid", "tail"), counts, "fp", 32)
    smoothed = losses.CrossEntropyLoss(counts, label_smoothing=0.1)
    for member_tau, warned in ((0.0, True), (1.0, False)):
        members = [Identity(info, smoothed, logit_adjust_tau=member_tau) for _ in range(2)]
        caplog.clear()
        ensemble = EnsembleModule(members, ["a", "b"], info, smoothed, logit_adjust_tau=1.0)
        assert not ensemble.has_smoothing_floor and members[0].has_smoothing_floor
        assert ("label smoothing" in caplog.text) == warned


@pytest.mark.parametrize(("overrides", "balanced"), [
    (("sampler=over",), True),
    (("loss=balanced_softmax",), True),
    ((), False),
])
def test_fixed_logit_adjust_tau_never_corrects_twice(smoke_cfg, overrides, balanced):
    cfg, _ = smoke_cfg(*overrides, "model.logit_adjust_tau=1", "trainer.max_epochs=1",
                       "model.unfreeze_at=0", "trainer.limit_val_batches=1")
    datamodule, model = _fit(cfg)
    images = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        shift = model.eval_logits(images) - model(images)  # what the adjustment subtracts
    n = torch.tensor(datamodule.info.class_counts, dtype=torch.float32)
    want = torch.zeros_like(n) if balanced else -(n / n.sum()).log()
    # Up to a constant per row, which changes neither softmax nor argmax.
    assert torch.allclose(shift - shift[:, :1], (want - want[0]).expand_as(shift), atol=1e-4)


# -- nothing is tuned on test -----------------------------------------------------------------
@pytest.mark.parametrize("overrides", [
    ("model.posthoc=[logit_adjust]",),
    ("model.posthoc=[bias,temperature]",),
    ("model=linear_probe", "model.posthoc=[temperature]"),
])
def test_posthoc_tuning_is_refused_when_validation_is_the_test_split(smoke_cfg, overrides):
    cfg, choices = smoke_cfg("data.val_fraction=0", *overrides)
    with pytest.raises(ValueError, match="would be fitted on test"):
        train(cfg, choices)
    assert_no_complete_run(Path(cfg.paths.output_dir))


def test_ensemble_posthoc_is_refused_when_validation_is_the_test_split(smoke_cfg):
    cfg, choices = smoke_cfg("model=ensemble", "model.members=[efficientnet_lite0,"
                             "efficientnet_lite0]", "data.val_fraction=0",
                             "model.posthoc=[logit_adjust]")
    with pytest.raises(ValueError, match=r"ensemble \(model.posthoc\).*would be fitted on test"):
        train(cfg, choices)


def test_posthoc_without_val_split_is_fine_when_nothing_is_tuned(smoke_cfg):
    cfg, _ = smoke_cfg("data.val_fraction=0", "model.logit_adjust_tau=1")
    _, model = build_experiment(cfg)  # a fixed tau is not fitted on anything
    assert model.posthoc_steps == ()


# -- ensembles --------------------------------------------------------------------------------
def test_weighted_vote_is_strictly_lexicographic():
    # Member 1 outweighs member 0 by 0.05 %: its vote wins, however confident member 0 is.
    confident_a = torch.tensor([[9.0, 0.0, 0.0]])
    hesitant_b = torch.tensor([[0.0, 0.1, 0.0]])
    for alphas, want in [([1.0, 1.0005], 1), ([1.0005, 1.0], 0)]:
        scores = Samme(alphas).combine([confident_a, hesitant_b])
        assert int(scores.argmax(dim=1)) == want
        probs = scores.softmax(dim=1)
        assert probs[0, want] == pytest.approx(max(alphas) / sum(alphas), abs=1e-5)
    # Only an exact tie goes to the higher mean probability.
    assert int(Majority().combine([confident_a, hesitant_b]).argmax(dim=1)) == 0
    assert int(Majority().combine([hesitant_b, confident_a * 0 + torch.tensor([[0.0, 0.0, 0.2]])]
                                  ).argmax(dim=1)) == 2
    # Three equal members, votes 2 : 1: the majority wins over a confident minority.
    scores = weighted_vote([confident_a, hesitant_b, hesitant_b], [1.0, 1.0, 1.0])
    assert int(scores.argmax(dim=1)) == 1


def test_balanced_bagging_refuses_a_class_without_training_samples():
    from tailtune.imbalance.ensembles import BalancedBagSampler, balanced_bag

    labels = np.array([0, 0, 0, 2, 2, 1])
    assert len(balanced_bag(labels, draw_seed=0, num_classes=3)) == 3
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have no training sample"):
        balanced_bag(labels, draw_seed=0, num_classes=4)
    with pytest.raises(ValueError, match="no training sample"):
        BalancedBagSampler(labels, num_classes=4)


# -- eval, predict and the API: the data asked for, preprocessed as in training --------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """One finished smoke run (digits): its run dir."""
    root = tmp_path_factory.mktemp("interactions")
    cfg, choices = compose_config("train", ["debug=smoke", "trainer.max_epochs=1",
                                            "model.unfreeze_at=0",
                                            "trainer.limit_test_batches=null"], root / "run")
    train(cfg, choices)
    return root / "run"


def test_api_predicts_as_training_served_the_images(smoke_run):
    best = smoke_run / "checkpoints" / "best.ckpt"
    model = tailtune.load(str(best))
    ckpt = torch.load(best, weights_only=True)
    from omegaconf import OmegaConf

    datamodule = build_datamodule(OmegaConf.create(ckpt["tailtune"]["config"]))
    raw = datamodule.source.load()  # the source's own 8x8 images, before any resizing
    test_rows = datamodule.split_indices["test"]
    stored = np.load(smoke_run / "test_predictions.npz")
    images = torch.from_numpy(raw.images[test_rows])  # uint8 [N, 1, 8, 8]
    np.testing.assert_array_equal(stored["targets"], raw.labels[test_rows])
    for given in (images, images.float() / 255):  # uint8, or floats in [0, 1]
        probs = model.predict_images(given)
        np.testing.assert_allclose(probs.numpy(), stored["probs"], atol=1e-5)

    with pytest.raises(ValueError, match=r"x\[None\]"):
        model.predict_images(images[0].float() / 255)
    with pytest.raises(ValueError, match="divide 0-255 images by 255"):
        model.predict_images(images.float())


def test_eval_refuses_another_dataset_and_evaluates_moved_data(smoke_run, tmp_path):
    best = smoke_run / "checkpoints" / "best.ckpt"
    other, _ = compose_config("eval", [f"ckpt_path={best}", "debug=smoke", "+data=image_folder",
                                       f"data.root={tmp_path}"], tmp_path / "ev1")
    with pytest.raises(ValueError, match="takes no other dataset"):
        evaluate(other)
    typo, _ = compose_config("eval", [f"ckpt_path={best}", "+data.rooot=x"], tmp_path / "ev2")
    with pytest.raises(ValueError, match="data.rooot is not a setting"):
        evaluate(typo)
    # A key that changes the split is applied, then refused by the split check.
    split, _ = compose_config("eval", [f"ckpt_path={best}", "+data.split_seed=3"],
                              tmp_path / "ev3")
    with pytest.raises(ValueError, match="data split of .* differs"):
        evaluate(split)
    # One that changes how images are prepared is refused: the split check cannot see it.
    size, _ = compose_config("eval", [f"ckpt_path={best}", "+data.image_size=24"],
                             tmp_path / "ev5")
    with pytest.raises(ValueError, match="image_size=24 .* checkpoint's data.image_size=16"):
        evaluate(size)
    # One that does not (the loader's batch size) evaluates the same test split.
    same, _ = compose_config("eval", [f"ckpt_path={best}", "+data.eval_batch_size=7"],
                             tmp_path / "ev4")
    results = evaluate(same)
    trained = json.loads((smoke_run / "metrics.json").read_text())
    assert results["test"]["bal_acc"] == pytest.approx(trained["test"]["bal_acc"], abs=1e-6)


def test_refused_rerun_leaves_a_finished_run_untouched(cli, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    cfg, choices = compose_config("train", ["debug=smoke", "trainer.max_epochs=1",
                                            "model.unfreeze_at=0"], run_dir)
    train(cfg, choices)
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert run_dir / ".hydra" / "overrides.yaml" in files
    code, err = cli(f"hydra.run.dir={run_dir}", "trainer.max_epochs=1", "model.unfreeze_at=0",
                    "seed=7")
    assert code not in (0, None) and "already holds a finished run" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files


def test_probe_under_a_progressive_sampler_corrects_each_epoch_for_its_draw(
        smoke_cfg, tmp_path, monkeypatch):
    """LP-FT's probe iterates the sampler itself: the loss must move with it, epoch by epoch,
    or it corrects the later, more balanced draws for the first epoch's prior (twice)."""
    cfg, _ = smoke_cfg("sampler=progressive", "loss=balanced_softmax", "trainer.max_epochs=3",
                       "model.probe_epochs=3", "model.unfreeze_at=0",
                       "model.feature_cache_dir=null")
    seen: list[tuple[int, torch.Tensor]] = []
    forward = losses.BalancedSoftmaxLoss.forward

    def recording(self, logits, target):
        seen.append((self.epoch, self.log_counts.clone()))
        return forward(self, logits, target)

    monkeypatch.setattr(losses.BalancedSoftmaxLoss, "forward", recording)
    datamodule, model = build_experiment(cfg)
    datamodule.setup("fit")
    model.fit_head_on_features(datamodule)
    sampler = datamodule.train_sampler
    assert sorted({epoch for epoch, _ in seen}) == [0, 1, 2]
    for epoch, log_counts in seen:
        want = np.log(np.maximum(len(sampler) * sampler.expected_class_distribution(epoch), 1))
        np.testing.assert_allclose(log_counts.numpy(), want, rtol=1e-5)


def test_a_mid_epoch_resume_restores_the_epochs_loss_schedule(tmp_path):
    """A preemption checkpoint is written mid-epoch, and Lightning then skips the resumed
    epoch's on_train_epoch_start: LDAM's deferred re-weighting must still be on."""
    from tailtune.data.info import DatasetInfo
    from tailtune.models.base import ClassifierModule

    counts = (40, 8, 2)
    info = DatasetInfo("toy", ("a", "b", "c"), counts, "fp", 8)

    class Toy(ClassifierModule):
        def __init__(self):
            super().__init__(info, losses.LDAMLoss(counts, drw_start=1, s=1.0),
                             log_figures=False, confusion_every_n_epochs=0)
            self.layer, self.seen = torch.nn.Linear(2, 3), []

        def forward(self, x):
            return self.layer(x)

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, self.criterion.drw_active))
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), 0.1)

    class SaveMidEpoch(L.Callback):  # what PreemptionCheckpoint does on a signal
        def on_train_batch_end(self, trainer, *args):
            if trainer.current_epoch == 2 and args[-1] == 0:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    data = torch.utils.data.TensorDataset(torch.randn(12, 2), torch.tensor([0, 1, 2] * 4))
    kw = dict(logger=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu", limit_val_batches=0, enable_checkpointing=False, max_epochs=3)
    L.Trainer(callbacks=[SaveMidEpoch()], **kw).fit(
        Toy(), torch.utils.data.DataLoader(data, batch_size=4))
    resumed = Toy()
    L.Trainer(**kw).fit(resumed, torch.utils.data.DataLoader(data, batch_size=4),
                        ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.seen == [(2, True), (2, True)]  # batches 1 and 2 of epoch 2, DRW on
