"""TaskModel and task packages: one factory, save/load through the Hub mixin, vpt-train's <run>/task/, predict and
serve from a package, custom heads through the operator's registry, and no pickle from a stranger ever run."""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BACKBONE, Payload, fit_briefly, payload_checkpoint, run_cli_in_process, write_image
from safetensors.torch import load_file
from torch import nn

from vpt_lightning import VPTModule
from vpt_lightning.data.synthetic import SyntheticDataModule
from vpt_lightning.heads import register_head, registered_heads
from vpt_lightning.sharing.checkpoint import read_task_checkpoint
from vpt_lightning.sharing.task_sources import load_task
from vpt_lightning.task_model import TaskModel, build_task_model

ROOT = Path(__file__).parents[1]
SRC_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    "HF_HUB_OFFLINE": "1",
}
NUM_CLASSES = SyntheticDataModule(task="count", num_train=1, num_val=1, num_test=1).num_classes
CLASSES = [f"c{i}" for i in range(NUM_CLASSES)]


def _trained(tmp_path, cls=VPTModule, **kwargs):
    """A VPT-Deep task trained for two steps on the synthetic count task (fit_briefly), and its checkpoint."""
    torch.manual_seed(0)
    module = cls(
        NUM_CLASSES,
        TINY_BACKBONE,
        {"num_tokens": 3},
        {"base_lr": 1.0, "warmup_epochs": 0},
        task_name="tiny",
        class_names=CLASSES,
        **kwargs,
    )
    path = fit_briefly(module, tmp_path, max_steps=2)
    return module.eval(), path


# ---- the model and its factory --------------------------------------------------------------------------
def test_the_module_trains_a_task_model_whose_keys_are_the_modules(tmp_path, images):
    module, _ = _trained(tmp_path)
    task = module.task
    assert isinstance(task, TaskModel) and task.backbone is module.backbone and task.head is module.head
    assert set(task.state_dict()) <= set(module.state_dict())  # same keys: backbone.*, head.*
    torch.testing.assert_close(task(images), module(images), rtol=0, atol=0)
    assert task.trained_state_keys() == ["backbone.prompts.tokens", "head.weight", "head.bias"]


def test_the_factory_rebuilds_the_same_network_from_the_spec(tmp_path, images):
    module, _ = _trained(tmp_path)
    again = build_task_model(module.task.spec).eval()
    again.load_state_dict(module.task.trained_state_dict(), strict=False)
    torch.testing.assert_close(again(images), module(images), rtol=0, atol=0)


def test_predict_prepares_files_and_pil_images_and_names_the_top_classes(tmp_path):
    """``task.predict`` against an independent computation: each image resized and normalised here with torchvision
    as the task's eval transform says (or, without one, as vpt-predict does: bicubic to the backbone's 32 px, ImageNet
    mean/std), the softmax of ``task(prepared)``, its top-k indices and names."""
    from PIL import Image
    from torchvision import transforms as T

    module, _ = _trained(tmp_path)
    task = module.task.train()  # predict switches to eval mode and back
    paths = [tmp_path / "images" / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        write_image(path, seed=i, size=(40, 30))
    pil = Image.open(paths[2]).convert("L")  # a PIL image, not RGB: converted as a file is
    settings = [
        (None, T.InterpolationMode.BICUBIC, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        (
            {"recipe": "vtab", "img_size": 32, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3},
            T.InterpolationMode.BILINEAR,
            [0.5] * 3,
            [0.25] * 3,
        ),
    ]
    for eval_transform, mode, mean, std in settings:
        task.spec.eval_transform = eval_transform
        prepare = T.Compose([T.Resize((32, 32), interpolation=mode), T.ToTensor(), T.Normalize(mean, std)])
        batch = torch.stack([prepare(Image.open(p).convert("RGB")) for p in paths[:2]] + [prepare(pil.convert("RGB"))])
        with torch.no_grad():
            want = task.eval()(batch).softmax(-1)
        task.train()
        answers = task.predict([paths[0], str(paths[1]), pil], top_k=3, batch_size=2)
        assert task.training and task.backbone.prompts.training  # the modes are given back
        assert len(answers) == 3
        for answer, probabilities in zip(answers, want):
            top = probabilities.topk(3)
            assert [a["index"] for a in answer] == top.indices.tolist()
            assert [a["class"] for a in answer] == [CLASSES[i] for i in top.indices.tolist()]
            assert [a["probability"] for a in answer] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert len(task.predict(paths[0], top_k=100)[0]) == NUM_CLASSES  # one image; at most every class
    with pytest.raises(ValueError, match="top_k=0 must be a positive integer"):
        task.predict(paths, top_k=0)


# ---- packages -------------------------------------------------------------------------------------------
def test_a_package_holds_only_trained_tensors_and_loads_to_the_same_logits(tmp_path, images):
    module, _ = _trained(tmp_path)
    module.task.info = {"metrics": {"test/top1": 0.5}, "command": "vpt-train +experiment=x"}
    module.task.save_pretrained(tmp_path / "pkg")
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    tensors = load_file(str(tmp_path / "pkg" / "model.safetensors"))
    assert sorted(tensors) == ["backbone.prompts.tokens", "head.bias", "head.weight"]
    for key, value in tensors.items():
        assert torch.equal(value, module.state_dict()[key])
    config = json.loads((tmp_path / "pkg" / "config.json").read_text())
    assert config["format"] == "vpt-lightning-task" and config["head"] == {"source": "method"}
    assert (
        config["backbone"]["name"] == TINY_BACKBONE["name"] and config["backbone_identity"] == module.backbone_identity
    )
    assert config["metrics"] == {"test/top1": 0.5} and config["num_classes"] == NUM_CLASSES
    card = (tmp_path / "pkg" / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: vpt-lightning" in front and "- visual-prompt-tuning" in front and "datasets:" in front
    assert "vpt-train +experiment=x" in card and "@inproceedings{jia2022vpt" in card and "50.00 %" in card
    # the backbone as it is (not the timm name alone: the tiny ViT is no vit_tiny_patch16_224)
    assert "Backbone: `vit_tiny_patch16_224 (depth 4, width 32, 2 heads, 32 px, patch 4)`" in card
    assert "# tiny: vpt_deep on vit_tiny_patch16_224 (depth 4, width 32, 2 heads, 32 px, patch 4)" in card
    loaded = TaskModel.from_pretrained(tmp_path / "pkg")
    assert loaded.class_names == CLASSES and loaded.task_name == "tiny"
    torch.testing.assert_close(loaded(images), module(images), rtol=0, atol=1e-6)
    # a loaded task saves the same package again (its trained keys are the file's)
    loaded.save_pretrained(tmp_path / "again")
    assert sorted(load_file(str(tmp_path / "again" / "model.safetensors"))) == sorted(tensors)


def test_a_package_of_another_backbone_is_refused_naming_the_difference(tmp_path):
    module, _ = _trained(tmp_path)
    module.task.save_pretrained(tmp_path / "pkg")
    with pytest.raises(ValueError, match=r"pkg.*trained on another backbone.*fingerprint"):
        TaskModel.from_pretrained(tmp_path / "pkg", backbone={**TINY_BACKBONE, "init_seed": 1})


def test_the_pinned_backbone_decides_what_is_built_not_the_packages_config(tmp_path, images, monkeypatch):
    """A package whose config asks for hub weights (a download) loads offline on the operator's pinned backbone;
    a weights file as pin gives the package's architecture with those weights."""
    module, _ = _trained(tmp_path)
    module.task.save_pretrained(tmp_path / "pkg")
    config_path = tmp_path / "pkg" / "config.json"
    config = json.loads(config_path.read_text())
    config["backbone"] = {**config["backbone"], "pretrained": True, "name": "vit_base_patch16_224.augreg_in21k"}
    config_path.write_text(json.dumps(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pinned = TaskModel.from_pretrained(tmp_path / "pkg", backbone=TINY_BACKBONE)
    torch.testing.assert_close(pinned(images), module(images), rtol=0, atol=1e-6)
    from safetensors.torch import save_file

    save_file(module.backbone.model.state_dict(), str(tmp_path / "weights.safetensors"))
    config["backbone"] = {**config["backbone"], "name": TINY_BACKBONE["name"], "pretrained": True}
    config_path.write_text(json.dumps(config))
    from_file = TaskModel.from_pretrained(tmp_path / "pkg", backbone=str(tmp_path / "weights.safetensors"))
    torch.testing.assert_close(from_file(images), module(images), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"--backbone 'nope' is neither a packaged backbone config"):
        TaskModel.from_pretrained(tmp_path / "pkg", backbone="nope")


def test_a_repo_id_offline_gets_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"'hf://someone/no-such-task': the Hub repo could not be downloaded"):
        TaskModel.from_pretrained("hf://someone/no-such-task")
    with pytest.raises(FileNotFoundError, match=r"'someone/no-such-task' does not exist; for the Hub repo .* hf://"):
        TaskModel.from_pretrained("someone/no-such-task")  # a bare OWNER/NAME is a local path, never a repo id
    with pytest.raises(FileNotFoundError, match="does not exist: give a task package folder"):
        load_task("./not/a/folder/at/all")


# ---- heads -----------------------------------------------------------------------------------------------
@register_head("tests.scaled_cosine")
class ScaledCosine(nn.Module):
    def __init__(self, in_features: int, num_classes: int, scale: float = 10.0) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(num_classes, in_features) * 0.1)

    def head_options(self):
        return {"scale": self.scale}

    def forward(self, x):
        return self.scale * nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(self.weight, dim=-1).T


class CosineModule(VPTModule):
    def build_head(self, in_features, num_classes):
        assert self.backbone.num_features == in_features  # hooks may read self.backbone, as before
        return ScaledCosine(in_features, num_classes, scale=7.0)


class UnregisteredHead(nn.Linear):
    pass


def test_a_subclass_head_is_in_the_task_and_its_package_names_the_registered_head(tmp_path, images):
    torch.manual_seed(0)
    module = CosineModule(NUM_CLASSES, TINY_BACKBONE, {"num_tokens": 3}).eval()
    assert isinstance(module.task.head, ScaledCosine) and module.task.head is module.head
    module.task.save_pretrained(tmp_path / "pkg")
    config = json.loads((tmp_path / "pkg" / "config.json").read_text())
    assert config["head"] == {"source": "registry", "name": "tests.scaled_cosine", "options": {"scale": 7.0}}
    loaded = TaskModel.from_pretrained(tmp_path / "pkg")
    assert isinstance(loaded.head, ScaledCosine) and loaded.head.scale == 7.0
    torch.testing.assert_close(loaded(images), module(images), rtol=0, atol=1e-6)
    # a name nobody registered in this process is refused, listing the registered ones; nothing is imported by name
    config["head"]["name"] = "os.system"
    (tmp_path / "pkg" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"needs the head 'os.system', which is not registered.*--import"):
        TaskModel.from_pretrained(tmp_path / "pkg")
    assert "tests.scaled_cosine" in registered_heads()


def test_an_unregistered_custom_head_cannot_be_packaged_and_says_how(tmp_path):
    class Module(VPTModule):
        def build_head(self, in_features, num_classes):
            return UnregisteredHead(in_features, num_classes)

    module = Module(NUM_CLASSES, TINY_BACKBONE, {"num_tokens": 3})
    with pytest.raises(ValueError, match=r"UnregisteredHead cannot be rebuilt by name: register its class"):
        module.task.save_pretrained(tmp_path / "pkg")


# ---- nothing unpickled from strangers ------------------------------------------------------------------
def test_a_checkpoint_with_a_payload_is_refused_by_name_and_never_runs(tmp_path):
    _, real = _trained(tmp_path)
    marker = tmp_path / "marker"
    evil = payload_checkpoint(real, tmp_path / "evil.ckpt", marker)
    for load in (read_task_checkpoint, load_task):
        with pytest.raises(ValueError, match=r"evil\.ckpt' was refused: it asks to unpickle 'exec'.*nothing in it ran"):
            load(evil)
    assert not marker.exists()
    # the same file without the payload loads (the check refuses the payload, not Lightning's checkpoints)
    assert read_task_checkpoint(real).identity is not None


def test_a_package_whose_weights_are_a_pickle_is_refused_and_never_runs(tmp_path):
    module, _ = _trained(tmp_path)
    module.task.save_pretrained(tmp_path / "pkg")
    marker = tmp_path / "marker"
    (tmp_path / "pkg" / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=r"model\.safetensors' is not a safetensors file.*never unpickled"):
        TaskModel.from_pretrained(tmp_path / "pkg")
    assert not marker.exists()


def test_cifar_pickles_allow_only_numpy_arrays(tmp_path):
    from vpt_lightning.data.datasets import DataError
    from vpt_lightning.data.vtab_prep.readers_natural import read_array_pickle

    good = {"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "fine_labels": [3, 1], "filenames": [b"a", b"b"]}
    for protocol in (2, 4, 5):
        (tmp_path / f"ok{protocol}").write_bytes(pickle.dumps(good, protocol=protocol))
        entry = read_array_pickle(tmp_path / f"ok{protocol}")
        assert np.array_equal(entry["data"], good["data"]) and entry["fine_labels"] == [3, 1]
    marker = tmp_path / "marker"
    (tmp_path / "train").write_bytes(pickle.dumps({"data": Payload(marker)}))
    with pytest.raises(DataError, match=r"train: refused to unpickle builtins\.exec"):
        read_array_pickle(tmp_path / "train")
    assert not marker.exists()


def test_predict_and_serve_refuse_a_payload_checkpoint_and_never_run_it(tmp_path):
    pytest.importorskip("litserve")
    _, real = _trained(tmp_path)
    marker = tmp_path / "marker"
    evil = payload_checkpoint(real, tmp_path / "evil.ckpt", marker)
    write_image(tmp_path / "images" / "a.png", seed=0)
    # vpt-predict in this process (a payload that ran would write the marker here as well as in a new one); vpt-serve
    # in a new one with a timeout: were the refusal broken, it would go on to serve
    predict = run_cli_in_process(
        "predict", [evil, "--images", tmp_path / "images", "--out", tmp_path / "p.csv", "--no-progress-bar"], tmp_path
    )
    serve = subprocess.run(
        [sys.executable, "-m", "vpt_lightning.cli.serve", evil, "--port", "1", "--accelerator", "cpu"],
        capture_output=True,
        text=True,
        env=SRC_ENV,
        timeout=300,
    )
    for result in (predict, serve):
        assert result.returncode == 1, result.stderr[-2000:]
        assert "evil.ckpt' was refused: it asks to unpickle 'exec'" in result.stderr
        assert "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "p.csv").exists()


# ---- vpt-train -> <run>/task/ -> predict, serve, from_pretrained ------------------------------------------
@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "vpt-train"),
            "+experiment=quickstart",
            "+debug=fast",
            "data.num_train=64",
            "data.num_val=32",
            "data.num_test=32",
            "data.batch_size=32",
            "run_name=r",
            "feature_cache.enabled=false",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env={**SRC_ENV, "HYDRA_FULL_ERROR": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "outputs" / "quickstart" / "r"


def test_vpt_train_writes_a_package_that_loads_to_the_trained_modules_logits(quickstart_run):
    run = quickstart_run
    assert sorted(p.name for p in (run / "task").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    results = json.loads((run / "results.json").read_text())
    config = json.loads((run / "task" / "config.json").read_text())
    assert config["metrics"]["test/top1"] == pytest.approx(results["test/top1"])
    assert config["trainable_params"] == results["trainable_params"] and config["task_name"] == "quickstart"
    card = (run / "task" / "README.md").read_text()
    assert "vpt-train +experiment=quickstart +debug=fast" in card
    # the packaged backbone by its config's name, with what it is
    assert (
        "# quickstart: vpt_deep on quickstart_vit (vit_tiny_patch16_224: depth 6, width 96, 3 heads, 32 px, patch 4)"
        in card
    )
    assert "Backbone: `quickstart_vit (vit_tiny_patch16_224: depth 6, width 96, 3 heads, 32 px, patch 4)`" in card
    trained = VPTModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt").eval()
    task = TaskModel.from_pretrained(run / "task")
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(task(images), trained(images), rtol=0, atol=1e-6)
    assert task.eval_transform == trained.hparams["eval_transform"]


def test_vpt_predict_from_the_run_package(quickstart_run, tmp_path):
    for i in range(3):
        write_image(tmp_path / "images" / f"{i}.png", seed=i, size=32)
    options = ["--out", tmp_path / "p.csv", "--top-k", "2", "--no-progress-bar", "--accelerator", "cpu"]
    proc = run_cli_in_process("predict", [quickstart_run / "task", "--images", tmp_path / "images", *options], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[1].split(",")[1] == "quickstart"


def test_vpt_export_hub_converts_a_checkpoint_to_the_same_package(quickstart_run, tmp_path):
    from vpt_lightning.cli.export import main

    assert main(["hub", str(quickstart_run / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "pkg")]) == 0
    ours, trained = (load_file(str(p / "model.safetensors")) for p in (tmp_path / "pkg", quickstart_run / "task"))
    assert sorted(ours) == sorted(trained) and all(torch.equal(ours[k], trained[k]) for k in ours)
    config = json.loads((tmp_path / "pkg" / "config.json").read_text())
    results = json.loads((quickstart_run / "results.json").read_text())
    assert config["metrics"]["test/top1"] == pytest.approx(results["test/top1"])  # from the run's results.json
    assert main(["hub", str(tmp_path / "nothing.ckpt"), "--out", str(tmp_path / "x")]) == 1


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as response:
        return response.status, json.loads(response.read())


def test_vpt_serve_serves_the_run_package_and_a_custom_head_package(quickstart_run, tmp_path):
    """The example's subclassed cosine head, registered by its own module and imported by the operator."""
    pytest.importorskip("litserve")
    from vpt_lightning.heads import import_user_code
    from vpt_lightning.serving.launch import running_server

    import_user_code(str(ROOT / "examples" / "custom_head.py"))
    example = sys.modules["custom_head"]
    from vpt_lightning.backbones.pin import backbone_pin

    torch.manual_seed(0)
    classes = {f"k{i}" for i in range(NUM_CLASSES)}
    module = example.CosineVPT(
        num_classes=NUM_CLASSES,
        backbone=backbone_pin("quickstart_vit"),  # shared backbone
        prompt={"num_tokens": 2},
        optim={"base_lr": 1.0, "warmup_epochs": 0},
        task_name="cosine",
        class_names=sorted(classes),
    )
    fit_briefly(module, tmp_path, max_steps=2)
    module.task.save_pretrained(tmp_path / "cosine")
    assert json.loads((tmp_path / "cosine" / "config.json").read_text())["head"]["source"] == "registry"
    write_image(tmp_path / "a.png", seed=1, size=32)
    image = base64.b64encode((tmp_path / "a.png").read_bytes()).decode()
    options = ["--import", str(ROOT / "examples" / "custom_head.py"), "--accelerator", "cpu"]
    with running_server(
        [quickstart_run / "task", tmp_path / "cosine"], options, startup_timeout=240, env=SRC_ENV
    ) as url:
        for task, names in (("quickstart", None), ("cosine", classes)):
            status, body = _post(url + "/predict", {"task": task, "image": image, "top_k": 2})
            assert status == 200, body
            assert body["task"] == task and len(body["predictions"]) == 2
            assert names is None or {p["class"] for p in body["predictions"]} <= names


def test_the_custom_head_example_package_keeps_its_trained_head_and_gives_equal_logits(tmp_path, images):
    """The example's head trains an embedding and keeps running statistics: both travel in the package."""
    from vpt_lightning.heads import import_user_code

    import_user_code(str(ROOT / "examples" / "custom_head.py"))
    example = sys.modules["custom_head"]
    module, _ = _trained(tmp_path, cls=example.CosineVPT)
    head = module.head
    assert not torch.equal(head.embed.weight, torch.eye(head.embed.weight.shape[0]))  # trained
    assert head.standardise.running_mean.abs().sum() > 0  # statistics gathered while training
    module.task.save_pretrained(tmp_path / "pkg")
    tensors = load_file(str(tmp_path / "pkg" / "model.safetensors"))
    for key in (
        "head.weight",
        "head.scale",
        "head.embed.weight",
        "head.embed.bias",
        "head.standardise.running_mean",
        "head.standardise.running_var",
    ):
        torch.testing.assert_close(tensors[key], module.state_dict()[key], rtol=0, atol=0)
    config = json.loads((tmp_path / "pkg" / "config.json").read_text())
    assert config["head"] == {"source": "registry", "name": "examples.cosine", "options": {"scale": 16.0}}
    loaded = TaskModel.from_pretrained(tmp_path / "pkg").eval()
    assert type(loaded.head) is example.CosineHead
    torch.testing.assert_close(loaded(images), module.task.eval()(images), rtol=0, atol=1e-6)


def test_a_package_trained_on_a_weights_file_says_to_pin_the_backbone(tmp_path, images):
    from safetensors.torch import save_file

    source = build_task_model({"num_classes": 3, "backbone": TINY_BACKBONE, "prompt": {"num_tokens": 2}})
    save_file(source.backbone.model.state_dict(), str(tmp_path / "mine.safetensors"))
    task = build_task_model(
        {
            "num_classes": 3,
            "backbone": {**TINY_BACKBONE, "checkpoint_path": str(tmp_path / "mine.safetensors")},
            "prompt": {"num_tokens": 2},
        }
    ).eval()
    task.save_pretrained(tmp_path / "pkg")
    with pytest.raises(ValueError, match=r"mine\.safetensors': a weights file a task names is never opened.*pin the"):
        TaskModel.from_pretrained(tmp_path / "pkg")  # even where it is on this machine
    (tmp_path / "mine.safetensors").rename(tmp_path / "copy.safetensors")
    pinned = TaskModel.from_pretrained(tmp_path / "pkg", backbone=str(tmp_path / "copy.safetensors"))
    torch.testing.assert_close(pinned(images), task(images), rtol=0, atol=1e-6)


def test_runs_write_their_package_unless_package_false_and_never_for_segmentation(tmp_path):
    from omegaconf import OmegaConf

    from vpt_lightning.runs.training import write_task_package

    module = VPTModule(NUM_CLASSES, TINY_BACKBONE, {"num_tokens": 2})
    results = {"val/top1": 0.25, "trainable_params": 5, "global_step": 3}
    for cfg in ({"package": False, "task_name": "t"}, {"task_type": "segmentation", "task_name": "t"}):
        assert write_task_package(OmegaConf.create(cfg), module, results, tmp_path) is None
    assert not (tmp_path / "task").exists()
    folder = write_task_package(OmegaConf.create({"task_name": "t"}), module, results, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert folder == tmp_path / "task" and config["metrics"] == {"val/top1": 0.25} and config["trainable_params"] == 5
    assert config["datasets"] == ["t"] and "global_step" not in config


@pytest.mark.parametrize("tuning", [{}, {"method": "mlp"}])
def test_describing_the_head_leaves_the_random_state_alone(tuning):
    """VPTModule describes its head for packages; that must not shift what is trained after it (seeded runs)."""
    from vpt_lightning.heads import describe_head
    from vpt_lightning.methods import parse_tuning

    method, config = parse_tuning(tuning)
    head = method.build_head(32, 3, config)
    before = torch.random.get_rng_state()
    assert describe_head(head, method, config, 32, 3) == {"source": "method"}
    assert torch.equal(before, torch.random.get_rng_state())


def test_a_backbone_is_described_by_what_it_is():
    """The packaged config's name when a backbone is one (whatever folder the shipped weights were in), else the timm
    name with the kwargs that make it another model."""
    from vpt_lightning.backbones.pin import backbone_pin
    from vpt_lightning.config import CONFIG_DIR
    from vpt_lightning.sharing.model_card import backbone_description

    quickstart = backbone_pin("quickstart_vit").to_dict()
    arch = "vit_tiny_patch16_224: depth 6, width 96, 3 heads, 32 px, patch 4"
    assert backbone_description(quickstart) == f"quickstart_vit ({arch})"
    moved = {
        **quickstart,
        "checkpoint_path": "/elsewhere/site-packages/vpt_lightning/assets/quickstart_vit.safetensors",
    }
    assert backbone_description(moved) == f"quickstart_vit ({arch})"
    deeper = {**quickstart, "kwargs": {**quickstart["kwargs"], "depth": 4}}
    assert backbone_description(deeper) == "vit_tiny_patch16_224 (depth 4, width 96, 3 heads, 32 px, patch 4)"
    own_weights = {**quickstart, "checkpoint_path": "/data/my_vit.safetensors"}
    assert backbone_description(own_weights) == "vit_tiny_patch16_224 (depth 6, width 96, 3 heads, 32 px, patch 4)"
    assert backbone_description(TINY_BACKBONE) == "vit_tiny_patch16_224 (depth 4, width 32, 2 heads, 32 px, patch 4)"
    assert backbone_description({"name": "vit_base_patch16_224.orig_in21k", "pretrained": True}) == (
        "vit_base_patch16_224_in21k (vit_base_patch16_224.orig_in21k)"
    )
    assert backbone_description({"name": "vit_small_patch16_224", "pretrained": True}) == "vit_small_patch16_224"
    for option in ("vit_tiny_random", "swin_tiny_random", "convnext_tiny_random", "resnet_tiny_random"):
        assert backbone_description(backbone_pin(option).to_dict()).startswith(f"{option} (")
    assert (CONFIG_DIR / "backbone" / "vit_base_patch16_224_in21k.yaml").is_file()
