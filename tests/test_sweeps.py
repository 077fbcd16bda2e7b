"""Sweeps as users run them: launchers, job dirs, resume, preemption, comparison, TensorBoard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import CONFIG_DIR, PROBES_ENV, run_cli

pytestmark = pytest.mark.slow
PROBES = PROBES_ENV


def _job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory) -> Path:
    """One 2 x 2 sampler x loss sweep with the basic launcher, shared by several tests."""
    root = tmp_path_factory.mktemp("basic")
    result = run_cli("tailtune-train", "-m", "debug=smoke", "sampler=none,over", "loss=ce,focal",
                     f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "sweep"


def test_each_job_has_its_own_dir_named_by_number_and_override_hash(basic_sweep):
    jobs = _job_dirs(basic_sweep)
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1", "2", "3"]
    assert len({p.name.split("_")[1] for p in jobs}) == 4 and all(len(p.name) == 10 for p in jobs)
    seen = set()
    for job in jobs:
        overrides = _metrics(job)["overrides"]
        assert any(o.startswith("sampler=") for o in overrides)
        seen.add(tuple(sorted(overrides)))
        tb_runs = [p.name for p in (job / "tensorboard").iterdir() if p.is_dir()]
        assert tb_runs == [",".join(overrides)]  # TensorBoard run named by the overrides
        assert (job / ".hydra" / "overrides.yaml").is_file()
    assert len(seen) == 4


def test_rerun_with_resume_auto_skips_finished_jobs_and_never_overwrites(basic_sweep):
    before = {p: (p / "metrics.json").stat().st_mtime_ns for p in _job_dirs(basic_sweep)}
    args = ("tailtune-train", "-m", "debug=smoke", "sampler=none,over", "loss=ce,focal",
            f"hydra.sweep.dir={basic_sweep}")
    # Overrides of how jobs run (threads, the allocator) stay out of the job dirs' hashes:
    # the rerun finds the same dirs, rather than running every job again in new ones.
    result = run_cli(*args, "resume=auto", "threads=1", "keep_freed_memory=false",
                     cwd=basic_sweep.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (result.stdout + result.stderr).count("skipping finished run") == 4
    refused = run_cli(*args, cwd=basic_sweep.parent)
    assert refused.returncode != 0 and "already holds a finished run" in refused.stderr
    assert before == {p: (p / "metrics.json").stat().st_mtime_ns for p in _job_dirs(basic_sweep)}


def test_compare_writes_one_row_per_config_with_table_csv_and_plots(basic_sweep):
    result = run_cli("tailtune-compare", str(basic_sweep), cwd=basic_sweep.parent)
    assert result.returncode == 0, result.stderr
    rows = (basic_sweep / "comparison.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4
    for name in ("comparison.md", "comparison_bal_acc.png", "comparison_recall.png",
                 "comparison_shots.png"):
        assert (basic_sweep / name).stat().st_size > 0
    assert "4 configs, 4 runs" in result.stdout
    assert "| loss=focal,sampler=over | 1 |" in (basic_sweep / "comparison.md").read_text()


def test_joblib_sweep_and_seed_aggregation_match_each_runs_metrics(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("tailtune-train", "-m", "debug=smoke", "launcher=joblib",
                     "hydra.launcher.n_jobs=2", "loss=ce,focal", "seed=1,2,3",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _job_dirs(sweep)
    assert len(jobs) == 6 and all((j / "metrics.json").is_file() for j in jobs)
    run_cfg = (jobs[0] / "config.yaml").read_text()
    assert "threads: 1" in run_cfg  # 2 cores / 2 jobs
    # Two jobs print at once: each of tailtune's lines names its job, as Hydra's launch lines do.
    for number, job in enumerate(jobs):
        assert f"\t#{number} : " in result.stderr
        assert f"#{number} resolved config: {job / 'config.yaml'}\n" in result.stderr
        assert f"#{number} epoch 2/2: train/loss " in result.stderr
        assert f"#{number} run dir: {job}\n" in result.stdout
    stray = [line for line in result.stderr.splitlines() if line.startswith(("epoch", "config:"))]
    assert not stray, stray

    from tailtune.report.compare import strip_common_overrides, summarize
    from tailtune.report.runs import find_runs

    summaries = summarize(find_runs(sweep), n_boot=200)
    strip_common_overrides(summaries)
    assert sorted(s.key for s in summaries) == ["loss=ce", "loss=focal"]
    for summary in summaries:
        values = [_metrics(j)["test"]["bal_acc"] for j in jobs
                  if f"{summary.key}" in _metrics(j)["overrides"]]
        assert summary.n == len(values) == 3
        assert summary.mean["bal_acc"] == pytest.approx(np.mean(values))
        assert summary.std["bal_acc"] == pytest.approx(np.std(values, ddof=1))
        low, high = summary.ci
        assert low <= summary.mean["bal_acc"] <= high


def test_submitit_local_sweep_runs_each_job_in_its_own_process(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("tailtune-train", "-m", "debug=smoke", "launcher=submitit_local",
                     "sampler=none,over", "loss=ce,focal", f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _job_dirs(sweep)
    assert len(jobs) == 4 and all((j / "metrics.json").is_file() for j in jobs)
    pids = {json.loads((j / "run.json").read_text())["pid"] for j in jobs}
    assert len(pids) == 4 and os.getpid() not in pids


def test_ddp_sim_inside_a_multirun_gives_one_dir_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("tailtune-train", "-m", "debug=smoke", "trainer=ddp_sim", "seed=1,2",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _job_dirs(sweep)
    assert len(jobs) == 2 and all((j / "metrics.json").is_file() for j in jobs)
    assert not (tmp_path / "logs" / "runs").exists()  # no stray dir from a re-launched rank
    for job in jobs:
        assert (job / "train_ddp_process_1.log").is_file()  # rank 1 ran inside the job's dir


def test_joblib_with_ddp_is_refused_clearly(tmp_path):
    result = run_cli("tailtune-train", "-m", "debug=smoke", "launcher=joblib", "trainer=ddp_sim",
                     "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode != 0
    assert "DDP cannot run inside the joblib launcher" in result.stderr


def _start(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    script = Path(sys.executable).with_name("tailtune-train")
    args = [str(script), "debug=smoke", "trainer.max_epochs=4", "trainer.limit_train_batches=4",
            f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(args, cwd=run_dir.parent, env={**os.environ, **PROBES, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_epoch(path: Path, epoch: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until `path` holds a checkpoint of at least `epoch`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        try:
            if torch.load(path, weights_only=True)["epoch"] >= epoch:
                return
        except Exception:  # noqa: BLE001 - not written yet, or mid-write
            pass
        time.sleep(0.3)
    raise TimeoutError(path)


def test_sigkill_mid_epoch_then_resume_auto_matches_an_uninterrupted_run(tmp_path):
    slow = ["+callbacks.slow._target_=helpers.probes.SlowDown", "+callbacks.slow.seconds=0.4"]
    whole = _start(tmp_path / "whole")
    assert whole.wait(600) == 0, whole.stdout.read()[-3000:]

    killed_dir = tmp_path / "killed"
    proc = _start(killed_dir, *slow)
    _wait_for_epoch(killed_dir / "checkpoints" / "last.ckpt", 1, proc)
    time.sleep(1.0)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert not (killed_dir / "metrics.json").exists()

    resumed = _start(killed_dir, *slow, "resume=auto", env={"TAILTUNE_PROBES_OFF": "1"})
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    # The console drops Lightning's checkpoint-reload lines; the run's train.log keeps them.
    log = (killed_dir / "train.log").read_text()
    assert f"Restored all states from the checkpoint at {killed_dir / 'checkpoints'}" in log
    a, b = _metrics(tmp_path / "whole"), _metrics(killed_dir)
    assert a["val"] == b["val"] and a["test"] == b["test"]
    # The killed process's time is unknown: no wall_s that would look like the whole run's.
    timings = json.loads((killed_dir / "timings.json").read_text())
    assert "wall_s" not in timings and timings["resumed_from"].endswith("last.ckpt")
    assert "wall_s" in json.loads((tmp_path / "whole" / "timings.json").read_text())


def test_sigterm_saves_a_checkpoint_and_the_restart_resumes(tmp_path):
    run_dir = tmp_path / "run"
    slow = "+callbacks.slow._target_=helpers.probes.SlowDown"
    proc = _start(run_dir, slow)
    _wait_for_epoch(run_dir / "checkpoints" / "last.ckpt", 0, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    assert proc.returncode != 0
    assert ("run failed: stopped by SIGTERM; run dir: "
            f"{run_dir}; to resume it, run the same command with hydra.run.dir={run_dir} "
            "resume=auto") in proc.stdout.read()
    assert (run_dir / "checkpoints" / "interrupted.ckpt").is_file()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    restart = _start(run_dir, slow, "resume=auto", env={"TAILTUNE_PROBES_OFF": "1"})
    output = restart.communicate(timeout=600)[0]
    assert restart.returncode == 0, output[-3000:]
    assert "interrupted.ckpt" in output
    assert _metrics(run_dir)["epochs_trained"] == 4


def test_requeue_signal_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path):
    """SLURM without a cluster: a fake `scontrol` on PATH records the requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    run_dir = tmp_path / "job"
    proc = _start(run_dir, "+callbacks.slow._target_=helpers.probes.SlowDown", env=env)
    _wait_for_epoch(run_dir / "checkpoints" / "last.ckpt", 0, proc)
    proc.send_signal(signal.SIGUSR2)
    proc.wait(120)
    assert calls.read_text().split() == ["requeue", "4242"]
    assert (run_dir / "checkpoints" / "interrupted.ckpt").is_file()
    # SLURM restarts the same command in the same dir, with SLURM_RESTART_COUNT set.
    requeued = _start(run_dir, "+callbacks.slow._target_=helpers.probes.SlowDown",
                      env={**env, "SLURM_RESTART_COUNT": "1", "TAILTUNE_PROBES_OFF": "1"})
    output = requeued.communicate(timeout=600)[0]
    assert requeued.returncode == 0, output[-3000:]
    assert "interrupted.ckpt" in output and _metrics(run_dir)["epochs_trained"] == 4


def test_submitit_slurm_config_renders_a_valid_sbatch_script(tmp_path, monkeypatch):
    """Rendered through submitit's executor directly: Hydra's launcher would wait on sacct."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun here
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", ["launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                                "hydra.launcher.gpus_per_node=4"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params["_target_"].endswith("SlurmLauncher")
    params.pop("_target_")
    folder = params.pop("submitit_folder")
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if v is not None})
    text = executor._executor._make_submission_file_text("python -m tailtune", "uid")
    assert folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"  # each sweep keeps its own logs
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --ntasks-per-node=4", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --signal=USR2@120", "#SBATCH --time=240"):
        assert line in text, line
    assert cfg.requeue_signal == "SIGUSR2"  # the run listens for the signal sbatch sends


def test_tensorboard_server_shows_every_run_with_hparams_and_final_metrics(basic_sweep):
    from urllib.request import Request, urlopen

    port = 16000 + os.getpid() % 1000
    tensorboard = Path(sys.executable).with_name("tensorboard")
    server = subprocess.Popen([str(tensorboard), "--logdir", str(basic_sweep), "--host",
                               "127.0.0.1", "--port", str(port), "--load_fast=false"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline, runs = time.time() + 90, []
        while time.time() < deadline:
            try:
                runs = json.loads(urlopen(f"{base}/data/runs", timeout=5).read())
                if len([r for r in runs if "sampler=" in r]) >= 4:
                    break
            except OSError:
                pass
            time.sleep(1)
        runs = [r for r in runs if "sampler=" in r]
        assert len(runs) == 4, runs
        tags = json.loads(urlopen(f"{base}/data/plugin/scalars/tags", timeout=10).read())
        for run in runs:
            assert "hp/test/bal_acc" in tags[run] and "val/bal_acc" in tags[run]
        def post(route: str, body: dict) -> dict:
            request = Request(f"{base}/data/plugin/hparams/{route}", json.dumps(body).encode(),
                              headers={"Content-Type": "application/json"})
            return json.loads(urlopen(request, timeout=10).read())

        experiment = post("experiment", {"experimentName": ""})
        names = {h["name"] for h in experiment["hparamInfos"]}
        assert {"choice/sampler", "choice/loss", "model.lr", "seed"} <= names
        assert "hp/test/bal_acc" in {m["name"]["tag"] for m in experiment["metricInfos"]}
        groups = post("session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 100,
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                "STATUS_RUNNING"],
            "colParams": [{"metric": {"tag": "hp/test/bal_acc"}}]})["sessionGroups"]
        assert len(groups) == 4
        for group in groups:  # the final metric, not the -1 placeholder of a crashed run
            run_dir = basic_sweep / group["name"].split("/")[0]
            value = next(m["value"] for m in group["metricValues"]
                         if m["name"]["tag"] == "hp/test/bal_acc")
            assert value == pytest.approx(_metrics(run_dir)["test"]["bal_acc"], abs=1e-6)
    finally:
        server.terminate()
        server.wait(30)


def test_optuna_search_runs_trials_and_reports_the_best(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    # 6 epochs: the search space's model.unfreeze_at goes up to 5, which must be < max_epochs.
    result = run_cli("tailtune-train", "-m", "hparams_search=optuna_imbalance", "debug=smoke",
                     "trainer.max_epochs=6", "hydra.sweeper.n_trials=2",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    import yaml

    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [_metrics(j)["val"]["bal_acc"] for j in _job_dirs(sweep)]
    assert len(values) == 2 and best["best_value"] == pytest.approx(max(values))
    assert {"model.lr", "sampler", "loss"} <= set(best["best_params"])
    # Optuna's storage plugins and its colour codes stay out of the log.
    assert "alembic" not in result.stderr and "\x1b[" not in result.stderr


def test_a_job_of_submitits_local_executor_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """submitit's local executor restarts a timed-out job with no restart count: the job
    started again from epoch 0 in its own dir, past its interrupted.ckpt, until its retries
    ran out."""
    from tailtune.build.trainer import resume_checkpoint

    saved = tmp_path / "checkpoints" / "interrupted.ckpt"
    saved.parent.mkdir()
    saved.write_bytes(b"")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert resume_checkpoint(None, tmp_path) is None  # a plain run starts fresh
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert resume_checkpoint(None, tmp_path) == str(saved)
    assert resume_checkpoint(None, tmp_path / "fresh_job") is None
