"""One shared smoke configuration for every test that trains: `debug=smoke`."""

from __future__ import annotations

import os

# torch and scikit-learn each load their own OpenMP runtime; with active spin-waiting the two
# pools starve each other on 2 cores (stalls of 10-30 s seen here). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tests run offline: any model-hub access fails at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from tailtune.cli.config import CONFIG_PATH, register_resolvers

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(REPO / "configs")
assert not CONFIG_PATH.startswith("pkg://") or (REPO / "configs").is_dir()

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


@pytest.fixture
def smoke_cfg(tmp_path: Path) -> Callable[..., tuple[DictConfig, dict]]:
    """`smoke_cfg(*overrides)` -> (cfg, choices): the shared tiny config, in a tmp run dir."""

    def make(*overrides: str, name: str = "run") -> tuple[DictConfig, dict]:
        return compose_config("train", ["debug=smoke", *overrides], tmp_path / name)

    return make


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
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    stored = np.load(Path(run_dir) / "test_predictions.npz")
    targets, preds = stored["targets"], stored["probs"].argmax(axis=1)
    assert len(targets) > 0
    assert metrics["test"]["acc"] == pytest.approx(accuracy_score(targets, preds), abs=1e-6)
    assert metrics["test"]["bal_acc"] == pytest.approx(
        balanced_accuracy_score(targets, preds), abs=1e-6)
