"""An ensemble of classifiers, each with its own backbone, preprocessing and head.

Members are :class:`ClassifierModule` s (fine-tunes or linear probes). Each brings its own
:class:`~tailtune.backbones.Preprocess`, so one batch of raw ``[0, 1]`` images feeds members
of different resolutions and normalisations. ``forward(images)`` combines the members'
(post-hoc adjusted) logits with a :mod:`~tailtune.models.combiners` combiner; the base
class's post-hoc logit adjustment then applies to the combined scores.

Training: the pipeline either fits members one after another with their own Trainer and
sampler (``model.training=sequential``: bagging, boosting, feature-cached probes), or fits
this module directly (``joint``): every step sums the members' own losses on the same batch,
and each member keeps its own optimizer and lr schedule (manual optimisation).

Checkpoints hold the members' weights (``members.<i>.*``; probes leave their frozen backbone
out, as alone), each member's metadata, and the combiner's fitted state as plain data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tailtune.data.info import DatasetInfo
from tailtune.models.base import ClassifierModule
from tailtune.models.combiners import Combiner, MeanProb

TRAINING_MODES = ("sequential", "joint")


class EnsembleModule(ClassifierModule):
    """Members plus a combiner (see the module docstring)."""

    def __init__(
        self,
        members: Sequence[ClassifierModule],
        member_names: Sequence[str],
        info: DatasetInfo,
        loss: nn.Module,
        combiner: Combiner | None = None,
        training: str = "sequential",
        unfreeze_at: int | None = None,
        **base_kwargs: Any,
    ) -> None:
        del unfreeze_at  # presets written for fine-tuning (debug=smoke) set it; members own it
        super().__init__(info=info, loss=loss, **base_kwargs)
        if not members:
            raise ValueError("model.members is empty: an ensemble needs at least one member")
        if len(member_names) != len(members) or len(set(member_names)) != len(member_names):
            raise ValueError(f"need one unique name per member, got {list(member_names)}")
        if training not in TRAINING_MODES:
            raise ValueError(f"unknown model.training '{training}'; valid: "
                             f"{', '.join(TRAINING_MODES)}")
        for name, member in zip(member_names, members, strict=True):
            if tuple(member.class_names) != tuple(info.class_names):
                raise ValueError(f"member {name} was built for other classes")
        self.members = nn.ModuleList(members)
        self.member_names = list(member_names)
        self.combiner = combiner or MeanProb()
        self.combiner_fitted = not self.combiner.needs_validation
        self.training_mode = training
        # Joint: one optimizer per member, stepped together.
        self.automatic_optimization = training != "joint"
        self.log_prior.copy_(self.members_log_prior())

    def members_log_prior(self) -> Tensor:
        """The prior the combined scores were trained under: the members' trained priors,
        averaged in log space (exact for ``mean_logit``, and when members agree)."""
        stacked = torch.stack([m.log_prior.detach().float().cpu() for m in self.members])
        return stacked.mean(dim=0).log_softmax(dim=0)

    # -- inference ------------------------------------------------------------------------
    def member_logits(self, images: Tensor) -> list[Tensor]:
        """Each member's val/test-time logits (with its own post-hoc adjustment)."""
        return [member.eval_logits(images) for member in self.members]

    def combine(self, logits_per_member: Sequence[Tensor]) -> Tensor:
        # Before a validation-fitted combiner is fitted (joint training's epochs), validate
        # with the soft vote.
        combiner = self.combiner if self.combiner_fitted else MeanProb()
        return combiner.combine(logits_per_member)

    def forward(self, images: Tensor) -> Tensor:
        return self.combine(self.member_logits(images))

    def fit_combiner(self, val_logits: Sequence[Tensor], val_targets: Tensor) -> Tensor:
        """Fit the combiner on validation predictions; returns its validation scores
        (cross-fitted for stacking)."""
        self.combiner.fit(val_logits, val_targets)
        self.combiner_fitted = True
        return self.combiner.combine_val(val_logits)

    # -- joint training -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Lightning attaches the trainer to direct LightningModule children only; members
        # sit in a ModuleList and need it for their epoch-based schedules.
        for member in self.members:
            member.trainer = self.trainer

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        for member in self.members:
            member.on_train_epoch_start()
        self.log_prior.copy_(self.members_log_prior().to(self.log_prior))

    def on_fit_start(self) -> None:
        for member in self.members:
            member.on_fit_start()

    def configure_optimizers(self) -> list[dict[str, Any]]:
        return [member.configure_optimizers() for member in self.members]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if self.automatic_optimization:
            raise RuntimeError("a sequential ensemble's members are trained one by one by "
                               "the pipeline, not through the ensemble")
        images, targets = batch
        losses = [member.criterion(member(images), targets) for member in self.members]
        total = torch.stack(losses).sum()
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at epoch {self.current_epoch}, "
                                     f"batch {batch_idx}; lower the members' lr")
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(total)
        for optimizer in optimizers:
            optimizer.step()
        schedulers = self.lr_schedulers() or []
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()
        n = len(targets)
        self.log("train/loss", total, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        for name, loss in zip(self.member_names, losses, strict=True):
            self.log(f"member/{name}/train/loss", loss, on_step=False, on_epoch=True,
                     batch_size=n)
        return total

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint_metadata(self) -> dict[str, Any]:
        meta = super().checkpoint_metadata()
        members = []
        for name, member in zip(self.member_names, self.members, strict=True):
            members.append({"name": name, **member.checkpoint_metadata()})
        meta.update({
            "model": "ensemble",
            "members": members,
            "combiner": {**self.combiner.state(), "fitted": self.combiner_fitted},
            # What `tailtune.load` and predict read: each member resizes for itself.
            "preprocess": {"per_member": [m.get("preprocess") for m in members]},
        })
        return meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("tailtune", {})
        state = meta.get("combiner")
        if state:
            self.combiner.load_state(state)
            self.combiner_fitted = bool(state.get("fitted", True))
        for member, member_meta in zip(self.members, meta.get("members", []), strict=False):
            member.on_load_checkpoint({"tailtune": member_meta})  # e.g. backbone hash checks
