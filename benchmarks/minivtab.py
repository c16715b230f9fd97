"""mini-VTAB end to end in one command: vpt-tune over 4 procedural tasks x 7 tuning strategies, then vpt-report.

    python benchmarks/minivtab.py [--out outputs/minivtab]

Tasks (on the packaged pretrained mini ViT): kind (the kind of a single shape: natural-like, close to the upstream
question) and count, location, orientation (structured-like). Strategies: vpt_deep, vpt_shallow, linear, full,
bias, adapter, lora. Each cell: a 2-point lr sweep on the tune split, the selected lr retrained on train+val, the test top-1 at the
last epoch. Re-running resumes (finished runs are kept).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

TASKS = "kind,count,location,orientation"
TUNINGS = "vpt_deep,vpt_shallow,linear,full,bias,adapter,lora"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/minivtab"))
    parser.add_argument("--tasks", default=TASKS, help=f"comma-separated synthetic tasks (default {TASKS})")
    parser.add_argument("--tunings", default=TUNINGS, help=f"comma-separated strategies (default {TUNINGS})")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    start = time.time()
    subprocess.run([str(bin_dir / "vpt-tune"), "-m", "+experiment=minivtab", f"data.task={args.tasks}", f"tuning={args.tunings}",
                    f"paths.output_dir={args.out}", *args.overrides], check=True)
    subprocess.run([str(bin_dir / "vpt-report"), str(args.out)], check=True)
    print(f"mini-VTAB wall time: {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
