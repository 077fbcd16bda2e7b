"""The config schema (tailtune/cli/schema.py) stays in step with what it describes: the
classes' constructors, their choice lists and the metrics the model logs. (That every shipped
option passes it is checked where every option is composed, in test_cli.py.)"""

from __future__ import annotations

import inspect

import pytest
import torch
from omegaconf import OmegaConf

from helpers import compose_config
from tailtune.cli import schema
from tailtune.cli.config import ConfigError, check_config


def _params(fn) -> set[str]:
    return {name for name, p in inspect.signature(fn).parameters.items()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _keys(table) -> set[str]:
    return {k for k in table if "." not in k and not k.startswith("_")}


# Built by the pipeline, or passed from top-level keys (seed, subsample): not group settings.
INJECTED = {"backbone", "preprocess", "info", "loss", "backbone_identity", "extractor",
            "source_head", "source_log_prior", "members", "member_names", "combiner", "sampler",
            "seed", "subsample", "train_transform"}


def test_model_and_data_tables_match_the_constructors():
    from tailtune.build.config import BUILD_KEYS
    from tailtune.data import folders
    from tailtune.data.datamodule import ImbalancedDataModule
    from tailtune.models.base import ClassifierModule
    from tailtune.models.decoupled import DecoupledModule
    from tailtune.models.ensemble import EnsembleModule
    from tailtune.models.finetune import FineTuneModule
    from tailtune.models.linear_probe import LinearProbeModule

    base = _params(ClassifierModule)
    probe = _params(LinearProbeModule) | base
    taken = {
        "FineTuneModule": _params(FineTuneModule) | base,
        "LinearProbeModule": probe,
        "DecoupledModule": _params(DecoupledModule) | probe,
        "EnsembleModule": _params(EnsembleModule) | base,
    }
    for name, params in taken.items():
        table = _keys(schema.MODEL[name]) - set(BUILD_KEYS)
        if name == "EnsembleModule":  # how members are built: read by the ensemble pipeline
            table -= {"member_model", "member_models", "member_image_size", "bagging",
                      "boosting", "checkpoints", "member_configs"}
        assert table <= params, (name, table - params)  # no key the class would refuse
        assert params - INJECTED <= table, (name, params - INJECTED - table)  # none missing
    datamodule = _params(ImbalancedDataModule) - INJECTED
    assert _keys(schema.DATA["ImbalancedDataModule"]) == datamodule  # source: a nested node
    for name, extra in (("image_folder_datamodule", {"root", "on_bad_image"}),
                        ("csv_datamodule", {"manifest", "on_bad_image"})):
        assert _params(getattr(folders, name)) == extra
        assert _keys(schema.DATA[name]) == datamodule | extra


def test_backbone_table_matches_create_backbone():
    from tailtune.backbones import create_backbone

    assert _keys(schema.BACKBONE) == _params(create_backbone)


def test_choice_lists_match_the_code():
    from tailtune.features import FEATURE_DTYPES
    from tailtune.imbalance.losses import WEIGHTINGS, ClassBalancedLoss
    from tailtune.imbalance.samplers import WeightedSampler
    from tailtune.models.base import POSTHOC_STEPS
    from tailtune.models.decoupled import METHODS
    from tailtune.models.linear_probe import STANDARDIZE

    assert schema.POSTHOC_STEPS == POSTHOC_STEPS
    assert schema.FEATURE_DTYPES == tuple(FEATURE_DTYPES)
    assert schema.MODEL["DecoupledModule"]["method"].options == METHODS
    assert schema.MODEL["LinearProbeModule"]["standardize"].specs[0].options == STANDARDIZE
    assert schema.LOSS["weighting"].options == WEIGHTINGS
    assert schema.LOSS["base"].options == ClassBalancedLoss.BASES
    assert schema.SAMPLER["weighting"].options == WeightedSampler.WEIGHTINGS


def test_metric_names_are_those_the_model_logs():
    from tailtune.metrics import ImbalancedClassificationMetrics

    metrics = ImbalancedClassificationMetrics(["a", "b", "c"], [200, 50, 5])
    metrics.update(torch.randn(30, 3), torch.arange(30) % 3)
    logged = {k for k in metrics.compute() if not k.startswith("recall/")}
    assert logged == set(schema.METRICS)
    for name in logged - set(schema.LOWER_IS_BETTER):
        assert schema.optimized_metric_problem(f"val/{name}") is None


@pytest.mark.parametrize(("value", "problem"), [
    (0, "must be >= 1, got 0"), ("abc", "must be an integer >= 1, got 'abc'"),
    (1.5, "must be an integer >= 1, got 1.5"), (True, "must be an integer >= 1, got True"),
    (None, "must be an integer >= 1, got null"), (3, None),
])
def test_integer_spec(value, problem):
    assert schema.Int(1).problem(value) == problem


def test_specs_describe_what_is_valid():
    assert schema.POSITIVE.problem(float("inf")) == "must be a finite number > 0, got inf"
    assert schema.FRACTION.problem(1.0) == "must be in [0, 1), got 1.0"
    assert schema.TRAIN["resume"].problem("yes") == \
        "must be one of auto, never or null (never resume), got 'yes'"
    assert schema.MODEL["FineTuneModule"]["posthoc"].problem(["bias", "nope"]) is not None
    assert schema.MODEL["FineTuneModule"]["posthoc"].problem(["bias", "temperature"]) is None
    assert schema.PREDICT["device"].problem("cuda:1") is None
    assert schema.PREDICT["device"].problem("gpu") == \
        "must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"


def test_a_class_of_your_own_is_checked_on_the_keys_it_shares():
    cfg = OmegaConf.create({"task_name": "train", "seed": 1, "model": {
        "_target_": "mine.MyModule", "lr": -1.0, "my_own_key": 3}})
    assert schema.config_problems(cfg, "train") == ["model.lr must be > 0, got -1.0"]


def test_settings_for_an_option_that_builds_nothing_are_refused(tmp_path):
    """transforms=none +transforms.erasing=0.5 ended in "'DictConfig' object is not callable"
    and a traceback."""
    cfg, _ = compose_config("train", ["transforms=none", "+transforms.erasing=0.5"],
                            tmp_path / "run")
    assert schema.config_problems(cfg, "train") == [
        "transforms: transforms.erasing set, but the chosen transforms option builds nothing "
        "to take it; choose an option that does (configs/transforms/)"]
    cfg, _ = compose_config("train", ["transforms=flip", "+transforms.erasing=1.5"],
                            tmp_path / "run")
    assert schema.config_problems(cfg, "train") == ["transforms.erasing must be in [0, 1], "
                                                    "got 1.5"]


def test_unknown_key_in_a_closed_node_names_the_closest(tmp_path):
    cfg = OmegaConf.create({"task_name": "predict", "ckpt_path": "x", "input": "y",
                            "output": None, "batch_size": 4, "num_workers": 0,
                            "device": "auto", "batchsize": 3})
    with pytest.raises(ConfigError, match="batchsize is not a setting; did you mean batch_size"):
        check_config(cfg, entry="predict")


def test_list_descriptions_put_the_plural_on_the_noun():
    """``model.checkpoints must be a list of non-emptys string``."""
    assert schema.ListOf(schema.TEXT).describe() == "a list of non-empty strings"
    assert schema.ListOf(schema.Float(0, 1)).describe() == "a list of finite numbers in [0, 1]"
    assert schema.ListOf(schema.Int(0), min_len=1).describe() == \
        "a list of at least 1 of integers >= 0"
