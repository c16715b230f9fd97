"""The two attention kernels timm chooses between (``fused_attn``), forward and backward, in raw torch (no timm, no
Lightning: it runs on any torch, e.g. another minor in a bare environment).

    python benchmarks/attention_kernels.py                     # ViT-S/16's key/value block, bf16
    python benchmarks/attention_kernels.py --dtype float32 --heads 12 --head-dim 64   # ViT-B/16 in fp32

``F.scaled_dot_product_attention`` (on the CPU its flash kernel) against timm's explicit
``softmax(q * scale @ k^T) @ v``, on the tensors a key/value block makes: q a linear layer's output ``(B, N, H, D)``
seen as ``(B, H, N, D)``, keys and values the prompts' and image tokens' concatenated, contiguous ``(B, H, p + N,
D)``. The two alternate call by call; one JSON line: the median ms of each pass after a few warm-up calls, and the
torch version.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=197, help="image tokens (class token and 14 x 14 patches)")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--calls", type=int, default=30, help="timed calls of each kernel, after 5 warm-up calls")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    batch, heads, dim, queries = args.batch, args.heads, args.head_dim, args.queries
    keys = queries + args.prompts
    q_leaf = torch.randn(batch, queries, heads, dim, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, heads, keys, dim, dtype=dtype, requires_grad=True) for _ in range(2))
    grad = torch.randn(batch, queries, heads, dim, dtype=dtype).transpose(1, 2)
    kernels = {"fused": fused, "explicit": explicit}
    times = {f"{name}_{part}": [] for name in kernels for part in ("forward", "backward")}
    for call in range(5 + args.calls):
        for name, kernel in kernels.items():
            for leaf in (q_leaf, k, v):
                leaf.grad = None
            start = time.perf_counter()
            out = kernel(q_leaf.transpose(1, 2), k, v, dim**-0.5)
            middle = time.perf_counter()
            out.backward(grad)
            end = time.perf_counter()
            if call >= 5:
                times[f"{name}_forward"].append(middle - start)
                times[f"{name}_backward"].append(end - middle)
    result = {key: round(statistics.median(values) * 1e3, 3) for key, values in times.items()}
    result.update(torch=torch.__version__, threads=torch.get_num_threads(), dtype=args.dtype, shape=vars(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
