"""vpt-predict: image files -> top-k CSV through Trainer.predict, several tasks, unreadable images reported."""

from __future__ import annotations

import csv

import pytest
import torch

from conftest import save_task_checkpoint, task_probabilities, write_image
from vpt_lightning.cli.predict import main, parse_checkpoints



@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    count = save_task_checkpoint(root / "count.ckpt", num_classes=5, class_names=list("abcde"), task_name="count")
    orient = save_task_checkpoint(root / "orient.ckpt", num_classes=3, prompt={"num_tokens": 4})
    for i in range(3):
        write_image(root / "images" / f"{i}.png", seed=i, size=(40, 36))
    (root / "images" / "broken.png").write_bytes(b"\x89PNG not really")
    return root, count, orient


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_image_with_every_task_and_the_broken_one_reported(tasks, capsys):
    root, count, orient = tasks
    out = root / "predictions.csv"
    assert main([str(count), str(orient), "--images", str(root / "images"), "--out", str(out), "--top-k", "3",
                 "--batch-size", "4", "--no-progress-bar"]) == 0
    rows = read_rows(out)
    assert [(r["path"].split("/")[-1], r["task"]) for r in rows] == [
        (f"{i}.png", t) for i in range(3) for t in ("count", "orient")
    ]
    for row in rows:
        path = count if row["task"] == "count" else orient
        probs = task_probabilities(path, row["path"])
        names = list("abcde") if row["task"] == "count" else ["0", "1", "2"]
        top = probs.topk(3)
        assert [row[f"class_{r}"] for r in (1, 2, 3)] == [names[i] for i in top.indices.tolist()]
        assert [float(row[f"probability_{r}"]) for r in (1, 2, 3)] == pytest.approx(top.values.tolist(), abs=1e-5)
    err = capsys.readouterr().err
    assert err.count("broken.png") == 1 and "not an image" in err


def test_csv_list_with_a_task_column_and_names_given(tasks, capsys):
    root, count, orient = tasks
    listing = root / "list.csv"
    listing.write_text("path,task\nimages/0.png,first\nimages/2.png,\nimages/broken.png,second\n")
    out = root / "from_csv.csv"
    args = [f"first={count}", f"second={orient}", "--images", str(listing), "--task", "second", "--out", str(out),
            "--no-progress-bar"]
    assert main(args) == 0
    assert [(r["path"].split("/")[-1], r["task"]) for r in read_rows(out)] == [("0.png", "first"), ("2.png", "second")]
    assert "broken.png" in capsys.readouterr().err


def test_strict_fails_naming_the_file(tasks, capsys):
    root, count, _ = tasks
    assert main([str(count), "--images", str(root / "images"), "--out", str(root / "x.csv"), "--strict",
                 "--no-progress-bar"]) == 1
    err = capsys.readouterr().err
    assert "unreadable image" in err and "broken.png" in err
    assert not (root / "x.csv").exists()


def test_bad_arguments_are_named(tasks, capsys):
    root, count, orient = tasks
    assert main([str(count), "--images", str(root / "images"), "--task", "nope", "--no-progress-bar"]) == 1
    assert "--task 'nope' is not one of the loaded tasks ['count']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="name every checkpoint"):
        parse_checkpoints([f"a={count}", str(orient)])
