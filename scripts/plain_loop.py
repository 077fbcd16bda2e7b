"""The baseline a user would write themselves: a plain PyTorch fine-tuning loop, for measuring
what tailtune's recipe adds on the same data.

    .venv/bin/python scripts/plain_loop.py data=fashion_mnist_lt backbone.image_size=64 \\
        transforms=flip --epochs 5 --lr 3e-3 --seed 1 --out logs/plain_loop/fmnist_s1

Only the data (the same splits and images that `tailtune-train` serves, with the same Hydra
overrides: data, backbone, transforms) and the pretrained backbone come from tailtune; the
training is one plain loop: the whole network trains from the first step at one lr (AdamW,
cosine with a one-epoch warmup), BatchNorm in train mode, the last epoch's weights scored (no
checkpoint selection, no test-time tricks). It writes what a tailtune run leaves for
`tailtune-compare` (metrics.json with tailtune's test metrics, val balanced accuracy and the
loop's settings as overrides, test_predictions.npz, timings.json, status.json), so a dir of
loop runs and tailtune runs on the same data compares in one table, with paired intervals.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict
from sklearn.metrics import balanced_accuracy_score

from tailtune.allocator import keep_freed_memory
from tailtune.build.data import build_datamodule
from tailtune.cli.config import register_resolvers
from tailtune.data.folders import list_inputs
from tailtune.data.images import ImageFiles
from tailtune.data.info import DatasetInfo
from tailtune.metrics import ImbalancedClassificationMetrics

REPO = Path(__file__).resolve().parents[1]


def config(overrides: list[str], out: Path):
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def predict(model: torch.nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits [N, K], targets [N])``."""
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for images, targets in loader:
            logits.append(model(images.contiguous(memory_format=torch.channels_last)))
            labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def score_heldout(model: torch.nn.Module, spec: str, info: DatasetInfo, resize: str,
                  out: Path) -> dict:
    """Balanced accuracy on a labelled file list, decoded as tailtune-predict decodes it; the
    predictions go to ``heldout_predictions.csv`` (path, label, pred)."""
    files, labels = list_inputs(spec)
    if labels is None:
        raise SystemExit(f"--heldout {spec}: needs a label column")
    images = ImageFiles(files, info.image_size, resize)
    loader = torch.utils.data.DataLoader(images, batch_size=128)
    model.eval()
    preds, bad = [], []
    with torch.no_grad():
        for batch, index, errors in loader:
            preds.append(model(batch.contiguous(memory_format=torch.channels_last)).argmax(1))
            bad += [f"{files[i]}: {e}" for i, e in zip(index.tolist(), errors, strict=True) if e]
    if bad:  # a zero image's guess would pass for a score
        raise SystemExit(f"--heldout {spec}: {len(bad)} unreadable files, e.g. {bad[0]}")
    preds = torch.cat(preds)
    names = [info.class_names[i] for i in preds.tolist()]
    with open(out / "heldout_predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "pred"])
        writer.writerows(zip(map(str, files), labels, names, strict=True))
    return {"input": spec, "bal_acc": balanced_accuracy_score(labels, names)}


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The lr factor of batch ``step``: linear warmup over ``warmup`` batches, then a cosine
    from 1 to 0 over the rest (transformers' get_cosine_schedule_with_warmup; tailtune's
    schedule has the same shape, ending at 0.01). Until 2026-12-05 the cosine spanned the
    warmup too, which kept this loop's lr lower than the recipe's (0.8x on average on
    Fashion-MNIST-LT)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("overrides", nargs="*", help="tailtune config overrides (data, backbone)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3, help="best of 3e-4, 1e-3, 3e-3 here")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--loss", choices=("ce", "balanced_softmax"), default="balanced_softmax")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = default")
    parser.add_argument("--system-malloc", action="store_true",
                        help="glibc's default allocator; by default freed memory is kept, as in "
                             "a tailtune run (keep_freed_memory), so the two compare as methods")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heldout", help="a labelled CSV (path,label) also scored, as "
                                          "tailtune-predict input= scores a tailtune run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.system_malloc:
        keep_freed_memory()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    cfg = config([*args.overrides, f"seed={args.seed}"], args.out)
    L.seed_everything(args.seed)
    data = build_datamodule(cfg)
    data.setup("test")
    backbone, preprocess, _ = instantiate(cfg.backbone)
    num_classes = data.info.num_classes
    model = torch.nn.Sequential(preprocess, backbone,
                                torch.nn.Linear(backbone.num_features, num_classes))
    model.to(memory_format=torch.channels_last)  # as fast as tailtune's recipe on this CPU
    counts = torch.as_tensor(data.info.class_counts, dtype=torch.float)
    shift = (counts / counts.sum()).log() if args.loss == "balanced_softmax" else 0.0

    train = data.train_dataloader()
    total, warmup = args.epochs * len(train), len(train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup, total))
    for epoch in range(args.epochs):
        data.train_sampler.set_epoch(epoch)  # a new order each epoch, as shuffle=True gives
        model.train()
        for images, targets in train:
            logits = model(images.contiguous(memory_format=torch.channels_last))
            loss = torch.nn.functional.cross_entropy(logits + shift, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

    val_logits, val_true = predict(model, data.val_dataloader())
    test_logits, test_true = predict(model, data.test_dataloader())
    # tailtune's own metric set (balanced accuracy, shot groups, ECE, ...), so the loop's rows
    # in tailtune-compare have every column.
    scores = ImbalancedClassificationMetrics(data.info.class_names, data.info.class_counts)
    scores.update(test_logits, test_true)
    test = scores.compute()
    test_probs, test_true = test_logits.softmax(1).numpy(), test_true.numpy()
    wall_s = time.perf_counter() - started
    # The files a tailtune run leaves, so tailtune-compare reads a loop run beside them (its
    # config named by the loop's settings that differ from the defaults).
    loop = [f"loop.{k}={getattr(args, k)}"
            for k in ("epochs", "lr", "weight_decay", "loss", "system_malloc")
            if k == "epochs" or getattr(args, k) != parser.get_default(k)]
    metrics = {
        "val": {"bal_acc": balanced_accuracy_score(val_true.numpy(), val_logits.argmax(1).numpy())},
        "test": test,
        "overrides": ["loop=plain", *loop, *args.overrides,
                      *([f"threads={args.threads}"] if args.threads else []), f"seed={args.seed}"],
        "wall_s": wall_s,
        "threads_used": torch.get_num_threads(),
    }
    if args.heldout:
        metrics["heldout"] = score_heldout(model, args.heldout, data.info,
                                           cfg.data.get("resize", "squash"), args.out)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    np.savez_compressed(args.out / "test_predictions.npz", targets=test_true, probs=test_probs)
    (args.out / "timings.json").write_text(json.dumps({"wall_s": wall_s}))
    (args.out / "status.json").write_text(json.dumps({"status": "done"}))
    print(json.dumps({k: metrics[k] for k in ("val", "test", "wall_s")}))


if __name__ == "__main__":
    main()
