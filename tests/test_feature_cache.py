"""Head-only runs on cached backbone features: same weights as without the cache, keyed, reused, refused where
training augments."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import write_image

from vpt_lightning.backbones import BackboneConfig, create_backbone, prompted_backbone
from vpt_lightning.config import compose
from vpt_lightning.data.folder import FolderDataModule
from vpt_lightning.data.synthetic import SyntheticDataset
from vpt_lightning.methods import get_method
from vpt_lightning.runs.feature_cache import FeatureCache, cache_key, cache_refusal, compute_features
from vpt_lightning.runs.training import train

COMMON = [
    "backbone=vit_tiny_random",
    "trainer=cpu",
    "data.batch_size=16",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "optim.warmup_epochs=0",
    "trainer.enable_progress_bar=false",
    "optim.base_lr=2.0",
]
RUN = [*COMMON, "data.num_train=48", "data.num_val=16", "data.num_test=16"]


def _run(tmp_path, name, *overrides):
    cfg = compose([*RUN, f"paths.output_dir={tmp_path}", f"run_dir={tmp_path / name}", *overrides])
    results = train(cfg)
    state = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return results, state


@pytest.mark.parametrize("tuning", ["linear", "mlp"])
def test_cached_and_uncached_head_training_give_the_same_weights(tmp_path, tuning):
    method = [f"tuning={tuning}"] + (["tuning.mlp_layers=2"] if tuning == "mlp" else [])
    cached, cached_state = _run(tmp_path, "cached", *method)
    plain, plain_state = _run(tmp_path, "plain", *method, "feature_cache.enabled=false")
    assert cached["feature_cache"] is True and plain["feature_cache"] is False
    assert set(cached_state) == set(plain_state) and all(k.startswith("head.") for k in cached_state)
    for key, value in plain_state.items():
        torch.testing.assert_close(cached_state[key], value, atol=1e-5, rtol=0)
    assert cached["val/top1"] == pytest.approx(plain["val/top1"]) and cached["test/top1"] == pytest.approx(
        plain["test/top1"]
    )
    assert len(list((tmp_path / ".feature_cache").glob("*.pt"))) == 3  # train, val, test: computed once each


def test_cache_is_reused_and_keyed_by_backbone_split_and_transform(tmp_path, monkeypatch):
    model, identity = create_backbone(
        BackboneConfig(
            name="vit_tiny_patch16_224",
            kwargs=dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2),
            init_seed=0,
        )
    )
    backbone = prompted_backbone(model, None)
    data = SyntheticDataset("count", 12, seed=1)
    cache = FeatureCache(tmp_path)
    computed = []
    import vpt_lightning.runs.feature_cache as feature_cache

    def counting(*args, **kwargs):
        computed.append(1)
        return compute_features(*args, **kwargs)

    monkeypatch.setattr(feature_cache, "compute_features", counting)
    first = cache.features(backbone, identity, data, batch_size=5)
    again = cache.features(backbone, identity, SyntheticDataset("count", 12, seed=1), batch_size=4)
    assert len(computed) == 1 and torch.equal(first.tensors[0], again.tensors[0])
    # the features are the backbone's pooled features of each image, in order
    torch.testing.assert_close(first.tensors[0][3], backbone.eval()(data[3][0][None])[0], atol=1e-5, rtol=0)
    assert first.tensors[1].tolist() == [data[i][1] for i in range(12)]
    key = cache_key(identity, data)
    other_weights = dict(identity, fingerprint="0" * 16)
    assert cache_key(other_weights, data) != key  # another backbone
    assert cache_key(identity, SyntheticDataset("count", 13, seed=1)) != key  # another split
    assert cache_key(identity, SyntheticDataset("count", 12, seed=1, mean=(0.5, 0.5, 0.5))) != key  # another transform
    assert cache_key(identity, SyntheticDataset("count", 12, seed=1, img_size=16)) != key
    # a damaged file is computed again rather than trusted
    cache.path(key).write_bytes(b"not a tensor file")
    cache.features(backbone, identity, data, batch_size=5)
    assert len(computed) == 2


def test_image_files_are_part_of_the_key_and_augmenting_data_is_refused_with_a_reason(tmp_path, caplog):
    for label in ("a", "b"):
        for i in range(2):
            write_image(tmp_path / "train" / label / f"{i}.png", seed=i, size=8)
    vtab_like = FolderDataModule(str(tmp_path), recipe="vtab", img_size=32)
    fgvc_like = FolderDataModule(str(tmp_path), recipe="fgvc", img_size=32)
    linear = get_method("linear")
    assert cache_refusal(linear, vtab_like) is None
    assert "augments" in cache_refusal(linear, fgvc_like)
    assert "trains more than a head" in cache_refusal(get_method("vpt_deep"), vtab_like)
    vtab_like.setup("fit")
    identity = {"fingerprint": "f"}
    key = cache_key(identity, vtab_like.train_dataset)
    write_image(tmp_path / "train" / "a" / "0.png", seed=5, size=9)  # the file changes: another key
    assert cache_key(identity, vtab_like.train_dataset) != key
    with caplog.at_level(logging.INFO, logger="vpt_lightning.runs.training"):
        results = train(
            compose(
                [
                    *COMMON,
                    "tuning=linear",
                    "data=folder",
                    f"data.root={tmp_path}",
                    "data.recipe=fgvc",
                    "data.img_size=32",
                    "data.val_fraction=0.5",
                    f"paths.output_dir={tmp_path / 'out'}",
                    f"run_dir={tmp_path / 'out' / 'run'}",
                    "test=false",
                ]
            )
        )
    assert results["feature_cache"] is False
    assert any("feature cache not used" in r.getMessage() and "augments" in r.getMessage() for r in caplog.records)


def test_a_failing_cache_write_is_logged_and_training_goes_on_without_the_cache(tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")  # a real failure: the folder cannot be made
    with caplog.at_level(logging.WARNING, logger="vpt_lightning.runs.feature_cache"):
        cached, cached_state = _run(tmp_path, "cached", "tuning=linear", f"feature_cache.dir={blocker / 'cache'}")
    assert f"feature cache: could not write {blocker / 'cache'}" in caplog.text and "NotADirectoryError" in caplog.text
    assert (tmp_path / "cached" / "results.json").is_file() and cached["feature_cache"] is True
    plain, plain_state = _run(tmp_path, "plain", "tuning=linear", "feature_cache.enabled=false")
    for key, value in plain_state.items():  # trained as well as without any cache
        torch.testing.assert_close(cached_state[key], value, atol=1e-5, rtol=0)


def test_a_full_disk_during_a_cache_write_leaves_no_file_and_returns_the_features(tmp_path, monkeypatch, caplog):
    import errno

    import vpt_lightning.runs.feature_cache as feature_cache

    model, identity = create_backbone(
        BackboneConfig(
            name="vit_tiny_patch16_224",
            kwargs=dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2),
            init_seed=0,
        )
    )
    backbone, data = prompted_backbone(model, None), SyntheticDataset("count", 6, seed=1)

    def disk_full(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"part of a tensor file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(feature_cache.torch, "save", disk_full)
    with caplog.at_level(logging.WARNING, logger="vpt_lightning.runs.feature_cache"):
        served = FeatureCache(tmp_path).features(backbone, identity, data, batch_size=3)
    assert "No space left on device" in caplog.text and list(tmp_path.iterdir()) == []
    torch.testing.assert_close(served.tensors[0], compute_features(backbone, data, 3)[0])
