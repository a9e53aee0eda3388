"""Frozen CLIP models (open_clip) with learnable prompts in the text tower, the image tower, or both.

Backbones:
- `open_clip:<model>` or `open_clip:<model>@<tag>` (e.g. `open_clip:ViT-B-16@openai`): the open_clip
  architecture, weights from the hub (pretrained tag; the model's first listed tag when none is given),
  or from a local file (`weights=`: an open_clip state dict, `.safetensors` or a torch file read with
  `weights_only=True`). Offline with neither, loading fails with one line that says what to provide.
- `tiny-clip`: a randomly initialised open_clip CLIP with 2 layers per tower and small widths, built
  offline with open_clip's own BPE tokenizer. It shows that the code path works; it knows nothing.

Methods (methods.md section 6), all on frozen towers:
- zero-shot: class names in templates ("a photo of a {}."), text features averaged over templates.
- CoOp: `n_ctx` learnable context vectors shared by every class (unified context) replace the word
  embeddings in front of the class name: "X X X X {class}." with the X's learned.
- MaPLe: the same text context in layer 0 and `depth - 1` further learnable text contexts that replace
  those positions in layers 1..depth-1; the image tower gets `n_ctx` prompt tokens in each of those
  layers, each produced from that layer's text context by a learned linear coupling (text width ->
  vision width), one per layer. Vision prompts enter before `ln_pre` in layer 0 and replace the
  previous layer's prompt outputs in later layers, as in the MaPLe code.

Token order in the image tower is the project's: [CLS, prompts, patches]. Attention runs through
torch's fused kernel, or as explicit matmuls when `fused_attn` is False (`cost.unfused_attention`),
so fvcore counts the attention products. With no prompts every forward here equals open_clip's own
`encode_image` / `encode_text` (tests).

Text features depend only on the class names and the text-side parameters, so evaluation computes them
once per class set (`PromptedCLIP.text_features`), and an image costs its image tower only.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from vptdash.engine.backbones import BackboneError
from vptdash.engine.cost import block_macs
from vptdash.engine.train import ConfigError

CLIP_PREFIX = "open_clip:"
TINY_CLIP = "tiny-clip"
METHODS = ("zeroshot", "coop", "maple")
CLIP_BACKBONES = {
    TINY_CLIP: "random tiny CLIP, offline: shows the path works, knows nothing",
    "open_clip:ViT-B-16": "CLIP ViT-B/16 (hub tag when online, or a local weights file)",
    "open_clip:ViT-B-32": "CLIP ViT-B/32 (hub tag when online, or a local weights file)",
}
DEFAULT_TEMPLATES = ("a photo of a {}.",)
CTX_INIT = "a photo of a"  # CoOp/MaPLe initialise the context from these words' embeddings
_TINY_SEED = 0
TINY_MODEL = "vptdash-tiny-clip"  # its open_clip configuration ships in clip_configs/ (2 layers, width 64)
TINY_IMAGE_SIZE = 32
CONFIG_DIR = Path(__file__).with_name("clip_configs")


def is_clip_backbone(name: Any) -> bool:
    """True for the backbones this module loads (`tiny-clip`, `open_clip:<model>`)."""
    return isinstance(name, str) and (name == TINY_CLIP or name.startswith(CLIP_PREFIX))


# ---------------------------------------------------------------------------------------- loading
@dataclass
class ClipBundle:
    """A frozen CLIP model with its tokenizer and preprocessing numbers."""

    name: str
    model: nn.Module  # open_clip.CLIP, frozen, eval mode
    tokenizer: Any  # callable: list[str] -> LongTensor (N, context_length)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    source: str  # "random", "file:<digest>", "hub:<tag>"

    @property
    def vision_width(self) -> int:
        return int(self.model.visual.conv1.out_channels)

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.weight.shape[1])

    @property
    def vision_layers(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    @property
    def text_layers(self) -> int:
        return len(self.model.transformer.resblocks)


def _open_clip():
    import open_clip  # noqa: PLC0415 - slow to import (~2 s) and only needed for CLIP runs

    if TINY_MODEL not in open_clip.list_models():  # the tiny model is an open_clip model like any other
        open_clip.add_model_config(CONFIG_DIR)
    return open_clip


@contextmanager
def _quiet():
    """open_clip logs what it does (a random init, a failed download) on the root logger; the user gets
    our one line instead."""
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _tiny_clip():
    """open_clip's own `create_model` on the shipped tiny configuration, seeded: the same random model
    in every process (its runs are comparable), built the way `open_clip:<model>` models are."""
    open_clip = _open_clip()
    state = torch.random.get_rng_state()
    torch.manual_seed(_TINY_SEED)
    try:
        with _quiet():
            model = open_clip.create_model(TINY_MODEL, pretrained=None)
    finally:
        torch.random.set_rng_state(state)
    return model, open_clip.get_tokenizer(TINY_MODEL)


def model_config(model_name: str) -> dict:
    """open_clip's shipped configuration of a model (no weights); BackboneError if it has none."""
    config = _open_clip().get_model_config(model_name)
    if not config:
        raise BackboneError(f"open_clip has no model {model_name!r}")
    return config


def parse_clip_name(name: str) -> tuple[str, str | None]:
    """`open_clip:ViT-B-16@openai` -> ("ViT-B-16", "openai"); no tag -> (model, None)."""
    if not name.startswith(CLIP_PREFIX):
        raise BackboneError(f"not an open_clip backbone: {name!r} (expected {CLIP_PREFIX}<model>[@<tag>])")
    model, _, tag = name[len(CLIP_PREFIX) :].partition("@")
    if not model:
        raise BackboneError(f"no model in {name!r}: e.g. {CLIP_PREFIX}ViT-B-16")
    return model, tag or None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """An open_clip state dict from a file: safetensors by extension, else torch.load(weights_only=True);
    a checkpoint that wraps it ("state_dict") or a DataParallel "module." prefix is unwrapped."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise BackboneError(
            f"cannot read CLIP weights {path.name}: {type(exc).__name__}. Expected an open_clip state dict "
            "(.safetensors, or a .pt/.bin saved with torch.save(model.state_dict()))"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path.name} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _load_file_into(model: nn.Module, path: Path) -> None:
    state = read_state_dict(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "attn_mask"]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise BackboneError(
            f"{path.name} does not fit this CLIP: {len(missing)} missing and {len(unexpected)} unexpected keys "
            f"(first: {first!r}); is it a state dict of the same open_clip model?"
        )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers within `timeout` seconds. Offline, the hub client retries for about
    a minute before failing; this answers in seconds, so an offline user is told at once."""
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((host.hostname or "huggingface.co", host.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_clip(model_name: str, tag: str | None):
    open_clip = _open_clip()
    if model_name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if model_name.lower()[:5] in m.lower()][:5]
        raise BackboneError(
            f"open_clip has no model {model_name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
        )
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    tag = tag or (tags[0] if tags else None)
    if tag is None:
        raise BackboneError(f"open_clip lists no pretrained weights for {model_name}: pass --weights FILE")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        # the hub client would still try (and retry) before giving up: say it at once
        raise BackboneError(
            f"HF_HUB_OFFLINE is set, so {model_name} weights {tag!r} cannot come from the hub: pass --weights FILE "
            f"(an open_clip state dict of {model_name}, .safetensors or .pt)"
        )
    if not hub_reachable():
        raise BackboneError(
            f"the Hugging Face hub cannot be reached, so {model_name} weights {tag!r} cannot be downloaded: pass "
            f"--weights FILE (an open_clip state dict of {model_name}, .safetensors or .pt)"
        )
    try:
        with _quiet():
            model = open_clip.create_model(model_name, pretrained=tag)
    except Exception as exc:  # noqa: BLE001 - offline, unknown tag, broken download: one line for the user
        raise BackboneError(
            f"cannot get {model_name} weights {tag!r} from the hub ({type(exc).__name__}): offline? "
            f"pass --weights FILE (an open_clip state dict of {model_name}, .safetensors or .pt)"
        ) from None
    return model, tag


def create_clip(name: str, weights: str | Path | None = None) -> ClipBundle:
    """A frozen CLIP (see the module docstring); raises BackboneError with one line on failure."""
    open_clip = None
    weights_path = None
    if weights is not None:
        weights_path = Path(weights).expanduser()
        if not weights_path.is_file():
            raise BackboneError(f"CLIP weights file not found: {weights_path}")
    if name == TINY_CLIP:
        model, tokenizer = _tiny_clip()
        source = "random"
        open_clip = _open_clip()
    else:
        model_name, tag = parse_clip_name(name)
        open_clip = _open_clip()
        if weights_path is not None:
            if model_name not in open_clip.list_models():
                raise BackboneError(f"open_clip has no model {model_name!r}")
            with _quiet():
                model = open_clip.create_model(model_name, pretrained=None)
            source = "file"
        else:
            model, tag = _hub_clip(model_name, tag)
            source = f"hub:{tag}"
        tokenizer = open_clip.get_tokenizer(model_name)
    if not isinstance(model, open_clip.CLIP) or not isinstance(model.visual, open_clip.transformer.VisionTransformer):
        raise BackboneError(
            f"{name}: only CLIP models with a ViT image tower and the standard text tower are supported"
        )
    if weights_path is not None:
        _load_file_into(model, weights_path)
        source = f"file:{_file_digest(weights_path)}"
    _check_supported(name, model)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    visual = model.visual
    mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else int(visual.image_size)
    return ClipBundle(name, model, tokenizer, mean, std, int(size), source)


def _check_supported(name: str, model: nn.Module) -> None:
    visual = model.visual
    problems = []
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        problems.append("image pooling other than the class token")
    if model.text_pool_type != "argmax" or model.logit_bias is not None:
        problems.append("text pooling other than the end-of-text token, or a logit bias (SigLIP)")
    blocks = [*visual.transformer.resblocks, *model.transformer.resblocks]
    if not all(hasattr(b, "attn") and isinstance(b.attn, nn.MultiheadAttention) for b in blocks):
        problems.append("custom attention blocks")
    if problems:
        raise BackboneError(f"{name}: not supported for prompt learning here ({'; '.join(problems)})")


def architecture_only(model_name: str) -> ClipBundle:
    """An open_clip architecture with random weights, for counting its costs only (GMACs and parameter
    counts depend on the architecture, not on the weights). Never used for a run: it knows nothing."""
    open_clip = _open_clip()
    with _quiet():
        model = open_clip.create_model(model_name, pretrained=None)
    _check_supported(model_name, model)
    model.eval().requires_grad_(False)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    tokenizer = open_clip.get_tokenizer(model_name)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    return ClipBundle(f"{CLIP_PREFIX}{model_name}", model, tokenizer, tuple(mean), tuple(std), int(size), "random")


@lru_cache(maxsize=2)
def load_clip(name: str, weights: str | None = None) -> ClipBundle:
    """One frozen CLIP per (name, weights) in this process; prompted models never mutate it."""
    return create_clip(name, weights)


def clip_fingerprint(name: str, weights: str | None) -> str:
    """What identifies the frozen weights (cache keys): the file's digest, the hub tag, or the seed."""
    if weights:
        return f"{name}:file-{_file_digest(Path(weights).expanduser())}"
    if name == TINY_CLIP:
        return f"{name}:random-seed{_TINY_SEED}"
    return f"{name}:hub"


def save_clip_weights(model: nn.Module, path: str | Path) -> Path:
    """Write `model`'s state dict in open_clip's format (safetensors by extension, else torch.save)."""
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file  # noqa: PLC0415 - only when writing a checkpoint

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


# ---------------------------------------------------------------------------------------- blocks
def block_forward(block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None, fused: bool) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock on batch-first `x`; explicit matmuls when not `fused`."""
    if fused:
        return block(x, attn_mask=attn_mask)
    attn = block.attn
    h = block.ln_1(x)
    batch, tokens, width = h.shape
    heads = attn.num_heads
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (width // heads) ** -0.5
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    out = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + block.ls_1(attn.out_proj(out))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def attention_probs(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention probabilities (B, heads, T, T) a block computes on `x` (no mask: the image tower)."""
    attn = block.attn
    h = block.ln_1(x)
    batch, tokens, width = h.shape
    q, k, _ = (
        F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
        .reshape(batch, tokens, 3, attn.num_heads, width // attn.num_heads)
        .permute(2, 0, 3, 1, 4)
    )
    return (torch.matmul(q, k.transpose(-2, -1)) * (width // attn.num_heads) ** -0.5).softmax(dim=-1).float()


def class_prompt_names(class_names: Sequence[str]) -> list[str]:
    """Folder names as words: 'solar_cell-defect' -> 'solar cell defect'."""
    return [" ".join(str(c).replace("_", " ").replace("-", " ").split()) or str(c) for c in class_names]


# ---------------------------------------------------------------------------------------- the model
class PromptedCLIP(nn.Module):
    """A frozen CLIP with the learnable parts of one method (zero-shot: none).

    `text_prompts`: context length n_ctx (CoOp, MaPLe); `depth`: MaPLe's prompt depth J (layers with
    prompts in both towers); MaPLe's vision prompts: `text_prompts` per layer (coupled one to one)."""

    def __init__(
        self,
        bundle: ClipBundle,
        method: str,
        *,
        text_prompts: int = 0,
        depth: int = 1,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        seed: int = 0,
    ):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.bundle, self.method = bundle, method
        object.__setattr__(self, "clip", bundle.model)  # not a submodule: never in state_dict or parameters()
        self.n_ctx = 0 if method == "zeroshot" else int(text_prompts)
        self.depth = int(depth) if method == "maple" else (1 if self.n_ctx else 0)
        self.templates = tuple(templates)
        self.fused_attn = True  # cost.unfused_attention switches this off for counting
        self.text_tower_calls = 0  # forward passes of the text tower (tests count them)
        self._eval_cache: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        generator = torch.Generator().manual_seed(seed)
        tw, vw = bundle.text_width, bundle.vision_width
        if self.n_ctx:
            self.ctx = nn.Parameter(self._initial_context(generator))
        if method == "maple":
            self.text_deep = nn.ParameterList(
                [nn.Parameter(torch.randn(self.n_ctx, tw, generator=generator) * 0.02) for _ in range(self.depth - 1)]
            )
            first = nn.Linear(tw, vw)
            with torch.no_grad():
                bound = tw**-0.5
                first.weight.copy_(torch.rand(vw, tw, generator=generator) * 2 * bound - bound)
                first.bias.copy_(torch.rand(vw, generator=generator) * 2 * bound - bound)
            # MaPLe clones one initialised layer for every depth: the couplings start equal
            self.coupling = nn.ModuleList([copy.deepcopy(first) for _ in range(self.depth)])

    # -- learnable parts
    def _initial_context(self, generator: torch.Generator) -> torch.Tensor:
        """The embeddings of the first n words of CTX_INIT; beyond 4 words, random (std 0.02), as CoOp."""
        words = CTX_INIT.split()
        embed = self.clip.token_embedding.weight
        ctx = torch.randn(self.n_ctx, embed.shape[1], generator=generator) * 0.02
        use = min(self.n_ctx, len(words))
        if use:
            tokens = self.bundle.tokenizer([" ".join(words[:use])])[0]
            ctx[:use] = embed[tokens[1 : 1 + use]].detach().float()
        return ctx

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=True)
        self._eval_cache.clear()

    @property
    def vision_prompts(self) -> int:
        return self.n_ctx if self.method == "maple" else 0

    def vision_prompt_tokens(self) -> list[torch.Tensor]:
        """The image tower's prompts per layer (MaPLe: coupled from the text contexts); [] otherwise."""
        if self.method != "maple":
            return []
        texts = [self.ctx, *self.text_deep]
        return [layer(text) for layer, text in zip(self.coupling, texts)]

    # -- text tower
    def _tokens(self, class_names: Sequence[str]) -> torch.Tensor:
        names = class_prompt_names(class_names)
        if self.n_ctx:
            texts = [f"{' '.join(['X'] * self.n_ctx)} {name}." for name in names]
        else:
            texts = [t.format(name) for name in names for t in self.templates]
        self._check_length(texts)
        return self.bundle.tokenizer(texts)

    def _check_length(self, texts: Sequence[str]) -> None:
        """The tokenizer would cut a prompt longer than the context silently, class name first."""
        encode = getattr(self.bundle.tokenizer, "encode", None)
        if encode is None:
            return
        context = int(self.clip.positional_embedding.shape[0])
        longest = max(texts, key=lambda t: len(encode(t)))
        if len(encode(longest)) + 2 > context:  # + start and end of text
            raise ConfigError(
                f"the prompt {longest[:60]!r} needs {len(encode(longest)) + 2} tokens, more than the text "
                f"tower's {context}: fewer text prompts or shorter class names"
            )

    def encode_text(self, class_names: Sequence[str]) -> torch.Tensor:
        """Normalised text features, one row per class (zero-shot: averaged over the templates)."""
        self.text_tower_calls += 1
        clip = self.clip
        tokens = self._tokens(class_names)
        x = clip.token_embedding(tokens)
        if self.n_ctx:
            ctx = self.ctx.to(x.dtype).unsqueeze(0).expand(len(tokens), -1, -1)
            x = torch.cat([x[:, :1], ctx, x[:, 1 + self.n_ctx :]], dim=1)
        x = x + clip.positional_embedding.to(x.dtype)
        deep = list(self.text_deep) if self.method == "maple" else []
        for index, block in enumerate(clip.transformer.resblocks):
            if 1 <= index < self.depth and deep:
                ctx = deep[index - 1].to(x.dtype).unsqueeze(0).expand(len(tokens), -1, -1)
                x = torch.cat([x[:, :1], ctx, x[:, 1 + self.n_ctx :]], dim=1)
            x = block_forward(block, x, clip.attn_mask, self.fused_attn)
        x = clip.ln_final(x)
        x = x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ clip.text_projection
        x = F.normalize(x, dim=-1)
        if not self.n_ctx and len(self.templates) > 1:
            x = F.normalize(x.reshape(len(class_names), len(self.templates), -1).mean(dim=1), dim=-1)
        return x

    def text_features(self, class_names: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(text features, vision prompts) for a class set. In eval mode computed once per class set
        and kept until training resumes or new prompts are loaded; in training every call recomputes
        (the gradients flow through them)."""
        key = tuple(class_names)
        if self.training or torch.is_grad_enabled():
            self._eval_cache.clear()
            return self.encode_text(class_names), self.vision_prompt_tokens()
        if key not in self._eval_cache:
            self._eval_cache[key] = (self.encode_text(class_names), self.vision_prompt_tokens())
        return self._eval_cache[key]

    def train(self, mode: bool = True):
        if mode:  # the prompts may change from here on
            self._eval_cache.clear()
        return super().train(mode)

    # -- image tower
    def encode_image(
        self, images: torch.Tensor, vision_prompts: Sequence[torch.Tensor] = (), record: list | None = None
    ) -> torch.Tensor:
        """Normalised image features; `vision_prompts`: one (n, width) tensor per prompted layer;
        `record`: a list that receives each layer's attention probabilities (B, heads, T, T)."""
        visual = self.clip.visual
        x = visual.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        n = 0
        if vision_prompts:
            n = vision_prompts[0].shape[0]
            x = torch.cat([x[:, :1], vision_prompts[0].to(x.dtype).expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        x = visual.ln_pre(x)
        for index, block in enumerate(visual.transformer.resblocks):
            if 1 <= index < len(vision_prompts):
                prompts = vision_prompts[index].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], prompts, x[:, 1 + n :]], dim=1)
            if record is not None:
                record.append(attention_probs(block, x))
            x = block_forward(block, x, None, self.fused_attn)
        x = visual.ln_post(x[:, 0])  # LayerNorm is per token: only the class token's is read
        return F.normalize(x @ visual.proj, dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.clip.logit_scale.exp() * image_features @ text_features.t()

    def forward(self, images: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        text, vision = self.text_features(class_names)
        return self.logits(self.encode_image(images, vision), text)

    # -- shapes for the cost formulas
    def image_tokens_per_layer(self) -> list[int]:
        """Tokens each image layer runs on. MaPLe's prompts enter in layer 0 and stay in the sequence to
        the end: layers below the depth replace them with new ones, later layers carry the last ones. So
        every layer runs on the prompts, and the depth changes parameters, not compute."""
        visual = self.clip.visual
        patches = int(visual.positional_embedding.shape[0]) - 1
        return [1 + patches + self.vision_prompts for _ in range(self.bundle.vision_layers)]


class ImageClassifier(nn.Module):
    """What inference runs per image once the class set is fixed: the image tower with its prompts and
    the product with the precomputed text features (latency and GMACs per image are of this)."""

    def __init__(self, model: PromptedCLIP, class_names: Sequence[str]):
        super().__init__()
        self.model = model
        with torch.no_grad():
            was = model.training
            model.eval()
            text, vision = model.text_features(class_names)
            model.train(was)
        self.register_buffer("text", text.detach().clone())
        self.vision = [v.detach().clone() for v in vision]
        self.fused_attn = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.model.fused_attn = self.fused_attn
        try:
            return self.model.logits(self.model.encode_image(images, self.vision), self.text)
        finally:
            self.model.fused_attn = True


class TextTower(nn.Module):
    """The text tower over one class set (for counting its GMACs once per class set)."""

    def __init__(self, model: PromptedCLIP, class_names: Sequence[str]):
        super().__init__()
        self.model, self.class_names = model, list(class_names)
        self.fused_attn = True

    def forward(self, _unused: torch.Tensor) -> torch.Tensor:
        self.model.fused_attn = self.fused_attn
        try:
            return self.model.encode_text(self.class_names)
        finally:
            self.model.fused_attn = True


# ---------------------------------------------------------------------------------------- costs
def norm_macs(tokens: int, width: int) -> int:
    """A LayerNorm with scale and shift, as fvcore counts it: 5 per element."""
    return 5 * tokens * width


def image_gmacs_analytic(model: PromptedCLIP, num_classes: int) -> float:
    """Per image: patch embedding + every layer with its real token count (LayerNorms counted as fvcore
    counts them, so the two agree exactly) + projection + the product with the class set's text
    features. Vision prompts lengthen the sequence in every layer (whatever the depth J); text prompts
    never reach the image tower."""
    visual = model.clip.visual
    width = model.bundle.vision_width
    mlp = visual.transformer.resblocks[0].mlp.c_fc.out_features
    patch = visual.conv1.kernel_size[0]
    patches = int(visual.positional_embedding.shape[0]) - 1
    embed_dim = visual.proj.shape[1]
    tokens = model.image_tokens_per_layer()
    layers = sum(block_macs(n, width, mlp) + 2 * norm_macs(n, width) for n in tokens)
    norms = norm_macs(tokens[0], width) + norm_macs(1, width)  # ln_pre on every token, ln_post on the class token
    return (patches * 3 * patch * patch * width + layers + norms + width * embed_dim + embed_dim * num_classes) / 1e9


def text_gmacs_analytic(model: PromptedCLIP, num_classes: int) -> float:
    """Once per class set: every prompt (classes x templates) through every text layer at full context
    length (the causal mask does not shorten the products), and the projection of the pooled token."""
    clip = model.clip
    width, context = model.bundle.text_width, int(clip.positional_embedding.shape[0])
    mlp = clip.transformer.resblocks[0].mlp.c_fc.out_features
    embed_dim = clip.text_projection.shape[1]
    prompts = num_classes * (1 if model.n_ctx else len(model.templates))
    layer = block_macs(context, width, mlp) + 2 * norm_macs(context, width)
    per_prompt = model.bundle.text_layers * layer + norm_macs(context, width) + width * embed_dim
    return prompts * per_prompt / 1e9
