"""The long-tail recipe's switches: layer-wise lr decay, BitFit, LoRA, mixup/CutMix, test-time
flip, the probe on cached features."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from tailtune.build.models import build_experiment
from tailtune.data.mixing import BatchMix
from tailtune.features import datamodule as feature_datamodule
from tailtune.features.cache import FeatureCache
from tailtune.features.datamodule import unaugmented_train_features
from tailtune.features.extractor import FeatureExtractor, module_sha256
from tailtune.models.finetune import FineTuneModule
from tailtune.models.lora import lora_targets
from test_finetune import Snapshots, fit

MIX = "model.mix={_target_:tailtune.data.mixing.BatchMix,mixup_alpha:0.4,cutmix_alpha:1.0}"


def test_layer_decay_gives_each_block_its_own_lr_decaying_from_the_top(smoke_cfg, tmp_path):
    cfg, _ = smoke_cfg("model.layer_decay=0.5", "model.backbone_lr_ratio=0.2", "model.lr=0.01",
                       "model.scheduler.warmup_epochs=0", "model.scheduler.min_lr_ratio=1.0")
    snaps = Snapshots()
    model, trainer = fit(cfg, tmp_path / "run", [snaps])
    groups = trainer.optimizers[0].param_groups
    assert groups[0]["name"] == "head" and len(groups) > 3
    blocks = groups[1:]
    depths = [int(g["name"].split(".")[1]) for g in blocks]
    top = max(depths)
    for group, depth in zip(blocks, depths, strict=True):
        assert group["initial_lr"] == pytest.approx(0.01 * 0.2 * 0.5 ** (top - depth))
    # every trainable backbone parameter is in exactly one group
    grouped = [id(p) for g in blocks for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.backbone.parameters())
    # the frozen epoch trains none of them (lr factor 0), the unfrozen epoch all at their lr
    assert all(lr == 0 for lr in snaps.lrs[0][1:])
    assert snaps.lrs[1][1:] == pytest.approx([g["initial_lr"] for g in blocks])


def test_bitfit_changes_only_backbone_biases(smoke_cfg, tmp_path):
    cfg, _ = smoke_cfg("model.tune=bitfit", "model.lr=0.05", "model.backbone_lr_ratio=1.0")
    snaps = Snapshots()
    model, _ = fit(cfg, tmp_path / "run", [snaps])
    before, after = snaps.initial, snaps.backbone[-1]
    params = dict(model.backbone.named_parameters())
    changed = {k for k in params if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("bias") for k in changed)
    assert all(not p.requires_grad for k, p in params.items() if not k.endswith("bias"))


def test_lora_trains_only_the_adapters_and_its_checkpoint_reloads(smoke_cfg, tmp_path):
    """tune=lora: the head epoch leaves the adapted backbone bit-identical; afterwards only
    adapter weights change (pretrained weights and BN statistics stay), and the checkpoint
    rebuilds the adapters and gives the same logits."""
    import tailtune

    cfg, _ = smoke_cfg("model.tune=lora", "model.lora_rank=4", "model.lr=0.05",
                       "model.backbone_lr_ratio=1.0")
    snaps = Snapshots()
    model, trainer = fit(cfg, tmp_path / "run", [snaps])
    before, head_epoch, after = snaps.initial, snaps.backbone[0], snaps.backbone[-1]
    assert all(torch.equal(before[k], head_epoch[k]) for k in before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert any(".lora_B." in k for k in changed)  # B starts at 0: the update is live now
    trainable = {k for k, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in k for k in trainable)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    reloaded = tailtune.load(str(ckpt))
    x = torch.rand(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))


def test_lora_with_adapting_batchnorm_updates_its_statistics(smoke_cfg, tmp_path):
    """LoRA trains no BatchNorm parameter, yet bn_after_unfreeze=train (the recipe's) must
    still re-estimate the statistics of the stages that train; the weights stay."""
    cfg, _ = smoke_cfg("model.tune=lora", "model.lora_rank=4", "model.lr=0.05",
                       "model.backbone_lr_ratio=1.0", "model.bn_after_unfreeze=train")
    snaps = Snapshots()
    fit(cfg, tmp_path / "run", [snaps])
    before, after = snaps.initial, snaps.backbone[-1]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert any(k.endswith("running_mean") for k in changed)
    assert all(".lora_" in k or k.endswith(stats) for k in changed)


def test_lora_targets_dense_layers_of_the_stages_that_train(smoke_cfg):
    """Depthwise convolutions and timm's dynamically padded Conv2dSame (lite0's stem) get no
    adapter; train_stages narrows the targets to the last stages; before training, the
    (zero-initialised) adapters leave the pretrained backbone's features as they were."""
    full, _ = smoke_cfg()
    _, plain = build_experiment(full)
    modules = dict(plain.backbone.named_modules())
    everywhere = lora_targets(plain.backbone)
    assert "conv_stem" not in everywhere and "conv_head" in everywhere
    assert all(modules[name].groups == 1 for name in everywhere)
    assert any(n.endswith("conv_dw") for n in modules) and \
        not any(n.endswith("conv_dw") for n in everywhere)
    cfg, _ = smoke_cfg("model.tune=lora", "model.train_stages=2")
    _, adapted = build_experiment(cfg)
    adapted_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in adapted.backbone.named_parameters()
                      if ".lora_A." in n}
    assert adapted_layers and adapted_layers < set(everywhere)
    assert all(f"{name}.weight" in adapted.trainable_prefixes for name in adapted_layers)
    x = torch.rand(2, 3, 16, 16)
    plain.eval(), adapted.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted.features(x), plain.features(x))
    # So the probe's feature cache keys them alike (each seed's random A would miss it) ...
    assert module_sha256(adapted.backbone) == module_sha256(plain.backbone)
    # ... until an adapter has trained.
    with torch.no_grad():
        next(p for n, p in adapted.backbone.named_parameters() if ".lora_B." in n).add_(1e-3)
    assert module_sha256(adapted.backbone) != module_sha256(plain.backbone)


def test_mixup_is_the_convex_combination_with_a_permutation():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 6, 6), torch.arange(8)
    mixed, partner, lam = BatchMix(mixup_alpha=0.4, seed=3)(x, y)
    order = partner  # labels are 0..7, so the partner labels are the permutation
    assert 0 <= lam <= 1 and sorted(order.tolist()) == list(range(8))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[order])


def test_mixing_draws_follow_the_run_seed_and_the_epoch(smoke_cfg):
    """Not one fixed sequence for every seed of a sweep, nor epoch 0's again after a resume:
    the mixer restarts at each epoch start from the (seed, epoch)-seeded global generator."""
    cfg, _ = smoke_cfg(MIX)
    _, model = build_experiment(cfg)
    x, y = torch.rand(8, 3, 6, 6), torch.arange(8)

    def draws(seed: int) -> list[float]:
        torch.manual_seed(seed)  # what EpochReseed does at the epoch start
        model.on_train_epoch_start()
        return [model.mix(x, y)[2] for _ in range(4)]

    assert draws(1) == draws(1) and draws(1) != draws(2)


def test_cutmix_pastes_a_box_and_lam_is_the_area_left():
    x, y = torch.zeros(4, 3, 10, 10), torch.arange(4)
    x += y.view(4, 1, 1, 1).float()  # image i is filled with the value i
    mixed, partner, lam = BatchMix(cutmix_alpha=1.0, seed=1)(x, y)
    from_partner = (mixed != x).any(dim=1).float().mean(dim=(1, 2))  # where pixels changed
    moved = partner != y
    assert torch.allclose(from_partner[moved], torch.full_like(from_partner[moved], 1 - lam))
    assert x.sum() > 0 and mixed.shape == x.shape


def test_bad_mix_settings_are_refused():
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        BatchMix()
    with pytest.raises(ValueError, match="prob"):
        BatchMix(mixup_alpha=0.2, prob=1.5)


def test_mixed_training_step_is_the_mixed_criterion(smoke_cfg):
    cfg, _ = smoke_cfg(MIX, "loss=balanced_softmax")
    _, model = build_experiment(cfg)
    model.train()
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 5])
    replay = copy.deepcopy(model.mix)
    loss = model.training_step((x, y), 0)
    mixed, partner, lam = replay(x, y)
    logits = model(mixed)
    expected = lam * model.criterion(logits, y) + (1 - lam) * model.criterion(logits, partner)
    torch.testing.assert_close(loss, expected)


def test_tta_flip_averages_the_mirror_image_at_eval_only(smoke_cfg):
    cfg, _ = smoke_cfg("model.tta_flip=true")
    _, model = build_experiment(cfg)
    x = torch.rand(3, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        plain = model.head(model.features(x))
        mirrored = model.head(model.features(x.flip(-1)))
        # The two views' probabilities are averaged, not their logits.
        torch.testing.assert_close(model(x).softmax(1),
                                   (plain.softmax(1) + mirrored.softmax(1)) / 2)
        symmetric = torch.cat([x[..., :8], x[..., :8].flip(-1)], dim=-1)
        torch.testing.assert_close(model(symmetric).softmax(1),
                                   model.head(model.features(symmetric)).softmax(1))
        # A checkpoint written before 2026-12-05 had its post-hoc steps tuned on mean logits.
        model.on_load_checkpoint({"tailtune": {}})
        torch.testing.assert_close(model(x), (plain + mirrored) / 2)
        model.tta_mean_probability = True
        model.on_load_checkpoint({"tailtune": model.checkpoint_metadata()})
        assert model.tta_mean_probability
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(F.softmax(model(x), 1), F.softmax((plain + mirrored) / 2, 1))


def test_recipe_preset_trains_and_its_checkpoint_evaluates_the_same(smoke_cfg, tmp_path):
    """experiment=lt_recipe with every switch on: the run's test metrics match scikit-learn,
    and tailtune-eval of its checkpoint (test-time flip, temperature, layer-decay groups and
    mixer rebuilt from the stored config) reproduces them."""
    import json
    from pathlib import Path

    from helpers import assert_test_metrics_match_sklearn, compose_config
    from tailtune.cli.evaluate import evaluate
    from tailtune.cli.train import train

    cfg, choices = smoke_cfg("experiment=lt_recipe", MIX, "model.layer_decay=0.8",
                             "model.tune=bitfit")
    train(cfg, choices)
    run_dir = Path(cfg.paths.output_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert_test_metrics_match_sklearn(run_dir, metrics)
    assert metrics["posthoc"]["steps"] == ["temperature"]
    best = run_dir / "checkpoints" / "best.ckpt"
    eval_cfg, _ = compose_config("eval", [f"ckpt_path={best}", "debug=smoke"], tmp_path / "ev")
    results = evaluate(eval_cfg)
    for key, value in metrics["test"].items():
        assert results["test"][key] == pytest.approx(value, abs=1e-6), key


class HeadAtStart(L.Callback):
    """Head and backbone before the module's own on_fit_start (callbacks run first), and at
    train start."""

    def on_fit_start(self, trainer, pl_module):
        self.before = copy.deepcopy(pl_module.head.state_dict())
        self.backbone = copy.deepcopy(pl_module.backbone.state_dict())

    def on_train_start(self, trainer, pl_module):
        self.after = copy.deepcopy(pl_module.head.state_dict())
        self.backbone_after = copy.deepcopy(pl_module.backbone.state_dict())


PROBE = ("model.probe_epochs=20", "model.unfreeze_at=0", "transforms=flip", "model.lr=0.05",
         "trainer.max_epochs=1")


def test_probe_fits_the_head_on_unaugmented_features_and_leaves_the_backbone(
        smoke_cfg, tmp_path):
    cfg, _ = smoke_cfg(*PROBE, f"model.feature_cache_dir={tmp_path / 'features'}")
    seen = HeadAtStart()
    model, trainer = fit(cfg, tmp_path / "run", [seen])
    assert not all(torch.equal(seen.before[k], seen.after[k]) for k in seen.before)
    assert all(torch.equal(seen.backbone[k], v) for k, v in seen.backbone_after.items())
    assert all(p.requires_grad for p in model.backbone.parameters())  # given back
    # The cached rows are the un-flipped training images' features under the pretrained
    # backbone, in split order (the fit has changed the backbone since: rebuild it).
    dm = trainer.datamodule
    pretrained = copy.deepcopy(model.backbone)
    pretrained.load_state_dict(seen.backbone)
    extractor = FeatureExtractor(pretrained, model.preprocess, model.backbone_identity)
    cached, labels, hit = unaugmented_train_features(dm, extractor,
                                                     FeatureCache(tmp_path / "features"))
    assert hit and dm.train_transform is not None
    plain = copy.copy(dm.datasets["train"])
    plain.transform = None
    images = torch.stack([plain[i][0] for i in range(len(plain))])
    torch.testing.assert_close(cached, extractor(images))
    assert labels.tolist() == [plain[i][1] for i in range(len(plain))]
    # The probe lowered the training loss on those features.
    head = copy.deepcopy(model.head)
    losses = []
    for state in (seen.before, seen.after):
        head.load_state_dict(state)
        with torch.no_grad():
            losses.append(float(model.criterion(head(cached), labels)))
    assert losses[1] < 0.8 * losses[0]


@pytest.mark.slow  # three fits
def test_probe_reads_the_cache_in_a_second_run_and_a_resumed_run_skips_it(
        smoke_cfg, tmp_path, monkeypatch):
    cache = f"model.feature_cache_dir={tmp_path / 'features'}"
    cfg, _ = smoke_cfg(*PROBE, cache, "trainer.max_epochs=2", name="first")
    fit(cfg, tmp_path / "first")
    assert len(list((tmp_path / "features").glob("*.feat"))) == 1

    def no_extraction(*args, **kwargs):
        raise AssertionError("the cached features were extracted again")

    monkeypatch.setattr(feature_datamodule, "extract_features", no_extraction)
    cfg2, _ = smoke_cfg(*PROBE, cache, "trainer.max_epochs=2", name="second")
    seen = HeadAtStart()
    fit(cfg2, tmp_path / "second", [seen])  # a cache hit: no extraction
    assert not all(torch.equal(seen.before[k], seen.after[k]) for k in seen.before)

    def no_probe(*args, **kwargs):
        raise AssertionError("a resumed run fitted the probe again")

    monkeypatch.setattr(FineTuneModule, "fit_head_on_features", no_probe)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    cfg3, _ = smoke_cfg(*PROBE, cache, "trainer.max_epochs=3", name="first")
    _, trainer = fit(cfg3, tmp_path / "first", ckpt_path=str(last))
    assert trainer.current_epoch == 3


def test_tta_flip_keeps_label_smoothings_floor_exact(smoke_cfg):
    """With smoothing eps, a view's optimum is (1 - eps) w + eps / K; the post-hoc steps take
    the floor eps / K off before the prior. Averaging the views' logits would lift the
    classes neither view supports above the floor, and the log prior would then make a rare
    one of them win; averaging probabilities keeps w exactly the views' mean."""
    cfg, _ = smoke_cfg("model.tta_flip=true", "loss=ce", "loss.label_smoothing=0.1")
    _, model = build_experiment(cfg)
    model.eval()
    assert model.has_smoothing_floor
    k, eps = model.log_prior.numel(), 0.1
    w_plain = torch.zeros(1, k)
    w_plain[0, 0] = 1.0                          # one view: all on class 0
    w_mirror = torch.zeros(1, k)
    w_mirror[0, :2] = 0.5                        # the other: split between classes 0 and 1
    views = {"plain": ((1 - eps) * w_plain + eps / k).log(),
             "mirror": ((1 - eps) * w_mirror + eps / k).log()}
    x = torch.rand(1, 3, 16, 16)
    model.features = lambda images: views["plain" if images is x else "mirror"]
    model.head = torch.nn.Identity()
    w = model.without_smoothing_floor(model(x)).exp()[0]
    clamp = 0.01 * eps / k / (1 - eps)
    torch.testing.assert_close(w[:2], torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(w[2:], torch.full((k - 2,), clamp))
