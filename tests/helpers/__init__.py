"""What tests share besides fixtures (those stay in conftest.py): composing a config as the
CLI does, running a console script, and independent checks of a run's outputs.

`tests/` is on the path when pytest runs (and in subprocesses with :data:`PROBES_ENV`), so
tests import this as `helpers`; callbacks to attach through Hydra are in `helpers.probes`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from tailtune.cli.config import CONFIG_PATH, register_resolvers

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
CONFIG_DIR = str(REPO / "configs")
assert not CONFIG_PATH.startswith("pkg://") or (REPO / "configs").is_dir()
# A subprocess's environment in which `helpers.probes.*` callbacks can be instantiated.
PROBES_ENV = {"PYTHONPATH": str(TESTS)}

register_resolvers()


def compose_config(name: str, overrides: list[str], output_dir: Path) -> tuple[DictConfig, dict]:
    """Compose like the CLI does; returns the config (without its hydra node) and the
    group choices Hydra recorded."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items()}
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve, as in a run
    with open_dict(cfg):
        del cfg.hydra
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(output_dir.parent / "cache")
    return cfg, choices


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """Run a console script in a subprocess, as a user would."""
    script = Path(sys.executable).with_name(args[0])
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([str(script), *args[1:]], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def assert_test_metrics_match_sklearn(run_dir: Path, metrics: dict) -> None:
    """The run's reported test accuracy and balanced accuracy equal scikit-learn's on the
    per-image predictions the run stored (an independent reference, not a range check)."""
    import numpy as np
    import pytest
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    stored = np.load(Path(run_dir) / "test_predictions.npz")
    targets, preds = stored["targets"], stored["probs"].argmax(axis=1)
    assert len(targets) > 0
    assert metrics["test"]["acc"] == pytest.approx(accuracy_score(targets, preds), abs=1e-6)
    assert metrics["test"]["bal_acc"] == pytest.approx(
        balanced_accuracy_score(targets, preds), abs=1e-6)
