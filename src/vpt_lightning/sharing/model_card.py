"""The model card (``README.md``) of a task package: Hugging Face Hub front matter and a body that says what the
task is, how it was trained, how well it does and how to cite the method."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData

CITATION = """@inproceedings{jia2022vpt,
  title     = {Visual Prompt Tuning},
  author    = {Jia, Menglin and Tang, Luming and Chen, Bor-Chun and Cardie, Claire and Belongie, Serge and
               Hariharan, Bharath and Lim, Ser-Nam},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2022}
}"""


# how a timm kwarg reads in a description, in this order (others follow as ``key value``)
KWARG_WORDS = {
    "depth": "depth {}",
    "embed_dim": "width {}",
    "num_heads": "{} heads",
    "img_size": "{} px",
    "patch_size": "patch {}",
}


def _weights(backbone: Mapping[str, Any]) -> tuple:
    """What the weights of a backbone config are: timm's hub weights, a file (by its name: the shipped quickstart
    weights live in each installation's own folder), or the seeded random init."""
    if backbone.get("checkpoint_path"):
        return ("file", Path(str(backbone["checkpoint_path"])).name)
    return ("hub",) if backbone.get("pretrained") else ("random", backbone.get("init_seed", 0))


def _architecture(backbone: Mapping[str, Any]) -> tuple:
    return (backbone.get("name"), sorted((backbone.get("kwargs") or {}).items(), key=str), _weights(backbone))


@functools.lru_cache(maxsize=1)
def _packaged_backbones() -> Dict[str, tuple]:
    """``conf/backbone`` option -> the architecture and weights it builds (the recipes of the package only)."""
    from omegaconf import OmegaConf

    from ..config import CONFIG_DIR, register_resolvers

    register_resolvers()  # ${vpt.asset:...}
    found: Dict[str, tuple] = {}
    for path in sorted((CONFIG_DIR / "backbone").glob("*.yaml")):
        values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        values = values.get("backbone", values) if isinstance(values, dict) else {}  # a _global_ option nests it
        if isinstance(values, dict) and values.get("name") not in (None, "???"):
            found[path.stem] = _architecture(values)
    return found


def backbone_description(backbone: Mapping[str, Any]) -> str:
    """A backbone config as a person would name it: the packaged ``conf/backbone`` option it is, with its timm model
    (``quickstart_vit (vit_tiny_patch16_224: depth 6, width 96, 3 heads, 32 px, patch 4)``), else the timm name with
    the kwargs that make it another model (``vit_tiny_patch16_224 (depth 4, width 32, 2 heads, 32 px, patch 4)``).

    The model card and ``vpt-report`` (its table and figure) name backbones through it."""
    name = str(backbone.get("name"))
    kwargs = dict(backbone.get("kwargs") or {})
    words = [KWARG_WORDS[key].format(kwargs.pop(key)) for key in KWARG_WORDS if key in kwargs]
    words += [f"{key} {value}" for key, value in sorted(kwargs.items())]
    packaged = next((option for option, arch in _packaged_backbones().items() if arch == _architecture(backbone)), None)
    if packaged is None:
        return f"{name} ({', '.join(words)})" if words else name
    return f"{packaged} ({name}{': ' + ', '.join(words) if words else ''})"


def base_model(backbone: Dict[str, Any], identity: Dict[str, Any]) -> Optional[str]:
    """The Hub repo of the backbone's weights when they came from the Hub (timm's ``hf_hub_id``), else ``None``."""
    if identity.get("weights") != "hub":
        return None
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(backbone["name"])
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    except Exception:  # an unknown name or tag: no link rather than a wrong one
        return None
    return hub_id or None


def task_model_card(task: Any) -> ModelCard:
    """The card of a :class:`~vpt_lightning.task_model.TaskModel` (its spec, identity and ``task.info``: metrics,
    parameter counts, command)."""
    spec, info = task.spec, task.info
    metrics: Dict[str, float] = dict(info.get("metrics") or {})
    name = spec.task_name or "task"
    method = task.method_name
    results: List[EvalResult] = [
        EvalResult(
            task_type="image-classification",
            dataset_type=name,
            dataset_name=name,
            dataset_split=split,
            metric_type="accuracy",
            metric_name=f"{split} top-1",
            metric_value=round(100 * float(metrics[key]), 2),
        )
        for split, key in (("validation", "val/top1"), ("test", "test/top1"))
        if key in metrics
    ]
    data = ModelCardData(
        library_name="vpt-lightning",
        base_model=base_model(spec.backbone, task.identity),
        tags=["visual-prompt-tuning", "vpt", "image-classification", "timm", method],
        datasets=list(info.get("datasets") or [name]),
        metrics=["accuracy"],
        pipeline_tag="image-classification",
        license="apache-2.0",
        model_name=f"{name} ({method})" if results else None,
        eval_results=results or None,
    )
    trainable = info.get("trainable_params")
    if trainable is None:
        trainable = sum(task.state_dict()[k].numel() for k in task.trained_state_keys())
    rows = [f"| {key} | {_figure(key, value)} |" for key, value in sorted(metrics.items())]
    command = info.get("command")
    backbone = backbone_description(spec.backbone)
    lines = [
        f"# {name}: {method} on {backbone}",
        "",
        f"A task trained with vpt-lightning by **{method}** (Visual Prompt Tuning, "
        "Jia et al., ECCV 2022): the frozen backbone is not part of this package, only the trained tensors "
        f"({trainable:,} trainable parameters"
        + (f", {float(info['trainable_percent']):.2f}% of the backbone)." if "trainable_percent" in info else ").")
        + f" Prompts: {spec.prompt.get('num_tokens', 0)} tokens, deep={spec.prompt.get('deep')}.",
        "",
        f"Backbone: `{backbone}` (weights: {task.identity.get('weights')}, fingerprint "
        f"`{task.identity.get('fingerprint')}`); {spec.num_classes} classes.",
        "",
        "## Use",
        "",
        "```python",
        "from vpt_lightning.task_model import TaskModel",
        'task = TaskModel.from_pretrained("PATH_OR_REPO_ID")  # backbone=... pins the frozen backbone',
        "logits = task(images)  # images prepared as in config.json's eval_transform",
        "```",
        "",
        "or `vpt-predict PATH_OR_REPO_ID --images DIR`, `vpt-serve PATH_OR_REPO_ID`.",
        "",
        "## Results",
        "",
    ]
    lines += ["| metric | value |", "|---|---|", *rows] if rows else ["No evaluation was recorded."]
    lines += ["", "## Training", ""]
    lines += [f"```\n{command}\n```" if command else "Trained in Python (no vpt-train command recorded)."]
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _figure(key: str, value: Any) -> str:
    if "top" in key or "acc" in key:
        return f"{100 * float(value):.2f} %"
    return f"{float(value):.4f}"
