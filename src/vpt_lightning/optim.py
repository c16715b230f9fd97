"""The ``optim`` config group: which ``torch.optim`` optimizer (a Hydra ``_target_`` / ``_partial_`` node), the
learning-rate scaling rule and the warm-up + cosine schedule shared by every optimizer.

The operator's config may name any optimizer class (its module is imported); an ``optim`` node read from a file
someone else made (a checkpoint's hparams) never imports anything: :func:`file_optimizer_class` finds
``torch.optim.NAME`` or a class of a module the operator already imported, else refuses it."""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Iterable, Mapping, Optional, Type

import torch
from hydra.utils import get_class, instantiate

from .dataclass_config import DataclassConfig, number
from .schedule import warmup_cosine_factor

# our keys; every other key of the node is an argument of the optimizer (momentum, betas, eps, nesterov...)
SCHEDULE_KEYS = ("name", "base_lr", "weight_decay", "warmup_epochs", "lr_batch_size")
# checks of common optimizer arguments, so a bad value names the key before training
ARGUMENT_CHECKS = {
    "momentum": ("a number in [0, 1)", lambda v: 0 <= v < 1),
    "eps": ("a number > 0", lambda v: v > 0),
    "dampening": ("a number in [0, 1]", lambda v: 0 <= v <= 1),
}


def _imported_class(target: str) -> Any:
    """The attribute a dotted name gives in ``torch.optim`` or in a module already imported, without importing."""
    module_name, _, name = target.rpartition(".")
    module = torch.optim if module_name == "torch.optim" else sys.modules.get(module_name)
    return getattr(module, name, None) if module is not None and name else None


def _is_optimizer(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)


def file_optimizer_class(target: Any, origin: str) -> Type[torch.optim.Optimizer]:
    """The optimizer class an ``optim._target_`` read from a file names, never importing a module for it:
    ``torch.optim.NAME``, or a class of a module the operator's own code already imported; a ``ValueError``
    naming ``origin`` otherwise."""
    cls = _imported_class(str(target)) if isinstance(target, str) else None
    if not _is_optimizer(cls):
        raise ValueError(
            f"{origin}: optim._target_={target!r} is neither a torch.optim optimizer nor one of a module you imported; "
            "a file's optimizer is never imported (import its module first, or give optim= yourself)"
        )
    return cls


def _optimizer_class(target: Any) -> Type[torch.optim.Optimizer]:
    found = _imported_class(str(target))
    if _is_optimizer(found):
        return found
    try:
        cls = get_class(str(target))
    except Exception as err:
        raise ValueError(
            f"optim._target_={target!r} cannot be imported ({err}); give a torch.optim.Optimizer class such as "
            "torch.optim.SGD or torch.optim.AdamW (optim=sgd|adamw)"
        ) from None
    if not _is_optimizer(cls):
        raise ValueError(f"optim._target_={target!r} is not a torch.optim.Optimizer class")
    return cls


@dataclass
class OptimConfig(DataclassConfig):
    """The ``optim`` group (``optim=sgd``, the default and the paper's; ``optim=adamw``).

    The learning rate actually used is ``base_lr * global_batch / lr_batch_size`` where the global batch is the
    per-device batch times devices, nodes and gradient accumulation; it warms up linearly over ``warmup_epochs``
    and then decays to 0 on a cosine, stepped every iteration, whatever the optimizer.

    Attributes:
        target: the optimizer class (``_target_`` in the config), e.g. ``torch.optim.SGD``.
        arguments: its other arguments (every key of the node that is not one of ours: ``momentum``, ``betas``...).
    """

    name: str = "sgd"
    base_lr: float = 0.1
    weight_decay: float = 0.0001
    warmup_epochs: float = 10.0
    lr_batch_size: int = 256
    target: str = "torch.optim.SGD"
    arguments: Dict[str, Any] = field(default_factory=lambda: {"momentum": 0.9})

    group = "optim"

    def __post_init__(self) -> None:
        self.base_lr = number("optim.base_lr", self.base_lr, "a number > 0", lambda v: v > 0)
        self.weight_decay = number("optim.weight_decay", self.weight_decay, "a number >= 0", lambda v: v >= 0)
        self.warmup_epochs = number("optim.warmup_epochs", self.warmup_epochs, "a number >= 0", lambda v: v >= 0)
        self.lr_batch_size = number("optim.lr_batch_size", self.lr_batch_size, "an integer > 0", lambda v: v > 0, True)
        cls = _optimizer_class(self.target)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params", "lr", "weight_decay"}
        unknown = sorted(set(self.arguments) - accepted)
        if unknown:
            raise ValueError(
                f"unknown optim option(s) {unknown} for {cls.__name__}; valid keys are "
                f"{sorted(['_target_', '_partial_', *SCHEDULE_KEYS, *accepted])}"
            )
        self.arguments = dict(self.arguments)
        for key, (valid, test) in ARGUMENT_CHECKS.items():
            if key in self.arguments:
                self.arguments[key] = number(f"optim.{key}", self.arguments[key], valid, test)

    @classmethod
    def from_mapping(cls, cfg: Optional[Mapping[str, Any]]) -> "OptimConfig":
        """From the flat config node: ``_target_`` / ``_partial_``, our keys, and the optimizer's arguments."""
        values = dict(cfg or {})
        if values.pop("_partial_", True) is not True:
            raise ValueError("optim._partial_ must be true: the optimizer is built once its parameters are known")
        target = values.pop("_target_", None)
        kwargs: Dict[str, Any] = {"target": target or cls.target}
        ours = {f.name for f in fields(cls)} - {"target", "arguments"}
        kwargs.update({k: values.pop(k) for k in list(values) if k in ours})
        if "arguments" in values:  # the dataclass layout (to_dict of an older version)
            values.update(values.pop("arguments") or {})
        # without a _target_, the default optimizer (SGD) keeps its default arguments (momentum 0.9)
        kwargs["arguments"] = values if target else {**cls().arguments, **values}
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """The flat config node (as in ``conf/optim/*.yaml``)."""
        return {
            "_target_": self.target,
            "_partial_": True,
            **{k: getattr(self, k) for k in SCHEDULE_KEYS},
            **self.arguments,
        }

    def build(self, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The optimizer over ``params`` at learning rate ``lr`` (Hydra instantiates the partial node)."""
        factory = instantiate({"_target_": self.target, "_partial_": True, **self.arguments})
        return factory(params, lr=lr, weight_decay=self.weight_decay)

    def scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: float, total_steps: int):
        """Linear warm-up over ``warmup_epochs``, then cosine decay to 0 at ``total_steps`` (stepped per iteration)."""
        warmup_steps = int(math.ceil(self.warmup_epochs * steps_per_epoch))
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps)
        )
