"""Callbacks that tests attach through Hydra, e.g.
`+callbacks.probe._target_=helpers.probes.WeightDigest` with `PYTHONPATH=tests`
(:data:`helpers.PROBES_ENV`) in a subprocess."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import lightning as L


class WeightDigest(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        digest = hashlib.sha256()
        for key, tensor in sorted(pl_module.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.txt").write_text(digest.hexdigest())
        # The last epoch's list as the sampler drew it, and this rank's shard of it.
        wrapper = trainer.train_dataloader.sampler
        inner = getattr(getattr(wrapper, "dataset", None), "_sampler", wrapper)
        rank = trainer.global_rank
        (self.out_dir / f"full{rank}.txt").write_text(" ".join(map(str, inner)))
        (self.out_dir / f"shard{rank}.txt").write_text(" ".join(map(str, wrapper)))


def faults_off() -> bool:
    """A resumed run composes the config it was started with (a run dir holds one config),
    probes included; ``TAILTUNE_PROBES_OFF=1`` turns their faults off for it."""
    return os.environ.get("TAILTUNE_PROBES_OFF") == "1"


class SlowDown(L.Callback):
    """Sleeps after every training batch, so a test can interrupt a run mid-epoch."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not faults_off():
            time.sleep(self.seconds)


class InjectNaN(L.Callback):
    """Turns one training batch's images into NaN, as a corrupt file or a diverged
    augmentation would: the loss of that step is NaN."""

    def __init__(self, epoch: int = 1, batch: int = 1) -> None:
        self.epoch = epoch
        self.batch = batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch and not faults_off():
            batch[0].fill_(float("nan"))
