"""VPTModule: training, the learning-rate rule and schedule, small checkpoints, identity checks, resume."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_BACKBONE, make_vit, quiet_trainer
from safetensors.torch import save_file

from vpt_lightning import VPTModule
from vpt_lightning.data.synthetic import SyntheticDataModule
from vpt_lightning.module import OptimConfig
from vpt_lightning.schedule import warmup_cosine_factor

D, BLOCKS = 32, 4


def make_module(**overrides) -> VPTModule:
    kwargs = dict(
        num_classes=9,
        backbone=TINY_BACKBONE,
        prompt=dict(num_tokens=5, deep=True),
        optim=dict(base_lr=2.0, weight_decay=1e-4, warmup_epochs=1),
    )
    kwargs.update(overrides)
    return VPTModule(**kwargs)


def make_data(batch_size=16, **kwargs) -> SyntheticDataModule:
    kwargs = {"task": "location", "num_train": 64, "num_val": 32, "num_test": 32, "num_workers": 0, **kwargs}
    return SyntheticDataModule(batch_size=batch_size, **kwargs)


def make_trainer(tmp_path, max_epochs=2, callbacks=(), **kwargs) -> pl.Trainer:
    return quiet_trainer(tmp_path, max_epochs=max_epochs, devices=1, callbacks=list(callbacks), **kwargs)


class RecordLR(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_trainable_parameters_are_prompts_and_head():
    module = make_module()
    names = sorted(n for n, p in module.named_parameters() if p.requires_grad)
    assert names == ["backbone.prompts.tokens", "head.bias", "head.weight"]
    counts = module.parameter_counts()
    assert counts["trainable_params"] == BLOCKS * 5 * D + D * 9 + 9
    assert counts["trainable_percent"] == pytest.approx(100 * counts["trainable_params"] / counts["backbone_params"])


def test_training_changes_prompts_and_head_only_with_scaled_lr_and_schedule(tmp_path):
    module = make_module()
    frozen_before = {k: v.clone() for k, v in module.backbone.vit.state_dict().items()}
    prompts_before = module.backbone.prompts.tokens.detach().clone()
    recorder = RecordLR()
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[recorder])
    trainer.fit(module, datamodule=make_data(batch_size=16))
    for k, v in module.backbone.vit.state_dict().items():
        torch.testing.assert_close(v, frozen_before[k], rtol=0, atol=0)
    assert not torch.allclose(module.backbone.prompts.tokens, prompts_before)
    # 64 images / batch 16 = 4 steps per epoch, 12 in all, 4 of warm-up; lr = 2.0 * 16 / 256
    peak = 2.0 * 16 / 256
    expected = [peak * warmup_cosine_factor(s, 4, 12) for s in range(12)]
    assert recorder.lrs == pytest.approx(expected)
    # independent check of the shape: linear ramp then half a cosine down
    assert recorder.lrs[:4] == pytest.approx([peak * (s + 1) / 4 for s in range(4)])
    assert recorder.lrs[4:] == pytest.approx([peak * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)])


def test_lr_scales_with_gradient_accumulation(tmp_path):
    module = make_module()
    recorder = RecordLR()
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[recorder], accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(module, datamodule=make_data(batch_size=8))
    assert module.learning_rate() == pytest.approx(2.0 * 8 * 2 / 256)


@pytest.mark.parametrize("tuning", [None, {"method": "full"}])
def test_accumulated_step_equals_a_hand_computed_sgd_update(tmp_path, tuning):
    """Gradients are zeroed at the start of each accumulation window (before the forward): two accumulated batches
    still give one SGD step on the mean of their gradients, for prompts and, in full fine-tuning, every weight."""
    import copy

    module = make_module(**({"tuning": tuning, "prompt": {"num_tokens": 0}, "backbone_eval": False} if tuning else {}))
    start = copy.deepcopy(module)
    batches, recorder = [], RecordLR()

    class Keep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.append([t.clone() for t in batch])

    trainer = make_trainer(
        tmp_path,
        max_epochs=1,
        callbacks=[recorder, Keep()],
        accumulate_grad_batches=2,
        limit_train_batches=2,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=make_data(batch_size=8))
    assert len(batches) == 2 and trainer.global_step == 1
    start.train()
    params = [p for p in start.parameters() if p.requires_grad]
    loss = sum(start.criterion(start(x), y) / 2 for x, y in batches)  # Lightning divides by the accumulation
    grads = torch.autograd.grad(loss, params)
    lr, wd = recorder.lrs[0], module.optim_config.weight_decay
    trained = dict(module.named_parameters())
    for (name, p), g in zip(((n, p) for n, p in start.named_parameters() if p.requires_grad), grads):
        torch.testing.assert_close(trained[name], p - lr * (g + wd * p), rtol=1e-4, atol=1e-6)  # SGD's first step


def test_checkpoint_holds_only_trained_tensors_and_reloads_to_identical_logits(tmp_path, images):
    module = make_module()
    trainer = make_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=make_data())
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert sorted(saved["state_dict"]) == ["backbone.prompts.tokens", "head.bias", "head.weight"]
    assert saved["vpt_backbone_identity"]["fingerprint"] == module.backbone_identity["fingerprint"]
    reloaded = VPTModule.load_from_checkpoint(path).eval()
    module.eval()
    torch.testing.assert_close(reloaded(images), module(images), rtol=0, atol=0)


def test_checkpoint_refuses_another_backbone(tmp_path):
    module = make_module()
    path = tmp_path / "task.ckpt"
    make_trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(module, datamodule=make_data())
    module.trainer.save_checkpoint(path)
    other = {**TINY_BACKBONE, "init_seed": 5}
    with pytest.raises(ValueError, match="trained on another backbone.*fingerprint"):
        VPTModule.load_from_checkpoint(path, backbone=other)


def _task_checkpoint(tmp_path, module):
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, datamodule=make_data())
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_checkpoint_reloads_onto_the_same_weights_from_another_source(tmp_path, images):
    module = make_module().eval()  # trained on a random init (init_seed 0)
    path = _task_checkpoint(tmp_path, module)
    weights = module.backbone.vit.state_dict()
    torch.save(weights, tmp_path / "backbone.pth")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "backbone.safetensors"))
    for backbone in (
        {**TINY_BACKBONE, "checkpoint_path": str(tmp_path / "backbone.pth")},
        # another timm name with the same architecture, and a training-only kwarg: only information
        {**TINY_BACKBONE, "name": "vit_small_patch16_224", "checkpoint_path": str(tmp_path / "backbone.safetensors")},
        {**TINY_BACKBONE, "kwargs": {**TINY_BACKBONE["kwargs"], "drop_path_rate": 0.1}},
    ):
        reloaded = VPTModule.load_from_checkpoint(path, backbone=backbone).eval()
        torch.testing.assert_close(reloaded(images), module(images), rtol=0, atol=0)


def test_checkpoint_refuses_other_weights_or_architecture_naming_the_differences(tmp_path):
    path = _task_checkpoint(tmp_path, make_module())
    torch.save(make_vit(seed=5).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError) as err:
        VPTModule.load_from_checkpoint(path, backbone={**TINY_BACKBONE, "checkpoint_path": str(tmp_path / "other.pth")})
    message = str(err.value)
    assert "trained on another backbone" in message and "fingerprint: checkpoint" in message
    assert "For information: name: checkpoint 'vit_tiny_patch16_224', current 'vit_tiny_patch16_224'" in message
    assert "weights: checkpoint 'random(seed=0)', current 'file'" in message
    # the same weights in a model with another head count (shapes equal, function not)
    torch.save(make_module().backbone.vit.state_dict(), tmp_path / "same.pth")
    heads4 = {**TINY_BACKBONE, "kwargs": {**TINY_BACKBONE["kwargs"], "num_heads": 4}}
    with pytest.raises(ValueError, match=r"architecture.num_heads: checkpoint 2 vs current 4") as err:
        VPTModule.load_from_checkpoint(path, backbone={**heads4, "checkpoint_path": str(tmp_path / "same.pth")})
    assert "fingerprint:" not in str(err.value).split("For information")[0]


def test_resume_continues_the_schedule(tmp_path):
    class Crash(RuntimeError):
        pass

    class CrashInSecondEpoch(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1:
                raise Crash("simulated crash")

    ckpt_dir = tmp_path / "ckpt"
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="last", enable_version_counter=False)
    first = make_module()
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[checkpoint, CrashInSecondEpoch()], limit_val_batches=0)
    with pytest.raises(Crash):
        trainer.fit(first, datamodule=make_data())
    assert (ckpt_dir / "last.ckpt").exists()
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 4

    recorder = RecordLR()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, filename="last", enable_version_counter=False)
    resumed = make_module()
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[checkpoint, recorder], limit_val_batches=0)
    trainer.fit(resumed, datamodule=make_data(), ckpt_path="last")
    assert trainer.global_step == 12 and len(recorder.lrs) == 8  # only epochs 2 and 3 ran again
    peak = 2.0 * 16 / 256
    assert recorder.lrs == pytest.approx([peak * warmup_cosine_factor(s, 4, 12) for s in range(4, 12)])


def test_subclass_hooks_replace_head_and_loss(tmp_path):
    class MLPHeadModule(VPTModule):
        def build_head(self, in_features, num_classes):
            return torch.nn.Sequential(
                torch.nn.Linear(in_features, 16), torch.nn.ReLU(), torch.nn.Linear(16, num_classes)
            )

        def build_loss(self):
            return torch.nn.CrossEntropyLoss(label_smoothing=0.2)

    module = MLPHeadModule(num_classes=9, backbone=TINY_BACKBONE, prompt=dict(num_tokens=2))
    assert isinstance(module.head, torch.nn.Sequential) and module.criterion.label_smoothing == 0.2
    make_trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(module, datamodule=make_data())
    path = tmp_path / "mlp.ckpt"
    module.trainer.save_checkpoint(path)
    assert "head.0.weight" in torch.load(path, weights_only=False)["state_dict"]


def test_subclass_replaces_the_optimizer_through_its_hook(tmp_path):
    """configure_optimizers is a hook: a subclass swaps SGD for AdamW and keeps the trainable set and the schedule."""

    class AdamWModule(VPTModule):
        def configure_optimizers(self):
            config = super().configure_optimizers()  # the package's schedule on the package's parameter set
            adamw = torch.optim.AdamW(self.trainable_parameters(), lr=1e-3)
            config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(
                adamw, config["lr_scheduler"]["scheduler"].lr_lambdas[0]
            )
            return {**config, "optimizer": adamw}

    module = AdamWModule(num_classes=9, backbone=TINY_BACKBONE, prompt=dict(num_tokens=5))
    prompts = module.backbone.prompts.tokens.detach().clone()
    trainer = make_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=make_data())
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in module.trainable_parameters()
    }
    assert all("exp_avg" in optimizer.state[p] for p in module.trainable_parameters())  # AdamW's state, not SGD's
    assert not torch.allclose(module.backbone.prompts.tokens, prompts)


def test_bad_optim_and_class_count_are_named():
    with pytest.raises(ValueError, match="optim.base_lr=-1"):
        make_module(optim=dict(base_lr=-1))
    with pytest.raises(ValueError, match=r"unknown optim option\(s\) \['lr'\]"):
        make_module(optim=dict(lr=1))
    with pytest.raises(ValueError, match="num_classes=0"):
        make_module(num_classes=0)


@pytest.mark.parametrize(
    "optim, message",
    [
        (dict(base_lr="1e-3x"), "optim.base_lr='1e-3x' is not a valid number; it must be a number > 0"),
        (dict(weight_decay="none"), "optim.weight_decay='none' is not a valid number; it must be a number >= 0"),
        (dict(momentum="high"), "optim.momentum='high' is not a valid number; it must be a number in [0, 1)"),
        (dict(momentum=1.5), "optim.momentum=1.5 must be a number in [0, 1)"),
        (dict(warmup_epochs="ten"), "optim.warmup_epochs='ten' is not a valid number; it must be a number >= 0"),
        (dict(lr_batch_size=0), "optim.lr_batch_size=0 must be an integer > 0"),
        (dict(base_lr=float("nan")), "optim.base_lr=nan is not a valid number"),
    ],
)
def test_non_numeric_optim_values_name_the_key(optim, message):
    with pytest.raises(ValueError) as err:
        OptimConfig.from_mapping(optim)
    assert message in str(err.value)
    assert OptimConfig(base_lr="0.5", lr_batch_size="128").base_lr == 0.5


def test_backbone_that_does_not_pool_is_refused():
    backbone = {**TINY_BACKBONE, "kwargs": {**TINY_BACKBONE["kwargs"], "global_pool": ""}}
    with pytest.raises(ValueError, match=r"backbone.kwargs.global_pool='' gives one output per token.*'avg'"):
        make_module(backbone=backbone)


def test_warmup_cosine_factor_edges():
    assert warmup_cosine_factor(0, 0, 10) == pytest.approx(1.0)
    assert warmup_cosine_factor(9, 0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert warmup_cosine_factor(2, 5, 10) == pytest.approx(3 / 5)
    with pytest.raises(ValueError):
        warmup_cosine_factor(0, 0, 0)


def test_data_config_reports_the_built_input_size():
    module = make_module()
    assert module.data_config["input_size"] == (3, 32, 32)
    assert len(module.data_config["mean"]) == 3
