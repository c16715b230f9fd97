"""The methods beyond VPT: Adapter, Sidetune, VPT + Bias, LoRA (peft), and each method's optimizer and grids."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import SMOKE_RUN, quiet_trainer, run_cli_in_process
from omegaconf import OmegaConf

from vpt_lightning import VPTModule
from vpt_lightning.config import compose
from vpt_lightning.data.synthetic import SyntheticDataModule
from vpt_lightning.methods import get_method, method_names, parse_tuning
from vpt_lightning.methods.adapter import AdaptedMLP
from vpt_lightning.protocol.task_protocol import grid_points


def build(tuning: str, *overrides: str) -> VPTModule:
    cfg = compose([f"tuning={tuning}", "backbone=vit_tiny_random", "recipe.side_weights=random", *overrides])
    c = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    return VPTModule(
        5, c(cfg.backbone), c(cfg.prompt), c(cfg.optim), tuning=c(cfg.tuning), backbone_eval=cfg.backbone_eval
    )


def fit(module: VPTModule, tmp_path, steps: int) -> pl.Trainer:
    data = SyntheticDataModule(task="count", num_train=32, num_val=8, num_test=8, batch_size=8, num_workers=0)
    trainer = quiet_trainer(tmp_path, max_steps=steps, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return trainer


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---- Adapter --------------------------------------------------------------------------------------------------
def test_adapter_adds_the_bottleneck_after_each_mlp_and_starts_as_the_identity():
    module = build("adapter", "tuning.reduction=4").eval()
    reference = build("linear").eval()  # the same random backbone and head (same seeds), no adapters
    reference.head.load_state_dict(module.head.state_dict())
    x = images()
    # learn init: W_up = b_up = 0, so the adapted model computes the backbone's function
    torch.testing.assert_close(module(x), reference(x), atol=1e-5, rtol=0)
    block = module.backbone.model.blocks[0]
    assert isinstance(block.mlp, AdaptedMLP) and block.mlp.adapter.down.out_features == 32 // 4
    with torch.no_grad():
        for p in block.mlp.adapter.parameters():
            p.normal_()
    tokens = torch.randn(2, 5, 32)
    m = block.mlp.mlp(tokens)
    a = block.mlp.adapter
    expected = m + F.linear(F.gelu(F.linear(m, a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
    torch.testing.assert_close(block.mlp(tokens), expected, atol=1e-5, rtol=0)


def test_adapter_gradients_reach_every_adapter_through_the_frozen_backbone():
    module = build("adapter")
    module(images()).sum().backward()
    for block in module.backbone.model.blocks:
        adapter = block.mlp.adapter
        assert adapter.up.weight.grad is not None and adapter.up.weight.grad.abs().sum() > 0
        assert adapter.up.bias.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in module.backbone.model.named_parameters() if "adapter" not in n)


def test_official_adapter_init_only_ever_trains_the_up_bias(tmp_path):
    module = build("adapter", "tuning.init=official", "optim=sgd", "optim.base_lr=5", "optim.warmup_epochs=0")
    fit(module, tmp_path, steps=4)
    for block in module.backbone.model.blocks:
        adapter = block.mlp.adapter
        for tensor in (adapter.down.weight, adapter.down.bias, adapter.up.weight):
            assert torch.count_nonzero(tensor) == 0
        assert torch.count_nonzero(adapter.up.bias) > 0


def test_adapter_values_are_checked():
    with pytest.raises(ValueError, match=r"tuning.init='zero' is not one of \['learn', 'official'\]"):
        parse_tuning({"method": "adapter", "init": "zero"})
    with pytest.raises(ValueError, match="tuning.reduction=0 must be an integer >= 1"):
        parse_tuning({"method": "adapter", "reduction": 0})
    with pytest.raises(ValueError, match="tuning.reduction=64 leaves no hidden unit for a block of width 32"):
        build("adapter", "tuning.reduction=64")


# ---- LoRA (peft) ----------------------------------------------------------------------------------------------
def _lora_layers(module: VPTModule):
    from peft.tuners.lora import LoraLayer

    return [m for m in module.backbone.model.modules() if isinstance(m, LoraLayer)]


def test_lora_is_peft_on_qkv_and_its_merged_forward_equals_the_unmerged():
    module = build("lora", "tuning.rank=2", "tuning.alpha=4").eval()
    layers = _lora_layers(module)
    assert len(layers) == 2 and all(layer.r["default"] == 2 for layer in layers)
    with torch.no_grad():  # B starts at zero; make the update non-trivial
        for layer in layers:
            layer.lora_B["default"].weight.normal_()
    qkv = layers[0]
    tokens = torch.randn(2, 5, 32)
    a, b = qkv.lora_A["default"].weight, qkv.lora_B["default"].weight
    expected = qkv.base_layer(tokens) + (4 / 2) * tokens @ a.T @ b.T  # W x + (alpha / r) B A x
    torch.testing.assert_close(qkv(tokens), expected, atol=1e-5, rtol=0)
    x = images()
    unmerged = module(x)
    for layer in layers:
        layer.merge()
    torch.testing.assert_close(module(x), unmerged, atol=1e-5, rtol=1e-5)


def test_lora_task_checkpoint_holds_lora_and_head_and_reloads_onto_the_same_backbone(tmp_path):
    module = build("lora")
    trainer = fit(module, tmp_path, steps=2)
    path = tmp_path / "task.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)
    assert all("lora_" in k or k.startswith("head.") for k in state["state_dict"])
    # the identity is the base weights': the same as a module without LoRA on that backbone
    assert state["vpt_backbone_identity"]["fingerprint"] == build("linear").backbone_identity["fingerprint"]
    reloaded = VPTModule.load_from_checkpoint(path).eval()
    x = images()
    torch.testing.assert_close(reloaded(x), module.eval()(x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"tuning.target_modules: \['query'\] name no linear layer"):
        build("lora", "tuning.target_modules=[query]")


# ---- Sidetune -------------------------------------------------------------------------------------------------
def test_sidetune_mixes_side_and_backbone_features_by_sigmoid_alpha():
    module = build("sidetune").eval()
    side = module.backbone.side
    with torch.no_grad():
        side.alpha.fill_(0.3)
    x = images()
    backbone = module.backbone.forward_head(module.backbone.forward_features(x))  # no hook: the frozen features
    upsampled = F.interpolate(x, size=(63, 63), mode="bilinear", align_corners=False)  # AlexNet's smallest input
    side_features = side.projection(torch.flatten(side.avgpool(side.features(upsampled)), 1))
    gate = 1 / (1 + math.exp(-0.3))
    expected = module.head(gate * backbone + (1 - gate) * side_features)
    torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=0)


def test_sidetune_loads_alexnet_weights_from_a_local_file(tmp_path):
    from torchvision.models import alexnet

    source = alexnet(weights=None)
    torch.save(source.state_dict(), tmp_path / "alexnet.pth")
    module = build("sidetune", f"tuning.side_weights={tmp_path / 'alexnet.pth'}")
    for name, tensor in source.features.state_dict().items():
        torch.testing.assert_close(module.backbone.side.features.state_dict()[name], tensor, atol=0, rtol=0)
    torch.save({"classifier.1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"lacks AlexNet tensors \['features.0.bias', 'features.0.weight'"):
        build("sidetune", f"tuning.side_weights={tmp_path / 'bad.pth'}")
    with pytest.raises(ValueError, match="neither 'random', a torchvision AlexNet_Weights name"):
        build("sidetune", "tuning.side_weights=nowhere.pth")


# ---- optimizers and grids per method --------------------------------------------------------------------------
PAPER_OPTIMIZER = {
    "vpt_deep": "sgd",
    "vpt_shallow": "sgd",
    "linear": "sgd",
    "mlp": "sgd",
    "sidetune": "sgd",
    "vpt_bias": "sgd",
    "full": "adamw",
    "partial": "adamw",
    "bias": "adamw",
    "adapter": "adamw",
    "lora": "adamw",
}


def test_each_method_trains_with_the_papers_optimizer_and_grid_unless_overridden():
    assert sorted(PAPER_OPTIMIZER) == method_names()
    cfg = compose([], config_name="tune")
    for name, optimizer in PAPER_OPTIMIZER.items():
        assert get_method(name).optimizer == optimizer
        lrs = {p["base_lr"] for p in grid_points(cfg.protocol, name)}
        wds = {p["weight_decay"] for p in grid_points(cfg.protocol, name)}
        assert lrs == (
            {0.005, 0.001, 0.0005, 0.0001} if optimizer == "adamw" else {50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05}
        )
        assert wds == {0.01, 0.001, 0.0001, 0.0}
    assert compose(["tuning=adapter"]).optim._target_ == "torch.optim.AdamW"
    assert compose(["tuning=adapter", "optim=sgd"]).optim._target_ == "torch.optim.SGD"  # the command line wins
    narrowed = compose(["protocol.weight_decay_tuned_backbone=[0.1]"], config_name="tune").protocol
    assert {p["weight_decay"] for p in grid_points(narrowed, "full")} == {0.1}


# ---- the report ------------------------------------------------------------------------------------------------
def test_report_has_a_column_per_method_and_the_papers_group_means_where_it_has_only_those():
    from vpt_lightning.data.registry import vtab_tasks
    from vpt_lightning.protocol.report import build_report
    from vpt_lightning.protocol.task_protocol import mean_std

    runs = (("lora_8", "lora"), ("vpt_bias", "vpt_bias"), ("adapter_8", "adapter"), ("vpt_deep", "vpt_deep"))
    summaries = [
        {
            "task_name": task.config_name,
            "tuning": label,
            "method": method,
            "test_top1_per_seed": {"1": 0.5},
            "test_top1": mean_std([0.5]),
            "trainable_params": 10,
            "trainable_percent": 0.5,
        }
        for task in vtab_tasks("natural")
        for label, method in runs
    ]
    markdown, _ = build_report(summaries)
    header = markdown.splitlines()[0]
    order = [header.index(f"{label} (ours)") for label in ("adapter_8", "lora_8", "vpt_deep", "vpt_bias")]
    assert order == sorted(order)  # the paper's order of methods, LoRA beside Adapter, VPT + Bias last
    assert "vpt_deep (paper)" in header and "vpt_bias (paper)" in header
    assert "lora_8 (paper)" not in header and "adapter_8 (paper)" not in header  # no ViT-B/16 IN-21k numbers
    rows = {line.split(" | ")[0].strip("| "): line for line in markdown.splitlines()}
    assert rows["VTAB natural (mean of 7)"].endswith("| 77.64 |")  # VPT-Deep + Bias, the paper's group mean
    assert rows["VTAB mean of the 3 group means"].endswith(f"| {(77.64 + 82.22 + 53.87) / 3:.2f} |")


# ---- every method through vpt-tune and vpt-report, offline on the quickstart -----------------------------------
def test_every_method_runs_through_vpt_tune_and_vpt_report_on_the_quickstart(tmp_path):
    import csv
    import json
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    tiny = [
        "+experiment=quickstart",
        *SMOKE_RUN,
        "protocol.base_lr=[1]",
        "protocol.weight_decay=[0]",
        "protocol.base_lr_tuned_backbone=[0.001]",
        "protocol.weight_decay_tuned_backbone=[0]",
        "protocol.seeds=[1]",
    ]
    # vpt-tune in this process (test_protocol.py runs its console script), vpt-report's console script
    proc = run_cli_in_process("tune", ["-m", *tiny, "task_name=demo", f"tuning={','.join(method_names())}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = {}
    for path in (tmp_path / "outputs" / "demo" / "protocol").glob("*/summary.json"):
        summary = json.loads(path.read_text())
        summaries[summary["method"]] = summary
    assert sorted(summaries) == method_names()
    for name, summary in summaries.items():  # each ran the paper's optimizer for its method, on its own grid
        assert summary["optimizer"] == get_method(name).optimizer
        assert summary["selected"]["base_lr"] == (0.001 if get_method(name).optimizer == "adamw" else 1)
    report = subprocess.run(
        [str(bin_dir / "vpt-report"), "outputs"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert report.returncode == 0, report.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "outputs" / "report.csv").open()))
    demo = {r["tuning"]: r for r in rows if r["task"] == "demo"}
    assert sorted(demo) == sorted(s["tuning"] for s in summaries.values())  # a column per method
    for summary in summaries.values():
        assert float(demo[summary["tuning"]]["test_top1_mean"]) == pytest.approx(
            100 * summary["test_top1"]["mean"], abs=0.01
        )
