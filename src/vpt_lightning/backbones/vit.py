"""The ViT family: ``PromptedViT``, a timm VisionTransformer with VPT prompts, built from the model's own pieces."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..prompt import PromptConfig, Prompts
from .base import PromptedBackbone, refuse_resampling
from .registry import register_family

# timm VisionTransformer global_pool values that pool the tokens to one vector per image ('' does not)
POOLS = ("token", "avg", "avgmax", "max", "map", "prr")
NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")  # the array-name prefixes timm's .npz loader knows
NPZ_QUERY = re.compile(r"encoderblock(_0)?/MultiHeadDotProductAttention_\d/query/kernel$")  # block 0's query


@dataclass
class SamplePrompts:
    """Each sample's own prompts for one forward pass of a shared ViT: a batch that mixes tasks.

    Built by :meth:`PromptedViT.gather_prompts`. The sequence carries ``num_slots`` prompt slots right after the
    prefix tokens (the longest prepended prompt of the batch). A sample's slots that hold no prompt of its task (a
    shorter prompt, a prompt inserted only at a later block, or none at all) are masked out of attention as keys,
    so they change no other token; they are removed before the final norm like the prompts.

    Attributes:
        num_slots: prompt slots in the sequence.
        prepend: block -> ``(prompts (B, num_slots, D), takes (B,) bool)``: the samples of ``takes`` get these new
            prompts in their slots at that block (replacing the previous block's prompt outputs, as VPT-Deep).
        add: block -> ``(B, 1 | num_patches, D)`` added to the patch tokens (zeros for samples of other tasks).
        masks: block -> the boolean key mask ``(B, 1, 1, N)`` (``True``: attended) from that block on, ``None`` when
            every slot of every sample holds a prompt.
    """

    num_slots: int
    prepend: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    add: Dict[int, torch.Tensor] = field(default_factory=dict)
    masks: Dict[int, Optional[torch.Tensor]] = field(default_factory=dict)

    def open_slots(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Insert ``num_slots`` empty prompt slots after the ``start`` prefix tokens."""
        empty = x.new_zeros(x.shape[0], self.num_slots, x.shape[2])
        return torch.cat([x[:, :start], empty, x[:, start:]], dim=1)

    def insert(self, x: torch.Tensor, block: int, start: int) -> torch.Tensor:
        """The sequence entering ``block``: new prompts in the slots of the samples that take them, added ones."""
        end = start + self.num_slots
        if block in self.prepend:
            prompts, takes = self.prepend[block]
            prompts = prompts.to(x.dtype)
            slots = prompts if bool(takes.all()) else torch.where(takes[:, None, None], prompts, x[:, start:end])
            x = torch.cat([x[:, :start], slots, x[:, end:]], dim=1)
        if block in self.add:
            x = torch.cat([x[:, :end], x[:, end:] + self.add[block].to(x.dtype)], dim=1)
        return x


@register_family(VisionTransformer)
class PromptedViT(PromptedBackbone):
    """Wrap a timm ``VisionTransformer`` and insert learnable prompts into its token sequence.

    Nothing of the ViT is copied: the forward pass calls the model's own ``patch_embed``, ``_pos_embed``
    (class/register tokens and position embedding), ``patch_drop``, ``norm_pre``, ``blocks``, ``norm`` and
    ``forward_head``. Prompts are inserted after the position embedding (they carry none), right after the
    prefix tokens (class and register tokens): ``[prefix, prompts, patches]``. Their outputs are removed again
    before the final norm, so timm's own pooling (``token``, ``avg``, ``map``...) sees exactly the prefix and
    patch tokens: the class token reads the prompts through attention, an average excludes them. A backbone with a
    class token but ``global_pool='avg'`` (e.g. MAE) thus averages the image tokens only (prompts and prefix tokens
    excluded), as timm does; ``global_pool=''`` (one output per token) is refused.

    Args:
        vit: the timm model. Its own head (if ``num_classes > 0``) is applied by ``forward``; build it with
            ``num_classes=0`` to get pooled features instead.
        prompt: a :class:`PromptConfig` (or a mapping of its fields); ``None`` or ``num_tokens=0``: no prompts.
        freeze_backbone: set ``requires_grad=False`` on every parameter of ``vit``.
        backbone_eval: keep ``vit`` in eval mode even when this module trains (its dropout and drop-path off,
            as the official VPT code); prompt dropout still follows ``self.training``.
    """

    def __init__(
        self,
        vit: nn.Module,
        prompt: Union[PromptConfig, Mapping[str, Any], None] = None,
        freeze_backbone: bool = True,
        backbone_eval: bool = True,
    ) -> None:
        if not isinstance(vit, VisionTransformer):
            raise TypeError(
                f"PromptedViT needs a timm VisionTransformer (vit_*, deit_*, ... models of "
                f"timm.models.vision_transformer), got {type(vit).__name__}"
            )
        if vit.global_pool not in POOLS:
            raise ValueError(
                f"backbone.kwargs.global_pool={vit.global_pool!r} gives one output per token, not per image; use one "
                f"of {list(POOLS)} ('token': the class token, 'avg': the mean of the image tokens)"
            )
        super().__init__(vit, prompt, freeze_backbone=freeze_backbone, backbone_eval=backbone_eval)
        prompt = self.prompt_config
        self.num_prefix_tokens: int = vit.num_prefix_tokens
        self.num_patches: int = vit.patch_embed.num_patches
        self.embed_dim: int = vit.embed_dim
        blocks = prompt.block_indices(len(vit.blocks))
        # block index -> which prompt set it receives
        self.prompt_sets: Dict[int, int] = {block: i for i, block in enumerate(blocks)}
        if prompt.location == "add" and prompt.enabled and prompt.num_tokens not in (1, self.num_patches):
            raise ValueError(
                f"prompt.num_tokens={prompt.num_tokens} with prompt.location='add': added prompts need 1 token "
                f"(broadcast to every patch) or one per patch ({self.num_patches} for this backbone)"
            )
        self.prompts: Optional[Prompts] = (
            Prompts(prompt, len(blocks), self.embed_dim, vit.patch_embed.patch_size) if prompt.enabled else None
        )

    @property
    def vit(self) -> VisionTransformer:
        """The wrapped timm ``VisionTransformer`` (``self.model``)."""
        return self.model

    @property
    def num_prompt_tokens(self) -> int:
        """Number of prompt tokens the sequence carries after the first prompted block (0 for ``add``)."""
        cfg = self.prompt_config
        return cfg.num_tokens if cfg.enabled and cfg.location == "prepend" else 0

    def _first_block_needing_grad(self) -> int:
        """Index of the first block from which autograd must record (all before it are frozen and prompt-free)."""
        embedding = [self.vit.patch_embed, self.vit.norm_pre]
        params = [self.vit.pos_embed, self.vit.cls_token, self.vit.reg_token]
        if any(p.requires_grad for m in embedding for p in m.parameters()) or any(
            p is not None and p.requires_grad for p in params
        ):
            return 0
        first = min(self.prompt_sets, default=len(self.vit.blocks))
        for i, block in enumerate(self.vit.blocks[:first]):
            if any(p.requires_grad for p in block.parameters()):
                return i
        return first

    def _insert_prompts(self, x: torch.Tensor, block: int, inserted: bool) -> torch.Tensor:
        prompts = self.prompts(self.prompt_sets[block], x.shape[0]).to(x.dtype)
        start = self.num_prefix_tokens
        if self.prompt_config.location == "add":
            if x.shape[1] - start != self.num_patches and prompts.shape[1] != 1:
                raise RuntimeError("prompt.location='add' needs every patch token (disable patch dropout)")
            return torch.cat([x[:, :start], x[:, start:] + prompts], dim=1)
        # prepend: insert after the prefix tokens, or replace the previous block's prompt outputs (VPT-Deep)
        end = start + prompts.shape[1] if inserted else start
        return torch.cat([x[:, :start], prompts, x[:, end:]], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the token sequence entering block 0 (patch + position embedding, prefix tokens)."""
        vit = self.vit
        x = vit.patch_embed(x)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        return vit.norm_pre(x)

    def forward_features(self, x: torch.Tensor, sample_prompts: Optional[SamplePrompts] = None) -> torch.Tensor:
        """Images -> final normed tokens ``[prefix, patches]`` (prompt outputs removed), like timm's.

        ``sample_prompts`` (from :meth:`gather_prompts`) gives each sample its own task's prompts instead of this
        module's (a batch that mixes tasks on one shared backbone).
        """
        first_grad = self._first_block_needing_grad() if torch.is_grad_enabled() else 0
        with torch.set_grad_enabled(torch.is_grad_enabled() and first_grad == 0):
            x = self.embed(x)
        start = self.num_prefix_tokens
        if sample_prompts is not None:
            x = sample_prompts.open_slots(x, start)
        inserted, mask = False, None
        for i, block in enumerate(self.vit.blocks):
            record = torch.is_grad_enabled() and i >= first_grad
            with torch.set_grad_enabled(record):
                if sample_prompts is not None:
                    x = sample_prompts.insert(x, i, start)
                    mask = sample_prompts.masks.get(i, mask)
                elif i in self.prompt_sets:
                    x = self._insert_prompts(x, i, inserted)
                    inserted = True
                kwargs = {} if mask is None else {"attn_mask": mask}
                if record and self.grad_checkpointing:
                    x = checkpoint(block, x, use_reentrant=False, **kwargs)
                else:
                    x = block(x, **kwargs)
        slots = sample_prompts.num_slots if sample_prompts is not None else self.num_prompt_tokens * inserted
        if slots:
            x = torch.cat([x[:, :start], x[:, start + slots :]], dim=1)
        return self.vit.norm(x)

    # ---- per-sample prompts: many tasks on one shared backbone ------------------------------------------
    @property
    def supports_sample_prompts(self) -> bool:
        """Whether every block takes an attention mask (timm's ``Block``), which :class:`SamplePrompts` needs."""
        return all("attn_mask" in inspect.signature(block.forward).parameters for block in self.vit.blocks)

    def gather_prompts(self, tasks: Sequence["PromptedViT"], task_index: torch.Tensor) -> SamplePrompts:
        """Sample ``b`` gets the prompts of ``tasks[task_index[b]]``; every task must wrap this module's ViT.

        Tasks may differ in prompt length, depth, location (``prepend``/``add``) and projection; the prompts are
        taken as in evaluation (no dropout).
        """
        if any(task.vit is not self.vit for task in tasks):
            raise ValueError("gather_prompts: every task must wrap the same timm model as this PromptedViT")
        present = [int(t) for t in torch.unique(task_index).tolist()]
        num_slots = max((tasks[t].num_prompt_tokens for t in present), default=0)
        batch, device = task_index.shape[0], task_index.device
        # each present task's prompts of every prompted block, projected once: (sets, n, D)
        projected = {t: tasks[t].prompts.proj(tasks[t].prompts.tokens) for t in present if tasks[t].prompts is not None}
        out = SamplePrompts(num_slots)
        held = torch.zeros(batch, dtype=torch.long, device=device)  # prompt tokens each sample's slots hold
        for block in range(len(self.vit.blocks)):
            # per task (rows of small tables, gathered to the batch by task_index): new slots, whether it inserts
            # at this block, how many tokens; added prompts
            inserting = [t for t in present if block in tasks[t].prompt_sets]
            prepend = [t for t in inserting if tasks[t].prompt_config.location == "prepend"]
            added = [t for t in inserting if tasks[t].prompt_config.location == "add"]
            if prepend:
                table = projected[prepend[0]].new_zeros(len(tasks), num_slots, self.embed_dim)
                inserts = torch.zeros(len(tasks), dtype=torch.bool, device=device)
                lengths = torch.zeros(len(tasks), dtype=torch.long, device=device)
                for t in prepend:
                    prompts = projected[t][tasks[t].prompt_sets[block]]
                    table[t, : prompts.shape[0]] = prompts
                    inserts[t], lengths[t] = True, prompts.shape[0]
                takes = inserts[task_index]
                out.prepend[block] = (table[task_index], takes)
                held = torch.where(takes, lengths[task_index], held)
            if added:
                table = projected[added[0]].new_zeros(len(tasks), self.num_patches, self.embed_dim)
                for t in added:
                    table[t] = table[t] + projected[t][tasks[t].prompt_sets[block]]
                out.add[block] = table[task_index]
            if block == 0 or prepend:
                out.masks[block] = self._slot_mask(held, num_slots)
        return out

    def _slot_mask(self, held: torch.Tensor, num_slots: int) -> Optional[torch.Tensor]:
        """Key mask ``(B, 1, 1, N)``: prefix and patch tokens, and the slots that hold prompts; ``None``: all."""
        slot_valid = torch.arange(num_slots, device=held.device)[None] < held[:, None]
        if bool(slot_valid.all()):
            return None
        batch = held.shape[0]
        prefix = slot_valid.new_ones(batch, self.num_prefix_tokens)
        patches = slot_valid.new_ones(batch, self.num_patches)
        return torch.cat([prefix, slot_valid, patches], dim=1)[:, None, None, :]

    def data_config(self) -> Dict[str, Any]:
        config = super().data_config()
        # timm reports the pretrained cfg's input size, even for a model built with another img_size
        config["input_size"] = (self.vit.patch_embed.proj.in_channels, *self.vit.patch_embed.img_size)
        return config

    # ---- weight files and identity ----------------------------------------------------------------------
    resampled_keys = ("patch_embed.proj.weight", "pos_embed")

    @classmethod
    def load_special_file(cls, model: nn.Module, path: Path, resize: bool) -> bool:
        """The original Google (big_vision / jax) ``.npz`` checkpoints, through timm's own loader after a check."""
        if path.suffix != ".npz":
            return False
        check_npz(path, model, resize)
        try:
            model.load_pretrained(str(path))
        except KeyError as err:
            raise ValueError(f"backbone.checkpoint_path={str(path)!r} lacks array {err} for this model") from err
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"backbone.checkpoint_path={str(path)!r} could not be loaded into {type(model).__name__} by timm's "
                f".npz loader ({err}); check backbone.name and backbone.kwargs against the checkpoint"
            ) from err
        return True

    @classmethod
    def architecture(cls, model: nn.Module) -> Dict[str, Any]:
        block = model.blocks[0] if len(model.blocks) else None
        return {
            "class": type(model).__name__,
            "img_size": list(model.patch_embed.img_size or []),
            "num_heads": getattr(getattr(block, "attn", None), "num_heads", None),
            "act": type(getattr(getattr(block, "mlp", None), "act", None)).__name__,
            "num_prefix_tokens": model.num_prefix_tokens,
            "no_embed_class": model.no_embed_class,
            "global_pool": model.global_pool,
        }


def check_npz(path: Path, model: VisionTransformer, resize: bool) -> None:
    """Compare an original Google ViT ``.npz`` with the model before timm's loader (which ignores extra blocks
    and resamples embeddings silently): blocks, width, heads, class token, patch size and position grid."""
    try:
        with np.load(path) as arrays:
            names = set(arrays.files)
            prefix = next((p for p in NPZ_PREFIXES if f"{p}embedding/kernel" in names), "")
            pos_keys = [f"{prefix}Transformer/posembed_input/pos_embedding", f"{prefix}pos_embedding"]
            pos_key = next((k for k in pos_keys if k in names), None)
            query = sorted(k for k in names if NPZ_QUERY.search(k))
            stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"  # big_vision: blocks stacked on axis 0
            wanted = (f"{prefix}embedding/kernel", pos_key, stacked, *query[:1])
            shapes = {k: arrays[k].shape for k in wanted if k in names}
    except Exception as err:  # not a zip of arrays, pickled data...: say which file
        raise ValueError(f"backbone.checkpoint_path={str(path)!r} could not be read as an .npz file: {err}") from err
    kernel = shapes.get(f"{prefix}embedding/kernel")
    if kernel is None:
        raise ValueError(f"backbone.checkpoint_path={str(path)!r} lacks the array 'embedding/kernel' of a ViT .npz")
    pos = shapes.get(pos_key)
    heads = shapes[query[0]][-2] if query else None
    if stacked in shapes:
        depth = shapes[stacked][0]
    else:
        block = re.compile(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/")
        depth = len({m.group(1) for m in map(block.match, names) if m})
    problems = []
    if depth != len(model.blocks):
        problems.append(f"{depth} Transformer/encoderblock_* blocks vs model depth {len(model.blocks)}")
    if kernel[-1] != model.embed_dim:
        problems.append(f"embedding/kernel {tuple(kernel)} (width {kernel[-1]}) vs model embed_dim {model.embed_dim}")
    num_heads = getattr(model.blocks[0].attn, "num_heads", None) if len(model.blocks) else None
    if heads is not None and num_heads is not None and heads != num_heads:
        problems.append(f"{query[0]} {heads} heads vs model num_heads {num_heads}")
    if (f"{prefix}cls" in names) != (model.cls_token is not None):
        has = "has" if f"{prefix}cls" in names else "lacks"
        problems.append(f"file {has} a class token ('cls') vs model class_token={model.cls_token is not None}")
    if pos is None and model.pos_embed is not None:
        problems.append("file lacks the position embedding 'Transformer/posembed_input/pos_embedding'")
    if problems:
        raise ValueError(
            f"backbone.checkpoint_path={str(path)!r} does not fit model {type(model).__name__}: "
            + "; ".join(problems) + "; check backbone.name and backbone.kwargs against the checkpoint"
        )
    resized = []
    patch = tuple(model.patch_embed.proj.weight.shape[-2:])
    if tuple(kernel[:2]) != patch:
        resized.append(f"embedding/kernel: file {tuple(kernel)} (patch {tuple(kernel[:2])}) vs model patch {patch}")
    if pos is not None and model.pos_embed is not None and tuple(pos) != tuple(model.pos_embed.shape):
        resized.append(f"{pos_key}: file {tuple(pos)} vs model {tuple(model.pos_embed.shape)}")
    refuse_resampling(path, resized, resize)
