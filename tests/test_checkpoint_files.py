"""The checkpoint files a run writes: best and last share one write when they hold the same
state, never change through each other, and a failed write keeps the previous file."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch

from tailtune.callbacks import AtomicCheckpoint

SCORES = [0.5, 0.7, 0.6, 0.8]  # validation score per epoch: epochs 1 and 3 improve


class Scripted(L.LightningModule):
    """A linear layer whose validation score per epoch is :data:`SCORES`."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("score", SCORES[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.1)


class Files(L.Callback):
    """After each epoch's saves (seen at the next epoch's start, and at fit end): whether best
    and last are one file, and the epoch last.ckpt holds."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, []

    def _look(self) -> None:
        best, last = self.folder / "best.ckpt", self.folder / "last.ckpt"
        self.seen.append((os.stat(best).st_ino == os.stat(last).st_ino,
                          torch.load(last, weights_only=True)["epoch"]))

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch > 0:
            self._look()

    def on_fit_end(self, trainer, pl_module):
        self._look()


def callbacks(folder: Path) -> list[AtomicCheckpoint]:
    """The pair configs/callbacks/default.yaml sets up: best by a score, and every epoch."""
    return [AtomicCheckpoint(dirpath=folder, filename="best", monitor="score", mode="max",
                             save_top_k=1, enable_version_counter=False),
            AtomicCheckpoint(dirpath=folder, filename="last", monitor=None, save_top_k=1,
                             every_n_epochs=1, enable_version_counter=False)]


def fit(folder: Path, epochs: int, extra=(), ckpt_path=None) -> L.Trainer:
    data = torch.utils.data.TensorDataset(torch.randn(8, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu",
                        callbacks=[*callbacks(folder), *extra])
    trainer.fit(Scripted(), loader, loader, ckpt_path=ckpt_path)
    return trainer


def test_an_improving_epoch_writes_once_and_the_others_write_last_alone(tmp_path):
    files = Files(tmp_path)
    fit(tmp_path, len(SCORES), [files])
    # Epoch 0 writes both (the last callback has no earlier state to share); 1 and 3 improve.
    assert files.seen == [(False, 0), (True, 1), (False, 2), (True, 3)]
    best = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert best["epoch"] == 3
    assert not list(tmp_path.glob("*.part"))


def test_a_new_last_checkpoint_leaves_the_linked_best_one_as_it_was(tmp_path):
    fit(tmp_path, 2)  # epoch 1 improves: best and last are one file
    assert os.stat(tmp_path / "best.ckpt").st_ino == os.stat(tmp_path / "last.ckpt").st_ino
    fit(tmp_path, 3, ckpt_path=tmp_path / "last.ckpt")  # epoch 2 (0.6) does not improve
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["epoch"] == 1
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 2


def test_resuming_from_a_shared_file_restores_each_callbacks_own_state(tmp_path):
    """A shared last.ckpt must hold the best callback's newest score: a stale one would let
    a worse epoch replace the best file after a resume."""
    fit(tmp_path, 2)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    best_state = next(v for k, v in state.items() if "'monitor': 'score'" in k)
    assert float(best_state["best_model_score"]) == pytest.approx(0.7)
    trainer = fit(tmp_path, 3, ckpt_path=tmp_path / "last.ckpt")
    assert float(trainer.checkpoint_callbacks[0].best_model_score) == pytest.approx(0.7)


def test_a_write_that_fails_keeps_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    fit(tmp_path, 1)
    before = (tmp_path / "last.ckpt").read_bytes()

    def disk_full(self, *args, **kwargs):
        Path(args[0]).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(L.Trainer, "save_checkpoint", disk_full)
    with pytest.raises(OSError, match="No space"):
        fit(tmp_path, 2, ckpt_path=tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").read_bytes() == before
    assert not list(tmp_path.glob("*.part"))


def test_without_hard_links_the_shared_file_is_copied(tmp_path, monkeypatch):
    def no_links(*args):
        raise OSError("Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    fit(tmp_path, 2)  # epoch 1 improves
    best, last = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    assert os.stat(best).st_ino != os.stat(last).st_ino
    assert best.read_bytes() == last.read_bytes()


def test_a_run_stopped_after_its_posthoc_step_resumes_to_the_same_result(smoke_cfg, monkeypatch):
    """A run that fails after the post-hoc step was fitted (here: writing its test
    artifacts) holds no best.ckpt; resumed, it starts the post-hoc step from the untuned
    state again, so every number matches a run that was never stopped."""
    import json

    from tailtune.build import results
    from tailtune.cli.train import train

    overrides = ("model.posthoc=[logit_adjust,temperature]", "model.logit_adjust_tau=1.0")
    cfg, choices = smoke_cfg(*overrides, name="whole")
    train(cfg, choices)
    whole = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    stopped, choices = smoke_cfg(*overrides, name="stopped")
    run_dir = Path(stopped.paths.output_dir)
    with monkeypatch.context() as patch:
        patch.setattr(results, "write_test_artifacts", full_disk)
        with pytest.raises(OSError, match="No space left"):
            train(stopped, choices)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert not (run_dir / "checkpoints" / "best.ckpt").exists()

    resumed, choices = smoke_cfg(*overrides, "resume=auto", name="stopped")
    train(resumed, choices)
    again = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val", "test"):
        assert again[key] == pytest.approx(whole[key], abs=1e-6, nan_ok=True)
        assert again["posthoc"]["before"][key] == pytest.approx(
            whole["posthoc"]["before"][key], abs=1e-6, nan_ok=True)
    assert again["posthoc"]["logit_adjust_tau"] == whole["posthoc"]["logit_adjust_tau"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt",
                                                                          "last.ckpt"]
