"""Which stream gets what: progress bars on stderr for every entry point (stdout keeps the
results only), a sweep's dir printed once, each warning once per process, no v_num on the
bar, and no raw matplotlib warning from tailtune-compare's plots."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from helpers import compose_config, run_cli
from tailtune import console
from tailtune.callbacks import ProgressBar
from tailtune.cli.evaluate import evaluate
from tailtune.cli.train import train

BAR = ("Testing", "Validation", "it/s")  # what a rich progress bar of Lightning's shows


def test_eval_and_ensemble_eval_draw_their_progress_bars_on_stderr(smoke_cfg, tmp_path, capfd,
                                                                   monkeypatch):
    import rich.console

    # As on a terminal: elsewhere the bar is off (a file would get only its last frame).
    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    cfg, choices = smoke_cfg()
    train(cfg, choices)
    best = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    bars = ["trainer.enable_progress_bar=true"]  # debug=smoke turns them off
    capfd.readouterr()
    evaluate(compose_config("eval", [f"ckpt_path={best}", "debug=smoke", *bars],
                            tmp_path / "ev")[0])
    out, err = capfd.readouterr()
    assert "Testing" in err  # the bar is drawn, on stderr
    assert not [word for word in BAR if word in out], out
    assert out.strip().splitlines()[-1] == f"run dir: {tmp_path / 'ev'}"

    evaluate(compose_config("eval", ["model=ensemble", f"model.checkpoints=[{best},{best}]",
                                     "debug=smoke", *bars], tmp_path / "ens")[0])
    out, err = capfd.readouterr()
    assert "Validation" in err and "Testing" in err
    assert not [word for word in BAR if word in out], out
    assert out.strip().splitlines()[-1] == f"run dir: {tmp_path / 'ens'}"


def test_the_progress_bar_shows_no_logger_version(tmp_path):
    """``experiment=quick``'s bar showed ``v_num: uick``: the TensorBoard version, cut off."""
    logger = TensorBoardLogger(str(tmp_path), version="experiment=quick")
    trainer = L.Trainer(logger=logger, callbacks=[ProgressBar()], default_root_dir=tmp_path)
    model = L.LightningModule()
    assert "v_num" in RichProgressBar().get_metrics(trainer, model)  # what Lightning shows
    assert "v_num" not in trainer.progress_bar_callback.get_metrics(trainer, model)
    assert trainer.progress_bar_callback._console_kwargs["stderr"] is True


def test_a_trainer_without_a_configured_bar_gets_tailtunes(tmp_path):
    from tailtune.build.trainer import build_trainer

    cfg, _ = compose_config("eval", ["ckpt_path=x"], tmp_path / "ev")
    assert "callbacks" not in cfg and cfg.trainer.enable_progress_bar
    assert isinstance(build_trainer(cfg, tmp_path, loggers=[]).progress_bar_callback,
                      ProgressBar)
    cfg, _ = compose_config("eval", ["ckpt_path=x", "debug=smoke"], tmp_path / "ev")
    assert build_trainer(cfg, tmp_path, loggers=[]).progress_bar_callback is None


def test_a_warning_prints_once_per_process_across_a_sweeps_handlers(capsys):
    """Hydra gives each job of a sweep a new handler; the warning still prints once."""
    record = logging.LogRecord("py.warnings", logging.WARNING, __file__, 1,
                               "PossibleUserWarning: a test warning %s", ("only once",), None)
    for _ in range(3):  # three jobs in one process
        handler = console.ConsoleHandler()
        handler.handle(record)
    err = capsys.readouterr().err
    assert err.count("warning: PossibleUserWarning: a test warning only once") == 1


def test_a_sweep_prints_its_dir_once_on_stderr(tmp_path):
    # The first job finds its (existing) data folder empty: the sweep starts, nothing trains.
    (tmp_path / "empty").mkdir()
    result = run_cli("tailtune-train", "-m", "debug=smoke", "data=image_folder",
                     f"data.root={tmp_path / 'empty'}", "seed=1,2", cwd=tmp_path)
    assert result.returncode == 2
    (sweep_dir,) = (tmp_path / "logs" / "multiruns").iterdir()
    assert result.stderr.count("sweep dir:") == 1
    assert f"sweep dir: {sweep_dir}\n" in result.stderr
    assert "sweep dir" not in result.stdout
    assert [p.parent for p in sweep_dir.iterdir() if p.is_dir()] == [sweep_dir]  # job 0's


def test_a_joblib_sweep_names_its_dir_once_through_hydra(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("tailtune-train", "-m", "launcher=joblib", "debug=smoke",
                     "data=image_folder", f"data.root={tmp_path / 'empty'}", "seed=1,2",
                     cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("sweep output dir") == 1 and "sweep dir:" not in result.stderr


def test_plots_of_long_config_names_raise_no_layout_warning(tmp_path):
    from tailtune.report import plots
    from tailtune.report.compare import ConfigSummary
    from tailtune.report.runs import Run

    run = Run(Path("r"), "done")
    long = tuple(f"model.some_long_override_{i}=value_{i}_abcdefghij" for i in range(6))
    summaries = [ConfigSummary(long, [run], mean={"bal_acc": 0.5, "few_acc": 0.3,
                                                  "recall/0": 0.4}, ci=(0.4, 0.6)),
                 ConfigSummary(("a=1",), [run], mean={"bal_acc": 0.6, "few_acc": 0.2,
                                                      "recall/0": 0.7})]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for plot in (plots.balanced_accuracy_plot, plots.recall_heatmap, plots.shot_bars):
            assert plot(summaries, tmp_path / f"{plot.__name__}.png").stat().st_size > 0
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]


def test_debug_overfit_prints_no_warning_about_what_it_asked_for(tmp_path):
    """overfit_batches swaps in a sequential sampler and turns shuffling off on purpose:
    neither tailtune's sampler check nor Lightning's shuffling notice is a warning there."""
    cfg, choices = compose_config("train", ["debug=overfit", "trainer.max_epochs=2",
                                            "trainer.overfit_batches=2", "data.batch_size=8"],
                                  tmp_path / "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, choices)
    shown = [str(w.message) for w in caught if not console.is_noise(str(w.message))]
    assert not [m for m in shown if "not the configured" in m or "logging interval" in m
                or "requested to overfit" in m], shown


def test_off_a_terminal_the_bar_is_off_and_each_epoch_is_one_log_line(smoke_cfg, capfd,
                                                                      caplog):
    """A cluster job's log file got a bar's last frame (wrapped over three lines) and nothing
    while it trained; it now gets a line per epoch. An epoch that did not
    validate shows no validation metric (the bar's last value would be an older epoch's)."""
    cfg, choices = smoke_cfg("trainer.enable_progress_bar=true", "trainer.max_epochs=3",
                             "+trainer.check_val_every_n_epoch=2")
    with caplog.at_level(logging.INFO, logger="tailtune"):
        train(cfg, choices)
    err = capfd.readouterr().err
    assert not [word for word in BAR if word in err], err
    lines = [line for line in caplog.messages if line.startswith("epoch ")]
    assert [line.split(" (")[0].split(":")[0] for line in lines] == [
        "epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert "val/" not in lines[0] and "val/" not in lines[2]
    assert lines[1].startswith("epoch 2/3: train/loss ") and ", val/bal_acc 0." in lines[1]


def test_live_displays_need_a_terminal_and_a_process_of_their_own(monkeypatch):
    import multiprocessing

    import rich.console

    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    assert console.draws_live()
    # A joblib sweep's job: a pool worker, beside others on the same terminal.
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    assert not console.draws_live()
    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: False))
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: None)
    assert not console.draws_live()


def test_an_epoch_resumed_midway_is_timed_from_the_resume(caplog):
    """Lightning resumes an interrupted epoch without on_train_epoch_start: its line gave the
    machine's uptime as the epoch's time."""
    from types import SimpleNamespace

    from tailtune.callbacks import EpochLog

    trainer = SimpleNamespace(is_global_zero=True, current_epoch=1, max_epochs=4,
                              sanity_checking=False, progress_bar_metrics={"train/loss": 0.5})
    log = EpochLog()
    with caplog.at_level(logging.INFO, logger="tailtune"):
        log.on_train_start(trainer, None)
        log.on_train_epoch_end(trainer, None)
    (line,) = caplog.messages
    assert line.startswith("epoch 2/4: train/loss 0.5000 (")
    assert float(line.split("(")[1].split()[0]) < 5  # seconds
