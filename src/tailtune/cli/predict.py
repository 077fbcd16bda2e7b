"""tailtune-predict ckpt_path=PATH input=DIR|GLOB|FILE.csv: class probabilities as a CSV.

Each file is decoded exactly as the checkpoint's training data was (``data.image_size``,
``data.resize``: the same ``decode_image`` as training's file loader), and scored with the
model's own post-hoc logit adjustment, so predictions on a split's files agree with
``tailtune-eval`` on that split. Unreadable files get a row with an ``error`` and no
prediction; they do not stop the run. Labelled input (a CSV's ``label`` column, or a folder
whose sub-folders are named after the model's classes) adds a ``label`` column and the
accuracy. Stdout holds only the result line; progress and warnings go to stderr.
"""

from __future__ import annotations

import csv
from pathlib import Path

import hydra
from omegaconf import DictConfig

from tailtune.cli.config import (
    CONFIG_PATH,
    check_config,
    readable_config_errors,
    readable_errors,
    register_resolvers,
    save_hydra_files,
)

register_resolvers()


def predict(cfg: DictConfig) -> dict:
    """Write the predictions CSV; returns the run's summary (also its metrics.json)."""
    check_config(cfg, entry="predict")  # before torch is imported
    import torch
    from torch.utils.data import DataLoader

    from tailtune.build.checkpoints import dataset_info, read_checkpoint
    from tailtune.build.models import model_from_checkpoint
    from tailtune.build.trainer import choose_device, configure_process
    from tailtune.console import track
    from tailtune.data.folders import list_inputs
    from tailtune.data.images import ImageFiles
    from tailtune.run_record import RunRecord

    configure_process(cfg)
    checkpoint = read_checkpoint(cfg.ckpt_path)
    files, labels = list_inputs(str(cfg.input), dataset_info(checkpoint).class_names)
    run_dir = Path(cfg.paths.output_dir)
    output = Path(cfg.output).expanduser() if cfg.get("output") else run_dir / "predictions.csv"
    record = RunRecord(run_dir)
    record.start({"entry": "predict", "ckpt_path": str(cfg.ckpt_path), "input": str(cfg.input)},
                 own_dir=True)
    try:
        save_hydra_files(cfg, run_dir)
        model = model_from_checkpoint(checkpoint).to(choose_device(cfg.device)).eval()
        resize = checkpoint["tailtune"]["config"].get("data", {}).get("resize", "squash")
        dataset = ImageFiles(files, model.info.image_size, resize)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        probs = torch.full((len(files), len(model.class_names)), float("nan"))
        errors = [""] * len(files)
        for images, index, error in track(loader, "predicting (batches)"):
            readable = torch.tensor([not e for e in error], dtype=torch.bool)
            if readable.any():
                probs[index[readable]] = model.predict_proba(images[readable]).cpu()
            for i, e in zip(index.tolist(), error, strict=True):
                errors[i] = e
        summary = write_predictions(output, files, probs, errors, model.class_names, labels)
    except BaseException as err:
        record.fail(err)
        raise
    summary.update({"ckpt_path": str(cfg.ckpt_path), "input": str(cfg.input)})
    record.finish(summary)
    unreadable = f", {summary['unreadable']} unreadable (see its error column)" \
        if summary["unreadable"] else ""
    accuracy = ""
    if "accuracy" in summary:
        accuracy = f", accuracy {summary['accuracy']:.4f}"
        if summary["scored"] < summary["predicted"]:
            accuracy += f" on the {summary['scored']} labelled"
    print(f"{summary['predicted']} images predicted{unreadable}{accuracy}: {output}")
    return summary


def write_predictions(output: Path, files: list[Path], probs, errors: list[str],
                      class_names: tuple[str, ...], labels: list[str] | None) -> dict:
    """``path[,label],pred,prob_<class>...,error`` rows, in input order. The accuracy is over
    the readable files with a label (an empty label: predicted, not scored)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    predicted = probs.argmax(dim=1).tolist()
    correct = scored = 0
    with output.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *(["label"] if labels else []), "pred",
                         *(f"prob_{name}" for name in class_names), "error"])
        for i, path in enumerate(files):
            ok = not errors[i]
            pred = class_names[predicted[i]] if ok else ""
            if ok and labels and labels[i]:
                scored += 1
                correct += labels[i] == pred
            writer.writerow([str(path), *([labels[i]] if labels else []), pred,
                             *(f"{p:.6f}" if ok else "" for p in probs[i].tolist()), errors[i]])
    n_ok = sum(not e for e in errors)
    summary = {"predictions": str(output), "predicted": n_ok, "unreadable": len(files) - n_ok}
    if scored:
        summary.update(accuracy=correct / scored, scored=scored)
    return summary


@readable_config_errors
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
@readable_errors
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
