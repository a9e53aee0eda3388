"""Where self-attention goes once prompts are in the sequence: attention maps and prompt pull.

Kim et al. ("Do We Really Need a Large Number of Visual Prompts?", methods.md section 2) argue that
prompts change where attention goes. This module measures that on a trained run:

* `extract_attention(model, images)`: the attention probabilities of every block and head,
  `(B, heads, T, T)` per block, for a batch of normalised images;
* `prompt_pull(maps)`: per block, the share of attention mass that the CLS query, and the patch
  queries, put on prompt keys, averaged over heads and images, next to the uniform share `p / T`
  (what every key would get if attention ignored content);
* `per_prompt_pull(maps, block)`: the same per prompt slot (which prompts attract attention);
* `cls_patch_map(maps, block, head)`: CLS-to-patch attention reshaped to the patch grid;
* `attention_rollout(maps)` (Abnar & Zuidema 2020) where it is well defined, see `rollout_unavailable_reason`;
* `measure_pull(model, images)`: prompt pull over many images, streamed batch by batch;
* `untrained_twin(run)`: the same model before training (same backbone, placement and per-block prompt
  counts, the prompts drawn by the same seeded init, the trained head): the baseline that isolates what
  training did. Measured on a frozen DINOv2, untrained deep prompts already draw far more CLS attention
  than p/T, so p/T alone would credit training with what the backbone does to any prompt;
* influence beside attention mass: `value_share` (per block, the share of the attention output's
  norm-weighted mass that comes from prompt keys: `A_ij ||W_O,h v_j,h||`, Kobayashi et al. 2020, so a
  prompt that draws attention but carries a small value counts little) and `masked_prompt_effect`
  (accuracy and logits with the prompts removed from the sequence, the same head).

How the probabilities are obtained (exact, and the backbone is never modified): the blocks are run
one by one exactly as `PromptedViT.run_blocks` does (same prompt writes, same skips), and before each
block its attention probabilities are recomputed from the block's own modules on the block's own
input: `q, k = q_norm/k_norm(qkv(norm1(x)))`, `softmax(q * scale @ k^T)`. That is the expression
timm's `Attention` evaluates on its unfused path (its fused path computes the same softmax inside
`scaled_dot_product_attention` without materialising it). Blocks run whole here, every query row
included, since the maps show what prompts themselves attend to (`run_blocks` leaves out rows nobody
reads, `vptdash.engine.rows`, with the same logits up to rounding). Nothing is patched, no hook is
registered and `fused_attn` is never switched, so a backbone shared with a training thread or a
latency measurement is not disturbed: training and latency keep the fused kernel. The cost is one
extra `qkv` projection per block, for analysis only. `tests/test_attention.py` checks that
`proj(probs @ v)` reproduces the block's own attention output.

Token order inside the prompted model: `[CLS (+ register tokens), prompts, patches]`; the number of
prompts in the sequence at each block follows the model's placement (prompts join at the first
placed block; deep placements overwrite the slots with each block's fresh prompts).

No Streamlit here; figures are in `attention_charts.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from vptdash.engine import data
from vptdash.engine.prompts import PromptedViT, patch_size_of
from vptdash.engine.train import RunConfig, build_model

PULL_SAMPLE_IMAGES = 32  # images per run for the pull-vs-count comparison: enough for a stable mean


class AttentionError(ValueError):
    """The backbone's attention cannot be read exactly (an attention module of an unknown kind)."""


# ---------------------------------------------------------------------------------------- extraction
@dataclass
class BlockAttention:
    block: int
    probs: torch.Tensor | None  # (B, heads, T, T) float32 on CPU; None for a skipped block
    num_prompts: int  # prompt tokens in the sequence entering this block
    value_norms: torch.Tensor | None = None  # (B, heads, T): ||W_O,h v_j,h|| per key token and head

    @property
    def tokens(self) -> int:
        return 0 if self.probs is None else int(self.probs.shape[-1])


@dataclass
class AttentionMaps:
    """Every block's attention for one batch, with what is needed to read it."""

    blocks: list[BlockAttention]
    num_prefix_tokens: int  # CLS + register tokens: prompts start right after them
    has_class_token: bool
    grid: tuple[int, int]  # patch grid (rows, cols)
    placement: tuple[int, ...] = ()
    prompt_counts: tuple[int, ...] = ()
    skip_blocks: frozenset = field(default_factory=frozenset)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def batch_size(self) -> int:
        for block in self.blocks:
            if block.probs is not None:
                return int(block.probs.shape[0])
        return 0

    @property
    def num_heads(self) -> int:
        for block in self.blocks:
            if block.probs is not None:
                return int(block.probs.shape[1])
        return 0

    def prompt_slice(self, block: int) -> slice:
        start = self.num_prefix_tokens
        return slice(start, start + self.blocks[block].num_prompts)

    def patch_slice(self, block: int) -> slice:
        return slice(self.num_prefix_tokens + self.blocks[block].num_prompts, None)


def _check_attention_module(attn: nn.Module) -> None:
    needed = ("qkv", "num_heads", "head_dim", "scale")
    missing = [name for name in needed if not hasattr(attn, name)]
    if missing or not isinstance(attn.qkv, nn.Linear):
        raise AttentionError(
            f"{type(attn).__name__} is not timm's standard Attention (missing {missing or ['a Linear qkv']}): "
            "its attention probabilities cannot be recomputed exactly"
        )
    for extra in ("rope", "rotary_emb", "rel_pos"):
        if getattr(attn, extra, None) is not None:
            raise AttentionError(f"{type(attn).__name__} uses {extra}: not supported by the attention analysis")


def block_attention_probs(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The attention probabilities `(B, heads, T, T)` that `block` computes on its input tokens `x`.

    Exactly timm's unfused `Attention.forward` up to the softmax (no mask: ViT blocks use none)."""
    attn = block.attn
    _check_attention_module(attn)
    h = block.norm1(x)
    batch, tokens, _ = h.shape
    qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    q = q * attn.scale
    return (q @ k.transpose(-2, -1)).softmax(dim=-1)


def block_value_norms(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T): the norm of what each key token j contributes per unit of attention through head h,
    `||W_O[:, h] v_j,h||` (the output projection's columns of head h times its value vector)."""
    attn = block.attn
    _check_attention_module(attn)
    h = block.norm1(x)
    batch, tokens, dim = h.shape
    qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    v = qkv[2]  # (B, H, T, dh)
    proj = getattr(attn, "proj", None)
    if isinstance(proj, nn.Linear):
        w_o = proj.weight.reshape(proj.out_features, attn.num_heads, attn.head_dim)  # (d, H, dh)
        return torch.einsum("bhtc,ehc->bhte", v, w_o).norm(dim=-1)
    return v.norm(dim=-1)


def patch_grid(model: PromptedViT, images: torch.Tensor) -> tuple[int, int]:
    patch = patch_size_of(model.backbone)
    return int(images.shape[-2]) // patch, int(images.shape[-1]) // patch


@torch.no_grad()
def extract_attention(model: PromptedViT, images: torch.Tensor) -> AttentionMaps:
    """Attention probabilities of every block and head for a batch of *normalised* images.

    The forward pass is `PromptedViT.run_blocks`, block by block, in eval mode (prompt dropout off)
    and in float32; the model's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        x = model.embed(images.float())
        prompt_list = model.prompts() if model.placement else []
        prompts_in_x, blocks = 0, []
        for index in range(model.depth):
            if index in model.block_to_slot:
                x, prompts_in_x = model.write_prompts(x, index, prompts_in_x, prompt_list)
            if index in model.skip_blocks:
                blocks.append(BlockAttention(index, None, prompts_in_x))
                continue
            block = model.backbone.blocks[index]
            probs = block_attention_probs(block, x)
            values = block_value_norms(block, x)
            blocks.append(BlockAttention(index, probs.float().cpu(), prompts_in_x, values.float().cpu()))
            x = block(x)
    finally:
        model.train(was_training)
    return AttentionMaps(
        blocks=blocks,
        num_prefix_tokens=model.num_prefix_tokens,
        has_class_token=model.has_class_token,
        grid=patch_grid(model, images),
        placement=tuple(model.placement),
        prompt_counts=tuple(model.prompt_counts),
        skip_blocks=frozenset(model.skip_blocks),
    )


# ---------------------------------------------------------------------------------------- prompt pull
def _cls_query(maps: AttentionMaps) -> int | None:
    return 0 if maps.has_class_token else None


def prompt_pull(maps: AttentionMaps) -> list[dict[str, Any]]:
    """Per block: attention mass on prompt keys from the CLS query and from the patch queries.

    `cls_pull` = A[:, :, CLS, prompts].sum(keys).mean(images, heads); `patch_pull` = the same with
    the patch queries, also averaged over them; `uniform` = p / T, the share prompts would get if
    every key were attended equally. A pull above `uniform` means prompts attract more than their
    share. `cls_value_share` / `patch_value_share`: the share of the value-weighted mass
    `sum_h A_h,ij ||W_O,h v_j,h||` that comes from prompt keys (`value_share`; NaN without value norms).
    Skipped blocks (never executed) have NaN values; 0 prompts give a pull of exactly 0.
    `cls_pull` is NaN for a backbone without a class token."""
    rows = []
    nan = float("nan")
    for entry in maps.blocks:
        p = entry.num_prompts
        row = {"block": entry.block, "prompts": p, "tokens": entry.tokens, "skipped": entry.probs is None}
        if entry.probs is None:
            rows.append(
                {
                    **row,
                    **dict.fromkeys(("cls_pull", "patch_pull", "uniform", "cls_value_share", "patch_value_share"), nan),
                }
            )
            continue
        probs = entry.probs
        prompt_keys = probs[..., maps.prompt_slice(entry.block)]  # (B, H, T, p)
        mass = prompt_keys.sum(dim=-1)  # (B, H, T): empty slice sums to exactly 0
        cls = _cls_query(maps)
        patches = maps.patch_slice(entry.block)
        row["cls_pull"] = float(mass[:, :, cls].mean()) if cls is not None else float("nan")
        row["patch_pull"] = float(mass[:, :, patches].mean())
        row["uniform"] = p / entry.tokens
        shares = value_share(maps, entry.block)
        row["cls_value_share"] = float(shares[:, 0].mean()) if cls is not None and shares is not None else nan
        row["patch_value_share"] = float(shares[:, patches].mean()) if shares is not None else nan
        rows.append(row)
    return rows


def value_share(maps: AttentionMaps, block: int) -> torch.Tensor | None:
    """(B, T): per query, the share of the value-weighted attention mass that comes from prompt keys,
    `sum_h sum_{j in prompts} A_h,ij ||W_O,h v_j,h|| / sum_h sum_j A_h,ij ||W_O,h v_j,h||` (the norm-based
    contributions of Kobayashi et al. 2020, summed over heads). None without value norms."""
    entry = maps.blocks[block]
    if entry.probs is None or entry.value_norms is None:
        return None
    weighted = entry.probs * entry.value_norms[:, :, None, :]  # (B, H, Tq, Tk)
    total = weighted.sum(dim=(1, 3))
    prompts = weighted[..., maps.prompt_slice(block)].sum(dim=(1, 3))
    return prompts / total.clamp_min(1e-12)


def per_prompt_pull(maps: AttentionMaps, block: int, query: str = "cls") -> torch.Tensor:
    """(p,) attention each prompt slot receives at `block`, averaged over images and heads (and over
    the patch queries for query="patches"). Sums to that block's `cls_pull` / `patch_pull`."""
    entry = maps.blocks[block]
    if entry.probs is None or entry.num_prompts == 0:
        return torch.zeros(0)
    keys = entry.probs[..., maps.prompt_slice(block)]
    if query == "cls":
        if not maps.has_class_token:
            raise AttentionError("this backbone has no class token: use query='patches'")
        return keys[:, :, 0].mean(dim=(0, 1))
    if query == "patches":
        return keys[:, :, maps.patch_slice(block)].mean(dim=(0, 1, 2))
    raise ValueError(f"query must be 'cls' or 'patches', got {query!r}")


# ---------------------------------------------------------------------------------------- maps
def cls_patch_map(maps: AttentionMaps, block: int, head: int | None = None) -> torch.Tensor:
    """(B, rows, cols): the attention the CLS query puts on each patch at `block`, for one head or
    the mean over heads (head=None). Raw probabilities (not renormalised over the patches: the mass
    on CLS and prompts is what is missing from the sum)."""
    entry = maps.blocks[block]
    if entry.probs is None:
        raise ValueError(f"block {block} is skipped: it computes no attention")
    if not maps.has_class_token:
        raise AttentionError("this backbone has no class token: there is no CLS attention map")
    probs = entry.probs if head is None else entry.probs[:, head : head + 1]
    row = probs[:, :, 0, maps.patch_slice(block)].mean(dim=1)
    rows, cols = maps.grid
    if row.shape[-1] != rows * cols:
        raise ValueError(f"{row.shape[-1]} patch tokens do not fill a {rows}x{cols} grid")
    return row.reshape(-1, rows, cols)


def rollout_unavailable_reason(placement: Sequence[int], depth: int | None = None) -> str | None:
    """None when attention rollout is well defined for this placement, else why not (for the UI).

    Rollout multiplies the (identity-mixed) attention of consecutive blocks, so it needs every token
    to be the same token from one block to the next. That holds with no prompts, and with prompts
    written once (shallow, or a single placed block: the prompt tokens join as extra inputs and are
    carried through). With prompts written at several blocks (deep), each placed block throws the
    previous prompt outputs away and writes fresh ones: whatever attention flowed through a prompt
    slot ends in parameters, not in the image, and rollout would silently count it as lost."""
    placement = tuple(placement)
    if len(placement) <= 1:
        return None
    kind = (
        "deep" if depth is not None and placement == tuple(range(depth)) else f"blocks {','.join(map(str, placement))}"
    )
    return (
        f"Attention rollout is not shown for prompts placed at several blocks ({kind}): each placed "
        "block discards the previous prompt tokens and writes fresh ones, so attention that flowed "
        "into a prompt slot has no path back to the image and multiplying attention across blocks "
        "is ill-defined. The per-block maps show where each block itself attends."
    )


def attention_rollout(maps: AttentionMaps, *, residual: float = 0.5) -> torch.Tensor:
    """(B, rows, cols): Abnar & Zuidema's rollout, CLS row over the patch tokens.

    Per block: heads averaged, `A' = residual * I + (1 - residual) * A`, rows renormalised, and the
    product taken from the first block to the last. Prompts written once (shallow) join as extra
    input tokens with identity history. Skipped blocks pass tokens through (identity). Raises
    ValueError where rollout is ill-defined (prompts written at several blocks)."""
    reason = rollout_unavailable_reason(maps.placement, maps.depth)
    if reason:
        raise ValueError(reason)
    if not maps.has_class_token:
        raise AttentionError("this backbone has no class token: there is no CLS rollout")
    batch = maps.batch_size
    rows, cols = maps.grid
    n_inputs = maps.num_prefix_tokens + rows * cols
    rollout = torch.eye(n_inputs).expand(batch, -1, -1).clone()
    prompts_in = 0
    for entry in maps.blocks:
        if entry.num_prompts != prompts_in:  # prompts inserted here: new tokens with their own history
            added = entry.num_prompts - prompts_in
            size = rollout.shape[-1]
            grown = torch.zeros(batch, size + added, size + added)
            pre = maps.num_prefix_tokens + prompts_in
            keep = torch.cat([torch.arange(pre), torch.arange(pre + added, size + added)])
            grown[:, keep[:, None], keep[None, :]] = rollout
            grown[:, pre : pre + added, pre : pre + added] = torch.eye(added)
            rollout, prompts_in = grown, entry.num_prompts
        if entry.probs is None:
            continue
        mixed = entry.probs.mean(dim=1)
        mixed = residual * torch.eye(mixed.shape[-1]) + (1 - residual) * mixed
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed @ rollout
    patches = rollout[:, 0, maps.num_prefix_tokens + prompts_in :]
    return patches.reshape(batch, rows, cols)


# ---------------------------------------------------------------------------------------- over many images
@dataclass
class PullSummary:
    """Prompt pull over a set of images (means over images and heads)."""

    blocks: list[dict[str, Any]]  # as `prompt_pull`, averaged over all images
    per_prompt_cls: list[np.ndarray]  # per block: (p,) CLS attention per prompt slot
    per_prompt_patches: list[np.ndarray]  # per block: (p,) mean patch-query attention per prompt slot
    n_images: int
    # per image, the mean over executed blocks of the CLS pull and its value-weighted share: for intervals
    # over images and paired comparisons (trained vs untrained prompts on the same images)
    per_image: dict[str, np.ndarray] = field(default_factory=dict)

    def mean(self, key: str = "cls_pull") -> float:
        """Mean over the executed blocks (NaN when none)."""
        values = [row[key] for row in self.blocks if not row["skipped"] and row[key] == row[key]]
        return float(np.mean(values)) if values else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "n_images": self.n_images,
            "per_prompt_cls": [a.tolist() for a in self.per_prompt_cls],
            "per_prompt_patches": [a.tolist() for a in self.per_prompt_patches],
        }


_AVERAGED = ("cls_pull", "patch_pull", "cls_value_share", "patch_value_share")


def measure_pull(model: PromptedViT, images_uint8: torch.Tensor, *, batch_size: int = 16) -> PullSummary:
    """Prompt pull over `images_uint8` (N, 3, R, R), streamed: only one batch of maps lives at a time."""
    mean, std = model.backbone.pretrained_cfg["mean"], model.backbone.pretrained_cfg["std"]
    totals: list[dict[str, Any]] | None = None
    per_cls: list[np.ndarray] = []
    per_patch: list[np.ndarray] = []
    per_image: dict[str, list[np.ndarray]] = {}
    n = 0
    for start in range(0, len(images_uint8), batch_size):
        batch = data.normalize(images_uint8[start : start + batch_size], mean, std)
        maps = extract_attention(model, batch)
        weight = len(batch)
        rows = prompt_pull(maps)
        cls = [
            per_prompt_pull(maps, b, "cls").numpy() * weight
            if maps.has_class_token and rows[b]["prompts"]
            else np.zeros(rows[b]["prompts"])
            for b in range(maps.depth)
        ]
        pat = [
            per_prompt_pull(maps, b, "patches").numpy() * weight if rows[b]["prompts"] else np.zeros(rows[b]["prompts"])
            for b in range(maps.depth)
        ]
        for key, values in _per_image(maps).items():
            per_image.setdefault(key, []).append(values)
        if totals is None:
            totals = [{**row, **{key: row[key] * weight for key in _AVERAGED}} for row in rows]
            per_cls, per_patch = cls, pat
        else:
            for total, row in zip(totals, rows):
                for key in _AVERAGED:
                    total[key] += row[key] * weight
            per_cls = [a + b for a, b in zip(per_cls, cls)]
            per_patch = [a + b for a, b in zip(per_patch, pat)]
        n += weight
    if totals is None:
        raise ValueError("no images to measure prompt pull on")
    for total in totals:
        for key in _AVERAGED:
            total[key] /= n
    return PullSummary(
        totals,
        [a / n for a in per_cls],
        [a / n for a in per_patch],
        n,
        {key: np.concatenate(parts) for key, parts in per_image.items()},
    )


def _per_image(maps: AttentionMaps) -> dict[str, np.ndarray]:
    """(B,) per image: CLS pull and CLS value-weighted share, each the mean over executed blocks."""
    if not maps.has_class_token:
        return {}
    pulls, shares = [], []
    for entry in maps.blocks:
        if entry.probs is None:
            continue
        pulls.append(entry.probs[:, :, 0, maps.prompt_slice(entry.block)].sum(dim=-1).mean(dim=1))
        share = value_share(maps, entry.block)
        if share is not None:
            shares.append(share[:, 0])
    out = {}
    if pulls:
        out["cls_pull"] = torch.stack(pulls).mean(dim=0).numpy()
    if shares and len(shares) == len(pulls):
        out["cls_value_share"] = torch.stack(shares).mean(dim=0).numpy()
    return out


# ---------------------------------------------------------------------------------------- runs and images
@dataclass
class TrainedRun:
    run_id: int
    model: PromptedViT
    config: Any  # RunConfig
    class_names: list[str]


def load_trained_model(store, run_id: int) -> TrainedRun:
    """Rebuild a stored run's model: its frozen backbone plus the prompts and head in its artifact.

    KeyError when the run or its artifact does not exist (precomputed reference runs have none)."""
    row = store.get_run(run_id)
    if row is None:
        raise KeyError(f"no run {run_id}")
    state = store.load_artifact(run_id)
    try:
        class_names = [c for c in store.load_artifact_metadata(run_id).get("class_names", "").split(",") if c]
    except Exception:  # noqa: BLE001 - metadata is a convenience
        class_names = []
    config = RunConfig.from_dict(row["config"])
    num_classes = int(state["head.weight"].shape[0]) if "head.weight" in state else len(class_names)
    model = build_model(config, num_classes)
    model.load_trainable_state(state)
    model.eval()
    return TrainedRun(run_id, model, config, class_names or (row.get("metrics") or {}).get("class_names") or [])


@dataclass
class RunImages:
    images: torch.Tensor  # uint8 (N, 3, R, R)
    labels: torch.Tensor
    files: list[str]
    class_names: list[str]


def run_images(config, split: str = "test", limit: int | None = None) -> RunImages:
    """The images of one split of a run's data, exactly as its training split them."""
    image_set, parts = data.load_and_split(config)
    index = getattr(parts, split)
    if limit is not None:
        index = index[:limit]
    return RunImages(
        image_set.images[index],
        image_set.labels[index],
        [image_set.files[int(i)] for i in index],
        list(image_set.class_names),
    )


def image_from_bytes(payload: bytes, resolution: int) -> torch.Tensor:
    """An uploaded image decoded like every data set image: (1, 3, R, R) uint8. DatasetError if unusable."""
    return data.decode_image_bytes(payload, resolution)


def normalize_for(model: PromptedViT, images_uint8: torch.Tensor) -> torch.Tensor:
    return data.normalize(images_uint8, model.backbone.pretrained_cfg["mean"], model.backbone.pretrained_cfg["std"])


def untrained_twin(run: TrainedRun) -> PromptedViT | None:
    """The run's model before training: the same backbone, placement, skips and per-block prompt counts,
    the prompts drawn by the same seeded init as the run's own start (`build_model` with its seed), and the
    run's trained head (so its accuracy says what untrained prompts do to the trained classifier).
    None when the run has no prompts or fine-tuned its backbone (no untrained counterpart to compare)."""
    model = run.model
    if not model.placement or model.tuning != "prompt":
        return None
    twin = build_model(run.config, int(model.head.out_features))
    twin.head.load_state_dict(model.head.state_dict())
    twin.eval()
    return twin


def without_prompts(model: PromptedViT) -> PromptedViT:
    """The same backbone, skips and head with every prompt removed from the sequence."""
    bare = PromptedViT(
        model.backbone,
        int(model.head.out_features),
        num_prompts=0,
        tuning="full" if model.tuning == "full" else "linear",
        skip_blocks=model.skip_blocks,
    )
    bare.head.load_state_dict(model.head.state_dict())
    return bare.eval()


@torch.no_grad()
def _logits(model: PromptedViT, images_uint8: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        chunks = [
            model(normalize_for(model, images_uint8[start : start + batch_size])).float()
            for start in range(0, len(images_uint8), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def masked_prompt_effect(
    model: PromptedViT, images_uint8: torch.Tensor, labels: torch.Tensor, twin: PromptedViT | None = None
) -> dict[str, Any]:
    """What the prompts do to the output, beside where attention goes: accuracy on these images with the
    prompts, with the prompts removed (same head), and with the untrained prompts of `twin`; the share of
    predictions that change when the prompts are removed; the mean L2 change of the logits."""
    with_prompts = _logits(model, images_uint8)
    bare = _logits(without_prompts(model), images_uint8)
    labels = labels.long()

    def accuracy(logits: torch.Tensor) -> float:
        return float((logits.argmax(dim=1) == labels).float().mean())

    return {
        "accuracy_sample": accuracy(with_prompts),
        "accuracy_without_prompts": accuracy(bare),
        "accuracy_untrained_prompts": accuracy(_logits(twin, images_uint8)) if twin is not None else float("nan"),
        "prediction_change": float((with_prompts.argmax(dim=1) != bare.argmax(dim=1)).float().mean()),
        "logit_change": float((with_prompts - bare).norm(dim=1).mean()),
    }


def run_pull(store, run_id: int, *, n_images: int = PULL_SAMPLE_IMAGES, split: str = "test") -> dict[str, Any]:
    """Prompt pull of one stored run on the first `n_images` of its test split (a fixed sample, the same
    for every run on the same data and split seed), with the run's prompt count, for comparisons.

    Beside the trained prompts' figures: the same figures for its untrained twin (`untrained_twin`, keys
    with the suffix `_untrained`, per block in `blocks_untrained`) and for masking the prompts
    (`masked_prompt_effect`). `cls_pull_gain` = trained minus untrained CLS pull: what training did."""
    run = load_trained_model(store, run_id)
    images = run_images(run.config, split, limit=n_images)
    summary = measure_pull(run.model, images.images)
    twin = untrained_twin(run)
    baseline = measure_pull(twin, images.images) if twin is not None else None
    result = {
        "run_id": run_id,
        "num_prompts": run.model.num_prompts,
        "total_prompts": int(sum(run.model.prompt_counts)),
        "placed_blocks": len(run.model.placement),
        "placement": run.config.placement,
        "family": run.config.family(),
        "label": run.config.label(),
        "n_images": summary.n_images,
        "blocks": summary.blocks,
        "blocks_untrained": baseline.blocks if baseline is not None else [],
        "uniform": summary.mean("uniform"),
    }
    nan = float("nan")
    for key in _AVERAGED:
        result[key] = summary.mean(key)
        result[f"{key}_untrained"] = baseline.mean(key) if baseline is not None else nan
    result["cls_pull_gain"] = result["cls_pull"] - result["cls_pull_untrained"]
    result["patch_pull_gain"] = result["patch_pull"] - result["patch_pull_untrained"]
    result.update(masked_prompt_effect(run.model, images.images, images.labels, twin))
    return result


__all__ = [
    "AttentionError",
    "AttentionMaps",
    "BlockAttention",
    "PullSummary",
    "RunImages",
    "TrainedRun",
    "attention_rollout",
    "block_attention_probs",
    "cls_patch_map",
    "extract_attention",
    "image_from_bytes",
    "load_trained_model",
    "masked_prompt_effect",
    "measure_pull",
    "normalize_for",
    "per_prompt_pull",
    "prompt_pull",
    "rollout_unavailable_reason",
    "run_images",
    "run_pull",
    "untrained_twin",
    "value_share",
    "without_prompts",
]
