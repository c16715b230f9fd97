"""``vpt-train``: the Hydra entry point (configs in ``vpt_lightning/conf``)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from ..config import register_resolvers
from ..integrity import RunIntegrityError
from ..locking import FolderLockedError
from ..training import train

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Train (and test) one configuration; returns the test top-1 for Hydra sweepers."""
    try:
        results = train(cfg)
    except (RunIntegrityError, FolderLockedError) as err:  # the user's to fix: the message, not a traceback
        sys.exit(f"vpt-train: error: {err}")
    return float(results.get("test/top1", results.get("val/top1", 0.0)))


if __name__ == "__main__":
    main()
