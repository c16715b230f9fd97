"""``vpt-train``: the Hydra entry point (configs in ``vpt_lightning/conf``)."""

from __future__ import annotations

from omegaconf import DictConfig

from ..config import register_resolvers
from ..runs.threads import configure_threads
from ..runs.training import train
from .console import hydra_command

register_resolvers()


@hydra_command("vpt-train", config_name="train")
def main(cfg: DictConfig) -> float:
    """Train (and test) one configuration; returns the test top-1 for Hydra sweepers."""
    configure_threads()
    results = train(cfg)
    return float(results.get("test/top1", results.get("val/top1", 0.0)))


if __name__ == "__main__":
    main()
