"""Per-task weight updates (LoRA, Adapter) as data, applied sample by sample inside one pass over a shared backbone.

A LoRA or Adapter task adds modules to its copy of the backbone. :func:`update_sites` finds them once per task
shape (on a template built on a weight-sharing copy of the shared model, :mod:`~vpt_lightning.serving.shared_weights`)
and describes each as an :class:`UpdateSite`: which shared module's output it adds to, and which of the task's
trained tensors it reads. :func:`bind_update` turns a site and one task's tensors into the addition itself, a plain
function of tensors (no module): peft's LoRA layer at ``name`` adds ``scaling * B(A(x))`` to the output of the
shared linear layer ``name`` (the formula of peft's ``LoraLayer.forward``, in evaluation: no dropout); an
``AdaptedMLP`` at ``name`` adds ``up(GELU(down(m)))`` to the output ``m`` of the shared MLP (:mod:`..methods.adapter`).
:func:`routed_updates` then adds, during one forward pass of the shared model, each task's additions to the rows of
its own samples (what peft's mixed-adapter batches, ``adapter_names=[...]``, do inside its LoRA layers, here for
tasks that are data).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.adapter import AdaptedMLP, Adapter

#: the addition a task makes to a module's output: ``(module input, module output) -> tensor like the output``
Update = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: rows of a batch that belong to one task: ``(task, start, end)``, contiguous
Group = Tuple[int, int, int]
#: a tensor's key in the task's state dict (``None``: the template does not hold it)
KeyOf = Callable[[Optional[torch.Tensor]], Optional[str]]


@dataclass(frozen=True)
class UpdateSite:
    """A task's addition to the output of one shared module, as the state-dict keys of the tensors it reads.

    ``kind='lora'``: ``scaling * B(A(x))`` (keys ``a_weight``, ``a_bias``, ``b_weight``, ``b_bias``; the biases
    ``None`` unless peft's ``lora_bias``); ``kind='adapter'``: ``up(GELU(down(m)))`` on the module's output ``m``
    (keys ``a_*`` for ``down``, ``b_*`` for ``up``)."""

    kind: str
    a_weight: str
    a_bias: Optional[str]
    b_weight: str
    b_bias: Optional[str]
    scaling: float = 1.0

    def keys(self) -> List[str]:
        return [k for k in (self.a_weight, self.a_bias, self.b_weight, self.b_bias) if k is not None]


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    """Whether two modules hold the very same parameter and buffer objects (by name, at every depth)."""
    pa, pb = dict(a.named_parameters(remove_duplicate=False)), dict(b.named_parameters(remove_duplicate=False))
    ba, bb = dict(a.named_buffers(remove_duplicate=False)), dict(b.named_buffers(remove_duplicate=False))
    return (
        pa.keys() == pb.keys()
        and all(pa[k] is pb[k] for k in pa)
        and ba.keys() == bb.keys()
        and all(ba[k] is bb[k] for k in ba)
    )


def _linear_keys(layer: nn.Module, key_of: KeyOf) -> Optional[Tuple[str, Optional[str]]]:
    """The keys of a plain ``nn.Linear``'s weight and bias, or ``None`` for anything else."""
    if type(layer) is not nn.Linear or key_of(layer.weight) is None:
        return None
    bias = key_of(layer.bias) if layer.bias is not None else None
    if layer.bias is not None and bias is None:
        return None
    return key_of(layer.weight), bias


def _lora_site(layer: nn.Module, key_of: KeyOf) -> Optional[UpdateSite]:
    """peft's plain LoRA on a linear layer (one adapter, unmerged, no DoRA or other variant)."""
    names = list(layer.lora_A.keys())
    if len(names) != 1 or getattr(layer, "merged", False) or names[0] in getattr(layer, "lora_variant", {}):
        return None
    name = names[0]
    if type(layer.get_base_layer()) is not nn.Linear:
        return None
    a, b = _linear_keys(layer.lora_A[name], key_of), _linear_keys(layer.lora_B[name], key_of)
    if a is None or b is None:
        return None
    return UpdateSite("lora", *a, *b, scaling=float(layer.scaling[name]))


def _adapter_site(adapted: AdaptedMLP, key_of: KeyOf) -> Optional[UpdateSite]:
    adapter = adapted.adapter
    if type(adapter) is not Adapter or type(adapter.act) is not nn.GELU or adapter.act.approximate != "none":
        return None
    down, up = _linear_keys(adapter.down, key_of), _linear_keys(adapter.up, key_of)
    if down is None or up is None:
        return None
    return UpdateSite("adapter", *down, *up)


def update_sites(shared: nn.Module, task_model: nn.Module, key_of: KeyOf) -> Optional[Dict[str, UpdateSite]]:
    """The additions a task's copy ``task_model`` makes to the modules of ``shared`` (module name -> site; empty
    when the copy computes what ``shared`` does), or ``None`` when the copy differs in another way (another module
    type, a weight of its own such as a resized position embedding, a LoRA variant): such a task runs through its
    own copy. ``key_of`` gives a tensor's key in the task's state dict."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # without peft (the lora extra) no task holds a LoRA layer
        LoraLayer = ()  # type: ignore[assignment,misc]

    shared_modules = dict(shared.named_modules())
    sites: Dict[str, UpdateSite] = {}
    for name, module in task_model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in sites):
            continue
        original = shared_modules.get(name)
        if original is None:
            return None
        site: Optional[UpdateSite]
        if isinstance(module, LoraLayer) and not isinstance(original, LoraLayer):
            site = _lora_site(module, key_of)
            if site is None or not _same_tensors(module.get_base_layer(), original):
                return None
        elif isinstance(module, AdaptedMLP) and not isinstance(original, AdaptedMLP):
            site = _adapter_site(module, key_of)
            if site is None or not _same_tensors(module.mlp, original):
                return None
        else:
            own = dict(module.named_parameters(recurse=False)), dict(module.named_buffers(recurse=False))
            theirs = dict(original.named_parameters(recurse=False)), dict(original.named_buffers(recurse=False))
            same = all(a.keys() == b.keys() and all(a[k] is b[k] for k in a) for a, b in zip(own, theirs))
            if type(module) is not type(original) or not same:
                return None
            continue
        sites[name] = site
    return sites


def bind_update(site: UpdateSite, tensors: Mapping[str, torch.Tensor]) -> Update:
    """The addition of ``site`` with one task's ``tensors`` (its state dict), as a function of tensors."""
    a_weight, b_weight = tensors[site.a_weight], tensors[site.b_weight]
    a_bias = tensors[site.a_bias] if site.a_bias else None
    b_bias = tensors[site.b_bias] if site.b_bias else None
    if site.kind == "lora":
        scaling = site.scaling

        def lora(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            low = F.linear(x.to(a_weight.dtype), a_weight, a_bias)
            return (F.linear(low, b_weight, b_bias) * scaling).to(out.dtype)

        return lora

    def adapter(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return F.linear(F.gelu(F.linear(out, a_weight, a_bias)), b_weight, b_bias)

    return adapter


class Routing:
    """Which rows of the next module calls belong to which task (``groups``), set by the pass around each call."""

    def __init__(self, groups: Sequence[Group] = ()) -> None:
        self.groups: List[Group] = list(groups)

    @contextmanager
    def rows(self, groups: Sequence[Group]) -> Iterator[None]:
        """Route the calls inside the ``with`` block by ``groups`` (e.g. one task's prompt rows)."""
        previous, self.groups = self.groups, list(groups)
        try:
            yield
        finally:
            self.groups = previous


@contextmanager
def routed_updates(model: nn.Module, updates: Mapping[int, Mapping[str, Update]], routing: Routing) -> Iterator[None]:
    """While inside, each module of ``model`` that a task updates adds that task's update to the rows
    ``routing.groups`` gives the task (forward hooks, removed on exit)."""
    by_module: Dict[str, Dict[int, Update]] = {}
    for task, named in updates.items():
        for name, update in named.items():
            by_module.setdefault(name, {})[task] = update

    def hook_for(per_task: Dict[int, Update]) -> Callable:
        def hook(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            groups = [g for g in routing.groups if g[0] in per_task]
            if not groups:
                return output
            if routing.groups[-1][2] != output.shape[0]:
                raise RuntimeError(f"routed_updates: {output.shape[0]} rows but the routing covers {routing.groups}")
            x = inputs[0]
            out = output.clone() if torch.is_grad_enabled() else output  # autograd may need the original
            for task, start, end in groups:
                out[start:end] += per_task[task](x[start:end], output[start:end])
            return out

        return hook

    handles = [
        model.get_submodule(name).register_forward_hook(hook_for(per_task)) for name, per_task in by_module.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
