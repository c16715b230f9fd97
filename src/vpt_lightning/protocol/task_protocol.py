"""The paper's protocol for one task and one tuning strategy: sweep on val, select, final runs over seeds.

Selection takes the best validation top-1 **at the last epoch** (ties: the smaller learning rate, then the
smaller weight decay); the final runs train on train+val and report the test top-1 **at the last epoch**,
averaged over seeds. Every run has its own folder; a run with ``results.json`` is never repeated, and one that stopped
half-way resumes from its ``checkpoints/last.ckpt``. Runs that diverge (non-finite loss) or run out of memory are
never selected.

Nothing is reused that does not fit: a finished run or a checkpoint of another configuration or of another backbone
(other weights under the same ``backbone.checkpoint_path``: runs record the backbone's identity, which is compared
with the job's, computed once per backbone config and weights file), an unreadable ``results.json`` and a truncated
or unsafe checkpoint each stop the protocol with an error naming the file and the difference
(:mod:`vpt_lightning.runs.integrity`); ``protocol.restart=true`` (``vpt-tune --force``) starts such a run
afresh instead. One process at a time works in a protocol folder and in each run folder
(:mod:`vpt_lightning.runs.locking`).
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import logging
import math
import shutil
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ..backbones import BackboneConfig, create_backbone
from ..methods import get_method
from ..runs.atomic import remove_stale_temp_files, write_json_atomic, write_text_atomic
from ..runs.integrity import (
    RESTART_HINT,
    RESULTS_IDENTITY_KEY,
    ConfigMismatchError,
    RunIntegrityError,
    check_resume,
    check_same_backbone,
    config_differences,
    describe_differences,
    read_results,
)
from ..runs.locking import LOCK_FILE, folder_lock
from ..runs.nonfinite import NonFiniteLossError
from ..runs.training import RESULTS_FILE, last_checkpoint, parse_configs, result_config, train
from .report import SUMMARY_FILE, find_summaries  # noqa: F401 (find_summaries: read by vpt-report, was here)
from .search import optuna_sweep, search_kind

log = logging.getLogger(__name__)
# what a sweep point may fail with and still leave the others to run: the training itself failing (a NaN loss is
# 'diverged', caught apart); errors about the run folder, the config or the data stop the protocol
TRAINING_FAILURES = (torch.OutOfMemoryError,)


def grid_points(protocol: DictConfig, method: str) -> List[Dict[str, Any]]:
    """The sweep's points for a tuning method: its lr grid x its weight-decay grid (``protocol[<method's lr_grid>]``
    x ``protocol[<method's wd_grid>]``, x prompt length when ``protocol.num_tokens`` is a list)."""
    entry = get_method(method)
    grids = []
    for attribute in ("lr_grid", "wd_grid"):
        key = getattr(entry, attribute)
        if key not in protocol:
            raise ValueError(f"tuning.method={method} sweeps protocol.{key}, which conf/tune.yaml does not define")
        grids.append(protocol[key])
    lengths = list(protocol.num_tokens) if protocol.get("num_tokens") else [None]
    return [
        {"base_lr": float(lr), "weight_decay": float(wd), "num_tokens": p}
        for p, lr, wd in itertools.product(lengths, *grids)
    ]


def point_name(point: Dict[str, Any]) -> str:
    name = f"lr{point['base_lr']:g}_wd{point['weight_decay']:g}"
    return name if point.get("num_tokens") is None else f"{name}_p{point['num_tokens']}"


def point_overrides(point: Dict[str, Any]) -> Dict[str, Any]:
    """The config overrides of a grid point (lr, weight decay and, when swept, the prompt length)."""
    overrides = {"optim.base_lr": point["base_lr"], "optim.weight_decay": point["weight_decay"]}
    if point.get("num_tokens") is not None:
        overrides["recipe.num_tokens"] = point["num_tokens"]
    return overrides


def select_best(runs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The run with the highest last-epoch ``val/top1``; ties go to the smaller lr, then the smaller wd.

    Runs marked ``diverged``, ``failed`` or ``pruned`` (stopped early by an Optuna pruner) are never selected.
    """
    usable = [r for r in runs if not r.get("diverged") and not r.get("failed") and not r.get("pruned")]
    if not usable:
        raise ValueError(f"no usable sweep run to select from ({len(runs)} run(s), all diverged or failed)")
    return min(usable, key=lambda r: (-r["val/top1"], r["point"]["base_lr"], r["point"]["weight_decay"]))


def diverged(result: Dict[str, Any]) -> bool:
    """A run whose losses or validation accuracy are not finite (NaN logits still 'predict' a class)."""
    keys = ("train/loss_epoch", "val/loss", "val/top1")
    return any(k in result and not math.isfinite(float(result[k])) for k in keys)


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def check_same_config(recorded: Dict[str, Any], job: Dict[str, Any], results_file: Path) -> None:
    """Refuse to reuse a finished run whose result-determining config differs from the job's."""
    diffs = config_differences(recorded, job)
    if diffs:
        raise ConfigMismatchError(
            f"{results_file} holds a finished run of another configuration ({describe_differences(diffs)}); use "
            f"another paths.output_dir, or delete that folder to re-run it ({RESTART_HINT})",
            Path(results_file),
        )


def _job(cfg: DictConfig, run_dir: Path, overrides: Dict[str, Any]) -> DictConfig:
    job = copy.deepcopy(cfg)
    with open_dict(job):
        for key, value in {**overrides, "run_dir": str(run_dir)}.items():
            OmegaConf.update(job, key, value, merge=False)
        last = last_checkpoint(run_dir)
        job.ckpt_path = str(last) if last.is_file() else None
    return job


def _run(cfg: DictConfig, run_dir: Path, overrides: Dict[str, Any], train_fn: Callable) -> Dict[str, Any]:
    """Run one job in ``run_dir`` unless it already finished; resume it if it stopped half-way.

    Holds the run folder's lock (workers of one shared Optuna search, which may share the protocol folder, wait for
    it: the first trains the run, the others then find it finished); a finished run or a checkpoint that does not
    fit the job raises (see :func:`_reusable_result`) unless ``protocol.restart`` is set, which clears the folder
    and trains afresh.
    """
    with folder_lock(run_dir, "run", wait=search_kind(cfg.protocol) == "optuna"):
        remove_stale_temp_files(run_dir)
        job = _job(cfg, run_dir, overrides)
        try:
            result = _reusable_result(job, run_dir)
        except RunIntegrityError as err:
            if not cfg.protocol.get("restart", False):
                raise
            log.warning("protocol.restart: starting %s afresh: %s", run_dir, err)
            clear_run_folder(run_dir)
            job, result = _job(cfg, run_dir, overrides), None
        return result if result is not None else train_fn(job)


def _reusable_result(job: DictConfig, run_dir: Path) -> Optional[Dict[str, Any]]:
    """The finished result of ``run_dir`` if it has one of the job's config and backbone (else ``None``: train or
    resume it).

    Raises :class:`~vpt_lightning.runs.integrity.RunIntegrityError` naming the file for an unreadable ``results.json``,
    a finished run of another config or backbone, and a checkpoint that is unreadable, unsafe or of another config
    or backbone.
    """
    done = run_dir / RESULTS_FILE
    if done.exists():
        result = read_results(done)
        if "config" in result:
            check_same_config(result["config"], result_config(job), done)
        check_same_backbone(result.get(RESULTS_IDENTITY_KEY), current_backbone_identity(job.backbone), done)
        return result
    if job.ckpt_path is not None:
        check_resume(Path(job.ckpt_path), result_config(job), backbone_identity=current_backbone_identity(job.backbone))
    return None


def current_backbone_identity(backbone: Any) -> Dict[str, Any]:
    """The identity of the backbone a ``backbone`` config builds now (its weights file as it is now), built once per
    config and file state in a process (a ``vpt-tune`` invocation), not once per run."""
    config = BackboneConfig.parse(backbone).to_dict()
    weights = config.get("checkpoint_path")
    state = None
    if weights and Path(weights).expanduser().is_file():
        info = Path(weights).expanduser().stat()
        state = (info.st_size, info.st_mtime_ns, info.st_ino)
    return _backbone_identity(json.dumps(config, sort_keys=True, default=str), state)


@functools.lru_cache(maxsize=8)
def _backbone_identity(config: str, weights_state: Any) -> Dict[str, Any]:
    return create_backbone(json.loads(config))[1]


def clear_run_folder(run_dir: Path) -> None:
    """Delete what a run folder holds (its lock file stays: this process holds it)."""
    for entry in Path(run_dir).iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _sweep_entry(point: Dict[str, Any], result: Dict[str, Any]) -> Dict[str, Any]:
    entry = {"point": point, "val/top1": float(result["val/top1"])}
    if diverged(result):
        entry["diverged"] = True
        log.warning("sweep point %s diverged (non-finite loss or accuracy): not selectable", point_name(point))
    return entry


def _sweep_point(
    cfg: DictConfig, out_dir: Path, point: Dict[str, Any], train_fn: Callable, extra: Dict[str, Any] | None = None
) -> Tuple[Dict[str, Any], Exception | None]:
    """Run one sweep point; its sweep entry and, when it raised, the error."""
    # tuning never looks at the test set (and skipping it saves time)
    # tune-split points are only compared: no task package (the final runs write theirs)
    overrides = {**point_overrides(point), "data.split": "tune", "test": False, "package": False, **(extra or {})}
    try:
        result = _run(cfg, out_dir / "sweep" / point_name(point), overrides, train_fn)
    except NonFiniteLossError as err:  # stopped at a NaN/Inf loss: diverged, not failed
        log.warning("sweep point %s diverged: %s", point_name(point), err)
        return {"point": point, "val/top1": math.nan, "diverged": True}, None
    except TRAINING_FAILURES as err:  # one grid point out of memory must not sink the others
        log.exception("sweep point %s failed", point_name(point))
        return {"point": point, "failed": f"{type(err).__name__}: {err}"}, err
    return _sweep_entry(point, result), None


def _in_locked_protocol_folder(protocol_fn: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
    """Run ``protocol_fn`` holding the protocol folder's lock, after clearing the temporary files of a killed write.

    An Optuna search is shared: its workers may run the same command in one protocol folder (the study hands each
    point to one worker, and each run folder keeps its own lock), so it holds no lock on the protocol folder."""

    @functools.wraps(protocol_fn)
    def locked(cfg: DictConfig, out_dir: Path, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        if search_kind(cfg.protocol) == "optuna":
            return protocol_fn(cfg, Path(out_dir), *args, **kwargs)
        with folder_lock(Path(out_dir), "protocol"):
            remove_stale_temp_files(Path(out_dir), depth=0)
            return protocol_fn(cfg, Path(out_dir), *args, **kwargs)

    return locked


@_in_locked_protocol_folder
def run_protocol(cfg: DictConfig, out_dir: Path, train_fn: Callable = train) -> Dict[str, Any]:
    """Sweep, select and run the final seeds for the task of ``cfg``; write ``summary.json`` and ``summary.md``.

    A sweep run that diverges or runs out of memory is logged, listed under ``diverged``/``failed`` in the summary
    and left out of the selection (a failed one is tried again the next time); the protocol stops when every sweep
    run failed, and at any other error (a run folder that does not fit, a config or data error). Final runs live
    under the selected point (``final/<point>/seed<k>``), so a changed selection never reuses another point's runs.
    """
    protocol = cfg.protocol
    parse_configs(cfg)  # a config error (a bad value, an unknown key) stops here, before any run folder is made
    method = get_method(cfg.tuning.method)
    if cfg.optim.name != method.optimizer:  # the method's YAML composes its optimizer; the command line overrode it
        log.warning(
            "tuning=%s trains with optim=%s in the paper's protocol; this run uses optim=%s (overridden)",
            cfg.tuning.name,
            method.optimizer,
            cfg.optim.name,
        )
    points = grid_points(protocol, method.name)
    search_info: Dict[str, Any] = {"kind": "grid"}
    if search_kind(protocol) == "optuna":  # the same points as an Optuna study shared by workers (search.py)
        sweep, errors, search_info = optuna_sweep(
            cfg, out_dir, points, lambda point, extra: _sweep_point(cfg, out_dir, point, train_fn, extra)
        )
    else:
        sweep, errors = [], []
        for point in points:
            entry, error = _sweep_point(cfg, out_dir, point, train_fn)
            sweep.append(entry)
            errors += [error] if error is not None else []
    if errors and len(errors) == len(sweep):
        raise errors[0]
    best = select_best(sweep)
    finals: Dict[str, Dict[str, Any]] = {}
    for seed in protocol.seeds:
        overrides = {**point_overrides(best["point"]), "data.split": "final", "seed": int(seed), "test": True}
        finals[str(seed)] = _run(
            cfg, out_dir / "final" / point_name(best["point"]) / f"seed{seed}", overrides, train_fn
        )
    tests = [float(r["test/top1"]) for r in finals.values()]
    any_final = next(iter(finals.values()))
    summary = {
        "task_name": cfg.task_name,
        "task_group": any_final.get("task_group"),
        "tuning": cfg.tuning.name,
        "method": method.name,
        "optimizer": cfg.optim.name,
        "backbone": cfg.backbone.name,
        "backbone_reference": cfg.backbone.get("reference"),  # which of the paper's backbones (vpt-report)
        "selected": {**best["point"], "val/top1": best["val/top1"]},
        "sweep": sweep,
        "search": search_info,
        "failed": [point_name(r["point"]) for r in sweep if r.get("failed")],
        "diverged": [point_name(r["point"]) for r in sweep if r.get("diverged")],
        "test_top1_per_seed": {seed: float(r["test/top1"]) for seed, r in finals.items()},
        "test_top1": mean_std(tests),
        "trainable_params": any_final["trainable_params"],
        "trainable_percent": any_final["trainable_percent"],
        "note": "val/test top-1 of the last epoch (never the best epoch on test)",
    }
    write_json_atomic(summary, out_dir / SUMMARY_FILE)
    write_text_atomic(summary_markdown(summary), out_dir / "summary.md")
    return summary


def summary_markdown(summary: Dict[str, Any]) -> str:
    sel = summary["selected"]
    seeds = ", ".join(f"{s}: {100 * v:.2f}" for s, v in summary["test_top1_per_seed"].items())
    test = summary["test_top1"]
    return (
        f"# {summary['task_name']} / {summary['tuning']}\n\n"
        f"- selected on val (last epoch): base_lr {sel['base_lr']:g}, weight_decay {sel['weight_decay']:g}"
        + (f", num_tokens {sel['num_tokens']}" if sel.get("num_tokens") is not None else "")
        + f" (val top-1 {100 * sel['val/top1']:.2f}%)\n"
        f"- test top-1 at the last epoch: {100 * test['mean']:.2f} ± {100 * test['std']:.2f}% (seeds {seeds})\n"
        f"- trainable parameters: {summary['trainable_params']:,} "
        f"({summary['trainable_percent']:.3f}% of the backbone)\n"
        + "".join(
            f"- {kind} sweep points (not selectable): {', '.join(summary[kind])}\n"
            for kind in ("diverged", "failed")
            if summary.get(kind)
        )
    )
