"""``vpt-tune protocol.search=optuna``: the sweep's lr x weight decay (x prompt length) points as an Optuna study.

The paper's protocol (Jia et al., ECCV 2022, Sec. 4.1 and the supplement's grid) picks the best validation top-1
over a grid; this module runs that grid, or a TPE search over the same values, in an Optuna study kept in any
RDB storage (a SQLite file in the protocol folder by default, PostgreSQL for several machines). Several
processes or machines started with the same ``protocol.storage`` and ``protocol.study`` share the study:

- ``protocol.sampler=grid``: :class:`optuna.samplers.GridSampler` over the grid. Optuna documents that its
  ``GridSampler`` may hand the same point to two concurrent workers, so the process that creates the study also
  enqueues every grid point once, and workers only take enqueued trials (Optuna moves a waiting trial to running
  in one database transaction, so two workers never get the same one): every point runs once, and again only
  when its run was interrupted (Ctrl+C, an error: the point is enqueued again) or its worker was killed (see below).
- ``protocol.sampler=tpe``: :class:`optuna.samplers.TPESampler` over the same values, ``protocol.n_trials``
  trials in total among all workers.

With ``protocol.pruning=true`` (default) a :class:`optuna.pruners.MedianPruner` stops a run whose val top-1 at an
epoch is below the median of the other runs at that epoch (:class:`OptunaPruning` reports it from Lightning). Pruned
points are never selected. When the study holds no more work, the worker waits for the other workers' running
trials and returns the sweep in :mod:`vpt_lightning.protocol.task_protocol`'s format, so selection, final runs and
``vpt-report`` work as for a grid.

Trials run through :meth:`optuna.study.Study.optimize`, which records a heartbeat of the running trial every
``protocol.heartbeat_interval`` seconds; a worker fails the trials whose heartbeat is older than twice that (their
worker was killed) and Optuna's ``RetryHeartbeatStaleTrialCallback`` enqueues their points again. Every worker of a
study should use the same interval.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytorch_lightning as pl
from omegaconf import DictConfig

log = logging.getLogger(__name__)
SEARCHES = ("grid", "optuna")
SAMPLERS = ("grid", "tpe")
ENQUEUED_ATTR = "vpt_enqueued_points"  # study user attribute: set once every grid point is enqueued
PRUNED_ATTR = "pruned_at_epoch"  # trial user attribute, set by OptunaPruning
SPARE_ATTR = "spare"  # a trial that found the queue empty (another worker took the last point)
RETRY_OF_ATTR = "retry_of"  # a point enqueued again because its run was interrupted (the interrupted trial)
PARAMS = ("base_lr", "weight_decay", "num_tokens")
MAX_RETRIES = 2  # a point whose worker was killed is run again at most this often (then it stays failed)

# run_point(point, extra_overrides) -> (sweep entry in protocol's format, the exception if the run failed)
RunPoint = Callable[[Dict[str, Any], Dict[str, Any]], Tuple[Dict[str, Any], Optional[BaseException]]]


def _optuna():
    try:
        import optuna
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("protocol.search=optuna needs Optuna: pip install 'vpt-lightning[optuna]'") from err
    return optuna


def search_kind(protocol: DictConfig) -> str:
    """``protocol.search`` (``grid`` when absent), checked."""
    kind = protocol.get("search") or "grid"
    if kind not in SEARCHES:
        raise ValueError(f"protocol.search={kind!r} is not one of {list(SEARCHES)}")
    return kind


def storage_url(protocol: DictConfig, out_dir: Path) -> str:
    """``protocol.storage``, else a SQLite file ``optuna.db`` in the protocol folder."""
    url = protocol.get("storage")
    if url:
        return str(url)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(out_dir).resolve() / 'optuna.db'}"


def search_space(points: List[Dict[str, Any]]) -> Dict[str, List[Any]]:
    """The grid's values per parameter, in the grid's order (``num_tokens`` only when swept)."""
    space: Dict[str, List[Any]] = {}
    for name in PARAMS:
        values = [p[name] for p in points if p.get(name) is not None]
        if values:
            space[name] = list(dict.fromkeys(values))
    return space


def _distributions(space: Dict[str, List[Any]]) -> Dict[str, Any]:
    optuna = _optuna()
    return {name: optuna.distributions.CategoricalDistribution(values) for name, values in space.items()}


def _point(params: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "base_lr": float(params["base_lr"]),
        "weight_decay": float(params["weight_decay"]),
        "num_tokens": int(params["num_tokens"]) if params.get("num_tokens") is not None else None,
    }


def _sampler(name: str, space: Dict[str, List[Any]], seed: int):
    optuna = _optuna()
    if name == "grid":
        return optuna.samplers.GridSampler(space, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    raise ValueError(f"protocol.sampler={name!r} is not one of {list(SAMPLERS)}")


def _pruner(enabled: bool):
    optuna = _optuna()
    # the first 2 runs always finish (they make the median); no run is stopped before its second epoch
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1) if enabled else optuna.pruners.NopPruner()


def study_storage(url: str, heartbeat_interval: Optional[int] = None) -> Any:
    """Optuna's RDB storage for ``url``; with ``heartbeat_interval`` (seconds) a running trial records a heartbeat
    that often, and one whose heartbeat is older than twice that (its worker was killed) is failed and its point
    enqueued again (Optuna's ``RetryHeartbeatStaleTrialCallback``, at most :data:`MAX_RETRIES` times)."""
    optuna = _optuna()
    if not heartbeat_interval:
        return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    with _heartbeat_api():
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=_engine_kwargs(url),
            heartbeat_interval=int(heartbeat_interval),
            grace_period=2 * int(heartbeat_interval),
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
        )


def open_study(
    url: str, name: str, sampler: Any, pruner: Any, attempts: int = 20, heartbeat_interval: Optional[int] = None
) -> Tuple[Any, bool]:
    """Create the study, or load it when another process created it; returns ``(study, created_here)``.

    Processes that start together race to create the study (and, for a new SQLite file, its tables); the loser
    of that race gets an integrity or locking error from the database and retries until the study can be loaded.
    ``heartbeat_interval``: see :func:`study_storage`.
    """
    optuna = _optuna()
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(attempts):
        try:
            storage = study_storage(url, heartbeat_interval)
            try:
                study = optuna.create_study(
                    storage=storage, study_name=name, sampler=sampler, pruner=pruner, direction="maximize"
                )
                return study, True
            except optuna.exceptions.DuplicatedStudyError:
                return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner), False
        except (IntegrityError, OperationalError, KeyError) as err:
            # KeyError: the study row exists but its direction is not written yet (created a moment ago)
            if attempt == attempts - 1:
                raise
            log.info("opening study %s failed (%s); retrying", name, type(err).__name__)
            time.sleep(0.2 + 0.3 * attempt)
    raise AssertionError("unreachable")


def _engine_kwargs(url: str) -> Dict[str, Any]:
    # SQLite: wait for a writer instead of failing at once when several processes share the file
    return {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}


def _enqueue_grid(study: Any, points: List[Dict[str, Any]]) -> None:
    for point in points:
        study.enqueue_trial({k: v for k, v in point.items() if v is not None})
    study.set_user_attr(ENQUEUED_ATTR, len(points))


def _wait_for(condition: Callable[[], bool], what: str, timeout: float, poll: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def _states(study: Any, *names: str) -> List[Any]:
    optuna = _optuna()
    return study.get_trials(deepcopy=False, states=tuple(getattr(optuna.trial.TrialState, n) for n in names))


def _frozen(study: Any, number: int) -> Any:
    """The stored state of trial ``number`` (its system and user attributes as written so far)."""
    return study.get_trials(deepcopy=False)[number]


class PointFailed(Exception):
    """A sweep point's run failed or diverged: its trial is marked failed (the run's error is reported by the
    protocol)."""


class _NoTracebackForFailedTrials(logging.Filter):
    """Optuna logs a failed trial with its exception's traceback. A :class:`PointFailed` carries its reason in its
    message, and any other exception goes on to the command, which prints it (one line for a user's error, the
    traceback for a bug): the record keeps the message alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def _quiet_failed_points() -> None:
    logger = logging.getLogger("optuna.study._optimize")  # where Optuna logs failed trials
    if not any(isinstance(f, _NoTracebackForFailedTrials) for f in logger.filters):
        logger.addFilter(_NoTracebackForFailedTrials())


def point_label(point: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in point.items() if v is not None)


@contextmanager
def _heartbeat_api() -> Iterator[None]:
    """Optuna's heartbeat API (storage arguments, ``fail_stale_trials``, ``optimize`` with a heartbeat) without its
    ``ExperimentalWarning``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _optuna().exceptions.ExperimentalWarning)
        yield


def pruning_callback(url: str, study_name: str, trial_number: int, pruning: bool) -> Dict[str, Any]:
    """The ``callbacks.optuna_pruning`` config entry that reports a run's val top-1 to its trial."""
    return {
        "_target_": f"{__name__}.OptunaPruning",
        "storage": url,
        "study": study_name,
        "trial_number": trial_number,
        "pruning": pruning,
    }


def optuna_sweep(
    cfg: DictConfig, out_dir: Path, points: List[Dict[str, Any]], run_point: RunPoint, wait_timeout: float = 24 * 3600.0
) -> Tuple[List[Dict[str, Any]], List[BaseException], Dict[str, Any]]:
    """Run this worker's share of the study, wait for the others, return ``(sweep, errors, search_info)``.

    ``points`` is the grid (:func:`vpt_lightning.protocol.task_protocol.grid_points`); ``run_point(point,
    overrides)`` runs one
    sweep point with extra config overrides (the pruning callback) and returns its sweep entry and error.
    """
    optuna = _optuna()
    protocol = cfg.protocol
    sampler_name = protocol.get("sampler") or "grid"
    if sampler_name not in SAMPLERS:
        raise ValueError(f"protocol.sampler={sampler_name!r} is not one of {list(SAMPLERS)}")
    n_trials = protocol.get("n_trials")
    if sampler_name == "tpe":
        n_trials = int(n_trials) if n_trials is not None else math.ceil(len(points) / 3)
        if n_trials < 1:
            raise ValueError(f"protocol.n_trials={n_trials} must be a positive number of trials")
    url = storage_url(protocol, out_dir)
    name = protocol.get("study") or f"{cfg.task_name}-{cfg.tuning.name}{protocol.get('variant') or ''}-{sampler_name}"
    space = search_space(points)
    pruning = bool(protocol.get("pruning", True))
    heartbeat = protocol.get("heartbeat_interval", 60)
    if heartbeat is not None and (isinstance(heartbeat, bool) or not isinstance(heartbeat, int) or heartbeat < 1):
        raise ValueError(f"protocol.heartbeat_interval={heartbeat!r} must be a whole number of seconds >= 1 (or null)")
    sampler = _sampler(sampler_name, space, int(cfg.seed))
    study, created = open_study(url, name, sampler, _pruner(pruning), heartbeat_interval=heartbeat)
    log.info("optuna study %r in %s (%s)", name, url, "created" if created else "joined")
    if sampler_name == "grid":
        if created:
            _enqueue_grid(study, points)
        else:  # the creator enqueues the grid right after creating the study
            _wait_for(lambda: ENQUEUED_ATTR in study.user_attrs, f"study {name!r} to enqueue its grid", 600, 0.5)
    distributions = _distributions(space)
    errors: List[BaseException] = []

    def has_work() -> bool:
        if _states(study, "WAITING"):  # a grid point, or the retry of a killed worker's point
            return True
        if sampler_name != "tpe":
            return False
        # n_trials that did not fail; failed ones are replaced, but at most n_trials of them (every run may fail)
        return (
            len(_states(study, "RUNNING", "COMPLETE", "PRUNED")) < n_trials and len(_states(study, "FAIL")) < n_trials
        )

    current = {"trial": None, "ran": False}  # the trial this worker runs, and whether its run has returned

    def objective(trial: Any) -> float:
        current.update(trial=trial.number, ran=False)
        stored = _frozen(study, trial.number)
        if sampler_name == "grid" and "fixed_params" not in stored.system_attrs:
            # another worker took the last enqueued point between our check and our ask: not a grid point to run
            trial.set_user_attr(SPARE_ATTR, True)
            study.stop()
            raise PointFailed("no grid point left for this worker")
        if stored.user_attrs.get(PRUNED_ATTR) is not None:  # inherited by the retry of a killed worker's trial
            trial.set_user_attr(PRUNED_ATTR, None)
        point = _point({param: trial.suggest_categorical(param, d.choices) for param, d in distributions.items()})
        overrides = {"callbacks.optuna_pruning": pruning_callback(url, name, trial.number, pruning)}
        try:
            entry, error = run_point(point, overrides)
        except BaseException:  # Ctrl+C, a run folder that does not fit, a bug: the point runs again next time
            study.enqueue_trial(dict(trial.params), user_attrs={RETRY_OF_ATTR: trial.number})
            raise
        current["ran"] = True
        if error is not None:
            errors.append(error)
            raise PointFailed(f"{point_label(point)}: {error}")
        if entry.get("diverged") or not math.isfinite(entry.get("val/top1", math.nan)):
            raise PointFailed(f"{point_label(point)}: diverged or no finite val top-1")
        if _frozen(study, trial.number).user_attrs.get(PRUNED_ATTR) is not None:  # set by the run's OptunaPruning
            raise optuna.TrialPruned()
        return float(entry["val/top1"])

    def others_done_or_work_back() -> bool:
        """No other worker's trial runs any more, or there is work again: a trial whose worker was killed goes stale
        here, is failed, and its point is enqueued again."""
        with _heartbeat_api():
            optuna.storages.fail_stale_trials(study)
        return not _states(study, "RUNNING") or has_work()

    def stop_when_no_work(study_: Any, trial: Any) -> None:
        if not has_work():
            study_.stop()

    _quiet_failed_points()
    while True:
        if has_work():  # Study.optimize records the heartbeat of the running trial and fails stale ones first
            try:
                with _heartbeat_api():
                    study.optimize(objective, callbacks=[stop_when_no_work], catch=(PointFailed,), gc_after_trial=False)
            except Exception:
                if not (current["ran"] and _frozen(study, current["trial"]).state == optuna.trial.TrialState.FAIL):
                    raise
                # Optuna could not record the result: another worker failed the trial as stale while it ran (its
                # heartbeat came late). The run is finished in its folder; the trial's retry reuses it.
                log.warning(
                    "optuna: trial %d was failed by another worker while it ran (a late heartbeat: a stalled process, "
                    "or workers with different protocol.heartbeat_interval); its retry reuses the finished run",
                    current["trial"],
                )
        _wait_for(others_done_or_work_back, f"the other workers of study {name!r}", wait_timeout)
        if not has_work():
            break
    sweep = sweep_from_study(study)
    info = {
        "kind": "optuna",
        "sampler": sampler_name,
        "study": name,
        "storage": url,
        "n_trials": len(sweep),
        "pruned": [e["point"] for e in sweep if e.get("pruned")],
    }
    return sweep, errors, info


def sweep_from_study(study: Any) -> List[Dict[str, Any]]:
    """Every finished, non-spare trial of ``study`` as a sweep entry (``point``, ``val/top1``; ``pruned`` or
    ``failed`` when so), one per point: its first finished trial (TPE may propose a point twice), or a later one
    that did not fail (the retry of a trial whose worker was killed)."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    by_point: Dict[tuple, Dict[str, Any]] = {}
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if trial.user_attrs.get(SPARE_ATTR) or not trial.state.is_finished() or not trial.params:
            continue
        point = _point(trial.params)
        key = tuple(point.values())
        if key in by_point and (trial.state == state.FAIL or "failed" not in by_point[key]):
            continue
        entry: Dict[str, Any] = {"point": point, "trial": trial.number}
        if trial.state == state.COMPLETE:
            entry["val/top1"] = float(trial.value)
        elif trial.state == state.PRUNED:
            reported = trial.intermediate_values
            entry["val/top1"] = float(reported[max(reported)]) if reported else math.nan
            pruned_at = trial.user_attrs.get(PRUNED_ATTR)
            entry["pruned"] = int(pruned_at) if pruned_at is not None else -1
        else:
            entry["failed"] = "trial failed or diverged (see its run folder)"
        by_point[key] = entry
    return list(by_point.values())


class OptunaPruning(pl.Callback):
    """Report ``monitor`` (val top-1) to an Optuna trial after every validation epoch and stop the run when the
    study's pruner says so (the trial gets the ``pruned_at_epoch`` user attribute; the search marks it pruned).

    Built from plain values (storage URL, study name, trial number) so that the config of a run can carry it.
    """

    def __init__(
        self, storage: str, study: str, trial_number: int, pruning: bool = True, monitor: str = "val/top1"
    ) -> None:
        optuna = _optuna()
        self.monitor = monitor
        storage_ = optuna.storages.RDBStorage(storage, engine_kwargs=_engine_kwargs(storage))
        self.study = optuna.load_study(study_name=study, storage=storage_, pruner=_pruner(pruning))
        trial_id = storage_.get_trial_id_from_study_id_trial_number(self.study._study_id, trial_number)
        self.trial = optuna.trial.Trial(self.study, trial_id)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        epoch = trainer.current_epoch
        if not math.isfinite(value):
            return
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            log.info("optuna: pruning trial %d at epoch %d (%s=%.4f)", self.trial.number, epoch, self.monitor, value)
            self.trial.set_user_attr(PRUNED_ATTR, epoch)
            trainer.should_stop = True
