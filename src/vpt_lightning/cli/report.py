"""``vpt-report DIR... [--out OUT]``: gather ``vpt-tune`` summaries (and segmentation runs) into the paper's tables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..protocol.report import find_segmentation_results, find_summaries, write_report
from .console import plain_text, report_errors


@report_errors("vpt-report")
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vpt-report", description=plain_text(__doc__))
    parser.add_argument(
        "dirs",
        nargs="+",
        type=Path,
        help="folders searched for summary.json (vpt-tune outputs) and segmentation results.json (vpt-train)",
    )
    parser.add_argument("--out", type=Path, help="where to write report.md/.csv/.png (default: the first folder)")
    args = parser.parse_args(argv)
    paths = write_report(find_summaries(args.dirs), args.out or args.dirs[0], find_segmentation_results(args.dirs))
    print(paths["md"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
