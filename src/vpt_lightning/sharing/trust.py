"""The checks a file someone else made (a task package, a task ``.ckpt``) passes before anything in it is used.

Such a file is data, never code (``docs/security.md``). Besides what its loaders already refuse (pickled code,
imports, downloads, files it names), these checks bound what its values may cost and change:

- :func:`bounded_construction`: the network its config describes is built on the ``meta`` device first (no memory),
  and stopped once its parameters and buffers pass :func:`memory_cap` or its modules pass :data:`MAX_MODULES`;
- :func:`safetensors_shapes`: a ``model.safetensors`` header's tensor names and shapes, read without loading them;
- :func:`check_tensor_shapes`: a file's tensors against the ones its task trains (no other key: never the shared
  backbone's weights), in the shapes its config implies;
- :func:`check_finite`: no NaN or infinite value;

Every refusal is a ``ValueError`` whose message names the file, what is wrong and the rule.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

# what the network a file describes may hold in parameters and buffers (ViT-H/14 is 2.5 GB in float32, ViT-G/14
# 7.3 GB); the memory available now lowers it (memory_cap)
MAX_MODEL_BYTES = 8 << 30
# modules of that network (ViT-G/14: about 700), so that building even its meta copy stays a matter of seconds
MAX_MODULES = 4096


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation now (``psutil``), or ``None`` where psutil is not installed."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def memory_cap() -> int:
    """The bytes a file's network may hold: :data:`MAX_MODEL_BYTES`, or less when less memory is available."""
    available = available_memory()
    return MAX_MODEL_BYTES if available is None else min(MAX_MODEL_BYTES, available)


@contextlib.contextmanager
def bounded_construction(
    origin: str, max_bytes: Optional[int] = None, max_modules: int = MAX_MODULES
) -> Iterator[Dict[str, int]]:
    """Count the bytes of every parameter and buffer and every submodule registered by modules built in this thread
    inside the block (build them on the ``meta`` device: nothing is allocated), and stop the build with a
    ``ValueError`` naming ``origin`` and the cap as soon as one is passed. Yields the running counts."""
    cap = memory_cap() if max_bytes is None else max_bytes
    counts = {"bytes": 0, "modules": 0}
    thread = threading.get_ident()

    def count_tensor(module, name, tensor):
        if tensor is None or threading.get_ident() != thread:
            return None
        counts["bytes"] += tensor.numel() * tensor.element_size()
        if counts["bytes"] > cap:
            raise ValueError(
                f"{origin} describes a network whose parameters and buffers pass {cap / 2**30:.1f} GiB, the cap "
                "(trust.MAX_MODEL_BYTES, or the memory available now if less); refused before anything was allocated"
            )
        return None

    def count_module(module, name, submodule):
        if submodule is None or threading.get_ident() != thread:
            return None
        counts["modules"] += 1
        if counts["modules"] > max_modules:
            raise ValueError(
                f"{origin} describes a network of more than {max_modules} modules, the cap (trust.MAX_MODULES); "
                "refused before anything was allocated"
            )
        return None

    hooks = [
        torch.nn.modules.module.register_module_parameter_registration_hook(count_tensor),
        torch.nn.modules.module.register_module_buffer_registration_hook(count_tensor),
        torch.nn.modules.module.register_module_module_registration_hook(count_module),
    ]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()


def safetensors_shapes(path: os.PathLike, origin: Optional[str] = None) -> Dict[str, Tuple[int, ...]]:
    """The tensor names and shapes of a safetensors file, from its header only (nothing is loaded); a ``ValueError``
    naming the file (``origin``, default ``path``: e.g. the package's path of a file opened as ``/proc/self/fd/N``)
    when it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{origin or str(path)!r} is not a safetensors file ({err}); a task package's weights are read as "
            "safetensors only, never unpickled"
        ) from None


def _show(items: Sequence[str], shown: int = 6) -> str:
    return ", ".join(items[:shown]) + (f" ... ({len(items)} in all)" if len(items) > shown else "")


def check_tensor_shapes(found: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]], origin: str) -> None:
    """Refuse a file whose tensors are not exactly the ones its task trains (``expected``: names -> shapes, as its
    config implies): a tensor outside them (e.g. a weight of the frozen backbone, which other tasks share) is never
    loaded, and a missing or mis-shaped one means the config and the tensors disagree."""
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise ValueError(
            f"{origin} holds tensors outside the ones its task trains: {_show(unexpected)}; a task file carries only "
            "what its tuning method trains (prompts, head, the method's own tensors; backbone weights only for "
            "methods that train them, on the task's own backbone), so it was not loaded"
        )
    missing = sorted(set(expected) - set(found))
    mismatched = [
        f"{k}: file {tuple(found[k])} vs config {tuple(expected[k])}"
        for k in sorted(set(found) & set(expected))
        if tuple(found[k]) != tuple(expected[k])
    ]
    if missing or mismatched:
        parts = ([f"missing tensors {_show(missing)}"] if missing else []) + (
            [f"shape mismatches {_show(mismatched)}"] if mismatched else []
        )
        raise ValueError(f"{origin} does not fit the model its config describes: {'; '.join(parts)}")


def check_finite(tensors: Mapping[str, torch.Tensor], origin: str) -> None:
    """Refuse NaN or infinite values (every answer of the task would be NaN, or fail), naming the first tensor."""
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{origin}: {key!r} holds a {type(tensor).__name__}, not a tensor")
        if (tensor.is_floating_point() or tensor.is_complex()) and not _all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{origin}: tensor {key!r} has {bad} value(s) that are not finite (NaN or inf)")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite: numpy's check for a CPU tensor (one thread, microseconds; torch's parallel
    kernel woke its thread pool for each tensor, ~20 ms a tensor on a loaded machine), else torch's."""
    if tensor.device.type != "cpu" or tensor.is_complex():
        return bool(torch.isfinite(tensor).all())
    values = tensor.detach()
    if values.dtype not in (torch.float16, torch.float32, torch.float64):  # bfloat16, float8...: no numpy dtype
        values = values.float()
    return bool(np.isfinite(values.numpy()).all())
