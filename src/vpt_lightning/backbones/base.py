"""``PromptedBackbone``: the contract every prompted backbone family meets."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, ContextManager, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from timm.data import resolve_model_data_config
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..prompt import PromptConfig
from .pixel_border import PixelBorder
from .registry import classes_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrozenPrefix:
    """Where autograd starts in one forward pass of a block-by-block family (ViT, Swin).

    The stem (embeddings) and the blocks before ``first`` are frozen and see no prompt, so they run without
    autograd: nothing is recorded for a backward pass that could not reach them. Made by
    :meth:`PromptedBackbone.frozen_prefix` at the start of ``forward_features``.

    Attributes:
        grad: whether autograd is on for this pass.
        first: the index of the first block that records (0 when autograd is off: there is nothing to switch).
    """

    grad: bool
    first: int

    def records(self, index: int) -> bool:
        """Whether block ``index`` (and the stage transition before it) runs with autograd."""
        return self.grad and index >= self.first

    def stem(self) -> ContextManager[None]:
        """The context for the stem: autograd only when block 0 records."""
        return torch.set_grad_enabled(self.records(0))

    def block(self, index: int) -> ContextManager[None]:
        """The context for block ``index``."""
        return torch.set_grad_enabled(self.records(index))


class PromptedBackbone(nn.Module):
    """A frozen timm model plus learnable prompts; one subclass per family (ViT, ...).

    What every family provides:
        - ``model``: the wrapped timm model (built with ``num_classes=0``), frozen and, with ``backbone_eval``,
          kept in eval mode while this module trains;
        - ``num_features``: the width of the pooled features;
        - ``forward_features(images)`` and ``forward_head(features, pre_logits=False)`` (timm's names), and
          ``forward = forward_head(forward_features(...))`` -> pooled features;
        - ``prompt_parameters()``: the learnable tensors that belong to prompts (everything outside ``model``);
        - ``blocks()`` / ``final_norms()``: the ordered blocks and what follows them (tuning methods read these);
        - ``data_config()``: timm's input/normalisation config of the model as built;
        - class-level hooks for weight files (``filter_state_dict``, ``resampled_keys``, ``load_special_file``)
          and for the identity (``depth``, ``architecture``).

    Args:
        model: the timm model.
        prompt: a :class:`PromptConfig` (or a mapping of its fields); ``None`` or ``num_tokens=0``: no prompts.
        freeze_backbone: set ``requires_grad=False`` on every parameter of ``model``.
        backbone_eval: keep ``model`` in eval mode (no dropout / drop-path, BatchNorm statistics frozen), as the
            official VPT code; prompt dropout still follows ``self.training``.
    """

    #: state-dict keys (or key suffixes after a dot) that a family's checkpoint filter may resample to the model
    #: (patch / position embeddings, relative position tables)
    resampled_keys: ClassVar[Tuple[str, ...]] = ()
    #: the values of ``prompt.pool`` the family accepts besides ``null``; empty: none
    pools: ClassVar[Tuple[str, ...]] = ()
    #: what ``prompt.pool=null`` means in the family (``None``: its timm model's own pooling)
    default_pool: ClassVar[Optional[str]] = None
    #: ``vpt-tune``'s sweep values where this family's differ from ``conf/tune.yaml``'s, for the methods that learn
    #: prompts: protocol key (``base_lr``, ``num_tokens``...) -> values (see :meth:`protocol_grid`)
    prompt_grid: ClassVar[Dict[str, Tuple[float, ...]]] = {}
    #: what the class check's error adds after the registered timm classes' names (e.g. which model names)
    model_hint: ClassVar[str] = ""

    def __init__(
        self,
        model: nn.Module,
        prompt: Union[PromptConfig, Mapping[str, Any], None] = None,
        freeze_backbone: bool = True,
        backbone_eval: bool = True,
    ) -> None:
        super().__init__()
        self.check_model(model)
        if not isinstance(prompt, PromptConfig):
            prompt = PromptConfig.from_mapping(prompt) if prompt is not None else PromptConfig(num_tokens=0)
        if prompt.pool is not None and prompt.pool not in self.pools:
            valid = f"one of {list(self.pools)} or null" if self.pools else "null (the backbone's own pooling decides)"
            raise ValueError(f"prompt.pool={prompt.pool!r} is not supported by {type(self).__name__}; use {valid}")
        self.model = model
        self.prompt_config = prompt
        self.pool: Optional[str] = prompt.pool or self.default_pool
        self.backbone_eval = backbone_eval
        self.grad_checkpointing = False
        self.num_features: int = int(model.num_features)
        if freeze_backbone:
            self.model.requires_grad_(False)
        if backbone_eval:
            self.model.eval()

    @classmethod
    def check_model(cls, model: nn.Module) -> None:
        """Refuse a model that is not of a timm class registered for this family (``@register_family``).
        Families extend it with their own checks of the model's settings (call this first)."""
        classes = next((tuple(classes_of(k)) for k in cls.__mro__ if classes_of(k)), ())
        if classes and not isinstance(model, classes):
            names = " or ".join(c.__name__ for c in classes)
            raise TypeError(f"{cls.__name__} needs a timm {names}{cls.model_hint}, got {type(model).__name__}")

    # ---- the forward contract ---------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's own pooling (and head, if the model has one) on the output of :meth:`forward_features`."""
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def train(self, mode: bool = True) -> "PromptedBackbone":
        super().train(mode)
        if self.backbone_eval:
            self.model.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass (saves memory on large models)."""
        self.grad_checkpointing = enable

    # ---- the frozen prefix (block-by-block families) ------------------------------------------------------
    def frozen_prefix(self) -> FrozenPrefix:
        """Where autograd starts in the forward pass about to run (see :class:`FrozenPrefix`)."""
        grad = torch.is_grad_enabled()
        return FrozenPrefix(grad, self._first_block_needing_grad() if grad else 0)

    def _first_block_needing_grad(self) -> int:
        """Index of the first block from which autograd must record: 0 when the stem trains, else the first block
        that gets prompts (:meth:`_first_prompted_block`) or has a trainable parameter, whichever comes first."""
        if any(p is not None and p.requires_grad for p in self._stem_parameters()):
            return 0
        first = self._first_prompted_block()
        for index, modules in enumerate(self._block_modules()[:first]):
            if any(p.requires_grad for m in modules for p in m.parameters()):
                return index
        return first

    def _stem_parameters(self) -> Iterable[Optional[nn.Parameter]]:
        """The parameters used before block 0 (embeddings, tokens); default: all of the model's (no frozen prefix)."""
        return self.model.parameters()

    def _first_prompted_block(self) -> int:
        """The index of the first block that gets prompts (0 for prompts at the input; the number of blocks if none)."""
        return 0

    def _block_modules(self) -> List[List[nn.Module]]:
        """For each block in forward order, the modules that run with it (the block, a stage transition before it)."""
        return [[block] for block in self.blocks()]

    def _run(self, record: bool, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, recomputed in the backward pass when ``record``ing with gradient checkpointing."""
        if record and self.grad_checkpointing:
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    # ---- what tuning methods read -----------------------------------------------------------------------
    def prompt_parameters(self) -> Dict[str, nn.Parameter]:
        """Prompt tensors by name: every parameter of this module outside the wrapped ``model``."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("model.")}

    def blocks(self) -> List[nn.Module]:
        """The model's blocks in forward order (Partial-k trains the last k)."""
        return list(self.model.blocks)

    def last_blocks(self, k: int) -> List[nn.Module]:
        """What Partial-k trains before :meth:`final_norms`: the last ``k`` blocks (and, in families with stages,
        the stage transitions between them)."""
        blocks = self.blocks()
        return blocks[len(blocks) - k :]

    def final_norms(self) -> List[nn.Module]:
        """Modules after the last block that Partial-k trains with it (final norm, ``fc_norm``)."""
        return [m for m in (getattr(self.model, n, None) for n in ("norm", "fc_norm")) if isinstance(m, nn.Module)]

    def set_image_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """The per-channel mean/std the input images are normalised with (the DataModule's ``data.normalization``):
        pixel prompts (:class:`~vpt_lightning.backbones.pixel_border.PixelBorder`) are normalised alike. Until
        called they use ImageNet's, as the official code."""
        for module in self.modules():
            if isinstance(module, PixelBorder):
                module.set_normalization(mean, std)

    def data_config(self) -> Dict[str, Any]:
        """timm's data config (input size, interpolation, mean/std, crop) of the model as built."""
        config = dict(resolve_model_data_config(self.model))
        patch_embed = getattr(self.model, "patch_embed", None)
        if getattr(patch_embed, "img_size", None):
            # timm reports the pretrained cfg's input size, even for a model built with another img_size
            config["input_size"] = (patch_embed.proj.in_channels, *patch_embed.img_size)
        return config

    # ---- weight files and identity (class level: used before a wrapper exists) ---------------------------
    @classmethod
    def filter_state_dict(cls, state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
        """Convert a weights file to the model's layout with the family's own timm filter.

        The default is ``checkpoint_filter_fn`` of the model's timm module: the function timm's builder applies to
        ``pretrained_cfg_overlay=dict(file=...)`` files. It may pop keys from its argument: pass a copy.
        """
        module = sys.modules.get(type(model).__module__)
        fn = getattr(module, "checkpoint_filter_fn", None)
        return fn(state_dict, model) if fn is not None else state_dict

    @classmethod
    def load_special_file(cls, model: nn.Module, path: Path, resize: bool) -> bool:
        """Load a file format the family reads itself (e.g. ViT's ``.npz``); return ``False`` for state dicts."""
        return False

    @classmethod
    def protocol_grid(cls, prompts: bool) -> Dict[str, List[float]]:
        """The family's own ``vpt-tune`` sweep values (protocol key -> values) for a method that learns prompts
        (``prompts``) or not; keys it leaves out keep ``conf/tune.yaml``'s values. Default: :attr:`prompt_grid`."""
        return {k: list(v) for k, v in cls.prompt_grid.items()} if prompts else {}

    @classmethod
    def depth(cls, model: nn.Module) -> int:
        """The number of blocks of the timm model (the identity's ``depth``)."""
        return len(getattr(model, "blocks", []))

    @classmethod
    def architecture(cls, model: nn.Module) -> Dict[str, Any]:
        """Settings that decide the function but leave no trace in the weight names and shapes."""
        return {"class": type(model).__name__}


def refuse_resampling(path: Path, resized: List[str], allow: bool) -> None:
    """Fail when a weights file needs its patch / position embeddings resampled, unless ``allow`` (then log it)."""
    if not resized:
        return
    what = "; ".join(resized)
    if not allow:
        raise ValueError(
            f"backbone.checkpoint_path={str(path)!r} was made for another patch size, image size or window size "
            f"({what}); set backbone.kwargs (patch_size, img_size, window_size) to the checkpoint's, or "
            "backbone.resize_embeddings=true to resample them to this model"
        )
    log.warning("backbone.checkpoint_path=%r: resampling to this model (resize_embeddings=true): %s", str(path), what)
