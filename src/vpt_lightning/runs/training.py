"""The training job behind ``vpt-train``: compose -> validate -> DataModule -> VPTModule -> fit -> test."""

from __future__ import annotations

import functools
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Type

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..backbones import BackboneConfig
from ..config import check_task_name
from ..methods import TuningConfig, TuningMethod, parse_tuning
from ..module import VPTModule
from ..optim import OptimConfig
from ..prompt import PromptConfig
from .atomic import remove_stale_temp_files, write_json_atomic
from .feature_cache import FeatureCache, cache_refusal, cached_datamodule
from .integrity import RESULTS_IDENTITY_KEY, RecordRunConfig, check_resume, composed_config
from .locking import folder_lock
from .tracking import log_config, log_results

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"
# the task package of a run folder (TaskModel.save_pretrained)
PACKAGE_DIR = "task"
# config keys that do not change what a run computes (where it writes, how it loads data, what it prints)
NOT_RESULT_KEYS = {
    "data": ("root", "task_dir", "image_dir", "num_workers", "persistent_workers", "pin_memory", "eval_batch_size"),
    "trainer": ("default_root_dir", "enable_progress_bar", "enable_model_summary", "log_every_n_steps"),
}
SEGMENTATION_KEYS = ("task_type", "segmentation")  # recorded only by runs that set them
RESULT_GROUPS = (
    "backbone",
    "prompt",
    "tuning",
    "optim",
    "data",
    "trainer",
    "seed",
    "backbone_eval",
    "grad_checkpointing",
)
# what an explicit vpt-train resume may change: train a finished or interrupted run for longer
RESUME_MAY_CHANGE = ("trainer.max_epochs", "trainer.max_steps")


@dataclass
class ModelConfigs:
    """The model and optimiser groups of a composed config, parsed and validated once."""

    backbone: BackboneConfig
    prompt: PromptConfig
    method: Type[TuningMethod]
    tuning: TuningConfig
    optim: OptimConfig


def parse_configs(cfg: DictConfig) -> ModelConfigs:
    """Parse and check the model and optimiser groups before anything is built (errors name the key and valid
    values; a prompt group that contradicts the tuning method is refused, and so is a ``task_name`` that is no task
    name: it names the run's package, which vpt-predict and vpt-serve serve by that name)."""
    check_task_name(cfg.get("task_name"), "task_name")

    # a node typed by its schema (conf/train.yaml, schemas.py) becomes the dataclass itself; a plain node
    # (e.g. a config composed without the schemas) goes through the dataclass's mapping constructor
    prompt = PromptConfig.parse(cfg.prompt)
    backbone = BackboneConfig.parse(cfg.backbone)
    method, tuning = parse_tuning(TuningConfig.parse(cfg.tuning))
    optim = OptimConfig.parse(cfg.optim)
    method.check_prompt(tuning, prompt)
    return ModelConfigs(backbone, prompt, method, tuning, optim)


def result_config(cfg: DictConfig) -> Dict[str, Any]:
    """The part of a composed config that determines a run's result (recorded in ``results.json``)."""
    picked: Dict[str, Any] = {}
    for key in RESULT_GROUPS + tuple(k for k in SEGMENTATION_KEYS if k in cfg):
        value = cfg.get(key)
        picked[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
    for group, keys in NOT_RESULT_KEYS.items():
        if isinstance(picked.get(group), dict):
            picked[group] = {k: v for k, v in picked[group].items() if k not in keys}
    return picked


def last_checkpoint(run_dir: Path) -> Path:
    """Where a run folder's resumable checkpoint lives (``callbacks.model_checkpoint`` writes it)."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def resolve_ckpt_path(cfg: DictConfig) -> Optional[str]:
    """``ckpt_path``: ``None``, a checkpoint file, or ``last`` = this run folder's ``checkpoints/last.ckpt``.

    Both must exist: a resume that silently started from scratch would lose the interrupted run's progress.
    """
    ckpt = cfg.get("ckpt_path")
    if ckpt is None:
        return None
    if ckpt == "last":
        last = last_checkpoint(cfg.run_dir)
        if last.is_file():
            return str(last)
        task_dir = Path(cfg.run_dir).parent
        runs = (
            sorted(p.parent.parent.name for p in task_dir.glob("*/checkpoints/last.ckpt")) if task_dir.is_dir() else []
        )
        raise FileNotFoundError(
            f"ckpt_path=last: {str(last)!r} does not exist; give the run_name of the run to resume "
            f"(runs with a last.ckpt under {str(task_dir)!r}: {runs or 'none'})"
        )
    if not Path(ckpt).expanduser().is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt!r} does not exist (use a checkpoint file or 'last')")
    return str(Path(ckpt).expanduser())


def _instantiate_all(group: Any) -> List[Any]:
    if not group:
        return []
    return [instantiate(conf) for conf in group.values() if conf is not None and "_target_" in conf]


def _scalar_metrics(metrics: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def build_module(cfg: DictConfig, configs: ModelConfigs, datamodule: Any) -> VPTModule:
    """The LightningModule of ``task_type``: ``classification`` (:class:`VPTModule`, the default) or
    ``segmentation`` (:class:`~vpt_lightning.segmentation.SegmentationModule`, options in ``segmentation``)."""
    common = dict(
        num_classes=datamodule.num_classes,
        backbone=configs.backbone,
        prompt=configs.prompt,
        optim=configs.optim,
        tuning=configs.tuning,
        backbone_eval=cfg.get("backbone_eval"),  # tuning=<method> sets it; None: the method's default all the same
        compile=cfg.get("compile", False),
        grad_checkpointing=cfg.get("grad_checkpointing", False),
        task_name=cfg.task_name,
        class_names=getattr(datamodule, "classes", None),
    )
    task_type = cfg.get("task_type", "classification")
    if task_type == "classification":
        return VPTModule(**common)
    if task_type == "segmentation":
        from ..segmentation import SegmentationModule

        options = OmegaConf.to_container(cfg.get("segmentation") or {}, resolve=True)
        options["ignore_index"] = datamodule.ignore_index  # the data decides what is unlabelled
        return SegmentationModule(segmentation=options, **common)
    raise ValueError(f"task_type={task_type!r} is not one of ['classification', 'segmentation']")


def _in_locked_run_folder(train_fn: Callable[[DictConfig], Dict[str, Any]]) -> Callable[[DictConfig], Dict[str, Any]]:
    """Run ``train_fn`` holding the run folder's lock (a second process on the folder fails at once, naming the
    holder), after clearing the temporary files of a killed write and checking that the checkpoint it resumes
    from is readable, safe and of this run's configuration (:func:`vpt_lightning.runs.integrity.check_resume`)."""

    @functools.wraps(train_fn)
    def locked(cfg: DictConfig) -> Dict[str, Any]:
        run_dir = Path(cfg.run_dir)
        with folder_lock(run_dir, "run"):
            remove_stale_temp_files(run_dir)
            ckpt_path = resolve_ckpt_path(cfg)
            if ckpt_path is not None:
                check_resume(Path(ckpt_path), result_config(cfg), ignore=RESUME_MAY_CHANGE)
            return train_fn(cfg)

    return locked


@_in_locked_run_folder
def train(cfg: DictConfig) -> Dict[str, Any]:
    """Run one training job described by a composed ``train`` config; returns (and writes) its results."""
    configs = parse_configs(cfg)
    run_dir = Path(cfg.run_dir)
    ckpt_path = resolve_ckpt_path(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg, configs, datamodule)
    datamodule.backbone_data_config = module.data_config
    # how evaluation images are prepared (known once the backbone's data config is): predict image files alike
    module.set_eval_transform(datamodule.eval_transform_config())
    no_validation = {} if getattr(datamodule, "has_validation_set", True) else {"limit_val_batches": 0}
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        **no_validation,
        logger=_instantiate_all(cfg.get("logger")) or False,
        callbacks=_instantiate_all(cfg.get("callbacks")) + [RecordRunConfig(result_config(cfg), composed_config(cfg))],
    )
    log_config(trainer.loggers, cfg)
    started = time.time()
    datamodule = use_feature_cache(cfg, configs, module, datamodule, trainer)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if not {"val/top1", "val/miou"} & set(trainer.callback_metrics) and datamodule.val_dataset is not None:
        # resumed from a checkpoint of a run whose training had finished: fit ran no epoch, so validate here
        trainer.validate(module, datamodule=datamodule, verbose=False)
    results: Dict[str, Any] = {
        "task_name": cfg.task_name,
        "task_group": getattr(datamodule, "task_group", None),
        "tuning": configs.tuning.name,
        "method": configs.tuning.method,
        "seed": cfg.seed,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "fit_seconds": round(time.time() - started, 2),
        "feature_cache": module.inputs_are_features,
        **module.parameter_counts(),
        **_scalar_metrics(trainer.callback_metrics),
        "config": result_config(cfg),
        # the weights file of the config may change under its path: vpt-tune compares this before reusing the run
        RESULTS_IDENTITY_KEY: dict(module.backbone_identity),
    }
    if cfg.get("test", True):
        # the current (last-epoch) weights, never a 'best' checkpoint: the paper reports the last epoch
        test_metrics = trainer.test(module, datamodule=datamodule, verbose=False)
        results.update(_scalar_metrics(test_metrics[0] if test_metrics else {}))
    results = {k: v for k, v in results.items() if not k.startswith("train/loss_step")}
    if trainer.is_global_zero:
        write_task_package(cfg, module, results, run_dir)
        write_json_atomic(results, run_dir / RESULTS_FILE)
        log_results(trainer.loggers, results, trainer.global_step, cfg)
        print_summary(results, run_dir)
    return results


def training_command(cfg: DictConfig) -> str:
    """The command line that trained a run: the CLI and its Hydra overrides (else the process's own arguments)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        cli = "vpt-tune" if hydra_cfg.job.config_name == "tune" else "vpt-train"
        return shlex.join([cli, *hydra_cfg.overrides.task])
    except (ImportError, ValueError):  # not inside a Hydra job (train() called from Python)
        return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def write_task_package(cfg: DictConfig, module: VPTModule, results: Dict[str, Any], run_dir: Path) -> Optional[Path]:
    """Write the run's task package (``<run>/task/``: safetensors + config.json + model card) unless
    ``package=false``; classification only (a segmentation head is not rebuilt by name)."""
    if not cfg.get("package", True) or cfg.get("task_type", "classification") != "classification":
        return None
    task = module.task
    task.info = {
        "metrics": {k: float(v) for k, v in results.items() if k.startswith(("val/", "test/"))},
        **{
            k: results[k]
            for k in ("trainable_params", "backbone_params", "trainable_percent", "epochs")
            if k in results
        },
        "command": training_command(cfg),
        "datasets": [str(cfg.task_name)],
    }
    folder = run_dir / PACKAGE_DIR
    task.save_pretrained(folder)
    return folder


def use_feature_cache(
    cfg: DictConfig, configs: ModelConfigs, module: VPTModule, datamodule: Any, trainer: pl.Trainer
) -> Any:
    """The DataModule to train on: cached backbone features for head-only runs on deterministic data (see
    :mod:`vpt_lightning.runs.feature_cache`; ``feature_cache.enabled=false`` turns it off), else ``datamodule``."""
    settings = cfg.get("feature_cache") or {}
    if not settings.get("enabled", True):
        return datamodule
    reason = cache_refusal(configs.method, datamodule, trainer)
    if reason is not None:
        if configs.method.head_only:  # worth saying only where the cache could have served
            log.info("feature cache not used: %s", reason)
        return datamodule
    cache = FeatureCache(settings.get("dir") or Path(cfg.paths.output_dir) / ".feature_cache")
    module.backbone.to(trainer.strategy.root_device)  # compute the features where training runs
    cached = cached_datamodule(
        datamodule, module.backbone, module.backbone_identity, cache, datamodule.loader_workers()
    )
    module.inputs_are_features = True
    log.info("feature cache: training the head on cached backbone features (%s)", cache.root)
    return cached


def print_summary(results: Dict[str, Any], run_dir: Path) -> None:
    """Print the run's headline numbers as a small Markdown table."""
    rows = [
        ("val top-1 (%)", results.get("val/top1")),
        ("test top-1 (%)", results.get("test/top1")),
        ("test top-5 (%)", results.get("test/top5")),
        ("val mIoU (%)", results.get("val/miou")),
        ("test mIoU (%)", results.get("test/miou")),
        ("test mIoU multi-scale (%)", results.get("test/miou_ms")),
        ("trainable params", results.get("trainable_params")),
        ("trainable / backbone (%)", results.get("trainable_percent")),
    ]
    lines = ["", f"| {results['task_name']} | value |", "|---|---|"]
    for name, value in rows:
        if value is None:
            continue
        if "top" in name or "mIoU" in name:
            value = f"{100 * value:.2f}"
        elif isinstance(value, float):
            value = f"{value:.4f}"
        lines.append(f"| {name} | {value} |")
    lines.append(f"\nrun folder: {run_dir}")
    print("\n".join(lines), flush=True)
