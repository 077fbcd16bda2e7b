"""Ensembles: combiner math, bagging and boosting draws, members at different resolutions,
training in one run vs assembling from checkpoints, and the bad-input errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf, open_dict

from helpers import assert_test_metrics_match_sklearn, compose_config, run_cli
from tailtune.build.data import build_datamodule, build_loss
from tailtune.build.ensemble import build_combiner, check_members, member_configs, untrained_member
from tailtune.build.models import load_checkpoint_model, make_ensemble
from tailtune.cli.evaluate import evaluate
from tailtune.cli.train import train
from tailtune.imbalance import ensembles
from tailtune.imbalance.adjust import balanced_accuracy
from tailtune.models.combiners import (
    Majority,
    MeanLogit,
    MeanProb,
    Samme,
    Stacking,
    Weighted,
    simplex_grid,
)

# Tiny members: every member at 32 px, as debug=smoke's backbone.
SMALL = ["model.member_image_size=32"]


def _logits(n: int = 120, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    targets = torch.arange(n) % k
    logits = torch.randn(n, k, generator=g) + 2.0 * torch.nn.functional.one_hot(targets, k)
    return logits, targets


# -- combiner math --------------------------------------------------------------------------
@pytest.mark.parametrize("combiner", [MeanProb(), MeanLogit(), Majority(), Weighted()],
                         ids=["mean_prob", "mean_logit", "majority", "weighted"])
def test_an_ensemble_of_identical_members_is_the_member(combiner):
    z, y = _logits()
    members = [z.clone() for _ in range(3)]
    combiner.fit(members, y)
    out = combiner.combine(members)
    assert torch.equal(out.argmax(1), z.argmax(1))
    assert balanced_accuracy(out, y) == balanced_accuracy(z, y)
    if not isinstance(combiner, Majority):  # a hard vote keeps no member's probabilities
        assert torch.allclose(out.softmax(1), z.softmax(1), atol=1e-6)


@pytest.mark.parametrize("member_tau,temperature", [(1.0, 1.0), (0.0, 2.0), (0.5, 1.5)])
def test_the_ensembles_logit_adjustment_removes_only_the_prior_its_members_left(
        member_tau, temperature):
    """Members that adjust their own logits (tau, or temperature scaling as lt_recipe does)
    hand the ensemble logits with less prior, or a scaled one, left in them: logit
    adjustment at tau = 1 on the ensemble must give the balanced members' logits."""
    from helpers.models import Identity
    from tailtune.data.info import DatasetInfo
    from tailtune.imbalance.losses import CrossEntropyLoss
    from tailtune.models.ensemble import EnsembleModule


    counts = (1000, 100, 10)
    info = DatasetInfo("toy", ("head", "mid", "tail"), counts, "fp", 32)

    def member():
        m = Identity(info, CrossEntropyLoss(counts), logit_adjust_tau=member_tau)
        m.posthoc_temperature.fill_(temperature)
        return m

    ensemble = EnsembleModule([member(), member()], ["a", "b"], info,
                              CrossEntropyLoss(counts), combiner=MeanLogit(),
                              logit_adjust_tau=1.0)
    log_prior = torch.tensor(counts, dtype=torch.float).log().log_softmax(0)
    balanced = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    got = ensemble.eval_logits(balanced + log_prior)  # trained logits: balanced + prior
    want = balanced / temperature
    torch.testing.assert_close(got - got.mean(1, keepdim=True),
                               want - want.mean(1, keepdim=True))


@pytest.mark.parametrize("combiner", [Weighted(weights=[1.0, 0.0]), Samme([2.0, 0.0])],
                         ids=["weighted", "samme"])
def test_a_member_weighted_zero_leaves_none_of_its_prior(combiner):
    """The prior the ensemble's logit adjustment removes is averaged with the combiner's
    member weights: with A weighted 1 and B (balanced softmax: no prior left) weighted 0, the
    ensemble at tau = 1 is member A at tau = 1 (an unweighted mean removed half of A's prior,
    balanced accuracy 0.79 -> 0.62 on a 5-class toy)."""
    from helpers.models import Identity
    from tailtune.data.info import DatasetInfo
    from tailtune.imbalance.losses import BalancedSoftmaxLoss, CrossEntropyLoss
    from tailtune.models.ensemble import EnsembleModule

    counts = (1000, 100, 10)
    info = DatasetInfo("toy", ("head", "mid", "tail"), counts, "fp", 32)
    a = Identity(info, CrossEntropyLoss(counts))
    b = Identity(info, BalancedSoftmaxLoss(counts))
    ensemble = EnsembleModule([a, b], ["a", "b"], info, CrossEntropyLoss(counts),
                              combiner=combiner, logit_adjust_tau=1.0)
    torch.testing.assert_close(ensemble.log_prior, a.log_prior)
    if isinstance(combiner, Samme):  # a hard vote: the prior is all there is to compare
        return
    z, _ = _logits(k=3)
    trained = z + a.log_prior
    noise = torch.randn_like(z)
    a_alone = a.adjust_logits(trained, (torch.tensor(1.0), torch.zeros(3), torch.tensor(1.0)))
    combined = ensemble.adjust_logits(ensemble.combine([a.eval_logits(trained),
                                                        b.eval_logits(noise)]))
    assert torch.equal(combined.argmax(1), a_alone.argmax(1))


def test_stacking_leaves_no_prior_for_the_ensembles_logit_adjustment():
    """Stacking's class-balanced regression has removed the members' prior: tau = 1 on its
    scores must change nothing (it lowered balanced accuracy 0.900 -> 0.867 when the
    members' prior was removed again); the soft vote keeps the prior for tau to remove."""
    from helpers.models import Identity
    from tailtune.data.info import DatasetInfo
    from tailtune.imbalance.losses import CrossEntropyLoss
    from tailtune.models.ensemble import EnsembleModule


    counts = (1000, 100, 10)
    info = DatasetInfo("toy", ("head", "mid", "tail"), counts, "fp", 32)
    z, y = _logits(k=3)
    trained = z + torch.tensor(counts, dtype=torch.float).log()  # CE logits carry the prior
    members = [Identity(info, CrossEntropyLoss(counts)) for _ in range(2)]
    for combiner, keeps_prior in ((Stacking(), False), (MeanProb(), True)):
        scores = {}
        for tau in (0.0, 1.0):
            ensemble = EnsembleModule(members, ["a", "b"], info, CrossEntropyLoss(counts),
                                      combiner=combiner, logit_adjust_tau=tau)
            ensemble.fit_combiner([trained, trained], y)
            scores[tau] = ensemble.eval_logits(trained)
        shift = scores[1.0] - scores[0.0]
        # The same for every class (softmax-invariant): no prior removed.
        assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-5) != keeps_prior


def test_weighted_with_one_member_at_weight_one_is_that_member():
    members = [_logits(seed=s)[0] for s in range(3)]
    combiner = Weighted(weights=[0.0, 1.0, 0.0])
    assert not combiner.needs_validation
    out = combiner.fit(members, _logits()[1]).combine(members)
    assert torch.allclose(out.softmax(1), members[1].softmax(1), atol=1e-6)
    assert torch.equal(out.argmax(1), members[1].argmax(1))


def test_weighted_fit_finds_the_best_weights_on_validation():
    z, y = _logits(seed=1)
    noise = torch.randn_like(z) * 3  # an uninformative member
    combiner = Weighted().fit([noise, z], y)
    assert combiner.weights[1] > combiner.weights[0]
    grid_best = max(balanced_accuracy(Weighted(weights=list(w)).combine([noise, z]), y)
                    for w in simplex_grid(2, 0.1))
    assert combiner.val_bal_acc == pytest.approx(grid_best)
    assert all(math.isclose(sum(w), 1.0) for w in simplex_grid(3, 0.1))


def test_weighted_reports_cross_fitted_validation_scores():
    """Weights searched on noise members beat the plain mean on the images they were
    searched on; the validation scores it reports (what selection reads) come from weights
    searched on the other folds, and stay near chance."""
    in_sample, reported = [], []
    for seed in range(8):  # chance is 0.2
        rng = np.random.default_rng(seed)
        y = torch.from_numpy(np.arange(60) % 5)
        members = [torch.from_numpy(rng.normal(0, 3, (60, 5))).float() for _ in range(4)]
        combiner = Weighted().fit(members, y)
        in_sample.append(combiner.val_bal_acc)
        reported.append(balanced_accuracy(combiner.combine_val(members), y))
    assert np.mean(in_sample) - np.mean(reported) > 0.05 and np.mean(reported) < 0.23
    fixed = Weighted(weights=[1.0, 1.0, 0.0, 0.0])
    assert torch.equal(fixed.fit(members, y).combine_val(members), fixed.combine(members))


def test_majority_vote_counts_votes_and_breaks_ties_by_mean_probability():
    a = torch.tensor([[5.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 5.0, 0.0]])
    c = torch.tensor([[4.0, 0.0, 3.0]])
    assert Majority().combine([a, b, c]).argmax(1).item() == 0  # two votes for class 0
    # One vote each: the highest mean probability wins (class 0: 5 and 4 beat 5 alone).
    assert Majority().combine([a, b, torch.tensor([[0.0, 0.0, 1.0]])]).argmax(1).item() == 0


def test_stacking_is_cross_fitted_and_never_scores_its_own_training_rows():
    """Leak test: features that let a model memorise the labels but carry no signal. An
    in-sample fit scores ~1 on validation; the cross-fitted validation scores stay at
    chance, and each row's score comes from a model fitted without that row."""
    rng = np.random.default_rng(0)
    n, k = 60, 4
    y = torch.from_numpy(rng.integers(0, k, n))
    members = [torch.from_numpy(rng.normal(0, 3, (n, k))).float() for _ in range(10)]
    stacking = Stacking(C=100.0, folds=5).fit(members, y)
    in_sample = balanced_accuracy(stacking.combine(members), y)
    cross_fitted = balanced_accuracy(stacking.combine_val(members), y)
    assert in_sample > 0.9
    assert cross_fitted < 0.4  # chance is 0.25
    folds = np.asarray(stacking.fold_of_row)
    assert len(set(folds.tolist())) == 5
    # Refitting the fold of row 0 on the other folds gives row 0 exactly its reported score.
    from tailtune.models.combiners import stacking_features

    x = stacking_features(members)
    held = folds == folds[0]
    model = stacking._fit_lr(x[~held], y.numpy()[~held])
    again = stacking._scores(x[held], model.coef_, model.intercept_, model.classes_)
    assert torch.allclose(again, stacking.combine_val(members)[torch.from_numpy(held)],
                          atol=1e-5)


def test_stacking_state_round_trips_as_plain_data():
    z, y = _logits()
    members = [z, z + torch.randn_like(z)]
    fitted = Stacking(folds=3).fit(members, y)
    state = json.loads(json.dumps(fitted.state()))
    fresh = Stacking()
    fresh.load_state(state)
    assert torch.allclose(fresh.combine(members), fitted.combine(members))


# -- bagging and boosting -------------------------------------------------------------------
def test_balanced_bags_are_balanced_subsets_that_differ_across_member_seeds():
    labels = np.repeat(np.arange(4), [60, 30, 12, 5])
    bags = [ensembles.BalancedBagSampler(labels, seed=s, num_classes=4, draw_seed=s)
            for s in (0, 1, 2)]
    for bag in bags:
        assert np.bincount(labels[bag.subset], minlength=4).tolist() == [5, 5, 5, 5]
        assert len(np.unique(bag.subset)) == len(bag.subset) == len(bag)
        epoch0 = list(bag)
        bag.set_epoch(1)
        assert sorted(epoch0) == sorted(bag) == bag.subset.tolist()  # fixed subset, reshuffled
        np.testing.assert_allclose(bag.expected_class_counts(), [5, 5, 5, 5])
    assert len({tuple(b.subset.tolist()) for b in bags}) == 3


def test_samme_weights_rise_on_misclassified_samples_and_alpha_follows_the_formula():
    labels = np.repeat(np.arange(3), [6, 3, 1])
    w0 = ensembles.samme_initial_weights(labels)
    assert w0.sum() == pytest.approx(1.0)
    assert [w0[labels == c].sum() for c in range(3)] == pytest.approx([1 / 3] * 3)
    preds = labels.copy()
    preds[[0, 7]] = [1, 0]  # two mistakes
    w1, error, alpha = ensembles.samme_update(w0, preds, labels, 3)
    assert error == pytest.approx(w0[0] + w0[7])
    assert alpha == pytest.approx(math.log((1 - error) / error) + math.log(3 - 1))
    miss = preds != labels
    ratio = (w1 / w0)
    assert np.allclose(ratio[miss] / ratio[~miss][0], math.exp(alpha))
    assert (w1[miss] > w0[miss]).all() and (w1[~miss] < w0[~miss]).all()
    assert w1.sum() == pytest.approx(1.0)
    # Worse than chance: weight 0, sample weights unchanged.
    _, _, bad = ensembles.samme_update(w0, (labels + 1) % 3, labels, 3)
    assert bad == 0.0
    sampler = ensembles.SampleWeightSampler(labels, seed=0, num_classes=3, weights=w1)
    np.testing.assert_allclose(sampler.expected_class_distribution().sum(), 1.0)


def test_samme_scores_members_on_the_stored_training_images_not_augmented_ones():
    from types import SimpleNamespace

    from tailtune.build.ensemble import _train_split
    from tailtune.data.datamodule import ArrayImageDataset
    from tailtune.data.transforms import flip_crop

    images = np.random.default_rng(0).integers(0, 255, (4, 3, 32, 32), dtype=np.uint8)
    train = ArrayImageDataset(images, np.arange(4), np.arange(4), transform=flip_crop(32))
    split = _train_split(SimpleNamespace(datasets={"train": train}))
    served = torch.stack([split[i][0] for i in range(4)])
    torch.testing.assert_close(served, torch.from_numpy(images).float() / 255)
    assert train.transform is not None  # training keeps its augmentation


def test_samme_combiner_is_an_alpha_weighted_vote():
    a, b, c = (torch.eye(3)[[i]] * 5 for i in range(3))
    assert Samme([0.5, 0.4, 2.0]).combine([a, b, c]).argmax(1).item() == 2
    assert Samme([1.0, 0.4, 0.5]).combine([a, b, c]).argmax(1).item() == 0


# -- members, configs and checkpoints ----------------------------------------------------------
def test_members_at_different_resolutions_take_one_raw_batch(smoke_cfg):
    cfg, _ = smoke_cfg("model=ensemble", "model.members=[efficientnet_lite0,efficientnet_lite1]",
                       "model.member_model=[linear_probe,finetune]", "model.posthoc_crossfit=false")
    with open_dict(cfg):
        cfg.model.members = [{"backbone": "efficientnet_lite0", "image_size": 24},
                             {"backbone": "efficientnet_lite1", "image_size": 40}]
    specs = member_configs(cfg)
    assert [m.model._target_.rsplit(".", 1)[1] for _, m in specs] == \
        ["LinearProbeModule", "FineTuneModule"]
    assert [m.seed for _, m in specs] == [cfg.seed, cfg.seed + 1]
    images = build_datamodule(cfg)
    members = [untrained_member(m, images) for _, m in specs]
    ensemble = make_ensemble(
        cfg.model, members, [n for n, _ in specs], images.info, build_loss(cfg, images),
        MeanProb())
    assert [m.preprocess.image_size for m in ensemble.members] == [24, 40]
    assert ensemble.posthoc_crossfit is False  # every setting of the module reaches it
    batch = torch.rand(5, 3, 16, 16)  # raw images at the data's size
    ensemble.eval()
    with torch.no_grad():
        per_member = ensemble.member_logits(batch)
        out = ensemble(batch)
    assert out.shape == (5, 10)
    assert torch.allclose(out, MeanProb().combine(per_member))
    with torch.no_grad():  # each member resized for itself
        alone = members[1].head(members[1].features(batch))
    assert torch.allclose(per_member[1], alone, atol=1e-5)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["model.members=[]"], "model.members is empty"),
    (["model.members=[nope_net,efficientnet_lite0]"], "members\\[0\\]=nope_net is not a backbone"),
    (["model.member_model=[linear_probe]"], "1 kinds for 3 members"),
    (["data.val_fraction=0", "combiner=stacking"], "no validation split"),
    (["model.bagging=under", "model.training=joint"], "one after another"),
    (["model.training=joint", "model.member_models.linear_probe.posthoc=temperature"],
     "tuned only when members train one after another"),
    # The combiner would be fitted on the val split the members' own steps were tuned on.
    (["combiner=weighted", "model.member_models.linear_probe.posthoc=temperature"],
     "weighs in-sample scores"),
])
def test_bad_ensemble_configs_are_clear_value_errors(smoke_cfg, overrides, expected):
    cfg, choices = smoke_cfg("model=ensemble", *SMALL, *overrides)
    with pytest.raises(ValueError, match=expected):
        train(cfg, choices)


def test_members_of_another_dataset_or_split_are_refused_before_anything_loads():
    def ckpt(names, fingerprint, model="linear_probe"):
        info = {"name": "d", "class_names": names, "class_counts": [1] * len(names),
                "split_fingerprint": fingerprint, "image_size": 8}
        return {"tailtune": {"dataset_info": info, "model": model, "config": {}}}

    paths = [Path("a.ckpt"), Path("b.ckpt")]
    ok = ckpt(["x", "y"], "f1")
    check_members(paths, [ok, ckpt(["x", "y"], "f1")])
    with pytest.raises(ValueError, match="different datasets"):
        check_members(paths, [ok, ckpt(["x", "z"], "f1")])
    with pytest.raises(ValueError, match="data split of b.ckpt differs"):
        check_members(paths, [ok, ckpt(["x", "y"], "f2")])
    with pytest.raises(ValueError, match="ensemble checkpoint"):
        check_members(paths, [ok, ckpt(["x", "y"], "f1", "ensemble")])


def _fake_member_checkpoint(source: Path, target: Path, edit) -> Path:
    ckpt = torch.load(source, weights_only=True)
    edit(ckpt["tailtune"])
    torch.save(ckpt, target)
    return target


def _members_of(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "members").glob("*/checkpoints/best.ckpt"))


@pytest.fixture(scope="module")
def trained_ensemble(tmp_path_factory) -> tuple[Path, dict]:
    """One weighted three-probe ensemble trained in one run (shared by the tests below)."""
    root = tmp_path_factory.mktemp("ens")
    cfg, choices = compose_config(
        "train", ["debug=smoke", "model=ensemble", *SMALL, "combiner=weighted",
                  "trainer.limit_val_batches=null", "trainer.limit_test_batches=null"],
        root / "run")
    train(cfg, choices)
    run_dir = Path(cfg.paths.output_dir)
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_ensemble_run_reports_every_member_next_to_the_ensemble(trained_ensemble):
    run_dir, metrics = trained_ensemble
    names = ["0-efficientnet_lite0", "1-efficientnet_lite1", "2-efficientnet_lite2"]
    assert list(metrics["members"]) == names
    for scope in [metrics, *metrics["members"].values()]:
        for split in ("val", "test"):
            assert {"bal_acc", "macro_f1", "recall/0", "recall/9"} <= set(scope[split])
    assert metrics["combiner"]["name"] == "weighted"
    assert sum(metrics["combiner"]["weights"]) == pytest.approx(1.0)
    members = list(metrics["members"].values())
    by_test = max(m["test"]["bal_acc"] for m in members)
    by_val = max(members, key=lambda m: m["val"]["bal_acc"])["test"]["bal_acc"]
    assert metrics["ensemble_minus_best_member_test_bal_acc"] == pytest.approx(
        metrics["test"]["bal_acc"] - by_test)
    assert metrics["ensemble_minus_val_picked_member_test_bal_acc"] == pytest.approx(
        metrics["test"]["bal_acc"] - by_val)
    assert len(_members_of(run_dir)) == 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"test/bal_acc", f"member/{names[1]}/test/bal_acc",
            f"member/{names[2]}/test/macro_f1", f"member/{names[0]}/test/recall/3"} <= tags
    # The saved ensemble reloads and predicts from raw images of any size.
    import tailtune

    model = tailtune.load(str(run_dir / "checkpoints" / "best.ckpt"))
    assert model.combiner.weights == metrics["combiner"]["weights"]
    probs = model.predict_images(torch.rand(2, 3, 20, 20))
    assert probs.shape == (2, 10) and torch.allclose(probs.sum(1), torch.ones(2))


@pytest.mark.slow
def test_assembling_from_checkpoints_reproduces_the_ensemble_trained_in_one_run(
        trained_ensemble, tmp_path):
    run_dir, metrics = trained_ensemble
    eval_cfg, _ = compose_config(
        "eval", ["debug=smoke", "model=ensemble", "combiner=weighted",
                 f"model.checkpoints=[{run_dir / 'members'}]"], tmp_path / "assembled")
    results = evaluate(eval_cfg)
    assert results["combiner"]["weights"] == metrics["combiner"]["weights"]
    for split in ("val", "test"):
        assert results[split] == pytest.approx(metrics[split], abs=1e-9)
        for name in metrics["members"]:
            assert results["members"][name][split] == pytest.approx(
                metrics["members"][name][split], abs=1e-9)
    # And the ensemble checkpoint evaluates through tailtune-eval to the same test metrics.
    single, _ = compose_config("eval", [f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
                                        "debug=smoke", "trainer.limit_test_batches=null"],
                               tmp_path / "single")
    tested = evaluate(single)["test"]
    for key in ("bal_acc", "acc", "macro_f1"):
        assert tested[key] == pytest.approx(metrics["test"][key], abs=1e-6)


@pytest.mark.slow
def test_assembling_refuses_another_dataset_or_another_split(trained_ensemble, tmp_path):
    run_dir, _ = trained_ensemble
    first, second = _members_of(run_dir)[:2]

    def other_classes(meta):
        meta["dataset_info"]["class_names"] = [f"c{i}" for i in range(10)]

    def other_split(meta):
        meta["dataset_info"]["split_fingerprint"] = "0" * 16

    for edit, expected in ((other_classes, "different datasets"), (other_split, "split of")):
        bad = _fake_member_checkpoint(second, tmp_path / f"{edit.__name__}.ckpt", edit)
        eval_cfg, _ = compose_config("eval", ["debug=smoke", "model=ensemble",
                                              f"model.checkpoints=[{first},{bad}]"],
                                     tmp_path / edit.__name__)
        with pytest.raises(ValueError, match=expected):
            evaluate(eval_cfg)


@pytest.mark.slow
def test_bagged_members_train_on_their_own_balanced_subsets(smoke_cfg):
    cfg, choices = smoke_cfg("model=ensemble", *SMALL, "model.bagging=under",
                             "model.members=[efficientnet_lite0,efficientnet_lite0]")
    train(cfg, choices)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    bags = [m["bag"] for m in metrics["members"].values()]
    assert [b["draw_seed"] for b in bags] == [cfg.seed, cfg.seed + 1]
    for bag in bags:
        assert len(set(bag["class_counts"])) == 1  # balanced
    labels = build_datamodule(cfg).split_labels("train")
    subsets = [ensembles.balanced_bag(labels, b["draw_seed"]) for b in bags]
    assert not np.array_equal(subsets[0], subsets[1])


@pytest.mark.slow
def test_boosted_probes_are_combined_with_their_samme_weights(smoke_cfg):
    cfg, choices = smoke_cfg("model=ensemble", *SMALL, "model.boosting=samme",
                             "model.members=[efficientnet_lite0,efficientnet_lite0]",
                             "trainer.limit_train_batches=null")
    train(cfg, choices)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    rounds = [m["samme"] for m in metrics["members"].values()]
    assert metrics["combiner"]["alphas"] == [r["alpha"] for r in rounds]
    for r in rounds:
        assert r["alpha"] == pytest.approx(
            max(0.0, math.log((1 - r["weighted_error"]) / r["weighted_error"]) + math.log(9)))


@pytest.mark.slow
def test_joint_training_sums_member_losses_in_one_run(smoke_cfg, monkeypatch):
    from tailtune.models.finetune import FineTuneModule

    cfg, choices = smoke_cfg("model=ensemble", *SMALL, "model.training=joint",
                             "model.members=[efficientnet_lite0,efficientnet_lite1]",
                             "model.member_model=[finetune,linear_probe]")
    calls = []  # each member's own training loss (mixup, if it mixes), not its bare criterion
    own_loss = FineTuneModule.training_loss
    monkeypatch.setattr(FineTuneModule, "training_loss",
                        lambda self, *a: calls.append(1) or own_loss(self, *a))
    train(cfg, choices)
    assert calls
    run_dir = Path(cfg.paths.output_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["members"]) == {"0-efficientnet_lite0", "1-efficientnet_lite1"}
    assert_test_metrics_match_sklearn(run_dir, metrics)
    model = load_checkpoint_model(run_dir / "checkpoints" / "best.ckpt")
    assert [type(m).__name__ for m in model.members] == ["FineTuneModule", "LinearProbeModule"]


@pytest.mark.slow
def test_cli_turns_ensemble_bad_input_into_one_line_and_exit_2(tmp_path):
    result = run_cli("tailtune-train", "debug=smoke", "model=ensemble", "model.members=[]",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert "model.members is empty" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("tailtune-eval", "model=ensemble", "model.checkpoints=[]", cwd=tmp_path)
    assert result.returncode == 2 and "model.checkpoints is empty" in result.stderr


def test_ensemble_config_composes_with_every_combiner(tmp_path):
    for name in ("mean_prob", "mean_logit", "majority", "weighted", "stacking"):
        cfg, choices = compose_config("train", ["model=ensemble", f"combiner={name}"],
                                      tmp_path / name)
        assert choices["combiner"] == name
        OmegaConf.to_container(cfg, resolve=True)
        assert build_combiner(cfg).name == name


def test_an_ensemble_refuses_to_resume_from_a_checkpoint_path(smoke_cfg):
    """Its members train from the start: a ckpt_path would be silently ignored."""
    checkpoint = Path(__file__).parent / "data" / "checkpoints_v0" / "finetune.ckpt"
    cfg, choices = smoke_cfg("model=ensemble", *SMALL, f"ckpt_path={checkpoint}")
    with pytest.raises(ValueError, match="does not resume from a checkpoint"):
        train(cfg, choices)
