"""tailtune's benchmark suite: every scenario in one process, ratios rather than absolute
times (absolute times are noisy on a shared machine), a table plus JSON.

    .venv/bin/python scripts/benchmark.py            # the full suite (about 15-25 min on 2 cores)
    .venv/bin/python scripts/benchmark.py --quick    # a short version of each scenario
    .venv/bin/python scripts/benchmark.py --only overhead memory --out /tmp/bench

Scenarios and their goals:

- overhead: a fine-tune training step through tailtune's Lightning module (its Trainer,
  callbacks and logger) vs a plain PyTorch loop on a copy of the same model, the same loader
  and batch size. Steady-state step time (batch end to batch end, data loading included),
  median over interleaved repeats. Goal: <= 1.05x.
- recipe: whole epochs of the long-tail recipe (experiment=lt_recipe: flips, channels_last,
  test-time flip at validation; mixing and layer decay too where set) through tailtune's
  Trainer, callbacks, checkpointing and logger vs a plain PyTorch loop doing the same work on
  a copy of the model (the same loader, mixing, param groups and schedule, a validation pass
  with sklearn's balanced accuracy and a torch.save of model and optimizer each epoch). Median
  epoch time (epoch start to next epoch start, validation included), interleaved repeats.
  Goal: <= 1.10.
- allocator: lite0 train steps (channels_last, AdamW) in a process that keeps freed memory
  (keep_freed_memory, every tailtune run's default) vs one on glibc's default allocator, at
  the recipe's digits (96 px, batch 32) and Fashion-MNIST-LT (64 px, batch 128) shapes.
  Median step time, separate processes, interleaved repeats. Reported as a speedup.
- cache: a linear probe with cached features vs the backbone run every step, whole runs,
  interleaved (scripts/benchmark_linear_probe.py's functions).
- sweep: a 4 samplers x 5 losses linear-probe sweep on the default data with the feature
  cache warm, through the console script, with the basic and the joblib launcher.
  Goal: the whole sweep in <= 10 minutes.
- memory: peak memory of the default training run (the console script, default config):
  the main process's RSS plus the PSS of its data-loader workers, sampled from
  /proc/<pid>/smaps_rollup in a thread. Goal: <= 3 GiB.
"""

from __future__ import annotations

import os

# torch and scikit-learn each bring an OpenMP runtime; spin-waiting pools stall each other on
# 2 cores (stalls of 10-30 s). Must be set before either loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import importlib.util
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = ("overhead", "recipe", "allocator", "memory", "cache", "sweep")
GOALS = {"overhead_ratio": 1.05, "recipe_ratio": 1.10, "sweep_s": 600.0, "memory_gib": 3.0}


# -- helpers --------------------------------------------------------------------------------
def compose(overrides: list[str], run_dir: Path) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from tailtune.cli.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        del cfg.hydra
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.cache_dir = str(run_dir.parent / "cache")
    return cfg


def script(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def linear_probe_benchmark() -> ModuleType | None:
    """scripts/benchmark_linear_probe.py, reused rather than duplicated; None if absent."""
    path = REPO / "scripts" / "benchmark_linear_probe.py"
    if not path.is_file() or importlib.util.find_spec("tailtune.models.linear_probe") is None:
        return None
    spec = importlib.util.spec_from_file_location("benchmark_linear_probe", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


class Quiet:
    """Send stderr (config lines, rich tables, Lightning's chatter) to /dev/null for a while."""

    def __enter__(self) -> None:
        self.saved, sys.stderr = sys.stderr, open(os.devnull, "w")  # noqa: SIM115

    def __exit__(self, *exc: object) -> None:
        sys.stderr.close()
        sys.stderr = self.saved


def clock(hook: str) -> Any:
    """A Lightning callback that records ``time.perf_counter()`` at ``hook`` in ``.marks``."""
    import lightning as L

    def mark(self: Any, *args: Any) -> None:
        self.marks.append(time.perf_counter())

    callback = type("Clock", (L.Callback,), {hook: mark})()
    callback.marks = []
    return callback


def gaps(marks: list[float]) -> list[float]:
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def train_as_unfrozen(model: Any) -> None:
    """Train mode as FineTuneModule sets it once the backbone is unfrozen: every module
    trains, BatchNorm statistics adapt or stay frozen (``bn_after_unfreeze``). nn.Module's
    train(), because the module's own freezes the whole backbone outside a Trainer."""
    import torch

    torch.nn.Module.train(model)
    if model.bn_after_unfreeze == "frozen":
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def interleave(name: str, repeats: int, tailtune: Any, plain: Any, unit: str = "ms",
               labels: tuple[str, str] = ("tailtune", "plain")) -> list[dict[str, float]]:
    """Median of ``tailtune(run)`` and ``plain(run)`` (lists of times) per repeat, the two
    interleaved in alternating order so that drifts of a shared machine hit both alike."""
    scale = 1e3 if unit == "ms" else 1.0
    per_repeat: list[dict[str, float]] = []
    for run in range(repeats):
        result: dict[str, float] = {}
        for mode in (("lightning", "plain") if run % 2 == 0 else ("plain", "lightning")):
            with Quiet():
                result[mode] = statistics.median(tailtune(run) if mode == "lightning"
                                                 else plain(run))
        result["ratio"] = result["lightning"] / result["plain"]
        per_repeat.append(result)
        print(f"  {name} repeat {run + 1}/{repeats}: {labels[0]} "
              f"{result['lightning'] * scale:7.2f} {unit}  {labels[1]} "
              f"{result['plain'] * scale:7.2f} {unit}  ratio {result['ratio']:.3f}", flush=True)
    return per_repeat


# -- Lightning overhead ---------------------------------------------------------------------
def overhead(root: Path, repeats: int, steps: int, warmup: int) -> dict[str, Any]:
    import torch

    from tailtune.build import models, trainer

    n = steps + warmup + 1
    cfg = compose(["model.unfreeze_at=0", "trainer.enable_progress_bar=false",
                   "trainer.max_epochs=1", f"trainer.limit_train_batches={n}",
                   "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                   "trainer.num_sanity_val_steps=0"], root / "overhead" / "run")
    datamodule, model = models.build_experiment(cfg)
    plain_model = copy.deepcopy(model)  # the same weights, never touched by a Trainer

    def lightning_steps(run: int) -> list[float]:
        steps = clock("on_train_batch_end")
        run_dir = root / "overhead" / f"lightning{run}"
        fitter = trainer.build_trainer(
            cfg, run_dir, [*trainer.training_callbacks(cfg, datamodule), steps],
            trainer.build_loggers(cfg))  # TensorBoard, as a user's run
        fitter.fit(model, datamodule=datamodule)
        return gaps(steps.marks)[warmup:]

    m = plain_model
    groups = [{"params": list(m.head.parameters()), "lr": m.lr},
              {"params": [p for p in m.backbone.parameters() if p.requires_grad],
               "lr": m.lr * m.backbone_lr_ratio}]
    optimizer = m.optimizer_factory(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: 1.0, lambda s: 1.0])

    def plain_steps(run: int) -> list[float]:
        train_as_unfrozen(m)  # the default: BatchNorm keeps its pretrained statistics
        marks = []
        for i, (images, targets) in enumerate(datamodule.train_dataloader()):
            if i >= n:
                break
            x = m.preprocess(images)
            logits = m.head(m.backbone.forward_head(m.backbone.forward_features(x),
                                                    pre_logits=True))
            loss = m.criterion(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            marks.append(time.perf_counter())
        return gaps(marks)[warmup:]

    per_repeat = interleave("overhead", repeats, lightning_steps, plain_steps)
    lightning = statistics.median(r["lightning"] for r in per_repeat)
    plain = statistics.median(r["plain"] for r in per_repeat)
    return {"repeats": repeats, "steps_per_repeat": steps, "batch_size": cfg.data.batch_size,
            "image_size": cfg.backbone.image_size, "threads": torch.get_num_threads(),
            "lightning_step_s": lightning, "plain_step_s": plain, "ratio": lightning / plain,
            "ratio_median_of_repeats": statistics.median(r["ratio"] for r in per_repeat),
            "per_repeat": per_repeat, "goal": GOALS["overhead_ratio"]}


# -- the allocator ------------------------------------------------------------------------------
# Train steps of lite0 in a fresh process: glibc's settings hold for a whole process.
ALLOCATOR_STEPS = """
import json, sys, time
import timm, torch
from tailtune.allocator import keep_freed_memory
mode, size, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if mode == "keep":
    keep_freed_memory()
torch.manual_seed(0)
model = timm.create_model("tf_efficientnet_lite0", num_classes=10)
model.to(memory_format=torch.channels_last)
optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 10, (batch,))
marks = []
for _ in range(steps + 3):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    marks.append(time.perf_counter())
print(json.dumps([b - a for a, b in zip(marks[2:], marks[3:])]))
"""


def allocator(repeats: int, steps: int) -> dict[str, Any]:
    shapes = {"digits": (96, 32), "fashion_mnist_lt": (64, 128)}  # the recipe's px, batch
    report: dict[str, Any] = {"repeats": repeats, "steps": steps}

    def steps_in(mode: str, size: int, batch: int) -> list[float]:
        out = subprocess.run([sys.executable, "-c", ALLOCATOR_STEPS, mode, str(size),
                              str(batch), str(steps)], capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout.splitlines()[-1])

    for name, (size, batch) in shapes.items():
        per_repeat = interleave(f"allocator {name}", repeats,
                                lambda run, s=size, b=batch: steps_in("keep", s, b),
                                lambda run, s=size, b=batch: steps_in("default", s, b),
                                labels=("kept", "glibc default"))
        kept = statistics.median(r["lightning"] for r in per_repeat)
        default = statistics.median(r["plain"] for r in per_repeat)
        report[name] = {"image_size": size, "batch_size": batch, "kept_step_s": kept,
                        "default_step_s": default, "speedup": default / kept,
                        "per_repeat": per_repeat}
    return report


# -- the recipe, whole epochs -------------------------------------------------------------------
def recipe(root: Path, data: str, repeats: int, epochs: int) -> dict[str, Any]:
    import torch
    from sklearn.metrics import balanced_accuracy_score

    from tailtune.build import models, trainer

    cfg = compose(["experiment=lt_recipe", f"data={data}", "model.unfreeze_at=0",
                   f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false",
                   "trainer.num_sanity_val_steps=0"], root / "recipe" / "run")
    datamodule, model = models.build_experiment(cfg)
    plain = copy.deepcopy(model)  # the same weights, mixer and speed-ups, never in a Trainer
    optimizer = plain.optimizer_factory(
        [{"params": list(plain.head.parameters()), "lr": plain.lr},
         *({k: v for k, v in g.items() if k != "name"} for g in plain.backbone_param_groups())])
    steps_per_epoch = len(datamodule.train_dataloader())
    total = steps_per_epoch * epochs

    def factor(step: int) -> float:
        return plain.schedule.factor(step, 0, total, steps_per_epoch)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def lightning_epochs(run: int) -> list[float]:
        starts = clock("on_train_epoch_start")
        run_dir = root / "recipe" / f"lightning{run}"
        fitter = trainer.build_trainer(
            cfg, run_dir, [*trainer.training_callbacks(cfg, datamodule), starts],
            trainer.build_loggers(cfg))
        fitter.fit(copy.deepcopy(model), datamodule=datamodule)
        return gaps(starts.marks)[1:]  # epoch 0 warms up

    def plain_epochs(run: int) -> list[float]:
        marks = []
        for epoch in range(epochs):
            marks.append(time.perf_counter())
            train_as_unfrozen(plain)
            for images, targets in datamodule.train_dataloader():
                mixed, partner, lam = (plain.mix(images, targets) if plain.mix is not None
                                       else (images, targets, 1.0))
                logits = plain.head(plain.backbone.forward_head(
                    plain.backbone.forward_features(plain.preprocess(mixed)), pre_logits=True))
                loss = lam * plain.criterion(logits, targets)
                if lam < 1:
                    loss = loss + (1 - lam) * plain.criterion(logits, partner)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            plain.eval()
            predicted, seen = [], []
            with torch.inference_mode():  # as Lightning validates
                for images, targets in datamodule.val_dataloader():
                    logits = plain.head(plain.features(images))
                    if plain.tta_flip:  # the two views' mean probability, as tailtune
                        mirrored = plain.head(plain.features(images.flip(-1)))
                        logits = logits.softmax(1) + mirrored.softmax(1)
                    predicted.append(logits.argmax(1))
                    seen.append(targets)
            balanced_accuracy_score(torch.cat(seen), torch.cat(predicted))
            torch.save({"model": plain.state_dict(), "optimizer": optimizer.state_dict(),
                        "epoch": epoch}, root / "recipe" / f"plain{run}.pt")
        marks.append(time.perf_counter())
        return gaps(marks)[1:-1]  # as the Lightning side: epochs 1 .. E-2

    per_repeat = interleave("recipe", repeats, lightning_epochs, plain_epochs, unit="s")
    lightning = statistics.median(r["lightning"] for r in per_repeat)
    plain_s = statistics.median(r["plain"] for r in per_repeat)
    return {"data": data, "repeats": repeats, "epochs": epochs,
            "train_batches": steps_per_epoch, "image_size": cfg.backbone.image_size,
            "threads": torch.get_num_threads(), "tailtune_epoch_s": lightning,
            "plain_epoch_s": plain_s, "ratio": lightning / plain_s,
            "ratio_median_of_repeats": statistics.median(r["ratio"] for r in per_repeat),
            "per_repeat": per_repeat, "goal": GOALS["recipe_ratio"]}


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        for kid in _children(stack.pop()):
            found.append(kid)
            stack.append(kid)
    return found


def _rollup(pid: int) -> dict[str, int]:
    """Rss and Pss in bytes, from /proc/<pid>/smaps_rollup (0 once the process is gone)."""
    values = {"Rss": 0, "Pss": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return values


class MemorySampler(threading.Thread):
    """Peak of main RSS + the PSS of all its descendants (the loader workers)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.peak = {"total": 0, "main_rss": 0, "main_pss": 0, "workers_pss": 0, "workers": 0}
        self.hwm = 0

    def run(self) -> None:
        while not self.stop.is_set():
            main = _rollup(self.pid)
            workers = [_rollup(p)["Pss"] for p in _descendants(self.pid)]
            total = main["Rss"] + sum(workers)
            if total > self.peak["total"]:
                self.peak = {"total": total, "main_rss": main["Rss"], "main_pss": main["Pss"],
                             "workers_pss": sum(workers), "workers": len(workers)}
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                self.hwm = max(self.hwm, int(status.split("VmHWM:")[1].split()[0]) * 1024)
            except (OSError, IndexError, ValueError):
                pass
            self.stop.wait(self.interval)


def memory(root: Path, overrides: list[str]) -> dict[str, Any]:
    run_dir = root / "memory" / "run"
    args = [script("tailtune-train"), "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}", f"paths.cache_dir={root / 'memory' / 'cache'}",
            *overrides]
    log = (root / "memory.log").open("w")
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    sampler = MemorySampler(proc.pid)
    sampler.start()
    code = proc.wait()
    sampler.stop.set()
    sampler.join()
    gib = 2**30
    peak = sampler.peak
    return {"command": " ".join(["tailtune-train", *overrides]) or "tailtune-train",
            "exit_code": code, "wall_s": time.perf_counter() - started,
            "peak_gib": peak["total"] / gib, "main_rss_gib": peak["main_rss"] / gib,
            "main_pss_gib": peak["main_pss"] / gib, "workers_pss_gib": peak["workers_pss"] / gib,
            "workers": peak["workers"], "main_vmhwm_gib": sampler.hwm / gib,
            "goal_gib": GOALS["memory_gib"], "log": str(root / "memory.log")}


# -- linear-probe cache and sweeps ----------------------------------------------------------
def cache(root: Path, lp: ModuleType, epochs: int, repeats: int) -> dict[str, Any]:
    with Quiet():
        return lp.compare("default", epochs, repeats, root)


def warm_cache(root: Path, lp: ModuleType) -> Path:
    """The cache dir benchmark_linear_probe.compare('default') fills; filled here if needed."""
    cache_dir = root / "cache-default"
    if not (cache_dir / "features").is_dir():
        with Quiet():
            lp.timed_run(["model=linear_probe", "trainer.max_epochs=1",
                          "trainer.enable_progress_bar=false"], root, cache_dir)
    return cache_dir


def sweep(root: Path, cache_dir: Path, launcher: str, samplers: list[str], losses: list[str],
          extra: list[str]) -> dict[str, Any]:
    sweep_dir = root / f"sweep-{launcher}"
    args = [script("tailtune-train"), "-m", "model=linear_probe",
            f"sampler={','.join(samplers)}", f"loss={','.join(losses)}",
            f"launcher={launcher}", "trainer.enable_progress_bar=false",
            f"paths.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep_dir}", *extra]
    if launcher == "joblib":
        args.append(f"hydra.launcher.n_jobs={os.cpu_count() or 1}")
    started = time.perf_counter()
    with (root / f"sweep-{launcher}.log").open("w") as log:
        code = subprocess.call(args, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - started
    done = len(list(sweep_dir.glob("*/metrics.json"))) if sweep_dir.is_dir() else 0
    return {"launcher": launcher, "jobs": len(samplers) * len(losses), "finished": done,
            "exit_code": code, "total_s": seconds,
            "per_job_s": seconds / max(1, len(samplers) * len(losses)),
            "n_jobs": os.cpu_count() if launcher == "joblib" else 1,
            "goal_s": GOALS["sweep_s"]}


# -- report ---------------------------------------------------------------------------------
def table(report: dict[str, Any]) -> str:
    rows = [("scenario", "measured", "goal", "")]

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    if "overhead" in report:
        o = report["overhead"]
        rows.append((f"Lightning overhead (fine-tune step, median of {o['repeats']})",
                     f"{o['ratio']:.3f}x ({o['lightning_step_s']*1e3:.0f} vs "
                     f"{o['plain_step_s']*1e3:.0f} ms/step)",
                     f"<= {o['goal']:.2f}x", mark(o["ratio"] <= o["goal"])))
    if "recipe" in report:
        r = report["recipe"]
        rows.append((f"Recipe epoch time, tailtune / plain loop ({r['data']}, median of "
                     f"{r['repeats']})",
                     f"{r['ratio']:.3f}x ({r['tailtune_epoch_s']:.2f} vs "
                     f"{r['plain_epoch_s']:.2f} s/epoch; median of the repeats' own ratios "
                     f"{r['ratio_median_of_repeats']:.3f}x)",
                     f"<= {r['goal']:.2f}x", mark(r["ratio"] <= r["goal"])))
    if "allocator" in report:
        a = report["allocator"]
        rows.append((f"Allocator, freed memory kept (lite0 train step, median of "
                     f"{a['repeats']})",
                     ", ".join(f"{a[k]['speedup']:.2f}x faster at {a[k]['image_size']} px "
                               f"batch {a[k]['batch_size']} ({a[k]['kept_step_s']*1e3:.0f} vs "
                               f"{a[k]['default_step_s']*1e3:.0f} ms)"
                               for k in ("digits", "fashion_mnist_lt")), "-", ""))
    if "cache" in report:
        c = report["cache"]
        if isinstance(c, str):
            rows.append(("Linear-probe cache (uncached / cached)", c, "-", ""))
        else:
            rows.append(("Linear-probe cache (uncached / cached, whole run)",
                         f"{c['speedup']:.1f}x warm, {c['speedup_cold']:.1f}x cold "
                         f"({c['uncached_s']:.1f} s vs {c['cached_s']:.1f} s)", "-", ""))
    for key in ("sweep_basic", "sweep_joblib"):
        if key in report:
            s = report[key]
            if isinstance(s, str):
                rows.append((f"Sweep ({key.split('_')[1]})", s, "-", ""))
                continue
            ok = s["exit_code"] == 0 and s["finished"] == s["jobs"]
            rows.append((f"Sweep {report['sweep_shape']} probes, warm cache, {s['launcher']}"
                         + (f" n_jobs={s['n_jobs']}" if s["launcher"] == "joblib" else ""),
                         f"{s['total_s']:.0f} s ({s['per_job_s']:.1f} s/job, "
                         f"{s['finished']}/{s['jobs']} done)",
                         f"<= {s['goal_s']:.0f} s", mark(ok and s["total_s"] <= s["goal_s"])))
    if "memory" in report:
        m = report["memory"]
        rows.append(("Peak memory, default training run",
                     f"{m['peak_gib']:.2f} GiB (main RSS {m['main_rss_gib']:.2f} + "
                     f"{m['workers']} workers PSS {m['workers_pss_gib']:.2f})",
                     f"<= {m['goal_gib']:.0f} GiB",
                     mark(m["exit_code"] == 0 and m["peak_gib"] <= m["goal_gib"])))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short version of each scenario")
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--recipe-data", default="digits_lt",
                        help="data config of the recipe scenario (default: digits_lt)")
    parser.add_argument("--out", type=Path, default=None, help="keep runs here (default: tmp)")
    args = parser.parse_args()

    from tailtune import console
    from tailtune.allocator import keep_freed_memory

    console.setup()  # Lightning's chatter filtered as in a run, so the repeats stay readable
    keep_freed_memory()  # as every tailtune run does; both sides of each ratio share it
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ["COLUMNS"] = "100"
    root = args.out or Path(tempfile.mkdtemp(prefix="tailtune-benchmark-"))
    root.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    report: dict[str, Any] = {"quick": quick, "cpus": os.cpu_count(), "load_at_start": load(),
                              "runs_under": str(root)}
    print(f"tailtune benchmark ({'quick' if quick else 'full'}), runs under {root}; "
          f"load average {load()}", flush=True)
    lp = linear_probe_benchmark()

    if "overhead" in args.only:
        print("== Lightning overhead", flush=True)
        report["overhead"] = overhead(root, repeats=5 if quick else 7, steps=8 if quick else 12,
                                      warmup=2)
    if "recipe" in args.only:
        print(f"== recipe epochs ({args.recipe_data})", flush=True)
        report["recipe"] = recipe(root, args.recipe_data, repeats=3 if quick else 5,
                                  epochs=4 if quick else 5)
    if "allocator" in args.only:
        print("== allocator: freed memory kept vs glibc's default", flush=True)
        report["allocator"] = allocator(repeats=3 if quick else 5, steps=6 if quick else 12)
    if "memory" in args.only:
        print("== peak memory of the default training run", flush=True)
        # --quick: 4 epochs, so the backbone unfreezes (epoch 3) and its optimizer state exists.
        report["memory"] = memory(root, ["trainer.max_epochs=4"] if quick else [])
    if "cache" in args.only:
        print("== linear-probe cache", flush=True)
        report["cache"] = cache(root, lp, 3 if quick else 15, 2 if quick else 3) if lp \
            else "not available (scripts/benchmark_linear_probe.py or model=linear_probe missing)"
    if "sweep" in args.only:
        samplers = list(lp.SAMPLERS[:2] if quick else lp.SAMPLERS) if lp else []
        losses = list(lp.LOSSES[:2] if quick else lp.LOSSES) if lp else []
        report["sweep_shape"] = f"{len(samplers)}x{len(losses)}"
        extra = ["trainer.max_epochs=3"] if quick else []  # the full sweep: default epochs
        for launcher in ("basic", "joblib"):
            print(f"== sweep, {launcher} launcher", flush=True)
            report[f"sweep_{launcher}"] = sweep(root, warm_cache(root, lp), launcher, samplers,
                                                losses, extra) if lp else "not available"
    report["load_at_end"] = load()

    print("\n" + table(report))
    print(f"(load average at start {report['load_at_start']}, at end {report['load_at_end']}"
          f" on {report['cpus']} cpus)")
    (root / "benchmark.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))
    print(f"report: {root / 'benchmark.json'}")


if __name__ == "__main__":
    main()
