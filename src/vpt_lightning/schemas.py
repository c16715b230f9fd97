"""Hydra structured-config schemas: the config dataclasses registered in Hydra's ConfigStore.

``conf/train.yaml`` puts each schema under its group's node (``schema/prompt@prompt`` before ``prompt: deep``), so
that composing already checks names and types (an unknown key or a non-number fails with the key), and
``OmegaConf.to_object`` turns the node into the validated dataclass: each config is parsed once. Tuning methods
register one schema each (``schema/tuning/<method>``), which their ``conf/tuning/<method>.yaml`` selects. The
``optim`` node stays open: its keys beyond ours are the optimizer's own arguments, checked against its signature.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from .backbones import BackboneConfig
from .methods import method_names
from .methods import get_method
from .prompt import PromptConfig


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(group="schema", name="prompt", node=PromptConfig)
    store.store(group="schema", name="backbone", node=BackboneConfig)
    for name in method_names():
        store.store(group="schema/tuning", name=name, node=get_method(name).Config)
