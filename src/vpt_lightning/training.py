"""The training job behind ``vpt-train``: compose -> validate -> DataModule -> VPTModule -> fit -> test."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .atomic import write_json_atomic
from .backbone import BackboneConfig
from .module import OptimConfig, VPTModule
from .prompt import PromptConfig
from .tuning import TuningConfig

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"


def validate_config(cfg: DictConfig) -> None:
    """Check the model and optimiser groups before anything is built (errors name the key and valid values)."""
    PromptConfig.from_mapping(OmegaConf.to_container(cfg.prompt, resolve=True))
    OptimConfig.from_mapping(OmegaConf.to_container(cfg.optim, resolve=True))
    BackboneConfig.from_mapping(OmegaConf.to_container(cfg.backbone, resolve=True))
    TuningConfig.from_mapping(OmegaConf.to_container(cfg.tuning, resolve=True))


def _instantiate_all(group: Any) -> List[Any]:
    if not group:
        return []
    return [instantiate(conf) for conf in group.values() if conf is not None and "_target_" in conf]


def _scalar_metrics(metrics: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def train(cfg: DictConfig) -> Dict[str, Any]:
    """Run one training job described by a composed ``train`` config; returns (and writes) its results."""
    validate_config(cfg)
    run_dir = Path(cfg.run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = VPTModule(
        num_classes=datamodule.num_classes,
        backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        prompt=OmegaConf.to_container(cfg.prompt, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        tuning=OmegaConf.to_container(cfg.tuning, resolve=True),
        backbone_eval=cfg.backbone_eval,
        compile=cfg.get("compile", False),
        grad_checkpointing=cfg.get("grad_checkpointing", False),
    )
    datamodule.backbone_data_config = module.data_config
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")), logger=_instantiate_all(cfg.get("logger")) or False
    )
    started = time.time()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    results: Dict[str, Any] = {
        "task_name": cfg.task_name,
        "tuning": cfg.tuning.name,
        "seed": cfg.seed,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "fit_seconds": round(time.time() - started, 2),
        **module.parameter_counts(),
        **_scalar_metrics(trainer.callback_metrics),
    }
    if cfg.get("test", True):
        # the current (last-epoch) weights, never a 'best' checkpoint: the paper reports the last epoch
        test_metrics = trainer.test(module, datamodule=datamodule, verbose=False)
        results.update(_scalar_metrics(test_metrics[0] if test_metrics else {}))
    results = {k: v for k, v in results.items() if not k.startswith("train/loss_step")}
    if trainer.is_global_zero:
        write_json_atomic(results, run_dir / RESULTS_FILE)
        print_summary(results, run_dir)
    return results


def print_summary(results: Dict[str, Any], run_dir: Path) -> None:
    """Print the run's headline numbers as a small Markdown table."""
    rows = [
        ("val top-1 (%)", results.get("val/top1")),
        ("test top-1 (%)", results.get("test/top1")),
        ("test top-5 (%)", results.get("test/top5")),
        ("trainable params", results.get("trainable_params")),
        ("trainable / backbone (%)", results.get("trainable_percent")),
    ]
    lines = ["", f"| {results['task_name']} | value |", "|---|---|"]
    for name, value in rows:
        if value is None:
            continue
        if "top" in name:
            value = f"{100 * value:.2f}"
        elif isinstance(value, float):
            value = f"{value:.4f}"
        lines.append(f"| {name} | {value} |")
    lines.append(f"\nrun folder: {run_dir}")
    print("\n".join(lines), flush=True)
