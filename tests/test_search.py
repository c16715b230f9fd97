"""vpt-tune protocol.search=optuna: a shared Optuna study (grid exactly once among workers, TPE, median pruning)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_RUN

optuna = pytest.importorskip("optuna")

from vpt_lightning.config import compose  # noqa: E402
from vpt_lightning.protocol.search import PRUNED_ATTR, SPARE_ATTR, OptunaPruning, open_study, search_space  # noqa: E402
from vpt_lightning.protocol.task_protocol import grid_points, point_name, run_protocol  # noqa: E402
from vpt_lightning.runs.training import train  # noqa: E402

TINY = [
    *TINY_RUN,
    "protocol.base_lr=[0.5,2]",
    "protocol.weight_decay=[0,0.001]",
    "protocol.seeds=[1]",
]


def _points(study):
    return sorted(
        (t.params["base_lr"], t.params["weight_decay"]) for t in study.get_trials() if not t.user_attrs.get(SPARE_ATTR)
    )


def test_two_processes_share_one_sqlite_study_and_run_every_grid_point_once(tmp_path):
    # the same command twice on one machine: one protocol folder, the study in it (the default storage)
    exe = Path(sys.executable).parent / "vpt-tune"
    command = [str(exe), *TINY, "protocol.search=optuna", f"paths.output_dir={tmp_path / 'out'}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    folder = tmp_path / "out" / "train" / "protocol" / "vpt_deep"
    # every grid point ran exactly once over both workers and is one trial of the study
    runs = sorted(p.parent.name for p in folder.glob("sweep/*/results.json"))
    assert runs == ["lr0.5_wd0", "lr0.5_wd0.001", "lr2_wd0", "lr2_wd0.001"]
    study = optuna.load_study(study_name="train-vpt_deep-grid", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert _points(study) == [(0.5, 0.0), (0.5, 0.001), (2.0, 0.0), (2.0, 0.001)]
    # both workers select from the whole study: the same point, with the val top-1 its run recorded; the final run
    # is trained by one of them (the other waits for its folder, then reuses it)
    summary = json.loads((folder / "summary.json").read_text())
    sel = summary["selected"]
    line = f"selected on val (last epoch): base_lr {sel['base_lr']:g}, weight_decay {sel['weight_decay']:g}"
    assert all(line in o for o in outputs)
    assert len(list(folder.glob("final/*/seed1/results.json"))) == 1
    recorded = {p.parent.name: json.loads(p.read_text())["val/top1"] for p in folder.glob("sweep/*/results.json")}
    assert {point_name(e["point"]): e["val/top1"] for e in summary["sweep"]} == pytest.approx(recorded)
    assert summary["search"]["sampler"] == "grid"


def test_a_killed_workers_point_is_failed_by_its_heartbeat_and_run_again_by_another(tmp_path):
    # worker A takes a grid point and is SIGKILLed during its run; worker B, started after, finds A's trial RUNNING,
    # fails it once its heartbeat is older than 2 s, runs the point again and ends the protocol with every point run
    exe = Path(sys.executable).parent / "vpt-tune"
    overrides = [*TINY, "protocol.search=optuna", "protocol.heartbeat_interval=1", f"paths.output_dir={tmp_path}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    worker_a = subprocess.Popen(
        [str(exe), *overrides], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    folder = tmp_path / "train" / "protocol" / "vpt_deep"
    url = f"sqlite:///{folder / 'optuna.db'}"
    try:
        deadline = time.monotonic() + 300
        # its first run folder: the trial is running and Optuna's heartbeat thread has recorded a first beat
        while not list(folder.glob("sweep/*")) and worker_a.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(worker_a.pid, signal.SIGKILL)
        worker_a.wait(timeout=60)
    killed = _running(url)
    assert len(killed) == 1, "worker A should have been killed during its first point"

    summary = run_protocol(compose(overrides, config_name="tune"), folder)  # worker B, in this process
    study = optuna.load_study(study_name="train-vpt_deep-grid", storage=url)
    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed[0]].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed[0]]
    assert len(retries) == 1 and retries[0].state.is_finished() and retries[0].state.name != "FAIL"
    assert retries[0].params == trials[killed[0]].params
    assert sorted(point_name(e["point"]) for e in summary["sweep"]) == [
        "lr0.5_wd0",
        "lr0.5_wd0.001",
        "lr2_wd0",
        "lr2_wd0.001",
    ]
    assert not [e for e in summary["sweep"] if e.get("failed")]
    assert len(list(folder.glob("sweep/*/results.json"))) == 4


def test_a_failed_point_is_a_failed_trial_logged_without_a_traceback(tmp_path, caplog):
    from vpt_lightning.protocol.search import optuna_sweep

    cfg = compose(TINY + ["protocol.search=optuna", "protocol.pruning=false"], config_name="tune")
    points = grid_points(cfg.protocol, "vpt_deep")
    boom = ValueError("data.root='/nowhere' does not exist")

    def run_point(point, extra):  # the point with lr 2 and wd 0 fails, the others reach a val top-1
        if (point["base_lr"], point["weight_decay"]) == (2.0, 0.0):
            return {"point": point, "failed": str(boom)}, boom
        return {"point": point, "val/top1": point["base_lr"] / 10 + point["weight_decay"]}, None

    with caplog.at_level(logging.WARNING, logger="optuna"):
        sweep, errors, _ = optuna_sweep(cfg, tmp_path, points, run_point)
    assert errors == [boom]
    assert sorted((e["point"]["base_lr"], e["point"]["weight_decay"], "failed" in e) for e in sweep) == [
        (0.5, 0.0, False),
        (0.5, 0.001, False),
        (2.0, 0.0, True),
        (2.0, 0.001, False),
    ]
    failed = [r for r in caplog.records if "failed with parameters" in r.getMessage()]
    assert (
        len(failed) == 1 and "base_lr 2, weight_decay 0: data.root='/nowhere' does not exist" in failed[0].getMessage()
    )
    assert failed[0].exc_info is None  # optuna would log PointFailed's traceback


def _fake_run(point):
    return {"point": point, "val/top1": point["base_lr"] / 10 + point["weight_decay"]}, None


def test_tpe_replaces_failed_trials_but_stops_when_every_run_fails(tmp_path):
    from vpt_lightning.protocol.search import optuna_sweep

    cfg = compose(TINY + ["protocol.search=optuna", "protocol.sampler=tpe", "protocol.n_trials=2"], config_name="tune")
    points = grid_points(cfg.protocol, "vpt_deep")
    calls = []

    def every_run_fails(point, extra):
        calls.append(point)
        error = ValueError("the data folder went away")
        return {"point": point, "failed": str(error)}, error

    sweep, errors, _ = optuna_sweep(cfg, tmp_path, points, every_run_fails)  # used to ask for trials for ever
    assert len(calls) == len(errors) == 2 and all(e.get("failed") for e in sweep)


def test_a_point_whose_run_was_interrupted_runs_again_when_the_command_is_repeated(tmp_path):
    from vpt_lightning.protocol.search import optuna_sweep

    cfg = compose(TINY + ["protocol.search=optuna", "protocol.pruning=false"], config_name="tune")
    points = grid_points(cfg.protocol, "vpt_deep")
    ran = []

    def interrupted_at_the_second_point(point, extra):
        ran.append(point_name(point))
        if len(ran) == 2:
            raise KeyboardInterrupt  # Ctrl+C during the second point's run
        return _fake_run(point)

    with pytest.raises(KeyboardInterrupt):
        optuna_sweep(cfg, tmp_path, points, interrupted_at_the_second_point)
    sweep, errors, _ = optuna_sweep(
        cfg, tmp_path, points, lambda point, extra: (ran.append(point_name(point)), _fake_run(point))[1]
    )
    assert errors == [] and not [e for e in sweep if e.get("failed")] and len(sweep) == 4
    assert sorted(ran[2:]) == sorted(set(map(point_name, points)) - {ran[0]})  # the interrupted point ran again


def test_a_live_worker_whose_trial_was_failed_as_stale_goes_on(tmp_path, caplog):
    # another worker judged this worker's trial stale while it ran (a late heartbeat) and enqueued its retry: the
    # result cannot be recorded on the failed trial, so the worker logs it and runs the retry instead of crashing
    from vpt_lightning.protocol.search import optuna_sweep

    cfg = compose(TINY + ["protocol.search=optuna", "protocol.pruning=false"], config_name="tune")
    points = grid_points(cfg.protocol, "vpt_deep")
    url, name = f"sqlite:///{tmp_path / 'optuna.db'}", "train-vpt_deep-grid"
    judged = []

    def judged_stale_during_the_first_run(point, extra):
        if not judged:
            other = optuna.load_study(study_name=name, storage=url)  # what the other worker's storage does
            (running,) = other.get_trials(states=(optuna.trial.TrialState.RUNNING,))
            other._storage.set_trial_state_values(running._trial_id, state=optuna.trial.TrialState.FAIL)
            other.enqueue_trial(running.params)
            judged.append(running.number)
        return _fake_run(point)

    with caplog.at_level(logging.WARNING, logger="vpt_lightning.protocol.search"):
        sweep, errors, _ = optuna_sweep(cfg, tmp_path, points, judged_stale_during_the_first_run)
    assert errors == [] and len(sweep) == 4 and not [e for e in sweep if e.get("failed")]
    assert f"trial {judged[0]} was failed by another worker while it ran" in caplog.text


def _running(url):
    try:
        study = optuna.load_study(study_name="train-vpt_deep-grid", storage=url)
    except Exception:  # not created yet
        return []
    return [t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))]


def test_tpe_runs_n_trials_and_the_protocol_selects_and_reruns_from_the_study(tmp_path):
    cfg = compose(TINY + ["protocol.search=optuna", "protocol.sampler=tpe", "protocol.n_trials=2"], config_name="tune")
    calls = []

    def counting_train(job):
        calls.append(job.data.split)
        return train(job)

    summary = run_protocol(cfg, tmp_path, counting_train)
    assert calls == ["tune", "tune", "final"] and len(summary["sweep"]) == 2
    study = optuna.load_study(study_name="train-vpt_deep-tpe", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 2 and summary["search"]["storage"].endswith("optuna.db")
    best = max(summary["sweep"], key=lambda e: (e["val/top1"], -e["point"]["base_lr"], -e["point"]["weight_decay"]))
    assert summary["selected"]["base_lr"] == best["point"]["base_lr"]
    # the same command again: the study is complete, the final run is finished, nothing is trained
    calls.clear()
    again = run_protocol(cfg, tmp_path, counting_train)
    assert calls == [] and again["selected"] == summary["selected"] and len(study.trials) == 2


def test_opening_a_study_from_many_threads_at_once_creates_it_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    url = f"sqlite:///{tmp_path / 'race.db'}"
    space = {"base_lr": [0.5, 2.0], "weight_decay": [0.0]}
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(
                lambda _: open_study(url, "race", optuna.samplers.GridSampler(space), optuna.pruners.NopPruner()),
                range(4),
            )
        )
    assert sum(created for _, created in results) == 1
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["race"]


def test_search_space_is_the_grid():
    cfg = compose(["protocol.num_tokens=[5,10]"], config_name="tune")
    points = grid_points(cfg.protocol, "vpt_deep")
    space = search_space(points)
    assert space["num_tokens"] == [5, 10] and len(space["base_lr"]) * len(space["weight_decay"]) * 2 == len(points)
    with pytest.raises(ValueError, match="protocol.search='random'"):
        run_protocol(compose(TINY + ["protocol.search=random"], config_name="tune"), Path("/nonexistent"))


def test_pruning_callback_stops_a_run_below_the_median(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    study = optuna.create_study(storage=url, study_name="p", direction="maximize")
    for good in (0.8, 0.9):  # two finished runs make the median: 0.85 at epochs 0..2
        trial = study.ask()
        for epoch in range(3):
            trial.report(good, step=epoch)
        study.tell(trial, good)
    trial = study.ask()
    callback = OptunaPruning(url, "p", trial.number)
    trainer = SimpleNamespace(
        sanity_checking=False, callback_metrics={"val/top1": torch.tensor(0.2)}, current_epoch=0, should_stop=False
    )
    callback.on_validation_end(trainer, None)
    assert not trainer.should_stop  # epoch 0 is the warm-up: never pruned
    trainer.current_epoch = 1
    callback.on_validation_end(trainer, None)
    assert trainer.should_stop
    frozen = study.get_trials()[trial.number]
    assert frozen.user_attrs[PRUNED_ATTR] == 1 and frozen.intermediate_values == pytest.approx({0: 0.2, 1: 0.2})
    # a run at the median goes on
    trial = study.ask()
    callback = OptunaPruning(url, "p", trial.number)
    trainer = SimpleNamespace(
        sanity_checking=False, callback_metrics={"val/top1": torch.tensor(0.95)}, current_epoch=1, should_stop=False
    )
    callback.on_validation_end(trainer, None)
    assert not trainer.should_stop
