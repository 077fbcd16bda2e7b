"""Small Lightning callbacks that make runs reproducible and resumable."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_warn


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 32-bit seed for ``(seed, epoch)``."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class EpochReseed(L.Callback):
    """Reseed every RNG from ``(seed, epoch)`` at each epoch start.

    Lightning checkpoints hold no RNG state, so without this a resumed run would draw
    different dropout masks and augmentations than an uninterrupted one.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A mid-epoch resume gets no on_train_epoch_start from Lightning.
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = epoch_seed(self.seed, trainer.current_epoch)
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)


class SamplerEpoch(L.Callback):
    """Hands the epoch to the training sampler and logs what it actually drew.

    Lightning 2.6 forwards ``set_epoch`` through ``DistributedSamplerWrapper``; 2.4 and 2.5 do
    not (Lightning issue 21454), so the epoch is set here on every version.
    """

    def __init__(self, sampler: Any, class_names: tuple[str, ...]) -> None:
        self.sampler = sampler
        self.class_names = class_names

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader  # set up by the time training starts
        used = getattr(loader, "sampler", None)
        inner = getattr(getattr(used, "dataset", None), "_sampler", used)  # unwrap DDP wrapper
        # trainer.overfit_batches (debug=overfit) swaps in a SequentialSampler on purpose.
        if used is not None and inner is not self.sampler and not trainer.overfit_batches:
            rank_zero_warn(
                f"the training loader uses {type(inner).__name__}, not the configured "
                f"{type(self.sampler).__name__}; check use_distributed_sampler / the datamodule"
            )
        self.on_train_epoch_start(trainer, pl_module)  # a mid-epoch resume gets no epoch start
        # Resumed mid-epoch (a preemption checkpoint): Lightning runs the epoch's remaining
        # batches from a fresh iterator; start it where the interrupted one stopped. Under
        # DDP, Lightning's sampler wrapper indexes the whole epoch, so there the start replays.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # batches it goes on from
        batch_size = getattr(loader, "batch_size", None)
        if (0 < done < trainer.num_training_batches and batch_size and trainer.world_size == 1
                and hasattr(self.sampler, "resume_at")):
            self.sampler.resume_at(done * batch_size)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        histogram = getattr(self.sampler, "drawn_class_histogram", None)
        if histogram is None:
            return
        counts = histogram()
        if counts is None:
            return
        rank = trainer.global_rank
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"sampler/rank{rank}/{name}": float(c) for name, c in zip(
                    self.class_names, counts, strict=False)},
                step=trainer.current_epoch,
            )


class CheckpointConfig(L.Callback):
    """Stores the resolved run config in every checkpoint, as plain data.

    With the dataset info and preprocessing the model adds itself, a checkpoint is enough to
    rebuild the model and its data split (``tailtune-eval``, ``tailtune.load``).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault("tailtune", {})["config"] = self.config


class AtomicCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, each file written whole or not at all, and one state
    serialised once however many of these callbacks save it.

    - A file is written under a temporary name, then renamed into place: a run killed while
      writing keeps its previous checkpoint intact (``resume=auto`` reads it), never a
      truncated one. (Lightning writes in place.)
    - When another ``AtomicCheckpoint`` of the run already wrote this training state (same
      step, same hook) and this callback's own state has not changed since its last save, the
      file becomes a hard link to that one instead of a second serialisation: the best and the
      every-epoch checkpoint of an improving epoch cost one write (a lite0 checkpoint, 40 MB,
      took 0.22 s here). Files are only ever replaced by a rename, so neither name changes
      through the other. (A callback whose state changes at this save, e.g. the best
      checkpoint's new score, always writes: the other file holds its previous state.)
    - Directories that are not local (fsspec URLs) get Lightning's own save.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._written_when: tuple[int, int, bool] | None = None  # of _last_checkpoint_saved
        self._state_at_write: Any = None

    def _when(self, trainer: L.Trainer) -> tuple[int, int, bool]:
        return (trainer.global_step, trainer.current_epoch,
                self._should_save_on_train_epoch_end(trainer))

    def _state(self) -> Any:
        """This callback's state as comparable plain data (scores are tensors)."""
        def plain(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.tolist()
            return {k: plain(v) for k, v in value.items()} if isinstance(value, dict) else value
        return plain(self.state_dict())

    def _twin(self, trainer: L.Trainer) -> str | None:
        """A file another AtomicCheckpoint wrote of exactly the state this save would write."""
        if self._written_when is None or self._state() != self._state_at_write:
            return None
        when = self._when(trainer)
        for other in trainer.checkpoint_callbacks:
            if (other is not self and isinstance(other, AtomicCheckpoint)
                    and other._written_when == when
                    and other.save_weights_only == self.save_weights_only
                    and os.path.isfile(other._last_checkpoint_saved)):
                return other._last_checkpoint_saved
        return None

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if not _is_local_file_protocol(filepath):
            super()._save_checkpoint(trainer, filepath)
            return
        twin = trainer.strategy.broadcast(self._twin(trainer))  # every rank takes one path
        partial = f"{filepath}.part"
        try:
            if twin is None:
                trainer.save_checkpoint(partial, self.save_weights_only)  # rank 0 writes
            elif trainer.is_global_zero:
                if os.path.lexists(partial):
                    os.remove(partial)
                try:
                    os.link(twin, partial)
                except OSError:  # a filesystem without hard links: a copy is still one write
                    shutil.copyfile(twin, partial)
            if trainer.is_global_zero:
                os.replace(partial, filepath)
        finally:
            if trainer.is_global_zero and os.path.lexists(partial):
                os.remove(partial)
        trainer.strategy.barrier()
        self._written_when = self._when(trainer)
        self._state_at_write = self._state()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


class PreemptionCheckpoint(L.Callback):
    """Save the current state when a run is about to be stopped, so it can resume.

    - SIGTERM or Ctrl-C: Lightning raises ``SIGTERMException``/``KeyboardInterrupt``; the state
      is saved from ``on_exception``.
    - The cluster's requeue signal (``SIGUSR2``: submitit's sbatch ``--signal=USR2@delay``):
      the handler only sets a flag; at the next batch end the state is saved, then the handler
      that was there before runs (submitit's or Lightning's, which requeue the job), or, with
      none, ``scontrol requeue $SLURM_JOB_ID`` and exit.

    ``resume=auto`` (and a requeued job) picks the newest of this file, ``last.ckpt`` and
    Lightning's ``hpc_ckpt_N.ckpt``.
    """

    def __init__(self, path: Path, requeue_signal: str | None = "SIGUSR2") -> None:
        self.path = Path(path)
        self.signum = getattr(signal, requeue_signal) if requeue_signal else None
        self._previous: Any = None
        self._pending: tuple[int, Any] | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.signum is None or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.getsignal(self.signum)
        signal.signal(self.signum, self._flag)

    def _flag(self, signum: int, frame: Any) -> None:
        self._pending = (signum, frame)  # act between steps, never inside one

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._act_on_pending(trainer)

    def _act_on_pending(self, trainer: L.Trainer, save: bool = True) -> None:
        if self._pending is None:
            return
        signum, frame = self._pending
        self._pending = None
        if save:
            trainer.save_checkpoint(self.path, weights_only=False)
        signal.signal(signum, self._previous or signal.SIG_DFL)
        if callable(self._previous):
            self._previous(signum, frame)  # submitit / Lightning: requeue, then exit
            return
        job = os.environ.get("SLURM_JOB_ID")
        if job and trainer.is_global_zero:
            subprocess.call(["scontrol", "requeue", job])
        saved = f"state saved to {self.path}" if save else "fit had finished (last.ckpt)"
        raise SystemExit(f"stopped by signal {signum}; {saved}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A signal in the last steps (the final validation) still requeues. Nothing to save:
        # last.ckpt holds the finished fit, and the resumed job goes on to the test.
        self._act_on_pending(trainer, save=False)
        if self.signum is not None and self._previous is not None:
            signal.signal(self.signum, self._previous)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        # Only while training: a state saved during an epoch's validation resumes with that
        # validation skipped (Lightning counts the epoch as done), so its score and its chance
        # to be the best checkpoint would be lost. The resume then starts from last.ckpt and
        # trains that epoch again, to the same result.
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.training:
            trainer.save_checkpoint(self.path, weights_only=False)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar on stderr, on tailtune's console (so log lines print above
    it), without ``v_num`` (the logger's version: a sweep's job name, shown cut off). Off where
    no live display can be seen (:func:`tailtune.console.draws_live`: a cluster job's log
    file, a joblib sweep's job); :class:`EpochLog`'s lines say how far the run is.

    :func:`tailtune.build.trainer.build_trainer` adds one to any trainer whose config names no
    progress bar: Lightning's default bar would draw on stdout, with the results."""

    def __init__(self, *args: Any, console_kwargs: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        from tailtune.console import CONSOLE_SETTINGS

        super().__init__(*args, console_kwargs={**CONSOLE_SETTINGS, **(console_kwargs or {})},
                         **kwargs)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from tailtune.console import draws_live

        super().setup(trainer, pl_module, stage)
        if not draws_live():
            self.disable()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class EpochLog(L.Callback):
    """One log line per training epoch, after its validation: the metrics a progress bar
    shows, and the epoch's time. The run's ``train.log`` keeps them, and they are all a cluster
    job's log file shows of its progress. Validation metrics only for an epoch that validated
    (``check_val_every_n_epoch``): the bar would show the last ones again.

    :func:`tailtune.build.trainer.training_callbacks` adds one to every training run: it
    changes no number, so it is no config key (a new key would make runs made before it
    another config to ``resume=auto`` and tailtune-compare)."""

    def __init__(self) -> None:
        self._started = 0.0
        self._validated = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed mid-epoch continues that epoch without on_train_epoch_start.
        self._started = time.monotonic()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.monotonic()
        self._validated = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = self._validated or not trainer.sanity_checking

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {key: value for key, value in trainer.progress_bar_metrics.items()
                   if key != "v_num" and (self._validated or not key.startswith("val"))}
        logging.getLogger("tailtune").info(epoch_line(
            trainer.current_epoch, trainer.max_epochs, metrics, time.monotonic() - self._started))


def epoch_line(epoch: int, max_epochs: int | None, metrics: dict[str, Any],
               seconds: float) -> str:
    """``epoch 3/15: train/loss 0.4120, val/bal_acc 0.8710 (12 s)``, epochs counted from 1,
    training metrics first."""
    of = f"/{max_epochs}" if max_epochs and max_epochs > 0 else ""
    keys = sorted(metrics, key=lambda key: not key.startswith("train"))
    shown = ", ".join(f"{key} {metrics[key]:.4f}" if isinstance(metrics[key], float)
                      else f"{key} {metrics[key]}" for key in keys)
    took = f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    return f"epoch {epoch + 1}{of}: {shown or 'no metrics'} ({took})"
