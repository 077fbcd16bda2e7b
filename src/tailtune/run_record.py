"""What a run leaves in its dir besides checkpoints and events.

- ``status.json``: running / failed (with the error's last line) / done. A run dir without
  ``done`` never looks complete.
- ``run.json``: git commit, dirty flag, key package versions, command line.
- ``metrics.json``: final val and test metrics, written last and atomically.
- ``timings.json``: wall times, kept apart so metrics compare exactly across runs. A run
  resumed from a checkpoint has no ``wall_s`` (what its earlier processes spent is unknown),
  only ``wall_s_since_resume``: comparisons at equal wall time leave it out.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PACKAGES = ("tailtune", "torch", "torchvision", "lightning", "timm", "torchmetrics",
            "hydra-core", "imbalanced-learn", "scikit-learn", "numpy")


SEED_KEYS = ("seed",)
# How a run is run, not what it computes (overrides of these or anything under them): a sweep
# rerun with resume=auto, or on another launcher or thread count, is still the same config.
# ckpt_path=<file> is not among them: it can warm-start (ckpt_path=auto resumes the run's own
# state: says_how_to_run).
HOW_RUN = ("resume", "threads", "launcher", "logger", "keep_freed_memory", "requeue_signal",
           "print_config", "paths", "hydra")


def _top_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split(".", 1)[0]


def says_how_to_run(override: str) -> bool:
    """An override of how a run is run (or resumed), not of what it computes."""
    return _top_key(override) in HOW_RUN or override.lstrip("+~") == "ckpt_path=auto"


def is_config_override(override: str) -> bool:
    return not says_how_to_run(override) and _top_key(override) not in SEED_KEYS


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def git_state(cwd: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the code that ran, if it runs from a git checkout."""
    where = cwd or Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    """The metrics of a run that completed, or None."""
    metrics, status = Path(run_dir) / "metrics.json", Path(run_dir) / "status.json"
    try:
        if json.loads(status.read_text()).get("status") == "done":
            return json.loads(metrics.read_text())
    except (OSError, ValueError):
        pass
    return None


def refuse_finished_run(run_dir: Path) -> None:
    """A dir that holds a finished run's results is never written into again."""
    if finished_metrics(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds a finished run; choose another "
                              "hydra.run.dir")


def refuse_any_run(run_dir: Path) -> None:
    """eval and predict write only into a dir of their own: in a killed training run's dir
    they would mark it done and replace its record, and ``resume=auto`` would then skip
    the run instead of finishing it."""
    refuse_finished_run(run_dir)
    if (Path(run_dir) / "status.json").exists():
        raise FileExistsError(f"{run_dir} holds another run (status.json); choose another "
                              "hydra.run.dir")


def computed_config(config: dict[str, Any]) -> dict[str, Any]:
    """What a resolved config (``config.yaml``, parsed) computes, flat (``model.lr``): without
    the keys that say how a run is run (``resume``, ``threads``, ``paths``, ...) or
    ``ckpt_path``, and with the config's own ``paths.*`` values inside other values (a
    checkpoint or cache dir under the run dir or the log dir) named, not spelled out."""

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix: node}
        out: dict[str, Any] = {}
        for key, value in node.items():
            if not prefix and (key in HOW_RUN or key == "ckpt_path"):
                continue
            out.update(flat(value, f"{prefix}{key}."))
        return out

    paths = sorted(((str(v), f"<paths.{k}>") for k, v in (config.get("paths") or {}).items()
                    if isinstance(v, str) and v), key=lambda p: -len(p[0]))
    out = {}
    for key, value in flat(config).items():
        for path, name in paths if isinstance(value, str) else ():
            value = value.replace(path, name)
        out[key.rstrip(".")] = value
    return out


def config_changes(run_dir: Path, config_text: str) -> list[str]:
    """How ``config_text`` (the resolved config as ``config.yaml`` holds it) differs in what
    it computes (:func:`computed_config`) from the one an unfinished run in ``run_dir``
    stored: ``key: stored -> new`` lines, empty when they agree or no run stored one."""
    import yaml

    try:
        stored = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    config = yaml.safe_load(config_text)  # parsed as the stored one is
    if not isinstance(stored, dict) or not isinstance(config, dict):
        return []
    old, new = computed_config(stored), computed_config(config)
    unset = "(not set)"
    changed = [key for key in old.keys() | new.keys() if old.get(key, unset) != new.get(key, unset)]
    changed.sort(key=lambda k: (k not in old or k not in new, k))  # changed values first
    return [f"{key}: {old.get(key, unset)} -> {new.get(key, unset)}" for key in changed]


def refuse_other_config(run_dir: Path, config_text: str, finished: bool = False) -> None:
    """A run dir holds one config: resuming a killed run with other overrides (or none)
    would finish it under another config, and overwrite its record of the first; skipping a
    ``finished`` one would hand its result on as this config's (to a sweeper, say)."""
    changes = config_changes(run_dir, config_text)
    if not changes:
        return
    import shlex

    import yaml

    shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4
                                      else "")
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if all(" (not set) -> " in change for change in changes):
        # Keys the run's config lacks: tailtune or a config file gained them after it started.
        # Whether their values keep its behaviour is not known here: no resume, and a way on.
        gained = ("config lacks keys this one has, added to tailtune or a config file since "
                  f"it started ({shown})")
        if finished:
            raise FileExistsError(f"{run_dir} holds a finished run whose {gained}: its result "
                                  "may not be this config's; choose another hydra.run.dir")
        raise ValueError(f"{run_dir} holds an unfinished run whose {gained}, so it cannot "
                         "resume in place; if those values keep its behaviour, go on from its "
                         f"state in another dir: the same command with ckpt_path={last} and "
                         "another hydra.run.dir")
    if finished:
        raise FileExistsError(f"{run_dir} holds a finished run of another config ({shown}): "
                              "its result is not this config's; choose another hydra.run.dir")

    try:
        started = yaml.safe_load((Path(run_dir) / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        started = None
    kept = [shlex.quote(str(o)) for o in started or [] if not says_how_to_run(str(o))]
    raise ValueError(
        f"{run_dir} holds an unfinished run of another config ({shown}). Resume it with the "
        f"overrides it was started with: tailtune-train {' '.join([*kept, ''])}"
        f"hydra.run.dir={shlex.quote(str(run_dir))} resume=auto; or start a new run in another "
        f"dir from its weights (ckpt_path={last})")


def root_cause(err: BaseException) -> BaseException:
    """The error Hydra's InstantiationException wraps (e.g. a BackboneError), else ``err``."""
    while err.__cause__ is not None and type(err).__name__ == "InstantiationException":
        err = err.__cause__
    return err


def selection_value(metrics: dict[str, Any], name: str) -> float:
    """The value a run is chosen by: ``val/bal_acc`` -> ``metrics["val"]["bal_acc"]``, or its
    out-of-fold version where the run tuned post-hoc steps on val (``bal_acc_out_of_fold``):
    the score on the images a step was tuned on is optimistic. NaN when absent."""
    stage, _, key = name.partition("/")
    values = metrics.get(stage) or {}
    return float(values.get(f"{key}_out_of_fold", values.get(key, float("nan"))))


class RunDirBusy(OSError):
    """Another live process holds the run dir."""


class RunDirLock:
    """An exclusive lock on a run dir, held from start to finish: two processes resuming one
    run (a rerun while a SLURM requeue still runs, a sweep launched twice) would interleave
    their checkpoints and results. ``flock`` dies with its process, so a killed run leaves no
    stale lock; on a file system without locks the run goes on unguarded. The file stays
    (deleting it would let two processes lock two inodes of one path); it names its holder."""

    NAME = ".lock"

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / self.NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(
                f"{self.path.parent} is in use by another process ({holder}); wait for it to "
                "end or stop it, then run again. If no such process is alive (its node "
                f"crashed and a network file system kept its lock), delete {self.path}"
            ) from None
        except OSError:  # no locks on this file system
            os.close(fd)
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # no holder named
        finally:
            os.close(self.fd)  # releases the lock
            self.fd = None


class RunRecord:
    """Status, provenance, metrics and timings of one run dir. Only rank zero writes, and
    holds the dir's :class:`RunDirLock` from :meth:`start` to :meth:`finish` or :meth:`fail`."""

    def __init__(self, run_dir: Path, rank_zero: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.rank_zero = rank_zero
        self.started = time.time()
        self.resumed_from: str | None = None  # set when this process resumed a checkpoint
        self.lock = RunDirLock(self.run_dir)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.json"

    def start(self, extra: dict[str, Any] | None = None, own_dir: bool = False) -> None:
        """Take the dir (rank zero only). ``own_dir`` (eval, predict): refuse a dir that holds
        any other run, finished or not; else only a finished one."""
        if not self.rank_zero:
            return
        self.lock.acquire()
        try:
            # Checked under the lock: the dir's run may have finished while this one waited.
            (refuse_any_run if own_dir else refuse_finished_run)(self.run_dir)
            self.set_status("running")
            write_json(self.run_dir / "run.json", {
                "git": git_state(), "packages": package_versions(), "argv": sys.argv,
                "pid": os.getpid(),
                "python": sys.version.split()[0], **(extra or {}),
            })
        except BaseException:
            self.lock.release()
            raise

    def save_config(self, text: str) -> None:
        """The resolved config, at the top of the run dir (Hydra's copy is unresolved)."""
        if self.rank_zero:
            (self.run_dir / "config.yaml").write_text(text)

    def set_status(self, status: str, error: str | None = None) -> None:
        if not self.rank_zero:
            return
        data: dict[str, Any] = {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if error:
            data["error"] = error
        write_json(self.run_dir / "status.json", data)

    def fail(self, err: BaseException) -> None:
        """Mark the run failed with the error's type and message, on one line and cut at 300
        characters: the root cause's, not the wrapper's (Hydra's InstantiationException puts
        the real error in the middle of three lines), and its start (where it says what)."""
        err = root_cause(err)
        text = " ".join(str(err).split())
        message = (text[:299] + "…" if len(text) > 300 else text) or (
            "stopped by SIGTERM" if type(err).__name__ == "SIGTERMException" else "")
        try:
            self.set_status("failed", f"{type(err).__name__}: {message}".rstrip(": "))
        finally:
            self.lock.release()

    def finish(self, metrics: dict[str, Any]) -> None:
        if not self.rank_zero:
            return
        try:
            write_json(self.metrics_path, metrics)
            wall_s = round(time.time() - self.started, 2)
            timings: dict[str, Any] = (
                {"wall_s": wall_s} if not self.resumed_from
                else {"wall_s_since_resume": wall_s, "resumed_from": self.resumed_from})
            torch = sys.modules.get("torch")
            if torch is not None:  # CPU results depend on it (README, "Results")
                timings["torch_threads"] = torch.get_num_threads()
            write_json(self.run_dir / "timings.json", timings)
            self.set_status("done")
        finally:
            self.lock.release()
