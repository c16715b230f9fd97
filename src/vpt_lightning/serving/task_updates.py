"""Per-task weight updates (LoRA, Adapter) applied sample by sample inside one pass over a shared backbone.

A LoRA or Adapter task is built on a weight-sharing copy of the shared model
(:mod:`~vpt_lightning.serving.shared_weights`), where its method inserted its modules. :func:`task_updates`
reads them back as additions to the outputs of the shared model's own modules: peft's LoRA layer at ``name`` adds
``scaling * B(A(dropout(x)))`` to the output of the shared linear layer ``name`` (the formula of peft's
``LoraLayer.forward``); an ``AdaptedMLP`` at ``name`` adds ``adapter(m)`` to the output ``m`` of the shared MLP.
:func:`routed_updates` then adds, during one forward pass of the shared model, each task's additions to the rows of
its own samples (what peft's mixed-adapter batches, ``adapter_names=[...]``, do inside its LoRA layers, here for
tasks whose adapters live on separate copies of the backbone).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..methods.adapter import AdaptedMLP

#: the addition a task makes to a module's output: ``(module input, module output) -> tensor like the output``
Update = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: rows of a batch that belong to one task: ``(task, start, end)``, contiguous
Group = Tuple[int, int, int]


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


def _lora_update(layer: nn.Module) -> Optional[Update]:
    """peft's plain LoRA (one adapter, unmerged, no DoRA or other variant) as an addition to the base output."""
    names = list(layer.lora_A.keys())
    if len(names) != 1 or getattr(layer, "merged", False) or names[0] in getattr(layer, "lora_variant", {}):
        return None
    name = names[0]
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    dropout, scaling = layer.lora_dropout[name], layer.scaling[name]

    def update(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return (lora_b(lora_a(dropout(x.to(lora_a.weight.dtype)))) * scaling).to(out.dtype)

    return update


def _adapter_update(adapted: AdaptedMLP) -> Update:
    def update(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return adapted.adapter(out)

    return update


def task_updates(shared: nn.Module, task_model: nn.Module) -> Optional[Dict[str, Update]]:
    """The additions a task's copy ``task_model`` makes to the modules of ``shared`` (module name -> update;
    empty when the copy computes what ``shared`` does), or ``None`` when the copy differs in another way (another
    module type, a weight of its own such as a resized position embedding): such a task runs through its own copy."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # without peft (the lora extra) no task holds a LoRA layer
        LoraLayer = ()  # type: ignore[assignment,misc]

    shared_modules = dict(shared.named_modules())
    updates: Dict[str, Update] = {}
    handled: List[str] = []
    for name, module in task_model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in handled):
            continue
        original = shared_modules.get(name)
        if original is None:
            return None
        if isinstance(module, LoraLayer) and not isinstance(original, LoraLayer):
            update = _lora_update(module)
            if update is None or not _same_tensors(module.get_base_layer(), original):
                return None
        elif isinstance(module, AdaptedMLP) and not isinstance(original, AdaptedMLP):
            if not _same_tensors(module.mlp, original):
                return None
            update = _adapter_update(module)
        else:
            own = dict(module.named_parameters(recurse=False)), dict(module.named_buffers(recurse=False))
            theirs = dict(original.named_parameters(recurse=False)), dict(original.named_buffers(recurse=False))
            same = all(a.keys() == b.keys() and all(a[k] is b[k] for k in a) for a, b in zip(own, theirs))
            if type(module) is not type(original) or not same:
                return None
            continue
        updates[name] = update
        handled.append(name)
    return updates


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
