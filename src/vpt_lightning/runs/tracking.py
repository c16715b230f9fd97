"""Experiment trackers for ``logger=`` (``conf/logger/``): TensorBoard, Weights & Biases and MLflow.

``logger=[csv,tensorboard,wandb,mlflow]`` composes any of them. Every run logs its composed config (under
``config/``) as hyper-parameters, its per-epoch metrics (Lightning) and its final results (under ``results/``).
Runs of one ``vpt-tune`` protocol share a group (``tracking.group`` in ``conf/tune.yaml``): the W&B group, an MLflow
parent run with one child run per sweep point and final seed, and a TensorBoard folder per run below the protocol
folder (``tensorboard --logdir <protocol folder>`` shows them side by side).

- W&B is offline unless ``WANDB_MODE`` is set (``WANDB_MODE=online vpt-train ... logger=wandb``); the command
  that uploads an offline run (``wandb sync <folder>``) is printed when the run ends.
- MLflow writes to ``tracking_uri`` (default: a SQLite store ``mlflow.db`` in ``paths.output_dir``; any URI by
  override, e.g. ``logger.mlflow.tracking_uri=http://host:5000``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
PARENT_TAG = "vpt.group"  # MLflow tag of a protocol's parent run


def run_label(run_dir: os.PathLike) -> str:
    """A run's name in the trackers: its path from the protocol's ``sweep``/``final`` folder (e.g.
    ``sweep/lr0.5_wd0``, ``final/lr2_wd0/seed42``), else the run folder's name."""
    parts = Path(run_dir).parts
    for index in range(len(parts) - 1, -1, -1):
        if parts[index] in ("sweep", "final"):
            return "/".join(parts[index:])
    return Path(run_dir).name


def wandb_logger(save_dir: str, project: str, run_dir: str, group: Optional[str] = None, **kwargs: Any):
    """Lightning's :class:`~pytorch_lightning.loggers.WandbLogger`, offline unless ``WANDB_MODE`` says otherwise."""
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise ImportError("logger=wandb needs Weights & Biases: pip install 'vpt-lightning[wandb]'") from err
    from pytorch_lightning.loggers import WandbLogger

    os.environ.setdefault("WANDB_MODE", "offline")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        name=run_label(run_dir),
        group=group,
        job_type=run_label(run_dir).split("/")[0] if group else None,
        **kwargs,
    )


def _absolute_sqlite(uri: str) -> str:
    """``sqlite:///relative.db`` made absolute (and its folder created), so the store does not depend on the cwd."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix) :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    if uri.startswith(prefix):
        Path(uri[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def mlflow_logger(
    tracking_uri: str,
    experiment_name: str,
    run_dir: str,
    artifact_location: Optional[str] = None,
    group: Optional[str] = None,
    **kwargs: Any,
):
    """Lightning's :class:`~pytorch_lightning.loggers.MLFlowLogger`; in a protocol (``group`` set), a child run of
    the group's parent run (created by the first run of the group)."""
    try:
        import mlflow  # noqa: F401
    except ImportError as err:
        raise ImportError("logger=mlflow needs MLflow: pip install 'vpt-lightning[mlflow]'") from err
    from pytorch_lightning.loggers import MLFlowLogger

    tracking_uri = _absolute_sqlite(str(tracking_uri))
    if artifact_location is not None:
        artifact_location = Path(artifact_location).resolve().as_uri()
    tags = dict(kwargs.pop("tags", None) or {})
    if group:
        tags["mlflow.parentRunId"] = mlflow_parent_run(tracking_uri, experiment_name, group, artifact_location)
        tags[PARENT_TAG + ".member"] = group
    return MLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_label(run_dir),
        tracking_uri=tracking_uri,
        artifact_location=artifact_location,
        tags=tags,
        **kwargs,
    )


def _mlflow_experiment(client: Any, name: str, artifact_location: Optional[str]) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def mlflow_parent_run(
    tracking_uri: str, experiment_name: str, group: str, artifact_location: Optional[str] = None
) -> str:
    """The id of the MLflow run that stands for ``group`` (a ``vpt-tune`` protocol), created when missing."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = _mlflow_experiment(client, experiment_name, artifact_location)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{group}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    return client.create_run(experiment_id, run_name=group, tags={PARENT_TAG: group}).info.run_id


def flat_config(cfg: DictConfig) -> Dict[str, Any]:
    """The composed config (Hydra's own node left out) as ``config/<dotted key>`` -> value."""
    tree = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"
    }  # Hydra's own node resolves only inside a Hydra app
    flat: Dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        else:
            flat[f"config/{prefix}"] = node if isinstance(node, (int, float, str, bool)) or node is None else str(node)

    walk(tree, "")
    return flat


def log_config(loggers: Iterable[Any], cfg: DictConfig) -> None:
    """Log the run's composed config as hyper-parameters to every logger."""
    params = flat_config(cfg)
    for logger in loggers:
        logger.log_hyperparams(params)


def log_results(loggers: Iterable[Any], results: Mapping[str, Any], step: int, cfg: DictConfig) -> None:
    """Log a run's final numeric results (``results.json``'s scalars) as ``results/<key>``, then close the trackers
    that need it (W&B: finish the run and print how to upload it when offline).

    TensorBoard gets the config again with these results as the HParams dashboard's metrics (its hparams session
    is written only together with metrics)."""
    from pytorch_lightning.loggers import TensorBoardLogger

    scalars = {
        f"results/{k}": float(v) for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(flat_config(cfg), metrics=scalars, step=step)
        else:
            logger.log_metrics(scalars, step=step)
        logger.save()
        _finish_wandb(logger)


def _finish_wandb(logger: Any) -> None:
    from pytorch_lightning.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        finish_wandb_run(logger.experiment)


def finish_wandb_run(run: Any) -> Path:
    """Finish a W&B run; when offline, print the ``wandb sync`` command that uploads it. Returns its folder."""
    offline = run.settings.mode in ("offline", "dryrun") or getattr(run.settings, "_offline", False)
    folder = Path(run.dir).parent  # .../wandb/offline-run-<time>-<id>/files -> the run folder
    run.finish()
    if offline:
        print(f"W&B run saved offline; upload it with: wandb sync {folder}", flush=True)
    return folder


def log_protocol_summary(cfg: DictConfig, summary: Mapping[str, Any]) -> None:
    """Log a finished ``vpt-tune`` protocol's selection and test top-1 to the MLflow parent run of its group (when
    ``logger.mlflow`` is configured) and mark that run finished."""
    mlflow_cfg = (cfg.get("logger") or {}).get("mlflow")
    group = (cfg.get("tracking") or {}).get("group")
    if not mlflow_cfg or not group:
        return
    from mlflow.tracking import MlflowClient

    uri = _absolute_sqlite(str(mlflow_cfg.tracking_uri))
    parent = mlflow_parent_run(uri, mlflow_cfg.experiment_name, group)
    client = MlflowClient(tracking_uri=uri)
    selected = summary["selected"]
    for key, value in {
        "selected/base_lr": selected["base_lr"],
        "selected/weight_decay": selected["weight_decay"],
        "selected/val_top1": selected["val/top1"],
        "test/top1_mean": summary["test_top1"]["mean"],
        "test/top1_std": summary["test_top1"]["std"],
    }.items():
        client.log_metric(parent, key, float(value))
    client.set_terminated(parent)
