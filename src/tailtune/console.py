"""What tailtune prints: one logging setup, progress bars, and the results of a run.

- **Logging.** Every record is printed once, on stderr, through one rich console: INFO lines as
  the bare message, warnings as ``warning: ...`` (each distinct one once), Python warnings
  routed through logging. Hydra installs :class:`ConsoleHandler` and :class:`NoiseFilter`
  (``configs/hydra/job_logging/tailtune.yaml``; the run dir's ``<task>.log`` keeps time stamps
  and logger names); :func:`setup` removes the stream handler Lightning adds to its own logger,
  which printed every Lightning line a second time. Under DDP only rank zero prints INFO.
- **Noise.** :data:`NOISE` lists library lines that tell a user nothing (Lightning's tips,
  torch's pytree deprecation, "modules in eval mode" for a backbone frozen on purpose, ...);
  real warnings stay.
- **Progress.** :func:`track` draws a progress bar over an iterable, on a terminal or in a
  notebook (:func:`draws_live`) and on rank zero only, for every step outside Lightning's
  loops that can take seconds.
- **Results.** :func:`results_table` / :func:`print_results`: the final val and test metrics
  and the run dir, on stdout (diagnostics stay on stderr, so ``> result.txt`` keeps results).

Nothing here imports torch: Hydra imports this module while configuring logging.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import rich
from rich.console import Console
from rich.table import Table
from rich.text import Text

T = TypeVar("T")

# Diagnostics (logs, warnings, progress, the config lines, the data summary) go to stderr,
# through rich's global console: Lightning's progress bars (tailtune.callbacks.ProgressBar)
# and rich progress displays without a console of their own draw on it too, so a log line
# printed during a bar appears above it.
CONSOLE_SETTINGS: dict[str, Any] = {"stderr": True, "highlight": False}
rich.reconfigure(**CONSOLE_SETTINGS)
CONSOLE: Console = rich.get_console()

# Library lines that carry nothing for the user (matched against the message).
NOISE = tuple(re.compile(pattern) for pattern in (
    r"💡 Tip:|litlogger|litmodels",                          # Lightning's advertising
    r"isinstance\(treespec, LeafSpec\)` is deprecated",        # torch pytree, via Lightning
    r"Found \d+ module\(s\) in eval mode",                      # frozen backbones, on purpose
    r"Checkpoint directory .* exists and is not empty",         # resume writes into its dir
    r"It is recommended to use `self\.log\(.*sync_dist=True\)",  # torchmetrics syncs them
    r"^Seed set to \d+",                                        # the seed is in the config
    r"^GPU available: False, used: False",
    r"^[TH]PU available: ",
    r"^Loading `train_dataloader` to estimate number of stepping batches",
    r"^Restoring states from the checkpoint path at ",          # testing the best checkpoint
    r"^Loaded model weights from the checkpoint at ",
    r"^You requested to overfit but enabled \w+ dataloader shuffling",  # debug=overfit's aim
))


# A sweep job's mark before each line it prints ("#3 ", Hydra's job number, as its launch line
# names the job): a joblib sweep's jobs print at once, and their lines could not be told apart.
_job_mark = ""


@contextlib.contextmanager
def job_mark(mark: str) -> Iterator[None]:
    """Mark each line printed inside with ``mark`` (see :func:`marked`)."""
    global _job_mark
    previous, _job_mark = _job_mark, mark
    try:
        yield
    finally:
        _job_mark = previous


def marked(text: str) -> str:
    return f"{_job_mark}{text}"


def rank() -> int:
    """This process's global rank: Lightning's once it is imported, else the launcher's env."""
    module = sys.modules.get("lightning_utilities.core.rank_zero")
    value = getattr(getattr(module, "rank_zero_only", None), "rank", None)
    if value is not None:
        return int(value)
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def is_noise(message: str) -> bool:
    return any(pattern.search(message) for pattern in NOISE)


class NoiseFilter(logging.Filter):
    """Drops the records :data:`NOISE` matches."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record.getMessage())


class ConsoleFormatter(logging.Formatter):
    """INFO as the bare message; ``warning: ...`` / ``error: ...`` above it."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        return text


# The warnings already printed by this process: a sweep's jobs in one process (the basic
# launcher) each get a new handler from Hydra, and a warning every job raises prints once.
_SHOWN: set[str] = set()


class ConsoleHandler(logging.Handler):
    """Prints records through :data:`CONSOLE` (so they appear above a live progress bar):
    INFO on rank zero only, each distinct warning once per process (the run's log file keeps
    every one)."""

    STYLES = {logging.WARNING: "yellow", logging.ERROR: "bold red"}

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.setFormatter(ConsoleFormatter())
        self._shown = _SHOWN

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.levelno < logging.WARNING and rank() != 0:
                return
            text = self.format(record)
            if record.levelno >= logging.WARNING:
                if text in self._shown:
                    return
                self._shown.add(text)
            style = self.STYLES[min(record.levelno, logging.ERROR)] \
                if record.levelno >= logging.WARNING else ""
            # A warning prints once per process, whichever job raised it first: unmarked, so
            # it does not read as that job's alone (each job's log file has its own).
            shown = text if record.levelno >= logging.WARNING else marked(text)
            CONSOLE.print(Text(shown, style=style), soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


_show_warning_default = warnings.showwarning


def _origin(filename: str) -> str:
    """The package a warning comes from (``lightning``, ``torch``), or '' for tailtune."""
    parts = Path(filename).parts
    if "tailtune" in parts:
        return ""
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return parts[parts.index(marker) + 1].removesuffix(".py")
    return Path(filename).name


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` for the entry points: one short line through logging."""
    if file is not None:  # an explicit stream: as Python would
        _show_warning_default(message, category, filename, lineno, file, line)
        return
    text = str(message).strip()
    if category is not UserWarning:
        text = f"{category.__name__}: {text}"
    origin = _origin(filename)
    logging.getLogger("py.warnings").warning("%s%s", text, f" ({origin})" if origin else "")


def capture_warnings() -> None:
    """Python warnings as short log lines (so they are filtered, shown once and written to
    the run's log file). For the console scripts only: tests keep pytest's warning capture."""
    warnings.showwarning = _log_warning


def setup() -> None:
    """Call at the start of a run, after the config checks: one handler per message (Lightning's
    own stream handler removed), library noise off."""
    import lightning  # noqa: F401 - its package __init__ adds the handler removed here

    root = logging.getLogger()
    if not root.handlers:  # run without Hydra's logging config: print through ours
        handler = ConsoleHandler()
        handler.addFilter(NoiseFilter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's own; the root prints
                logger.removeHandler(handler)
        logger.propagate = True
    for handler in root.handlers:
        if not any(isinstance(f, NoiseFilter) for f in handler.filters):
            handler.addFilter(NoiseFilter())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\(")


# -- progress ------------------------------------------------------------------------------
def draws_live() -> bool:
    """Whether stderr can show a live display: a terminal or a notebook (``TTY_COMPATIBLE=1``
    forces it), in a process of its own. A file (a cluster job's log) gets only a display's
    last frame; a pool's worker (a joblib sweep's job) shares the terminal with its siblings,
    whose displays would draw over its own."""
    import multiprocessing

    return (CONSOLE.is_terminal or CONSOLE.is_jupyter) and multiprocessing.parent_process() is None


def _live_elsewhere() -> bool:
    return bool(getattr(CONSOLE, "_live_stack", None))


def track(iterable: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """``iterable`` with a progress bar (count, rate, time left) on stderr: on a terminal, on
    rank zero, and when no other live display is up; otherwise just the items."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if total == 0 or not draws_live() or rank() != 0 or _live_elsewhere():
        yield from iterable
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=CONSOLE, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)


# -- results -------------------------------------------------------------------------------
RESULT_METRICS = (("bal_acc", "balanced acc"), ("macro_f1", "macro-F1"),
                  ("few_acc", "few-shot acc"), ("ece", "ECE"))


def results_table(metrics: Mapping[str, Any], title: str = "results") -> Table | None:
    """The final metrics of ``metrics.json``: one row per metric, a column per split present
    (val, test); None when it holds neither."""
    splits = [s for s in ("val", "test") if isinstance(metrics.get(s), Mapping)]
    rows = [(key, name) for key, name in RESULT_METRICS
            if any(key in metrics[s] for s in splits)]
    if not splits or not rows:
        return None
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for split in splits:
        table.add_column(split, justify="right")
    for key, name in rows:
        table.add_row(name, *(format_value(metrics[s].get(key)) for s in splits))
    return table


def format_value(value: Any) -> str:
    return "–" if value is None else f"{float(value):.4f}"


def print_results(metrics: Mapping[str, Any], run_dir: str | Path,
                  title: str = "results") -> None:
    """The results table, then the run dir, on stdout; rank zero only."""
    if rank() != 0:
        return
    out = Console(highlight=False)
    table = results_table(metrics, marked(title))
    with out:  # one write: another sweep job's output does not land between table and dir
        if table is not None:
            out.print(table)
        out.print(marked(f"run dir: {run_dir}"), soft_wrap=True, markup=False)


def print_failure(run_dir: str | Path, err: BaseException, resume_with: str | None = None
                  ) -> None:
    """A failed run's dir on stderr (rank zero only). An exception's own line follows from
    the entry point (``tailtune: error: ...``, or the traceback of a bug); a run stopped by a
    signal or Ctrl-C gets its reason here, and, given ``resume_with`` (the override that
    points the same command at its dir), how to resume it."""
    if rank() != 0:
        return
    reason = "" if isinstance(err, Exception) else f": {one_line(err)}"
    resume = (f"; to resume it, run the same command with {resume_with} resume=auto"
              if resume_with and reason else "")
    CONSOLE.print(Text(marked(f"run failed{reason}; run dir: {run_dir}{resume}"),
                       style="bold red"), soft_wrap=True)


def one_line(err: BaseException) -> str:
    """An error as one line: its type and the first line of its message."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if type(err).__name__ == "SIGTERMException":  # Lightning's, a SystemExit without a code
        return "stopped by SIGTERM"
    if isinstance(err, SystemExit):
        return f"stopped (exit code {err.code})" if isinstance(err.code, int) else \
            f"stopped: {err.code}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
