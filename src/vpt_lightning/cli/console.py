"""What every ``vpt-*`` command prints: a user's error as one line without a traceback, and none of the
dependencies' noise (Lightning's tips, their deprecation warnings).

An error is the user's to fix when it is a config error (Hydra's composition, OmegaConf's types, a run folder that
does not fit or is in use) or an error with a message that this package raises (a ``ValueError``, an ``OSError``...
whose raising frame is in ``vpt_lightning``); it is printed as ``<command>: error: <message>`` with exit code 1.
Any other exception is a bug and keeps its full traceback. ``VPT_DEBUG=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``)
shows the traceback of every error.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, List, NoReturn, Optional, TypeVar

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ..runs.locking import FolderLockedError

EXIT_ERROR = 1
PACKAGE_DIR = Path(__file__).resolve().parents[1]
# exceptions with a message for the user when this package raises them (a bug's are raised by the libraries)
MESSAGE_ERRORS = (ValueError, OSError, ImportError, KeyError, TypeError, RuntimeError)
# (and the run integrity checks' RunIntegrityError: see is_user_error)
CONFIG_ERRORS = (OmegaConfBaseException, FolderLockedError)
# dependencies' warnings that are not the user's to act on: (message regex, category)
NOISE_WARNINGS = (
    # Lightning's _pytree on torch >= 2.9 (pytorch_lightning/utilities/_pytree.py)
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)
# dependencies' log records that advertise rather than inform: logger name -> message prefixes
NOISE_LOGS = {"pytorch_lightning.utilities.rank_zero": ("💡 Tip:",)}

R = TypeVar("R")


def plain_text(docstring: str) -> str:
    """A module docstring as a command's ``--help`` shows it: reStructuredText's inline markup as plain text
    (````vpt-viz```` as vpt-viz, ``:func:`~pkg.name``` as name)."""
    text = re.sub(r":[a-z]+:`~[\w.]*?\.?(\w+)`", r"\1", docstring)
    text = re.sub(r":[a-z]+:`([^`]+)`", r"\1", text)
    return text.replace("``", "")


def full_tracebacks() -> bool:
    """``VPT_DEBUG=1`` or ``HYDRA_FULL_ERROR=1``: show every error's traceback."""
    return os.environ.get("VPT_DEBUG") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_dependencies() -> None:
    """Filter the dependencies' noise (:data:`NOISE_WARNINGS`, :data:`NOISE_LOGS`) in this process; the commands
    call it, importing the library does not."""
    for message, category in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in NOISE_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))


def _frames(err: BaseException) -> Iterator[Any]:
    tb = err.__traceback__
    while tb is not None:
        yield tb
        tb = tb.tb_next


def raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by a function of this package (its innermost frame is in ``vpt_lightning``)."""
    frames = list(_frames(err))
    last = frames[-1] if frames else None
    if last is None:
        return False
    try:
        return Path(last.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is the user's to fix (printed as one line) rather than a bug (printed with its traceback)."""
    from hydra.errors import HydraException, InstantiationException

    # a run integrity error comes from a module that imports Lightning: one that was never imported raised none
    integrity = sys.modules.get("vpt_lightning.runs.integrity")
    integrity_errors = (integrity.RunIntegrityError,) if integrity is not None else ()
    if isinstance(err, InstantiationException):  # a config node's target refused its arguments, or raised ours
        cause = err.__cause__
        return cause is None or isinstance(cause, TypeError) and not raised_here(cause) or is_user_error(cause)
    if isinstance(err, (HydraException, *integrity_errors, *CONFIG_ERRORS)):
        return True
    return isinstance(err, MESSAGE_ERRORS) and raised_here(err)


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    from ..dataclass_config import DataclassConfig, unknown_keys_message

    key, kind = getattr(err, "key", None), getattr(err, "object_type", None)
    if (
        type(err).__name__ in ("ConfigKeyError", "ConfigAttributeError")
        and isinstance(key, str)
        and isinstance(kind, type)
        and issubclass(kind, DataclassConfig)
    ):
        from dataclasses import fields

        # an unknown key of a typed group (prompt, backbone, tuning): adding it with '+' would not help
        return unknown_keys_message(kind.group, [key], [f.name for f in fields(kind)])  # type: ignore[arg-type]
    message = _one_line(str(getattr(err, "msg", None) or err))
    full_key = getattr(err, "full_key", None)
    return f"{message} (key: {full_key})" if full_key and full_key not in message else message


def _one_line(text: str) -> str:
    """Hydra's and OmegaConf's message lines joined, without their ``full_key:`` / ``object_type=`` details."""
    details = ("full_key:", "object_type=", "reference_type=")
    return " ".join(line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(details))


def _missing_option_message(err: BaseException) -> str:
    """Hydra's "In 'train': Could not find 'data/cifar1000'" with the group's options one per line, as one line:
    ``data=cifar1000 is not an option of the config group 'data' (did you mean 'vtab_cifar100'?); its options: ...``
    (naming the config that asked for it when that is not the command's own, e.g. an experiment)."""
    text = str(err).split("Config search path:")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    asked = re.match(r"In '([^']+)': ", lines[0]) if lines else None
    heading = next((line for line in lines[1:] if line.startswith("Available options in '")), None)
    missing = str(getattr(err, "missing_cfg_file", "") or "")
    group, _, value = missing.rpartition("/")
    if heading is None or not group:  # not an option of a group (a primary config, a file): Hydra's first line
        return re.sub(r"^In '[^']+': ", "", lines[0]) if lines else str(err)
    options = lines[lines.index(heading) + 1 :]
    close = difflib.get_close_matches(value, options, n=1)
    by = f" (chosen by {asked.group(1)})" if asked and "/" in asked.group(1) else ""  # by a group's config
    return (
        f"{group}={value}{by} is not an option of the config group {group!r}"
        + (f" (did you mean {close[0]!r}?)" if close else "")
        + f"; its options: {', '.join(options)}"
    )


def error_message(err: BaseException) -> str:
    """The one message printed for a user's error (Hydra's lists of options on one line, a close match named)."""
    from hydra.errors import HydraException, InstantiationException, MissingConfigException

    if isinstance(err, OmegaConfBaseException):
        return _omegaconf_message(err)
    if isinstance(err, MissingConfigException):  # an unknown group option (data=cifar1000)
        return _missing_option_message(err)
    cause = err.__cause__
    if isinstance(err, InstantiationException) and cause is not None and raised_here(cause):
        return error_message(cause)  # our own message, without Hydra's "Error in call to target ..." wrapper
    if isinstance(cause, OmegaConfBaseException):  # e.g. Hydra's "Could not override 'prompt.x'"
        first = str(err).splitlines()[0].strip()
        cause_message = _omegaconf_message(cause)
        if "option(s)" in cause_message:  # Hydra's hint to add the key with '+' would be wrong for a typed group
            return f"{first} {cause_message}"
        return f"{_one_line(str(err))}: {cause_message}"
    if isinstance(err, HydraException):
        return _one_line(str(err))
    if isinstance(err, KeyError) and len(err.args) == 1:
        return str(err.args[0])
    return str(err).strip() or type(err).__name__


def fail(prog: str, err: BaseException) -> NoReturn:
    """Print ``<prog>: error: <message>`` on stderr and exit with :data:`EXIT_ERROR`."""
    print(f"{prog}: error: {error_message(err)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_ERROR)


def report_errors(prog: str) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorator for a command's ``main``: quiet the dependencies, and print a user's error as one line."""

    def decorate(main: Callable[..., R]) -> Callable[..., R]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> R:
            quiet_dependencies()
            try:
                return main(*args, **kwargs)
            except Exception as err:
                if full_tracebacks() or not is_user_error(err):
                    raise
                fail(prog, err)

        return run

    return decorate


class JobFailed(Exception):
    """A job of a Hydra multirun failed and said why (a user's error as one line, a bug with its traceback): Hydra
    records the job as failed and runs the next one; the command sums the failed jobs up at the end."""


def _multirun_job() -> Optional[str]:
    """``"job N (overrides)"`` inside a job of a multirun, else ``None``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    job = HydraConfig.get().job
    return f"job {job.num} ({job.override_dirname or 'no overrides'})"


def hydra_command(prog: str, config_name: str) -> Callable[[Callable[[DictConfig], R]], Callable[[], Optional[R]]]:
    """Decorator: a Hydra entry point on the packaged configs (``vpt_lightning/conf``) whose errors, while composing
    the config or while running, print one line when they are the user's (see :func:`is_user_error`).

    In a multirun every job runs: a failed job prints its error (one line, or a bug's traceback) and the command
    exits with :data:`EXIT_ERROR` at the end, naming the failed jobs (Hydra alone would re-raise only the first)."""
    import hydra

    def decorate(task: Callable[[DictConfig], R]) -> Callable[[], Optional[R]]:
        show_tracebacks = [full_tracebacks()]  # the user's choice, read before main() sets HYDRA_FULL_ERROR
        failed_jobs: List[str] = []  # this call's multirun jobs that failed (when they ran in this process)

        @functools.wraps(task)
        def guarded_task(cfg: DictConfig) -> R:
            try:
                return task(cfg)
            except Exception as err:
                job = _multirun_job()
                bug = show_tracebacks[0] or not is_user_error(err)
                if job is None:
                    if bug:
                        raise
                    fail(prog, err)  # inside the job: Hydra would print the error with a traceback
                if bug:  # now, since Hydra re-raises only the sweep's first failure
                    traceback.print_exc()
                reason = f"{type(err).__name__} (traceback above)" if bug else error_message(err)
                print(f"{prog}: {job} failed: {reason}", file=sys.stderr, flush=True)
                failed_jobs.append(job)
                raise JobFailed(job) from None

        hydra_main = hydra.main(version_base="1.3", config_path="pkg://vpt_lightning.conf", config_name=config_name)(
            guarded_task
        )

        def run_hydra() -> Optional[R]:
            if show_tracebacks[0]:
                return hydra_main()
            # Hydra prints a composition error with its search path (and a job's with a traceback) unless
            # HYDRA_FULL_ERROR=1, which lets the error reach this function instead
            before = os.environ.get("HYDRA_FULL_ERROR")
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                return hydra_main()
            except Exception as err:  # a JobFailed is not a user's error: it goes on to main()
                if not is_user_error(err):
                    raise
                fail(prog, err)
            finally:
                if before is None:
                    os.environ.pop("HYDRA_FULL_ERROR", None)
                else:
                    os.environ["HYDRA_FULL_ERROR"] = before

        @functools.wraps(task)
        def main() -> Optional[R]:
            quiet_dependencies()
            show_tracebacks[0] = full_tracebacks()
            failed_jobs.clear()
            try:
                return run_hydra()
            except JobFailed as err:  # Hydra ran every job of the sweep, then raised the first failure
                # the jobs failed in this process, or (a launcher running them elsewhere) the first one Hydra got back
                jobs = failed_jobs or [str(err)]
                fail(prog, JobFailed(f"{len(jobs)} job(s) of the multirun failed: {'; '.join(jobs)}"))

        return main

    return decorate
