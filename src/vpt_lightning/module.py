"""``VPTModule``: the LightningModule that prompt-tunes a frozen timm backbone (Lightning's work only)."""

from __future__ import annotations

import contextvars
import math
import os
import warnings
from pathlib import Path
from typing import IO, Any, Dict, List, Mapping, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from .backbones import BackboneConfig, PromptedBackbone, prompted_backbone
from .backbones.pin import backbone_pin, check_file_backbone, own_backbone
from .heads import describe_head
from .methods import TuningConfig, parse_tuning
from .optim import OptimConfig, file_optimizer_class
from .prompt import PromptConfig
from .sharing.checkpoint import HEAD_KEY, IDENTITY_KEY, check_backbone_identity, load_weights_only, trainable_state_keys
from .sharing.trust import check_finite, check_tensor_shapes
from .task_model import TaskModel, TaskSpec, build_task_model, spec_of_file, trained_tensor_shapes

# the file load_from_checkpoint is reading, for the errors of on_load_checkpoint
_LOADING: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("vpt_loading_checkpoint", default=None)


class VPTModule(pl.LightningModule):
    """Prompt-tune a frozen timm backbone for image classification.

    ``forward(images)`` = ``head(backbone(images))`` where ``self.backbone`` is the
    :class:`~vpt_lightning.backbones.PromptedBackbone` of the model's family (frozen timm model + prompts; a
    :class:`~vpt_lightning.backbones.PromptedViT` for ViTs) returning the pooled, normed features (the final class
    token, or the mean of the image tokens for ``global_pool='avg'`` backbones) and ``self.head`` a linear
    classifier. The backbone's ``global_pool`` decides, as in timm: a backbone with a class token but
    ``global_pool='avg'`` (e.g. MAE) averages the image tokens (prompts excluded; the class token too, as timm
    does). A backbone that does not pool to one vector per image (``backbone.kwargs.global_pool=''``) is refused.

    The learning rate is logged by the ``vpt-train`` CLI's ``LearningRateMonitor`` (as ``lr``); library users
    add ``pytorch_lightning.callbacks.LearningRateMonitor`` to their ``Trainer`` callbacks.

    The network is a :class:`~vpt_lightning.task_model.TaskModel` (``self.task``: the same ``backbone`` and ``head``
    modules, with the class names, eval transform and backbone identity), which ``task.save_pretrained(dir)`` shares
    as a package; this module adds the training (steps, optimisation, metrics, small checkpoints).

    Hooks for subclasses (override, no need to copy the module):
        - :meth:`build_head` -> the classifier ``nn.Module`` on the pooled features.
        - :meth:`build_loss` -> the loss ``nn.Module`` (``loss(logits, targets)``).
        - :meth:`trainable_parameters` / :meth:`configure_optimizers` -> what is optimised and how.
        - :meth:`build_backbone` -> the prompted backbone (e.g. other freezing rules).

    Checkpoints hold only the trainable tensors (prompts and head) plus the backbone's identity; loading one
    (:meth:`load_from_checkpoint`) rebuilds the backbone from the saved ``backbone`` hparams as a task package's
    (or the ``backbone=`` given to it), checks the identity and fills in the frozen weights, so a ViT-B task
    checkpoint is a few MB. The weights digest, width, depth and architecture must match; the weights may come from
    another source (hub, a local ``.safetensors``/``.pth``/``.npz`` copy, the same random init).

    Args:
        num_classes: classes of the downstream task.
        backbone: :class:`~vpt_lightning.backbone.BackboneConfig` fields (timm name, weights source, kwargs).
        prompt: :class:`~vpt_lightning.prompt.PromptConfig` fields; ``num_tokens=0`` is a linear probe.
        optim: :class:`~vpt_lightning.optim.OptimConfig` fields (``_target_`` optimizer, ``base_lr``...).
        tuning: the tuning method (``method``: a name of :mod:`vpt_lightning.methods`, default ``vpt_deep``) and its
            options: what trains besides the prompts (nothing for VPT and the linear probe; all weights, the biases
            or the last k blocks for the baselines) and the head.
        backbone_eval: keep the backbone in eval mode while training (the official code does for VPT); ``None``: the
            tuning method's default (true unless it trains backbone weights).
        compile: ``torch.compile`` the prompted backbone's forward (opt-in; the module's keys do not change).
        grad_checkpointing: recompute block activations in the backward pass (saves memory on ViT-L/H).
        task_name: the task's name, kept in the checkpoint for ``vpt-predict`` / ``vpt-serve``.
        class_names: the ``num_classes`` class names in label order, kept in the checkpoint (predictions show them).
        eval_transform: how evaluation images were prepared (``recipe``, ``img_size``, ``interpolation``, ``mean``,
            ``std``: the DataModule's :meth:`eval_transform_config`), so that image files are predicted alike.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: Union[BackboneConfig, Mapping[str, Any]],
        prompt: Union[PromptConfig, Mapping[str, Any], None] = None,
        optim: Union[OptimConfig, Mapping[str, Any], None] = None,
        tuning: Union[TuningConfig, Mapping[str, Any], None] = None,
        backbone_eval: Optional[bool] = None,
        compile: bool = False,
        grad_checkpointing: bool = False,
        task_name: Optional[str] = None,
        class_names: Optional[Sequence[str]] = None,
        eval_transform: Optional[Mapping[str, Any]] = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names but num_classes={num_classes}")
        # validate every config before building anything (configs that are already parsed are taken as they are),
        # and keep them as plain dicts in hparams
        self.prompt_config = PromptConfig.parse(prompt) if prompt is not None else PromptConfig(0)
        self.optim_config = OptimConfig.parse(optim)
        self.tuning_method, self.tuning_config = parse_tuning(tuning)
        backbone_config = BackboneConfig.parse(backbone)
        if backbone_eval is None:
            backbone_eval = not self.tuning_method.trains_backbone
        self.save_hyperparameters(
            {
                "num_classes": num_classes,
                "backbone": backbone_config.to_dict(),
                "prompt": self.prompt_config.to_dict(),
                "optim": self.optim_config.to_dict(),
                "tuning": self.tuning_config.to_dict(),
                "backbone_eval": backbone_eval,
                "compile": compile,
                "grad_checkpointing": grad_checkpointing,
                "task_name": task_name,
                "class_names": [str(c) for c in class_names] if class_names is not None else None,
                "eval_transform": dict(eval_transform) if eval_transform is not None else None,
            }
        )
        spec = TaskSpec(
            num_classes,
            backbone_config.to_dict(),
            self.prompt_config.to_dict(),
            self.tuning_config.to_dict(),
            task_name=task_name,
            class_names=self.hparams["class_names"],
            eval_transform=self.hparams["eval_transform"],
        )
        # the network is the task's (one factory); this module's hooks build its backbone and head, so a subclass's
        # head ends up in the task. The task is kept outside the module tree: its backbone and head are this module's
        # own submodules, so the state-dict keys stay ``backbone.*`` and ``head.*`` (the task's keys too).
        task = build_task_model(
            spec,
            backbone=backbone_config,
            backbone_eval=backbone_eval,
            build_backbone=self._build_task_backbone,
            build_head=self.build_head,
        )
        self.__dict__["task"]: TaskModel = task
        self.head = task.head
        spec.head = describe_head(
            task.head, self.tuning_method, self.tuning_config, task.backbone.num_features, num_classes
        )
        self.backbone_identity = task.identity
        self.data_config: Dict[str, Any] = self.backbone.data_config()
        self.backbone.set_grad_checkpointing(grad_checkpointing)
        # the compiled forward is kept outside the module tree, so state-dict keys stay the same
        self.__dict__["_compiled_backbone"] = torch.compile(self.backbone) if compile else None
        self.criterion = self.build_loss()
        metrics = MetricCollection(
            {
                "top1": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro"),
                "top5": MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro"),
            }
        )
        if backbone_eval:  # intended: Lightning need not warn that the frozen backbone stays in eval mode
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        # True while training on cached backbone features (vpt_lightning.runs.feature_cache): batches then hold the
        # pooled features, and the backbone step is skipped
        self.inputs_are_features = False
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def _build_task_backbone(self, model: nn.Module) -> PromptedBackbone:
        # the backbone's own size, before a method adds adapters or LoRA layers to it
        self.backbone_size = sum(p.numel() for p in model.parameters())
        backbone = self.build_backbone(model)
        self.backbone = backbone  # registered now: build_head hooks may read self.backbone
        return backbone

    def __setattr__(self, name: str, value: Any) -> None:
        # ``module.backbone = ...`` / ``module.head = ...`` replace the task's too (they are the same modules)
        super().__setattr__(name, value)
        task = self.__dict__.get("task")
        if task is not None and name in ("backbone", "head"):
            setattr(task, name, value)

    def set_eval_transform(self, eval_transform: Optional[Mapping[str, Any]]) -> None:
        """Record how evaluation images are prepared (the DataModule's ``eval_transform_config()``), in the
        hparams (checkpoints) and the task (packages); pixel prompts take its mean/std."""
        value = dict(eval_transform) if eval_transform is not None else None
        self.hparams["eval_transform"] = value
        self.task.spec.eval_transform = value
        self.task.sync_image_normalization()

    # ---- hooks ------------------------------------------------------------------------------------------
    def build_backbone(self, model: nn.Module) -> PromptedBackbone:
        """Wrap the timm model in its family's prompted backbone (frozen), then apply the tuning method."""
        backbone = prompted_backbone(model, self.prompt_config, backbone_eval=self.hparams.backbone_eval)
        self.tuning_method.apply(backbone, self.tuning_config)
        return backbone

    def build_head(self, in_features: int, num_classes: int) -> nn.Module:
        """The classifier on the pooled features: the tuning method's (linear; an MLP for ``tuning=mlp``)."""
        return self.tuning_method.build_head(in_features, num_classes, self.tuning_config)

    def build_loss(self) -> nn.Module:
        """The training loss; default cross-entropy."""
        return nn.CrossEntropyLoss()

    def trainable_parameters(self) -> List[nn.Parameter]:
        """The parameters the optimiser updates: every parameter that requires grad."""
        return [p for p in self.parameters() if p.requires_grad]

    def optimizer_parameters(self, lr: float) -> List[Any]:
        """What the optimizer receives: :meth:`trainable_parameters`, or parameter groups with their own ``lr``."""
        return self.trainable_parameters()

    # ---- model ------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images (or of their pooled backbone features when ``inputs_are_features``)."""
        if self.inputs_are_features:
            return self.head(images)
        backbone = self.backbone if self._compiled_backbone is None else self._compiled_backbone
        return self.head(backbone(images))

    def parameter_counts(self) -> Dict[str, float]:
        """Trainable and backbone parameter counts, and the trainable share of the backbone in percent."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        backbone = self.backbone_size
        return {
            "trainable_params": trainable,
            "backbone_params": backbone,
            "trainable_percent": 100.0 * trainable / max(1, backbone),
        }

    # ---- steps ------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = self.criterion(logits, targets)
        # sync_dist: the epoch mean over every rank's batches under DDP, not rank 0's alone
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=targets.shape[0], sync_dist=True
        )
        return loss

    def _eval_step(self, batch: Any, metrics: MetricCollection, stage: str) -> None:
        images, targets = batch
        logits = self(images)
        loss = self.criterion(logits, targets)
        metrics.update(logits, targets)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=targets.shape[0])
        self.log_dict(metrics, prog_bar=True, on_epoch=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Free the previous step's gradients before the forward pass rather than after it (Lightning zeroes them in
        # its closure, after training_step): the same arithmetic, but activations and stale gradients are never
        # held at once, which lowers the peak memory of full fine-tuning by the gradients' size (~400 MB for ViT-B).
        # Same condition as Lightning's: the first batch of each gradient-accumulation window.
        if self.automatic_optimization and batch_idx % self.trainer.accumulate_grad_batches == 0:
            for optimizer in self.trainer.optimizers:
                optimizer.zero_grad(set_to_none=True)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        """No-op: :meth:`on_train_batch_start` already zeroed the gradients (call ``super()`` when overriding it)."""

    def on_fit_start(self) -> None:
        counts = self.parameter_counts()
        for logger in self.loggers:
            logger.log_hyperparams({f"model/{k}": v for k, v in counts.items()})

    # ---- optimisation -----------------------------------------------------------------------------------
    def global_batch_size(self) -> int:
        """Per-device batch x devices x nodes x gradient accumulation."""
        trainer = self.trainer
        per_device = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if per_device is None:
            loader = trainer.train_dataloader
            per_device = getattr(loader, "batch_size", None) or getattr(
                getattr(loader, "iterables", None), "batch_size", None
            )
        if per_device is None:
            raise RuntimeError("cannot tell the training batch size (use a DataLoader with a batch_size)")
        return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches

    def learning_rate(self) -> float:
        """``base_lr`` scaled by global batch / ``lr_batch_size`` (the official linear scaling rule)."""
        return self.optim_config.base_lr * self.global_batch_size() / self.optim_config.lr_batch_size

    def configure_optimizers(self) -> Dict[str, Any]:
        cfg = self.optim_config
        params = self.trainable_parameters()
        if not params:
            raise RuntimeError("nothing to train: no parameter requires grad")
        trainer = self.trainer
        if trainer.train_dataloader is None:  # with max_steps Lightning has not loaded it yet
            trainer.fit_loop.setup_data()
        total_steps = int(trainer.estimated_stepping_batches)
        batches = trainer.num_training_batches
        if math.isfinite(batches) and batches > 0:
            steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        else:  # an iterable dataset of unknown length: spread the total over the epochs
            steps_per_epoch = total_steps / max(1, trainer.max_epochs or 1)
        lr = self.learning_rate()
        optimizer = cfg.build(self.optimizer_parameters(lr), lr=lr)
        scheduler = cfg.scheduler(optimizer, steps_per_epoch, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    # ---- small checkpoints ------------------------------------------------------------------------------
    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: Union[str, os.PathLike, IO],
        map_location: Any = None,
        hparams_file: Optional[Union[str, os.PathLike]] = None,
        strict: Optional[bool] = None,
        weights_only: Optional[bool] = None,
        *,
        allow_download: bool = False,
        **kwargs: Any,
    ) -> "VPTModule":
        """Lightning's ``load_from_checkpoint`` for a file that may come from someone else (data, never code):

        - it never unpickles code: read with ``torch.load(weights_only=True)`` whatever ``weights_only`` or the
          environment (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) say; a payload is refused naming the file;
        - its hparams are values only, checked as a task package's config: the ``backbone`` entry
          (:func:`~vpt_lightning.backbones.pin.check_file_backbone`) and the sizes its network would take
          (:func:`~vpt_lightning.task_model.trained_tensor_shapes`, on the meta device, before anything is built);
        - its ``optim._target_`` is ``torch.optim.NAME`` or a class of a module you imported: never imported;
        - what the tuning method would fetch or read to start its tensors is not (the file's tensors replace it:
          :meth:`~vpt_lightning.methods.base.TuningMethod.config_for_saved_tensors`);
        - its tensors are exactly the ones this module trains, and finite (:meth:`on_load_checkpoint`).

        The backbone is ``backbone=`` (a pin as ``--backbone``: a config, a ``conf/backbone`` name, a .yaml/.json
        or weights file), else the file's own entry as a package's (its seeded random init, the shipped quickstart
        backbone; timm's hub weights only with ``allow_download=True``). Other ``kwargs`` override hparams, as in
        Lightning. ``checkpoint_path`` is a local file or an open binary file; a URL is refused (download it
        first).
        """
        if isinstance(checkpoint_path, (str, os.PathLike)):
            if "://" in str(checkpoint_path):
                raise ValueError(f"{str(checkpoint_path)!r}: download the checkpoint first; a local file is checked")
            origin = repr(str(Path(checkpoint_path).expanduser()))
            raw = load_weights_only(Path(checkpoint_path).expanduser())
        else:
            origin = repr(getattr(checkpoint_path, "name", "the checkpoint"))
            raw = load_weights_only(checkpoint_path)
            checkpoint_path.seek(0)
        hparams = raw.get("hyper_parameters") if isinstance(raw, dict) else None
        if not isinstance(hparams, dict) or not isinstance(raw.get("state_dict"), dict):
            raise ValueError(f"{origin} is not a Lightning checkpoint with 'hyper_parameters' and 'state_dict'")
        checked = check_file_backbone(hparams.get("backbone"), origin)
        if kwargs.get("backbone") is not None:
            kwargs["backbone"] = backbone_pin(kwargs["backbone"], checked)
        else:
            kwargs["backbone"] = own_backbone(checked, origin, allow_download)
        optim = hparams.get("optim")
        if "optim" not in kwargs and optim is not None:
            target = optim.get("_target_", OptimConfig.target) if isinstance(optim, Mapping) else optim
            file_optimizer_class(target, origin)
        if "tuning" not in kwargs:  # the file's tensors replace what the method would fetch or read to start them
            try:
                method, tuning = parse_tuning(hparams.get("tuning"))
            except (TypeError, ValueError) as err:
                raise ValueError(f"{origin}: {err}") from None
            kwargs["tuning"] = method.config_for_saved_tensors(tuning).to_dict()
        values = {**hparams, **{k: v for k, v in kwargs.items() if k != "backbone"}}
        trained_tensor_shapes(spec_of_file({**values, "backbone": checked, "head": raw.get(HEAD_KEY)}, origin), origin)
        token = _LOADING.set(origin)
        try:
            return super().load_from_checkpoint(
                checkpoint_path, map_location, hparams_file, strict, weights_only=True, **kwargs
            )
        finally:
            _LOADING.reset(token)

    def trainable_state_keys(self) -> List[str]:
        """State-dict keys of the trained tensors (see
        :func:`vpt_lightning.sharing.checkpoint.trainable_state_keys`)."""
        return trainable_state_keys(self, self.backbone.model)

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        keep = set(self.trainable_state_keys())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[IDENTITY_KEY] = dict(self.backbone_identity)
        if self.task.spec.head is not None:
            checkpoint[HEAD_KEY] = dict(self.task.spec.head)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Check what a checkpoint holds before it is restored: its backbone identity, and its tensors exactly the
        ones this module trains (never frozen backbone weights), finite; then fill in the frozen weights."""
        trainer = self._trainer
        origin = _LOADING.get() or repr(str(getattr(trainer, "ckpt_path", None) or "the checkpoint"))
        saved = checkpoint.get(IDENTITY_KEY)
        if saved is not None:
            try:
                check_backbone_identity(saved, self.backbone_identity)
            except ValueError as err:
                raise ValueError(f"{origin}: {err}") from None
        state = checkpoint["state_dict"]
        own = self.state_dict()
        expected = {k: tuple(own[k].shape) for k in self.trainable_state_keys()}
        check_tensor_shapes({k: tuple(getattr(v, "shape", ())) for k, v in state.items()}, expected, origin)
        check_finite(state, origin)
        # fill in the frozen backbone weights, which the task checkpoint does not carry
        for key, value in own.items():
            state.setdefault(key, value)
