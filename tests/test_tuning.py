"""Tuning strategies (the rows of the paper's comparison) train exactly the parameters they name."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from vpt_lightning import VPTModule
from vpt_lightning.config import compose
from vpt_lightning.methods import get_method, method_names, parse_tuning

from conftest import fit_briefly

HEAD = {"head.weight", "head.bias"}


def build(tuning: str, *overrides: str) -> VPTModule:
    # sidetune: a random-init AlexNet (tests download nothing)
    cfg = compose([f"tuning={tuning}", "backbone=vit_tiny_random", "recipe.side_weights=random", *overrides])
    c = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    return VPTModule(5, c(cfg.backbone), c(cfg.prompt), c(cfg.optim), tuning=c(cfg.tuning), backbone_eval=cfg.backbone_eval)


def expected(module: VPTModule, tuning: str):
    vit = {f"backbone.model.{n}" for n, _ in module.backbone.model.named_parameters()}
    return {
        "vpt_deep": {"backbone.prompts.tokens"} | HEAD,
        "vpt_shallow": {"backbone.prompts.tokens"} | HEAD,
        "linear": HEAD,
        "full": vit | HEAD,
        "bias": {n for n in vit if n.endswith(".bias")} | HEAD,
        "partial": {n for n in vit if n.startswith(("backbone.model.blocks.1.", "backbone.model.norm."))} | HEAD,
        "mlp": {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias", "head.4.weight", "head.4.bias"},
        "vpt_bias": {"backbone.prompts.tokens"} | {n for n in vit if n.endswith(".bias")} | HEAD,
        "adapter": {f"backbone.model.blocks.{b}.mlp.adapter.{layer}.{t}"
                    for b in (0, 1) for layer in ("down", "up") for t in ("weight", "bias")} | HEAD,
        "lora": {f"backbone.model.blocks.{b}.attn.qkv.lora_{ab}.default.weight" for b in (0, 1) for ab in "AB"} | HEAD,
        "sidetune": {f"backbone.side.{n}" for n, _ in getattr(module.backbone, "side", torch.nn.Module()).named_parameters()}
        | HEAD,
    }[tuning]


ALL = ["vpt_deep", "vpt_shallow", "linear", "full", "bias", "partial", "mlp", "vpt_bias", "adapter", "lora", "sidetune"]


@pytest.mark.parametrize("tuning", ALL)
def test_strategy_trains_exactly_its_parameters_and_checkpoints_only_them(tmp_path, tuning):
    module = build(tuning)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == expected(module, tuning)
    counts = module.parameter_counts()
    assert counts["trainable_params"] == sum(p.numel() for n, p in module.named_parameters() if n in trainable)
    path = fit_briefly(module, tmp_path)
    assert set(torch.load(path, weights_only=False)["state_dict"]) == trainable
    # the backbone trains in train mode only where the strategy tunes it
    module.train()
    assert module.backbone.vit.training == (tuning in ("full", "bias", "partial", "vpt_bias"))


def test_vpt_shallow_strategy_reads_the_task_prompt_length():
    assert build("vpt_shallow", "recipe.num_tokens=7").backbone.prompts.tokens.shape == (1, 7, 32)
    assert build("linear", "recipe.num_tokens=7").backbone.prompts is None


def test_bad_tuning_values_are_named():
    with pytest.raises(ValueError, match=r"tuning.method='some' is not one of \['adapter', 'bias', 'full'"):
        parse_tuning({"method": "some"})
    with pytest.raises(ValueError, match="tuning.last_blocks=0 must be >= 1"):
        parse_tuning({"method": "partial", "last_blocks": 0})
    with pytest.raises(ValueError, match=r"unknown tuning option\(s\) \['last_blocks'\]"):
        parse_tuning({"method": "vpt_deep", "last_blocks": 2})
    with pytest.raises(ValueError, match="tuning.last_blocks=5 exceeds the backbone's 2 blocks"):
        build("partial", "tuning.last_blocks=5")


def test_every_method_has_a_config_file_and_every_config_file_a_method():
    """The registry and conf/tuning/ agree: adding a method is one module plus one YAML file."""
    from vpt_lightning.config import CONFIG_DIR

    files = sorted(p.stem for p in (CONFIG_DIR / "tuning").glob("*.yaml"))
    assert files == method_names()
    for name in files:
        cfg = compose([f"tuning={name}", "backbone=vit_tiny_random"])
        method, config = parse_tuning(OmegaConf.to_container(cfg.tuning, resolve=True))
        assert method is get_method(name) and config.method == name
        # the optimizer group the method trains with by default is the one its YAML composes
        assert cfg.optim.name == method.optimizer


def test_labels_carry_k_and_default_from_the_method():
    assert parse_tuning({"method": "partial", "last_blocks": 3})[1].name == "partial_3"
    assert parse_tuning({"method": "mlp", "mlp_layers": 2})[1].name == "mlp_2"
    assert parse_tuning({"method": "linear"})[1].name == "linear"
    assert parse_tuning(None)[1].method == "vpt_deep"
    assert parse_tuning({"name": "full"})[0] is get_method("full")  # a method's name names it
    assert parse_tuning({"name": "my_run"})[1].method == "vpt_deep"
