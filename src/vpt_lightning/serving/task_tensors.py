"""A task as data on a shared backbone: the tensors the one pass gathers, and the layout that maps a task's trained
tensors to them.

A :class:`TaskLayout` is built once per task *shape* (method, prompt config, head and number of classes; the
backbone is the shared one): the task's network is built once on a weight-sharing copy of the shared model, as
loading a task's file builds it (first on the ``meta`` device within the size caps, and with nothing fetched or
read: :func:`~vpt_lightning.task_model.trained_tensor_shapes`), and what it trains is read off it: the trained keys
and shapes every package of that shape must hold (:func:`~vpt_lightning.task_model.trained_shapes`, the rule of
every loader), and how each tensor enters the pass. :meth:`TaskLayout.bind` then turns one task's tensors into
:class:`TaskTensors`, with no module of its own:

- ``prompts``: block index -> the ``(p, D)`` prompts that block receives (projected once if ``prompt.project``);
- ``updates``: shared module name -> the task's LoRA or Adapter addition to its output
  (:mod:`~vpt_lightning.serving.task_updates`);
- ``head``: the head as a function of the pooled features: linear, or the MLP of ``tuning=mlp``; a head registered
  by the operator's code (:mod:`vpt_lightning.heads`) is rebuilt as a small module per task.

Tasks that cannot be data on the shared backbone keep a :class:`~vpt_lightning.task_model.TaskModel` of their own
on a weight-sharing copy (``TaskTensors.model``) and run their rows through it: prompts other than prepended tokens
(``prompt.location`` add, pixel prompts...), ``prompt.pool``/``pool_norm``, methods that add other modules
(sidetune), and other backbone families (Swin, ConvNets). Methods that change backbone weights (full, partial,
bias, vpt_bias) cannot share the backbone at all and are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import PromptedBackbone
from ..heads import build_head
from ..methods import parse_tuning
from ..task_model import (
    TaskModel,
    TaskRecord,
    TaskSpec,
    assemble,
    build_task_model,
    file_network_construction,
    trained_shapes,
    trained_tensor_shapes,
)
from .mixed_pass import blocks_fit, joins_with_prompts, mixed_features, shares_blocks
from .shared_weights import weight_sharing_copy
from .task_updates import Update, UpdateSite, bind_update, update_sites

#: a head as data: ``("linear", weight key, bias key)`` or ``("relu",)``, applied in order
HeadOp = Tuple[Optional[str], ...]


def shape_signature(spec: TaskSpec) -> str:
    """What decides a task's trained keys and shapes on a given backbone: method, prompts, head, classes."""
    return json.dumps(
        {"num_classes": spec.num_classes, "prompt": spec.prompt, "tuning": spec.tuning, "head": spec.head},
        sort_keys=True,
        default=str,
    )


def distinct_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of the storages under ``tensors``, each counted once (views of one tensor are one storage)."""
    seen: Dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@dataclass
class TaskTensors:
    """One task's tensors as the one pass uses them (see the module doc), the trained tensors they come from
    (``state``, as in the task's package) and, for a task outside the pass, its own network (``model``)."""

    name: str
    version: str
    num_classes: int
    prompts: Dict[int, torch.Tensor]
    updates: Dict[str, Update]
    head: Callable[[torch.Tensor], torch.Tensor]
    state: Dict[str, torch.Tensor]
    nbytes: int
    model: Optional[TaskModel] = None
    #: a linear head's weight and bias (heads of one width are then applied together, one batched matmul)
    linear_head: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = field(default=None, repr=False)
    layout: Optional["TaskLayout"] = field(default=None, repr=False)
    spec: Optional[TaskSpec] = field(default=None, repr=False)
    origin: Optional[Path] = None

    @property
    def one_pass(self) -> bool:
        """Whether the task runs in the shared one pass (else through its own ``model``)."""
        return self.model is None

    def task_model(self) -> TaskModel:
        """The task as a :class:`TaskModel` on a weight-sharing copy of the shared model (its own ``model`` for a
        task outside the pass; else built now from ``state``: the reference each row of the pass equals)."""
        if self.model is not None:
            return self.model
        assert self.layout is not None and self.spec is not None
        return self.layout.own_model(self.spec, self.state, self.origin or Path(self.name))


class TaskLayout:
    """How the tasks of one shape (:func:`shape_signature`) sit on the shared backbone ``shared`` (its timm model
    trained as ``identity``; ``copy`` makes weight-sharing copies of that model): the trained keys and shapes
    they hold (``expected``) and, if they can be data in the one pass (``one_pass``), where each tensor goes.
    Building one costs a network on the ``meta`` device and one on a weight-sharing copy (tens of ms); binding a
    task costs no module (but a registered head's). ``origin``: the file whose spec it is, named by errors.

    ``spec`` comes from a file someone else made, so the network is built as loading a task builds it: first on the
    ``meta`` device, within the caps of :func:`~vpt_lightning.sharing.trust.bounded_construction`
    (:func:`~vpt_lightning.task_model.trained_tensor_shapes`), then on the copy within the same caps, each time with
    the method's ``config_for_saved_tensors`` (the trained tensors come from the file: nothing is fetched or read to
    start them); the keys and shapes must agree."""

    def __init__(
        self,
        spec: TaskSpec,
        shared: PromptedBackbone,
        identity: Mapping[str, Any],
        copy: Optional[Callable[[], nn.Module]] = None,
        origin: str = "the task",
    ) -> None:
        self.shared = shared
        self.identity = dict(identity)
        self.spec = spec
        #: a weight-sharing copy of the shared model (the store's, taken between passes)
        self.copy = copy or (lambda: weight_sharing_copy(shared.model))
        method, tuning = parse_tuning(spec.tuning)
        self.method, self.tuning = method, method.config_for_saved_tensors(tuning)
        implied = trained_tensor_shapes(spec, origin)  # sizes within the caps before anything is allocated
        with file_network_construction(origin, meta=False):
            template = build_task_model(spec, model=self.copy(), identity=identity, saved_tensors=True)
        if any(p.requires_grad for p in shared.model.parameters()):
            shared.model.requires_grad_(False)
            raise ValueError(f"{origin}: tuning={tuning.name} unfreezes backbone weights; it cannot share them")
        #: trained key -> shape, what every package of this shape holds (no more, no less)
        self.expected: Dict[str, Tuple[int, ...]] = trained_shapes(template)
        if self.expected != implied:
            raise ValueError(
                f"{origin}: its task's tensors on the shared backbone ({sorted(self.expected.items())[:4]}...) are not "
                f"the ones its own backbone entry implies ({sorted(implied.items())[:4]}...)"
            )
        template.requires_grad_(False).eval()
        state = template.state_dict(keep_vars=True)
        self.num_features = int(template.backbone.num_features)
        names = {id(t): k for k, t in state.items() if k in self.expected}

        def key_of(tensor: Optional[torch.Tensor]) -> Optional[str]:
            return names.get(id(tensor)) if tensor is not None else None

        self.prompt_blocks: Dict[int, int] = {}
        self.tokens_key: Optional[str] = None
        self.projection: Optional[Tuple[str, Optional[str]]] = None
        self.sites: Dict[str, UpdateSite] = {}
        self.head_ops: Optional[List[HeadOp]] = None
        self.one_pass = self._read_recipe(template, key_of)

    def _read_recipe(self, template: TaskModel, key_of: Callable) -> bool:
        """Fill the one-pass recipe from the template; ``False`` when the task must keep its own network."""
        prompted = template.backbone
        if not (blocks_fit(self.shared) and joins_with_prompts(prompted)):
            return False
        sites = update_sites(self.shared.model, prompted.model, key_of)
        if sites is None:
            return False
        self.sites = sites
        used = {k for site in sites.values() for k in site.keys()}
        if prompted.prompt_config.enabled:
            prompts = prompted.prompts
            self.tokens_key = key_of(prompts.tokens)
            if self.tokens_key is None:
                return False
            used.add(self.tokens_key)
            if type(prompts.proj) is nn.Linear:
                weight, bias = key_of(prompts.proj.weight), key_of(prompts.proj.bias)
                if weight is None or (prompts.proj.bias is not None and bias is None):
                    return False
                self.projection = (weight, bias)
                used |= {weight, bias} - {None}
            elif type(prompts.proj) is not nn.Identity:
                return False
            self.prompt_blocks = dict(prompted.prompt_sets)
        self.head_ops = _head_ops(template.head, key_of)
        if self.head_ops is not None:
            used |= {k for op in self.head_ops for k in op[1:] if k}
        else:  # a registered head: rebuilt per task from its own tensors
            used |= {k for k in self.expected if k.startswith("head.")}
        return used == set(self.expected)  # a trained tensor the recipe does not place: not data in the pass

    # ---- binding one task's tensors ------------------------------------------------------------------------
    def bind(
        self, name: str, version: str, spec: TaskSpec, state: Dict[str, torch.Tensor], origin: Path
    ) -> TaskTensors:
        """One task's :class:`TaskTensors` from its checked trained tensors ``state`` (on the shared model's device
        and dtype)."""
        if not self.one_pass:
            model = self.own_model(spec, state, origin)
            return TaskTensors(
                name,
                version,
                spec.num_classes,
                {},
                {},
                model.head,
                state,
                _own_bytes(model, self.shared.model),
                model=model,
                spec=spec,
                origin=origin,
            )
        prompts: Dict[int, torch.Tensor] = {}
        if self.tokens_key is not None:
            tokens = state[self.tokens_key]
            if self.projection is not None:
                weight, bias = self.projection
                tokens = F.linear(tokens, state[weight], state[bias] if bias else None)
            prompts = {block: tokens[index] for block, index in self.prompt_blocks.items()}
        updates = {module: bind_update(site, state) for module, site in self.sites.items()}
        own: List[torch.Tensor] = [*state.values(), *prompts.values()]
        linear = None
        if self.head_ops is not None:
            head = _head_function(self.head_ops, state)
            if len(self.head_ops) == 1:
                _, weight, bias = self.head_ops[0]
                linear = (state[weight], state[bias] if bias else None)
        else:
            module = build_head(spec.head, self.method, self.tuning, self.num_features, spec.num_classes)
            module.load_state_dict({k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")})
            like = next(t for t in state.values() if t.is_floating_point())
            head = module.to(device=like.device, dtype=like.dtype).requires_grad_(False).eval()
            own += list(module.state_dict().values())
        return TaskTensors(
            name,
            version,
            spec.num_classes,
            prompts,
            updates,
            head,
            state,
            distinct_bytes(own),
            linear_head=linear,
            layout=self,
            spec=spec,
            origin=origin,
        )

    def own_model(self, spec: TaskSpec, state: Dict[str, torch.Tensor], origin: Path) -> TaskModel:
        """The task's own :class:`TaskModel` on a weight-sharing copy of the shared model."""
        record = TaskRecord(origin, spec, state, self.identity, {})
        model = assemble(record, model=self.copy(), identity=self.identity)
        device = next(iter(state.values())).device if state else torch.device("cpu")
        return model.requires_grad_(False).eval().to(device)


def _own_bytes(model: nn.Module, shared: nn.Module) -> int:
    held = {t.untyped_storage().data_ptr() for t in shared.state_dict().values()}
    return distinct_bytes([t for t in model.state_dict().values() if t.untyped_storage().data_ptr() not in held])


def _head_ops(head: nn.Module, key_of: Callable) -> Optional[List[HeadOp]]:
    """The method's head as a list of ops (a linear layer, or ``tuning=mlp``'s Linear/ReLU stack); ``None`` for
    another head (rebuilt as a module per task)."""
    layers = list(head) if type(head) is nn.Sequential else [head]
    ops: List[HeadOp] = []
    for layer in layers:
        if type(layer) is nn.Linear:
            weight, bias = key_of(layer.weight), key_of(layer.bias) if layer.bias is not None else None
            if weight is None or (layer.bias is not None and bias is None):
                return None
            ops.append(("linear", weight, bias))
        elif type(layer) is nn.ReLU:
            ops.append(("relu",))
        elif type(layer) not in (nn.Identity, nn.Dropout):  # no-ops in evaluation
            return None
    return ops


def _head_function(ops: Sequence[HeadOp], state: Mapping[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    bound = [(op[0], state[op[1]], state[op[2]] if op[2] else None) if op[0] == "linear" else ("relu",) for op in ops]

    def head(features: torch.Tensor) -> torch.Tensor:
        for op in bound:
            features = F.linear(features, op[1], op[2]) if op[0] == "linear" else F.relu(features)
        return features

    return head


def classify(shared: PromptedBackbone, tasks: Sequence[TaskTensors], images: torch.Tensor, task_index: torch.Tensor):
    """Logits ``(B, C_max)`` of a batch whose row ``b`` belongs to ``tasks[task_index[b]]``: its logits in the first
    ``C`` columns, ``-inf`` after them (a softmax over the row gives that task's probabilities).

    Tasks in the pass run together in one pass of ``shared`` (:func:`~vpt_lightning.serving.mixed_pass.mixed_features`);
    the others run their rows through their own network. When the shared blocks cannot run the pass now (a forward
    hook, e.g. a profiler's, would not see it), every task runs through its own network.
    """
    task_index = task_index.to(images.device)
    present = [int(t) for t in torch.unique(task_index).tolist()]
    together = shares_blocks(shared)
    one_pass = [t for t in present if tasks[t].one_pass] if together else []
    features: Optional[torch.Tensor] = None
    if one_pass:
        rows = torch.isin(task_index, torch.tensor(one_pass, device=images.device))
        every = bool(rows.all())
        out = mixed_features(
            shared,  # type: ignore[arg-type]
            [t.prompts for t in tasks],
            [t.updates for t in tasks],
            images if every else images[rows],
            task_index if every else task_index[rows],
        )
        if every:
            features = out
        else:
            features = out.new_empty(images.shape[0], out.shape[1])
            features[rows] = out
    own: Dict[int, TaskModel] = {}
    for t in present:  # the other tasks: one pass each, through the task's own network
        if t in one_pass:
            continue
        own[t] = tasks[t].task_model()
        rows = task_index == t
        out = own[t].backbone(images[rows])
        if features is None:
            features = out.new_empty(images.shape[0], out.shape[1])
        features[rows] = out
    assert features is not None
    logits = features.new_full((images.shape[0], max(tasks[t].num_classes for t in present)), float("-inf"))
    linear: Dict[int, List[int]] = {}  # width -> tasks with a linear head of that width (one batched matmul each)
    for t in present:
        if t not in own and tasks[t].linear_head is not None:
            linear.setdefault(tasks[t].num_classes, []).append(t)
    for width, group in linear.items():
        if len(group) > 1:
            _linear_heads(tasks, group, features, task_index, logits[:, :width])
    for t in present:
        if t in own or tasks[t].linear_head is None or len(linear[tasks[t].num_classes]) == 1:
            rows = task_index == t
            head = own[t].head if t in own else tasks[t].head
            logits[rows, : tasks[t].num_classes] = head(features[rows]).to(logits.dtype)
    return logits


def _linear_heads(
    tasks: Sequence[TaskTensors],
    group: Sequence[int],
    features: torch.Tensor,
    task_index: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """The linear heads of one width of the tasks ``group`` on their rows, one batched matmul: ``out[rows]``."""
    slot = torch.full((len(tasks),), -1, dtype=torch.long, device=features.device)
    slot[torch.tensor(group, device=features.device)] = torch.arange(len(group), device=features.device)
    rows = torch.nonzero(slot[task_index] >= 0).squeeze(1)
    picked = slot[task_index[rows]]
    weight = torch.stack([tasks[t].linear_head[0] for t in group])[picked]  # type: ignore[index]
    biases = [tasks[t].linear_head[1] for t in group]  # type: ignore[index]
    bias = torch.stack([b if b is not None else weight.new_zeros(weight.shape[1]) for b in biases])[picked]
    logits = torch.baddbmm(bias.unsqueeze(2), weight, features[rows].unsqueeze(2).to(weight.dtype)).squeeze(2)
    out[rows] = logits.to(out.dtype)
