"""What every tailtune classifier shares: loss, epoch metrics, logging, checkpoint contract."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from tailtune.data.info import DatasetInfo
from tailtune.metrics import ImbalancedClassificationMetrics, confusion_figure


class ClassifierModule(L.LightningModule):
    """Base class: subclasses implement ``forward(images) -> logits`` and the optimizer.

    ``images`` are unnormalised ``[0, 1]`` tensors; each model resizes and normalises them
    itself, so checkpoints carry their own preprocessing.
    """

    def __init__(
        self,
        info: DatasetInfo,
        loss: nn.Module,
        logit_adjust_tau: float = 0.0,
        many_threshold: int = 100,
        few_threshold: int = 20,
        confusion_every_n_epochs: int = 5,
        log_figures: bool = True,
    ) -> None:
        super().__init__()
        self.info = info
        self.criterion = loss
        self.logit_adjust_tau = logit_adjust_tau
        self.confusion_every_n_epochs = confusion_every_n_epochs
        self.log_figures = log_figures
        counts = torch.tensor(info.class_counts, dtype=torch.float32).clamp_min(1.0)
        self.register_buffer("log_prior", (counts / counts.sum()).log(), persistent=False)
        self.val_metrics = self._metrics(many_threshold, few_threshold)
        self.test_metrics = self._metrics(many_threshold, few_threshold)
        self.val_results: dict[str, float] = {}
        self.test_results: dict[str, float] = {}
        self.test_confusion: Tensor | None = None

    def _metrics(self, many: int, few: int) -> ImbalancedClassificationMetrics:
        return ImbalancedClassificationMetrics(
            class_names=list(self.info.class_names), train_counts=list(self.info.class_counts),
            many_threshold=many, few_threshold=few,
        )

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    # -- inference ------------------------------------------------------------------------
    def eval_logits(self, images: Tensor) -> Tensor:
        """Logits as reported at val/test time: with post-hoc logit adjustment if set."""
        logits = self(images)
        if self.logit_adjust_tau:
            logits = logits - self.logit_adjust_tau * self.log_prior.to(logits.dtype)
        return logits

    @torch.no_grad()
    def predict_images(self, images: Tensor) -> Tensor:
        """Class probabilities for a batch of ``[0, 1]`` images of any size."""
        return self.eval_logits(images.to(self.device)).float().softmax(dim=1)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.predict_images(images)

    # -- training -------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        # Schedules (e.g. deferred re-weighting) derive from the epoch, so resume is exact.
        if hasattr(self.criterion, "set_epoch"):
            self.criterion.set_epoch(self.current_epoch)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        logits = self(images)
        loss = self.criterion(logits, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at epoch {self.current_epoch}, batch {batch_idx}; "
                "lower model.lr or check the data"
            )
        acc = (logits.argmax(dim=1) == targets).float().mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=len(targets))
        self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=len(targets))
        return loss

    # -- evaluation -----------------------------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, targets = batch
        logits = self.eval_logits(images)
        self.log("val/loss", self.criterion(logits, targets), on_epoch=True,
                 batch_size=len(targets), sync_dist=True)
        self.val_metrics.update(logits.float(), targets)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, targets = batch
        self.test_metrics.update(self.eval_logits(images).float(), targets)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # sanity batches must not leak into epoch 0
            self.val_metrics.reset()
            return
        values = self.val_results = self.val_metrics.compute()
        self.log_dict({f"val/{k}": v for k, v in values.items() if k != "bal_acc"})
        self.log("val/bal_acc", values["bal_acc"], prog_bar=True)
        every = self.confusion_every_n_epochs
        if every and (self.current_epoch + 1) % every == 0:
            self._log_confusion("val", self.val_metrics.confusion_matrix())
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        self.test_results = self.test_metrics.compute()
        self.test_confusion = self.test_metrics.confusion_matrix().cpu()
        self.log_dict({f"test/{k}": v for k, v in self.test_results.items()})
        self._log_confusion("test", self.test_confusion)
        self.test_metrics.reset()

    def _log_confusion(self, stage: str, matrix: Tensor) -> None:
        if not self.log_figures or self.trainer.global_rank != 0:
            return
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                figure = confusion_figure(matrix.cpu(), self.info.class_names)
                logger.experiment.add_figure(f"{stage}/confusion", figure, self.current_epoch)

    # -- checkpoint contract --------------------------------------------------------------
    def checkpoint_metadata(self) -> dict[str, Any]:
        """Plain data describing the model; subclasses add what they own."""
        return {"dataset_info": self.info.to_dict(), "logit_adjust_tau": self.logit_adjust_tau}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault("tailtune", {}).update(self.checkpoint_metadata())
