"""The one pass of MultiTaskClassifier over a batch that mixes VPT-Deep/Shallow tasks of different prompt lengths,
LoRA, Adapter, linear and MLP tasks: each row equals its task's own module, the shared model is never changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE, quiet_trainer

from vpt_lightning import VPTModule
from vpt_lightning.serving.multitask import MultiTaskClassifier
from vpt_lightning.serving.task_updates import Routing, routed_updates

pytest.importorskip("peft")

TASKS = {
    "deep1": dict(num_classes=3, prompt={"num_tokens": 1}),
    "deep20": dict(num_classes=4, prompt={"num_tokens": 20, "project": 8}),
    "deep7_late": dict(num_classes=2, prompt={"num_tokens": 7, "depth": [1, 3]}),
    "shallow5": dict(num_classes=5, prompt={"num_tokens": 5, "deep": False}, tuning={"method": "vpt_shallow"}),
    "lora_qkv": dict(num_classes=3, prompt={"num_tokens": 0}, tuning={"method": "lora", "rank": 2, "alpha": 4}),
    "lora_mlp": dict(
        num_classes=6, prompt={"num_tokens": 0}, tuning={"method": "lora", "rank": 3, "target_modules": ["fc1", "fc2"]}
    ),
    "adapter": dict(num_classes=4, prompt={"num_tokens": 0}, tuning={"method": "adapter", "reduction": 4}),
    "linear": dict(num_classes=2, prompt={"num_tokens": 0}, tuning={"method": "linear"}),
    "deep200": dict(num_classes=3, prompt={"num_tokens": 200}),
}
NO_CARRIED_PROMPTS = ["deep1", "deep20", "deep200", "lora_qkv", "lora_mlp", "adapter", "linear"]


def random_task_checkpoint(path: Path, seed: int, backbone=TINY_BACKBONE, **kwargs) -> Path:
    """A task checkpoint whose trained tensors are all random (LoRA's B and the adapters' up-projections start at
    zero, which would hide a missing update)."""

    torch.manual_seed(seed)
    module = VPTModule(backbone=backbone, **kwargs)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    trainer = quiet_trainer()
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    return {name: random_task_checkpoint(root / f"{name}.ckpt", i, **kw) for i, (name, kw) in enumerate(TASKS.items())}


@pytest.fixture(scope="module")
def served(checkpoints):
    return MultiTaskClassifier.from_checkpoints(checkpoints)


def own_logits(path: Path, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return VPTModule.load_from_checkpoint(path).eval()(images)


def test_every_task_joins_the_one_pass_and_each_row_equals_its_task_alone(served, checkpoints):
    assert all(served.updates[name] is not None for name in TASKS)
    assert set(served.updates["lora_qkv"]) == {f"blocks.{i}.attn.qkv" for i in range(4)}
    assert len(served.updates["lora_mlp"]) == 8 and len(served.updates["adapter"]) == 4
    names = [list(TASKS)[i % len(TASKS)] for i in (4, 0, 3, 7, 8, 1, 6, 2, 5, 0, 4, 6, 8, 3, 1, 5, 7, 2, 4)]
    torch.manual_seed(1)
    images = torch.randn(len(names), 3, 32, 32)
    with torch.no_grad():
        logits = served(images, served.task_index(names))
    for name, path in checkpoints.items():
        rows = [i for i, n in enumerate(names) if n == name]
        width = TASKS[name]["num_classes"]
        torch.testing.assert_close(logits[rows, :width], own_logits(path, images[rows]), rtol=0, atol=1e-5)
        assert torch.isneginf(logits[rows, width:]).all()


@pytest.mark.parametrize("name", ["lora_qkv", "lora_mlp", "adapter", "deep20"])
def test_each_method_changes_its_rows(served, name):
    """Without its update (or prompts) the task's head on the plain shared features gives other logits."""
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        mixed = served(images, served.task_index([name, "linear", name]))[[0, 2], : TASKS[name]["num_classes"]]
        plain = served.tasks[name].head(served.backbone(images[[0, 2]]))
    assert (mixed - plain).abs().max() > 1e-2


def test_image_tokens_run_once_through_each_shared_module_and_no_task_network_runs(served, monkeypatch):
    """One pass: the shared MLP of a block sees the whole batch in one call; no task has a network of its own (its
    prompts, updates and head are tensors), and none is built for the pass."""
    from vpt_lightning.serving.task_tensors import TaskLayout, TaskTensors

    names = [NO_CARRIED_PROMPTS[i % len(NO_CARRIED_PROMPTS)] for i in range(10)]
    assert all(isinstance(served.tasks[n], TaskTensors) and served.tasks[n].model is None for n in NO_CARRIED_PROMPTS)
    calls, built = [], []
    own_model = TaskLayout.own_model
    monkeypatch.setattr(TaskLayout, "own_model", lambda *a: built.append(a) or own_model(*a))
    hook = served.model.blocks[2].mlp.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        with torch.no_grad():
            served(torch.randn(len(names), 3, 32, 32), served.task_index(names))
    finally:
        hook.remove()
    assert calls == [len(names)] and built == []


def test_adding_lora_and_adapter_tasks_leaves_the_shared_model_untouched(checkpoints):
    from vpt_lightning.serving.task_tensors import TaskTensors

    model = MultiTaskClassifier.from_checkpoints({"deep1": checkpoints["deep1"]})
    keys = list(model.model.state_dict())
    types = [type(m) for m in model.model.modules()]
    for name in ("lora_qkv", "lora_mlp", "adapter"):
        model.add_task(checkpoints[name], name)
    assert list(model.model.state_dict()) == keys and [type(m) for m in model.model.modules()] == types
    assert not any(p.requires_grad for p in model.model.parameters())
    shared = {p.data_ptr() for p in model.model.parameters()}
    assert {p.data_ptr() for p in model.parameters()} == shared  # weights held once, no parameter of a task's own
    lora = model.tasks["lora_qkv"]
    assert isinstance(lora, TaskTensors) and lora.model is None  # its updates are tensors, not peft modules
    # a LoRA task's own bytes: its A and B matrices and its head
    rank, dim, blocks = 2, 32, 4
    assert model.memory_bytes()["task:lora_qkv"] == ((dim * rank + rank * 3 * dim) * blocks + dim * 3 + 3) * 4


def test_a_batch_of_one_task_and_a_batch_mixed_with_a_task_outside_the_pass(served, checkpoints, tmp_path):
    """A ``prompt.location='add'`` task runs through its own copy; the others still share one pass."""
    added = random_task_checkpoint(
        tmp_path / "added.ckpt", 9, num_classes=3, prompt={"num_tokens": 1, "location": "add"}
    )
    model = MultiTaskClassifier.from_checkpoints(
        {"added": added, "lora_qkv": checkpoints["lora_qkv"], "shallow5": checkpoints["shallow5"]}
    )
    assert model.updates["added"] is None
    names = ["lora_qkv", "added", "shallow5", "lora_qkv", "added"]
    images = torch.randn(len(names), 3, 32, 32)
    with torch.no_grad():
        logits = model(images, model.task_index(names))
        alone = model(images[:1], model.task_index(["lora_qkv"]))
    for name, path in (("added", added), ("lora_qkv", checkpoints["lora_qkv"]), ("shallow5", checkpoints["shallow5"])):
        rows = [i for i, n in enumerate(names) if n == name]
        width = 5 if name == "shallow5" else 3
        torch.testing.assert_close(logits[rows, :width], own_logits(path, images[rows]), rtol=0, atol=1e-5)
    torch.testing.assert_close(alone, logits[:1, :3], rtol=0, atol=1e-5)


def test_routed_updates_refuse_rows_the_routing_does_not_cover(served):
    update = {0: {"blocks.0.attn.qkv": lambda x, out: torch.zeros_like(out)}}
    with routed_updates(served.model, update, Routing([(0, 0, 2)])):
        with pytest.raises(RuntimeError, match="3 rows but the routing covers"):
            served.model.blocks[0].attn.qkv(torch.randn(3, 5, 32))
    assert not served.model.blocks[0].attn.qkv._forward_hooks  # removed on exit


SWIN = {
    "name": "swin_tiny_patch4_window7_224",
    "init_seed": 0,
    "kwargs": {"img_size": 32, "window_size": 4, "embed_dim": 32, "depths": [2, 2], "num_heads": [2, 4]},
}


def test_swin_tasks_run_one_pass_per_task_and_a_lora_task_joins_them(tmp_path):
    """Swin has no one-pass path: each task's rows run through the task's own copy, a LoRA task among them."""
    deep = random_task_checkpoint(tmp_path / "deep.ckpt", 1, num_classes=3, backbone=SWIN, prompt={"num_tokens": 3})
    lora = random_task_checkpoint(
        tmp_path / "lora.ckpt",
        2,
        num_classes=4,
        backbone=SWIN,
        prompt={"num_tokens": 0},
        tuning={"method": "lora", "rank": 2},
    )
    model = MultiTaskClassifier.from_checkpoints({"deep": deep, "lora": lora})
    assert model.updates == {"deep": None, "lora": None}
    assert not any("lora" in k for k in model.model.state_dict())
    names = ["lora", "deep", "lora"]
    images = torch.randn(len(names), 3, 32, 32)
    with torch.no_grad():
        logits = model(images, model.task_index(names))
    torch.testing.assert_close(logits[[0, 2], :4], own_logits(lora, images[[0, 2]]), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[[1], :3], own_logits(deep, images[[1]]), rtol=0, atol=1e-5)


def test_a_global_forward_hook_sends_each_task_through_its_own_backbone(served):
    """The one pass does not call the blocks' forward, so a global hook (e.g. a profiler's) makes it step aside."""
    from torch.nn.modules.module import register_module_forward_hook

    names = ["deep20", "lora_qkv", "adapter", "deep20"]
    images = torch.randn(len(names), 3, 32, 32)
    with torch.no_grad():
        expected = served(images, served.task_index(names))
        seen = []
        handle = register_module_forward_hook(lambda m, i, o: seen.append(m))
        try:
            logits = served(images, served.task_index(names))
        finally:
            handle.remove()
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    blocks = [m for m in seen if type(m).__name__ == "Block"]
    assert len(blocks) == 3 * 4 and not any(b is s for b in blocks for s in served.model.blocks)
