"""A stranger's task package or task checkpoint is data, never code (issue 26): each attack as the issue describes
it, refused with a one-line error naming the file and the rule, and nothing requested, written, imported or changed.

A crafted package or ``.ckpt`` may not: choose a download, a URL, a cache folder or a local file (its backbone is a
seeded random init, the operator's ``--backbone``, the shipped quickstart asset, or a download the operator allows);
carry tensors outside its own trained keys (the shared backbone of other tasks stays as it is); ask for sizes its
tensors do not have or above the caps (refused before anything is allocated); pass a backbone whose weights differ
from the recorded digest; run a pickle or import its optimizer's module; hold NaN/inf tensors. A mistyped path is
never taken for a Hub repo id (``hf://OWNER/NAME`` is).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_BACKBONE, make_vit, payload_checkpoint, run_cli_in_process, save_task_checkpoint, write_image
from safetensors.torch import load_file, save_file

from vpt_lightning import VPTModule
from vpt_lightning.serving.multitask import MultiTaskClassifier
from vpt_lightning.serving.task_store import TaskStore, TaskUnavailable
from vpt_lightning.sharing.task_sources import load_task
from vpt_lightning.task_model import TaskModel, build_task_model

ROOT = Path(__file__).parents[1]
SRC_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    "HF_HUB_OFFLINE": "1",
}
SPEC = {"num_classes": 3, "backbone": TINY_BACKBONE, "prompt": {"num_tokens": 2}}
# where a package is checked: loaded alone, and served by a task store from a folder of packages (vpt-serve and
# vpt-predict --tasks DIR), next to a good one
LOADERS = ("load_task", "task_store")


def _package(folder: Path, task_name: str, seed: int = 0, backbone=TINY_BACKBONE) -> TaskModel:
    """A VPT-Deep task package on ``backbone`` (random prompts and head: every test of its use needs them)."""
    torch.manual_seed(seed)
    task = build_task_model({**SPEC, "backbone": backbone, "task_name": task_name}).eval()
    task.save_pretrained(folder)
    return task


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _copy(source: Path, target: Path, task_name: str) -> Path:
    shutil.copytree(source, target)
    _edit_config(target, task_name=task_name)
    return target


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    good = _package(root / "good", "good")
    write_image(root / "images" / "a.png", seed=1, size=32)
    write_image(root / "images" / "b.png", seed=2, size=32)
    return root, good


def _store_refusal(evil: Path, packages, **store_options) -> str:
    """The one-line error a task store serving ``evil``'s folder gives for it, with a copy of the good package next
    to it, whose answers stay as they were: the store's own error when ``evil`` is the package its backbone comes
    from (the first by name), else its index's (``problems``) or the task's first use's."""
    root, good = packages
    shutil.copytree(root / "good", evil.parent / "good")
    try:
        store = TaskStore(folders=[evil.parent], **store_options)
    except ValueError as err:
        message = str(err)
    else:
        if "evil" in store:
            with pytest.raises(TaskUnavailable) as err:
                store.open("evil")
            message = str(err.value)
        else:
            message = store.problems["evil"]
        images = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(store(images, ["good", "good"]), good(images), rtol=0, atol=1e-6)
    assert "\n" not in message, message
    return message


def _refusal(loader: str, evil: Path, packages, **options) -> str:
    """The error refusing the package ``evil`` (in a folder of its own), loaded alone or served by a store."""
    if loader == "load_task":
        with pytest.raises(ValueError) as err:
            load_task(evil, **options)
        return str(err.value)
    return _store_refusal(evil, packages, **options)


def _one_line_error(proc, *fragments: str) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _predict(root: Path, *sources, extra=()):
    args = [*map(str, sources), "--images", str(root / "images"), "--out", str(root / "p.csv"), "--no-progress-bar"]
    return run_cli_in_process("predict", [*args, "--accelerator", "cpu", *extra], root)


# ---- finding 2: the backbone a package names ---------------------------------------------------------------
class _Listener:
    """An HTTP server on 127.0.0.1 standing in for the attacker: it records every request it receives."""

    def __init__(self) -> None:
        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                requests.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_a_package_naming_a_url_and_a_cache_folder_makes_no_request_and_writes_nothing(packages, tmp_path):
    root, _ = packages
    evil = _copy(root / "good", tmp_path / "evil", "evil")
    cache = tmp_path / "site-packages"
    with _Listener() as attacker:
        overlay = {"url": f"{attacker.url}/evil.pth", "hf_hub_id": None}
        backbone = {
            **TINY_BACKBONE,
            "pretrained": True,
            "kwargs": {**TINY_BACKBONE["kwargs"], "pretrained_cfg_overlay": overlay, "cache_dir": str(cache)},
        }
        _edit_config(evil, backbone=backbone)
        for extra in ((), ("--allow-download",)):  # even a download the operator allows may not choose these
            line = _one_line_error(_predict(tmp_path, evil, extra=extra), "evil/config.json", "backbone.kwargs")
            assert "pretrained_cfg_overlay" in line or "cache_dir" in line
        with pytest.raises(ValueError, match=r"evil/config\.json.*backbone\.kwargs"):
            load_task(evil, allow_download=True)
        for allow_download in (False, True):
            shutil.rmtree(tmp_path / "tasks", ignore_errors=True)
            served = _copy(evil, tmp_path / "tasks" / "evil", "evil")
            line = _store_refusal(served, packages, allow_download=allow_download)
            assert re.search(r"evil/config\.json.*backbone\.kwargs\.(pretrained_cfg_overlay|cache_dir)", line), line
    assert attacker.requests == [] and not cache.exists()


@pytest.mark.parametrize(
    "change, rule",
    [
        ({"pretrained": True}, "backbone.pretrained=true.*--allow-download"),  # a download nobody allowed
        ({"name": "hf-hub:someone/evil"}, "backbone.name='hf-hub:someone/evil'"),
        ({"name": "hf_hub:someone/evil"}, "backbone.name='hf_hub:someone/evil'"),
        ({"kwargs": {**TINY_BACKBONE["kwargs"], "checkpoint_path": "/etc/passwd"}}, "backbone.kwargs.checkpoint_path"),
        ({"kwargs": {**TINY_BACKBONE["kwargs"], "pretrained_cfg": {"url": "x"}}}, "backbone.kwargs.pretrained_cfg"),
        ({"kwargs": {**TINY_BACKBONE["kwargs"], "no_such_argument": 1}}, "backbone.kwargs.no_such_argument"),
        ({"kwargs": {**TINY_BACKBONE["kwargs"], "device": "cpu"}}, "backbone.kwargs.device is refused"),
        ({"kwargs": {**TINY_BACKBONE["kwargs"], "norm_layer": {"a": 1}}}, "norm_layer=.* is not plain data"),
        ({"init_seed": "0"}, "backbone.init_seed='0' is not an integer"),
    ],
)
@pytest.mark.parametrize("loader", LOADERS)
def test_a_packages_backbone_entry_is_limited_to_the_architectures_own_values(packages, tmp_path, change, rule, loader):
    root, _ = packages
    evil = _copy(root / "good", tmp_path / "tasks" / "evil", "evil")
    _edit_config(evil, backbone={**TINY_BACKBONE, **change})
    assert re.search(rf"evil/config\.json.*{rule}", _refusal(loader, evil, packages))


def test_a_packages_own_weights_file_is_never_opened_unless_the_operator_pins_it(packages, tmp_path, images):
    """The file a package names exists here and holds the right weights: it is still not the package's to choose."""
    root, good = packages
    save_file(good.backbone.model.state_dict(), str(tmp_path / "weights.safetensors"))
    evil = _copy(root / "good", tmp_path / "evil", "evil")
    _edit_config(evil, backbone={**TINY_BACKBONE, "checkpoint_path": str(tmp_path / "weights.safetensors")})
    with pytest.raises(ValueError, match=r"evil.*weights\.safetensors.*never opened.*--backbone"):
        load_task(evil)
    served = _copy(evil, tmp_path / "tasks" / "evil", "evil")  # the first package by name: the store's backbone
    assert re.search(r"evil.*weights\.safetensors.*never opened.*--backbone", _store_refusal(served, packages))
    pinned = load_task(evil, backbone=str(tmp_path / "weights.safetensors"))  # the operator's pin: loads
    with torch.no_grad():
        torch.testing.assert_close(pinned(images), good(images), rtol=0, atol=1e-6)


def test_a_package_is_checked_without_building_its_network(packages, tmp_path, monkeypatch):
    """check_package (what a task store runs on an upload): config values and the weights header, nothing built."""
    import vpt_lightning.task_model as task_model

    root, _ = packages
    evil = _poisoned_package(root, tmp_path / "evil")

    def no_backbone(*args, **kwargs):
        raise AssertionError("check_package built a backbone")

    monkeypatch.setattr(task_model, "create_backbone", no_backbone)
    assert task_model.check_package(root / "good").task_name == "good"
    with pytest.raises(ValueError, match=r"evil/model\.safetensors' holds tensors outside the ones its task trains"):
        task_model.check_package(evil)


# ---- finding 3: tensors outside the task's own trained keys ------------------------------------------------
def _poisoned_package(root: Path, target: Path) -> Path:
    evil = _copy(root / "good", target, "evil")
    tensors = load_file(str(evil / "model.safetensors"))
    torch.manual_seed(5)
    qkv = make_vit().state_dict()["blocks.0.attn.qkv.weight"]
    tensors["backbone.model.blocks.0.attn.qkv.weight"] = torch.randn_like(qkv) * 3
    save_file(tensors, str(evil / "model.safetensors"))
    return evil


def _poisoned_checkpoint(target: Path) -> Path:
    path = save_task_checkpoint(target, num_classes=3, prompt={"num_tokens": 2}, task_name="evil")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["state_dict"]["backbone.model.blocks.0.attn.qkv.weight"] = torch.randn(96, 32) * 3
    torch.save(checkpoint, path)
    return path


def test_extra_backbone_tensors_are_refused_and_the_good_tasks_logits_stay(packages, tmp_path, images):
    root, good = packages
    with torch.no_grad():
        alone = good(images)
    shared = MultiTaskClassifier.from_sources([root / "good"])
    index = shared.task_index(["good"] * len(images))
    for evil in (_poisoned_package(root, tmp_path / "evil"), _poisoned_checkpoint(tmp_path / "evil.ckpt")):
        with pytest.raises(ValueError, match=rf"{evil.name}.*backbone\.model\.blocks\.0\.attn\.qkv\.weight"):
            shared.add_task(evil)
        with pytest.raises(ValueError, match=rf"{evil.name}.*backbone\.model\.blocks\.0\.attn\.qkv\.weight"):
            MultiTaskClassifier.from_sources([root / "good", evil])
        with torch.no_grad():
            torch.testing.assert_close(shared(images, index), alone, rtol=0, atol=1e-6)
        assert shared.task_names == ["good"]
    proc = _predict(tmp_path, root / "good", tmp_path / "evil")
    _one_line_error(proc, "evil", "backbone.model.blocks.0.attn.qkv.weight")
    assert not (tmp_path / "p.csv").exists()


def test_a_task_store_refuses_extra_backbone_tensors_in_its_folder_an_upload_or_a_task_added(packages, tmp_path):
    """The same package in a store's folder (refused at its first use), uploaded (PUT /tasks/NAME: nothing written),
    or added in memory as a package or checkpoint: refused naming the tensor, the good task's answers unchanged."""
    root, good = packages
    evil = _poisoned_package(root, tmp_path / "tasks" / "evil")
    line = _store_refusal(evil, packages)
    assert re.search(r"evil/model\.safetensors.*outside the ones its task trains.*blocks\.0\.attn\.qkv", line), line
    store = TaskStore(folders=[tmp_path / "tasks"])
    files = {name: (evil / name).read_bytes() for name in ("config.json", "model.safetensors")}
    with pytest.raises(ValueError, match=r"model\.safetensors.*backbone\.model\.blocks\.0\.attn\.qkv\.weight"):
        store.put("evil2", files)
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == ["evil", "good"]  # nothing staged is left
    for source in (evil, _poisoned_checkpoint(tmp_path / "evil.ckpt")):
        with pytest.raises(ValueError, match=rf"{source.name}.*backbone\.model\.blocks\.0\.attn\.qkv\.weight"):
            store.add(source, "added")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(store(images, ["good", "good"]), good(images), rtol=0, atol=1e-6)
    with pytest.raises(TaskUnavailable, match=r"evil/model\.safetensors.*backbone\.model\.blocks\.0\.attn\.qkv"):
        store.open("evil")
    assert store.task_names == ["evil", "good"] and store.state_of("evil") == "refused"


def test_a_task_of_its_own_backbone_keeps_its_trained_backbone_tensors(tmp_path, images):
    """Methods that train backbone weights carry them, loaded on the task's own backbone (never on a shared one)."""
    torch.manual_seed(0)
    full = build_task_model({**SPEC, "prompt": {"num_tokens": 0}, "tuning": {"method": "bias"}}).eval()
    with torch.no_grad():
        for name, p in full.backbone.model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.5)
    full.save_pretrained(tmp_path / "bias")
    loaded = load_task(tmp_path / "bias")
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), full(images), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="tuning=bias changes backbone weights"):
        MultiTaskClassifier.from_sources([tmp_path / "bias"])
    shutil.copytree(tmp_path / "bias", tmp_path / "tasks" / "bias")
    store = TaskStore(backbone=TINY_BACKBONE, folders=[tmp_path / "tasks"])
    assert "bias" not in store and "tuning=bias changes backbone weights" in store.problems["bias"]


# ---- finding 5: sizes checked before anything is allocated -------------------------------------------------
HUGE = {
    "backbone": {**TINY_BACKBONE, "kwargs": {**TINY_BACKBONE["kwargs"], "embed_dim": 8192, "depth": 12}},
    "num_classes": 100_000_000,
    "prompt": {"num_tokens": 100_000_000},
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("key", sorted(HUGE))
def test_a_small_config_asking_for_huge_sizes_is_refused_at_once(packages, tmp_path, key, loader):
    root, _ = packages
    evil = _copy(root / "good", tmp_path / "tasks" / "evil", "evil")
    _edit_config(evil, **{key: HUGE[key]})
    if key == "num_classes":
        _edit_config(evil, class_names=None)
    assert (evil / "config.json").stat().st_size < 4096
    start = time.perf_counter()
    message = _refusal(loader, evil, packages)
    assert time.perf_counter() - start < 10
    assert "evil" in message and ("shape" in message or "cap" in message), message


def _limit_memory():  # the child's data segment (heap, mmap'd tensors): an allocation beyond it fails
    resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))


LOADS = {
    "load_task": "from vpt_lightning.sharing.task_sources import load_task\nload_task(EVIL)",
    "task_store": "from vpt_lightning.serving.task_store import TaskStore\n"
    "TaskStore(backbone=BACKBONE, folders=[FOLDER]).open('evil')",
}
BOUNDED_CASES = [(loader, key) for key in ("backbone", "num_classes") for loader in LOADERS]


@pytest.fixture(scope="module")
def bounded_loads(packages, tmp_path_factory) -> dict:
    """Each ``(loader, key)`` of BOUNDED_CASES asked for a package whose config asks for a huge size, all in one new
    process whose data segment is capped at 3 GiB (an allocation beyond fails): per case, the error line and the
    process's peak RSS so far (MB). One process for the four: its import of torch and timm is most of the time."""
    root, _ = packages
    cases = []
    for loader, key in BOUNDED_CASES:
        evil = _copy(root / "good", tmp_path_factory.mktemp(f"{loader}-{key}") / "tasks" / "evil", "evil")
        _edit_config(evil, **{key: HUGE[key]}, **({"class_names": None} if key == "num_classes" else {}))
        load = LOADS[loader].replace("EVIL", repr(str(evil))).replace("FOLDER", repr(str(evil.parent)))
        cases += [
            "try:",
            textwrap.indent(load, "    "),
            "    print('loaded')",
            "except Exception as err:",
            "    print(type(err).__name__, str(err).splitlines()[0])",
            "print('peak_mb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)",
        ]
    script = "\n".join(["import resource", f"BACKBONE = {TINY_BACKBONE!r}", *cases])
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=SRC_ENV,
        timeout=300,
        preexec_fn=_limit_memory,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 2 * len(BOUNDED_CASES), proc.stdout + proc.stderr[-3000:]
    return {case: lines[2 * i : 2 * i + 2] for i, case in enumerate(BOUNDED_CASES)}


@pytest.mark.parametrize("loader, key", BOUNDED_CASES)
def test_a_huge_size_request_is_refused_with_a_bounded_memory(bounded_loads, loader, key):
    lines = bounded_loads[loader, key]
    error = ("TaskUnavailable", "ValueError")[loader == "load_task"]
    assert lines[0].startswith(error) and "evil/config.json" in lines[0] and "the cap" in lines[0], lines[0]
    assert int(lines[1].split()[1]) < 1500, lines  # torch and timm imported: ~0.5 GB


# ---- finding 9: every weight value decides the backbone's identity -----------------------------------------
WIDE = {**TINY_BACKBONE, "kwargs": {**TINY_BACKBONE["kwargs"], "embed_dim": 64, "depth": 2}}


def _tampered(state, stride_of):
    """``state`` with every value replaced but those the old sampled fingerprint read (every ``numel // 4096``-th)."""
    out = {}
    for key, value in state.items():
        flat = value.detach().reshape(-1).clone()
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[:: stride_of(flat.numel())] = True
        flat[~keep] = torch.randn(int((~keep).sum())) if value.is_floating_point() else flat[~keep]
        out[key] = flat.reshape(value.shape).contiguous()
    return out


def test_a_backbone_with_most_weights_replaced_but_the_sampled_ones_kept_is_refused(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "backbone.safetensors"
    model = build_task_model({**SPEC, "backbone": WIDE}).backbone.model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    _package(tmp_path / "pkg", "wide", backbone={**WIDE, "checkpoint_path": str(weights)})
    state = load_file(str(weights))
    tampered = _tampered(state, lambda n: max(1, n // 4096))
    replaced = sum(int((tampered[k] != state[k]).sum()) for k in state)
    assert replaced > 0.6 * sum(v.numel() for v in state.values())  # most of the weights
    save_file(tampered, str(tmp_path / "tampered.safetensors"))
    assert load_task(tmp_path / "pkg", backbone=str(weights)).num_classes == 3  # the true file loads
    write_image(tmp_path / "images" / "a.png", seed=1, size=32)
    proc = _predict(tmp_path, tmp_path / "pkg", extra=("--backbone", str(tmp_path / "tampered.safetensors")))
    _one_line_error(proc, "pkg", "another backbone", "weights_sha256")


# ---- finding 11: VPTModule.load_from_checkpoint never unpickles --------------------------------------------
def test_load_from_checkpoint_never_runs_a_payload_even_when_torch_is_told_to(tmp_path, monkeypatch):
    real = save_task_checkpoint(tmp_path / "real.ckpt")
    marker = tmp_path / "marker"
    evil = payload_checkpoint(real, tmp_path / "evil.ckpt", marker)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for weights_only in (None, False):
        with pytest.raises(ValueError, match=r"evil\.ckpt' was refused: it asks to unpickle 'exec'"):
            VPTModule.load_from_checkpoint(evil, weights_only=weights_only)
    assert not marker.exists()
    assert isinstance(VPTModule.load_from_checkpoint(real), VPTModule)


# ---- finding 13: a Hub source is explicit ------------------------------------------------------------------
def test_a_mistyped_relative_path_is_never_taken_for_a_hub_repo(tmp_path, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: asked.append(kw) or 1 / 0)
    monkeypatch.chdir(tmp_path)
    for load in (load_task, TaskModel.from_pretrained):
        with pytest.raises(FileNotFoundError, match=r"'someone/task' does not exist.*hf://someone/task"):
            load("someone/task")
    proc = _predict(tmp_path, "someone/task")
    _one_line_error(proc, "'someone/task'", "hf://someone/task")
    assert asked == []
    with pytest.raises(ValueError, match=r"hf://someone/task.*could not be downloaded"):
        load_task("hf://someone/task")
    assert [kw["repo_id"] for kw in asked] == ["someone/task"]


# ---- finding 14: non-finite tensors; a checkpoint's optimizer is never imported ----------------------------
def test_non_finite_tensors_are_refused_naming_the_file_and_tensor(packages, tmp_path):
    root, _ = packages
    evil = _copy(root / "good", tmp_path / "evil", "evil")
    tensors = load_file(str(evil / "model.safetensors"))
    tensors["head.weight"][0, 0] = float("nan")
    save_file(tensors, str(evil / "model.safetensors"))
    ckpt = save_task_checkpoint(tmp_path / "inf.ckpt", num_classes=3, prompt={"num_tokens": 2})
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    checkpoint["state_dict"]["backbone.prompts.tokens"][0, 0, 0] = float("inf")
    torch.save(checkpoint, ckpt)
    for source, tensor in ((evil, "head.weight"), (ckpt, "backbone.prompts.tokens")):
        with pytest.raises(ValueError, match=rf"{source.name}.*{tensor}.*not finite"):
            load_task(source)
    with pytest.raises(ValueError, match=r"inf\.ckpt.*backbone\.prompts\.tokens.*not finite"):
        VPTModule.load_from_checkpoint(ckpt)
    _one_line_error(_predict(tmp_path, evil), "evil", "head.weight", "not finite")
    served = _copy(evil, tmp_path / "tasks" / "evil", "evil")
    assert re.search(r"evil/model\.safetensors.*head\.weight.*not finite", _store_refusal(served, packages))
    store = TaskStore(backbone=TINY_BACKBONE)
    with pytest.raises(ValueError, match=r"inf\.ckpt.*backbone\.prompts\.tokens.*not finite"):
        store.add(ckpt)
    assert len(store) == 0


def test_a_checkpoints_optimizer_target_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "sideeffect_optim.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\nimport torch\nOpt = torch.optim.SGD\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    path = save_task_checkpoint(tmp_path / "t.ckpt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["optim"]["_target_"] = "sideeffect_optim.Opt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"t\.ckpt.*optim\._target_='sideeffect_optim\.Opt'.*never imported"):
        VPTModule.load_from_checkpoint(path)
    assert load_task(path).num_classes == 3  # a task needs no optimizer
    assert not marker.exists() and "sideeffect_optim" not in sys.modules
    # torch.optim's own optimizers are found by name, and the operator may give another one
    checkpoint["hyper_parameters"]["optim"]["_target_"] = "torch.optim.AdamW"
    checkpoint["hyper_parameters"]["optim"].pop("momentum", None)
    torch.save(checkpoint, path)
    assert VPTModule.load_from_checkpoint(path).optim_config.target == "torch.optim.AdamW"


def test_a_sidetune_tasks_side_weights_are_its_own_tensors_never_a_download_or_file(tmp_path, images, monkeypatch):
    """Sidetune's side network starts from torchvision's AlexNet weights (a download) or a file: a package carries
    the trained side network, so loading it needs neither, whatever its config names."""
    import torchvision.models

    torch.manual_seed(0)
    spec = {**SPEC, "prompt": {"num_tokens": 0}, "tuning": {"method": "sidetune", "side_weights": "random"}}
    task = build_task_model(spec).eval()
    task.save_pretrained(tmp_path / "side")
    # a download of torchvision's weights fails the test (offline it would hang or fail the load)
    monkeypatch.setattr(torchvision.models.AlexNet_Weights.IMAGENET1K_V1, "get_state_dict", lambda *a, **k: 1 / 0)
    for side_weights in ("IMAGENET1K_V1", str(tmp_path / "elsewhere.pth")):
        _edit_config(tmp_path / "side", tuning={"method": "sidetune", "side_weights": side_weights})
        loaded = load_task(tmp_path / "side")
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), task(images), rtol=0, atol=1e-6)
        assert loaded.spec.tuning["side_weights"] == side_weights  # what the training started from, kept
    path = save_task_checkpoint(tmp_path / "side.ckpt", prompt={"num_tokens": 0}, tuning=spec["tuning"])
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["tuning"]["side_weights"] = "IMAGENET1K_V1"
    torch.save(checkpoint, path)
    assert load_task(path).num_classes == 3
    assert VPTModule.load_from_checkpoint(path).hparams["num_classes"] == 3
    # a task store builds a task's network (its layout, and for sidetune its own network) as loading does
    shutil.copytree(tmp_path / "side", tmp_path / "tasks" / "side")
    store = TaskStore(folders=[tmp_path / "tasks"])
    store.add(path, "side_ckpt")
    with torch.no_grad():
        torch.testing.assert_close(store(images, ["side"] * len(images)), task(images), rtol=0, atol=1e-6)
        assert store(images, ["side_ckpt"] * len(images)).shape == (len(images), 3)


def test_loading_makes_no_network_request(packages, tmp_path, monkeypatch):
    """Packages, checkpoints and run folders load without a connection, even where the Hub is not set offline;
    only an explicit hf://OWNER/NAME (or a download the operator allows) may connect."""
    import socket

    root, _ = packages
    checkpoint = save_task_checkpoint(tmp_path / "t.ckpt", num_classes=3, prompt={"num_tokens": 2})
    connections = []

    def refuse(sock, address, *args):
        connections.append(address)
        raise OSError("no network in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    load_task(root / "good")
    TaskModel.from_pretrained(root / "good")
    MultiTaskClassifier.from_sources([root / "good", checkpoint])
    VPTModule.load_from_checkpoint(checkpoint)
    shutil.copytree(root / "good", tmp_path / "tasks" / "good")
    store = TaskStore(folders=[tmp_path / "tasks"])
    store.add(checkpoint, "ckpt")
    store(torch.randn(2, 3, 32, 32), ["good", "ckpt"])
    assert connections == []


# ---- a config.json of many bytes ---------------------------------------------------------------------------
@pytest.mark.parametrize("loader", LOADERS)
def test_a_config_file_over_the_small_file_cap_is_refused_unread(packages, tmp_path, loader):
    """A package's config.json is one of the small files someone else made: read only if it is a regular file of at
    most regular_files.MAX_SMALL_FILE_BYTES, wherever the package is loaded."""
    from vpt_lightning.sharing.regular_files import MAX_SMALL_FILE_BYTES

    root, _ = packages
    evil = _copy(root / "good", tmp_path / "tasks" / "evil", "evil")
    text = (evil / "config.json").read_text()
    (evil / "config.json").write_text(text + " " * (MAX_SMALL_FILE_BYTES + 1 - len(text)))  # valid JSON
    message = _refusal(loader, evil, packages)
    assert re.search(rf"evil/config\.json: {MAX_SMALL_FILE_BYTES + 1} bytes is over the limit of", message), message
