"""Is the input pipeline or the model the bottleneck? Loader images/s next to model images/s.

Generates CIFAR-sized data (default 10,000 x 32 x 32 x 3 uint8), serves it through the real
ImbalancedDataModule (decoded once, uint8 in memory) with each augmentation and worker count,
and times the default backbone's forward pass and training step on the same batch size.

    .venv/bin/python scripts/benchmark_loader.py
    .venv/bin/python scripts/benchmark_loader.py --workers 0 2 4 --device cuda --backbone-size 224
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from tailtune.backbones import create_backbone
from tailtune.data.datamodule import ImbalancedDataModule
from tailtune.data.sources import ArraySource
from tailtune.data.transforms import flip_crop, randaugment

TRANSFORMS: dict[str, Callable[[int], object] | None] = {
    "none": None, "flip_crop": flip_crop, "randaugment": randaugment}


def loader_rate(images: np.ndarray, labels: np.ndarray, size: int, batch_size: int,
                workers: int, transform: str) -> float:
    """Training images/s over one epoch of the training loader (worker start-up included)."""
    build = TRANSFORMS[transform]
    dm = ImbalancedDataModule(
        ArraySource(images, labels), image_size=size, batch_size=batch_size,
        num_workers=workers, imbalance_ratio=1, val_fraction=0.05, test_fraction=0.05,
        train_transform=build(size) if build else None)
    dm.setup()
    start, seen = time.perf_counter(), 0
    for batch, _ in dm.train_dataloader():
        seen += len(batch)
    return seen / (time.perf_counter() - start)


def model_rates(name: str, size: int, batch_size: int, device: str,
                steps: int) -> tuple[float, float]:
    """(forward, training step) images/s of a randomly initialised backbone plus head,
    fed ``[0, 1]`` images at the data size, resized and normalised as in training."""
    backbone, preprocess, _ = create_backbone(name, weights="none", image_size=size)
    head = torch.nn.LazyLinear(10)
    model = torch.nn.Sequential(preprocess, backbone, head).to(device)
    x = torch.rand(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    model(x)  # materialise the lazy head
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def timed(fn: Callable[[], None]) -> float:
        fn()  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return steps * batch_size / (time.perf_counter() - start)

    def forward() -> None:
        with torch.no_grad():
            model.eval()(x)

    def train_step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return timed(forward), timed(train_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="generated images")
    parser.add_argument("--size", type=int, default=32, help="data.image_size")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--transforms", nargs="+", default=list(TRANSFORMS),
                        choices=list(TRANSFORMS))
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--backbone-size", type=int, default=64,
                        help="backbone.image_size (the configs' CPU default is 64)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed model batches")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.n, args.size, args.size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.n)
    console = Console()
    table = Table(title=f"{args.n} images of {args.size} px, batch {args.batch_size}")
    table.add_column("stage")
    table.add_column("setting")
    table.add_column("images/s", justify="right")
    slowest_loader = float("inf")
    for transform in args.transforms:
        for workers in args.workers:
            rate = loader_rate(images, labels, args.size, args.batch_size, workers, transform)
            slowest_loader = min(slowest_loader, rate)
            table.add_row("loader", f"transforms={transform}, num_workers={workers}",
                          f"{rate:,.0f}")
    forward, step = model_rates(args.backbone, args.backbone_size, args.batch_size,
                                args.device, args.steps)
    where = f"{args.backbone} at {args.backbone_size} px on {args.device}"
    table.add_row("model", f"forward, {where}", f"{forward:,.0f}", style="bold")
    table.add_row("model", f"train step, {where}", f"{step:,.0f}", style="bold")
    console.print(table)
    verdict = "the model" if slowest_loader > step else "the LOADER"
    console.print(f"slowest loader setting: {slowest_loader / step:.1f}x the training step's "
                  f"rate: {verdict} is the bottleneck")


if __name__ == "__main__":
    main()
