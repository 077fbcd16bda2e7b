"""Freeze-then-unfreeze: what trains when, BatchNorm statistics, and exact resume."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch

from tailtune.build.models import build_experiment
from tailtune.build.trainer import build_trainer, training_callbacks


class Snapshots(L.Callback):
    """Backbone state (weights and BN buffers) and head weights at the end of each epoch."""

    def __init__(self) -> None:
        self.backbone: list[dict[str, torch.Tensor]] = []
        self.head: list[dict[str, torch.Tensor]] = []
        self.lrs: list[list[float]] = []

    def on_fit_start(self, trainer, pl_module):
        self.initial = copy.deepcopy(pl_module.backbone.state_dict())

    def on_train_epoch_end(self, trainer, pl_module):
        self.backbone.append(copy.deepcopy(pl_module.backbone.state_dict()))
        self.head.append(copy.deepcopy(pl_module.head.state_dict()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:  # the lr the epoch's first step uses
            self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


class GradientProbe(L.Callback):
    """Whether any backbone parameter held a gradient after each training step, per epoch."""

    def __init__(self) -> None:
        self.backbone_grad: dict[int, bool] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        got = any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                  for p in pl_module.backbone.parameters())
        epoch = trainer.current_epoch
        self.backbone_grad[epoch] = self.backbone_grad.get(epoch, False) or got


class StopAfter(L.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def fit(cfg, run_dir, extra=(), ckpt_path=None):
    datamodule, model = build_experiment(cfg)
    callbacks = training_callbacks(cfg, datamodule) + list(extra)
    trainer = build_trainer(cfg, run_dir, callbacks, loggers=[])
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return model, trainer


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bn_mode", ["frozen", "train"])
def test_backbone_is_bit_identical_until_unfreeze_then_changes(smoke_cfg, tmp_path, bn_mode):
    cfg, _ = smoke_cfg("trainer.max_epochs=3", "model.unfreeze_at=2",
                       f"model.bn_after_unfreeze={bn_mode}", "model.lr=0.01")
    snaps = Snapshots()
    fit(cfg, tmp_path / "run", [snaps])
    assert _same(snaps.initial, snaps.backbone[0]) and _same(snaps.initial, snaps.backbone[1])
    assert not _same(snaps.head[0], snaps.head[1])  # the head trains while the backbone waits
    after = snaps.backbone[2]
    weights = [k for k in after if k.endswith("weight") and "bn" not in k]
    assert any(not torch.equal(snaps.initial[k], after[k]) for k in weights)
    stats = [k for k in after if k.endswith("running_mean")]
    stats_changed = any(not torch.equal(snaps.initial[k], after[k]) for k in stats)
    assert stats_changed == (bn_mode == "train")
    # The backbone group's lr is 0 through the frozen epochs, > 0 after.
    assert snaps.lrs[0][1] == 0.0 and snaps.lrs[1][1] == 0.0 and snaps.lrs[2][1] > 0.0


def test_recipe_trains_the_whole_network_from_the_first_step_at_the_head_lr(smoke_cfg, tmp_path):
    """experiment=lt_recipe's first ingredient: no frozen head epoch, the backbone at the
    head's lr, and BatchNorm statistics re-estimated on the new images from the start."""
    from helpers import compose_config

    preset = compose_config("train", ["experiment=lt_recipe"], tmp_path / "preset")[0].model
    # debug=smoke holds the backbone for an epoch; put back the preset's own values.
    cfg, _ = smoke_cfg("experiment=lt_recipe", "trainer.max_epochs=2", "model.lr=0.01",
                       f"model.unfreeze_at={preset.unfreeze_at}")
    assert cfg.model.backbone_lr_ratio == 1.0 and cfg.model.bn_after_unfreeze == "train"
    snaps = Snapshots()
    fit(cfg, tmp_path / "run", [snaps])
    first = snaps.backbone[0]
    weights = [k for k in first if k.endswith("weight") and "bn" not in k]
    assert any(not torch.equal(snaps.initial[k], first[k]) for k in weights)
    stats = [k for k in first if k.endswith("running_mean")]
    assert any(not torch.equal(snaps.initial[k], first[k]) for k in stats)
    assert all(len(set(lrs)) == 1 for lrs in snaps.lrs)  # head and backbone groups alike
    assert snaps.lrs[-1][0] > 0.0


def test_steps_per_epoch_come_from_the_loader_when_max_steps_cuts_the_fit():
    """15 epochs of 50 steps cut to 300 by trainer.max_steps: an epoch is still 50 steps
    (300 // 15 = 20 would start the backbone's warm-up at step 60 of a frozen epoch 1)."""
    from types import SimpleNamespace

    from tailtune.models.schedules import stepping_batches

    cut = SimpleNamespace(estimated_stepping_batches=300, num_training_batches=50,
                          accumulate_grad_batches=1, max_epochs=15)
    assert stepping_batches(cut) == (300, 50)
    accumulated = SimpleNamespace(estimated_stepping_batches=17 * 4, num_training_batches=33,
                                  accumulate_grad_batches=2, max_epochs=4)
    assert stepping_batches(accumulated) == (68, 17)
    endless = SimpleNamespace(estimated_stepping_batches=120, num_training_batches=float("inf"),
                              accumulate_grad_batches=1, max_epochs=4)
    assert stepping_batches(endless) == (120, 30)


def test_train_stages_limits_what_unfreezes(smoke_cfg, tmp_path):
    cfg, _ = smoke_cfg("model.train_stages=1", "model.lr=0.01")
    snaps = Snapshots()
    model, _ = fit(cfg, tmp_path / "run", [snaps])
    after = snaps.backbone[-1]
    assert torch.equal(snaps.initial["conv_stem.weight"], after["conv_stem.weight"])
    assert not torch.equal(snaps.initial["conv_head.weight"], after["conv_head.weight"])
    assert not model.backbone.conv_stem.weight.requires_grad


@pytest.mark.slow
@pytest.mark.parametrize("stop_epoch", [0, 2], ids=["saved-while-frozen", "saved-after-unfreeze"])
def test_resume_matches_an_uninterrupted_run(smoke_cfg, tmp_path, stop_epoch):
    overrides = ("trainer.max_epochs=4", "model.unfreeze_at=1", "model.head_dropout=0.2")
    cfg, _ = smoke_cfg(*overrides, name="whole")
    whole, _ = fit(cfg, tmp_path / "whole")

    cfg, _ = smoke_cfg(*overrides, name="parts")
    fit(cfg, tmp_path / "parts", [StopAfter(stop_epoch)])
    last = tmp_path / "parts" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == stop_epoch
    resumed, trainer = fit(cfg, tmp_path / "parts", ckpt_path=str(last))
    assert trainer.current_epoch == 4
    assert _same(whole.state_dict(), resumed.state_dict())


def test_lr_schedule_and_gradients_across_the_unfreeze_boundary(smoke_cfg, tmp_path):
    """Head at lr from step 0, backbone at lr * backbone_lr_ratio from unfreeze_at on, each
    warming up from its own start, and no gradient reaches the backbone while it is frozen."""
    cfg, _ = smoke_cfg("trainer.max_epochs=4", "model.unfreeze_at=2", "model.lr=0.01",
                       "model.backbone_lr_ratio=0.25", "model.scheduler.warmup_epochs=1",
                       "model.scheduler.min_lr_ratio=0.0", "trainer.limit_val_batches=1")
    snaps, grads = Snapshots(), GradientProbe()
    fit(cfg, tmp_path / "run", [snaps, grads])
    steps_per_epoch, total = 2, 8  # limit_train_batches=2 (debug=smoke)

    def reference(step: int, start: int) -> float:  # linear warm-up, then cosine to 0
        if step < start:
            return 0.0
        t = step - start
        if t < steps_per_epoch:
            return (t + 1) / steps_per_epoch
        progress = (t - steps_per_epoch) / (total - start - steps_per_epoch)
        return 0.5 * (1 + math.cos(math.pi * progress))

    for epoch, (head_lr, backbone_lr) in enumerate(snaps.lrs):
        step = epoch * steps_per_epoch
        assert head_lr == pytest.approx(0.01 * reference(step, 0), rel=1e-6)
        assert backbone_lr == pytest.approx(0.01 * 0.25 * reference(step, 4), rel=1e-6)
    assert snaps.lrs[1][1] == 0.0 and snaps.lrs[2][1] == pytest.approx(0.01 * 0.25 / 2)
    assert snaps.lrs[3][1] == pytest.approx(0.01 * 0.25)  # after warm-up: lr * ratio
    assert grads.backbone_grad == {0: False, 1: False, 2: True, 3: True}


class Batches(L.Callback):
    """Each training batch's images, per (epoch, batch index); saves a checkpoint mid-epoch
    the way PreemptionCheckpoint does (after a batch's step) when ``save_at`` is given."""

    def __init__(self, save_at=None) -> None:
        self.seen: dict[tuple[int, int], torch.Tensor] = {}
        self.save_at = save_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen[(trainer.current_epoch, batch_idx)] = batch[0].clone()
        if self.save_at and (trainer.current_epoch, batch_idx) == self.save_at[0]:
            trainer.save_checkpoint(self.save_at[1])


@pytest.mark.slow
def test_a_mid_epoch_resume_goes_on_with_the_batches_the_epoch_had_not_reached(
        smoke_cfg, tmp_path):
    """A preemption checkpoint after epoch 1's first batch: the resumed run's next batch is
    the uninterrupted run's second one, not the epoch's first again, and (no augmentation,
    no dropout) the weights end bit-identical."""
    overrides = ("trainer.max_epochs=3", "trainer.limit_train_batches=3", "transforms=none",
                 "model.head_dropout=0", "model.unfreeze_at=0")
    cfg, _ = smoke_cfg(*overrides, name="whole")
    mid = tmp_path / "mid.ckpt"
    whole_batches = Batches(save_at=((1, 0), mid))
    whole, _ = fit(cfg, tmp_path / "whole", [whole_batches])
    cfg, _ = smoke_cfg(*overrides, name="resumed")
    resumed_batches = Batches()
    resumed, _ = fit(cfg, tmp_path / "resumed", [resumed_batches], ckpt_path=str(mid))
    assert sorted(resumed_batches.seen) == [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    for key, images in resumed_batches.seen.items():
        assert torch.equal(images, whole_batches.seen[key]), key
    assert not torch.equal(whole_batches.seen[(1, 0)], whole_batches.seen[(1, 1)])
    assert _same(whole.state_dict(), resumed.state_dict())
