"""tailtune-compare SWEEP_DIR [...]: one table, CSV, Markdown and plots for a sweep."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def compare(sweep_dirs: list[Path], sort_by: str = "bal_acc", out_dir: Path | None = None,
            n_boot: int = 1000, baseline: str | None = None) -> Path:
    from rich.console import Console
    from rich.markup import escape

    from tailtune.report import compare as agg
    from tailtune.report import plots
    from tailtune.report.runs import drop_repeats, find_runs, tell_configs_apart

    runs = [run for d in sweep_dirs for run in find_runs(d)]
    if not runs:
        raise FileNotFoundError(f"no runs found under {', '.join(map(str, sweep_dirs))}")
    apart = tell_configs_apart(runs)  # across the dirs too
    runs, repeats = drop_repeats(runs)
    summaries = agg.summarize(runs, n_boot=n_boot, baseline=baseline)
    known = sorted({key for s in summaries for key in s.mean})
    if known and sort_by not in known:  # every row would tie, under a title naming it
        import difflib

        close = difflib.get_close_matches(sort_by, known, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ValueError(f"--sort-by {sort_by} is not a test metric of these runs; {hint}"
                         f"valid: {', '.join(known)}")
    summaries.sort(key=lambda s: -s.mean.get(sort_by, float("-inf")))
    common = agg.strip_common_overrides(summaries)
    unfinished = [r for r in runs if r.status != "done"]
    out = Path(out_dir or sweep_dirs[0])
    out.mkdir(parents=True, exist_ok=True)

    name = sweep_name(sweep_dirs)
    title = f"{name}: {len(summaries)} configs, {len(runs)} runs, sorted by test {sort_by}"
    title += f"\nall runs: {', '.join(common)}" if common else ""
    title = escape(title)  # overrides such as model.posthoc=[a,b] are text, not rich markup
    console = Console()
    rows = agg.table_rows(summaries, config_sep="\n")  # one override per line
    table, left_out = fitted_table(title, agg.header(summaries), rows, console)
    console.print(table)
    if left_out:
        console.print(f"left out to fit {console.width} columns (in comparison.md and .csv): "
                      + ", ".join(left_out), soft_wrap=True, highlight=False)
    if (pick := agg.pick_sentence(summaries)):
        console.print(escape(pick), soft_wrap=True)
    for run in unfinished:
        reason = f": {run.error}" if run.error else ""
        console.print(f"[yellow]{run.status}[/] " + escape(f"{run.path}{reason}"))
    threads = sorted({r.threads for r in runs if r.status == "done" and r.threads})
    if len(threads) > 1:
        console.print(f"[yellow]runs used different torch thread counts ({threads}):[/] on a "
                      "CPU the same config and seed can score a few points apart from that "
                      "alone (set threads=N for every run of a comparison)", soft_wrap=True)
    for note in apart:
        console.print("[yellow]different configs:[/] " + escape(note), soft_wrap=True)
    for run in repeats:
        console.print("[yellow]repeat, not counted[/] " + escape(
            f"{run.path}: the same config and seed ({run.seed}) as a newer run"))

    agg.write_csv(summaries, out / "comparison.csv")
    agg.write_markdown(summaries, unfinished, out / "comparison.md", sort_by, common, name)
    written = ["comparison.md", "comparison.csv"]
    if summaries:
        plots.balanced_accuracy_plot(summaries, out / "comparison_bal_acc.png", name)
        plots.recall_heatmap(summaries, out / "comparison_recall.png", name)
        plots.shot_bars(summaries, out / "comparison_shots.png", name)
        written += ["comparison_bal_acc.png", "comparison_recall.png", "comparison_shots.png"]
    else:
        console.print("[yellow]no run finished:[/] nothing to plot")
    console.print(f"[bold green]written to {escape(str(out))}:[/] {', '.join(written)}",
                  soft_wrap=True)
    return out


# Columns of the report only in comparison.md and the CSV, never in the console table.
FILE_ONLY = ("test acc", "test many_acc", "test ece")
# The console table's columns a narrow terminal loses first; config, n, test and val balanced
# accuracy, wall time and the paired difference always stay.
OPTIONAL = ("test gmean", "test macro_f1", "test medium_acc", "test few_acc", "bal_acc 95% CI")


def fitted_table(title: str, columns: list[str], rows: list[list[str]],
                 console: Console) -> tuple[Table, list[str]]:
    """The comparison as a rich Table that prints whole on ``console``, and the names of the
    columns left out. A log or a pipe gets every column at full width; a terminal too narrow
    for them loses the OPTIONAL columns, in that order, and only if it is narrower still do
    cells wrap. (Rich otherwise squeezes the config column to nothing and cuts numbers.)"""
    from rich.markup import escape
    from rich.measure import Measurement
    from rich.table import Table

    def build(keep: list[int], wrap: bool = False) -> Table:
        table = Table(title=title, show_lines=True)
        # A config is one override per line (table_rows), so it wraps between overrides.
        table.add_column(escape(columns[0]), overflow="fold")
        for i in keep[1:]:
            # numbers whole, unless nothing fits
            table.add_column(escape(columns[i]), no_wrap=not wrap)
        for row in rows:
            table.add_row(*(escape(row[i]) for i in keep))
        return table

    def width(table: Table) -> Measurement:  # unclamped: what the table needs, not the console
        return Measurement.get(console, console.options.update(max_width=10**6), table)

    keep = [i for i, name in enumerate(columns) if name not in FILE_ONLY]
    left_out = []
    table = build(keep)
    if not console.is_terminal:
        console.width = max(console.width, width(table).maximum)
        return table, left_out
    droppable = [i for name in OPTIONAL for i in keep if columns[i] == name]
    while droppable and width(table).maximum > console.width:
        i = droppable.pop(0)
        keep.remove(i)
        left_out.append(columns[i])
        table = build(keep)
    if width(table).maximum > console.width:  # still too wide: every cell may wrap
        table = build(keep, wrap=True)
    return table, left_out


def sweep_name(sweep_dirs: list[Path]) -> str:
    """What the plots and the Markdown are titled with: the sweep dir's name (or names)."""
    names = [Path(d).resolve().name for d in sweep_dirs]
    return " + ".join(names) if len(names) <= 3 else f"{names[0]} + {len(names) - 1} more"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tailtune-compare", description=__doc__)
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="multirun dirs (or run dirs)")
    parser.add_argument("--sort-by", default="bal_acc", help="test metric to sort by")
    parser.add_argument("--out", type=Path, default=None, help="output dir (default: the first)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--baseline", default=None, metavar="OVERRIDE",
                        help="an override naming one config (e.g. experiment=lt_plain): add each "
                             "config's paired difference from it, with its 95%% CI")
    args = parser.parse_args(argv)
    try:
        compare(args.sweep_dirs, args.sort_by, args.out, args.bootstrap, args.baseline)
    except (FileNotFoundError, ValueError) as err:
        print(f"tailtune-compare: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
