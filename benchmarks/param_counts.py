"""Trainable parameters of every tuning method on ViT-B/16 (random init: the counts do not depend on the weights).

    python benchmarks/param_counts.py [--num-classes 100] [--num-tokens 10]

Builds ``VPTModule`` for ``vit_base_patch16_224`` (``pretrained=false``) with each method's default options and
prints a Markdown table: trainable parameters with the head, the head alone, and the share of the backbone (86 M).
"""

from __future__ import annotations

import argparse

from vpt_lightning import VPTModule

# (label, tuning options, prompt tokens); the paper's Adapter reductions, Partial-1, MLP-3, LoRA rank 8 on qkv
ROWS = [
    ("linear", {"method": "linear"}, 0),
    ("mlp (3 layers)", {"method": "mlp", "mlp_layers": 3}, 0),
    ("partial (k=1)", {"method": "partial", "last_blocks": 1}, 0),
    ("bias", {"method": "bias"}, 0),
    ("full", {"method": "full"}, 0),
    ("sidetune", {"method": "sidetune", "side_weights": "random"}, 0),
    ("adapter (r=8)", {"method": "adapter", "reduction": 8}, 0),
    ("adapter (r=64)", {"method": "adapter", "reduction": 64}, 0),
    ("adapter (r=256)", {"method": "adapter", "reduction": 256}, 0),
    ("lora (r=8, qkv)", {"method": "lora", "rank": 8}, 0),
    ("vpt_shallow", {"method": "vpt_shallow"}, -1),
    ("vpt_deep", {"method": "vpt_deep"}, -2),
    ("vpt_bias (deep)", {"method": "vpt_bias"}, -2),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--num-tokens", type=int, default=10, help="prompt length of the VPT rows")
    args = parser.parse_args()
    backbone = {"name": "vit_base_patch16_224", "pretrained": False, "init_seed": 0}
    head = None
    print("| method | trainable params (with head) | % of ViT-B/16 |\n|---|---|---|")
    for label, tuning, tokens in ROWS:
        prompt = {"num_tokens": args.num_tokens, "deep": tokens == -2} if tokens else {"num_tokens": 0}
        module = VPTModule(args.num_classes, backbone, prompt, tuning=tuning)
        counts = module.parameter_counts()
        head = sum(p.numel() for p in module.head.parameters()) if label == "linear" else head
        print(f"| {label} | {counts['trainable_params']:,} | {counts['trainable_percent']:.2f} |", flush=True)
    print(
        f"\nlinear head alone: {head:,}; ViT-B/16 backbone: {counts['backbone_params']:,} parameters; "
        f"{args.num_classes} classes, VPT p={args.num_tokens}"
    )


if __name__ == "__main__":
    main()
