"""The offline quickstart: synthetic data, the packaged pretrained backbone, its rebuild script, the example."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vpt_lightning import create_backbone
from vpt_lightning.backbones.quickstart import QUICKSTART_ARCH, build_quickstart_vit, pretrain_backbone
from vpt_lightning.config import asset_path, compose
from vpt_lightning.data.synthetic import SYNTHETIC_TASKS, SyntheticDataModule, SyntheticDataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("task", sorted(SYNTHETIC_TASKS))
def test_synthetic_images_are_reproducible_and_labelled(task):
    a, b = SyntheticDataset(task, 20, seed=5), SyntheticDataset(task, 20, seed=5)
    other = SyntheticDataset(task, 20, seed=6)
    image, label = a[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    torch.testing.assert_close(image, b[3][0])
    assert not torch.allclose(image, other[3][0])
    labels = [a[i][1] for i in range(20)]
    assert all(0 <= y < SYNTHETIC_TASKS[task].num_classes for y in labels) and len(set(labels)) > 1


def test_synthetic_normalisation_matches_hand_computation():
    ds = SyntheticDataset("count", 4, seed=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    raw, _ = ds.sample(2)
    torch.testing.assert_close(ds[2][0], (torch.from_numpy(raw).permute(2, 0, 1) - 0.5) / 0.25)


def test_synthetic_splits_do_not_overlap_and_final_merges_train_val():
    dm = SyntheticDataModule(task="location", num_train=16, num_val=8, num_test=8, num_workers=0)
    dm.setup()
    train = {dm.train_dataset[i][0].sum().item() for i in range(16)}
    val = {dm.val_dataset[i][0].sum().item() for i in range(8)}
    assert not train & val
    final = SyntheticDataModule(task="location", num_train=16, num_val=8, num_test=8, split="final", num_workers=0)
    final.setup()
    assert len(final.train_dataset) == 24 and final.val_dataset is None and final.val_dataloader() == []


def test_count_task_draws_the_labelled_number_of_shapes():
    task = SYNTHETIC_TASKS["count"]
    for index in range(20):
        shapes, label = task.make(np.random.default_rng([0, index]), 32)
        assert len(shapes) == label + 1


def test_kind_task_draws_one_shape_of_the_labelled_kind_and_every_task_names_its_group():
    task = SYNTHETIC_TASKS["kind"]
    labels = set()
    for index in range(60):
        shapes, label = task.make(np.random.default_rng([0, index]), 32)
        assert len(shapes) == 1 and shapes[0].kind == label and shapes[0].radius >= 0.12 * 32
        labels.add(label)
    assert labels == set(range(6))
    assert {name: t.group for name, t in SYNTHETIC_TASKS.items()} == {
        "shapes": "upstream",
        "kind": "natural",
        "count": "structured",
        "location": "structured",
        "orientation": "structured",
    }


def test_packaged_backbone_loads_and_is_not_random():
    cfg = compose(["+experiment=quickstart"])
    model, identity = create_backbone(dict(cfg.backbone))
    random_model, random_identity = create_backbone({**dict(cfg.backbone), "checkpoint_path": None})
    assert identity["weights"] == "file" and identity["fingerprint"] != random_identity["fingerprint"]
    assert Path(asset_path("quickstart_vit.safetensors")).stat().st_size < 3_000_000
    assert dict(cfg.backbone.kwargs) == QUICKSTART_ARCH["kwargs"]


def test_the_quickstart_architecture_and_schedule_are_written_once():
    """The pretraining script reads the architecture from conf/backbone/quickstart_vit.yaml and steps the package's
    warm-up + cosine schedule (vpt_lightning.schedule): its source holds no copy of either."""
    import inspect

    import vpt_lightning.backbones.quickstart as quickstart

    source = inspect.getsource(quickstart)
    for key in QUICKSTART_ARCH["kwargs"]:
        assert f'"{key}"' not in source and f"{key}=" not in source, f"quickstart.py repeats the architecture's {key}"
    assert "math.cos" not in source and "warmup_cosine_factor(" in source
    assert QUICKSTART_ARCH == {"name": compose([]).backbone.name, "kwargs": dict(compose([]).backbone.kwargs)}


def test_pretraining_script_writes_a_loadable_backbone(tmp_path):
    out = tmp_path / "qs.safetensors"
    accuracy = pretrain_backbone(out, num_samples=64, epochs=1, batch_size=16, max_steps=2)
    assert 0.0 <= accuracy <= 100.0 and out.is_file()
    model, _ = create_backbone({**QUICKSTART_ARCH, "checkpoint_path": str(out)})
    assert build_quickstart_vit().embed_dim == model.embed_dim


def test_custom_head_example_runs(capsys):
    """The example docstring's quick check, in this process (test_examples.py runs the script itself, defaults and
    all, in a new one)."""
    from vpt_lightning.heads import import_user_code

    import_user_code(str(ROOT / "examples" / "custom_head.py"))
    threads = torch.get_num_threads()  # main() picks the thread count as a command does: this worker keeps its own
    try:
        results = sys.modules["custom_head"].main(["--epochs", "1", "--limit-batches", "2"])
    finally:
        torch.set_num_threads(threads)
    assert 0.0 <= results["test/top1"] <= 1.0
    assert "test top-1 with a cosine head" in capsys.readouterr().out
