"""The ConvNet family (timm ConvNeXt and ResNet): the pixel-border prompt, BatchNorm, weight files, identity."""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import SMOKE_RUN, run_cli_in_process
from omegaconf import OmegaConf

from vpt_lightning import VPTModule
from vpt_lightning.backbones import create_backbone, prompted_backbone
from vpt_lightning.backbones.convnet import PixelBorder, PromptedConvNet
from vpt_lightning.config import CONFIG_DIR, compose
from vpt_lightning.sharing.checkpoint import trainable_state_keys

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
TINY = ("convnext_tiny_random", "resnet_tiny_random")


def tiny_config(group: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "backbone" / f"{group}.yaml"))


def tiny_model(group: str, **kwargs):
    model, _ = create_backbone({**tiny_config(group), **kwargs})
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return (torch.rand(2, 3, 32, 32) - MEAN) / STD  # normalised images, as the DataModules give them


def reference(model, x):
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("group", TINY)
def test_without_prompts_equals_timm(group, images):
    model = tiny_model(group)
    backbone = prompted_backbone(model, {"num_tokens": 0})
    assert isinstance(backbone, PromptedConvNet) and backbone.border is None
    torch.testing.assert_close(backbone(images), reference(model, images), rtol=0, atol=1e-5)


@pytest.mark.parametrize("group", TINY)
@pytest.mark.parametrize("pixels", [1, 3])
def test_border_is_padded_around_the_image_and_normalised(group, pixels, images):
    model = tiny_model(group)
    backbone = prompted_backbone(model, {"num_tokens": pixels, "deep": False, "dropout": 0.0})
    p = pixels
    tb, lr = backbone.border.top_bottom.detach(), backbone.border.left_right.detach()
    assert tb.shape == (1, 3, 2 * p, 32 + 2 * p) and lr.shape == (1, 3, 32, 2 * p)
    assert 0 <= tb.min() and tb.max() <= 1 and 0 <= lr.min() and lr.max() <= 1  # U(0, 1) pixels
    # the padded image written out from the equations: a (32 + 2p)^2 canvas of border pixels in [0, 1], normalised,
    # with the normalised image in its centre
    canvas = torch.zeros(2, 3, 32 + 2 * p, 32 + 2 * p)
    canvas[:, :, :p, :] = tb[:, :, :p]
    canvas[:, :, p + 32 :, :] = tb[:, :, p:]
    canvas[:, :, p : p + 32, :p] = lr[..., :p]
    canvas[:, :, p : p + 32, p + 32 :] = lr[..., p:]
    canvas = (canvas - MEAN) / STD
    canvas[:, :, p : p + 32, p : p + 32] = images
    torch.testing.assert_close(backbone(images), reference(model, canvas), rtol=0, atol=1e-5)
    # a border of mean-coloured pixels normalises to 0, i.e. zero-padding the normalised image
    with torch.no_grad():
        backbone.border.top_bottom.copy_(MEAN.expand_as(tb))
        backbone.border.left_right.copy_(MEAN.expand_as(lr))
    torch.testing.assert_close(backbone(images), reference(model, F.pad(images, (p, p, p, p))), rtol=0, atol=1e-5)


@pytest.mark.parametrize("pixels", [1, 3, 5, 7, 9, 11])
def test_border_parameter_count_follows_the_formula(pixels):
    border = PixelBorder(pixels, (3, 224, 224), MEAN.flatten().tolist(), STD.flatten().tolist())
    count = sum(t.numel() for t in border.parameters())
    assert count == 2 * pixels * 3 * (224 + 224 + 2 * pixels) == 6 * pixels * (448 + 2 * pixels)
    assert {1: 2700, 5: 13740, 11: 31020}.get(pixels, count) == count  # 6p(448 + 2p): the official resnet.py's tb + lr
    assert not border.state_dict().keys() - {"top_bottom", "left_right"}  # mean/std are no state


def test_module_trains_only_border_and_head(images):
    module = VPTModule(
        num_classes=5,
        backbone=tiny_config("convnext_tiny_random"),
        prompt={"num_tokens": 2, "dropout": 0.0},
        optim={"base_lr": 0.1},
    )
    module.train()
    assert not module.backbone.model.training  # VPT: the frozen backbone stays in eval mode
    module(images).square().sum().backward()
    grads = sorted(n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0)
    assert grads == ["backbone.border.left_right", "backbone.border.top_bottom", "head.bias", "head.weight"]
    assert sorted(module.trainable_state_keys()) == grads  # the task checkpoint holds only these
    counts = module.parameter_counts()
    assert counts["trainable_params"] == 6 * 2 * (64 + 4) + 64 * 5 + 5


@pytest.mark.parametrize("group", TINY)
def test_grad_checkpointing_gives_the_same_border_gradients(group, images):
    backbone = prompted_backbone(tiny_model(group), {"num_tokens": 2, "dropout": 0.0})
    grads = []
    for enable in (False, True):
        backbone.set_grad_checkpointing(enable)
        backbone.border.zero_grad()
        backbone(images).square().sum().backward()
        grads.append([p.grad.clone() for p in backbone.border.parameters()])
    assert (
        backbone.model.stages[0].grad_checkpointing
        if group.startswith("convnext")
        else backbone.model.grad_checkpointing
    )
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


def test_frozen_batchnorm_statistics_under_vpt(images):
    module = VPTModule(
        num_classes=3,
        backbone=tiny_config("resnet_tiny_random"),
        prompt={"num_tokens": 1, "dropout": 0.0},
        optim={"base_lr": 0.1},
    )
    before = {k: v.clone() for k, v in module.backbone.model.state_dict().items()}
    module.train()
    module(images * 3 + 1).sum().backward()
    after = module.backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running statistics untouched


def _bn_stats_changed(model, before):
    state = model.state_dict()
    return sorted({k.rsplit(".", 1)[0] for k in before if "running_mean" in k and not torch.equal(before[k], state[k])})


@pytest.mark.parametrize(
    "tuning, updated",
    [
        ({"method": "full"}, "all"),  # every BatchNorm trains: batch statistics, running statistics update
        ({"method": "partial", "last_blocks": 1}, "layer4"),  # only the last block's (official: frozen part in eval)
        ({"method": "bias"}, "none"),  # BitFit: BN biases train, the statistics stay (the official tinytl-bias)
    ],
)
def test_batchnorm_statistics_update_only_where_the_scale_trains(tuning, updated, images):
    module = VPTModule(
        num_classes=3,
        backbone=tiny_config("resnet_tiny_random"),
        prompt=None,
        tuning=tuning,
        backbone_eval=False,
        optim={"base_lr": 0.1},
    )
    model = module.backbone.model
    bn_names = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module.train()
    module(images * 3 + 1).sum().backward()
    changed = _bn_stats_changed(model, before)
    expected = {"all": bn_names, "layer4": [n for n in bn_names if n.startswith("layer4.")], "none": []}[updated]
    assert changed == expected
    # a task checkpoint keeps the statistics of the BatchNorms that trained (and of those whose bias trains)
    kept = {k[len("backbone.model.") :] for k in trainable_state_keys(module, model) if k.startswith("backbone.model.")}
    stats = {k.rsplit(".", 1)[0] for k in kept if k.endswith("running_mean")}
    assert stats == (set(bn_names) if updated in ("all", "none") else set(expected))
    assert all(f"{n}.running_var" in kept and f"{n}.num_batches_tracked" in kept for n in stats)
    module.eval()
    assert not any(m.training for m in model.modules())


def test_blocks_final_norms_and_partial_k():
    convnext = prompted_backbone(tiny_model("convnext_tiny_random"))
    blocks = convnext.blocks()
    assert blocks == [b for s in convnext.model.stages for b in s.blocks] and len(blocks) == 1 + 1 + 2 + 1
    assert convnext.final_norms() == [convnext.model.head.norm]
    resnet = prompted_backbone(tiny_model("resnet_tiny_random"))
    assert resnet.blocks() == [
        resnet.model.layer1[0],
        resnet.model.layer2[0],
        resnet.model.layer3[0],
        resnet.model.layer4[0],
    ]
    assert resnet.final_norms() == []
    module = VPTModule(
        num_classes=3,
        backbone=tiny_config("convnext_tiny_random"),
        prompt=None,
        tuning={"method": "partial", "last_blocks": 2},
        backbone_eval=False,
    )
    trained = {
        n.split(".weight")[0].split(".bias")[0] for n, p in module.backbone.model.named_parameters() if p.requires_grad
    }
    assert {re.match(r"(stages\.\d\.blocks\.\d|head\.norm)", n).group(1) for n in trained} == {
        "stages.2.blocks.1",
        "stages.3.blocks.0",
        "head.norm",
    }


@pytest.mark.parametrize(
    "prompt, message",
    [
        ({"num_tokens": 17, "deep": False}, "prompt.num_tokens=17 is the border's width in pixels per side"),
        ({"num_tokens": 2, "deep": True, "depth": 3}, "a ConvNet takes prompts only at its input"),
        ({"num_tokens": 2, "deep": True, "depth": [0, 1]}, "a ConvNet takes prompts only at its input"),
        (
            {"num_tokens": 2, "deep": True, "dropout": 0.1},
            "prompt.dropout=0.1: the ConvNet pixel border has no dropout",
        ),
        ({"num_tokens": 1, "location": "add"}, "prompt.location='add'"),
        ({"num_tokens": 2, "project": 8}, "prompt.project=8"),
    ],
)
def test_prompt_options_a_border_lacks_are_refused(prompt, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        prompted_backbone(tiny_model("resnet_tiny_random"), {"dropout": 0.0, **prompt})


def test_deep_and_shallow_both_learn_the_input_border(images):
    deep = prompted_backbone(tiny_model("convnext_tiny_random"), {"num_tokens": 2, "deep": True, "dropout": 0.0})
    shallow = prompted_backbone(tiny_model("convnext_tiny_random"), {"num_tokens": 2, "deep": False, "depth": 0})
    shallow.load_state_dict(deep.state_dict())
    torch.testing.assert_close(deep(images), shallow(images), rtol=0, atol=0)


def test_images_of_another_size_are_refused(images):
    backbone = prompted_backbone(tiny_model("convnext_tiny_random"), {"num_tokens": 2, "dropout": 0.0})
    with pytest.raises(ValueError, match=r"built for 32x32 images .* got \(3, 48, 48\)"):
        backbone(torch.zeros(1, 3, 48, 48))


def _fb_layout(state):
    """A timm ConvNeXt state dict in FB's original layout (convnext_base_22k_224.pth), written from timm's names."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", k)
        k = (
            k.replace("conv_dw", "dwconv")
            .replace("mlp.fc", "pwconv")
            .replace("head.norm.", "norm.")
            .replace("head.fc.", "head.")
        )
        out[k] = v
    return out


@pytest.mark.parametrize("group", TINY)
def test_weight_files_load_through_the_family_filter(group, tmp_path, images):
    config = tiny_config(group)
    torch.manual_seed(7)
    source = timm.create_model(config["name"], num_classes=11, **config["kwargs"]).eval()
    state = source.state_dict()  # with its 11-class classifier (fc.* / head.fc.*), as the published files
    if group == "convnext_tiny_random":
        state = _fb_layout(state)
        assert "norm.weight" in state and "head.weight" in state
    else:  # torchvision V1 files predate BatchNorm's num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        assert "fc.weight" in state
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    loaded, identity = create_backbone({**config, "checkpoint_path": str(path)})
    torch.testing.assert_close(reference(loaded.eval(), images), reference(source, images), rtol=0, atol=1e-6)
    assert identity["weights"] == "file" and identity["depth"] == len(prompted_backbone(loaded).blocks())


@pytest.mark.parametrize("group", TINY)
def test_weight_file_of_another_model_names_the_keys(group, tmp_path):
    config = tiny_config(group)
    wider = "dims" if group == "convnext_tiny_random" else "channels"
    other = tiny_model(group, kwargs={**config["kwargs"], wider: [8, 16, 32, 128]})
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit model .*shape mismatches: .*vs model"):
        create_backbone({**config, "checkpoint_path": str(path)})
    torch.save({k: v for k, v in other.state_dict().items() if "layer4" not in k and "stages.3" not in k}, path)
    with pytest.raises(ValueError, match=r"missing keys: .*(layer4|stages\.3)\."):
        create_backbone({**config, "checkpoint_path": str(path)})


def test_identity_counts_blocks_and_tells_the_families_apart():
    _, convnext = create_backbone(tiny_config("convnext_tiny_random"))
    _, resnet = create_backbone(tiny_config("resnet_tiny_random"))
    assert convnext["depth"] == 5 and resnet["depth"] == 4
    assert convnext["embed_dim"] == 64 and resnet["embed_dim"] == 256
    assert convnext["architecture"]["class"] == "ConvNeXt" and resnet["architecture"]["class"] == "ResNet"
    assert resnet["architecture"]["global_pool"] == "avg"


@pytest.mark.parametrize(
    "group, name", [("convnext_base_in22k", "convnext_base.fb_in22k"), ("resnet50_in1k", "resnet50.tv_in1k")]
)
def test_paper_convnet_configs_name_the_papers_weights(group, name):
    cfg = compose([f"backbone={group}", "tuning=vpt_shallow"])
    assert cfg.backbone.name == name and cfg.backbone.pretrained
    assert name in timm.list_pretrained(name.split(".")[0] + ".*")
    with torch.device("meta"):  # the architecture without weights: the paper's widths
        model = timm.create_model(name, num_classes=0)
    assert model.num_features == {"convnext_base_in22k": 1024, "resnet50_in1k": 2048}[group]


# ---- vpt-tune's grids and vpt-report's paper numbers for ConvNets -------------------------------------------------
def test_vpt_tune_sweeps_the_papers_convnet_grid_for_vpt_only():
    from vpt_lightning.protocol.task_protocol import grid_points

    cfg = compose(["backbone=convnext_tiny_random", "tuning=vpt_shallow"], config_name="tune")
    points = grid_points(cfg.protocol, "vpt_shallow")
    assert sorted({p["num_tokens"] for p in points}) == [1, 3, 5, 7, 9, 11]
    assert sorted({p["base_lr"] for p in points}) == [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
    assert len(points) == 6 * 9 * 4
    linear = compose(["backbone=resnet_tiny_random", "tuning=linear"], config_name="tune")
    vit = compose(["tuning=vpt_shallow"], config_name="tune")
    assert linear.protocol.base_lr == vit.protocol.base_lr and len(vit.protocol.base_lr) == 10  # tune.yaml's grid
    assert linear.protocol.num_tokens is None and vit.protocol.num_tokens is None
    narrowed = compose(
        ["backbone=convnext_tiny_random", "tuning=vpt_shallow", "protocol.num_tokens=[5]"], config_name="tune"
    )
    assert {p["num_tokens"] for p in grid_points(narrowed.protocol, "vpt_shallow")} == {5}  # the command line wins


def test_report_shows_the_papers_group_means_for_a_convnet_backbone():
    import csv
    import statistics

    from vpt_lightning.data.registry import vtab_tasks
    from vpt_lightning.protocol.report import build_report
    from vpt_lightning.protocol.task_protocol import mean_std

    def summary(task, tuning, backbone):
        return {
            "task_name": task,
            "tuning": tuning,
            "backbone": backbone,
            "test_top1_per_seed": {"0": 0.5},
            "test_top1": mean_std([0.5]),
            "trainable_params": 10,
            "trainable_percent": 0.1,
        }

    tasks = [t.config_name for t in vtab_tasks()]
    summaries = [summary(t, m, "resnet50.tv_in1k") for t in tasks for m in ("vpt_shallow", "partial_3", "mlp_3")]
    markdown, table = build_report(summaries)
    rows = {(r["task"], r["tuning"]): r for r in csv.DictReader(table.splitlines())}
    # Table 5, ResNet-50: VPT 66.25 / 77.32 / 37.52; Partial-1 (= layer4 = our partial_3) 64.34 / 78.64 / 45.78
    assert rows["VTAB natural (mean of 7)", "vpt_shallow"]["paper_top1"] == "66.25"
    assert rows["VTAB structured (mean of 8)", "partial_3"]["paper_top1"] == "45.78"
    assert float(rows["VTAB mean of the 3 group means", "vpt_shallow"]["paper_top1"]) == pytest.approx(
        statistics.fmean([66.25, 77.32, 37.52]), abs=0.005
    )
    assert float(rows["VTAB mean over the 19 tasks", "vpt_shallow"]["paper_top1"]) == pytest.approx(
        (7 * 66.25 + 4 * 77.32 + 8 * 37.52) / 19, abs=0.005
    )
    assert rows["VTAB natural (mean of 7)", "mlp_3"]["paper_top1"] == ""  # the paper has no MLP-3 on ConvNets
    assert rows["vtab_cifar100", "vpt_shallow"]["paper_top1"] == ""  # never ViT-B's per-task numbers
    assert "| VTAB specialized (mean of 4) | 50.00 | 50.00 | 50.00 | 77.32 | 78.64 |" in markdown
    assert "group means for ResNet-50 supervised ImageNet-1k" in markdown
    vit_markdown, _ = build_report([summary(t, "vpt_shallow", "vit_base_patch16_224.orig_in21k") for t in tasks])
    assert "| vtab_cifar100 | 50.00 ± 0.00 (0.10% params) | 77.7 |" in vit_markdown  # ViT-B's per-task numbers


# ---- vpt-train end to end -----------------------------------------------------------------------------------------
def test_quickstart_trains_a_tiny_convnext_end_to_end(tmp_path):
    import json

    args = [
        "+experiment=quickstart",
        "backbone=convnext_tiny_random",
        *SMOKE_RUN,
        "task_name=cnx",
        "run_name=r",
    ]
    proc = run_cli_in_process("train", args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = tmp_path / "outputs" / "cnx" / "r"
    results = json.loads((run / "results.json").read_text())
    p = 10  # the quickstart's recipe.num_tokens: a 10 px border around its 32 px images
    assert results["trainable_params"] == 6 * p * (64 + 2 * p) + 64 * 8 + 8 and 0 <= results["test/top1"] <= 1
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert sorted(ckpt["state_dict"]) == [
        "backbone.border.left_right",
        "backbone.border.top_bottom",
        "head.bias",
        "head.weight",
    ]
    assert ckpt["vpt_backbone_identity"]["architecture"]["class"] == "ConvNeXt"


def test_paper_config_loads_a_local_file_and_a_wrong_one_fails_before_training(tmp_path):
    proc = run_cli_in_process("train", ["backbone=resnet50_in1k", "tuning=vpt_shallow", "--cfg", "job"], tmp_path)
    assert proc.returncode == 0 and "name: resnet50.tv_in1k" in proc.stdout
    wrong = tiny_model("resnet_tiny_random")  # a ResNet-50 config given a tiny ResNet's weights
    torch.save(wrong.state_dict(), tmp_path / "wrong.pth")
    proc = run_cli_in_process(
        "train",
        [
            "backbone=resnet50_in1k",
            "tuning=vpt_shallow",
            f"backbone.checkpoint_path={tmp_path / 'wrong.pth'}",
            "+debug=fast",
        ],
        tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert (
        proc.returncode != 0
        and "does not fit model ResNet" in out
        and "shape mismatches: layer1.0.bn1.bias: file (8,) vs model (64,)" in out
    )
    assert "Epoch 0" not in out
