"""vpt-viz: each PNG from a real (short) quickstart run, with the plotted numbers checked where they can be."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import payload_checkpoint, read_wandb_records
from PIL import Image

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from vpt_lightning import viz  # noqa: E402
from vpt_lightning.cli.viz import main as vpt_viz  # noqa: E402

# never a login prompt or a network call: W&B offline, in the training subprocess and in vpt-viz run here
_OFFLINE_WANDB = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true", "WANDB_API_KEY": ""}


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch):
    for key, value in _OFFLINE_WANDB.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One quickstart run (VPT-Deep, p=10, on the packaged mini ViT): 2 epochs of 2 batches, csv + TensorBoard +
    W&B (offline)."""
    out = tmp_path_factory.mktemp("viz_run")
    cmd = [
        str(Path(sys.executable).parent / "vpt-train"),
        "+experiment=quickstart",
        "+debug=fast",
        "trainer.max_epochs=2",
        "data.num_test=64",
        "logger=[csv,tensorboard,wandb]",
        f"paths.output_dir={out}",
        "run_name=r",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(_OFFLINE_WANDB, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out / "quickstart" / "r"


def _check_png(path: Path, min_size=(300, 150)) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_size[0] and image.height >= min_size[1]
        assert np.asarray(image.convert("L")).std() > 5  # not a blank canvas
    assert path.stat().st_size < 400_000


def test_curves_png_plots_the_runs_metrics_csv_and_is_logged_to_its_trackers(run_dir, capsys):
    vpt_viz(["curves", str(run_dir)])
    out = capsys.readouterr().out
    _check_png(run_dir / "viz" / "curves.png")
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    expected = {
        key: [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key)] for key in ("train/loss_epoch", "val/top1")
    }
    assert viz.epoch_curves(run_dir) == expected and [e for e, _ in expected["val/top1"]] == [0, 1]
    # the figure is also added to the run's TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "viz/curves" in events.Tags()["images"]
    # and to W&B: a viz run (wandb does not resume offline runs) beside the run's own, in the run folder
    logged = []  # (folder, run record, image entry) of every W&B run file in the run folder holding viz/curves
    run_files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2  # the training run's and the viz run's
    for path in run_files:
        records = read_wandb_records(path)
        info = next(r.run for r in records if r.HasField("run"))
        files = {f.path for r in records if r.HasField("files") for f in r.files.files}
        for record in records:  # an image's fields are history items with the nested key ("viz/curves", field)
            image = {
                i.nested_key[1]: json.loads(i.value_json)
                for i in record.history.item
                if list(i.nested_key[:1]) == ["viz/curves"] and len(i.nested_key) == 2
            }
            if image:
                logged.append((path.parent, info, image, files))
    assert len(logged) == 1, logged
    ((folder, info, image, files),) = logged
    assert info.display_name == "r" and info.job_type == "viz" and info.project == "vpt-lightning"
    assert f"wandb sync {folder}" in out
    # the image entry points to the PNG wandb copied into the run's files (media/images/...): the same pixels
    assert image["_type"] == "image-file" and image["path"].startswith("media/images/") and image["path"] in files
    with Image.open(folder / "files" / image["path"]) as copied, Image.open(run_dir / "viz" / "curves.png") as drawn:
        assert copied.size == drawn.size == (image["width"], image["height"])
        assert np.array_equal(np.asarray(copied.convert("RGB")), np.asarray(drawn.convert("RGB")))


def test_attention_maps_are_softmax_rows_from_the_trained_model(run_dir, tmp_path):
    module, found = viz.load_task_for_viz(run_dir)
    assert found == run_dir and module.prompt_config.num_tokens == 10
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    reference = module.backbone(images)  # fused attention, no hooks
    maps = viz.attention_maps(module, images)
    attention = maps["attention"]
    depth, tokens = len(module.backbone.model.blocks), 1 + 10 + 64  # class token, prompts, 8 x 8 patches
    assert attention.shape == (depth, 2, 3, tokens, tokens)
    assert torch.allclose(attention.sum(-1), torch.ones(depth, 2, 3, tokens), atol=1e-5)
    assert torch.allclose(maps["cls_to_patches"], attention[:, :, :, 0, 11:].mean(2).reshape(depth, 2, 8, 8))
    assert torch.allclose(
        maps["prompts_to_patches"], attention[:, :, :, 1:11, 11:].mean((2, 3)).reshape(depth, 2, 8, 8)
    )
    # extraction leaves the model as it was: same features, fused attention switched back on
    assert torch.allclose(module.backbone(images), reference, atol=1e-5)
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{k}.png"
        )
    vpt_viz(["attention", str(run_dir), "--images", str(folder), "--num-images", "2"])
    _check_png(run_dir / "viz" / "attention.png", (400, 300))


def test_tsne_png_compares_prompted_and_frozen_features(run_dir):
    module, _ = viz.load_task_for_viz(run_dir)
    datamodule = viz.run_datamodule(run_dir, module)
    datamodule.setup("test")
    prompted, frozen, labels = viz.pooled_features(module, datamodule.test_dataloader(), 40)
    images, targets = next(iter(datamodule.test_dataloader()))
    with torch.no_grad():  # independent: the timm model alone (num_classes=0: its pooled features) and the head input
        assert np.allclose(frozen, module.backbone.model(images)[:40].numpy(), atol=1e-5)
        assert np.allclose(prompted, module.backbone(images)[:40].numpy(), atol=1e-5)
    assert np.array_equal(labels, targets[:40].numpy()) and not np.allclose(prompted, frozen)
    vpt_viz(["tsne", str(run_dir), "--split", "test", "--max-samples", "64"])
    _check_png(run_dir / "viz" / "tsne_test.png", (500, 200))


def _protocol(root: Path, name: str, num_tokens: int, depth, seeds: dict) -> None:
    """A vpt-tune protocol folder as the protocol writes it (summary.json, final runs' results.json)."""
    folder = root / name
    (folder / "final" / "lr1_wd0" / "seed1").mkdir(parents=True)
    config = {"prompt": {"num_tokens": num_tokens, "deep": True, "depth": depth}, "backbone": {"kwargs": {"depth": 6}}}
    (folder / "final" / "lr1_wd0" / "seed1" / "results.json").write_text(json.dumps({"config": config}))
    summary = {
        "task_name": "quickstart",
        "tuning": "vpt_deep",
        "selected": {"base_lr": 1.0, "weight_decay": 0.0, "num_tokens": None, "val/top1": 0.5},
        "test_top1_per_seed": seeds,
    }
    (folder / "summary.json").write_text(json.dumps(summary))


def test_ablation_png_plots_seed_means_and_stds(tmp_path):
    per_seed = {
        (1, None): {"1": 0.5, "2": 0.6},
        (10, None): {"1": 0.7, "2": 0.75, "3": 0.8},
        (50, None): {"1": 0.72, "2": 0.7},
        (10, 2): {"1": 0.6, "2": 0.62},
        (10, 4): {"1": 0.66, "2": 0.7},
    }
    for (p, depth), seeds in per_seed.items():
        _protocol(tmp_path, f"p{p}_d{depth}", p, depth, seeds)
    vpt_viz(["ablation", str(tmp_path)])
    _check_png(tmp_path / "ablation.png")
    from vpt_lightning.protocol.report import find_summaries

    data = viz.ablation_points(find_summaries([tmp_path]))
    ((name, length_line),) = data["length"].items()
    assert name == "quickstart / vpt_deep (depth=6)"
    assert [v for x, m, s, _ in length_line for v in (x, m, s)] == pytest.approx(
        [
            v
            for p in (1, 10, 50)
            for v in (p, statistics.fmean(per_seed[(p, None)].values()), statistics.stdev(per_seed[(p, None)].values()))
        ]
    )
    ((name, depth_line),) = data["depth"].items()
    assert name == "quickstart / vpt_deep (p=10)" and [x for x, *_ in depth_line] == [2, 4, 6]
    assert depth_line[2][3] == list(per_seed[(10, None)].values())


def test_vpt_viz_errors_name_the_problem_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vpt_viz(["curves", str(tmp_path / "missing")])
    assert exit_info.value.code == 1  # an error of the user's (argparse's usage errors are 2)
    err = capsys.readouterr().err
    assert err.startswith("vpt-viz: error: ") and err.count("\n") == 1
    assert "metrics.csv" in err and "does not exist" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        vpt_viz(["tsne", str(tmp_path)])
    assert "is not a run folder" in capsys.readouterr().err
    _protocol(tmp_path / "one", "p10", 10, None, {"1": 0.5})
    with pytest.raises(SystemExit):
        vpt_viz(["ablation", str(tmp_path / "one")])
    assert "none differ in prompt length or depth" in capsys.readouterr().err


def test_vpt_viz_refuses_a_checkpoint_with_a_payload_and_never_runs_it(run_dir, tmp_path, capsys):
    payload_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / "evil.ckpt", tmp_path / "ran")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (120, 30, 200)).save(tmp_path / "images" / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        vpt_viz(["attention", str(tmp_path / "evil.ckpt"), "--images", str(tmp_path / "images")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "evil.ckpt' was refused: it asks to unpickle" in err, err
    assert not (tmp_path / "ran").exists()  # the payload never ran


def test_a_task_on_a_weights_file_backbone_is_drawn_with_the_operators_pin(tmp_path, capsys):
    """A checkpoint names its backbone weights file; vpt-viz never opens a file a checkpoint names, so it asks for
    --backbone FILE, as vpt-predict does, and draws with it."""
    from conftest import TINY, make_vit, save_task_checkpoint
    from safetensors.torch import save_file

    weights = tmp_path / "backbone.safetensors"
    save_file(make_vit(seed=3).state_dict(), str(weights))
    backbone = {"name": "vit_tiny_patch16_224", "kwargs": TINY, "checkpoint_path": str(weights)}
    ckpt = save_task_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", backbone=backbone)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (120, 30, 200)).save(tmp_path / "images" / "a.png")
    out = tmp_path / "attention.png"
    with pytest.raises(SystemExit) as exit_info:
        vpt_viz(["attention", str(ckpt), "--images", str(tmp_path / "images"), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "--backbone" in err and err.count("\n") == 1, err
    vpt_viz(
        ["attention", str(ckpt), "--images", str(tmp_path / "images"), "--out", str(out), "--backbone", str(weights)]
    )
    _check_png(out, (300, 100))


# ---- the attention figure: a colour bar per row, images across the folder's classes --------------------------------
@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory) -> Path:
    """A task checkpoint (tiny ViT, 4 blocks, VPT-Deep with 5 prompts) as vpt-train writes it, untrained."""
    from conftest import save_task_checkpoint

    path = tmp_path_factory.mktemp("tiny") / "run" / "checkpoints" / "last.ckpt"
    return save_task_checkpoint(path, prompt={"num_tokens": 5, "deep": True})


def _class_tree(root: Path, classes=("cat", "dog", "fox"), per_class: int = 3) -> Path:
    """A class-per-folder image tree (``root/<class>/<k>.png``), as a folder dataset reads it."""
    from conftest import write_image

    for c, name in enumerate(classes):
        for k in range(per_class):
            write_image(root / name / f"{k}.png", seed=10 * c + k, size=32)
    return root


def test_attention_images_are_taken_across_the_folders_classes_in_turn(tiny_task, tmp_path):
    """A class-per-folder tree: the shown images come from each sub-folder in turn (sorted), not the first files
    of one class; the names shown say the folder."""
    module, _ = viz.load_task_for_viz(tiny_task)
    root = _class_tree(tmp_path / "images")
    Image.new("RGB", (32, 32), (10, 200, 30)).save(root / "top.png")  # the top of the tree: a group of its own
    _, _, names = viz.load_images(root, module, 3)
    assert names == ["top.png", "cat/0.png", "dog/0.png"]
    _, _, names = viz.load_images(root / "cat", module, 2)
    assert names == ["0.png", "1.png"]
    _, shown, names = viz.load_images(root, module, 6)
    assert names == ["top.png", "cat/0.png", "dog/0.png", "fox/0.png", "cat/1.png", "dog/1.png"]
    assert shown.shape == (6, 32, 32, 3)
    with pytest.raises(ValueError, match="--num-images must be at least 1, not 0"):
        viz.load_images(root, module, 0)


def test_attention_figure_has_a_colour_bar_per_row_on_one_scale(tiny_task, tmp_path):
    """Each row (one image's class-token maps, or its prompts' maps, across the blocks) shares one colour scale,
    from the row's smallest to its largest value, and has a colour bar."""
    module, _ = viz.load_task_for_viz(tiny_task)
    images, shown, names = viz.load_images(_class_tree(tmp_path / "images"), module, 2)
    figure, maps = viz.attention_figure(module, images, shown, names)
    blocks = len(module.backbone.model.blocks)
    rows = [("cls_to_patches", b) for b in range(2)] + [("prompts_to_patches", b) for b in range(2)]
    bars = [ax for ax in figure.axes if getattr(ax, "_colorbar", None) is not None]
    assert len(bars) == len(rows) == 4
    maps_axes = [ax for ax in figure.axes if ax.images and getattr(ax, "_colorbar", None) is None]
    by_row = {}
    for ax in maps_axes:
        (image,) = ax.images
        if image.get_array().ndim == 2:  # an attention map (the photos are RGB)
            by_row.setdefault(ax.get_subplotspec().rowspan.start, []).append(image)
    assert len(by_row) == 4 and all(len(images_) == blocks for images_ in by_row.values())
    scales = {row: {(im.norm.vmin, im.norm.vmax) for im in images_} for row, images_ in by_row.items()}
    assert all(len(s) == 1 for s in scales.values())  # one scale along each row
    expected = sorted((float(maps[key][:, b].min()), float(maps[key][:, b].max())) for key, b in rows)
    drawn = sorted(next(iter(s)) for s in scales.values())
    assert np.allclose(drawn, expected) and all(low < high for low, high in drawn)
    assert "attention weight" in figure.get_suptitle() and "one scale per row" in figure.get_suptitle()
    assert names == ["cat/0.png", "dog/0.png"]
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert "cat/0.png" in titles and "dog/0.png" in titles
    viz.save_figure(figure, tmp_path / "attention.png")
    _check_png(tmp_path / "attention.png", (400, 300))


def test_vpt_viz_help_says_what_every_option_is(capsys):
    from vpt_lightning.cli.viz import _parser

    parser = _parser()
    subparsers = next(a for a in parser._actions if a.dest == "kind").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"vpt-viz {name} {action.option_strings or action.dest} has no help text"
