"""Backbone creation: timm names, local checkpoint files in several formats, clear errors."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY, TINY_BACKBONE, make_vit
from safetensors.torch import save_file

from vpt_lightning import BackboneConfig, create_backbone


def _reference_features(images):
    return make_vit(seed=7)(images)


def _save(path, state_dict, fmt):
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    elif fmt == "wrapped":
        torch.save({"model": {f"module.{k}": v for k, v in state_dict.items()}, "epoch": 3}, path)
    else:
        torch.save(state_dict, path)


@pytest.mark.parametrize("fmt, suffix", [("pth", ".pth"), ("safetensors", ".safetensors"), ("wrapped", ".pt")])
def test_checkpoint_file_reproduces_logits(tmp_path, images, fmt, suffix):
    source = make_vit(seed=7)
    path = tmp_path / f"weights{suffix}"
    _save(path, source.state_dict(), fmt)
    model, identity = create_backbone({**TINY_BACKBONE, "checkpoint_path": str(path)})
    torch.testing.assert_close(model.eval()(images), source(images), rtol=0, atol=0)
    assert identity["weights"] == "file" and len(identity["checkpoint_sha256"]) == 64


def test_classifier_checkpoint_loads_into_headless_backbone(tmp_path, images):
    source = make_vit(seed=3, num_classes=11)
    path = tmp_path / "classifier.pth"
    torch.save(source.state_dict(), path)
    model, _ = create_backbone({**TINY_BACKBONE, "checkpoint_path": str(path)})
    source.reset_classifier(0)
    torch.testing.assert_close(model.eval()(images), source(images))


def test_checkpoint_for_another_architecture_names_the_keys(tmp_path):
    path = tmp_path / "deeper.pth"
    torch.save(make_vit(depth=5).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit .*unexpected keys: blocks\.4\."):
        create_backbone({**TINY_BACKBONE, "checkpoint_path": str(path)})
    path = tmp_path / "wider.pth"
    torch.save(make_vit(embed_dim=48, num_heads=2).state_dict(), path)
    with pytest.raises(ValueError, match=r"shape mismatches: .*file \(.*48.*\) vs model"):
        create_backbone({**TINY_BACKBONE, "checkpoint_path": str(path)})


def test_missing_and_corrupt_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone.checkpoint_path=.*nope.pth' does not exist"):
        create_backbone({**TINY_BACKBONE, "checkpoint_path": str(tmp_path / "nope.pth")})
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read as a weights file"):
        create_backbone({**TINY_BACKBONE, "checkpoint_path": str(bad)})


def test_random_init_is_reproducible_and_seeded(images):
    a, ida = create_backbone(TINY_BACKBONE)
    b, idb = create_backbone(TINY_BACKBONE)
    c, idc = create_backbone({**TINY_BACKBONE, "init_seed": 1})
    torch.testing.assert_close(a.eval()(images), b.eval()(images), rtol=0, atol=0)
    assert ida["fingerprint"] == idb["fingerprint"] != idc["fingerprint"]


def test_unknown_names_and_keys():
    with pytest.raises(ValueError, match="backbone.name='vit_nonexistent' is not a timm model"):
        create_backbone({"name": "vit_nonexistent"})
    with pytest.raises(ValueError, match=r"unknown backbone option\(s\) \['weights'\]"):
        BackboneConfig.from_mapping({"name": "vit_tiny_patch16_224", "weights": "x"})


def test_paper_backbone_configs_name_the_original_in21k_weights():
    from vpt_lightning.config import compose

    for group, name in [
        ("vit_base_patch16_224_in21k", "vit_base_patch16_224.orig_in21k"),
        ("vit_large_patch16_224_in21k", "vit_large_patch16_224.orig_in21k"),
        ("vit_huge_patch14_224_in21k", "vit_huge_patch14_224.orig_in21k"),
    ]:
        cfg = compose([f"backbone={group}"])
        assert cfg.backbone.name == name and cfg.backbone.pretrained
        assert name in timm.list_pretrained(name.split(".")[0] + ".*")


def _export_google_npz(vit, path):
    """Write ``vit`` in the original Google ViT .npz layout (as ViT-B_16.npz), inverting timm's mapping."""
    import numpy as np

    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    heads = vit.blocks[0].attn.num_heads
    dim = vit.embed_dim
    hd = dim // heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(len(vit.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        qkv_w, qkv_b = np.split(sd[b + "attn.qkv.weight"], 3), np.split(sd[b + "attn.qkv.bias"], 3)
        for name, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            out[mha + name + "/kernel"] = w.T.reshape(dim, heads, hd)
            out[mha + name + "/bias"] = bias.reshape(heads, hd)
        out[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(dim, heads, hd).transpose(1, 2, 0)
        out[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for src, dst in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[p + dst + "/scale"], out[p + dst + "/bias"] = sd[b + src + ".weight"], sd[b + src + ".bias"]
        for r in range(2):
            out[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            out[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **out)


def test_google_npz_checkpoint_through_timms_loader(tmp_path, images):
    source = make_vit(seed=11)
    path = tmp_path / "ViT-tiny.npz"
    _export_google_npz(source, path)
    model, identity = create_backbone({**TINY_BACKBONE, "checkpoint_path": str(path)})
    torch.testing.assert_close(model.eval()(images), source(images), rtol=1e-5, atol=1e-5)
    assert identity["weights"] == "file"


def _npz_of(tmp_path, name, **vit_kwargs):
    path = tmp_path / name
    _export_google_npz(make_vit(seed=11, **vit_kwargs), path)
    return str(path)


def test_google_npz_for_another_architecture_names_the_arrays(tmp_path):
    deeper = _npz_of(tmp_path, "deeper.npz", depth=5)  # timm's loader would ignore the fifth block
    with pytest.raises(
        ValueError, match=r"deeper.npz.*does not fit.*5 Transformer/encoderblock_\* blocks vs model depth 4"
    ):
        create_backbone({**TINY_BACKBONE, "checkpoint_path": deeper})
    wider = _npz_of(tmp_path, "wider.npz", embed_dim=48)
    with pytest.raises(
        ValueError, match=r"wider.npz.*embedding/kernel \(4, 4, 3, 48\) \(width 48\) vs model embed_dim 32"
    ):
        create_backbone({**TINY_BACKBONE, "checkpoint_path": wider})
    heads = _npz_of(tmp_path, "heads.npz", num_heads=4)  # same shapes once flattened: loads silently in timm
    with pytest.raises(ValueError, match=r"query/kernel 4 heads vs model num_heads 2"):
        create_backbone({**TINY_BACKBONE, "checkpoint_path": heads})
    import numpy as np

    arrays = dict(np.load(_npz_of(tmp_path, "full.npz")))
    del arrays["cls"]
    np.savez(tmp_path / "nocls.npz", **arrays)
    with pytest.raises(ValueError, match=r"file lacks a class token \('cls'\) vs model class_token=True"):
        create_backbone({**TINY_BACKBONE, "checkpoint_path": str(tmp_path / "nocls.npz")})
    # a shape the checks above do not cover: timm's own RuntimeError, with the path
    mlp = _npz_of(tmp_path, "mlp.npz", mlp_ratio=2.0)
    with pytest.raises(ValueError, match=r"mlp.npz.*could not be loaded into VisionTransformer.*size"):
        create_backbone({**TINY_BACKBONE, "checkpoint_path": mlp})


def test_google_npz_for_another_patch_or_image_size_needs_resize_embeddings(tmp_path, images, caplog):
    patch8 = _npz_of(tmp_path, "patch8.npz", patch_size=8)
    with pytest.raises(ValueError, match=r"patch8.npz.*another patch size.*embedding/kernel: file \(8, 8, 3, 32\)"):
        create_backbone({**TINY_BACKBONE, "checkpoint_path": patch8})
    px64 = _npz_of(tmp_path, "px64.npz", img_size=64)
    with pytest.raises(ValueError, match=r"posembed_input/pos_embedding: file \(1, 257, 32\) vs model \(1, 65, 32\)"):
        create_backbone({**TINY_BACKBONE, "checkpoint_path": px64})
    with caplog.at_level("WARNING", logger="vpt_lightning.backbones"):
        model, _ = create_backbone({**TINY_BACKBONE, "checkpoint_path": px64, "resize_embeddings": True})
    assert "resampling" in caplog.text and "pos_embedding" in caplog.text
    assert model.eval()(images).shape == (3, 32)


def _state_dict_file(tmp_path, name, **vit_kwargs):
    path = tmp_path / name
    torch.save(make_vit(seed=5, **vit_kwargs).state_dict(), path)
    return str(path)


def test_state_dict_for_another_patch_or_image_size_needs_resize_embeddings(tmp_path, images, caplog):
    patch8 = _state_dict_file(tmp_path, "patch8.pth", patch_size=8)
    with pytest.raises(ValueError) as err:
        create_backbone({**TINY_BACKBONE, "checkpoint_path": patch8})
    message = str(err.value)
    assert "patch8.pth" in message and "backbone.resize_embeddings=true" in message
    assert "patch_embed.proj.weight: file (32, 3, 8, 8) vs model (32, 3, 4, 4)" in message
    assert "pos_embed: file (1, 17, 32) vs model (1, 65, 32)" in message
    px64 = _state_dict_file(tmp_path, "px64.pth", img_size=64)
    with pytest.raises(ValueError, match=r"pos_embed: file \(1, 257, 32\) vs model \(1, 65, 32\)") as err:
        create_backbone({**TINY_BACKBONE, "checkpoint_path": px64})
    assert "patch_embed" not in str(err.value)
    with caplog.at_level("WARNING", logger="vpt_lightning.backbones"):
        model, _ = create_backbone({**TINY_BACKBONE, "checkpoint_path": patch8, "resize_embeddings": True})
    assert "patch_embed.proj.weight: file (32, 3, 8, 8)" in caplog.text and "pos_embed" in caplog.text
    assert model.eval()(images).shape == (3, 32)


def test_layout_conversions_need_no_resize(tmp_path, images):
    # a patch embedding stored as a linear layer (old timm checkpoints): reshaped, not resampled
    source = make_vit(seed=7)
    state = source.state_dict()
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].reshape(32, -1).clone()
    torch.save(state, tmp_path / "linear.pth")
    model, _ = create_backbone({**TINY_BACKBONE, "checkpoint_path": str(tmp_path / "linear.pth")})
    torch.testing.assert_close(model.eval()(images), source(images), rtol=0, atol=0)
    # DINOv2 with registers: the file's pos_embed (1, 65, 32) holds a class position timm folds into cls_token
    kwargs = {**TINY, "reg_tokens": 2, "no_embed_class": True}
    source = make_vit(seed=8, reg_tokens=2, no_embed_class=True)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    cls_pos = torch.randn(1, 1, 32)
    state["register_tokens"] = state.pop("reg_token")
    state["cls_token"] = state["cls_token"] - cls_pos
    state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, 32)
    torch.save(state, tmp_path / "dinov2.pth")
    model, _ = create_backbone({**TINY_BACKBONE, "kwargs": kwargs, "checkpoint_path": str(tmp_path / "dinov2.pth")})
    torch.testing.assert_close(model.eval()(images), source(images), rtol=1e-5, atol=1e-5)


def test_fingerprint_sees_a_change_anywhere_in_a_tensor():
    from vpt_lightning.sharing.checkpoint import weights_fingerprint

    model = make_vit(seed=1)
    before = weights_fingerprint(model)
    assert weights_fingerprint(make_vit(seed=1)) == before != weights_fingerprint(make_vit(seed=2))
    weight = model.blocks[3].mlp.fc1.weight  # 4096 values; change only the second half
    with torch.no_grad():
        weight.view(-1)[weight.numel() // 2 :] += 1e-3
    assert weights_fingerprint(model) != before
    # a larger (wider) model is sampled with a stride, still across the whole tensor: a fine-tuned copy differs
    wide = make_vit(seed=1, embed_dim=128)
    before = weights_fingerprint(wide)
    with torch.no_grad():
        wide.blocks[2].mlp.fc2.weight.view(-1)[-30000:] += 1e-4
    assert weights_fingerprint(wide) != before


def test_the_weights_digest_sees_every_value_where_the_sampled_fingerprint_does_not():
    from vpt_lightning.sharing.checkpoint import weights_fingerprint, weights_sha256

    wide = make_vit(seed=1, embed_dim=128)
    fingerprint, digest = weights_fingerprint(wide), weights_sha256(wide)
    assert len(digest) == 64 and weights_sha256(make_vit(seed=1, embed_dim=128)) == digest
    weight = wide.blocks[2].mlp.fc2.weight.view(-1)  # 65,536 values, sampled every 16th
    with torch.no_grad():
        weight[1] += 1.0  # not a sampled value
    assert weights_fingerprint(wide) == fingerprint and weights_sha256(wide) != digest
    # the digest is of the values, not of their precision on file: an fp16 copy of fp16-exact weights is the same
    exact = make_vit(seed=1).half().float()
    assert weights_sha256(exact) == weights_sha256(exact.half())


def test_a_weights_files_digests_are_cached_until_the_file_changes(tmp_path):
    import os

    from vpt_lightning.backbones.identity import _FILE_DIGESTS

    path = tmp_path / "weights.safetensors"
    save_file(make_vit(seed=1).state_dict(), str(path))
    config = {**TINY_BACKBONE, "checkpoint_path": str(path)}
    cached = len(_FILE_DIGESTS)
    first = create_backbone(config)[1]
    assert len(_FILE_DIGESTS) == cached + 1
    assert create_backbone(config)[1] == first and len(_FILE_DIGESTS) == cached + 1  # read from the cache
    # rewritten in place with other weights of the same size, its old modification time put back: not served stale
    stat = path.stat()
    save_file(make_vit(seed=2).state_dict(), str(path))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    second = create_backbone(config)[1]
    assert second["weights_sha256"] != first["weights_sha256"]
    assert second["checkpoint_sha256"] != first["checkpoint_sha256"]


def test_an_identity_of_an_older_version_passes_only_on_a_provably_same_backbone(tmp_path):
    """Identities without the digest carry a sampled fingerprint only: they are accepted on the same weights file
    (its SHA-256), the same seeded random init or timm's hub weights of the same name, never on a mere match."""
    from vpt_lightning.sharing.checkpoint import identity_differences

    def older(identity):
        return {k: v for k, v in identity.items() if k != "weights_sha256"}

    random_init = create_backbone(TINY_BACKBONE)[1]
    assert identity_differences(older(random_init), create_backbone(TINY_BACKBONE)[1]) == []
    path = tmp_path / "weights.safetensors"
    save_file(make_vit(seed=1).state_dict(), str(path))
    from_file = create_backbone({**TINY_BACKBONE, "checkpoint_path": str(path)})[1]
    assert identity_differences(older(from_file), from_file) == []
    # the same weights in another file: the fingerprint matches, but nothing proves the other values do
    torch.save(make_vit(seed=1).state_dict(), tmp_path / "copy.pth")
    copy = create_backbone({**TINY_BACKBONE, "checkpoint_path": str(tmp_path / "copy.pth")})[1]
    assert copy["fingerprint"] == from_file["fingerprint"]
    assert identity_differences(from_file, copy) == []  # the digest proves it
    (refusal,) = identity_differences(older(from_file), copy)
    assert refusal.startswith("weights_sha256: not recorded") and "vpt-export hub" in refusal
    hub = {**older(random_init), "weights": "hub"}
    assert identity_differences(hub, {**random_init, "weights": "hub"}) == []
    assert identity_differences(hub, random_init) != []


@pytest.mark.parametrize(
    "family, message",
    [
        ("PromptedViT", "PromptedViT needs a timm VisionTransformer (vit_*"),
        ("PromptedSwin", "PromptedSwin needs a timm SwinTransformer (swin_* models), got Linear"),
        ("PromptedConvNet", "PromptedConvNet needs a timm ConvNeXt or ResNet, got Linear"),
    ],
)
def test_the_base_constructor_checks_the_model_class_of_every_family(family, message):
    import importlib

    module = {"PromptedViT": "vit", "PromptedSwin": "swin", "PromptedConvNet": "convnet"}[family]
    cls = getattr(importlib.import_module(f"vpt_lightning.backbones.{module}"), family)
    with pytest.raises(TypeError) as err:
        cls(torch.nn.Linear(2, 2))
    assert str(err.value).startswith(message)
