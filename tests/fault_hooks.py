"""``python fault_hooks.py N ARGS...``: ``vpt-tune ARGS`` on a disk that fills up at the N-th atomic write (0: never).

From the N-th file that :mod:`vpt_lightning.runs.atomic` writes on, flushing it to disk fails with ``ENOSPC`` (as a full
disk reports it at ``write`` or ``fsync``), and so does every later one. test_faults.py checks that the results
written before it survive whole and that a re-run on a disk with room ends as an uninterrupted run.
"""

from __future__ import annotations

import errno
import os
import sys


def install(fail_from: int) -> None:
    """Make the ``fail_from``-th and every later atomic file write fail with ENOSPC (0: never)."""
    from vpt_lightning import atomic

    if fail_from <= 0:
        return

    real = atomic.fsync_path
    calls = {"files": 0}

    def fsync_on_a_filling_disk(path, directory=False):
        if not directory:
            calls["files"] += 1
            if calls["files"] >= fail_from:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, directory)

    atomic.fsync_path = fsync_on_a_filling_disk


if __name__ == "__main__":
    install(int(sys.argv[1]))
    sys.argv = ["vpt-tune", *sys.argv[2:]]
    from vpt_lightning.cli.tune import main

    main()
