"""Whether a run folder's files may be reused: readable, safe to load, and made by the same configuration.

``vpt-train`` and ``vpt-tune`` reuse what a run folder holds: a finished run's ``results.json`` and an interrupted
run's ``checkpoints/last.ckpt``. Each may be damaged (a disk that filled up, a copy cut short), made by another
configuration (another seed, another grid), or not made here at all (a file with a pickle payload). Reusing such a
file silently gives a wrong result, so each case stops the command with an error that names the file, what is wrong
with it and what to do; none of them counts as a failed training run.

- Every run stores the config it was composed with in its checkpoints (:class:`RecordRunConfig`, under
  :data:`RUN_CONFIG_KEY`): the result-determining part (as ``results.json`` records it) and the whole composed
  config. :func:`check_resume` compares it with the resuming job's before anything is restored.
- Checkpoints are read with ``torch.load(weights_only=True)`` (:func:`load_checkpoint`): tensors and plain Python
  values only, so a crafted file is refused before any of its code can run.
- The config names the backbone's weights file by its path, which may hold other weights by now: every run records
  the backbone's identity (``backbone_identity`` in ``results.json``, ``vpt_backbone_identity`` in its checkpoints:
  :func:`vpt_lightning.backbones.identity.backbone_identity`), and :func:`check_same_backbone` /
  :func:`check_resume` compare it with the job's current backbone, so that runs on two backbones never mix.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback

from ..backbones.identity import identity_differences
from ..sharing.checkpoint import IDENTITY_KEY
from ..sharing.regular_files import RefusedFileError, read_json_file

log = logging.getLogger(__name__)
RUN_CONFIG_KEY = "vpt_run_config"
# where a finished run's results.json records the identity of the backbone it trained on (a checkpoint: under
# vpt_lightning.sharing.checkpoint.IDENTITY_KEY, written by VPTModule.on_save_checkpoint)
RESULTS_IDENTITY_KEY = "backbone_identity"
RESTART_HINT = "vpt-tune: --force (or protocol.restart=true) starts that run afresh"


class RunIntegrityError(Exception):
    """A run folder's file cannot be reused as it is (the message names the file and what to do)."""

    def __init__(self, message: str, path: Optional[Path] = None) -> None:
        super().__init__(message)
        self.path = path


class UnreadableFileError(RunIntegrityError):
    """A results file or checkpoint that is truncated, empty or not what it should be."""


class UnsafeCheckpointError(RunIntegrityError):
    """A checkpoint that asks to build Python objects beyond tensors and plain values (refused, never run)."""


class ConfigMismatchError(RunIntegrityError, ValueError):
    """A finished or interrupted run made with another configuration than the job's."""


# ---- configs ------------------------------------------------------------------------------------------------
def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Iterable[str] = ()) -> List[str]:
    """``"key: old -> new"`` for every dotted key whose value differs (keys in ``ignore`` left out)."""
    before, after, skipped = _flatten(old), _flatten(new), set(ignore)
    return [
        f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
        for k in sorted(set(before) | set(after))
        if k not in skipped and before.get(k) != after.get(k)
    ]


def describe_differences(diffs: List[str], shown: int = 6) -> str:
    return "; ".join(diffs[:shown]) + (f"; ... ({len(diffs) - shown} more)" if len(diffs) > shown else "")


def composed_config(cfg: DictConfig) -> Dict[str, Any]:
    """The whole composed config as plain values (Hydra's own node left out), resolved where it can be."""
    composed: Dict[str, Any] = {}
    for key in cfg:
        if key == "hydra":
            continue
        node = cfg._get_node(key)
        try:
            value = cfg[key]
            composed[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except Exception:  # an interpolation only Hydra's runtime resolves (e.g. a run_dir of hydra:): as written
            composed[key] = (
                OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else str(node._value())
            )
    return composed


def _plain(value: Any) -> Any:
    """``value`` as the plain types ``torch.load(weights_only=True)`` reads (anything else as its ``str``)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or type(value) in (str, int, float, bool):
        return value
    return str(value)


class RecordRunConfig(Callback):
    """Store the run's config in every checkpoint it writes (``checkpoint["vpt_run_config"]``), as plain values
    that ``torch.load(weights_only=True)`` reads: ``result`` (what ``results.json`` records and resumes compare)
    and ``composed`` (the whole composed config)."""

    def __init__(self, result: Mapping[str, Any], composed: Optional[Mapping[str, Any]] = None) -> None:
        self.record = {"result": _plain(result), "composed": _plain(composed) if composed is not None else None}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: Dict[str, Any]
    ) -> None:
        checkpoint[RUN_CONFIG_KEY] = self.record


# ---- reading a run folder's files -------------------------------------------------------------------------
def read_results(path: Path) -> Dict[str, Any]:
    """A finished run's ``results.json``; :class:`UnreadableFileError` naming it when it is not readable JSON, or
    not a regular file of at most :data:`~vpt_lightning.sharing.regular_files.MAX_SMALL_FILE_BYTES` (a FIFO, a device:
    never read)."""
    path = Path(path)
    try:
        result = read_json_file(path)
        if not isinstance(result, dict):
            raise ValueError(f"a JSON {type(result).__name__}, not an object")
    except RefusedFileError as err:
        raise UnreadableFileError(f"{err}; {RESTART_HINT}", path) from None
    except (OSError, ValueError) as err:  # read_json_file's error comes from the decoder's (its cause)
        reason = err.__cause__ or err
        raise UnreadableFileError(
            f"{str(path)!r} is not a readable results file ({type(reason).__name__}: {reason}); it was damaged or cut "
            f"short, so the run it stands for cannot be reused. Delete it to run that job again ({RESTART_HINT}).",
            path,
        ) from err
    return result


def backbone_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """What decides a backbone (weights fingerprint, width, depth, architecture) and differs between the identity a
    run recorded and the job's current one, compared as plain values (``results.json`` holds lists for tuples)."""
    return identity_differences(_plain(recorded), _plain(current))


def check_same_backbone(recorded: Optional[Mapping[str, Any]], current: Mapping[str, Any], path: Path) -> None:
    """Refuse a run's file (``path``: its ``results.json`` or checkpoint) made on another backbone than the job's
    (``current``, :func:`vpt_lightning.backbones.identity.backbone_identity`): the config names the weights file by
    its path, so other weights under the same path would otherwise be mixed in silently. A file of an older version,
    without a recorded identity, is reused with a warning."""
    if not isinstance(recorded, Mapping):
        log.warning("%s records no backbone identity (written by an older version): reused unchecked", path)
        return
    diffs = backbone_differences(recorded, current)
    if diffs:
        raise ConfigMismatchError(
            f"{str(path)!r} was trained on another backbone than the job's ({describe_differences(diffs)}); the "
            f"backbone's weights changed under the same config (e.g. another file at backbone.checkpoint_path), so "
            f"that run is not reused. {RESTART_HINT} on the current backbone.",
            Path(path),
        )


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file and what to do.

    :class:`UnsafeCheckpointError` when the file asks to build other objects than tensors and plain values (a
    pickle payload: refused before it runs), :class:`UnreadableFileError` when it is truncated or damaged.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0]
        if "Weights only load failed" in str(err):
            raise UnsafeCheckpointError(
                f"refused to load the checkpoint {str(path)!r}: it asks to build Python objects other than tensors "
                f"and plain values ({detail[:300]}), which could run code. Checkpoints written by vpt-lightning never "
                "do; nothing from this file was run. Resume only from checkpoints made here; delete it to start "
                f"that run afresh ({RESTART_HINT}).",
                path,
            ) from None
        raise _unreadable(path, err) from err
    except (OSError, EOFError, RuntimeError, ValueError) as err:  # a cut-short zip: OSError EINVAL, EOFError
        raise _unreadable(path, err) from err
    if not isinstance(checkpoint, dict):
        raise UnreadableFileError(
            f"{str(path)!r} holds a {type(checkpoint).__name__}, not a Lightning checkpoint "
            f"(a dict); delete it to start that run afresh ({RESTART_HINT})",
            path,
        )
    return checkpoint


def _unreadable(path: Path, err: BaseException) -> UnreadableFileError:
    size = path.stat().st_size if path.exists() else 0
    return UnreadableFileError(
        f"the checkpoint {str(path)!r} ({size} bytes) is not readable ({type(err).__name__}: {err}); it is truncated "
        "or damaged (a disk that filled up, a copy cut short). Delete it to start that run afresh, or resume from "
        f"another checkpoint ({RESTART_HINT}).",
        path,
    )


def check_resume(
    path: Path,
    config: Mapping[str, Any],
    ignore: Iterable[str] = (),
    backbone_identity: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Load the checkpoint a job resumes from and refuse it when another configuration wrote it, or (given the job's
    ``backbone_identity``) when it was trained on another backbone (:func:`check_same_backbone`).

    ``config`` is the job's result-determining config (:func:`vpt_lightning.runs.training.result_config`); keys in
    ``ignore`` may differ (e.g. ``trainer.max_epochs`` to train an explicitly resumed run for longer). A checkpoint
    of an older version, without a recorded config, is resumed with a warning. Returns the loaded checkpoint.
    """
    checkpoint = load_checkpoint(path)
    record = checkpoint.get(RUN_CONFIG_KEY)
    if not isinstance(record, Mapping) or not isinstance(record.get("result"), Mapping):
        log.warning("%s records no run config (written by an older version): resuming it unchecked", path)
    else:
        _check_recorded_config(path, record["result"], config, list(ignore))
    if backbone_identity is not None:
        check_same_backbone(checkpoint.get(IDENTITY_KEY), backbone_identity, path)
    return checkpoint


def _check_recorded_config(
    path: Path, recorded: Mapping[str, Any], config: Mapping[str, Any], ignored: List[str]
) -> None:
    config = _plain(config)  # as it was recorded
    diffs = config_differences(recorded, config, ignored)
    if diffs:
        raise ConfigMismatchError(
            f"the checkpoint {str(path)!r} was written by a run of another configuration "
            f"({describe_differences(diffs)}); it is not resumed. Resume it with the configuration it was made with, "
            f"or start afresh: vpt-train: another run_name (or ckpt_path=null); {RESTART_HINT}.",
            Path(path),
        )
    changed = config_differences(recorded, config) if ignored else []
    if changed:
        log.warning(
            "resuming %s with %s: the result differs from a run made so from the start",
            path,
            describe_differences(changed),
        )
