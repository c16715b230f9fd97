"""TaskStore: task packages in watched folders, loaded on first use into a byte-bounded cache, changed while
serving; every row equals its task's own TaskModel."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE

from vpt_lightning.serving.package_io import install_package, remove_package, stage_package
from vpt_lightning.serving.task_store import TaskStore, TaskUnavailable, UnknownTask
from vpt_lightning.sharing.task_sources import load_task
from vpt_lightning.task_model import CONFIG_FILE, WEIGHTS_FILE, TaskSpec, build_task_model

pytest.importorskip("peft")

TASKS = {
    "deep1": dict(num_classes=3, prompt={"num_tokens": 1}),
    "deep12": dict(num_classes=4, prompt={"num_tokens": 12, "project": 8}),
    "deep5_late": dict(num_classes=2, prompt={"num_tokens": 5, "depth": [1, 3]}),
    "shallow4": dict(num_classes=5, prompt={"num_tokens": 4, "deep": False}, tuning={"method": "vpt_shallow"}),
    "lora": dict(num_classes=3, prompt={"num_tokens": 0}, tuning={"method": "lora", "rank": 2, "alpha": 4}),
    "adapter": dict(num_classes=4, prompt={"num_tokens": 0}, tuning={"method": "adapter", "reduction": 4}),
    "linear": dict(num_classes=6, prompt={"num_tokens": 0}, tuning={"method": "linear"}),
    "mlp": dict(num_classes=2, prompt={"num_tokens": 0}, tuning={"method": "mlp", "mlp_layers": 3}),
    "added": dict(num_classes=3, prompt={"num_tokens": 1, "location": "add"}),  # outside the one pass
}


def write_package(folder: Path, seed: int, num_classes: int = 3, **spec) -> Path:
    """A task package whose trained tensors are all random (zeros would hide a missing LoRA/adapter update)."""
    torch.manual_seed(seed)
    task = build_task_model(TaskSpec(num_classes=num_classes, backbone=TINY_BACKBONE, **spec))
    with torch.no_grad():
        for p in task.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    task.save_pretrained(folder)
    return folder


def package_files(folder: Path) -> dict:
    return {name: (folder / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}


def own_logits(folder: Path, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_task(folder)(images)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A folder of packages of every method mix, and spare versions of two of them."""
    root = tmp_path_factory.mktemp("library")
    tasks = root / "tasks"
    for i, (name, kw) in enumerate(TASKS.items()):
        write_package(tasks / name, i, **kw)
    spare = root / "spare"
    write_package(spare / "deep1_v2", 100, **TASKS["deep1"])
    write_package(spare / "new", 101, num_classes=7, prompt={"num_tokens": 3})
    return tasks, spare


@pytest.fixture
def tasks_dir(library, tmp_path):
    """A fresh copy of the library's task folder (tests change it)."""
    folder = tmp_path / "tasks"
    shutil.copytree(library[0], folder)
    return folder


@pytest.fixture(scope="module")
def store(library):
    return TaskStore(folders=[library[0]])


def test_indexed_from_configs_loaded_on_first_use_and_every_row_equals_its_task_alone(store, library):
    assert store.task_names == sorted(TASKS)
    assert all(store.state_of(n) == "indexed" for n in TASKS)  # nothing read but the configs
    names = [list(TASKS)[i % len(TASKS)] for i in (4, 0, 3, 7, 8, 1, 6, 2, 5, 0, 4, 6, 8, 3, 1, 5, 7, 2, 4)]
    torch.manual_seed(1)
    images = torch.randn(len(names), 3, 32, 32)
    with torch.no_grad():
        logits = store(images, names)
    for name, kw in TASKS.items():
        rows = [i for i, n in enumerate(names) if n == name]
        width = kw["num_classes"]
        torch.testing.assert_close(logits[rows, :width], own_logits(library[0] / name, images[rows]), rtol=0, atol=1e-5)
        assert torch.isneginf(logits[rows, width:]).all()
        assert store.state_of(name) == "resident"
    handles = [store.open(n) for n in TASKS]
    store.release(handles)
    assert {h.name for h in handles if h.tensors.one_pass} == set(TASKS) - {"added"}


def test_a_cache_bounded_in_bytes_evicts_the_least_recently_used_and_never_passes_its_budget(library):
    sizes = TaskStore(folders=[library[0]])
    order = ["deep1", "linear", "lora", "deep5_late"]
    every = {n: sizes.open(n).tensors.nbytes for n in order}
    budget = every["deep1"] + every["linear"] + every["lora"]
    store = TaskStore(folders=[library[0]], cache_bytes=budget)
    for name in order[:3]:
        store.release([store.open(name)])
    assert store.cache.used == budget
    store.release([store.open("deep1")])  # used again: linear, then lora are the least recently used
    store.release([store.open("deep5_late")])  # needs more than linear's bytes: both leave
    assert store.cache.used <= budget
    assert [store.state_of(n) for n in order] == ["resident", "indexed", "indexed", "resident"]
    assert store.snapshot()["cache"]["evictions"] == 2


def test_tasks_in_flight_are_never_evicted_and_a_task_without_room_serves_its_batch_only(library):
    sizes = TaskStore(folders=[library[0]])
    deep1, linear = sizes.open("deep1").tensors.nbytes, sizes.open("linear").tensors.nbytes
    assert sizes.open("deep5_late").tensors.nbytes <= deep1 + linear
    store = TaskStore(folders=[library[0]], cache_bytes=deep1 + linear)
    held = [store.open("deep1"), store.open("linear")]
    extra = store.open("deep5_late")  # no room beside two tasks in use: loaded for this batch only
    assert extra.key is None and store.cache.names() == {"deep1", "linear"}
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = store.classify(images, [held[0], extra, held[1]])
    torch.testing.assert_close(logits[[1], :2], own_logits(library[0] / "deep5_late", images[[1]]), rtol=0, atol=1e-5)
    store.release(held + [extra])
    assert store.cache.used <= deep1 + linear
    store.release([store.open("deep5_late")])  # now room is made: the least recently used leave
    assert "deep5_late" in store.cache.names() and store.cache.used <= deep1 + linear


def test_eviction_under_load_from_many_threads_keeps_the_bound_and_every_answer(library):
    store = TaskStore(folders=[library[0]])
    sizes = {n: store.open(n).tensors.nbytes for n in TASKS}
    budget = max(2 * max(sizes.values()), sum(sizes.values()) // 2)
    store = TaskStore(folders=[library[0]], cache_bytes=budget)
    torch.manual_seed(3)
    images = torch.randn(2, 3, 32, 32)
    want = {n: own_logits(library[0] / n, images) for n in TASKS}
    errors, peak = [], [0]

    def client(seed: int) -> None:
        names = list(TASKS)
        for step in range(12):
            pair = [names[(seed + step) % len(names)], names[(seed * 3 + step) % len(names)]]
            handles = [store.open(n) for n in pair]
            peak[0] = max(peak[0], store.cache.used)
            try:
                with torch.no_grad():
                    logits = store.classify(images, handles)
                for row, name in enumerate(pair):
                    width = TASKS[name]["num_classes"]
                    if not torch.allclose(logits[row, :width], want[name][row], atol=1e-5, rtol=0):
                        errors.append((name, step))
            finally:
                store.release(handles)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and peak[0] <= budget and store.cache.evictions > 0


def test_pins_stay_in_memory_and_bad_pins_fail(library):
    sizes = TaskStore(folders=[library[0]])
    budget = sizes.open("deep12").tensors.nbytes + sizes.open("mlp").tensors.nbytes
    store = TaskStore(folders=[library[0]], cache_bytes=budget, pins=["deep12"])
    assert store.state_of("deep12") == "pinned"  # loaded at start
    for name in TASKS:
        if name != "deep12":
            store.release([store.open(name)])
    assert store.state_of("deep12") == "pinned"
    with pytest.raises(UnknownTask, match=r"cannot pin \['nope'\]"):
        store.pin("nope")
    with pytest.raises(ValueError, match="pinned tasks do not fit the cache of 10 bytes"):
        TaskStore(folders=[library[0]], cache_bytes=10, pins=["deep1"])


def test_a_request_is_answered_by_the_version_it_opened(tasks_dir, library):
    store = TaskStore(folders=[tasks_dir])
    images = torch.randn(2, 3, 32, 32)
    old = store.open("deep1")
    staged = stage_package(tasks_dir, "deep1", package_files(library[1] / "deep1_v2"))
    install_package(staged, tasks_dir / "deep1")
    assert store.refresh()["changed"] == ["deep1"]
    new = store.open("deep1")
    with torch.no_grad():
        both = store.classify(images, [old, new])
    assert old.version != new.version
    torch.testing.assert_close(both[[0], :3], own_logits(library[0] / "deep1", images[[0]]), rtol=0, atol=1e-5)
    torch.testing.assert_close(both[[1], :3], own_logits(library[1] / "deep1_v2", images[[1]]), rtol=0, atol=1e-5)
    store.release([old, new])
    assert store.cache.names() == {"deep1"} and len(store.cache) == 1  # the old version left with its last user


def wait_for(condition, seconds: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, f"not seen within {seconds} s"
        time.sleep(0.02)
    return time.monotonic() - start


def test_the_watcher_sees_an_add_a_replace_and_a_remove_within_two_seconds(tasks_dir, library):
    store = TaskStore(folders=[tasks_dir])
    store.watch()
    try:
        before = store.open("linear")
        store.release([before])
        # added: written beside and renamed in
        install_package(stage_package(tasks_dir, "new", package_files(library[1] / "new")), tasks_dir / "new")
        wait_for(lambda: "new" in store, 2.0)
        # replaced in one step (the folder swapped)
        install_package(stage_package(tasks_dir, "deep1", package_files(library[1] / "deep1_v2")), tasks_dir / "deep1")
        v2 = store.open("deep1")  # at once: a load reads the folder as it is now
        store.release([v2])
        assert v2.version == store.check_package(library[1] / "deep1_v2")[1]
        # replaced in place, file by file (each renamed into the package folder)
        for name, data in package_files(library[0] / "mlp").items():
            (tasks_dir / "linear" / f".{name}.tmp").write_bytes(data)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            (tasks_dir / "linear" / f".{name}.tmp").rename(tasks_dir / "linear" / name)
        wait_for(lambda: store.entry("linear").spec.tuning["method"] == "mlp", 2.0)
        # removed
        remove_package(tasks_dir / "adapter")
        wait_for(lambda: "adapter" not in store, 2.0)
    finally:
        store.close()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = store(images, ["new", "linear"])
    torch.testing.assert_close(logits[[0], :7], own_logits(library[1] / "new", images[[0]]), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[[1], :2], own_logits(library[0] / "mlp", images[[1]]), rtol=0, atol=1e-5)


def corrupt(folder: Path, how: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS_FILE)
    if how == "unknown key":
        tensors["backbone.model.blocks.0.attn.qkv.weight"] = torch.zeros(96, 32)
    elif how == "wrong shape":
        tensors["head.weight"] = torch.zeros(4, 32)
    elif how == "non-finite":
        tensors["head.bias"][0] = float("nan")
    elif how == "truncated":
        data = (folder / WEIGHTS_FILE).read_bytes()
        (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
        return
    save_file(tensors, folder / WEIGHTS_FILE)


@pytest.mark.parametrize(
    "how, message",
    [
        (
            "unknown key",
            r"holds tensors outside the ones its task trains: backbone\.model\.blocks\.0\.attn\.qkv\.weight;",
        ),
        (
            "wrong shape",
            r"does not fit the model its config describes: shape mismatches head\.weight: file \(4, 32\) vs",
        ),
        ("non-finite", r"tensor 'head\.bias' has 1 value\(s\) that are not finite"),
        ("truncated", r"is not a safetensors file"),
    ],
)
def test_a_bad_package_is_refused_with_one_line_naming_the_file_and_served_once_fixed(tasks_dir, library, how, message):
    corrupt(tasks_dir / "deep1", how)
    store = TaskStore(folders=[tasks_dir])
    assert "deep1" in store  # indexed from its config
    with pytest.raises(TaskUnavailable, match=message) as err:
        store.open("deep1")
    assert str(tasks_dir / "deep1" / WEIGHTS_FILE) in str(err.value) and "\n" not in str(err.value)
    assert store.state_of("deep1") == "refused" and "deep1" in store.problems
    with pytest.raises(TaskUnavailable):  # refused without reading again while the folder is unchanged
        store.open("deep1")
    install_package(stage_package(tasks_dir, "deep1", package_files(library[0] / "deep1")), tasks_dir / "deep1")
    store.refresh()
    store.release([store.open("deep1")])
    assert store.state_of("deep1") == "resident"


def test_a_package_of_another_backbone_or_method_is_not_indexed(tasks_dir):
    other = tasks_dir / "other"
    torch.manual_seed(0)
    task = build_task_model(TaskSpec(num_classes=3, backbone={**TINY_BACKBONE, "init_seed": 3}))
    task.save_pretrained(other)
    full = tasks_dir / "full"
    build_task_model(
        TaskSpec(num_classes=3, backbone=TINY_BACKBONE, prompt={"num_tokens": 0}, tuning={"method": "full"})
    ).save_pretrained(full)
    (tasks_dir / "bad name!").mkdir()
    store = TaskStore(folders=[tasks_dir])
    assert "other" not in store and "full" not in store
    assert "trained on another backbone" in store.problems["other"] and "fingerprint" in store.problems["other"]
    assert "tuning=full changes backbone weights" in store.problems["full"]
    assert "may hold only letters" in store.problems["bad name!"]
    with pytest.raises(UnknownTask, match=r"unknown task\(s\) \['other'\]"):
        store.open("other")


def test_the_backbone_is_the_first_tasks_or_the_operators_pin(tasks_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no task package in .* to take the backbone from"):
        TaskStore(folders=[tmp_path / "empty"])
    store = TaskStore(backbone=TINY_BACKBONE, folders=[tmp_path / "empty"])
    assert len(store) == 0
    config = json.loads((tasks_dir / "adapter" / CONFIG_FILE).read_text())
    assert TaskStore(folders=[tasks_dir]).identity["fingerprint"] == config["backbone_identity"]["fingerprint"]


def test_put_and_remove_write_the_first_folder_in_one_step(tasks_dir, library):
    store = TaskStore(folders=[tasks_dir])
    version = store.put("fresh", package_files(library[1] / "new"))
    assert not [p for p in tasks_dir.iterdir() if p.name.startswith(".")]  # nothing staged is left
    store.refresh()
    handle = store.open("fresh")
    assert handle.version == version
    store.release([handle])
    bad = package_files(library[1] / "new")
    bad[WEIGHTS_FILE] = bad[WEIGHTS_FILE][:100]
    with pytest.raises(ValueError, match="is not a safetensors file"):
        store.put("fresh", bad)
    assert store.check_package(tasks_dir / "fresh")[1] == version  # the served version is untouched
    store.remove("fresh")
    store.refresh(settle=False)
    assert "fresh" not in store and not (tasks_dir / "fresh").exists()
    for name in ("../escape", "fresh\n"):  # "$" of a pattern also matches before a final newline
        with pytest.raises(ValueError, match="may hold only letters"):
            store.put(name, package_files(library[1] / "new"))
    assert sorted(p.name for p in tasks_dir.iterdir()) == sorted(TASKS)


def test_what_a_put_or_delete_killed_mid_way_left_is_removed_when_a_store_opens_the_folder(tasks_dir, library):
    """A put killed while writing leaves its hidden ``.NAME.new-*`` folder (the index skips it); a store opening the
    folder removes such folders untouched for an hour, and nothing else."""
    import os
    import time

    from vpt_lightning.serving.package_io import stage_package

    staged = stage_package(tasks_dir, "fresh", package_files(library[1] / "new"))  # as a killed put left it
    hour_ago = time.time() - 3601
    stale = [staged, tasks_dir / ".deep1.old-abcd1234", tasks_dir / ".deep1.gone-x_9y8z7w"]
    kept = [tasks_dir / ".fresh.new-recent12", tasks_dir / ".cache", tasks_dir / ".deep1.new-toolong123"]
    for path in [*stale[1:], *kept]:
        path.mkdir()
    (tasks_dir / ".deep1.new-linkto12").symlink_to(tasks_dir / ".cache")
    for path in [*stale, tasks_dir / ".cache", tasks_dir / ".deep1.new-toolong123"]:
        os.utime(path, (hour_ago, hour_ago))
    store = TaskStore(folders=[tasks_dir])
    assert not any(p.exists() for p in stale) and all(p.is_dir() for p in kept)
    assert (tasks_dir / ".deep1.new-linkto12").is_symlink()
    assert sorted(store.task_names) == sorted(TASKS)  # the packages themselves are untouched


def test_a_pickled_store_serves_in_another_process_alike(store):
    """A server's worker gets the store pickled: index and backbone, no loaded tensors, no locks."""
    import pickle

    store.release([store.open("deep1")])
    copy = pickle.loads(pickle.dumps(store))
    assert copy.task_names == store.task_names and len(copy.cache) == 0
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(copy(images, ["deep1", "lora"]), store(images, ["deep1", "lora"]))


def test_a_hub_cache_repo_is_served_at_its_main_snapshot(tmp_path, library):
    """A folder laid out as the Hugging Face Hub cache: models--OWNER--NAME/refs/main names the snapshot served."""
    repo = tmp_path / "hub" / "models--someone--birds.v2"
    shutil.copytree(library[0] / "deep1", repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    store = TaskStore(folders=[tmp_path / "hub"])
    assert store.task_names == ["birds_v2"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(store(images, ["birds_v2"] * 2)[:, :3], own_logits(library[0] / "deep1", images))
    shutil.copytree(library[1] / "deep1_v2", repo / "snapshots" / "def456")
    (repo / "refs" / "main").write_text("def456")  # a new revision: seen within a sweep (two polls)
    assert store.refresh()["changed"] + store.refresh()["changed"] == ["birds_v2"]
    with torch.no_grad():
        torch.testing.assert_close(store(images, ["birds_v2"] * 2)[:, :3], own_logits(library[1] / "deep1_v2", images))


def test_vpt_predict_reads_a_task_folder_and_names_bad_store_arguments(library, tmp_path, capsys):
    import csv

    from conftest import write_image

    from vpt_lightning.cli.predict import main

    for i in range(2):
        write_image(tmp_path / "images" / f"{i}.png", seed=i, size=(32, 32))
    out = tmp_path / "predictions.csv"
    args = [*map(str, ["--tasks", library[0], "--images", tmp_path / "images", "--task", "lora", "--out", out])]
    assert main([*args, "--cache-bytes", "1MiB", "--no-progress-bar", "--top-k", "3"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["task"] for r in rows] == ["lora", "lora"]
    assert "2 predictions (9 task(s): adapter, added" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(library[0] / "deep1"), "--images", str(tmp_path / "images"), "--cache-bytes", "1MiB"])
    assert "--cache-bytes and --pin apply to task folders" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--tasks", str(library[0]), "--images", str(tmp_path), "--cache-bytes", "2 parsecs"])
    assert "'2 parsecs' is not a size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--images", str(tmp_path)])
    assert "give tasks (TASK...) or task folders (--tasks DIR...)" in capsys.readouterr().err


def test_a_head_registered_by_the_operators_code_is_rebuilt_per_task_and_its_task_stays_in_the_pass(tmp_path):
    """examples/custom_head.py's cosine head (a BatchNorm with integer count, a scale buffer): a small module per
    task, its features from the one pass; equal to the task's own TaskModel."""
    from vpt_lightning.heads import import_user_code

    import_user_code(str(Path(__file__).parents[1] / "examples" / "custom_head.py"))
    head = {"source": "registry", "name": "examples.cosine", "options": {"scale": 8.0}}
    folder = write_package(tmp_path / "tasks" / "cosine", 3, num_classes=4, prompt={"num_tokens": 2}, head=head)
    task = load_task(folder)
    with torch.no_grad():  # running statistics of their own (saved, as a trained buffer)
        task.head.standardise.running_mean.normal_()
        task.head.standardise.running_var.uniform_(0.5, 2)
        task.head.standardise.num_batches_tracked.fill_(7)
    task.save_pretrained(folder)
    write_package(tmp_path / "tasks" / "plain", 4, num_classes=4, prompt={"num_tokens": 3})
    store = TaskStore(folders=[tmp_path / "tasks"])
    handle = store.open("cosine")
    store.release([handle])
    assert handle.tensors.one_pass and isinstance(handle.tensors.head, torch.nn.Module)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = store(images, ["cosine", "plain", "cosine"])
    torch.testing.assert_close(logits[[0, 2]], own_logits(folder, images[[0, 2]]), rtol=0, atol=1e-5)


def test_the_benchmark_runs_on_a_tiny_model_and_its_rows_equal_their_tasks(tmp_path, capsys):
    """benchmarks/task_store.py end to end at a tiny size (the figures of docs/many-tasks.md come from it): every
    key the issue asks for is printed, and the logits of the mixed stream equal each task's own TaskModel."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "task_store.py"
    spec = importlib.util.spec_from_file_location("task_store_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    argv = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--tasks", "8", "--distinct", "4"]
    benchmark.main(
        [*argv, "--requests", "16", "--repeats", "1", "--cold", "2", "--batch", "8", "--cache-dir", str(tmp_path)]
    )
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = ["tasks", "cache_bytes", "startup_s", "rss_start_mb", "cold_ms_p50", "cold_ms_p99", "single_ips"]
    assert set(keys + ["mixed_ips", "rss_end_mb", "logits_maxdiff"]) <= set(row) and row["tasks"] == 8
    assert row["logits_maxdiff"] <= 1e-5 and row["single_ips"] > 0 and row["mixed_ips"] > 0
