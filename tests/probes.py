"""Callbacks that subprocess tests attach through Hydra, e.g.
`+callbacks.probe._target_=probes.WeightDigest` with `PYTHONPATH=tests`."""

from __future__ import annotations

import hashlib
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


class SlowDown(L.Callback):
    """Sleeps after every training batch, so a test can interrupt a run mid-epoch."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)
