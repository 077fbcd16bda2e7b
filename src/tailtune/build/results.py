"""A fitted run's results: final metrics of the best checkpoint, its final name, the test
artifacts and the value returned to sweepers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from tailtune.models.base import ClassifierModule

BEST_CHECKPOINT = "best.ckpt"


def final_metrics(trainer: L.Trainer, model: ClassifierModule, datamodule: L.LightningDataModule,
                  test: bool = True) -> dict[str, Any]:
    """Val (and test) metrics of the best checkpoint, from full single passes.

    A model with post-hoc steps (``model.posthoc``, tau-norm) has them tuned on the best
    checkpoint's validation predictions, then stored in that checkpoint, so eval and predict
    reuse them; the metrics before the adjustment are reported under ``posthoc.before``.
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
    metrics: dict[str, Any] = {
        "val": dict(model.val_results),
        "best_checkpoint": best,
        "epochs_trained": trainer.current_epoch,
        "dataset": datamodule.info.to_dict(),
    }
    if model.posthoc_steps:
        before = {"val": dict(model.val_results)}
        untuned = model.posthoc_adjustment()
        logits, targets = model.take_val_outputs()
        metrics["posthoc"] = {**model.fit_posthoc(logits, targets), "before": before}
        if best:
            trainer.save_checkpoint(best)
        trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        metrics["val"] = dict(model.val_results)
        if (out_of_fold := metrics["posthoc"].get("val_bal_acc_out_of_fold")) is not None:
            metrics["val"]["bal_acc_out_of_fold"] = out_of_fold  # what selection reads
    if test:
        trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        metrics["test"] = dict(model.test_results)
        if model.posthoc_steps:  # the same pass's logits, untuned: one test pass, not two
            metrics["posthoc"]["before"]["test"] = model.rescore_test(untuned)
    metrics["best_checkpoint"] = publish_best_checkpoint(trainer, best)
    return metrics


def publish_best_checkpoint(trainer: L.Trainer, path: str | None) -> str | None:
    """Give the best checkpoint its final name, ``best.ckpt``, once it has been tested.

    While training it is ``best_so_far.ckpt`` (configs/callbacks/default.yaml), so a run that
    fails (a NaN loss in epoch 5) or is killed never leaves a ``best.ckpt`` that looks like a
    finished run's result; resume reads ``last.ckpt``, whose callback state names the
    in-progress file. Rank zero renames, after every rank has tested.
    """
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    if not path or not dirpath or Path(path).parent != Path(dirpath):
        return path  # e.g. the best of another run this one resumed from: not ours to rename
    final = Path(path).with_name(BEST_CHECKPOINT)
    if final != Path(path) and trainer.is_global_zero:
        os.replace(path, final)
    return str(final)


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

