"""Pinning the frozen backbone a task is loaded on (``--backbone NAME_OR_FILE``, ``from_pretrained(backbone=...)``),
so that a task's own config cannot choose what is downloaded or built."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from .loading import BackboneConfig

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def backbone_pin(value: Any, package_backbone: Optional[Mapping[str, Any]] = None) -> Optional[BackboneConfig]:
    """The backbone the operator pins (``--backbone NAME_OR_FILE``, ``from_pretrained(backbone=...)``):

    - a :class:`BackboneConfig` or its mapping;
    - the name of a packaged ``conf/backbone`` config (``quickstart_vit``, ``vit_base_patch16_224_in21k``...);
    - a ``.yaml``/``.json`` file of backbone fields;
    - a weights file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``, ``.npz``): the task's architecture (timm name
      and kwargs) with these weights, never a download.

    ``None`` keeps the task's own ``backbone`` entry.
    """
    if value is None:
        return None
    if isinstance(value, (BackboneConfig, Mapping)):
        return BackboneConfig.parse(value)
    text = str(value)
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise FileNotFoundError(f"--backbone {text!r}: no such file")
        return BackboneConfig.from_mapping(_read_mapping(path))
    if path.suffix in WEIGHT_SUFFIXES or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"--backbone {text!r}: no such weights file")
        if package_backbone is None:
            raise ValueError(
                f"--backbone {text!r}: a weights file needs the task's architecture, which is unknown here"
            )
        return BackboneConfig.from_mapping(
            {
                "name": package_backbone["name"],
                "kwargs": dict(package_backbone.get("kwargs") or {}),
                "pretrained": False,
                "checkpoint_path": str(path.resolve()),
            }
        )
    from ..config import CONFIG_DIR

    group = CONFIG_DIR / "backbone" / f"{text}.yaml"
    if not group.is_file():
        names = sorted(p.stem for p in (CONFIG_DIR / "backbone").glob("*.yaml"))
        raise ValueError(
            f"--backbone {text!r} is neither a packaged backbone config ({names}) nor a .yaml/.json file nor a "
            f"weights file ({', '.join(WEIGHT_SUFFIXES)})"
        )
    return BackboneConfig.from_mapping(_read_mapping(group))


def _read_mapping(path: Path) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    from ..config import register_resolvers

    if path.suffix == ".json":
        values = json.loads(path.read_text())
    else:
        register_resolvers()  # ${vpt.asset:...} in the packaged configs
        values = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(values, dict):
        raise ValueError(f"--backbone {str(path)!r} holds no mapping of backbone fields")
    return {k: v for k, v in values.items() if k != "defaults"}


def own_backbone(config: Mapping[str, Any], origin: str) -> BackboneConfig:
    """A task's own ``backbone`` entry, made loadable here: a weights file shipped with vpt-lightning (the quickstart
    backbone) is found in this installation; another weights file that is not on this machine is named, with the
    way out (pin the backbone)."""
    from ..config import ASSET_DIR

    parsed = BackboneConfig.parse(config)
    if not parsed.checkpoint_path or Path(parsed.checkpoint_path).expanduser().is_file():
        return parsed
    recorded = Path(parsed.checkpoint_path)
    if recorded.parent.name == ASSET_DIR.name and (ASSET_DIR / recorded.name).is_file():
        parsed.checkpoint_path = str(ASSET_DIR / recorded.name)
        return parsed
    raise FileNotFoundError(
        f"{origin} was trained on the backbone weights file {str(recorded)!r}, which is not on this machine; pin the "
        "backbone with --backbone NAME_OR_FILE (backbone= in Python): a packaged config name, a .yaml/.json of "
        "backbone fields, or your copy of the weights file"
    )
