"""``TuningMethod``: the contract of a tuning method, and the config fields every method shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Type

from torch import nn

from ..backbones.base import PromptedBackbone
from ..dataclass_config import DataclassConfig
from ..prompt import PromptConfig

PROMPT_NEEDS = {
    "deep": (lambda p: p.enabled and p.deep, "prompts at every block (prompt=deep, num_tokens > 0)"),
    "shallow": (lambda p: p.enabled and not p.deep, "prompts inserted once (prompt=shallow, num_tokens > 0)"),
    "some": (lambda p: p.enabled, "prompts (prompt=deep or prompt=shallow, num_tokens > 0)"),
    "none": (lambda p: not p.enabled, "no prompts (prompt=none)"),
    "any": (lambda p: True, "any prompt config"),
}


@dataclass
class TuningConfig(DataclassConfig):
    """The ``tuning`` config node; a method with options subclasses it (``conf/tuning/<method>.yaml`` sets it).

    Attributes:
        method: the registry name of the method (``vpt_deep``, ``linear``, ``partial``...).
        name: the label of the run in folders, logs and reports (``partial_2``); ``None``: the method's label.
    """

    method: str = "vpt_deep"
    name: Optional[str] = None

    group = "tuning"


class TuningMethod:
    """One tuning method: what trains besides the prompts, its head, and how the protocol treats it.

    Subclass it in a module of :mod:`vpt_lightning.methods` with ``@register_method`` and add
    ``conf/tuning/<name>.yaml`` (which selects ``/schema/method/<name>``); nothing else needs to know the method.
    The class is the one place of its facts: the config composed for ``tuning=<name>`` (its prompt group, optimizer,
    label and ``backbone_eval``) is derived from these attributes by :func:`vpt_lightning.schemas.method_node`.

    Class attributes:
        name: registry key (``tuning.method``) and default label.
        Config: its config dataclass (a :class:`TuningConfig` subclass with its own options).
        prompts: the prompt config it needs: ``deep``, ``shallow``, ``some`` (either), ``none`` or ``any`` (checked
            before training).
        trains_backbone: whether backbone weights change (then a task checkpoint carries them, the backbone
            cannot be shared with other tasks, and ``backbone_eval`` defaults to false).
        lr_grid: the key of its learning-rate grid in the protocol config (``protocol.base_lr``...).
        wd_grid: the key of its weight-decay grid in the protocol config (``protocol.weight_decay``...).
        optimizer: its default ``optim`` group (``tuning=<name>`` composes it; ``optim=...`` on the command line
            overrides it): the paper's SGD for prompts and frozen-backbone heads, AdamW where backbone
            weights or adapters train.
        head_only: the backbone is frozen, has no prompts and nothing of it trains: the head sees a pure function of
            the image, so training may run on cached features (:mod:`vpt_lightning.runs.feature_cache`).
        paper_method: its key in :mod:`vpt_lightning.protocol.paper`'s reference numbers, if the paper reports it.
        label_option: a config field whose value the default label carries (``partial_2`` for Partial-k).
        report_order: where its column stands in ``vpt-report``'s tables, lowest first (ties by name): the paper's
            Table 1 order (Full 0; head-oriented 10-19; backbone-oriented 20-29; VPT 30-39); a method without one
            comes last.
    """

    name: ClassVar[str]
    Config: ClassVar[Type[TuningConfig]] = TuningConfig
    prompts: ClassVar[str] = "none"
    trains_backbone: ClassVar[bool] = False
    lr_grid: ClassVar[str] = "base_lr"
    wd_grid: ClassVar[str] = "weight_decay"
    optimizer: ClassVar[str] = "sgd"
    head_only: ClassVar[bool] = False
    paper_method: ClassVar[Optional[str]] = None
    label_option: ClassVar[Optional[str]] = None
    report_order: ClassVar[float] = float("inf")

    @classmethod
    def label(cls, config: TuningConfig) -> str:
        """The run's label: ``tuning.name`` if set, else the method's name (with its k for Partial-k, MLP-k)."""
        if config.name:
            return config.name
        return f"{cls.name}_{getattr(config, cls.label_option)}" if cls.label_option else cls.name

    @classmethod
    def check_prompt(cls, config: TuningConfig, prompt: PromptConfig) -> None:
        """Refuse a prompt config that contradicts the method (so results are never mislabelled)."""
        test, wanted = PROMPT_NEEDS[cls.prompts]
        if not test(prompt):
            raise ValueError(
                f"tuning={cls.label(config)} needs {wanted}, but prompt.num_tokens={prompt.num_tokens}, "
                f"prompt.deep={prompt.deep}; choose the strategy with tuning=vpt_deep|vpt_shallow|linear (it sets "
                "the prompt group) rather than prompt=..."
            )

    @classmethod
    def apply(cls, backbone: PromptedBackbone, config: TuningConfig) -> None:
        """Prepare the (frozen) prompted backbone: unfreeze or add what the method trains. Default: nothing."""

    @classmethod
    def build_head(cls, in_features: int, num_classes: int, config: TuningConfig) -> nn.Module:
        """The classifier on the pooled features. Default: linear."""
        return nn.Linear(in_features, num_classes)

    @classmethod
    def config_for_saved_tensors(cls, config: TuningConfig) -> TuningConfig:
        """The config that rebuilds a trained task whose tensors are then loaded from its file: options that only
        choose the initial values of what trains (a download, a file to read) are set so that nothing is fetched or
        opened, since the file's tensors replace them. Default: the config as it is."""
        return config


class AdamWRecipe(TuningMethod):
    """Methods the paper trains with AdamW (Appendix A) on the official fine-tuning lr x wd grid (tune_vtab.py)."""

    lr_grid = "base_lr_tuned_backbone"
    wd_grid = "weight_decay_tuned_backbone"
    optimizer = "adamw"


class FineTuningMethod(AdamWRecipe):
    """Methods that train backbone weights (full, partial, bias): AdamW, and the backbone cannot be shared."""

    trains_backbone = True


def module_names(root: nn.Module, modules: List[nn.Module]) -> List[str]:
    """Names of ``modules`` relative to ``root`` (for timm's freeze/unfreeze helpers)."""
    names: Dict[int, str] = {id(m): n for n, m in root.named_modules()}
    return [names[id(m)] for m in modules]
