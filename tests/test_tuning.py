"""Tuning strategies (the rows of the paper's comparison) train exactly the parameters they name."""

from __future__ import annotations

import pytest
import torch
from conftest import fit_briefly
from omegaconf import OmegaConf

from vpt_lightning import VPTModule
from vpt_lightning.config import compose
from vpt_lightning.methods import get_method, method_names, parse_tuning
from vpt_lightning.prompt import PromptConfig

HEAD = {"head.weight", "head.bias"}


def build(tuning: str, *overrides: str) -> VPTModule:
    # sidetune: a random-init AlexNet (tests download nothing)
    cfg = compose([f"tuning={tuning}", "backbone=vit_tiny_random", "recipe.side_weights=random", *overrides])
    c = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    return VPTModule(
        5, c(cfg.backbone), c(cfg.prompt), c(cfg.optim), tuning=c(cfg.tuning), backbone_eval=cfg.backbone_eval
    )


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
        "adapter": {
            f"backbone.model.blocks.{b}.mlp.adapter.{layer}.{t}"
            for b in (0, 1)
            for layer in ("down", "up")
            for t in ("weight", "bias")
        }
        | HEAD,
        "lora": {f"backbone.model.blocks.{b}.attn.qkv.lora_{ab}.default.weight" for b in (0, 1) for ab in "AB"} | HEAD,
        "sidetune": {
            f"backbone.side.{n}" for n, _ in getattr(module.backbone, "side", torch.nn.Module()).named_parameters()
        }
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
        # what tuning=<name> composes is the method class's facts: its optimizer, a prompt group its prompts
        # accept, its label and backbone_eval (true unless backbone weights train)
        assert cfg.optim.name == method.optimizer
        method.check_prompt(config, PromptConfig.from_mapping(OmegaConf.to_container(cfg.prompt, resolve=True)))
        assert config.name == method.label(method.Config.from_mapping({**config.to_dict(), "name": None}))
        assert cfg.backbone_eval is (not method.trains_backbone)


def test_tuning_yamls_hold_no_second_copy_of_a_method_fact():
    """conf/tuning/<name>.yaml selects the method's node and sets only what differs from its dataclass: no optimizer,
    prompt group, method, label or backbone_eval (the class has them) and no value equal to a dataclass default."""
    from dataclasses import MISSING, fields

    from vpt_lightning.config import CONFIG_DIR

    for path in sorted((CONFIG_DIR / "tuning").glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path))
        method = get_method(path.stem)
        assert raw.pop("defaults") == [f"/schema/method/{method.name}"], path.name
        assert set(raw) <= {"tuning"}, f"{path.name}: {sorted(raw)} repeat what the method class sets"
        defaults = {
            f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(method.Config)
        }
        for key, value in raw.get("tuning", {}).items():
            assert key not in ("method", "name"), f"{path.name}: tuning.{key} repeats the method class"
            assert key in defaults and value != defaults[key], f"{path.name}: tuning.{key}={value} repeats the default"


def test_a_command_line_override_beats_every_method_fact():
    cfg = compose(["tuning=partial", "tuning.last_blocks=3", "optim=sgd", "prompt=deep", "backbone_eval=true"])
    assert (cfg.tuning.name, cfg.optim.name, cfg.prompt.num_tokens, cfg.backbone_eval) == ("partial_3", "sgd", 10, True)
    cfg = compose(["tuning=vpt_deep", "tuning.name=mine", "backbone_eval=false"])
    assert (cfg.tuning.name, cfg.backbone_eval) == ("mine", False)


def test_labels_carry_k_and_default_from_the_method():
    assert parse_tuning({"method": "partial", "last_blocks": 3})[1].name == "partial_3"
    assert parse_tuning({"method": "mlp", "mlp_layers": 2})[1].name == "mlp_2"
    assert parse_tuning({"method": "linear"})[1].name == "linear"
    assert parse_tuning(None)[1].method == "vpt_deep"
    assert parse_tuning({"name": "full"})[0] is get_method("full")  # a method's name names it
    assert parse_tuning({"name": "my_run"})[1].method == "vpt_deep"


def test_the_hparams_search_grids_are_the_protocol_grids():
    """conf/hparams_search/*.yaml spell the grids of conf/tune.yaml as Hydra sweeper strings (a sweeper option cannot
    read another config); they must stay the same numbers."""
    from vpt_lightning.config import CONFIG_DIR

    protocol = compose([], config_name="tune").protocol
    grids = {
        "vpt_grid": ("base_lr", "weight_decay"),
        "tuned_backbone_grid": ("base_lr_tuned_backbone", "weight_decay_tuned_backbone"),
    }
    for name, (lr_key, wd_key) in grids.items():
        params = OmegaConf.load(CONFIG_DIR / "hparams_search" / f"{name}.yaml").hydra.sweeper.params
        for sweep_key, grid_key in (("optim.base_lr", lr_key), ("optim.weight_decay", wd_key)):
            assert [float(v) for v in str(params[sweep_key]).split(",")] == list(protocol[grid_key]), (name, sweep_key)


def test_the_python_api_takes_backbone_eval_from_the_method_too():
    from conftest import TINY_BACKBONE

    def module(**kwargs):
        return VPTModule(3, TINY_BACKBONE, {"num_tokens": 0}, {"base_lr": 0.1}, **kwargs)

    assert module(tuning={"method": "full"}).hparams.backbone_eval is False
    assert module(tuning={"method": "linear"}).hparams.backbone_eval is True
    assert module(tuning={"method": "full"}, backbone_eval=True).hparams.backbone_eval is True
    assert module(tuning={"method": "full"}).backbone.backbone_eval is False
