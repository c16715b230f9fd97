"""mini-VTAB with its wall time: ``vpt-tune -m +experiment=minivtab`` (the 4 tasks x 7 strategies that the packaged
experiment sweeps), then ``vpt-report``. The two commands ship with the package; this only times them.

    python benchmarks/minivtab.py [--out outputs/minivtab] [--tasks kind,count] [--tunings vpt_deep,linear] \
        [OVERRIDE...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/minivtab"))
    parser.add_argument("--tasks", help="comma-separated synthetic tasks (default: the experiment's four)")
    parser.add_argument("--tunings", help="comma-separated strategies (default: the experiment's seven)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    chosen = [f"data.task={args.tasks}"] * bool(args.tasks) + [f"tuning={args.tunings}"] * bool(args.tunings)
    start = time.time()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "vpt_lightning.cli.tune",
            "-m",
            "+experiment=minivtab",
            *chosen,
            f"paths.output_dir={args.out}",
            *args.overrides,
        ],
        check=True,
    )
    subprocess.run([sys.executable, "-m", "vpt_lightning.cli.report", str(args.out)], check=True)
    print(f"mini-VTAB wall time: {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
