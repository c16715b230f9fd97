"""Tuning strategies (the rows of the paper's comparison) train exactly the parameters they name."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from vpt_lightning import VPTModule
from vpt_lightning.config import compose
from vpt_lightning.data.synthetic import SyntheticDataModule
from vpt_lightning.tuning import TuningConfig

HEAD = {"head.weight", "head.bias"}


def build(tuning: str, *overrides: str) -> VPTModule:
    cfg = compose([f"tuning={tuning}", "backbone=vit_tiny_random", *overrides])
    c = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    return VPTModule(5, c(cfg.backbone), c(cfg.prompt), c(cfg.optim), tuning=c(cfg.tuning), backbone_eval=cfg.backbone_eval)


def expected(module: VPTModule, tuning: str):
    vit = {f"backbone.vit.{n}" for n, _ in module.backbone.vit.named_parameters()}
    return {
        "vpt_deep": {"backbone.prompts.tokens"} | HEAD,
        "vpt_shallow": {"backbone.prompts.tokens"} | HEAD,
        "linear": HEAD,
        "full": vit | HEAD,
        "bias": {n for n in vit if n.endswith(".bias")} | HEAD,
        "partial": {n for n in vit if n.startswith(("backbone.vit.blocks.1.", "backbone.vit.norm."))} | HEAD,
        "mlp": {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias", "head.4.weight", "head.4.bias"},
    }[tuning]


@pytest.mark.parametrize("tuning", ["vpt_deep", "vpt_shallow", "linear", "full", "bias", "partial", "mlp"])
def test_strategy_trains_exactly_its_parameters_and_checkpoints_only_them(tmp_path, tuning):
    module = build(tuning)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == expected(module, tuning)
    counts = module.parameter_counts()
    assert counts["trainable_params"] == sum(p.numel() for n, p in module.named_parameters() if n in trainable)
    data = SyntheticDataModule(task="count", num_train=16, num_val=8, num_test=8, batch_size=8, num_workers=0)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=1, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    assert set(torch.load(path, weights_only=False)["state_dict"]) == trainable
    # the backbone trains in train mode only where the strategy tunes it
    module.train()
    assert module.backbone.vit.training == (tuning in ("full", "bias", "partial"))


def test_vpt_shallow_strategy_reads_the_task_prompt_length():
    assert build("vpt_shallow", "recipe.num_tokens=7").backbone.prompts.tokens.shape == (1, 7, 32)
    assert build("linear", "recipe.num_tokens=7").backbone.prompts is None


def test_bad_tuning_values_are_named():
    with pytest.raises(ValueError, match="tuning.backbone='some' is not one of"):
        TuningConfig(backbone="some")
    with pytest.raises(ValueError, match="tuning.last_blocks=0 must be >= 1"):
        TuningConfig(backbone="last_blocks", last_blocks=0)
    with pytest.raises(ValueError, match="tuning.last_blocks=5 exceeds the backbone's 2 blocks"):
        build("partial", "tuning.last_blocks=5")
