"""Fixtures shared by the tests; helpers they import are in the `helpers` package."""

from __future__ import annotations

import os

# torch and scikit-learn each load their own OpenMP runtime; with active spin-waiting the two
# pools starve each other on 2 cores (stalls of 10-30 s seen here). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Tests run offline: any model-hub access fails at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from helpers import compose_config


@pytest.fixture
def smoke_cfg(tmp_path: Path) -> Callable[..., tuple[DictConfig, dict]]:
    """`smoke_cfg(*overrides)` -> (cfg, choices): the shared tiny config, in a tmp run dir."""

    def make(*overrides: str, name: str = "run") -> tuple[DictConfig, dict]:
        return compose_config("train", ["debug=smoke", *overrides], tmp_path / name)

    return make
