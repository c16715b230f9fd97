"""vpt-tune's protocol (sweep -> select -> final seeds, resume) and vpt-report's tables."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMOKE_RUN, TINY_RUN, run_cli_in_process

from vpt_lightning.config import compose, variant_suffix
from vpt_lightning.data.registry import vtab_tasks
from vpt_lightning.protocol.report import build_report, write_report
from vpt_lightning.protocol.task_protocol import diverged, grid_points, mean_std, point_name, run_protocol, select_best
from vpt_lightning.runs.training import train

TINY = [
    *TINY_RUN,
    "protocol.base_lr=[0.5,2]",
    "protocol.weight_decay=[0,0.001]",
    "protocol.seeds=[1,2]",
]


def test_selection_takes_best_last_epoch_val_and_breaks_ties_by_smaller_lr():
    runs = [
        {"point": {"base_lr": 5.0, "weight_decay": 0.0}, "val/top1": 0.7},
        {"point": {"base_lr": 1.0, "weight_decay": 0.01}, "val/top1": 0.7},
        {"point": {"base_lr": 1.0, "weight_decay": 0.001}, "val/top1": 0.7},
        {"point": {"base_lr": 0.1, "weight_decay": 0.0}, "val/top1": 0.6},
    ]
    assert select_best(runs)["point"] == {"base_lr": 1.0, "weight_decay": 0.001}
    with pytest.raises(ValueError):
        select_best([])


def test_mean_std_against_statistics():
    values = [0.61, 0.64, 0.58]
    assert mean_std(values) == {"mean": pytest.approx(sum(values) / 3), "std": pytest.approx(statistics.stdev(values))}
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0}


def test_grid_uses_the_lower_grid_for_tuned_backbones():
    cfg = compose(["protocol.num_tokens=[5,10]"], config_name="tune")
    points = grid_points(cfg.protocol, "vpt_deep")
    assert len(points) == 2 * 10 * 4 and {p["num_tokens"] for p in points} == {5, 10}
    assert {p["base_lr"] for p in grid_points(cfg.protocol, "full")} == {0.005, 0.001, 0.0005, 0.0001}


def test_protocol_sweeps_selects_runs_seeds_and_resumes(tmp_path):
    cfg = compose(TINY, config_name="tune")
    calls = []

    def counting_train(job):
        calls.append((job.run_dir, job.ckpt_path, job.optim.base_lr, job.data.split, job.seed))
        return train(job)

    summary = run_protocol(cfg, tmp_path, counting_train)
    sweep_dirs = sorted(p.name for p in (tmp_path / "sweep").iterdir())
    assert sweep_dirs == ["lr0.5_wd0", "lr0.5_wd0.001", "lr2_wd0", "lr2_wd0.001"] and len(calls) == 6
    vals = {(r["point"]["base_lr"], r["point"]["weight_decay"]): r["val/top1"] for r in summary["sweep"]}
    best = max(vals.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
    assert (summary["selected"]["base_lr"], summary["selected"]["weight_decay"]) == best
    finals = [c for c in calls if c[3] == "final"]
    assert [c[4] for c in finals] == [1, 2] and all(c[2] == best[0] for c in finals)
    final_dir = tmp_path / "final" / point_name(summary["selected"])
    per_seed = [json.loads((final_dir / f"seed{s}" / "results.json").read_text())["test/top1"] for s in (1, 2)]
    assert summary["test_top1"]["mean"] == pytest.approx(sum(per_seed) / 2)
    # sweep runs never touch the test set
    assert all("test/top1" not in json.loads(p.read_text()) for p in (tmp_path / "sweep").glob("*/results.json"))
    # finished runs are not repeated; a run that stopped half-way resumes from its last checkpoint
    (final_dir / "seed2" / "results.json").unlink()
    calls.clear()
    again = run_protocol(cfg, tmp_path, counting_train)
    assert [(Path(c[0]).name, Path(c[1]).name if c[1] else None) for c in calls] == [("seed2", "last.ckpt")]
    assert again["selected"] == summary["selected"]
    assert (tmp_path / "summary.md").read_text().startswith("# train / vpt_deep")


def test_vpt_tune_command_writes_a_summary(tmp_path):
    exe = Path(sys.executable).parent / "vpt-tune"
    proc = subprocess.run(
        [str(exe), *TINY, "protocol.seeds=[3]", "task_name=demo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "outputs" / "demo" / "protocol" / "vpt_deep" / "summary.json").read_text())
    assert list(summary["test_top1_per_seed"]) == ["3"] and "test top-1 at the last epoch" in proc.stdout
    # the final run carries its task package (vpt-train's <run>/task/), loadable like any package
    packages = list((tmp_path / "outputs" / "demo" / "protocol" / "vpt_deep" / "final").glob("*/seed3/task"))
    assert len(packages) == 1 and sorted(p.name for p in packages[0].iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    # the tune-split grid points are only compared: they write no package
    assert not list((tmp_path / "outputs" / "demo" / "protocol" / "vpt_deep" / "sweep").glob("*/task"))


def _summary(task, tuning, tests, percent=0.5):
    return {
        "task_name": task,
        "tuning": tuning,
        "test_top1_per_seed": {str(i): t for i, t in enumerate(tests)},
        "test_top1": mean_std(tests),
        "trainable_params": 10,
        "trainable_percent": percent,
    }


def test_report_means_only_over_complete_sets_and_shows_missing(tmp_path):
    natural = [t.config_name for t in vtab_tasks("natural")]
    summaries = [_summary(task, "vpt_deep", [0.5 + 0.01 * i, 0.52 + 0.01 * i]) for i, task in enumerate(natural)]
    summaries.append(_summary("vtab_eurosat", "vpt_deep", [0.9]))
    summaries.append(_summary("vtab_cifar100", "linear", [0.4]))
    markdown, table = build_report(summaries)
    expected_natural = statistics.fmean(100 * (0.51 + 0.01 * i) for i in range(7))
    # columns follow the paper's order of methods: linear before vpt_deep
    assert f"| VTAB natural (mean of 7) | incomplete (1/7) | {expected_natural:.2f} |" in markdown
    assert "| VTAB specialized (mean of 4) | incomplete (0/4) | incomplete (1/4) |" in markdown
    assert "| VTAB mean of the 3 group means | incomplete (0/3) | incomplete (1/3) |" in markdown
    row = next(line for line in markdown.splitlines() if line.startswith("| vtab_eurosat"))
    assert "90.00 ± 0.00" in row and "—" in row and "96.1" in row  # ours, missing linear, the paper's VPT-Deep
    assert "| vtab_cifar100 | 40.00 ± 0.00 (0.50% params) | 51.00 ± 1.41 (0.50% params) | 63.4 | 78.8 |" in markdown
    rows = list(csv.DictReader(table.splitlines()))
    task_rows = [r for r in rows if r["task"].startswith("vtab_")]
    assert len(task_rows) == 19 * 2 and len([r for r in task_rows if r["test_top1_mean"]]) == 9  # missing: empty
    assert {r["tuning"] for r in rows} == {"vpt_deep", "linear"} and len(rows) - len(task_rows) == 6 * 2  # aggregates
    assert "| vtab_resisc45 | — | — | 68.6 | 83.4 |" in markdown  # a task with no result is a row, shown missing
    paths = write_report(summaries, tmp_path)
    assert paths["png"].stat().st_size > 1000 and paths["csv"].read_bytes() == table.encode()  # CRLF as written


# ---- robustness of the protocol ---------------------------------------------------------------------------
ONE_POINT = TINY + ["protocol.base_lr=[1]", "protocol.weight_decay=[0]", "protocol.seeds=[1]"]


def test_diverged_runs_are_never_selected():
    nan = float("nan")
    assert diverged({"train/loss_epoch": nan, "val/top1": 0.9}) and diverged({"val/loss": float("inf")})
    assert not diverged({"train/loss_epoch": 0.3, "val/loss": 1.2, "val/top1": 0.5})
    runs = [
        {"point": {"base_lr": 50.0, "weight_decay": 0.0}, "val/top1": 0.9, "diverged": True},
        {"point": {"base_lr": 1.0, "weight_decay": 0.0}, "val/top1": 0.4},
        {"point": {"base_lr": 0.1, "weight_decay": 0.0}, "failed": "RuntimeError: out of memory"},
    ]
    assert select_best(runs)["point"]["base_lr"] == 1.0
    with pytest.raises(ValueError, match="all diverged or failed"):
        select_best([runs[0], runs[2]])


def test_a_diverging_lr_is_flagged_in_a_real_sweep(tmp_path):
    cfg = compose(
        TINY + ["protocol.base_lr=[1,1e30]", "protocol.weight_decay=[0]", "protocol.seeds=[1]"], config_name="tune"
    )
    summary = run_protocol(cfg, tmp_path)
    assert summary["diverged"] == ["lr1e+30_wd0"] and summary["selected"]["base_lr"] == 1.0
    # it stopped at the NaN loss (NonFiniteLossError): diverged, not failed, and no results.json
    assert summary["failed"] == [] and not (tmp_path / "sweep" / "lr1e+30_wd0" / "results.json").exists()
    assert "diverged sweep points (not selectable): lr1e+30_wd0" in (tmp_path / "summary.md").read_text()


def test_a_failing_sweep_point_is_skipped_and_retried_later(tmp_path):
    cfg = compose(
        TINY + ["protocol.base_lr=[0.5,2]", "protocol.weight_decay=[0]", "protocol.seeds=[1]"], config_name="tune"
    )

    def flaky_train(job):
        if job.optim.base_lr == 2:
            raise torch.OutOfMemoryError("out of memory")
        return train(job)

    summary = run_protocol(cfg, tmp_path, flaky_train)
    assert summary["failed"] == ["lr2_wd0"] and summary["selected"]["base_lr"] == 0.5
    assert "OutOfMemoryError: out of memory" in json.dumps(summary["sweep"])
    retried = []
    run_protocol(cfg, tmp_path, lambda job: retried.append((job.optim.base_lr, job.data.split)) or train(job))
    assert [lr for lr, split in retried if split == "tune"] == [
        2
    ]  # the finished point is kept, the failed one runs again

    def broken(job):
        raise FileNotFoundError("data.root missing")

    with pytest.raises(FileNotFoundError, match="data.root missing"):  # every point failed: the cause, not a summary
        run_protocol(cfg, tmp_path / "other", broken)


def test_final_runs_follow_the_selection_and_changed_configs_are_refused(tmp_path):
    cfg = compose(
        TINY + ["protocol.base_lr=[0.5,2]", "protocol.weight_decay=[0]", "protocol.seeds=[1]"], config_name="tune"
    )
    first = run_protocol(cfg, tmp_path)
    # another sweep result changes the selection: the final runs of the new point are made, not the old reused
    loser = next(r for r in first["sweep"] if r["point"] != {k: first["selected"][k] for k in r["point"]})
    results = tmp_path / "sweep" / point_name(loser["point"]) / "results.json"
    data = json.loads(results.read_text())
    results.write_text(json.dumps({**data, "val/top1": 2.0}))
    second = run_protocol(cfg, tmp_path)
    assert point_name(second["selected"]) == point_name(loser["point"]) != point_name(first["selected"])
    assert (tmp_path / "final" / point_name(loser["point"]) / "seed1" / "results.json").is_file()
    # a finished run of another configuration is not silently reused
    changed = compose(
        TINY + ["protocol.base_lr=[0.5,2]", "protocol.weight_decay=[0]", "protocol.seeds=[1]", "optim.warmup_epochs=3"],
        config_name="tune",
    )
    with pytest.raises(
        ValueError, match=r"holds a finished run of another configuration \(optim.warmup_epochs: 10 -> 3\)"
    ):
        run_protocol(changed, tmp_path)


def test_a_run_interrupted_after_its_last_epoch_gets_its_val_metrics(tmp_path):
    cfg = compose(ONE_POINT, config_name="tune")
    run_protocol(cfg, tmp_path)
    sweep_run = tmp_path / "sweep" / "lr1_wd0"
    before = json.loads((sweep_run / "results.json").read_text())
    (sweep_run / "results.json").unlink()  # stopped after the last checkpoint, before results were written
    (tmp_path / "summary.json").unlink()
    summary = run_protocol(cfg, tmp_path)
    after = json.loads((sweep_run / "results.json").read_text())
    assert (
        after["val/top1"] == pytest.approx(before["val/top1"]) and summary["selected"]["val/top1"] == after["val/top1"]
    )


def test_selection_reads_the_last_epoch_not_the_best(tmp_path):
    cfg = compose(
        ONE_POINT
        + ["trainer.max_epochs=4", "data.num_train=64", "data.batch_size=8", "trainer.limit_train_batches=1.0"],
        config_name="tune",
    )
    summary = run_protocol(cfg, tmp_path)
    rows = list(csv.DictReader((tmp_path / "sweep" / "lr1_wd0" / "csv" / "metrics.csv").open()))
    per_epoch = [float(r["val/top1"]) for r in rows if r.get("val/top1")]
    assert len(per_epoch) == 4 and summary["selected"]["val/top1"] == pytest.approx(per_epoch[-1])


def test_vpt_tune_multirun_writes_one_summary_per_strategy_in_resumable_folders(tmp_path):
    # in this process: test_vpt_tune_command_writes_a_summary runs the console script
    args = ["-m", *ONE_POINT, "task_name=demo", "tuning=vpt_deep,linear"]
    proc = run_cli_in_process("tune", args, tmp_path)
    assert proc.returncode == 0 and "Epoch 0" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    for tuning in ("vpt_deep", "linear"):
        assert (tmp_path / "outputs" / "demo" / "protocol" / tuning / "summary.json").is_file()
    again = run_cli_in_process("tune", args, tmp_path)
    assert again.returncode == 0 and "Epoch 0" not in again.stderr + again.stdout  # nothing trained again


def test_a_protocol_variant_is_named_by_the_overrides_of_its_ablation_keys():
    keys = ["recipe.num_tokens", "prompt"]
    assert variant_suffix(["+experiment=quickstart", "trainer.max_epochs=1", "tuning=linear"], keys) == ""
    assert variant_suffix(["recipe.num_tokens=10", "data.root=/data/vtab"], keys) == "/recipe.num_tokens=10"
    overrides = ["prompt.depth=[0,1]", "recipe.num_tokens=5", "prompt=shallow", "recipe.num_tokens_x=1"]
    assert variant_suffix(overrides, keys) == "/prompt.depth=[0,1],prompt=shallow,recipe.num_tokens=5"
    assert variant_suffix(["prompt.init=a/b"], keys) == "/prompt.init=a_b"  # one folder level, whatever the value
    cfg = compose(["recipe.num_tokens=10"], config_name="tune")  # composed in Python: no command line, no variant
    assert cfg.protocol.variant == "" and cfg.tracking.group == "train/vpt_deep"


def test_vpt_tune_multirun_over_prompt_lengths_gives_each_its_folder_and_vpt_viz_plots_both(tmp_path):
    """The prompt-length ablation as the docs give it (``vpt-tune -m ... recipe.num_tokens=1,2``): each value runs
    in a protocol folder of its own, ``<tuning>/recipe.num_tokens=<p>``, so that ``vpt-viz ablation`` over their
    parent plots one point per value; the same single command then finds its folder and trains nothing again."""
    # in this process (test_vpt_tune_command_writes_a_summary runs vpt-tune's console script)
    proc = run_cli_in_process("tune", ["-m", *ONE_POINT, "task_name=demo", "recipe.num_tokens=1,2"], tmp_path)
    assert proc.returncode == 0 and "Epoch 0" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    protocol = tmp_path / "outputs" / "demo" / "protocol" / "vpt_deep"
    summaries = {p.parent.name: json.loads(p.read_text()) for p in protocol.glob("*/summary.json")}
    assert sorted(summaries) == ["recipe.num_tokens=1", "recipe.num_tokens=2"]
    for length in (1, 2):  # each folder's final run trained its own prompt length
        (results,) = (protocol / f"recipe.num_tokens={length}" / "final").glob("*/seed1/results.json")
        assert json.loads(results.read_text())["config"]["prompt"]["num_tokens"] == length
    viz = run_cli_in_process("viz", ["ablation", protocol], tmp_path)
    assert viz.returncode == 0, viz.stderr[-3000:]
    assert (protocol / "ablation.png").stat().st_size > 1000
    again = run_cli_in_process("tune", [*ONE_POINT, "task_name=demo", "recipe.num_tokens=2"], tmp_path)
    assert again.returncode == 0 and "Epoch 0" not in again.stderr + again.stdout, again.stderr[-3000:]
    assert not (protocol / "summary.json").exists()


# ---- the report against the paper's own numbers -----------------------------------------------------------
def test_report_of_the_papers_per_task_numbers_gives_its_aggregates(tmp_path):
    from vpt_lightning.data.registry import TASKS
    from vpt_lightning.protocol.paper import REFERENCE

    summaries = [
        _summary(name, method, [REFERENCE[name][method] / 100]) | {"path": f"{name}/{method}"}
        for name in TASKS
        for method in ("vpt_deep", "full")
    ]
    markdown, table = build_report(summaries)
    rows = {(r["task"], r["tuning"]): r for r in csv.DictReader(table.splitlines())}
    # paper Table 1: mean of group means 71.96 (full 68.96), mean over 19 tasks 69.43 (65.57), FGVC 89.11 (88.54); the
    # paper's per-task numbers are rounded to 0.1, so means of them differ from its printed means by < 0.05
    for label, deep, full in (
        ("VTAB mean of the 3 group means", 71.96, 68.96),
        ("VTAB mean over the 19 tasks", 69.43, 65.57),
        ("FGVC mean of 5", 89.11, 88.54),
        ("VTAB structured (mean of 8)", 54.98, 47.64),
    ):
        assert float(rows[label, "vpt_deep"]["test_top1_mean"]) == pytest.approx(deep, abs=0.05)
        assert float(rows[label, "full"]["test_top1_mean"]) == pytest.approx(full, abs=0.05)
        assert rows[label, "vpt_deep"]["test_top1_mean"] == rows[label, "vpt_deep"]["paper_top1"]
    assert rows["vtab_cifar100", "vpt_deep"]["test_top1_mean"] == "78.80"  # percent, like the paper's column
    with pytest.raises(ValueError, match=r"two results for task 'vtab_dtd' / tuning 'full': vtab_dtd/full and again"):
        build_report(summaries + [_summary("vtab_dtd", "full", [0.5]) | {"path": "again"}])


def test_report_lists_every_task_of_a_benchmark_it_has_seen(tmp_path):
    markdown, table = build_report([_summary("fgvc_cub", "vpt_deep", [0.8])])
    for task in ("fgvc_nabirds", "fgvc_oxford_flowers", "fgvc_stanford_dogs", "fgvc_stanford_cars"):
        assert f"| {task} | — | 84.2" in markdown or f"| {task} | — |" in markdown
    assert "vtab_cifar100" not in markdown and "| FGVC mean of 5 | incomplete (1/5) | 89.10 |" in markdown


def test_hparams_search_grids_are_the_protocols_and_run_as_a_multirun(tmp_path):
    tune = compose([], config_name="tune").protocol
    for name, lrs in (("vpt_grid", tune.base_lr), ("tuned_backbone_grid", tune.base_lr_tuned_backbone)):
        params = compose([f"+hparams_search={name}"]).hydra.sweeper.params
        assert [float(v) for v in params["optim.base_lr"].split(",")] == [float(v) for v in lrs]
        assert [float(v) for v in params["optim.weight_decay"].split(",")] == [float(v) for v in tune.weight_decay]
    proc = run_cli_in_process(  # in this process: test_cli.py runs vpt-train's console script
        "train",
        [
            "+hparams_search=vpt_grid",
            *TINY[:6],
            "run_name=grid",
            "task_name=g",
            "optim.base_lr=0.5,2",
            "optim.weight_decay=0",
        ],  # the command line narrows the grid
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [
        json.loads(p.read_text())
        for p in sorted((tmp_path / "outputs" / "g" / "multirun" / "grid").glob("*/results.json"))
    ]
    assert [r["config"]["optim"]["base_lr"] for r in results] == [0.5, 2.0]
    assert all(r["config"]["data"]["split"] == "tune" and "test/top1" not in r and "val/top1" in r for r in results)


def test_report_averages_groups_of_tasks_outside_the_benchmarks():
    def summary(task, tuning, tests, group):
        return _summary(task, tuning, tests) | {"task_group": group}

    summaries = [
        summary("mini_count", "vpt_deep", [0.5, 0.6], "structured"),
        summary("mini_loc", "vpt_deep", [0.3], "structured"),
        summary("mini_count", "linear", [0.4], "structured"),
        summary("mini_shape", "linear", [0.9], "natural"),
    ]
    markdown, table = build_report(summaries)
    assert "| structured (mean of 2: mini_count, mini_loc) | incomplete (1/2) | 42.50 |" in markdown  # (55 + 30) / 2
    assert "| natural (mean of 1: mini_shape) | 90.00 | incomplete (0/1) |" in markdown
    assert "(paper)" not in markdown and "VTAB" not in markdown  # no benchmark task: no paper columns or VTAB rows


def test_minivtab_experiment_sweeps_every_task_and_strategy():
    """``vpt-tune -m +experiment=minivtab`` (shipped in the package) runs the 4 tasks x 7 strategies."""
    cfg = compose(["+experiment=minivtab"], config_name="tune")
    params = cfg.hydra.sweeper.params
    assert params["data.task"].split(",") == ["kind", "count", "location", "orientation"]
    assert params["tuning"].split(",") == ["vpt_deep", "vpt_shallow", "linear", "full", "bias", "adapter", "lora"]
    assert cfg.paths.output_dir.endswith("/minivtab") or cfg.paths.output_dir == "outputs/minivtab"


def test_minivtab_runs_end_to_end_and_reports_group_means(tmp_path):
    """mini-VTAB as docs/concepts/protocol.md gives it (vpt-tune -m +experiment=minivtab, then vpt-report: sweep ->
    select -> final -> report) on 2 tasks x 2 strategies (command-line lists replace the experiment's), shrunk to
    seconds."""
    shrink = [
        *SMOKE_RUN,
        "protocol.base_lr=[1]",
        "protocol.weight_decay=[0]",
    ]
    out = tmp_path / "mv"
    # both commands in this process: test_vpt_tune_command_writes_a_summary and test_methods.py run their scripts
    proc = run_cli_in_process(
        "tune",
        [
            "-m",
            "+experiment=minivtab",
            "data.task=kind,count",
            "tuning=vpt_deep,linear",
            f"paths.output_dir={out}",
            *shrink,
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(str(p.relative_to(out)) for p in out.glob("*/protocol/*/summary.json")) == [
        f"minivtab_{task}/protocol/{tuning}/summary.json"
        for task in ("count", "kind")
        for tuning in ("linear", "vpt_deep")
    ]
    proc = run_cli_in_process("report", [out], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    for task in ("minivtab_kind", "minivtab_count"):
        assert f"| {task} |" in report
    assert "| natural (mean of 1: minivtab_kind) |" in report and "| structured (mean of 1: minivtab_count) |" in report
    assert (out / "report.png").stat().st_size > 1000


def test_report_finds_the_papers_column_through_the_method_registry():
    """A run label that is no method name (VPT-Deep at p=50 under its own label) gets the paper's VPT-Deep
    numbers through the method its summary records; Partial-k has no paper column (the paper's table lacks it)."""
    summaries = [
        _summary("vtab_cifar100", "deep_p50", [0.7]) | {"method": "vpt_deep"},
        _summary("vtab_cifar100", "partial_2", [0.6]) | {"method": "partial"},
    ]
    markdown, table = build_report(summaries)
    rows = {(r["task"], r["tuning"]): r for r in csv.DictReader(table.splitlines())}
    assert rows["vtab_cifar100", "deep_p50"]["paper_top1"] == "78.8"
    assert rows["vtab_cifar100", "partial_2"]["paper_top1"] == ""
    assert "deep_p50 (paper)" in markdown and "partial_2 (paper)" not in markdown


def test_report_columns_come_from_the_method_registry(monkeypatch):
    """The column order is the registry's (each method's ``report_order``): a newly registered method takes its
    place without the report knowing it; a label of no registered method comes last."""
    from vpt_lightning.methods import TuningMethod, get_method, method_names, methods_in_report_order, registry
    from vpt_lightning.protocol.report import results_table, to_csv, to_markdown

    order = methods_in_report_order()
    assert sorted(order) == method_names()
    assert len({get_method(name).report_order for name in order}) == len(order)  # no tie among our methods
    # the paper's Table 1: Full, head-oriented, backbone-oriented, VPT
    assert [
        m for m in order if m in ("full", "linear", "partial", "mlp", "sidetune", "bias", "adapter", "vpt_deep")
    ] == ["full", "linear", "partial", "mlp", "sidetune", "bias", "adapter", "vpt_deep"]

    class Probe(TuningMethod):
        name = "probe"
        report_order = (get_method("mlp").report_order + get_method("sidetune").report_order) / 2

    monkeypatch.setitem(registry._METHODS, "probe", Probe)
    runs = (("vpt_deep", "vpt_deep"), ("zz_custom", "zz_custom"), ("probe_1", "probe"), ("mlp_3", "mlp"))
    table = results_table([_summary("vtab_cifar100", label, [0.5]) | {"method": method} for label, method in runs])
    assert table.tunings == ["mlp_3", "probe_1", "vpt_deep", "zz_custom"]
    assert table.paper_columns == ["vpt_deep"] and table.paper["vtab_cifar100", "vpt_deep"] == 78.8
    markdown, text = to_markdown(table), to_csv(table)
    assert markdown.splitlines()[0] == (
        "| task | mlp_3 (ours) | probe_1 (ours) | vpt_deep (ours) | zz_custom (ours) | vpt_deep (paper) |"
    )
    assert [r["tuning"] for r in csv.DictReader(text.splitlines()) if r["task"] == "vtab_cifar100"] == table.tunings
    assert (markdown, text) == build_report(
        [_summary("vtab_cifar100", label, [0.5]) | {"method": method} for label, method in runs]
    )
