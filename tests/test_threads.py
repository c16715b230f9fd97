"""The console scripts' thread count (vpt_lightning.runs.threads): the usable CPUs less the busy ones, at least 1, never
more than torch's count, and the user's OMP_NUM_THREADS kept."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from vpt_lightning import threads
from vpt_lightning.runs.threads import choose_threads, configure_threads, user_thread_setting


@pytest.mark.parametrize(
    "cpus, busy, current, expected",
    [
        (2, 0.0, 2, 2),  # an idle machine: torch's own count
        (2, 0.4, 2, 2),  # a little background work rounds to no busy CPU
        (2, 0.6, 2, 1),
        (2, 2.7, 2, 1),  # every CPU busy (the load 2.7-5.2 on 2 cores): still 1 thread
        (2, 5.2, 2, 1),
        (8, 3.0, 8, 5),
        (8, 0.0, 4, 4),  # never more than torch's count (e.g. its physical cores, or the user's set_num_threads)
        (1, 0.0, 2, 1),  # one CPU in the affinity mask
    ],
)
def test_the_thread_count_is_the_free_cpus(cpus, busy, current, expected):
    assert choose_threads(cpus, busy, current) == expected


def test_the_users_thread_variables_are_recognised():
    assert user_thread_setting({"OMP_NUM_THREADS": "3"}) == "OMP_NUM_THREADS=3"
    assert user_thread_setting({"MKL_NUM_THREADS": " 2 "}) == "MKL_NUM_THREADS=2"
    assert user_thread_setting({"OMP_NUM_THREADS": ""}) is None
    assert user_thread_setting({"PATH": "/bin"}) is None


@pytest.fixture
def torch_threads():
    """torch's thread count set to 2 for the test (more than a loaded machine's 1, whatever count the suite's process
    runs with: 1 in each of two pytest-xdist workers), restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def test_a_loaded_machine_gets_one_thread_and_an_explicit_omp_num_threads_is_kept(torch_threads, monkeypatch, caplog):
    """Every usable CPU busy: 1 thread, logged at INFO; OMP_NUM_THREADS in the environment (the user's choice):
    torch's count is left as it is."""
    cpus = len(threads.usable_cpus())
    monkeypatch.setattr(threads, "busy_cpus", lambda cpus, seconds=0: float(len(cpus)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    with caplog.at_level(logging.INFO, logger="vpt_lightning.runs.threads"):
        assert configure_threads() == 1 == torch.get_num_threads()
        torch.set_num_threads(torch_threads)
        monkeypatch.setenv("OMP_NUM_THREADS", str(torch_threads))
        assert configure_threads() == torch_threads == torch.get_num_threads()
    messages = [r.getMessage() for r in caplog.records if r.name == "vpt_lightning.runs.threads"]
    assert messages[0].startswith(f"torch threads: 1 ({cpus} usable CPUs, {cpus:.1f} busy")
    assert messages[1] == f"torch threads: {torch_threads} (OMP_NUM_THREADS={torch_threads})"


def test_a_process_allowed_one_cpu_gets_one_thread(torch_threads, monkeypatch):
    """The affinity mask (as ``taskset -c 0``) bounds the count, whatever the load."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(affinity)})
    try:
        assert threads.usable_cpus() == [min(affinity)]
        assert configure_threads() == 1 == torch.get_num_threads()
    finally:
        os.sched_setaffinity(0, affinity)


def test_the_busy_cpus_never_exceed_the_load_average_or_the_cpu_count(monkeypatch):
    """The real /proc/stat sample, capped by the load average (a command that just ended inflates the load average
    but not the sample; a moment's burst inflates the sample but not the load average)."""
    cpus = threads.usable_cpus()
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert threads.busy_cpus(cpus, seconds=0.05) == 0.0
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (100.0, 100.0, 100.0))
    assert 0.0 <= threads.busy_cpus(cpus, seconds=0.05) <= len(cpus)
