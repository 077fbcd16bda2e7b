"""tailtune-eval ckpt_path=PATH: rebuild a checkpoint's data split and model, then test it."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from tailtune.cli.config import (
    CONFIG_PATH,
    check_config,
    readable_config_errors,
    readable_errors,
    register_resolvers,
    save_hydra_files,
)

register_resolvers()


def evaluate(cfg: DictConfig) -> dict:
    """Test a checkpoint on the split it was trained with; writes its own metrics.json."""
    check_config(cfg, entry="eval")  # before torch is imported: bad input fails in a second
    from tailtune import console
    from tailtune.build import checkpoints, data, models, results, trainer
    from tailtune.build.config import eval_data_config
    from tailtune.run_record import RunRecord

    console.setup()
    trainer.configure_process(cfg)
    if (cfg.get("model") or {}).get("_target_"):  # model=ensemble model.checkpoints=[...]
        return evaluate_ensemble(cfg)
    checkpoint = checkpoints.read_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(checkpoint["tailtune"]["config"])
    run_cfg.paths = cfg.paths  # this eval's own dirs, not the training run's
    run_cfg.data = eval_data_config(run_cfg.data, cfg.get("data"))
    run_dir = Path(cfg.paths.output_dir)
    record = RunRecord(run_dir, rank_zero=trainer.is_rank_zero())  # DDP: rank zero writes
    record.start({"entry": "eval", "ckpt_path": str(cfg.ckpt_path)}, own_dir=True)
    try:
        if record.rank_zero:
            save_hydra_files(cfg, run_dir)
        datamodule = data.build_datamodule(run_cfg)
        checkpoints.check_same_split(checkpoints.dataset_info(checkpoint), datamodule.info)
        model = models.model_from_checkpoint(checkpoint)
        # Saved in epoch N (counted from 1, as the epoch lines count): at its end, or during
        # it (interrupted.ckpt, a mid-epoch validation); the step tells them apart.
        epoch, step = checkpoint.get("epoch"), checkpoint.get("global_step")
        saved = "" if epoch is None else f", saved in epoch {epoch + 1} at step {step}"
        logging.getLogger("tailtune").info(
            "scoring %s (%s%s) on the %s split of %s: %d images", cfg.ckpt_path,
            type(model).__name__, saved, cfg.split, datamodule.info.name,
            len(datamodule.datasets[cfg.split]))
        tester = trainer.build_trainer(cfg, run_dir, whole_splits=True)  # reported: whole
        if cfg.split == "val":
            tester.validate(model, datamodule=datamodule, verbose=False)
            metrics = {"val": dict(model.val_results)}
        else:
            tester.test(model, datamodule=datamodule, verbose=False)
            metrics = {"test": dict(model.test_results)}
            results.write_test_artifacts(model, run_dir)
    except BaseException as err:
        record.fail(err)
        console.print_failure(run_dir, err)
        raise
    metrics.update({"ckpt_path": str(cfg.ckpt_path), "dataset": datamodule.info.to_dict()})
    record.finish(metrics)
    console.print_results(metrics, run_dir, title=f"{cfg.split} metrics")
    return metrics


def evaluate_ensemble(cfg: DictConfig) -> dict:
    """Assemble an ensemble from trained runs' checkpoints (no retraining): fit the combiner
    on validation, report test; writes metrics.json and the ensemble's own checkpoint."""
    from tailtune import console
    from tailtune.build import ensemble, trainer
    from tailtune.build.config import model_class
    from tailtune.build.results import withdraw_best_checkpoint
    from tailtune.run_record import RunRecord

    if not model_class(cfg).is_ensemble:
        raise ValueError("tailtune-eval builds only model=ensemble (from model.checkpoints); "
                         "evaluate a single model with ckpt_path=PATH")
    run_dir = Path(cfg.paths.output_dir)
    record = RunRecord(run_dir, rank_zero=trainer.is_rank_zero())  # DDP: rank zero writes
    record.start({"entry": "eval_ensemble",
                  "checkpoints": [str(c) for c in cfg.model.get("checkpoints") or []]},
                 own_dir=True)
    try:
        if record.rank_zero:
            save_hydra_files(cfg, run_dir)
        results = ensemble.assemble_from_checkpoints(cfg, run_dir)
        record.finish(results)
    except BaseException as err:
        if record.rank_zero:
            withdraw_best_checkpoint(run_dir)
        record.fail(err)
        console.print_failure(run_dir, err)
        raise
    console.print_results(results, run_dir, title="ensemble of "
                          f"{len(results.get('members', {}))} checkpoints")
    return results


@readable_config_errors
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
@readable_errors
def main(cfg: DictConfig) -> None:
    from tailtune.console import capture_warnings

    capture_warnings()
    evaluate(cfg)


if __name__ == "__main__":
    main()
