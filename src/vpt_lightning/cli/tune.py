"""``vpt-tune``: sweep -> select on val -> final runs over seeds, for one task and tuning strategy.

``--force`` (anywhere on the command line) is ``protocol.restart=true``: a run folder whose files do not fit the
job (another config, unreadable, unsafe) is started afresh instead of stopping the protocol.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

from ..config import register_resolvers
from ..protocol.task_protocol import run_protocol, summary_markdown
from ..runs.threads import configure_threads
from ..runs.tracking import log_protocol_summary
from .console import hydra_command

register_resolvers()


@hydra_command("vpt-tune", config_name="tune")
def _main(cfg: DictConfig) -> float:
    """Run the protocol in the Hydra run folder (re-running the same command resumes it)."""
    configure_threads()
    summary = run_protocol(cfg, Path(cfg.run_dir))
    log_protocol_summary(cfg, summary)
    print(summary_markdown(summary), flush=True)
    return float(summary["test_top1"]["mean"])


def main() -> None:
    """The console script: ``--force`` becomes ``protocol.restart=true``, the rest goes to Hydra."""
    if "--force" in sys.argv[1:]:
        sys.argv = [sys.argv[0], *(a for a in sys.argv[1:] if a != "--force"), "protocol.restart=true"]
    _main()


if __name__ == "__main__":
    main()
