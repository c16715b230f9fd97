"""Task names (issue 28, finding 1): any valid name is served, even one that is an ``nn.Module`` attribute of the
store (``train``, ``eval``, ``forward``, ``to``...), by ``vpt-predict`` and ``vpt-serve``; a folder run is named
after its folder, not ``train``; a bad ``task_name`` is refused before training."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from conftest import TINY_RUN, run_cli_in_process, save_task_checkpoint, task_probabilities, write_image

from vpt_lightning.config import compose
from vpt_lightning.serving.multitask import MultiTaskClassifier
from vpt_lightning.sharing.task_sources import load_task

#: names that are attributes or methods of an nn.Module / the task store
MODULE_ATTRIBUTES = ["train", "eval", "forward", "to", "cache", "backbone", "tasks", "add", "_modules"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as ``vpt-train data=folder`` wrote it before: ``out/train/<run>/task`` whose task is ``train``."""
    root = tmp_path_factory.mktemp("names")
    torch.manual_seed(0)
    checkpoint = save_task_checkpoint(
        root / "out" / "train" / "run" / "checkpoints" / "last.ckpt",
        num_classes=3,
        class_names=["a", "b", "c"],
        task_name="train",
    )
    package = root / "out" / "train" / "run" / "task"
    load_task(checkpoint).save_pretrained(package)
    images = [root / "images" / f"{i}.png" for i in range(2)]
    for i, path in enumerate(images):
        write_image(path, seed=i, size=(40, 36))
    return root, checkpoint, package, images


def test_any_valid_name_is_served_even_a_module_attribute(run):
    root, checkpoint, package, images = run
    store = MultiTaskClassifier.from_sources({name: package for name in MODULE_ATTRIBUTES})
    assert store.task_names == MODULE_ATTRIBUTES
    from torchvision import transforms as T

    prepare = T.Compose(
        [
            T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    from PIL import Image

    batch = prepare(Image.open(images[0]).convert("RGB"))[None].repeat(len(MODULE_ATTRIBUTES), 1, 1, 1)
    with torch.no_grad():
        probabilities = store(batch, MODULE_ATTRIBUTES).softmax(-1)
    want = task_probabilities(checkpoint, images[0])
    for row in probabilities:
        torch.testing.assert_close(row, want, atol=1e-5, rtol=0)
    assert store.eval() is store and not store.training  # the module's own attributes are untouched


def test_vpt_predict_serves_a_folder_run_named_train(run):
    root, checkpoint, package, images = run
    out = root / "predictions.csv"
    result = run_cli_in_process(
        "predict", [package, "--images", root / "images", "--out", out, "--top-k", "3", "--no-progress-bar"], root
    )
    assert result.returncode == 0, result.stderr
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["path"].split("/")[-1], row["task"]) for row in rows] == [("0.png", "train"), ("1.png", "train")]
    for row, image in zip(rows, images):
        top = task_probabilities(checkpoint, image).topk(3)
        assert [row[f"class_{r}"] for r in (1, 2, 3)] == [["a", "b", "c"][i] for i in top.indices.tolist()]
        assert [float(row[f"probability_{r}"]) for r in (1, 2, 3)] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_vpt_serve_serves_a_folder_run_named_train(run, monkeypatch):
    """``vpt-serve <run>/task`` in this process up to the server (``serve`` and the final ``os._exit`` replaced):
    the store it serves lists ``train`` and answers for it as the task alone; the task routes list it."""
    pytest.importorskip("litserve")
    from starlette.testclient import TestClient

    import vpt_lightning.cli.serve as serve_cli
    import vpt_lightning.serving.server as server
    from vpt_lightning.serving.images import task_transforms

    root, checkpoint, package, images = run
    served = {}

    def serve(model, **options):
        served["tasks"] = TestClient(server.build_server(model, accelerator="cpu").app).get("/tasks").json()
        transform = task_transforms(model)["train"]
        from PIL import Image

        with torch.no_grad():
            served["probabilities"] = model(transform(Image.open(images[0]).convert("RGB"))[None], ["train"]).softmax(
                -1
            )

    def exit_(status):
        raise SystemExit(status)

    monkeypatch.setattr(server, "serve", serve)
    monkeypatch.setattr(serve_cli.os, "_exit", exit_)
    monkeypatch.delenv("LIT_SERVER_API_KEY", raising=False)
    result = run_cli_in_process("serve", [package, "--accelerator", "cpu"], root)
    assert result.returncode == 0, result.stderr
    assert "1 task(s) ['train']" in result.stdout
    assert [task["name"] for task in served["tasks"]["tasks"]] == ["train"]
    torch.testing.assert_close(served["probabilities"][0], task_probabilities(checkpoint, images[0]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "root, name",
    [("/data/my-photos", "my-photos"), ("/data/My photos.v2/", "My_photos_v2"), ("flowers", "flowers")],
)
def test_a_folder_run_is_named_after_its_folder(root, name):
    assert compose(["data=folder", f"data.root={root}"]).task_name == name


def test_a_given_task_name_or_an_experiment_still_names_the_run():
    assert compose(["data=folder", "data.root=/data/photos", "task_name=mine"]).task_name == "mine"
    assert compose(["+experiment=quickstart"]).task_name == "quickstart"
    assert compose([]).task_name == "train"  # the synthetic default data: no folder to be named after


def test_a_folder_run_writes_its_folder_name_into_results_package_and_card(tmp_path):
    from vpt_lightning.runs.training import train

    photos = tmp_path / "my-photos"
    for label in ("cat", "dog"):
        for i in range(4):
            write_image(photos / "train" / label / f"{i}.png", seed=i + (10 if label == "dog" else 0), size=12)
    cfg = compose(
        [
            "backbone=vit_tiny_random",
            "trainer=cpu",
            "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "optim.warmup_epochs=0",
            "data=folder",
            f"data.root={photos}",
            "data.img_size=32",
            "data.batch_size=4",
            "data.num_workers=0",
            "data.val_fraction=0.25",
            f"paths.output_dir={tmp_path / 'out'}",
            f"run_dir={tmp_path / 'out' / 'run'}",
            "test=false",
        ]
    )
    assert str(cfg.hydra.run.dir).startswith(f"{tmp_path / 'out'}{os.sep}my-photos{os.sep}")  # the run folder too
    results = train(cfg)
    assert results["task_name"] == "my-photos"
    package = tmp_path / "out" / "run" / "task"
    config = json.loads((package / "config.json").read_text())
    assert config["task_name"] == "my-photos" and config["class_names"] == ["cat", "dog"]
    card = (package / "README.md").read_text()
    assert "my-photos" in card and "| train |" not in card


def test_a_bad_task_name_is_refused_before_training(tmp_path):
    args = ["task_name=my photos", *TINY_RUN, f"paths.output_dir={tmp_path}"]  # quick even if it trained
    result = run_cli_in_process("train", args, tmp_path)
    assert result.returncode != 0
    assert "task name 'my photos'" in result.stderr and "may hold only" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))
