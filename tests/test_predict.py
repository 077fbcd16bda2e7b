"""tailtune-predict: its inputs (folder, glob, CSV), unreadable files as error rows, and
predictions that agree with tailtune-eval on the same images."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import compose_config, run_cli
from tailtune.data.folders import list_inputs
from tailtune.data.images import NOT_IMAGE, ImageFiles, decode_image
from test_datasets import _truncated_jpeg, write_digit_folder, write_photo_folder


def test_inputs_from_a_folder_a_glob_a_csv_or_one_file(tmp_path):
    write_digit_folder(tmp_path / "d", {"a": {0: 2, 1: 2}})
    (tmp_path / "d" / "a" / "1" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "d" / "a" / "1" / "notes.txt").write_text("x")
    files, labels = list_inputs(str(tmp_path / "d"))
    names = [str(p.relative_to(tmp_path / "d")) for p in files]
    assert names == ["a/0/000.png", "a/0/001.png", "a/1/000.png", "a/1/001.png", "a/1/notes.txt"]
    assert labels is None
    files, _ = list_inputs(str(tmp_path / "d" / "**" / "00[1].png"))
    assert [p.name for p in files] == ["001.png", "001.png"]
    manifest = tmp_path / "m" / "list.csv"
    manifest.parent.mkdir()
    manifest.write_text("path,label\n../d/a/1/000.png,one\n../d/a/0/000.png,zero\n")
    files, labels = list_inputs(str(manifest))
    assert files == [tmp_path / "m/../d/a/1/000.png", tmp_path / "m/../d/a/0/000.png"]
    assert labels == ["one", "zero"]
    assert list_inputs(str(files[0]))[0] == [files[0]]
    with pytest.raises(FileNotFoundError, match="input does not exist"):
        list_inputs(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="matches no files"):
        list_inputs(str(tmp_path / "*.webp"))


DIGITS = tuple(str(d) for d in range(10))  # the class names of debug=smoke's digits


def test_class_sub_folders_named_after_the_model_s_classes_are_labels(tmp_path):
    write_digit_folder(tmp_path, {"photos": {3: 2, 7: 1}})
    photos = tmp_path / "photos"
    (photos / "7" / "deeper").mkdir()
    (photos / "7" / "deeper" / "x.png").write_bytes((photos / "7" / "000.png").read_bytes())
    (photos / "loose.png").write_bytes((photos / "3" / "000.png").read_bytes())
    files, labels = list_inputs(str(photos), DIGITS)
    assert [str(p.relative_to(photos)) for p in files] == [
        "loose.png", "3/000.png", "3/001.png", "7/000.png", "7/deeper/x.png"]
    assert labels == ["", "3", "3", "7", "7"]  # a file outside the class folders: unscored
    assert list_inputs(str(photos))[1] is None  # no model classes given: no labels
    # Sub-folders none of which is a class: a folder of images, sorted some other way.
    assert list_inputs(str(tmp_path), ("cat", "dog"))[1] is None
    # Some classes, some not: refused, naming the others, not scored as wrong.
    (photos / "misc").mkdir()
    (photos / "unsorted").mkdir()
    with pytest.raises(ValueError, match=r"sub-folders misc, unsorted are not classes of the "
                                         r"model \(its classes: 0, 1, .*input='.*/\*\*/\*'"):
        list_inputs(str(photos), DIGITS)


def test_csv_labels_that_are_not_classes_of_the_model_are_refused(tmp_path):
    write_digit_folder(tmp_path, {"d": {3: 1, 7: 1}})
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\nd/3/000.png,three\nd/7/000.png,seven\n")
    with pytest.raises(ValueError, match=r"labels seven, three are not classes of the model "
                                         r"\(its classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9\); fix"):
        list_inputs(str(manifest), DIGITS)
    manifest.write_text("path,label\nd/3/000.png,3\nd/7/000.png,seven\n")  # one of them
    with pytest.raises(ValueError, match="label seven is not a class of the model"):
        list_inputs(str(manifest), DIGITS)
    manifest.write_text("path,label\nd/3/000.png,3\nd/7/000.png,7\n")
    assert list_inputs(str(manifest), DIGITS)[1] == ["3", "7"]


def test_a_missing_input_is_refused_by_the_early_checks(tmp_path):
    """Before Hydra makes the run dir (tailtune.cli.config.EarlyChecks); a glob is left to
    the run, which removes its still-empty run dir when the glob matches nothing."""
    from tailtune.cli.config import ConfigError, check_config

    def problems(spec: str) -> str:
        cfg, _ = compose_config("predict", ["ckpt_path=/no/best.ckpt", f"input={spec}"],
                                tmp_path / "run")
        with pytest.raises(ConfigError) as err:
            check_config(cfg, entry="predict")
        return str(err.value)

    assert f"input does not exist: {tmp_path / 'nonexist'}" in problems(str(tmp_path / "nonexist"))
    assert "input" not in problems(str(tmp_path)) and "input" not in problems(f"{tmp_path}/*.x")


@pytest.mark.slow
def test_predict_scores_class_folders_and_bad_input_leaves_no_run_dir(smoke_cfg, tmp_path):
    from tailtune.cli.train import train

    cfg, choices = smoke_cfg()  # digits, classes 0..9
    train(cfg, choices)
    best = Path(cfg.paths.output_dir) / "checkpoints" / "best.ckpt"
    write_digit_folder(tmp_path, {"photos": {d: 2 for d in range(10)}})
    photos = tmp_path / "photos"
    (photos / "5" / "broken.png").write_text("not an image\n")  # an error row, not a stop
    logs = tmp_path / "logs"

    def predict(*args: str):
        return run_cli("tailtune-predict", f"ckpt_path={best}", f"paths.log_dir={logs}",
                       "threads=1", *args, cwd=tmp_path)

    result = predict(f"input={photos}")
    assert result.returncode == 0, result.stderr[-2000:]
    (written,) = logs.rglob("predictions.csv")
    rows = _read_rows(written)
    assert [r["label"] for r in rows] == [Path(r["path"]).parent.name for r in rows]
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert errors == {"broken.png": "not an image, despite its .png extension"}
    scored = [r for r in rows if not r["error"]]
    accuracy = float(np.mean([r["label"] == r["pred"] for r in scored]))
    # Stdout holds the result line and nothing else (no empty line from a progress bar).
    assert result.stdout == (f"20 images predicted, 1 unreadable (see its error column), "
                             f"accuracy {accuracy:.4f}: {written}\n")
    summary = json.loads((written.parent / "metrics.json").read_text())
    assert summary["accuracy"] == pytest.approx(accuracy) and summary["scored"] == 20

    # Bad input: one line on stderr, exit 2, and no run dir left behind.
    runs = sorted((logs / "runs").iterdir())
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\nphotos/3/000.png,three\n")
    (photos / "misc").mkdir()
    (photos / "misc" / "x.png").write_bytes((photos / "3" / "000.png").read_bytes())
    for args, expected in [
        ([f"input={tmp_path / 'nonexist'}"], "input does not exist"),
        ([f"input={manifest}"], "label three is not a class of the model (its classes: 0, 1"),
        ([f"input={photos}"], "sub-folder misc is not a class of the model"),
        ([f"input={tmp_path}/*.webp"], "matches no files"),
    ]:
        result = predict(*args)
        assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]
        assert result.stdout == "" and "Traceback" not in result.stderr
        assert sorted((logs / "runs").iterdir()) == runs


def test_unreadable_inputs_become_errors_not_exceptions(tmp_path):
    write_digit_folder(tmp_path, {"a": {3: 1}})
    good = tmp_path / "a" / "3" / "000.png"
    _truncated_jpeg(tmp_path / "cut.jpg")
    (tmp_path / "notes.txt").write_text("not a picture")
    dataset = ImageFiles([good, tmp_path / "cut.jpg", tmp_path / "notes.txt",
                          tmp_path / "gone.png"], size=12)
    image, index, error = dataset[0]
    assert error == "" and index == 0
    assert torch.equal(image, torch.from_numpy(decode_image(good, 12)).float() / 255)
    assert dataset[1][2].startswith("OSError") and dataset[2][2] == NOT_IMAGE
    assert dataset[3][2].startswith("FileNotFoundError")


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_predict_on_held_out_photos_agrees_with_eval(smoke_cfg, tmp_path):
    from tailtune.cli.evaluate import evaluate
    from tailtune.cli.train import train

    root = tmp_path / "photos"
    write_photo_folder(root, {"train": {"china": 24, "flower": 8},
                              "val": {"china": 4, "flower": 3},
                              "test": {"china": 6, "flower": 5}})
    # Decoded per item from their files, the path predict shares with training.
    cfg, choices = smoke_cfg("data=image_folder", f"data.root={root}", "data.image_size=96",
                             "data.decode=lazy",
                             "model.logit_adjust_tau=1.0")
    train(cfg, choices)
    run_dir = Path(cfg.paths.output_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dataset"]["class_counts"] == [24, 8]  # the folder's natural imbalance
    best = run_dir / "checkpoints" / "best.ckpt"

    # Predict decodes a file into exactly the pixels the datamodule served for it.
    from tailtune.build.data import build_datamodule

    test_set = build_datamodule(cfg).datasets["test"]
    as_predicted = ImageFiles(test_set.paths, 96, "squash")
    for i in range(len(test_set)):
        assert torch.equal(test_set[i][0], as_predicted[i][0])

    # debug=smoke's data.image_size (16) would change the images: eval refuses that.
    eval_cfg, _ = compose_config("eval", [f"ckpt_path={best}", "debug=smoke", "threads=1",
                                          "data.image_size=96",
                                          "trainer.limit_test_batches=null"], tmp_path / "ev")
    threads = torch.get_num_threads()
    try:
        results = evaluate(eval_cfg)
        assert torch.get_num_threads() == 1  # eval, like train, runs beside other jobs
    finally:
        torch.set_num_threads(threads)

    held_out = tmp_path / "held_out"
    shutil.copytree(root / "test", held_out)
    _truncated_jpeg(held_out / "flower" / "cut.jpg")
    (held_out / "flower" / "readme.txt").write_text("not a picture")
    (held_out / ".DS_Store").write_bytes(b"\0")
    output = tmp_path / "out" / "predictions.csv"
    result = run_cli("tailtune-predict", f"ckpt_path={best}", f"input={held_out}",
                     f"output={output}", "batch_size=4", "threads=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    # Its class folders (china/, flower/) are labels: the accuracy is eval's.
    assert f"accuracy {results['test']['acc']:.4f}: {output}" in result.stdout
    rows = _read_rows(output)
    assert len(rows) == 11 + 2  # the 11 test photos and the 2 unreadable files; no .DS_Store
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert errors["cut.jpg"].startswith("OSError") and errors["readme.txt"] == NOT_IMAGE
    scored = [r for r in rows if not r["error"]]
    accuracy = np.mean([Path(r["path"]).parent.name == r["pred"] for r in scored])
    assert accuracy == pytest.approx(results["test"]["acc"], abs=1e-9)
    for row in scored:
        probs = [float(row["prob_china"]), float(row["prob_flower"])]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert row["pred"] == ("china", "flower")[int(np.argmax(probs))]

    # The stored post-hoc adjustment is applied: z - tau * log(prior), prior 24:8.
    import tailtune

    model = tailtune.load(str(best))
    image = torch.from_numpy(decode_image(Path(scored[0]["path"]), 96)).float()[None] / 255
    with torch.no_grad():
        logits = model(image) - torch.log(torch.tensor([24 / 32, 8 / 32]))
    expected = logits.softmax(dim=1)[0].tolist()
    assert [float(scored[0]["prob_china"]), float(scored[0]["prob_flower"])] == pytest.approx(
        expected, abs=1e-5)
    # Its own run dir holds the record, and the default output lands there.
    default = run_cli("tailtune-predict", f"ckpt_path={best}",
                      f"input={held_out}/china/*.jpg", cwd=tmp_path)
    assert default.returncode == 0, default.stderr[-2000:]
    written = list((tmp_path / "logs").rglob("predictions.csv"))
    assert len(written) == 1 and len(_read_rows(written[0])) == 6
    summary = json.loads((written[0].parent / "metrics.json").read_text())
    assert summary["predicted"] == 6 and summary["unreadable"] == 0

    # Neither predict nor eval writes into a dir that holds a finished run.
    finished = (run_dir / "metrics.json").read_bytes()
    into_run = run_cli("tailtune-predict", f"ckpt_path={best}", f"input={held_out}/china/*.jpg",
                       f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert into_run.returncode != 0 and "already holds a finished run" in into_run.stderr
    eval_into_run, _ = compose_config("eval", [f"ckpt_path={best}", "debug=smoke",
                                               "data.image_size=96"], run_dir)
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        evaluate(eval_into_run)
    assert (run_dir / "metrics.json").read_bytes() == finished
    assert not (run_dir / "predictions.csv").exists()


def test_predict_reports_a_bad_checkpoint_in_one_line(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"")
    result = run_cli("tailtune-predict", f"ckpt_path={tmp_path / 'missing.ckpt'}",
                     f"input={tmp_path}", cwd=tmp_path)
    assert result.returncode == 2
    assert "ckpt_path does not exist" in result.stderr and "Traceback" not in result.stderr
