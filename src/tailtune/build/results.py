"""A fitted run's results: final metrics of the best checkpoint, its final name, the test
artifacts and the value returned to sweepers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from tailtune.build.trainer import INTERRUPTED_CHECKPOINT
from tailtune.models.base import ClassifierModule

BEST_CHECKPOINT = "best.ckpt"
IN_PROGRESS_CHECKPOINT = "best_so_far.ckpt"  # configs/callbacks/default.yaml
TUNED_CHECKPOINT = "best_tuned.ckpt.part"  # best.ckpt-to-be of a model with post-hoc steps


def final_metrics(trainer: L.Trainer, model: ClassifierModule, datamodule: L.LightningDataModule,
                  test: bool = True) -> dict[str, Any]:
    """Val (and test) metrics of the best checkpoint, from full single passes.

    A model with post-hoc steps (``model.posthoc``, tau-norm) has them tuned on the best
    checkpoint's validation predictions, then stored with it (best.ckpt, once published), so
    eval and predict reuse them; the metrics before the adjustment are under
    ``posthoc.before``.
    """
    # Whole splits, whatever trainer.limit_val/test_batches say: a limit saves time per epoch,
    # but a reported number (or a post-hoc step tuned on val) of part of a split is wrong,
    # and of a folder's first classes only, where the rows are stored by class.
    if not trainer.fast_dev_run:  # debug=fdr: a smoke check, its numbers mean nothing
        trainer.limit_val_batches = trainer.limit_test_batches = 1.0
    callback = trainer.checkpoint_callback
    best = callback.best_model_path if callback is not None and callback.best_model_path else None
    if model.posthoc_steps:
        model.collect_val_outputs()
    trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)
    refuse_non_finite_weights(model)
    metrics: dict[str, Any] = {
        "val": dict(model.val_results),
        "best_checkpoint": best,
        "epochs_trained": trainer.current_epoch,
        "dataset": datamodule.info.to_dict(),
    }
    scored = best
    if model.posthoc_steps:
        before = {"val": dict(model.val_results)}
        untuned = model.posthoc_adjustment()
        logits, targets = model.take_val_outputs()
        metrics["posthoc"] = {**model.fit_posthoc(logits, targets), "before": before}
        # The tuned model goes to a file of its own: the in-progress one keeps the untuned
        # steps, so a run stopped before it is done resumes from the same starting point.
        # Later passes load that file (with no ckpt_path, Lightning would load a SLURM
        # hpc_ckpt if there is one); publish_best_checkpoint renames it to best.ckpt.
        scored = tuned_checkpoint_path(trainer)
        if scored is not None:
            trainer.save_checkpoint(scored, weights_only=False)  # all ranks; rank 0 writes
            metrics["best_checkpoint"] = scored
        trainer.validate(model, datamodule=datamodule, ckpt_path=scored, verbose=False)
        metrics["val"] = dict(model.val_results)
        if (out_of_fold := metrics["posthoc"].get("val_bal_acc_out_of_fold")) is not None:
            metrics["val"]["bal_acc_out_of_fold"] = out_of_fold  # what selection reads
    if test:
        trainer.test(model, datamodule=datamodule, ckpt_path=scored, verbose=False)
        metrics["test"] = dict(model.test_results)
        if model.posthoc_steps:  # the same pass's logits, untuned: one test pass, not two
            metrics["posthoc"]["before"]["test"] = model.rescore_test(untuned)
    return metrics


def tuned_checkpoint_path(trainer: L.Trainer) -> str | None:
    """Where this run's best model with its tuned post-hoc steps is written until the run
    is done (then renamed to best.ckpt); None without a checkpoint dir."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    return str(Path(dirpath) / TUNED_CHECKPOINT) if dirpath else None


def refuse_non_finite_weights(model: ClassifierModule) -> None:
    """A model with inf or NaN weights or statistics scores as if it guessed: its numbers
    would pass for a finished run's. (The loss check catches most divergence as it
    happens; a weight can overflow while the loss of the step stays finite.)"""
    bad = [name for name, tensor in (*model.named_parameters(), *model.named_buffers())
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise FloatingPointError(
            f"the best checkpoint holds non-finite values in {', '.join(bad[:3])}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}: training diverged; "
            "lower model.lr")


def publish_best_checkpoint(trainer: L.Trainer, path: str | None) -> str | None:
    """Give the tested best checkpoint its final name, ``best.ckpt``; call it last, just
    before the run is marked done. Rank zero's file operations only (no collective call:
    another rank may wait on none).

    While training it is ``best_so_far.ckpt`` (configs/callbacks/default.yaml), so a run that
    fails (a NaN loss in epoch 5) or is killed never leaves a ``best.ckpt`` that looks like a
    finished run's result; resume reads ``last.ckpt``, whose callback state names the
    in-progress file. That file stays until :func:`remove_resume_leftovers` (after the run
    is marked done): a run stopped in between still resumes, from the untuned state. The
    tuned model (:func:`final_metrics`) is renamed into place; the in-progress file is
    linked.
    """
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    if not path or not dirpath or Path(path).parent != Path(dirpath):
        return path  # e.g. the best of another run this one resumed from: not ours to rename
    final = Path(path).with_name(BEST_CHECKPOINT)
    if final == Path(path) or not trainer.is_global_zero:
        return str(final)
    if Path(path).name == TUNED_CHECKPOINT:
        os.replace(path, final)
        return str(final)
    partial = final.with_name(f"{final.name}.part")
    partial.unlink(missing_ok=True)
    try:
        os.link(path, partial)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(path, partial)
    os.replace(partial, final)
    return str(final)


def remove_resume_leftovers(run_dir: Path) -> None:
    """Once the run is done and holds ``best.ckpt``: ``best_so_far.ckpt`` and the state a
    signal saved (``interrupted.ckpt``), which only a resume needed. (``last.ckpt`` stays.)"""
    checkpoints = Path(run_dir) / "checkpoints"
    if (checkpoints / BEST_CHECKPOINT).is_file():
        for leftover in (IN_PROGRESS_CHECKPOINT, TUNED_CHECKPOINT, INTERRUPTED_CHECKPOINT):
            (checkpoints / leftover).unlink(missing_ok=True)


def withdraw_best_checkpoint(run_dir: Path) -> None:
    """A run that failed holds no ``best.ckpt`` (it may have been published just before)."""
    (Path(run_dir) / "checkpoints" / BEST_CHECKPOINT).unlink(missing_ok=True)


def write_test_artifacts(model: ClassifierModule, run_dir: Path) -> None:
    """``test_confusion.csv`` and ``test_predictions.npz`` (per-image targets and
    probabilities: tailtune-compare bootstraps confidence intervals from them) of the
    model's last test pass; rank zero writes."""
    from tailtune.metrics import write_confusion_csv

    trainer = model._trainer
    if trainer is not None and not trainer.is_global_zero:
        return
    if model.test_confusion is not None:
        write_confusion_csv(model.test_confusion, model.class_names, run_dir / "test_confusion.csv")
    if model.test_predictions is not None and model.test_predictions[0] is not None:
        targets, probs = model.test_predictions
        np.savez_compressed(run_dir / "test_predictions.npz", targets=targets.numpy(),
                            probs=probs.numpy(), class_names=np.array(model.class_names))

