"""logger=[csv,tensorboard,wandb,mlflow]: what each tracker wrote, read back with the tracker's own library, offline.

One small ``vpt-tune`` protocol (2 sweep points, 1 final seed, 2 epochs of 2 batches) logs to all four; every run's
per-epoch val top-1 in each tracker equals the run's ``csv/metrics.csv``, its config and final results are there,
and the runs are grouped (MLflow parent/child, W&B group, a TensorBoard folder per run).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import read_wandb_records

from vpt_lightning.serving.launch import free_port

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("wandb")

GROUP = "train/vpt_deep"
RUNS = ["sweep/lr0.5_wd0", "sweep/lr2_wd0", "final/lr2_wd0/seed1"]


@pytest.fixture(scope="module")
def protocol_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracked")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    # offline by our default (no WANDB_MODE set here on purpose); never a login prompt or a network call
    env.update(WANDB_SILENT="true", WANDB_DISABLE_CODE="true", WANDB_API_KEY="", PYTHONWARNINGS="ignore")
    cmd = [
        str(Path(sys.executable).parent / "vpt-tune"),
        "backbone=vit_tiny_random",
        "+debug=fast",
        "trainer.max_epochs=2",
        "data.num_train=32",
        "data.num_val=16",
        "data.num_test=16",
        "data.batch_size=16",
        "protocol.base_lr=[0.5,2]",
        "protocol.weight_decay=[0]",
        "protocol.seeds=[1]",
        "logger=[csv,tensorboard,wandb,mlflow]",
        f"paths.output_dir={out}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("upload it with: wandb sync ") == len(RUNS)
    return out / "train" / "protocol" / "vpt_deep"


def _keys(run: Path):
    """The per-epoch metric and the final result compared for a run: val top-1 for sweep runs; final runs train on
    train+val (no validation), so their epoch train loss and test top-1."""
    return ("val/top1", "val/top1") if "sweep" in run.parts else ("train/loss_epoch", "test/top1")


def _csv_series(run: Path) -> list:
    key = _keys(run)[0]
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    return [float(r[key]) for r in rows if r.get(key)]


def _selected_lr(protocol_dir: Path) -> float:
    return json.loads((protocol_dir / "summary.json").read_text())["selected"]["base_lr"]


def test_tensorboard_event_files_hold_the_epoch_metrics_config_and_results(protocol_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    if _selected_lr(protocol_dir) != 2.0:
        pytest.skip("the tiny sweep selected another point than the one RUNS names")
    for name in RUNS:
        run = protocol_dir / name
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
        epoch_key, result_key = _keys(run)
        assert [e.value for e in events.Scalars(epoch_key)] == pytest.approx(_csv_series(run))
        results = json.loads((run / "results.json").read_text())
        assert events.Scalars(f"results/{result_key}")[-1].value == pytest.approx(results[result_key])
        hparams = plugin_data_pb2.HParamsPluginData.FromString(
            events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        )
        logged = hparams.session_start_info.hparams
        assert logged["config/optim.base_lr"].number_value == pytest.approx(results["config"]["optim"]["base_lr"])
        assert logged["config/tuning.method"].string_value == "vpt_deep"


def test_mlflow_store_has_a_parent_run_with_one_child_per_run(protocol_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{protocol_dir.parents[2] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vpt-lightning")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("vpt.group") == GROUP]
    assert len(parents) == 1
    parent = parents[0]
    summary = json.loads((protocol_dir / "summary.json").read_text())
    assert parent.data.metrics["test/top1_mean"] == pytest.approx(summary["test_top1"]["mean"])
    assert parent.info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    expected = ["final/" + p.relative_to(protocol_dir / "final").as_posix() for p in protocol_dir.glob("final/*/seed*")]
    assert sorted(children) == sorted(["sweep/lr0.5_wd0", "sweep/lr2_wd0", *expected])
    for name, child in children.items():
        run = protocol_dir / name
        epoch_key, result_key = _keys(run)
        history = client.get_metric_history(child.info.run_id, epoch_key)
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(_csv_series(run))
        results = json.loads((run / "results.json").read_text())
        assert child.data.metrics[f"results/{result_key}"] == pytest.approx(results[result_key])
        assert float(child.data.params["config/optim.base_lr"]) == results["config"]["optim"]["base_lr"]
        assert child.data.params["config/data.split"] == ("tune" if name.startswith("sweep") else "final")


def test_mlflow_ui_as_the_docs_give_it_serves_the_store_a_protocol_wrote(protocol_dir, tmp_path):
    """``mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db`` (the docs' command, on a free port of
    127.0.0.1, one worker, no job runner) answers with the protocol's parent run: the ``mlflow`` extra installs MLflow
    with its server (``mlflow-skinny`` has none: ``No module named 'flask'``). Then it is stopped with every process
    it started."""
    psutil = pytest.importorskip("psutil")
    out, port = protocol_dir.parents[2], free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{out.name}/mlflow.db"]
    log = (tmp_path / "mlflow-ui.log").open("w")
    # its job runner off: the UI does not use it, and it starts 8 more processes that import MLflow
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=out.parent,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped below with every child
    )
    url = f"http://127.0.0.1:{port}"
    processes = []
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "mlflow-ui.log").read_text()[-3000:]
            processes = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                    assert answer.read() == b"OK"
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow ui did not answer within 180 s"
                time.sleep(0.5)
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=vpt-lightning") as r:
            experiment = json.load(r)["experiment"]["experiment_id"]
        search = {"experiment_ids": [experiment], "filter": f"tags.`vpt.group` = '{GROUP}'"}
        request = urllib.request.Request(
            f"{url}/api/2.0/mlflow/runs/search", json.dumps(search).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            (parent,) = json.load(r)["runs"]
        metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
        summary = json.loads((protocol_dir / "summary.json").read_text())
        assert metrics["test/top1_mean"] == pytest.approx(summary["test_top1"]["mean"])
    finally:
        try:
            processes += [p for p in psutil.Process(server.pid).children(recursive=True) if p not in processes]
            os.killpg(server.pid, signal.SIGTERM)
        except (psutil.NoSuchProcess, ProcessLookupError):  # it ended by itself (the assertion above says why)
            pass
        _, alive = psutil.wait_procs(processes, timeout=30)
        for process in alive:
            process.kill()
        server.wait(timeout=30)
        log.close()
    assert not alive, f"mlflow ui left {alive} running after SIGTERM"


def test_wandb_offline_run_folders_hold_group_config_metrics_and_results(protocol_dir):
    runs = sorted(protocol_dir.glob("**/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 3
    for path in runs:
        run = path.parents[2]
        records = read_wandb_records(path)
        kinds = {r.WhichOneof("record_type") for r in records}
        assert {"run", "config", "history", "exit"} <= kinds
        info = next(r.run for r in records if r.HasField("run"))
        assert info.run_group == GROUP and info.display_name == run.relative_to(protocol_dir).as_posix()
        config = {u.key: json.loads(u.value_json) for r in records if r.HasField("config") for u in r.config.update}
        results = json.loads((run / "results.json").read_text())
        assert config["config/optim.base_lr"] == results["config"]["optim"]["base_lr"]
        history = [
            {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in records
            if r.HasField("history")
        ]
        epoch_key, result_key = _keys(run)
        assert [h[epoch_key] for h in history if epoch_key in h] == pytest.approx(_csv_series(run))
        final = [h[f"results/{result_key}"] for h in history if f"results/{result_key}" in h]
        assert final == pytest.approx([results[result_key]])
