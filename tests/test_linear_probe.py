"""The frozen-backbone probe, feature-space resampling and decoupled classifier re-balancing."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from helpers import CONFIG_DIR, PROBES_ENV, compose_config, run_cli
from tailtune.build.data import build_datamodule
from tailtune.build.models import (
    build_experiment,
    feature_parts,
    load_checkpoint_model,
    model_from_checkpoint,
)
from tailtune.build.trainer import build_trainer, training_callbacks
from tailtune.cli.evaluate import evaluate
from tailtune.cli.train import train
from tailtune.features import FeatureCache, FeatureDataModule
from tailtune.imbalance.resampling import FeatureResampler
from tailtune.imbalance.samplers import ClassBalancedSampler
from tailtune.models.decoupled import DecoupledModule, TauNormHead

FEATURE_SAMPLERS = ["smote", "borderline_smote", "adasyn", "smote_tomek", "smote_enn", "tomek",
                    "enn", "nearmiss"]


def fit(cfg, run_dir):
    datamodule, model = build_experiment(cfg)
    trainer = build_trainer(cfg, run_dir, training_callbacks(cfg, datamodule),
                                     loggers=[])
    trainer.fit(model, datamodule=datamodule)
    return datamodule, model, trainer


# -- the probe ----------------------------------------------------------------------------------
def test_probe_trains_only_its_head_on_cached_features_and_checkpoints_no_backbone(
        smoke_cfg, tmp_path):
    cfg, _ = smoke_cfg("model=linear_probe")
    datamodule, model = build_experiment(cfg)
    assert isinstance(datamodule, FeatureDataModule)
    backbone_before = copy.deepcopy(model.backbone.state_dict())
    head_before = copy.deepcopy(model.head.state_dict())
    trainer = build_trainer(cfg, tmp_path / "run", training_callbacks(
        cfg, datamodule), loggers=[])
    trainer.fit(model, datamodule=datamodule)

    after = model.backbone.state_dict()
    assert all(torch.equal(backbone_before[k], after[k]) for k in after)  # BN stats included
    assert not model.backbone.training
    assert not torch.equal(head_before["weight"], model.head.weight)
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert not [k for k in ckpt["state_dict"] if k.startswith("extractor.")]
    assert {"head.weight", "feature_mean", "feature_scale"} <= set(ckpt["state_dict"])
    assert ckpt["tailtune"]["backbone"]["sha256"] == model.backbone_identity["sha256"]

    # Rebuilt from its config (real weights, not the checkpoint's), it predicts from images
    # what the trained module predicts from the cached features of those images.
    loaded = load_checkpoint_model(ckpt_path)
    images, labels = next(iter(datamodule.images.test_dataloader()))
    features, cached_labels = datamodule.split_features("test")
    assert torch.equal(labels, cached_labels[: len(labels)])
    model.eval()
    with torch.no_grad():
        from_features = model.eval_logits(features[: len(labels)])
        from_images = loaded.eval_logits(images)
    assert torch.allclose(from_features, from_images, atol=1e-4)

    # A checkpoint whose backbone hashes differently is refused, not silently misused.
    ckpt["tailtune"]["backbone"]["sha256"] = "0" * 32
    with pytest.raises(ValueError, match="differ from those"):
        model_from_checkpoint(ckpt)


def test_running_the_backbone_every_step_trains_the_same_probe(smoke_cfg, tmp_path):
    """model.features.cache=false: images through the frozen backbone each step, the same
    batches; only float rounding of the features (batch composition) may differ."""
    heads = []
    for cache in ("true", "false"):
        cfg, _ = smoke_cfg("model=linear_probe", f"model.features.cache={cache}", name=cache)
        datamodule, model, _ = fit(cfg, tmp_path / cache)
        assert isinstance(datamodule, FeatureDataModule) == (cache == "true")
        heads.append(model.head.weight.detach())
    assert torch.allclose(heads[0], heads[1], atol=1e-4)


def test_standardisation_and_pca_are_fitted_on_training_features_only(smoke_cfg):
    cfg, _ = smoke_cfg("model=linear_probe", "model.standardize=feature", "model.pca_dim=6",
                       "model.hidden_dim=16")
    datamodule, model = build_experiment(cfg)
    train_x = datamodule.split_features("train")[0].double()
    val_x = datamodule.split_features("val")[0].double()
    assert torch.allclose(model.feature_mean.double(), train_x.mean(0), atol=1e-5)
    assert not torch.allclose(model.feature_mean.double(), val_x.mean(0), atol=1e-3)
    components = model.pca_components.double()
    assert torch.allclose(components.T @ components, torch.eye(6, dtype=torch.float64),
                          atol=1e-4)
    projected = model.head_input(datamodule.split_features("train")[0])
    assert projected.shape[1] == 6 and torch.allclose(projected.mean(0), torch.zeros(6),
                                                      atol=1e-3)
    # Variance falls along the principal axes.
    assert torch.all(projected.var(0)[:-1] >= projected.var(0)[1:] - 1e-6)
    assert model.head[0].in_features == 6 and model.head[0].out_features == 16  # the small MLP


def test_probe_checkpoint_evaluates_through_the_cli_like_the_training_run(smoke_cfg, tmp_path):
    cfg, choices = smoke_cfg("model=linear_probe", "model.posthoc=[logit_adjust,temperature]")
    train(cfg, choices)
    run_dir = Path(cfg.paths.output_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["posthoc"]["steps"] == ["logit_adjust", "temperature"]
    best = run_dir / "checkpoints" / "best.ckpt"
    state = torch.load(best, weights_only=True)["state_dict"]
    assert float(state["posthoc_tau"]) == pytest.approx(metrics["posthoc"]["logit_adjust_tau"])
    # Eval runs the backbone on the test images; training tested on cached features.
    eval_cfg, _ = compose_config("eval", [f"ckpt_path={best}", "debug=smoke"], tmp_path / "ev")
    results = evaluate(eval_cfg)
    for key in ("bal_acc", "acc", "macro_f1"):
        assert results["test"][key] == pytest.approx(metrics["test"][key], abs=1e-6), key


def test_probe_agrees_with_scikit_learn_on_the_cached_features(smoke_cfg):
    """The probe (weighted CE, its default optimiser) and scikit-learn's class-balanced
    logistic regression reach the same balanced accuracy on the same cached features."""
    cfg, choices = smoke_cfg("model=linear_probe", "loss=weighted_ce", "trainer.max_epochs=15",
                             "trainer.limit_train_batches=null", "trainer.limit_val_batches=null",
                             "trainer.limit_test_batches=null", "subsample=null")
    train(cfg, choices)
    probe = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["test"]
    datamodule, _ = build_experiment(cfg)  # a cache hit: the features trained on
    assert all(r["hit"] for r in datamodule.cache_report.values())
    x_train, y_train = (t.float().numpy() for t in datamodule.split_features("train"))
    x_test, y_test = (t.float().numpy() for t in datamodule.split_features("test"))
    # newton-cg: the same objective as the default lbfgs, converged ~10x faster here.
    clf = LogisticRegression(class_weight="balanced", solver="newton-cg", max_iter=1000)
    reference = balanced_accuracy_score(y_test, clf.fit(x_train, y_train).predict(x_test))
    assert probe["bal_acc"] == pytest.approx(reference, abs=0.01)


# -- feature-space resampling ---------------------------------------------------------------
def _features(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), [60, 20, 8])
    centres = rng.normal(0, 1, (3, 5))  # overlapping classes: borders to clean or stress
    return torch.from_numpy((centres[labels] + rng.normal(0, 1, (88, 5))).astype(np.float32)), \
        labels


def _sampler_factory(name: str):
    return instantiate(OmegaConf.load(Path(CONFIG_DIR) / "sampler" / f"{name}.yaml"))


@pytest.mark.parametrize("name", FEATURE_SAMPLERS)
def test_every_feature_space_sampler_config_resamples_only_what_it_should(name):
    features, labels = _features()
    sampler = _sampler_factory(name)(features=features, labels=labels, seed=0, num_classes=3)
    assert isinstance(sampler, FeatureResampler) and sampler.feature_space
    order = list(sampler)
    rows = sampler.draw
    assert len(order) == len(sampler) and max(order) < len(rows.labels)
    original = {tuple(r) for r in features.numpy().round(5)}
    served = [tuple(r) for r in rows.features.numpy().round(5)]
    kept = [r in original for r in served]
    counts = np.bincount(rows.labels.numpy(), minlength=3)
    if name in ("tomek", "enn", "nearmiss"):  # cleaning / under-sampling: a subset
        assert all(kept) and len(served) < len(features)
        assert counts[2] == 8  # the minority class is never cleaned away
    else:  # SMOTE family: new points of the minority classes only
        new_labels = rows.labels.numpy()[[not k for k in kept]]
        assert len(new_labels) > 0 and set(new_labels.tolist()) <= {1, 2}
        if name in ("smote", "borderline_smote", "adasyn"):  # and every original row
            assert original <= set(served)
    np.testing.assert_allclose(sampler.expected_class_counts(), counts, atol=1e-6)


@pytest.mark.parametrize("name", ["smote", "smote_tomek", "smote_enn"])
def test_the_smote_family_over_samples_only_the_classes_its_strategy_names(name):
    """SMOTE-Tomek and SMOTE-ENN dropped a dict strategy and raised every class to the
    majority's count (their inner SMOTE was built with "auto"); cleaning only removes."""
    features, labels = _features()
    sampler = _sampler_factory(name)(features=features, labels=labels, seed=0, num_classes=3,
                                     sampling_strategy={2: 16})
    list(sampler)
    counts = np.bincount(sampler.draw.labels.numpy(), minlength=3)
    assert counts[0] <= 60 and counts[1] <= 20 and counts[2] <= 16
    if name == "smote":
        assert counts.tolist() == [60, 20, 16]


def test_smote_redraws_per_epoch_from_seed_and_epoch_or_stays_fixed():
    features, labels = _features()
    per_epoch = _sampler_factory("smote")(features=features, labels=labels, seed=0, num_classes=3)
    fixed = _sampler_factory("smote")(features=features, labels=labels, seed=0, num_classes=3,
                                      per_epoch=False)
    draws = {}
    for sampler, tag in ((per_epoch, "per_epoch"), (fixed, "fixed")):
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            list(sampler)
            draws[tag, epoch] = sampler.draw.features.clone()
    assert not torch.equal(draws["per_epoch", 0], draws["per_epoch", 1])
    assert torch.equal(draws["fixed", 0], draws["fixed", 1])
    again = _sampler_factory("smote")(features=features, labels=labels, seed=0, num_classes=3)
    again.set_epoch(1)
    list(again)
    assert torch.equal(again.draw.features, draws["per_epoch", 1])  # (seed, epoch) decides


@pytest.mark.parametrize("name", ["smote", "adasyn"])
def test_smote_and_adasyn_change_only_the_training_features(smoke_cfg, name):
    cfg, _ = smoke_cfg("model=linear_probe", f"sampler={name}", "subsample=null")  # k=5 neighbours
    datamodule, _ = build_experiment(cfg)
    cache = FeatureCache(cfg.model.features.cache_dir)
    for split in ("val", "test"):  # served as cached, row for row (val in its fixed order)
        entry = cache.get(datamodule.cache_report[split]["key"])
        loader = datamodule._eval_loader(split)
        served = torch.cat([x for x, _ in loader])
        assert torch.equal(served, entry.features.float()[list(loader.sampler)])
    train_x, train_y = datamodule.split_features("train")
    sampler = datamodule.train_sampler
    assert isinstance(sampler, FeatureResampler)
    batch_x, batch_y = next(iter(datamodule.train_dataloader()))
    rows = sampler.draw
    n = len(train_y)
    assert torch.equal(rows.features[:n], train_x.float())  # originals kept, then new ones
    assert torch.equal(rows.labels[:n], train_y)
    counts = np.bincount(rows.labels.numpy(), minlength=10)
    original = np.bincount(train_y.numpy(), minlength=10)
    assert counts.sum() > original.sum() and counts[0] == original[0]  # majority untouched
    assert counts.min() >= 0.8 * counts.max()  # near-balanced (ADASYN is approximate)
    assert batch_x.shape[1] == train_x.shape[1]


def test_feature_space_sampler_under_finetune_is_refused_with_the_reason(smoke_cfg):
    cfg, _ = smoke_cfg("sampler=smote")
    with pytest.raises(ValueError, match="resamples feature vectors.*model=linear_probe"):
        build_datamodule(cfg)


# -- decoupled classifier re-balancing ----------------------------------------------------------
@pytest.fixture
def finetuned_checkpoint(smoke_cfg, tmp_path) -> tuple[Path, object]:
    """A model=finetune checkpoint whose backbone differs from the packaged weights (as after
    fine-tuning), written as training writes it, without spending a training run on it."""
    cfg, _ = smoke_cfg(name="source")
    datamodule, model = build_experiment(cfg)
    with torch.no_grad():
        for param in model.backbone.parameters():
            param.add_(1e-3 * torch.randn_like(param))
        model.head.bias.copy_(torch.linspace(-1, 1, 10))
    config = OmegaConf.to_container(cfg, resolve=True)
    path = tmp_path / "source.ckpt"
    torch.save({"state_dict": model.state_dict(),
                "tailtune": {**model.checkpoint_metadata(), "config": config}}, path)
    return path, model


def test_crt_retrains_the_head_with_balanced_sampling_and_keeps_the_backbone_bit_identical(
        smoke_cfg, tmp_path, finetuned_checkpoint):
    path, source = finetuned_checkpoint
    cfg, _ = smoke_cfg("model=decoupled", f"model.init_from={path}", "model.method=crt")
    datamodule, model, trainer = fit(cfg, tmp_path / "run")
    assert isinstance(model, DecoupledModule)
    assert isinstance(datamodule.train_sampler, ClassBalancedSampler)
    source_state = torch.load(path, weights_only=True)["state_dict"]
    backbone = {k.removeprefix("backbone."): v for k, v in source_state.items()
                if k.startswith("backbone.")}
    for state in (model.backbone.state_dict(), load_checkpoint_model(
            tmp_path / "run" / "checkpoints" / "last.ckpt").backbone.state_dict()):
        assert state.keys() == backbone.keys()
        assert all(torch.equal(state[k], backbone[k]) for k in backbone)
    assert not torch.equal(model.head.weight, source.head.weight)  # re-initialised, retrained
    # The cache holds these fine-tuned features under their own keys.
    assert model.backbone_identity["sha256"] != feature_parts(
        smoke_cfg("model=linear_probe", name="probe")[0])["extractor"].backbone_identity["sha256"]


def test_tau_norm_at_tau_zero_with_the_bias_is_the_source_model(smoke_cfg, finetuned_checkpoint):
    path, source = finetuned_checkpoint
    # Another loss in this run: its logits are still the source's, under the source's prior.
    cfg, _ = smoke_cfg("model=decoupled", f"model.init_from={path}", "model.method=tau_norm",
                       "model.keep_bias=true", "loss=balanced_softmax")
    datamodule, model = build_experiment(cfg)
    assert isinstance(model.head, TauNormHead) and float(model.head.tau) == 0.0
    model.on_train_epoch_start()  # its one epoch, which trains nothing
    images, _ = next(iter(datamodule.images.test_dataloader()))
    features, _ = datamodule.split_features("test")
    source.eval()
    model.eval()
    for tau in (0.0, 1.0):  # also with a logit adjustment on top
        source.posthoc_tau.fill_(tau), model.posthoc_tau.fill_(tau)
        with torch.no_grad():
            expected = source.eval_logits(images)
            assert torch.allclose(model.eval_logits(images), expected, atol=1e-5)
            assert torch.allclose(model.eval_logits(features[: len(images)]), expected,
                                  atol=1e-4)


def test_tau_norm_picks_tau_on_validation_and_stores_it(smoke_cfg, tmp_path,
                                                        finetuned_checkpoint):
    path, _ = finetuned_checkpoint
    cfg, choices = smoke_cfg("model=decoupled", f"model.init_from={path}",
                             "model.method=tau_norm", "trainer.limit_val_batches=null")
    train(cfg, choices)
    run_dir = Path(cfg.paths.output_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    tau = metrics["posthoc"]["tau_norm"]["tau"]
    assert 0.0 <= tau <= 2.0 and metrics["epochs_trained"] == 1  # nothing to train
    assert metrics["val"]["bal_acc"] == pytest.approx(metrics["posthoc"]["tau_norm"]["val_bal_acc"],
                                                      abs=1e-6)
    loaded = load_checkpoint_model(run_dir / "checkpoints" / "best.ckpt")
    assert float(loaded.head.tau) == pytest.approx(tau)
    # "before" on test is the head before the tuned tau, as on val: the same model at tau 0.
    loaded.head.tau.fill_(0.0)
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        loaded, datamodule=build_experiment(cfg)[0], verbose=False)
    before = metrics["posthoc"]["before"]
    for key in ("bal_acc", "ece"):  # smoke accuracy is near chance; ECE sees the logits' scale
        assert before["test"][key] == pytest.approx(loaded.test_results[key], abs=1e-5)
    assert tau == 0.0 or before["test"]["ece"] != pytest.approx(metrics["test"]["ece"], abs=1e-5)
    # tau is tuned on val, so val's own score is optimistic: on logits that carry no signal
    # the tuned tau's in-sample score rises above chance, the cross-fitted one (what
    # selection reads) does not.
    loaded.head.weight.mul_(torch.logspace(-1, 1, 10)[:, None])  # tau then moves the argmax
    in_sample, out_of_fold = [], []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        noise, y = torch.randn(100, 10, generator=g), torch.arange(10).repeat(10)
        report = loaded.fit_posthoc(noise, y)
        in_sample.append(report["tau_norm"]["val_bal_acc"])
        out_of_fold.append(report["val_bal_acc_out_of_fold"])
    assert np.mean(in_sample) - np.mean(out_of_fold) > 0.01
    assert np.mean(out_of_fold) < 0.12  # chance is 0.10


def test_lws_learns_only_per_class_scales(smoke_cfg, tmp_path, finetuned_checkpoint):
    path, source = finetuned_checkpoint
    cfg, _ = smoke_cfg("model=decoupled", f"model.init_from={path}", "model.method=lws",
                       "model.lr=0.1")
    _, model, _ = fit(cfg, tmp_path / "run")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.scales"]
    assert torch.equal(model.head.fixed.weight, source.head.weight)
    assert not torch.equal(model.head.scales, torch.ones(10))


def test_decoupled_refuses_a_checkpoint_of_another_split(smoke_cfg, finetuned_checkpoint):
    path, _ = finetuned_checkpoint
    cfg, _ = smoke_cfg("model=decoupled", f"model.init_from={path}", "data.split_seed=3")
    with pytest.raises(ValueError, match="data split of .* differs"):
        build_experiment(cfg)


@pytest.mark.slow
def test_ddp_probe_extracts_once_and_ranks_agree(tmp_path):
    probe = tmp_path / "probe"
    result = run_cli(
        "tailtune-train", "debug=smoke", "trainer=ddp_sim", "model=linear_probe", "sampler=smote",
        "+callbacks.probe._target_=helpers.probes.WeightDigest",
        f"+callbacks.probe.out_dir={probe}",
        cwd=tmp_path, env=PROBES_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (probe / "rank0.txt").read_text() == (probe / "rank1.txt").read_text()
    entries = list((tmp_path / "logs" / "cache" / "features").glob("*.feat"))
    assert len(entries) == 3  # one per split: rank one read rank zero's
    run_dir = next((tmp_path / "logs" / "runs").iterdir())
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["bal_acc"] > 0
