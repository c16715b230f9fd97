"""``vpt-tune``: sweep -> select on val -> final runs over seeds, for one task and tuning strategy."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ..config import register_resolvers
from ..protocol import run_protocol, summary_markdown
from ..tracking import log_protocol_summary

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="tune")
def main(cfg: DictConfig) -> float:
    """Run the protocol in the Hydra run folder (re-running the same command resumes it)."""
    summary = run_protocol(cfg, Path(cfg.run_dir))
    log_protocol_summary(cfg, summary)
    print(summary_markdown(summary), flush=True)
    return float(summary["test_top1"]["mean"])


if __name__ == "__main__":
    main()
