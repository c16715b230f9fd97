"""A run folder read as data: the plain values of its composed config, never code.

``vpt-train`` leaves the config it composed in every run folder (``.hydra/config.yaml``), with its interpolations
as written (``${paths.data_dir}``, ``${oc.env:...}``) and ``_target_`` nodes naming what Hydra built. Run folders
travel (with a paper, from a colleague), so the commands that read one take values from it and nothing else:

- the file is read only if it is a regular file of at most
  :data:`~vpt_lightning.sharing.regular_files.MAX_SMALL_FILE_BYTES`, with YAML's safe loader (plain values;
  :func:`read_run_config`);
- no interpolation is resolved (:func:`plain_value`): a value that is one counts as absent;
- no ``_target_`` of it is imported or instantiated: :func:`datamodule_from_run` rebuilds the DataModule from the
  DataModules of the package's own ``conf/data`` group (:func:`registered_datamodules`), every key checked against
  the class's parameters and their types. An interpolated value is taken from the operator's own config (the
  packaged group composed here, in the operator's environment), and the operator's ``--data KEY=VALUE`` wins over
  both. DataModules only read their data folders.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import typing
from collections.abc import Sequence as AbcSequence
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import yaml

from ..config import CONFIG_DIR
from ..sharing.regular_files import read_regular_file

log = logging.getLogger(__name__)
RUN_CONFIG = Path(".hydra") / "config.yaml"
# set by the command from the model, never by a config
NOT_FROM_CONFIG = ("backbone_data_config",)


def run_config_path(run_dir: os.PathLike) -> Path:
    """Where a run folder keeps the config it was composed with."""
    return Path(run_dir) / RUN_CONFIG


def read_run_config(run_dir: os.PathLike) -> Dict[str, Any]:
    """The run's composed config as plain values (YAML's safe loader; interpolations left as written)."""
    path = run_config_path(run_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist (a vpt-train run folder keeps its composed config there)"
        )
    try:
        config = yaml.safe_load(read_regular_file(path))
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"{str(path)!r} is not readable YAML ({reason})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} holds a {type(config).__name__}, not a composed config (a mapping)")
    return config


def is_interpolation(value: Any) -> bool:
    """Whether ``value`` is (or is a list holding) an OmegaConf interpolation (``${...}``), which is never resolved
    from a run folder."""
    if isinstance(value, list):
        return any(is_interpolation(item) for item in value)
    return isinstance(value, str) and "${" in value


def plain_value(config: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """The value at the dotted ``key`` as written, else ``default`` (missing, or an interpolation: never resolved)."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return default if node is None or is_interpolation(node) else node


# ---- the DataModule of a run ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def registered_datamodules() -> Dict[str, str]:
    """``{DataModule class path: its conf/data option}`` for the options of the package's ``conf/data`` group that
    name a class (``vtab``, ``fgvc``, ``folder``, ``synthetic``, ...): the DataModules a run folder may ask for."""
    found: Dict[str, str] = {}
    for path in sorted((CONFIG_DIR / "data").glob("*.yaml")):
        target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
        if target:
            found.setdefault(target, path.stem)
    return found


def _schema_type(annotation: Any) -> Any:
    """An annotation as OmegaConf's structured configs check it (sequences as lists; anything else unchecked)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return Optional[_schema_type(inner[0])]
        return Any
    if origin in (list, tuple, AbcSequence):
        items = [a for a in args if a is not Ellipsis]
        return List[_schema_type(items[0]) if len(set(items)) == 1 else Any]  # type: ignore[misc]
    return annotation if annotation in (int, float, bool, str) else Any


def parameters(cls: type) -> Dict[str, Tuple[Any, Any]]:
    """``{name: (annotation, default)}`` of ``cls``'s constructor, following ``**kwargs`` up its bases."""
    found: Dict[str, Tuple[Any, Any]] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        signature, hints = inspect.signature(init), typing.get_type_hints(init)
        for name, parameter in signature.parameters.items():
            if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                found.setdefault(name, (hints.get(name, Any), parameter.default))
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            break
    return {name: spec for name, spec in found.items() if name not in NOT_FROM_CONFIG}


@functools.lru_cache(maxsize=None)
def _schema(cls: type) -> Any:
    """A structured config of ``cls``'s parameters (every field missing), which checks names and types."""
    from omegaconf import MISSING, OmegaConf

    fields = [
        (name, _schema_type(annotation), dataclasses.field(default=MISSING))
        for name, (annotation, _) in parameters(cls).items()
    ]
    return OmegaConf.structured(dataclasses.make_dataclass(f"{cls.__name__}Parameters", fields))


def _not_plain(value: Any) -> Optional[str]:
    """Why ``value`` is not plain data (a scalar, or a list of scalars), else ``None``."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list holding a mapping or a list" if any(isinstance(v, (Mapping, list)) for v in value) else None
    if value is None or isinstance(value, (str, int, float, bool)):
        return None
    return f"a {type(value).__name__}"


def checked_value(cls: type, key: str, value: Any, where: str) -> Any:
    """``value`` for the parameter ``key`` of ``cls`` as its type wants it (OmegaConf's conversions); a
    ``ValueError`` starting with ``where`` when ``key`` is no parameter or ``value`` is not plain data of its type."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    reason = _not_plain(value)
    if reason is not None:
        raise ValueError(
            f"{where}: {reason}, not a plain value (a number, a string, a boolean, null or a list of those: "
            "nothing in a config is built)"
        )
    try:
        merged = OmegaConf.merge(_schema(cls), {key: value})
    except ConfigKeyError:
        raise ValueError(
            f"{where}: not a parameter of {cls.__name__} (its parameters: {sorted(parameters(cls))})"
        ) from None
    except ValidationError as err:
        raise ValueError(f"{where}: {str(err.msg).splitlines()[0]}") from None
    return OmegaConf.to_container(merged, resolve=False)[key]


def _packaged_values(option: str) -> Dict[str, Any]:
    """The ``data`` node of the package's ``conf/data/<option>.yaml``, composed and resolved here (the operator's
    own config and environment); mandatory values (``???``) left out."""
    from omegaconf import OmegaConf

    from ..config import compose

    node = OmegaConf.to_container(compose([f"data={option}"]).data, resolve=True, throw_on_missing=False)
    return {k: v for k, v in node.items() if k != "_target_" and v != "???"}  # type: ignore[union-attr]


def datamodule_from_run(
    run_dir: os.PathLike, overrides: Optional[Mapping[str, Any]] = None, notify: Callable[[str], None] = log.warning
) -> Any:
    """The DataModule a run trained on, rebuilt from the plain values of its ``.hydra/config.yaml`` (see the module
    docstring); ``overrides`` (``--data KEY=VALUE``) win. ``notify`` is told of each value not taken from the run."""
    from hydra.utils import get_class

    path = run_config_path(run_dir)
    data = read_run_config(run_dir).get("data")
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} has no data node (the composed config of a vpt-train run has one)")
    target, registered = data.get("_target_"), registered_datamodules()
    if target not in registered:
        raise ValueError(
            f"{str(path)!r}: data._target_={target!r} is not a registered DataModule; a run folder's DataModule is "
            f"rebuilt from the package's own ({', '.join(sorted(registered))}), never imported from its file"
        )
    cls = get_class(str(target))  # a class path of the package's own conf/data group
    overrides = dict(overrides or {})
    values = _packaged_values(registered[str(target)])
    for key, value in data.items():
        if key == "_target_" or key in overrides:
            continue
        if is_interpolation(value):
            default = f"using {values[key]!r}, your config's default" if key in values else "no default"
            notify(
                f"{str(path)!r}: data.{key}={value!r} is an interpolation, never resolved from a run folder; "
                f"{default} (--data {key}=VALUE to choose)"
            )
            continue
        values[key] = checked_value(cls, key, value, f"{str(path)!r}: data.{key}")
    for key, value in overrides.items():
        values[key] = checked_value(cls, key, value, f"--data {key}")
    missing = [
        n for n, (_, default) in parameters(cls).items() if default is inspect.Parameter.empty and n not in values
    ]
    if missing:
        raise ValueError(
            f"{str(path)!r}: no usable value of data.{missing[0]} for {cls.__name__}; "
            f"give it with --data {missing[0]}=VALUE"
        )
    return cls(**values)
