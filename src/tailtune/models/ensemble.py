"""An ensemble of classifiers, each with its own backbone, preprocessing and head.

Members are :class:`ClassifierModule` s (fine-tunes or linear probes). Each brings its own
:class:`~tailtune.backbones.Preprocess`, so one batch of raw ``[0, 1]`` images feeds members
of different resolutions and normalisations. ``forward(images)`` combines the members'
(post-hoc adjusted) logits with a :mod:`~tailtune.models.combiners` combiner; the base
class's post-hoc logit adjustment then applies to the combined scores.

Training: the build layer either fits members one after another with their own Trainer and
sampler (``model.training=sequential``: bagging, boosting, feature-cached probes), or fits
this module directly (``joint``): every step sums the members' own losses on the same batch,
and each member keeps its own optimizer and lr schedule (manual optimisation).

Assessment (:meth:`EnsembleModule.start_assessment`): through the Trainer's own
``validate`` and ``test``, as for single models. The validation pass keeps every member's
logits of the whole split and, at its end, fits the combiner (cross-fitted for stacking) and
the post-hoc steps on them; the test pass combines the members' test logits with it. Both
report every member next to the ensemble (:meth:`EnsembleModule.finish_assessment`).

Checkpoints hold the members' weights (``members.<i>.*``; probes leave their frozen backbone
out, as alone), each member's metadata, and the combiner's fitted state as plain data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from tailtune.data.info import DatasetInfo
from tailtune.models.base import ClassifierModule
from tailtune.models.combiners import Combiner, MeanProb

log = logging.getLogger(__name__)

TRAINING_MODES = ("sequential", "joint")
SPLITS = ("val", "test")


class EnsembleModule(ClassifierModule):
    """Members plus a combiner (see the module docstring)."""

    kind = "ensemble"
    is_ensemble = True
    # Per-member scalars logged next to the ensemble's (plus recall/<class>).
    REPORTED: ClassVar[tuple[str, ...]] = ("acc", "bal_acc", "macro_f1")

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
        self._warn_smoothed_members()
        # Per split, each batch's member logits and targets while assessing (else None).
        self._assessing: dict[str, list[tuple[list[Tensor], Tensor]]] | None = None
        self._report: dict[str, Any] = {}
        self._before_posthoc: tuple[Tensor, Tensor, Tensor] | None = None

    def members_log_prior(self) -> Tensor:
        """The prior left in the combined scores: what each member's own post-hoc step
        ``(z - tau log prior + b) / T`` leaves of its trained prior, averaged in log space
        with the combiner's member weights (exact for ``mean_logit``, and when members agree;
        a member weighted 0 leaves none of its prior). Taking the members' trained priors
        instead would remove a prior that a member with ``tau`` or ``b`` already removed.
        Uniform once a combiner fitted for balanced classes (stacking) has removed it."""
        if self.combiner_fitted and self.combiner.balances_prior:
            return torch.zeros(self.info.num_classes).log_softmax(dim=0)
        stacked = torch.stack([
            m.shift_and_scale(m.log_prior.detach().float(), m.posthoc_adjustment()).cpu()
            for m in self.members])
        weights = self.combiner.member_weights(len(self.members)).to(stacked)
        return (weights[:, None] * stacked).sum(dim=0).log_softmax(dim=0)

    @property
    def has_smoothing_floor(self) -> bool:
        # Combined scores are no smoothed model's softmax: each member takes its own floor off
        # (where its tau is not 0); the ensemble's own loss says nothing about the members'.
        return False

    def _warn_smoothed_members(self) -> None:
        if float(self.posthoc_tau) == 0.0 and "logit_adjust" not in self.posthoc:
            return
        smoothed = [name for name, m in zip(self.member_names, self.members, strict=True)
                    if m.has_smoothing_floor and float(m.posthoc_tau) == 0.0]
        if smoothed:
            log.warning("members %s were trained with label smoothing and adjust no prior "
                        "themselves: the ensemble's logit adjustment divides their smoothing "
                        "floor by the prior, which favours rare classes; give the members "
                        "model.logit_adjust_tau=1 instead", ", ".join(smoothed))

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
        self.log_prior.copy_(self.members_log_prior().to(self.log_prior))
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
                               "the build layer, not through the ensemble")
        images, targets = batch
        # Each member's own training loss: a member that mixes batches (model.mix) mixes here too.
        losses = [member.training_loss(images, targets)[1] for member in self.members]
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

    # -- assessment: the combiner fitted on the whole validation split ----------------------
    def start_assessment(self) -> None:
        """Make the next validation pass fit the combiner (if it is fitted) and the post-hoc
        steps on the members' logits of the whole split, and the next test pass combine the
        members' test logits with them; both passes report every member too. Logits are
        kept per member and combined at the end of each pass: a cross-fitted combiner
        (stacking) scores validation rows with models that never saw them."""
        self._assessing = {split: [] for split in SPLITS}
        self._report = {"members": {name: {} for name in self.member_names}}
        self._before_posthoc = None

    def finish_assessment(self) -> dict[str, Any]:
        """The report of the assessment passes: the ensemble's ``val`` and ``test`` metrics
        (and ``posthoc`` with the metrics before it), every member's, the combiner's state and
        the gain over the best member; stops assessing."""
        report = self._report
        self._assessing, self._report = None, {}
        out: dict[str, Any] = {}
        if "posthoc" in report:
            out["posthoc"] = report["posthoc"]
        out.update({"val": dict(self.val_results), "test": dict(self.test_results),
                    "members": report["members"], "combiner": self.combiner.state()})
        # Against the member best on test (a bar no choice could promise) and against the one
        # validation would pick (what choosing one member instead would have given).
        best = max(out["members"].values(), key=lambda m: m["test"]["bal_acc"])
        out["ensemble_minus_best_member_test_bal_acc"] = \
            out["test"]["bal_acc"] - best["test"]["bal_acc"]
        picked = max(out["members"].values(), key=lambda m: m["val"]["bal_acc"])
        out["ensemble_minus_val_picked_member_test_bal_acc"] = \
            out["test"]["bal_acc"] - picked["test"]["bal_acc"]
        return out

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if self._assessing is None:
            return super().validation_step(batch, batch_idx)
        self._keep("val", batch)
        return None

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if self._assessing is None:
            return super().test_step(batch, batch_idx)
        self._keep("test", batch)
        return None

    def _keep(self, split: str, batch: tuple[Tensor, Tensor]) -> None:
        images, targets = batch
        logits = [z.float().cpu() for z in self.member_logits(images)]
        self._assessing[split].append((logits, targets.cpu().long()))

    def _take(self, split: str) -> tuple[list[Tensor], Tensor]:
        """Every member's logits and the targets of the whole split (all DDP ranks)."""
        outputs, self._assessing[split] = self._assessing[split], []
        if self._trainer is not None and self.trainer.world_size > 1:
            import torch.distributed as dist

            shards: list = [None] * self.trainer.world_size
            dist.all_gather_object(shards, outputs)
            outputs = [batch for shard in shards for batch in shard]
        logits = [torch.cat([z[i] for z, _ in outputs]) for i in range(len(self.members))]
        return logits, torch.cat([t for _, t in outputs])

    def _log_split(self, split: str, members: Sequence[Tensor], targets: Tensor) -> None:
        values = {f"{split}/{key}": value for key, value in
                  (self.val_results if split == "val" else self.test_results).items()}
        for name, logits in zip(self.member_names, members, strict=True):
            scores = self._report["members"][name][split] = self.score(logits, targets)
            values.update({f"member/{name}/{split}/{key}": value for key, value in scores.items()
                           if key in self.REPORTED or key.startswith("recall/")})
        self.log_dict(values)

    def on_validation_epoch_end(self) -> None:
        if self._assessing is None:
            return super().on_validation_epoch_end()
        logits, targets = self._take("val")
        if self.combiner.needs_validation:
            raw = self.fit_combiner(logits, targets)
        else:
            self.combiner_fitted = True
            raw = self.combiner.combine_val(logits)
        if self.posthoc_steps:
            self._before_posthoc = self.posthoc_adjustment()
            before = self.score(self.adjust_logits(raw), targets)
            self._report["posthoc"] = {**self.fit_posthoc(raw, targets),
                                       "before": {"val": before}}
        self.val_results = self.score(self.adjust_logits(raw), targets)
        out_of_fold = self._report.get("posthoc", {}).get("val_bal_acc_out_of_fold")
        if out_of_fold is not None:  # what selection reads (tailtune.run_record)
            self.val_results["bal_acc_out_of_fold"] = out_of_fold
        self._log_split("val", logits, targets)
        return None

    def on_test_epoch_end(self) -> None:
        if self._assessing is None:
            return super().on_test_epoch_end()
        logits, targets = self._take("test")
        raw = self.combiner.combine(logits)
        if self._before_posthoc is not None:
            self._report["posthoc"]["before"]["test"] = self.score(
                self.adjust_logits(raw, self._before_posthoc), targets)
        scores = self.adjust_logits(raw)
        self.test_results = self.score(scores, targets)
        probs = scores.softmax(dim=1)
        k = self.info.num_classes
        self.test_confusion = torch.bincount(targets * k + probs.argmax(dim=1),
                                             minlength=k * k).view(k, k)
        self.test_predictions = (targets, probs)
        self._log_split("test", logits, targets)
        return None

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint_metadata(self) -> dict[str, Any]:
        meta = super().checkpoint_metadata()
        members = []
        for name, member in zip(self.member_names, self.members, strict=True):
            members.append({"name": name, **member.checkpoint_metadata()})
        meta.update({
            "model": self.kind,
            "members": members,
            "combiner": {**self.combiner.state(), "fitted": self.combiner_fitted},
            # What `tailtune.load` and predict read: each member resizes for itself.
            "preprocess": {"per_member": [m.get("preprocess") for m in members]},
        })
        return meta

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("tailtune", {})
        super().on_load_checkpoint(checkpoint)
        state = meta.get("combiner")
        if state:
            self.combiner.load_state(state)
            self.combiner_fitted = bool(state.get("fitted", True))
        for member, member_meta in zip(self.members, meta.get("members", []), strict=False):
            member.on_load_checkpoint({"tailtune": member_meta})  # e.g. backbone hash checks
