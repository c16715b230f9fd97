"""The redesign's seams: backbone families by timm class, tuning methods by name, task checkpoints without
Lightning, and the optimizer as a config node."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY_BACKBONE, fit_briefly, make_vit
from omegaconf import OmegaConf
from torch import nn

from vpt_lightning import OptimConfig, PromptConfig, PromptedViT, VPTModule
from vpt_lightning.backbones import create_backbone, family_class_of_model, prompted_backbone, supported_classes
from vpt_lightning.config import compose
from vpt_lightning.data.synthetic import SyntheticDataModule
from vpt_lightning.sharing.checkpoint import (
    check_backbone_identity,
    identity_differences,
    read_task_checkpoint,
    trainable_state_dict,
)

NUM_CLASSES = SyntheticDataModule(task="count", num_train=1, num_val=1, num_test=1).num_classes


def test_a_vit_gets_the_vit_family_and_an_unknown_class_is_refused_by_name():
    vit = make_vit()
    assert family_class_of_model(vit) is PromptedViT
    assert isinstance(prompted_backbone(vit, {"num_tokens": 2}), PromptedViT)
    assert "VisionTransformer" in supported_classes()
    with pytest.raises(TypeError, match=r"no prompted-backbone family for the timm model class Linear; supported"):
        prompted_backbone(nn.Linear(2, 2))


def test_a_subclass_of_a_registered_timm_class_finds_its_family():
    class MyViT(timm.models.vision_transformer.VisionTransformer):
        pass

    assert family_class_of_model(MyViT(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2)) is PromptedViT


def test_a_local_file_loads_as_timms_own_pretrained_cfg_overlay_route_does(tmp_path, images):
    """Our loader applies the family's timm filter: the result equals timm.create_model(pretrained=True,
    pretrained_cfg_overlay=dict(file=...)), the route timm itself offers for local files."""
    source = make_vit(seed=5)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    ours, _ = create_backbone({**TINY_BACKBONE, "checkpoint_path": str(path)})
    timms = timm.create_model(
        TINY_BACKBONE["name"],
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(path)),
        **TINY_BACKBONE["kwargs"],
    )
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), timms.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    torch.testing.assert_close(ours.eval()(images), timms.eval()(images), rtol=0, atol=0)


def _trained_module(tmp_path, **kwargs) -> tuple:
    module = VPTModule(NUM_CLASSES, TINY_BACKBONE, {"num_tokens": 3}, {"base_lr": 1.0, "warmup_epochs": 0}, **kwargs)
    return module, fit_briefly(module, tmp_path, max_steps=2)


def test_a_task_checkpoint_reads_without_lightning_and_rebuilds_the_same_forward(tmp_path, images):
    module, path = _trained_module(tmp_path)
    task = read_task_checkpoint(path)
    assert sorted(task.state_dict) == ["backbone.prompts.tokens", "head.bias", "head.weight"]
    assert task.hparams["tuning"]["method"] == "vpt_deep" and task.hparams["num_classes"] == NUM_CLASSES
    for key, value in trainable_state_dict(module, module.backbone.model).items():
        assert torch.equal(task.state_dict[key], value)
    # rebuild from the file with the plain functions (what a server does), no Lightning involved
    model, identity = create_backbone(task.hparams["backbone"])
    check_backbone_identity(task.identity, identity)
    backbone = prompted_backbone(model, task.hparams["prompt"])
    head = nn.Linear(backbone.num_features, task.hparams["num_classes"])
    backbone.load_state_dict(
        {k[len("backbone.") :]: v for k, v in task.state_dict.items() if k.startswith("backbone.")}, strict=False
    )
    head.load_state_dict({k[len("head.") :]: v for k, v in task.state_dict.items() if k.startswith("head.")})
    module.eval()
    torch.testing.assert_close(head(backbone.eval()(images)), module(images), rtol=0, atol=0)


def test_identity_of_another_backbone_names_the_difference(tmp_path):
    _, path = _trained_module(tmp_path)
    task = read_task_checkpoint(path)
    _, other = create_backbone({**TINY_BACKBONE, "init_seed": 1})
    assert [d.split(":")[0] for d in identity_differences(task.identity, other)] == ["weights_sha256", "fingerprint"]
    with pytest.raises(ValueError, match="trained on another backbone.*weights_sha256"):
        check_backbone_identity(task.identity, other)


@pytest.mark.parametrize(
    "content, message",
    [(b"not a checkpoint", "could not be read as a checkpoint"), (None, "is not a vpt-lightning task checkpoint")],
)
def test_a_file_that_is_no_task_checkpoint_is_named(tmp_path, content, message):
    path = tmp_path / "bad.ckpt"
    if content is None:
        torch.save({"weights": torch.zeros(1)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        read_task_checkpoint(path)
    assert "bad.ckpt" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        read_task_checkpoint(tmp_path / "nope.ckpt")


@pytest.mark.parametrize(
    "group, cls, extra",
    [("sgd", torch.optim.SGD, {"momentum": 0.9}), ("adamw", torch.optim.AdamW, {"betas": (0.9, 0.999), "eps": 1e-8})],
)
def test_optim_groups_build_their_optimizer_under_the_same_lr_rule_and_schedule(tmp_path, group, cls, extra):
    cfg = compose(["+experiment=quickstart", f"optim={group}", "optim.warmup_epochs=1"])
    optim = OptimConfig.from_mapping(OmegaConf.to_container(cfg.optim, resolve=True))
    module = VPTModule(NUM_CLASSES, TINY_BACKBONE, {"num_tokens": 2}, optim)
    fit_briefly(module, tmp_path, num_train=32, max_steps=-1, max_epochs=2)
    optimizer = module.trainer.optimizers[0]
    assert type(optimizer) is cls
    group0 = optimizer.param_groups[0]
    assert group0["weight_decay"] == optim.weight_decay
    for key, value in extra.items():
        assert group0[key] == value
    # lr = base_lr * 8 / 256; 4 steps per epoch, 1 warm-up epoch, cosine to 0 at step 8
    peak = optim.base_lr * 8 / 256
    assert group0["initial_lr"] == pytest.approx(peak)
    assert group0["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "node, message",
    [
        ({"_target_": "torch.optim.Nope"}, "optim._target_='torch.optim.Nope' cannot be imported"),
        ({"_target_": "torch.nn.Linear"}, "optim._target_='torch.nn.Linear' is not a torch.optim.Optimizer class"),
        ({"_target_": "torch.optim.AdamW", "momentum": 0.9}, r"unknown optim option\(s\) \['momentum'\] for AdamW"),
        ({"eps": -1, "_target_": "torch.optim.AdamW"}, "optim.eps=-1 must be a number > 0"),
        ({"_partial_": False}, "optim._partial_ must be true"),
    ],
)
def test_bad_optimizer_nodes_name_the_key(node, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig.from_mapping(node)


def test_optim_node_round_trips_through_hparams():
    optim = OptimConfig.from_mapping({"_target_": "torch.optim.AdamW", "betas": [0.8, 0.9], "base_lr": 0.01})
    again = OptimConfig.from_mapping(optim.to_dict())
    assert again == optim and again.arguments == {"betas": [0.8, 0.9]}
    assert OptimConfig.from_mapping({}).arguments == {"momentum": 0.9}  # the paper's SGD by default


def test_prompt_config_contradicting_the_method_is_refused_before_training():
    from vpt_lightning.runs.training import parse_configs

    cfg = compose(["+experiment=quickstart", "tuning=vpt_deep", "prompt=none"])
    with pytest.raises(ValueError, match=r"tuning=vpt_deep needs prompts at every block"):
        parse_configs(cfg)
    configs = parse_configs(compose(["+experiment=quickstart", "tuning=partial", "tuning.last_blocks=2"]))
    assert configs.method.name == "partial" and configs.tuning.name == "partial_2"
    assert isinstance(configs.prompt, PromptConfig) and not configs.prompt.enabled


def test_config_groups_compose_onto_their_schemas_and_are_parsed_once():
    """The prompt, backbone and tuning nodes are typed by their dataclasses (Hydra ConfigStore schemas), so a
    wrong key or type fails while composing, naming it, and parsing yields the dataclasses themselves."""
    from hydra.errors import ConfigCompositionException

    from vpt_lightning.backbones import BackboneConfig
    from vpt_lightning.methods.partial import PartialConfig

    cfg = compose(["+experiment=quickstart", "tuning=partial"])
    assert OmegaConf.get_type(cfg.prompt) is PromptConfig and OmegaConf.get_type(cfg.backbone) is BackboneConfig
    assert OmegaConf.get_type(cfg.tuning) is PartialConfig
    for override, key in (
        ("prompt.foo=1", "prompt.foo"),
        ("tuning.mlp_layers=2", "tuning.mlp_layers"),
        ("prompt.num_tokens=abc", "prompt.num_tokens"),
    ):
        with pytest.raises(ConfigCompositionException, match=key.replace(".", r"\.")):
            compose(["+experiment=quickstart", "tuning=partial", override])
    # range checks stay ours, with the key, the bad value and the valid values
    with pytest.raises(ValueError, match=r"prompt.num_tokens=-2 must be an integer >= 0"):
        OmegaConf.to_object(compose(["+experiment=quickstart", "recipe.num_tokens=-2"]).prompt)


def test_a_config_dataclass_or_a_mapping_is_coerced_in_one_place():
    """``plain_mapping`` and ``DataclassConfig.parse`` are the one coercion of "a dataclass, a DictConfig or a
    mapping"; no other module of the package writes its own (``asdict``, ``is_dataclass``,
    ``hasattr(.., "to_dict")``)."""
    import re
    from pathlib import Path

    import vpt_lightning
    from vpt_lightning.dataclass_config import plain_mapping

    prompt = PromptConfig(num_tokens=4)
    assert plain_mapping(prompt) == prompt.to_dict() and plain_mapping(None) == {}
    node = OmegaConf.create({"num_tokens": "${n}", "n": 7})
    assert plain_mapping(node) == {"num_tokens": 7, "n": 7}  # interpolations resolved
    source = {"num_tokens": 3}
    assert plain_mapping(source) == source and plain_mapping(source) is not source
    with pytest.raises(TypeError, match="expected a config dataclass or a mapping, got list"):
        plain_mapping([1, 2])
    assert PromptConfig.parse(prompt) is prompt
    typed = compose(["+experiment=quickstart"]).prompt  # a DictConfig typed by the PromptConfig schema
    assert PromptConfig.parse(typed) == PromptConfig.from_mapping(OmegaConf.to_container(typed, resolve=True))
    assert PromptConfig.parse({"num_tokens": 5}).num_tokens == 5 and PromptConfig.parse(None) == PromptConfig()
    with pytest.raises(ValueError, match=r"unknown prompt option\(s\) \['tokens'\]"):
        PromptConfig.parse({"tokens": 5})

    package = Path(vpt_lightning.__file__).parent
    copies = re.compile(r"is_dataclass\(|__dataclass_fields__|hasattr\(\w+, \"to_dict\"\)|asdict\((?!self\))")
    for path in sorted(package.rglob("*.py")):
        if path.name != "dataclass_config.py":
            found = [line.strip() for line in path.read_text().splitlines() if copies.search(line)]
            assert not found, f"{path.relative_to(package)} coerces a config itself: {found}"


def test_no_two_exported_classes_or_functions_share_a_name():
    """Each name exported by the package's ``__all__`` lists means one object (``TaskInfo`` once meant a benchmark
    task's facts and a served task); the old names of renamed objects still import, with a DeprecationWarning."""
    import importlib
    import pkgutil

    import vpt_lightning

    owners = {}
    packages = ["vpt_lightning"] + [
        f"vpt_lightning.{m.name}"
        for m in pkgutil.iter_modules(vpt_lightning.__path__)
        if m.ispkg and m.name not in ("cli", "conf")
    ]
    for package in packages:
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", []):
            value = getattr(module, name)
            if isinstance(value, type) or callable(value):
                where = f"{value.__module__}.{value.__qualname__}"
                owners.setdefault(getattr(value, "__name__", name), set()).add(where)
    assert {name: where for name, where in owners.items() if len(where) > 1} == {}

    import vpt_lightning.backbones as backbones
    import vpt_lightning.backbones.loading as loading
    import vpt_lightning.serving as serving
    from vpt_lightning.backbones import family_class_of_model
    from vpt_lightning.backbones.loading import family_class_of_config
    from vpt_lightning.serving import ServedTask

    for module, old, new in (
        (backbones, "family_for", family_class_of_model),
        (serving, "TaskInfo", ServedTask),
        (loading, "family_of_config", family_class_of_config),
    ):
        with pytest.warns(DeprecationWarning, match=f"{old} is now .*{new.__name__}"):
            assert getattr(module, old) is new
    assert family_class_of_config({"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32}}) is PromptedViT


def test_fitting_state_dict_returns_a_new_mapping_and_leaves_its_argument_alone():
    from pathlib import Path

    from vpt_lightning.backbones.loading import fitting_state_dict

    model = make_vit()  # no classifier: num_classes=0
    state = {**model.state_dict(), "head.weight": torch.zeros(10, 32), "head.bias": torch.zeros(10)}
    before = dict(state)
    fitted = fitting_state_dict(Path("w.safetensors"), model, state)
    assert set(fitted) == set(model.state_dict()) and fitted is not state
    assert state.keys() == before.keys() and all(state[k] is before[k] for k in before)  # untouched
    del state["blocks.0.norm1.weight"]
    with pytest.raises(
        ValueError,
        match=r"'w.safetensors' does not fit model VisionTransformer; missing keys: "
        r"blocks\.0\.norm1\.weight",
    ):
        fitting_state_dict(Path("w.safetensors"), model, state)
