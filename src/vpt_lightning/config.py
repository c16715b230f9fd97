"""Hydra/OmegaConf plumbing: where the packaged configs live, the ``vpt.asset``, ``vpt.family_grid``,
``vpt.prompt_length``, ``vpt.protocol_variant`` and ``vpt.folder_task_name`` resolvers, the schemas, ``compose``,
and what a task's name (``task_name``, a served task's) may hold."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).parent / "conf"
#: the characters of a task's name (it names a run folder, a package folder, a URL path segment, a CSV cell); any
#: such name is valid, ``train`` or ``eval`` too: a task store keeps its tasks by name, never as attributes
NAME_CHARACTERS = "A-Za-z0-9_-"
TASK_NAME = re.compile(f"[{NAME_CHARACTERS}]+")
TASK_NAME_RULE = "may hold only letters, digits, '_' and '-'"
ASSET_DIR = Path(__file__).parent / "assets"


def asset_path(name: str) -> str:
    """Absolute path of a file shipped in ``vpt_lightning/assets`` (``${vpt.asset:NAME}`` in configs)."""
    path = ASSET_DIR / name
    if not path.is_file():
        available = sorted(p.name for p in ASSET_DIR.glob("*")) if ASSET_DIR.is_dir() else []
        raise FileNotFoundError(f"packaged asset {name!r} not found in {ASSET_DIR}; available: {available}")
    return str(path)


def family_grid(key: str, default: Any, _root_: DictConfig) -> Any:
    """``${vpt.family_grid:KEY,DEFAULT}`` in ``conf/tune.yaml``: the backbone family's own sweep values for the
    tuning method of the config (e.g. ConvNets' border widths for VPT), else ``DEFAULT``."""
    from .backbones.loading import family_class_of_config
    from .methods import get_method

    backbone = OmegaConf.to_container(_root_.backbone, resolve=True)
    prompts = get_method(_root_.tuning.method).prompts != "none"
    return family_class_of_config(backbone).protocol_grid(prompts).get(key, default)


def prompt_length(task: str, benchmark: Optional[str] = None) -> int:
    """``${vpt.prompt_length:TASK,BENCHMARK}`` in the VTAB/FGVC experiments: the task's VPT-Deep prompt length from
    the task table (:mod:`vpt_lightning.data.registry`), the one place it is written."""
    from .data.registry import get_task

    return get_task(str(task), benchmark).default_prompt_length


def variant_suffix(overrides: Sequence[str], keys: Sequence[str]) -> str:
    """A ``vpt-tune`` protocol folder's suffix for a command line's ``overrides``: ``""`` when none sets one of
    ``keys`` (or a key below one: ``prompt`` covers ``prompt.depth=6`` and ``prompt=shallow``), else ``"/"`` and
    those overrides as typed, sorted and joined by ``,`` as in Hydra's ``override_dirname`` (a ``/`` in a value
    becomes ``_``). So ``vpt-tune -m ... recipe.num_tokens=1,10`` runs each value in a folder of its own,
    ``<tuning>/recipe.num_tokens=1`` and ``<tuning>/recipe.num_tokens=10``, where ``vpt-tune ... recipe.num_tokens=10``
    alone finds it again."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    def varies(key: str) -> bool:
        return any(key == k or key.startswith(f"{k}.") for k in keys)

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    lines = sorted(o.input_line for o in parsed if varies(o.key_or_group))
    return "/" + ",".join(lines).replace("/", "_") if lines else ""


def protocol_variant(keys: Any) -> str:
    """``${vpt.protocol_variant:KEYS}`` in ``conf/tune.yaml`` (``protocol.variant``): the :func:`variant_suffix` of
    this Hydra job's command line; ``""`` outside a Hydra job (a config composed in Python has no command line)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    return variant_suffix(HydraConfig.get().overrides.task, [str(k) for k in keys])


def check_task_name(name: object, origin: str = "") -> str:
    """``name`` if it is a task name (all of it :data:`TASK_NAME`), else a ``ValueError`` naming it (and
    ``origin``, where it comes from) and the rule."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ValueError(f"task name {name!r}{f' ({origin})' if origin else ''} {TASK_NAME_RULE}")
    return name


def as_task_name(text: str) -> str:
    """``text`` as a task name: each character a task name may not hold replaced by ``_``."""
    return re.sub(f"[^{NAME_CHARACTERS}]", "_", text)


def folder_task_name(root: Optional[str]) -> str:
    """``${vpt.folder_task_name:${oc.select:data.root,null}}`` in ``conf/data/folder.yaml``: a run on your own images
    is named after their folder (its last component, ``~`` expanded, as an absolute path so ``.`` names the current
    folder), made a task name (:func:`as_task_name`: other characters become ``_``). Without a root (``data.root``
    not given yet: the data module's error names it), ``train``."""
    if root is None:
        return "train"
    return as_task_name(Path(os.path.abspath(os.path.expanduser(str(root)))).name) or "train"


def register_resolvers() -> None:
    """Register the package's OmegaConf resolvers and Hydra schemas (idempotent); call before composing."""
    from .schemas import register_schemas

    if not OmegaConf.has_resolver("vpt.asset"):
        OmegaConf.register_new_resolver("vpt.asset", asset_path)
    if not OmegaConf.has_resolver("vpt.family_grid"):
        OmegaConf.register_new_resolver("vpt.family_grid", family_grid)
    if not OmegaConf.has_resolver("vpt.prompt_length"):
        OmegaConf.register_new_resolver("vpt.prompt_length", prompt_length)
    if not OmegaConf.has_resolver("vpt.protocol_variant"):
        OmegaConf.register_new_resolver("vpt.protocol_variant", protocol_variant)
    if not OmegaConf.has_resolver("vpt.folder_task_name"):
        OmegaConf.register_new_resolver("vpt.folder_task_name", folder_task_name)
    register_schemas()


def compose(overrides: Optional[List[str]] = None, config_name: str = "train") -> DictConfig:
    """Compose the packaged config like ``vpt-train`` would, without running it (for notebooks and tests).

    ``hydra:`` interpolations (the run folder) are only available inside ``vpt-train``; pass
    ``hydra.run.dir`` style overrides there instead.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=True)
