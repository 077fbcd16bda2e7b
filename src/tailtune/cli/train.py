"""tailtune-train: compose the config, fit, test the best checkpoint, write metrics.json."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from tailtune.cli.config import (
    CONFIG_PATH,
    check_train_config,
    ddp_relaunch_as_single_run,
    readable_config_errors,
    readable_errors,
    register_resolvers,
    resume_override,
    save_hydra_files,
)

register_resolvers()


def note_disabled_figures(cfg: DictConfig, choices: dict[str, str]) -> None:
    """Say so when figures (confusion matrices) are off, e.g. under debug=smoke."""
    import logging

    if (cfg.get("model") or {}).get("log_figures", True) is False:
        by = f", set by debug={choices['debug']}" if choices.get("debug") else ""
        logging.getLogger("tailtune").info(
            "figures off (model.log_figures=false%s): no confusion matrices in TensorBoard", by)


def train(cfg: DictConfig, choices: dict[str, str] | None = None,
          overrides: list[str] | None = None) -> float:
    """Fit and test one run; returns ``cfg.optimized_metric`` for sweepers."""
    check_train_config(cfg, choices)  # before torch is imported: bad input fails in a second
    from tailtune import console as output
    from tailtune.build import checkpoints, ensemble, models, results, trainer
    from tailtune.build.config import (
        config_summary,
        config_yaml,
        model_class,
        run_name,
    )
    from tailtune.run_record import (
        RunRecord,
        finished_metrics,
        refuse_other_config,
        selection_value,
    )

    output.setup()
    console = output.CONSOLE
    run_dir = Path(cfg.paths.output_dir)
    done = finished_metrics(run_dir)
    if done is not None:  # a finished run is never overwritten
        if cfg.get("resume") != "auto":
            raise FileExistsError(f"{run_dir} already holds a finished run; pass resume=auto "
                                  "to skip it, or choose another hydra.run.dir")
        # Its result is this config's only if it ran this config.
        refuse_other_config(run_dir, config_yaml(cfg), finished=True)
        console.print(output.marked(f"[yellow]skipping finished run[/] {run_dir}"), soft_wrap=True)
        return selection_value(done, cfg.optimized_metric)

    refuse_other_config(run_dir, config_yaml(cfg))
    record = RunRecord(run_dir, rank_zero=trainer.is_rank_zero())
    record.start({"entry": "train", "choices": choices or {}, "overrides": overrides or []})
    try:
        if record.rank_zero:
            save_hydra_files(cfg, run_dir)
        trainer.reset_process_state(cfg)  # joblib reuses worker processes between jobs
        record.save_config(config_yaml(cfg))
        if record.rank_zero:  # once, not once per DDP rank
            with console:  # one write, whole beside another sweep job's output
                for item in config_summary(cfg, choices or {}, overrides or [],
                                           run_dir / "config.yaml"):
                    if isinstance(item, str):
                        console.print(output.marked(item), soft_wrap=True, markup=False)
                    else:
                        console.print(item)
            note_disabled_figures(cfg, choices or {})

        if model_class(cfg).is_ensemble:  # members, then a combiner fitted on val
            metrics = ensemble.fit_ensemble(cfg, run_dir, choices or {}, overrides or [])
        else:
            datamodule, model = models.build_experiment(cfg)
            if record.rank_zero:
                datamodule.print_summary(console)
            fitter = trainer.build_trainer(
                cfg, run_dir, trainer.training_callbacks(cfg, datamodule),
                trainer.build_loggers(cfg, run_name=run_name(overrides)), model=model)
            trainer.log_hyperparameters(fitter.loggers,
                                        trainer.hyperparameters(cfg, choices or {}))

            resume_from = trainer.resume_checkpoint(cfg.get("ckpt_path"), run_dir,
                                                    auto=cfg.get("resume") == "auto")
            if resume_from:  # another dataset's or split's checkpoint would resume silently
                checkpoints.check_same_split(
                    checkpoints.dataset_info(checkpoints.read_checkpoint(resume_from)),
                    datamodule.info, "the checkpoint to resume")
                record.resumed_from = str(resume_from)
            ddp_relaunch_as_single_run(str(run_dir))
            fitter.fit(model, datamodule=datamodule, ckpt_path=resume_from)
            metrics = results.final_metrics(fitter, model, datamodule,
                                            test=cfg.get("test", True))
            metrics["overrides"] = overrides or []
            results.write_test_artifacts(model, run_dir)
            trainer.log_final_metrics(fitter.loggers, metrics, fitter.global_step)
            metrics["best_checkpoint"] = results.publish_best_checkpoint(
                fitter, metrics["best_checkpoint"])
        metrics["seed"] = cfg.get("seed")  # tailtune-compare pairs and de-duplicates by it
        record.finish(metrics)
    except BaseException as err:
        if record.rank_zero:
            results.withdraw_best_checkpoint(run_dir)
        record.fail(err)
        output.print_failure(run_dir, err, resume_with=resume_override(run_dir))
        if isinstance(err, SystemExit) and not err.code:  # Lightning's SIGTERM exit is code 0
            raise SystemExit(143) from err
        raise
    if record.rank_zero:
        results.remove_resume_leftovers(run_dir)
    output.print_results(metrics, run_dir)
    return selection_value(metrics, cfg.optimized_metric)


@readable_config_errors
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@readable_errors
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from tailtune.console import capture_warnings

    capture_warnings()
    hydra_cfg = HydraConfig.get()
    return train(cfg, dict(hydra_cfg.runtime.choices), list(hydra_cfg.overrides.task))


if __name__ == "__main__":
    main()
