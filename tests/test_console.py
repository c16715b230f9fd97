"""cli/console.py: which errors are the user's (one line) and which are bugs (traceback); the dependencies' noise."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from vpt_lightning.cli.console import error_message, is_user_error, quiet_dependencies, report_errors
from vpt_lightning.prompt import PromptConfig


@report_errors("vpt-x")
def command(fail):
    fail()
    return 0


def test_our_error_is_printed_as_one_line(capsys, monkeypatch):
    monkeypatch.delenv("VPT_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        command(lambda: PromptConfig(location="prepnd"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert (
        err == "vpt-x: error: prompt.location='prepnd' is not one of "
        "['prepend', 'add', 'add1', 'prepend_pixel', 'concat_channel', 'pad']\n"
    )


def test_a_dependency_error_or_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("VPT_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(RuntimeError, match="shape"):  # raised by torch, not by this package
        command(lambda: torch.zeros(2).view(3))
    with pytest.raises(ZeroDivisionError):
        command(lambda: 1 / 0)

    def bad():
        raise ValueError("raised outside vpt_lightning")

    with pytest.raises(ValueError, match="outside"):
        command(bad)


def test_debug_switch_raises_our_error_too(monkeypatch):
    monkeypatch.setenv("VPT_DEBUG", "1")
    with pytest.raises(ValueError, match="prepnd"):
        command(lambda: PromptConfig(location="prepnd"))


def test_is_user_error_classifies_config_errors():
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    assert is_user_error(ConfigCompositionException("Could not override 'x'"))
    cfg = OmegaConf.structured(PromptConfig)
    with pytest.raises(OmegaConfBaseException) as err:
        cfg.num_token = 5
    assert is_user_error(err.value)
    # a key the typed group does not have: our message with the closest key, not OmegaConf's
    assert error_message(err.value).startswith("unknown prompt option(s) ['num_token'] (did you mean 'num_tokens'?)")
    assert not is_user_error(AssertionError("a bug"))


def test_quiet_dependencies_filters_only_the_noise(caplog, recwarn):
    quiet_dependencies()
    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use something else", FutureWarning, stacklevel=1)
    warnings.warn("a FutureWarning of our own", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in recwarn] == ["a FutureWarning of our own"]
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging, try installing litlogger")
        logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_a_multirun_runs_every_job_and_names_each_failure_a_bug_with_its_traceback(tmp_path, capsys, monkeypatch):
    import sys

    from vpt_lightning.cli.console import hydra_command
    from vpt_lightning.config import register_resolvers
    from vpt_lightning.data.base import require_count

    register_resolvers()
    monkeypatch.delenv("VPT_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    ran = []

    @hydra_command("vpt-x", "train")
    def sweep(cfg):
        ran.append(cfg.seed)
        if cfg.seed == 0:
            require_count("data.num_train", -5, minimum=1)  # the user's error
        if cfg.seed == 1:
            raise ZeroDivisionError("a bug in job 1")
        return 0.5

    for attempt in range(2):  # twice in one process: the second call reports only its own jobs
        monkeypatch.setattr(sys, "argv", ["vpt-x", "-m", "seed=0,1,2", f"hydra.sweep.dir={tmp_path / str(attempt)}"])
        with pytest.raises(SystemExit) as exit_info:
            sweep()
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and ran[-3:] == [0, 1, 2]  # job 2 ran after both failures
        assert "vpt-x: job 0 (seed=0) failed: data.num_train=-5 must be an integer >= 1" in err
        assert "ZeroDivisionError: a bug in job 1" in err and "Traceback" in err  # the bug's traceback
        assert "vpt-x: job 1 (seed=1) failed: ZeroDivisionError (traceback above)" in err
        summary = [line for line in err.splitlines() if line.startswith("vpt-x: error: ")]
        assert summary == ["vpt-x: error: 2 job(s) of the multirun failed: job 0 (seed=0); job 1 (seed=1)"]


@pytest.mark.parametrize("config_name", ["train", "tune"])
def test_an_unknown_option_of_a_config_group_is_one_line_naming_group_value_and_options(config_name):
    """Hydra's "In 'train': Could not find 'backbone/quickstart_vi'" with its options one per line becomes one line
    that names the group, the value, the closest option and every option, without Hydra's prefix."""
    from hydra.errors import MissingConfigException

    from vpt_lightning.config import CONFIG_DIR, compose

    options = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "backbone").glob("*.yaml")))
    with pytest.raises(MissingConfigException) as err:
        compose(["backbone=quickstart_vi"], config_name=config_name)
    assert error_message(err.value) == (
        "backbone=quickstart_vi is not an option of the config group 'backbone' (did you mean 'quickstart_vit'?); "
        f"its options: {options}"
    )
    with pytest.raises(MissingConfigException) as err:
        compose(["+experiment=quickstart", "tuning=nope"], config_name=config_name)
    message = error_message(err.value)
    assert message.startswith("tuning=nope is not an option of the config group 'tuning'; its options: adapter, ")
    assert "In '" not in message and "\n" not in message and "Config search path" not in message
    # an option that a group's config asks for (an experiment's defaults list) is named with that config
    asked = MissingConfigException(
        "In 'experiment/mine': Could not find 'data/vtab_cifar10'\n\nAvailable options in 'data':\n\tfolder\n"
        "\tvtab_cifar100\nConfig search path:\n\tprovider=main, path=pkg://vpt_lightning.conf",
        missing_cfg_file="data/vtab_cifar10",
    )
    assert error_message(asked) == (
        "data=vtab_cifar10 (chosen by experiment/mine) is not an option of the config group 'data' (did you mean "
        "'vtab_cifar100'?); its options: folder, vtab_cifar100"
    )


@pytest.mark.parametrize("argv", [["viz"], ["report"], ["export"], ["export", "onnx"], ["prepare"]])
def test_help_shows_the_module_docstring_as_plain_text(tmp_path, argv):
    """The description a command gives argparse is its module docstring without reStructuredText markup."""
    from conftest import run_cli_in_process

    from vpt_lightning.cli.console import plain_text

    assert plain_text(
        "``vpt-viz``: :func:`~vpt_lightning.protocol.viz.attention_figure` (:mod:`vpt_lightning.protocol.viz`)"
    ) == ("vpt-viz: attention_figure (vpt_lightning.protocol.viz)")
    proc = run_cli_in_process(argv[0], [*argv[1:], "--help"], cwd=tmp_path)
    assert proc.returncode == 0 and f"vpt-{argv[0]}" in proc.stdout
    assert "``" not in proc.stdout and ":func:" not in proc.stdout and ":mod:" not in proc.stdout, proc.stdout
