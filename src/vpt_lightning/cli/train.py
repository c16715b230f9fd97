"""``vpt-train``: the Hydra entry point (configs in ``vpt_lightning/conf``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ..config import register_resolvers
from ..training import train

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Train (and test) one configuration; returns the test top-1 for Hydra sweepers."""
    results = train(cfg)
    return float(results.get("test/top1", results.get("val/top1", 0.0)))


if __name__ == "__main__":
    main()
