"""Scaling out and precision: DDP on CPU (gloo) against one process, mixed precision, torch.compile."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_BACKBONE, quiet_trainer
from torch.utils.data import DataLoader, DistributedSampler

from vpt_lightning import VPTModule
from vpt_lightning.data.synthetic import SyntheticDataModule


def _module() -> VPTModule:
    pl.seed_everything(0)  # the same prompt and head init for every module built here
    return VPTModule(
        num_classes=9,
        backbone=TINY_BACKBONE,
        prompt={"num_tokens": 4, "dropout": 0.0},
        optim={"base_lr": 4.0, "warmup_epochs": 1, "weight_decay": 1e-4},
    )


class SameOrderData(SyntheticDataModule):
    """Train with the permutation Lightning's DistributedSampler draws (seed 0 + epoch), in one process too.

    Under DDP rank r takes perm[r::2], so one DDP step of 2 x 8 images is exactly the single-process batch of the
    first 16 images of the same permutation.
    """

    def train_dataloader(self):
        if self.trainer.world_size > 1:
            return super().train_dataloader()
        sampler = DistributedSampler(self.train_dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
        return DataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler)


def _data(batch_size: int) -> SyntheticDataModule:
    return SameOrderData(task="location", num_train=64, num_val=33, num_test=17, batch_size=batch_size, num_workers=0)


def _fit(tmp_path, module, data, **trainer_kwargs):
    trainer = quiet_trainer(tmp_path, **{"max_epochs": 2, **trainer_kwargs})
    trainer.fit(module, datamodule=data)
    return trainer


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    single = _module()
    single_trainer = _fit(tmp_path / "single", single, _data(16), devices=1)
    ddp = _module()
    ddp_trainer = _fit(tmp_path / "ddp", ddp, _data(8), devices=2, strategy="ddp_spawn")
    # same global batch (2 x 8 = 16), same lr (scaled by the global batch): the same updates, up to the order
    # of float additions in the gradient all-reduce
    torch.testing.assert_close(ddp.backbone.prompts.tokens, single.backbone.prompts.tokens, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ddp.head.weight, single.head.weight, rtol=1e-4, atol=1e-5)
    # val top-1 over 33 samples (odd: rank 0 sees 17, rank 1 16, none repeated) is the single-process value
    assert float(ddp_trainer.callback_metrics["val/top1"]) == pytest.approx(
        float(single_trainer.callback_metrics["val/top1"])
    )
    # the checkpoint the DDP run wrote (rank 0, under its own root dir) loads in one process and gives the logits
    # of the DDP run's weights (copied back to `ddp` from rank 0 by ddp_spawn)
    written = sorted((tmp_path / "ddp" / "checkpoints").glob("*.ckpt"))
    assert len(written) == 1 and written[0].name == "epoch=1-step=8.ckpt"  # 2 epochs x 64 / (2 x 8) steps
    images = torch.randn(4, 3, 32, 32)
    reloaded = VPTModule.load_from_checkpoint(written[0]).eval()
    torch.testing.assert_close(reloaded.backbone.prompts.tokens, ddp.backbone.prompts.tokens)
    torch.testing.assert_close(reloaded(images), ddp.eval()(images))
    assert not torch.allclose(reloaded(images), _module().eval()(images))  # trained weights, not the init


# Lightning has no fp16 AMP on CPU and runs '16-mixed' as bf16 there (with a warning); on GPUs it is fp16 + GradScaler
@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.bfloat16)])
def test_mixed_precision_trains_with_fp32_master_weights(tmp_path, precision, dtype):
    module = _module()
    seen = []
    module.backbone.vit.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = module.backbone.prompts.tokens.detach().clone()
    _fit(tmp_path, module, _data(16), devices=1, precision=precision, max_steps=3, limit_val_batches=0)
    assert dtype in seen  # the blocks' matmuls ran in reduced precision
    assert module.backbone.prompts.tokens.dtype == torch.float32 and module.head.weight.dtype == torch.float32
    assert not torch.equal(module.backbone.prompts.tokens, before)
    assert torch.isfinite(module.backbone.prompts.tokens).all()


def test_frozen_parameters_get_no_optimizer_state(tmp_path):
    module = _module()
    trainer = _fit(tmp_path, module, _data(16), devices=1, max_steps=2, limit_val_batches=0)
    optimizer = trainer.optimizers[0]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in (module.backbone.prompts.tokens, module.head.weight, module.head.bias)}
    assert all(p.grad is None for p in module.backbone.vit.parameters())
    assert len(optimizer.state) == 3


def test_compiled_backbone_matches_eager(tmp_path):
    eager, compiled = _module().eval(), VPTModule(**{**_module().hparams, "compile": True}).eval()
    compiled.load_state_dict(eager.state_dict())
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(compiled(images), eager(images), rtol=1e-4, atol=1e-4)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # compile does not rename keys
    _fit(tmp_path, compiled.train(), _data(16), devices=1, max_steps=2, limit_val_batches=0)


def test_cluster_configs_compose():
    from hydra.utils import instantiate

    from vpt_lightning.config import compose

    cfg = compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "trainer=ddp", "trainer.devices=8"])
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert cfg.hydra.launcher.partition == "gpu" and cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 8
    fsdp = compose(["trainer=fsdp"]).trainer.strategy
    assert fsdp._target_.endswith("FSDPStrategy") and fsdp.use_orig_params
    assert type(instantiate(fsdp)).__name__ == "FSDPStrategy"


def test_fsdp_config_wraps_each_transformer_block():
    from hydra.utils import instantiate
    from timm.models.vision_transformer import Block
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from vpt_lightning.config import compose

    strategy = instantiate(compose(["trainer=fsdp"]).trainer.strategy)
    policy = strategy.kwargs["auto_wrap_policy"]  # Lightning turns the set of layer classes into this policy
    assert isinstance(policy, ModuleWrapPolicy) and "timm.models.vision_transformer.Block" in repr(policy)
    # asked module by module (as FSDP's recursive wrapping does), it wraps exactly the transformer blocks
    model = _module()
    wrapped = [m for m in model.modules() if policy(m, recurse=False)]
    assert len(wrapped) == 4 and all(type(m) is Block for m in wrapped)
    assert wrapped == list(model.backbone.vit.blocks)
    assert strategy.kwargs["use_orig_params"]
