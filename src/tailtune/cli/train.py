"""tailtune-train: compose the config, fit, test the best checkpoint, write metrics.json."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from tailtune.cli.config import CONFIG_PATH, check_train_config, readable_errors, register_resolvers

register_resolvers()


def train(cfg: DictConfig, choices: dict[str, str] | None = None) -> float:
    """Fit and test one run; returns ``cfg.optimized_metric`` for sweepers."""
    check_train_config(cfg)  # before torch is imported: bad input fails in a second
    from rich.console import Console
    from rich.syntax import Syntax

    from tailtune import pipeline
    from tailtune.run_record import RunRecord

    console = Console(stderr=True)
    run_dir = Path(cfg.paths.output_dir)
    record = RunRecord(run_dir)
    record.start({"choices": choices or {}})
    try:
        pipeline.save_config(cfg, run_dir)
        console.print(Syntax(pipeline.config_yaml(cfg), "yaml", background_color="default"))
        datamodule, model = pipeline.build_experiment(cfg)
        datamodule.print_summary(console)
        trainer = pipeline.build_trainer(
            cfg, run_dir, pipeline.training_callbacks(cfg, datamodule))
        pipeline.log_hyperparameters(trainer, pipeline.hyperparameters(cfg, choices or {}))

        trainer.fit(model, datamodule=datamodule,
                    ckpt_path=pipeline.resume_checkpoint(cfg.get("ckpt_path"), run_dir))
        metrics = pipeline.final_metrics(trainer, model, datamodule, test=cfg.get("test", True))
        pipeline.write_test_artifacts(model, run_dir)
        pipeline.log_final_metrics(trainer, metrics)
    except BaseException as err:
        record.set_status("failed", f"{type(err).__name__}: {str(err).strip()[-300:]}")
        raise
    if trainer.is_global_zero:
        record.finish(metrics)
        console.print(f"[bold green]run dir:[/] {run_dir}")
    return float(metrics["val"].get(cfg.optimized_metric.split("/", 1)[-1], float("nan")))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@readable_errors
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    return train(cfg, dict(HydraConfig.get().runtime.choices))


if __name__ == "__main__":
    main()
