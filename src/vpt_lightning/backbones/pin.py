"""The frozen backbone a task is loaded on, so that a task's own file cannot choose what is downloaded, read or built.

A task package's ``config.json`` (or a ``.ckpt``'s hparams) names its backbone as values only
(:func:`check_file_backbone`: a timm model name and the architecture's own arguments). What is built for it
(:func:`own_backbone`) is one of:

- the operator's pin (``--backbone NAME_OR_FILE``, ``backbone=`` in Python; :func:`backbone_pin`);
- the named architecture with ``pretrained: false``: a seeded random init;
- the quickstart backbone shipped with vpt-lightning (a ``checkpoint_path`` naming that asset is found in this
  installation; no other file a task names is ever opened);
- timm's hub weights of the name (``pretrained: true``), only where the operator allows the download
  (``--allow-download``, ``allow_download=True``).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from pathlib import Path
from typing import Any, Dict, FrozenSet, Mapping, Optional, Tuple

import timm
import torch
from torch import nn

from .loading import BackboneConfig

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
# timm.create_model and model arguments that choose what is downloaded, read, written or where tensors live: a task
# file may never set them (its backbone's weights come from the rules of own_backbone)
REFUSED_KWARGS = frozenset(
    {
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_strict",
        "cache_dir",
        "checkpoint_path",
        "features_only",
        "feature_cfg",
        "kwargs_filter",
        "scriptable",
        "exportable",
        "no_jit",
        "device",
        "dtype",
    }
)
# the keys of pretrained_cfg_overlay a task file may set: the input size and normalisation of the backbone's data
# config (conf/backbone/*_tiny_random.yaml set input_size), never a weights source (url, file, hf_hub_id...)
DATA_CONFIG_KEYS = frozenset({"input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"})
# the types of a task file's other backbone fields, and how an error says them (kwargs are checked one by one)
FIELD_TYPES = {
    "pretrained": ((bool,), "a boolean"),
    "checkpoint_path": ((str, type(None)), "a string or null"),
    "init_seed": ((int,), "an integer"),
    "resize_embeddings": ((bool,), "a boolean"),
    "reference": ((str, type(None)), "a string or null"),
}
ALLOW_DOWNLOAD_HINT = "allow the download with --allow-download (allow_download=True in Python)"
PIN_HINT = (
    "pin the backbone with --backbone NAME_OR_FILE (backbone= in Python): a packaged config name, a .yaml/.json "
    "of backbone fields, or your copy of the weights file"
)


def _is_plain(value: Any) -> bool:
    """JSON data: ``None``, booleans, finite numbers, strings, and lists of them."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return False


@functools.lru_cache(maxsize=64)
def architecture_arguments(name: str) -> Tuple[str, FrozenSet[str]]:
    """The timm class that model ``name`` builds and the named arguments of its constructor (through its base
    classes' while it passes ``**kwargs`` on), from its default architecture built on the ``meta`` device."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    names: set = set()
    for cls in type(model).__mro__:
        init = cls.__dict__.get("__init__")
        if cls is nn.Module or init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return type(model).__name__, frozenset(names)


def check_file_backbone(values: Any, origin: str) -> Dict[str, Any]:
    """The ``backbone`` entry of a file someone else made (a package's ``config.json``, a ``.ckpt``'s hparams),
    checked to be values only; returns it as :class:`BackboneConfig` fields.

    ``name`` must be a timm model name (never ``hf-hub:``/``hf_hub:``/``local-dir:`` sources); ``kwargs`` only the
    named arguments of that architecture's constructor, as JSON data (numbers, strings, lists), without
    :data:`REFUSED_KWARGS` (downloads, files, folders, devices); ``pretrained_cfg_overlay`` only
    :data:`DATA_CONFIG_KEYS`. ``pretrained`` and ``checkpoint_path`` are read as values: what they lead to is
    decided by :func:`own_backbone`. A ``ValueError`` names ``origin``, the key and the rule.
    """
    if not isinstance(values, Mapping):
        raise ValueError(f"{origin}: backbone must be a mapping of backbone fields, got {type(values).__name__}")
    try:
        config = BackboneConfig.from_mapping(values).to_dict()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{origin}: {err}") from None
    name = config["name"]
    if not isinstance(name, str) or ":" in name or not timm.is_model(name):
        raise ValueError(
            f"{origin}: backbone.name={name!r} is not a timm model name; a task file's backbone names one of "
            "timm.list_models(), never a Hub repo or folder (hf-hub:, hf_hub:, local-dir:)"
        )
    for key, (kinds, kind) in FIELD_TYPES.items():
        if not isinstance(config[key], kinds) or (isinstance(config[key], bool) and bool not in kinds):
            raise ValueError(f"{origin}: backbone.{key}={config[key]!r} is not {kind}")
    kwargs = config["kwargs"]
    try:
        model_class, allowed = architecture_arguments(name)
    except Exception as err:  # a registered name whose default build fails: say which file and name
        raise ValueError(
            f"{origin}: backbone.name={name!r} could not be described ({type(err).__name__}: {err})"
        ) from None
    for key, value in kwargs.items():
        where = f"{origin}: backbone.kwargs.{key}"
        if key == "pretrained_cfg_overlay" and isinstance(value, Mapping):
            extra = sorted(set(value) - DATA_CONFIG_KEYS)
            if extra or not all(_is_plain(v) for v in value.values()):
                raise ValueError(
                    f"{where} sets {extra or 'values that are not plain data'}; a task file may set only the data "
                    f"config keys {sorted(DATA_CONFIG_KEYS)} there, never a weights source (url, file, hf_hub_id...)"
                )
            continue
        if key in REFUSED_KWARGS:
            raise ValueError(
                f"{where} is refused: a task file may not choose what timm downloads, reads or writes, or where "
                f"tensors live ({', '.join(sorted(REFUSED_KWARGS))}); its backbone's weights come from the "
                "operator (--backbone), a seeded random init, the shipped quickstart backbone or an allowed download"
            )
        if key not in allowed:
            raise ValueError(
                f"{where} is not an argument of {model_class} ({name}); a task file's backbone.kwargs may hold only "
                f"its architecture's own arguments: {sorted(allowed - REFUSED_KWARGS)}"
            )
        if not _is_plain(value):
            raise ValueError(
                f"{where}={value!r} is not plain data (a finite number, a string, a boolean, null or a list of them)"
            )
    return config


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


def own_backbone(config: Mapping[str, Any], origin: str, allow_download: bool = False) -> BackboneConfig:
    """What is built for a task's own ``backbone`` entry when the operator pins none (see the module doc): its seeded
    random init; the quickstart backbone shipped with vpt-lightning, found in this installation (the only weights
    file a task may name: any other is never opened, and the error says to pin it); timm's hub weights only with
    ``allow_download``. ``config`` holds values only (:func:`check_file_backbone`)."""
    from ..config import ASSET_DIR

    parsed = BackboneConfig.parse(config)
    if parsed.checkpoint_path:
        recorded = Path(parsed.checkpoint_path)
        if recorded.parent.name == ASSET_DIR.name and (ASSET_DIR / recorded.name).is_file():
            parsed.checkpoint_path = str(ASSET_DIR / recorded.name)
            return parsed
        raise ValueError(
            f"{origin}: backbone.checkpoint_path={str(recorded)!r}: a weights file a task names is never opened (but "
            f"vpt-lightning's shipped quickstart backbone); {PIN_HINT}"
        )
    if parsed.pretrained and not allow_download:
        raise ValueError(
            f"{origin}: backbone.pretrained=true asks for timm's hub weights of {parsed.name!r}, a download: "
            f"{ALLOW_DOWNLOAD_HINT}, or {PIN_HINT}"
        )
    return parsed
