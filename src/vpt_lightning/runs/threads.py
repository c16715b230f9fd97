"""How many threads torch computes with in a console script: the CPUs this process may use, less those that other
work on the machine keeps busy (at least 1, never more than torch's own count), unless the user chose the count.

torch's CPU kernels run on OpenMP threads, one per core by default, and GNU OpenMP (libgomp, which torch's wheels
bundle) spins while a thread waits for the others. On a machine that other jobs keep busy, a thread that loses its
core holds up the others, which spin meanwhile: measured on 2 cores at a load of about 4, a short training took
several times longer with 2 threads than with 1, and burnt more CPU (docs/getting-started.md, "Threads on a busy
machine"). ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) set by the user is left alone.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

# the variables torch reads for its thread count at start-up: a value there is the user's choice
USER_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2 CPU quota: "<quota> <period>" or "max <period>"
SAMPLE_SECONDS = 0.25  # how long the CPUs' busy time is sampled from /proc/stat


def choose_threads(cpus: int, busy: float, current: int) -> int:
    """The thread count for ``cpus`` usable CPUs of which ``busy`` are kept busy by other work (``busy`` rounded to
    the nearest whole CPU): ``cpus - busy``, at least 1 and never more than ``current`` (torch's count now)."""
    return max(1, min(current, cpus - int(busy + 0.5)))


def user_thread_setting(environ: Mapping[str, str]) -> Optional[str]:
    """``NAME=VALUE`` of the first thread variable the user set (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``), or None."""
    for name in USER_THREAD_VARIABLES:
        if environ.get(name, "").strip():
            return f"{name}={environ[name].strip()}"
    return None


def usable_cpus() -> Sequence[int]:
    """The CPUs this process may run on (its affinity), the first ones only when a cgroup v2 quota allows fewer."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = cpus[: max(1, -(-int(quota) // int(period)))]  # a quota of 1.5 CPUs lets 2 threads run
    except (OSError, ValueError):
        pass
    return cpus


def _cpu_times() -> Dict[int, tuple]:
    """``{cpu: (busy, total)}`` jiffies from ``/proc/stat`` (idle and iowait count as idle)."""
    times = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields[:8]]
            idle = values[3] + values[4]
            times[int(name[3:])] = (sum(values) - idle, sum(values))
    return times


def busy_cpus(cpus: Sequence[int], seconds: float = SAMPLE_SECONDS) -> float:
    """How many of ``cpus`` other work keeps busy: the smaller of the 1-minute load average (capped at their
    number) and their busy time over the next ``seconds`` (this process sleeps meanwhile), sampled only when the
    load average says a CPU is busy. The load average alone still counts a command that ended a moment ago, and
    the machine's other CPUs; the sample alone may catch a moment's burst or lull."""
    estimates = []
    try:
        estimates.append(min(float(len(cpus)), os.getloadavg()[0]))
    except (OSError, AttributeError):  # no load average on this platform
        pass
    if estimates and estimates[0] < 0.5:  # idle by the load average, whatever a sample would say
        return estimates[0]
    try:
        before = _cpu_times()
        time.sleep(seconds)
        after = _cpu_times()
        busy = sum(after[c][0] - before[c][0] for c in cpus)
        total = sum(after[c][1] - before[c][1] for c in cpus)
        if total > 0:
            estimates.append(len(cpus) * busy / total)
    except (OSError, KeyError, ValueError):  # no /proc/stat (not Linux): the load average alone
        pass
    return min(estimates) if estimates else 0.0


def configure_threads(environ: Mapping[str, str] = os.environ) -> int:
    """Set torch's intra-op thread count for this process (see the module's docstring), log the choice once at
    INFO, and return it. Called first by every console script; ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` in the
    environment are the user's choice and are kept."""
    import torch

    current = torch.get_num_threads()
    chosen = user_thread_setting(environ)
    if chosen is not None:
        log.info("torch threads: %d (%s)", current, chosen)
        return current
    cpus = usable_cpus()
    busy = busy_cpus(cpus)
    threads = choose_threads(len(cpus), busy, current)
    if threads != current:
        torch.set_num_threads(threads)
    log.info(
        "torch threads: %d (%d usable CPUs, %.1f busy with other work; OMP_NUM_THREADS=N sets it)",
        threads,
        len(cpus),
        busy,
    )
    return threads
