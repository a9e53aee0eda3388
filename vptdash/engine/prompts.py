"""Visual prompt tuning as a wrapper around an untouched, frozen timm VisionTransformer.

Token order inside the wrapper: ``[CLS (+ register tokens), prompts, patches]``.

A *placement* is the set of blocks where fresh prompts are written (methods.md, section 1):
shallow = {0}, deep = every block, or any explicit list. Before the first placed block the prompts
are inserted into the sequence; before every later placed block the prompt slots are overwritten
(VPT-deep semantics: the previous block's prompt outputs are discarded). Blocks before the first
placed block never see prompts, which is what lets training cache their output (see ``encode_frozen``).

The backbone's own modules (patch_embed, _pos_embed, blocks, norm) are called as they are: nothing in
the backbone is patched, so any timm ``VisionTransformer`` works, and its weights stay bit-identical.
Where part of a block's output is never read (prompt slots the next block overwrites, everything but
CLS after the last block), `vptdash.engine.rows` runs that block's own submodules for the read rows only.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Iterable, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from vptdash.engine.rows import block_rows, prompted_block_rows, supports_row_selection, whole_rows

TUNING_MODES = ("prompt", "linear", "full")
PROMPT_TYPES = ("standard", "bilinear", "bilinear-whitened")
# BPT recipes (methods.md, section 3): rank c for one placed block (shallow) and for several (deep).
DEFAULT_RANK_SHALLOW, DEFAULT_RANK_DEEP = 75, 50


class PromptConfigError(ValueError):
    """An impossible prompt budget (bad placement, negative count, ...), with a clear message."""


def parse_placement(placement: str | Sequence[int] | None, depth: int) -> tuple[int, ...]:
    """'shallow' -> (0,), 'deep' -> all blocks, '0,5,11' or [0, 5, 11] -> those blocks (sorted, unique)."""
    if placement is None:
        return ()
    if isinstance(placement, str):
        text = placement.strip().lower()
        if text == "shallow":
            return (0,)
        if text == "deep":
            return tuple(range(depth))
        if text in ("", "none"):
            return ()
        try:
            blocks = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
        except ValueError:
            raise PromptConfigError(
                f"placement {placement!r} is not 'shallow', 'deep' or a comma-separated list of block indices"
            ) from None
    else:
        blocks = [int(b) for b in placement]
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise PromptConfigError(f"placement blocks {bad} are outside 0..{depth - 1} (the backbone has {depth} blocks)")
    return tuple(sorted(set(blocks)))


def placement_label(blocks: Sequence[int], depth: int) -> str:
    """The inverse of parse_placement, for display and for storing configurations."""
    blocks = tuple(blocks)
    if blocks == (0,):
        return "shallow"
    if blocks == tuple(range(depth)) and depth > 1:
        return "deep"
    return ",".join(str(b) for b in blocks) if blocks else "none"


def prompt_init_bound(patch_size: int, embed_dim: int) -> float:
    """VPT's xavier-style bound: uniform(-v, v) with v = sqrt(6 / (3 * patch^2 + d))."""
    return math.sqrt(6.0 / (3 * patch_size * patch_size + embed_dim))


class StandardPrompts(nn.Module):
    """One learnable (count, d) tensor per placed block. Counts may differ per block (condensation)."""

    def __init__(self, counts: Sequence[int], embed_dim: int, init_bound: float):
        super().__init__()
        self.counts = tuple(int(c) for c in counts)
        self.tensors = nn.ParameterList(
            nn.Parameter(torch.empty(c, embed_dim).uniform_(-init_bound, init_bound)) for c in self.counts
        )

    def forward(self) -> list[torch.Tensor]:
        return list(self.tensors)


def default_prompt_rank(num_prompts: int, placed_blocks: int) -> int:
    """The BPT recipe's rank c (shallow 75, deep 50), scaled down for small prompt counts: c <= m."""
    rank = DEFAULT_RANK_SHALLOW if placed_blocks <= 1 else DEFAULT_RANK_DEEP
    return max(1, min(rank, int(num_prompts)))


class BilinearPrompts(nn.Module):
    """Bilinear prompts (BPT, methods.md section 3): per placed block ``P = Z W`` with a learnable
    ``Z`` (count x rank) and ``W`` (rank x d, no bias).

    Every placed block has its own Z *and* its own W (the BPT reference implementation's deep
    variant uses one 1x1 projection per layer), so a shallow run trains ``m*c + c*d`` prompt
    parameters and a deep one ``depth * (m*c + c*d)``. Z starts at N(0, 0.02^2); W is xavier-uniform
    unless ``init_W`` (one (rank, d) tensor per placed block, e.g. rows of a whitening matrix) is given.
    """

    def __init__(self, counts: Sequence[int], embed_dim: int, rank: int, init_W=None, z_std: float = 0.02):
        super().__init__()
        self.counts = tuple(int(c) for c in counts)
        self.rank = int(rank)
        if self.counts and not 1 <= self.rank <= embed_dim:
            raise PromptConfigError(f"bilinear prompt rank must be between 1 and the width {embed_dim}, got {rank}")
        if init_W is not None and len(init_W) != len(self.counts):
            raise PromptConfigError(f"{len(init_W)} initial W matrices given for {len(self.counts)} placed blocks")
        self.z = nn.ParameterList(nn.Parameter(torch.randn(c, self.rank) * z_std) for c in self.counts)
        weights = []
        for slot in range(len(self.counts)):
            if init_W is None:
                weight = nn.init.xavier_uniform_(torch.empty(self.rank, embed_dim))
            else:
                weight = torch.as_tensor(init_W[slot], dtype=torch.float32).detach().clone()
                if weight.shape != (self.rank, embed_dim):
                    raise PromptConfigError(
                        f"initial W has shape {tuple(weight.shape)}, expected ({self.rank}, {embed_dim})"
                    )
            weights.append(nn.Parameter(weight))
        self.w = nn.ParameterList(weights)

    def forward(self) -> list[torch.Tensor]:
        return [z @ w for z, w in zip(self.z, self.w)]


def patch_size_of(backbone: VisionTransformer) -> int:
    size = backbone.patch_embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def rows_read_after(index: int, end: int, pooled: bool, placed, skipped, has_class_token: bool) -> str:
    """Which output rows of block `index` anything reads, when blocks [index+1, end) run next:
    "all"; "no-prompts" (the next event is a prompt write, which discards the prompt slots, or the
    patch-mean pool); "cls" (pooled=True and nothing but the head reads on)."""
    for later in range(index + 1, end):
        if later in placed:
            return "no-prompts"
        if later not in skipped:
            return "all"
    if not pooled:
        return "all"  # the caller receives every token
    return "cls" if has_class_token else "no-prompts"


def drops_rows(read: str, prompts_in_x: int) -> bool:
    """Whether a block whose readers are `read` (see rows_read_after) can leave some output rows out."""
    return read == "cls" or (read == "no-prompts" and prompts_in_x > 0)


def tokens_and_rows(
    depth: int,
    counts_by_block: dict[int, int],
    skipped,
    base_tokens: int,
    has_class_token: bool,
    row_selection: bool = True,
) -> tuple[list[int], list[int]]:
    """Per block of a forward pass: the sequence length entering it and the output rows it computes
    (both 0 for a skipped block). `base_tokens` = prefix + patch tokens. The one place that knows how
    prompt writes and row selection shape the sequence: costs, estimates and the model all use it."""
    tokens, prompts_in_x, lengths, rows = base_tokens, 0, [], []
    for index in range(depth):
        if index in counts_by_block:
            tokens += counts_by_block[index] - prompts_in_x
            prompts_in_x = counts_by_block[index]
        if index in skipped:
            lengths.append(0)
            rows.append(0)
            continue
        lengths.append(tokens)
        read = rows_read_after(index, depth, True, counts_by_block, skipped, has_class_token)
        if not row_selection or not drops_rows(read, prompts_in_x):
            rows.append(tokens)
        else:
            rows.append(1 if read == "cls" else tokens - prompts_in_x)
    return lengths, rows


class PromptedViT(nn.Module):
    """A frozen ViT + prompts + a linear head on the CLS output.

    tuning:
      - "prompt": prompts and head train (VPT);
      - "linear": head only, no prompts (the linear-probe baseline: the same graph as 0 prompts);
      - "full":   every backbone weight trains too (full fine-tuning baseline).
    skip_blocks: blocks that are never executed (identity: the residual stream passes through).
    prompt_type: "standard" (one free (count, d) tensor per placed block), "bilinear" (P = Z W of rank
      ``prompt_rank``, default `default_prompt_rank`) or "bilinear-whitened" (W initialised from
      ``prompt_rank`` seeded random columns of a whitening matrix: ``prompt_whitening`` is one (d, d)
      matrix, or one per placed block; see `vptdash.engine.whitening`).
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        num_classes: int,
        *,
        num_prompts: int | Sequence[int] = 0,
        placement: str | Sequence[int] | None = "shallow",
        prompt_dropout: float = 0.0,
        tuning: str = "prompt",
        skip_blocks: Iterable[int] = (),
        seed: int | None = None,
        prompt_type: str = "standard",
        prompt_rank: int | None = None,
        prompt_whitening=None,
    ):
        super().__init__()
        if tuning not in TUNING_MODES:
            raise PromptConfigError(f"tuning must be one of {TUNING_MODES}, got {tuning!r}")
        if prompt_type not in PROMPT_TYPES:
            raise PromptConfigError(f"prompt type must be one of {PROMPT_TYPES}, got {prompt_type!r}")
        if num_classes < 2:
            raise PromptConfigError(f"need at least 2 classes, got {num_classes}")
        if not 0.0 <= prompt_dropout < 1.0:
            raise PromptConfigError(f"prompt dropout must be in [0, 1), got {prompt_dropout}")
        self.backbone = backbone
        self.tuning = tuning
        self.depth = len(backbone.blocks)
        self.embed_dim = int(backbone.embed_dim)
        self.num_prefix_tokens = int(backbone.num_prefix_tokens)
        self.has_class_token = backbone.cls_token is not None
        self.skip_blocks = frozenset(self._check_blocks(skip_blocks, "skip"))

        counts = self._prompt_counts(num_prompts, placement)
        self.placement = parse_placement(placement, self.depth) if any(counts) else ()
        if not self.placement:
            counts = ()
        self.block_to_slot = {block: slot for slot, block in enumerate(self.placement)}

        generator_state = torch.random.fork_rng() if seed is not None else nullcontext()
        with generator_state:
            if seed is not None:
                torch.manual_seed(seed)
            self.prompt_type = prompt_type
            self.prompts = self._make_prompts(counts, prompt_type, prompt_rank, prompt_whitening)
            self.head = nn.Linear(self.embed_dim, num_classes)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.prompt_dropout = nn.Dropout(prompt_dropout)
        # Compute only the block output rows that are read later (`vptdash.engine.rows`); False runs every
        # block whole, as the official VPT code does (the benchmark's naive reference, tests).
        self.row_selection = True

        for param in self.backbone.parameters():
            param.requires_grad_(tuning == "full")
        self.backbone.eval()

    # ----------------------------------------------------------------- configuration helpers
    def _make_prompts(self, counts, prompt_type: str, rank: int | None, whitening) -> nn.Module:
        """The prompt module (called inside the seeded RNG fork: its init is reproducible)."""
        if prompt_type == "standard":
            return StandardPrompts(
                counts, self.embed_dim, prompt_init_bound(patch_size_of(self.backbone), self.embed_dim)
            )
        rank = default_prompt_rank(max(counts, default=1), len(counts)) if rank is None else int(rank)
        init_W = None
        if prompt_type == "bilinear-whitened" and counts:
            if whitening is None:
                raise PromptConfigError("bilinear-whitened prompts need a whitening matrix (vptdash.engine.whitening)")
            matrices = [whitening] * len(counts) if torch.is_tensor(whitening) else list(whitening)
            if len(matrices) != len(counts) or any(tuple(m.shape) != (self.embed_dim,) * 2 for m in matrices):
                raise PromptConfigError(
                    f"need one ({self.embed_dim}, {self.embed_dim}) whitening matrix, or one per placed block"
                )
            if not 1 <= rank <= self.embed_dim:
                raise PromptConfigError(
                    f"bilinear prompt rank must be between 1 and the width {self.embed_dim}, got {rank}"
                )
            # c random columns of each block's whitening matrix (its own draw per block), as rows of W.
            init_W = [m[:, torch.randperm(self.embed_dim)[:rank]].T for m in matrices]
        return BilinearPrompts(counts, self.embed_dim, rank, init_W=init_W)

    def _check_blocks(self, blocks: Iterable[int], what: str) -> list[int]:
        blocks = [int(b) for b in blocks]
        bad = [b for b in blocks if not 0 <= b < self.depth]
        if bad:
            raise PromptConfigError(f"{what} blocks {bad} are outside 0..{self.depth - 1}")
        return blocks

    def _prompt_counts(self, num_prompts: int | Sequence[int], placement) -> tuple[int, ...]:
        if self.tuning == "linear":
            return ()
        blocks = parse_placement(placement, self.depth)
        if isinstance(num_prompts, int):
            if num_prompts < 0:
                raise PromptConfigError(f"prompt count must be >= 0, got {num_prompts}")
            return tuple(num_prompts for _ in blocks) if num_prompts else ()
        counts = tuple(int(c) for c in num_prompts)
        if len(counts) != len(blocks):
            raise PromptConfigError(f"{len(counts)} prompt counts given for {len(blocks)} placed blocks")
        if any(c < 0 for c in counts):
            raise PromptConfigError(f"prompt counts must be >= 0, got {counts}")
        return counts

    @property
    def prompt_counts(self) -> tuple[int, ...]:
        return self.prompts.counts

    @property
    def num_prompts(self) -> int:
        """Prompts per placed block (the budget's 'count'); the max if condensation made them differ."""
        return max(self.prompt_counts, default=0)

    @property
    def first_prompt_block(self) -> int:
        """Blocks before this index never see a prompt: their output can be cached per image."""
        if self.tuning == "full":
            return 0
        return self.placement[0] if self.placement else self.depth

    def train(self, mode: bool = True):
        # The backbone stays in eval mode unless it is being fine-tuned: frozen means frozen
        # (no dropout / drop-path noise, no state changes).
        super().train(mode)
        if self.tuning != "full":
            self.backbone.eval()
        return self

    # ----------------------------------------------------------------- forward pieces
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> the token sequence entering block 0 (no prompts yet)."""
        bb = self.backbone
        x = bb.patch_embed(images)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        return bb.norm_pre(x)

    def _fresh_prompts(self, block: int, prompt_list, dtype: torch.dtype) -> torch.Tensor:
        """This block's prompts (count, d), as inserted: after prompt dropout, in the tokens' dtype."""
        return self.prompt_dropout(prompt_list[self.block_to_slot[block]]).to(dtype)

    def _without_prompts(self, x: torch.Tensor, prompts_in_x: int) -> torch.Tensor:
        if not prompts_in_x:
            return x
        return torch.cat([x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens + prompts_in_x :]], dim=1)

    def write_prompts(self, x: torch.Tensor, block: int, prompts_in_x: int, prompt_list) -> tuple[torch.Tensor, int]:
        """Drop the current prompt slots (if any) and insert this block's fresh prompts."""
        fresh = self._fresh_prompts(block, prompt_list, x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        tokens = self._without_prompts(x, prompts_in_x)
        prefix = self.num_prefix_tokens
        return torch.cat([tokens[:, :prefix], fresh, tokens[:, prefix:]], dim=1), fresh.shape[1]

    def run_blocks(
        self, x: torch.Tensor, start: int = 0, end: int | None = None, prompts_in_x: int = 0, *, pooled: bool = False
    ):
        """Run blocks [start, end) with prompt writes and skips; returns (tokens, prompts in them).

        Every block computes only the output rows read later (`rows_read_after`): prompt slots that a
        later write in [start, end) overwrites are left out. pooled=True (the caller passes the result
        straight to `pool`; needs end = depth) also leaves out what `pool` does not read, so the returned
        tokens may hold just the CLS token. Without it, the tokens leaving block end - 1 are complete."""
        end = self.depth if end is None else end
        if pooled and end != self.depth:
            raise ValueError("pooled=True needs the blocks to run to the end")
        prompt_list = self.prompts() if self.placement else []
        for index in range(start, end):
            runs = index not in self.skip_blocks
            # a block that receives prompts inserts them itself on the row-selected path
            inserts_prompts = index in self.block_to_slot and runs and self._selects_rows(index)
            if index in self.block_to_slot and not inserts_prompts:
                x, prompts_in_x = self.write_prompts(x, index, prompts_in_x, prompt_list)
            if not runs:
                continue
            read = rows_read_after(index, end, pooled, self.block_to_slot, self.skip_blocks, self.has_class_token)
            if inserts_prompts:
                x, prompts_in_x = self._run_prompted_block(index, x, prompts_in_x, read, prompt_list)
            else:
                x, prompts_in_x = self._run_block(index, x, prompts_in_x, read)
        return x, prompts_in_x

    @contextmanager
    def whole_blocks(self):
        """Every block computes every row inside this block (as the official VPT code does), and every
        block is called as a module, so hooks on blocks fire; the previous setting comes back after."""
        previous, self.row_selection = self.row_selection, False
        try:
            yield self
        finally:
            self.row_selection = previous

    def _selects_rows(self, index: int) -> bool:
        return self.row_selection and supports_row_selection(self.backbone.blocks[index])

    def _run_prompted_block(
        self, index: int, x: torch.Tensor, prompts_in_x: int, rows: str, prompt_list
    ) -> tuple[torch.Tensor, int]:
        """A block that receives fresh prompts, on the row-selected path (`rows.prompted_block_rows`):
        the prompts are never written into the sequence, the block inserts their keys and values."""
        fresh = self._fresh_prompts(index, prompt_list, x.dtype)
        tokens = self._without_prompts(x, prompts_in_x)
        out = prompted_block_rows(self.backbone.blocks[index], tokens, fresh, self.num_prefix_tokens, rows)
        return out, fresh.shape[0] if rows == "all" else 0

    def _run_block(self, index: int, x: torch.Tensor, prompts_in_x: int, rows: str) -> tuple[torch.Tensor, int]:
        block = self.backbone.blocks[index]
        if not self._selects_rows(index):
            return block(x), prompts_in_x
        if not drops_rows(rows, prompts_in_x):
            return whole_rows(block, x), prompts_in_x
        if rows == "cls":
            return block_rows(block, x, [slice(0, 1)]), 0
        prefix = self.num_prefix_tokens
        return block_rows(block, x, [slice(0, prefix), slice(prefix + prompts_in_x, None)]), 0

    def pool(self, tokens: torch.Tensor, prompts_in_x: int) -> torch.Tensor:
        """Final norm, then the CLS token (or the mean of the patch tokens for class-token-free ViTs)."""
        tokens = self.backbone.norm(tokens)
        if self.has_class_token:
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens + prompts_in_x :].mean(dim=1)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        tokens, prompts_in_x = self.run_blocks(self.embed(images), pooled=True)
        return self.pool(tokens, prompts_in_x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.forward_features(images))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """The head, always in fp32 (outside any autocast): the layer that meets the loss. Measured on
        ELPV's full training split, 10 deep prompts, 3 seeds: with a bf16 head, bf16 training lost 0.66
        points against fp32; with this fp32 head 0.15 (docs/performance.md). It costs d x classes MACs."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.head(features.float())

    # ----------------------------------------------------------------- cached training path
    @torch.no_grad()  # not inference_mode: the cached tensors later feed autograd graphs
    def encode_frozen(self, images: torch.Tensor) -> torch.Tensor:
        """What the frozen part computes for these images: the tokens entering the first prompted
        block, or (linear probe: no prompts at all) the pooled feature. Deterministic per image, so
        training computes it once and reuses it every epoch."""
        if self.tuning == "full":
            raise PromptConfigError("full fine-tuning has no frozen prefix to cache")
        if self.first_prompt_block == self.depth:
            return self.pool(*self.run_blocks(self.embed(images), pooled=True))
        tokens, _ = self.run_blocks(self.embed(images), 0, self.first_prompt_block)
        return tokens

    def forward_from_frozen(self, encoded: torch.Tensor) -> torch.Tensor:
        """Logits from ``encode_frozen``'s output: only the trainable part runs (with autograd)."""
        if self.first_prompt_block == self.depth:
            return self.classify(encoded)
        tokens, prompts_in_x = self.run_blocks(encoded, self.first_prompt_block, pooled=True)
        return self.classify(self.pool(tokens, prompts_in_x))

    # ----------------------------------------------------------------- bookkeeping
    def _tokens_and_rows(self, num_patches: int | None) -> tuple[list[int], list[int]]:
        if num_patches is None:
            num_patches = int(self.backbone.patch_embed.num_patches)
        counts = {block: self.prompt_counts[slot] for block, slot in self.block_to_slot.items()}
        selectable = self.row_selection and all(supports_row_selection(b) for b in self.backbone.blocks)
        return tokens_and_rows(
            self.depth, counts, self.skip_blocks, self.num_prefix_tokens + num_patches, self.has_class_token, selectable
        )

    def tokens_per_block(self, num_patches: int | None = None) -> list[int]:
        """Sequence length entering each block (0 for skipped blocks, which never run)."""
        return self._tokens_and_rows(num_patches)[0]

    def rows_per_block(self, num_patches: int | None = None) -> list[int]:
        """Output rows each block computes in a forward pass (its queries; 0 for skipped blocks).

        Equal to `tokens_per_block` for a block run whole; smaller where `run_blocks(pooled=True)` drops
        rows nobody reads: the prompt slots before a prompt write, everything but CLS in the last block."""
        return self._tokens_and_rows(num_patches)[1]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a run stores: prompts and head (and the whole backbone when fully fine-tuned)."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        missing = [name for name in state if name not in params]
        if missing:
            raise PromptConfigError(f"stored state has parameters this model lacks: {missing[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                if params[name].shape != value.shape:
                    raise PromptConfigError(
                        f"{name}: stored shape {tuple(value.shape)} != model {tuple(params[name].shape)}"
                    )
                params[name].copy_(value)
