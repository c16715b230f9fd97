"""MultiTaskClassifier: many task checkpoints on one frozen backbone, batches that mix tasks."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BACKBONE, save_task_checkpoint

from vpt_lightning import VPTModule
from vpt_lightning.serving.multitask import MultiTaskClassifier

# tasks that differ in prompt length, depth, location, projection and head
TASKS = {
    "deep10": dict(num_classes=3, prompt={"num_tokens": 10}, tuning={"method": "vpt_deep"}),
    "shallow3": dict(num_classes=5, prompt={"num_tokens": 3, "deep": False}, tuning={"method": "vpt_shallow"}),
    "deep4_late": dict(num_classes=4, prompt={"num_tokens": 4, "depth": [1, 3], "project": 8}),
    "shallow_at2": dict(
        num_classes=2, prompt={"num_tokens": 6, "deep": False, "depth": 2}, tuning={"method": "vpt_shallow"}
    ),
    "linear": dict(num_classes=6, prompt={"num_tokens": 0}, tuning={"method": "linear"}),
    "mlp": dict(num_classes=2, prompt={"num_tokens": 0}, tuning={"method": "mlp", "mlp_layers": 2}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    torch.manual_seed(0)
    return {name: save_task_checkpoint(root / f"{name}.ckpt", **kw) for name, kw in TASKS.items()}


def test_mixed_batch_equals_each_tasks_own_module(checkpoints):
    model = MultiTaskClassifier.from_checkpoints(checkpoints)
    assert model.task_names == list(TASKS)
    torch.manual_seed(1)
    names = [list(TASKS)[i % len(TASKS)] for i in (0, 3, 1, 6, 2, 5, 4, 0, 2, 1, 3, 6, 5, 4)]
    images = torch.randn(len(names), 3, 32, 32)
    with torch.no_grad():
        logits = model(images, model.task_index(names))
    assert logits.shape == (len(names), max(kw["num_classes"] for kw in TASKS.values()))
    for name, path in checkpoints.items():
        own = VPTModule.load_from_checkpoint(path).eval()
        rows = [i for i, n in enumerate(names) if n == name]
        with torch.no_grad():
            expected = own(images[rows])
        width = TASKS[name]["num_classes"]
        torch.testing.assert_close(logits[rows, :width], expected, rtol=0, atol=1e-5)
        assert torch.isneginf(logits[rows, width:]).all()


def test_one_copy_of_the_backbone(checkpoints):
    """The tasks are tensors on the shared model: the classifier's parameters are the backbone's, once."""
    from vpt_lightning.serving.task_tensors import TaskTensors

    model = MultiTaskClassifier.from_checkpoints(checkpoints)
    shared = {p.data_ptr() for p in model.model.parameters()}
    assert {p.data_ptr() for p in model.parameters()} == shared
    assert all(isinstance(task, TaskTensors) and task.model is None for task in model.tasks.values())
    sizes = model.memory_bytes()
    assert sizes["task:linear"] == (32 * 6 + 6) * 4


def test_a_checkpoint_of_other_weights_is_refused_naming_the_difference(checkpoints, tmp_path):
    other = save_task_checkpoint(tmp_path / "other.ckpt", backbone={**TINY_BACKBONE, "init_seed": 3})
    with pytest.raises(ValueError, match=r"other\.ckpt.*another backbone.*fingerprint"):
        MultiTaskClassifier.from_checkpoints([checkpoints["deep10"], other])


def test_a_method_that_trains_the_backbone_is_refused(checkpoints, tmp_path):
    full = save_task_checkpoint(tmp_path / "full.ckpt", prompt={"num_tokens": 0}, tuning={"method": "full"})
    with pytest.raises(ValueError, match="tuning=full changes backbone weights.*VPTModule.load_from_checkpoint"):
        MultiTaskClassifier.from_checkpoints([checkpoints["deep10"], full])


def test_task_names_unknown_and_duplicate(checkpoints):
    model = MultiTaskClassifier.from_checkpoints({"a": checkpoints["deep10"]})
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['b'\]; the tasks are \['a'\]"):
        model.task_index(["a", "b"])
    with pytest.raises(ValueError, match="already taken"):
        model.add_task(checkpoints["linear"], "a")


def test_a_task_the_gathered_pass_cannot_serve_runs_through_its_own_backbone(checkpoints, tmp_path):
    added = save_task_checkpoint(tmp_path / "added.ckpt", num_classes=3, prompt={"num_tokens": 1, "location": "add"})
    model = MultiTaskClassifier.from_checkpoints({"deep10": checkpoints["deep10"], "added": added})
    names = ["added", "deep10", "added", "deep10"]
    images = torch.randn(len(names), 3, 32, 32)
    with torch.no_grad():
        logits = model(images, model.task_index(names))
        for name, path in (("added", added), ("deep10", checkpoints["deep10"])):
            rows = [i for i, n in enumerate(names) if n == name]
            expected = VPTModule.load_from_checkpoint(path).eval()(images[rows])
            torch.testing.assert_close(logits[rows, :3], expected, rtol=0, atol=1e-5)
