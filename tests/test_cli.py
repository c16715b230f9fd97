"""vpt-train end to end through Hydra: run folders, config errors, recipe printing, resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN, run_cli, run_cli_in_process

from vpt_lightning.config import compose

FAST = TINY_RUN


def vpt_train(args, cwd, check=True, env=None):
    """Run the installed ``vpt-train`` console script in ``cwd``."""
    proc = run_cli("train", args, cwd, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"vpt-train {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One epoch of a tiny run by the ``vpt-train`` console script: (its folder, its process, the run folder)."""
    cwd = tmp_path_factory.mktemp("smoke")
    proc = vpt_train([*FAST, "task_name=smoke", "run_name=r1"], cwd=cwd)
    return cwd, proc, cwd / "outputs" / "smoke" / "r1"


def test_run_folder_has_config_metrics_checkpoint_results(smoke_run):
    _, proc, run = smoke_run
    assert (run / ".hydra" / "config.yaml").is_file()
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    assert any(r.get("val/top1") for r in rows) and any(r.get("lr") for r in rows)
    results = json.loads((run / "results.json").read_text())
    assert 0.0 <= results["test/top1"] <= 1.0 and results["trainable_params"] > 0
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert sorted(ckpt["state_dict"]) == ["backbone.prompts.tokens", "head.bias", "head.weight"]
    # what vpt-predict / vpt-serve read: the task's name, its class names, the evaluation transform
    hparams = ckpt["hyper_parameters"]
    assert hparams["task_name"] == "smoke" and len(hparams["class_names"]) == hparams["num_classes"]
    assert hparams["eval_transform"] == {
        "recipe": "vtab",
        "img_size": 32,
        "interpolation": "bicubic",
        "mean": pytest.approx([0.485, 0.456, 0.406]),
        "std": pytest.approx([0.229, 0.224, 0.225]),
    }
    assert "test top-1 (%)" in proc.stdout


def test_resume_with_run_name_and_last(smoke_run, tmp_path):
    # the shared one-epoch run (+debug=fast: trainer.max_epochs=1), resumed in a copy for a second epoch
    cwd, _, _ = smoke_run
    shutil.copytree(cwd / "outputs", tmp_path / "outputs")
    proc = run_cli_in_process(
        "train", [*FAST, "task_name=smoke", "run_name=r1", "trainer.max_epochs=2", "ckpt_path=last"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "outputs" / "smoke" / "r1" / "results.json").read_text())
    assert results["epochs"] == 2 and results["global_step"] == 4  # 2 + 2 batches, the first 2 not repeated


@pytest.mark.parametrize(
    "override, message",
    [
        ("prompt.num_tokens=-3", "prompt.num_tokens=-3 must be an integer >= 0"),
        (
            "prompt.location=middle",
            "prompt.location='middle' is not one of "
            "['prepend', 'add', 'add1', 'prepend_pixel', 'concat_channel', 'pad']",
        ),
        ("prompt=wide", "prompt=wide is not an option of the config group 'prompt'"),
        ("optim.base_lr=0", "optim.base_lr=0"),
        (
            "prompt=shallow",
            "tuning=vpt_deep needs prompts at every block (prompt=deep, num_tokens > 0), but "
            "prompt.num_tokens=10, prompt.deep=False",
        ),
        ("prompt.num_tokens=0", "tuning=vpt_deep needs prompts at every block"),
    ],
)
def test_bad_config_fails_before_training_naming_key(tmp_path, override, message):
    proc = run_cli_in_process("train", [*FAST, override], cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert "Epoch 0" not in proc.stdout + proc.stderr


def test_unknown_group_option_lists_valid_values(tmp_path):
    proc = run_cli_in_process("train", [*FAST, "prompt=wide"], cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert (
        "vpt-train: error: prompt=wide is not an option of the config group 'prompt'; its options: deep, none, "
        "shallow\n" in out
    )


def test_quickstart_composes_with_packaged_pretrained_backbone():
    cfg = compose(["+experiment=quickstart"])
    assert cfg.task_name == "quickstart"
    assert Path(cfg.backbone.checkpoint_path).is_file()
    assert cfg.backbone.checkpoint_path.endswith("quickstart_vit.safetensors")


def test_cfg_job_prints_the_recipe(tmp_path):
    proc = run_cli_in_process("train", ["+experiment=quickstart", "--cfg", "job"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "num_tokens: 10" in proc.stdout and "base_lr:" in proc.stdout and "max_epochs:" in proc.stdout


def test_user_config_folder_via_searchpath(tmp_path):
    conf = tmp_path / "my_conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "my_task.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /prompt: shallow\ntask_name: mine\nprompt:\n  num_tokens: 3\n"
    )
    cfg = compose([f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "+experiment=my_task"])
    assert cfg.task_name == "mine" and cfg.prompt.num_tokens == 3 and cfg.prompt.deep is False


def test_configs_and_assets_ship_in_the_wheel(tmp_path):
    """Build the wheel, unpack it elsewhere and compose from another folder: configs and weights come along."""
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(root),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "whl"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "whl").glob("vpt_lightning-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "vpt_lightning.cli.train", "+experiment=quickstart", "--cfg", "job", "--resolve"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"checkpoint_path: {site}/vpt_lightning/assets/quickstart_vit.safetensors" in proc.stdout


def test_cfg_job_prints_the_paper_recipe_for_vtab_cifar100(tmp_path):
    proc = run_cli_in_process("train", ["+experiment=vtab_cifar100", "--cfg", "job", "--resolve"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in (
        "name: vit_base_patch16_224.orig_in21k",
        "num_tokens: 10",
        "deep: true",
        "dropout: 0.1",
        "warmup_epochs: 10",
        "max_epochs: 100",
        "batch_size: 64",
        "task: cifar100",
        "momentum: 0.9",
    ):
        assert line in out, line


# ---- what the commands print for the user's errors ---------------------------------------------------------------
def one_error_line(proc, prog):
    """The command failed with exit code 1 and printed its error as one line, without a traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Error executing job" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("override", ["+prompt.num_token=5", "prompt.num_token=5"])
def test_unknown_key_fails_with_or_without_plus_naming_the_closest_key(tmp_path, command, override):
    proc = run_cli_in_process(command, ["+experiment=minivtab", *FAST[:2], override], cwd=tmp_path)
    line = one_error_line(proc, f"vpt-{command}")
    assert "unknown prompt option(s) ['num_token'] (did you mean 'num_tokens'?)" in line
    assert "valid keys are ['deep', 'depth', 'dropout'," in line
    assert not (tmp_path / "outputs" / "minivtab_location" / "protocol" / "vpt_deep" / "sweep").exists()


@pytest.mark.parametrize("override", ["+backbone.nme=x", "+tuning.foo=1"])
def test_unknown_key_of_backbone_and_tuning_fails(tmp_path, override):
    group, key = override[1:].split("=")[0].split(".")
    line = one_error_line(run_cli_in_process("train", [*FAST, override], cwd=tmp_path), "vpt-train")
    assert f"unknown {group} option(s) [{key!r}]" in line
    assert ("(did you mean 'name'?)" in line) == (key == "nme")


@pytest.mark.parametrize(
    "override, message",
    [
        ("prompt.location=prepnd", "prompt.location='prepnd' is not one of ['prepend', 'add',"),
        (
            "data=cifar1000",
            "vpt-train: error: data=cifar1000 is not an option of the config group 'data' (did you mean "
            "'vtab_cifar100'?); its options: ade20k, fgvc,",
        ),
        (
            "+debug=fst",
            "debug=fst is not an option of the config group 'debug' (did you mean 'fast'?); its options: fast",
        ),
        ("prompt.num_tokens=abc", "could not be converted to Integer (key: prompt.num_tokens)"),
        ("+trainer.max_epocks=2", "unexpected keyword argument 'max_epocks'"),
        # a DataModule's own check, printed without Hydra's "Error in call to target ..." wrapper
        ("data.num_train=-5", "vpt-train: error: data.num_train=-5 must be an integer >= 1"),
        ("data.eval_batch_size=0", "vpt-train: error: data.eval_batch_size=0 must be an integer >= 1 (or null"),
    ],
)
def test_config_error_is_one_line_without_traceback(tmp_path, override, message):
    line = one_error_line(run_cli_in_process("train", [*FAST, override], cwd=tmp_path), "vpt-train")
    assert message in line
    assert "Error in call to target" not in line or "max_epocks" in override  # Trainer's TypeError keeps it


def test_a_config_error_in_a_new_process_is_one_line_without_traceback(tmp_path):
    # the in-process calls above see what main() prints; this is the console script as a user runs it
    proc = run_cli("train", [*FAST, "data=cifar1000"], cwd=tmp_path)
    assert "(did you mean 'vtab_cifar100'?)" in one_error_line(proc, "vpt-train")


def test_a_multirun_goes_on_after_a_job_with_a_user_error_and_exits_1_naming_it(tmp_path):
    overrides = [arg for arg in FAST if not arg.startswith("data.num_train=")]
    proc = run_cli_in_process("train", ["-m", *overrides, "data.num_train=-5,32"], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "vpt-train: job 0 (" in proc.stderr and "data.num_train=-5 must be an integer >= 1" in proc.stderr
    assert proc.stdout.count("test top-1 (%)") == 1  # job 1 ran after job 0 failed
    summary = [line for line in proc.stderr.splitlines() if line.startswith("vpt-train: error: ")]
    assert len(summary) == 1 and "1 job(s) of the multirun failed: job 0 (" in summary[0]
    assert "data.num_train=-5" in summary[0] and "data.num_train=32" not in summary[0]


def test_debug_switch_shows_the_traceback(tmp_path):
    proc = run_cli_in_process("train", [*FAST, "prompt.location=prepnd"], tmp_path, env={"VPT_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "prompt.location='prepnd'" in proc.stderr


def test_argparse_command_error_is_one_line(tmp_path):
    proc = run_cli_in_process("report", [str(tmp_path / "nowhere")], tmp_path)
    assert "nowhere" in one_error_line(proc, "vpt-report")


@pytest.mark.parametrize("split", ["tune", "final"])
def test_quickstart_prints_none_of_the_dependencies_noise(tmp_path, split):
    proc = run_cli(
        "train",
        ["+experiment=quickstart", "+debug=fast", f"data.split={split}"]
        + ["data.num_train=64", "data.num_val=32", "data.num_test=32"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test top-1 (%)" in proc.stdout  # it did run
    # "across ranks is zero": Lightning's warning on the empty val loader of a 'final' split (validation is off)
    noises = ("Tip:", "litlogger", "LeafSpec", "is deprecated", "DeprecationWarning", "FutureWarning", "is zero")
    for noise in noises:
        assert noise not in proc.stderr, noise
