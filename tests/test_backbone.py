"""Backbone creation: timm names, local checkpoint files in several formats, clear errors."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from vpt_lightning import BackboneConfig, create_backbone

from conftest import TINY_BACKBONE, make_vit


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
