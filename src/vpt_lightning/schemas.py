"""Hydra structured-config schemas: the config dataclasses registered in Hydra's ConfigStore.

``conf/train.yaml`` puts each schema under its group's node (``schema/prompt@prompt`` before ``prompt: deep``), so
that composing already checks names and types (an unknown key or a non-number fails with the key), and
``OmegaConf.to_object`` turns the node into the validated dataclass: each config is parsed once. Tuning methods
register one schema each (``schema/tuning/<method>``) and one method node (``schema/method/<method>``, see
:func:`method_node`), which their ``conf/tuning/<method>.yaml`` selects. The ``optim`` node stays open: its keys
beyond ours are the optimizer's own arguments, checked against its signature.
"""

from __future__ import annotations

from typing import Any, Dict, List, Type

from hydra.core.config_store import ConfigStore

from .backbones import BackboneConfig
from .methods import TuningMethod, get_method, method_names
from .prompt import PromptConfig

# the prompt config group that a method's ``prompts`` need selects by default (``some``: deep, as the paper's VPT)
PROMPT_GROUP = {"deep": "deep", "shallow": "shallow", "some": "deep", "none": "none"}


def method_node(method: Type[TuningMethod]) -> Dict[str, Any]:
    """What ``tuning=<method>`` composes, derived from the method class so that no YAML repeats it.

    Its defaults list puts the method's config dataclass under ``tuning`` and selects the prompt group its
    ``prompts`` need and its ``optimizer`` group; it sets ``tuning.method``, ``tuning.name`` (the method's label:
    ``partial_${k}`` for a ``label_option``) and ``backbone_eval`` (true unless the method trains backbone
    weights). Each is a default: ``prompt=``, ``optim=``, ``tuning.name=`` or ``backbone_eval=`` on the command line
    override it.
    """
    defaults: List[Any] = [f"/schema/tuning/{method.name}@tuning"]
    if method.prompts in PROMPT_GROUP:
        defaults.append({"override /prompt": PROMPT_GROUP[method.prompts]})
    defaults += [{"override /optim": method.optimizer}, "_self_"]
    label = f"{method.name}_${{tuning.{method.label_option}}}" if method.label_option else method.name
    tuning = {"method": method.name, "name": label}
    return {"defaults": defaults, "tuning": tuning, "backbone_eval": not method.trains_backbone}


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(group="schema", name="prompt", node=PromptConfig)
    store.store(group="schema", name="backbone", node=BackboneConfig)
    for name in method_names():
        method = get_method(name)
        store.store(group="schema/tuning", name=name, node=method.Config)
        store.store(group="schema/method", name=name, node=method_node(method), package="_global_")
