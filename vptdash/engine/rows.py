"""Run a timm ViT block for only the output rows somebody will read.

In VPT-deep, the prompt tokens a block outputs are thrown away: the next block overwrites the prompt
slots with its own fresh prompts. Prompts still matter as *keys and values* (every other token
attends to them), but their own queries, attention output, projection and MLP are pure waste. Likewise
the last block feeds only the CLS token to the head. With 10 deep prompts at 112 px (75 tokens, 65
kept) that is 18% of a training step's FLOPs (5-9% of its time, measured); with 100 deep prompts (165
tokens) about half of both (docs/performance.md).

`block_rows` computes exactly ``block(x)[:, rows]`` (up to float rounding): layer norm and the
key/value projection over every token, the query and everything after it over the kept rows only.
It reads the block's own submodules and weights (nothing is patched or copied), so fvcore counts
what really runs; with ``fused_attn`` off (the GMAC counter's switch) attention is explicit matmuls.

A block that receives fresh prompts goes further (`prompted_block_rows`): the sequence is never
assembled, the prompts join as keys and values (and as query rows where they are kept). So when the
tokens entering the block need no gradient (the first prompted block, trained from cached tokens),
autograd no longer differentiates through their norm and projections only to throw the result away,
and deep prompts need no row gathers. (Projecting the prompts once per batch instead of per image
saved 2% more and seemed to cost bf16 training accuracy: see the function.)

Only timm's plain `Block` + `Attention` take this path (`supports_row_selection`); any other block
type runs whole, as before. A block on this path is not called as a module, so hooks registered on it
do not fire: code that reads block inputs or outputs through hooks runs inside
`PromptedViT.whole_blocks()` (continual learning does). Hooks are deliberately not a reason to fall
back: fvcore hooks every module while it counts, and it must count the path that really runs.

Under autocast, the path's matmuls take frozen weights already cast to the autocast dtype
(`autocast_weight`): autocast itself casts every weight on every call, because its own cast cache only
keeps tensors that require grad. The cast is the same round-to-nearest autocast does, so results are
bit-identical; a bf16 training step was about 4% faster (dinov2_s14, 112 px, 10 deep prompts, batch 32:
0.339 s instead of 0.353, median of 8 interleaved timings).

Blocks that keep every row (between the first and the last block of shallow prompts) take this path too
(`whole_rows`), for the cached casts; wherever the query rows are every token row, their query and
key/value come from one fused projection (one cast of the normed rows, one larger matmul). Measured once on
a 2-core AMX Xeon, one thread, the other core busy, bf16 steps of 10 prompts interleaved with the previous
code, medians of 12 (no interval): shallow prompts 7.8% faster at batch 8 and 3.1% at batch 32; deep
prompts 1.2% and 2.5%, the deep figures within what such timings vary by.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


def supports_row_selection(block: nn.Module) -> bool:
    """A plain timm block with plain attention: the structure `block_rows` reproduces."""
    return type(block) is Block and type(getattr(block, "attn", None)) is Attention


# frozen weight -> ((its version, autocast dtype), the cast copy); entries go when the weight goes.
_CAST_WEIGHTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def autocast_weight(weight: torch.Tensor | None) -> torch.Tensor | None:
    """`weight` as autocast would cast it for a matmul, cast once while it stays frozen and unchanged.

    Trainable weights go through untouched (autocast caches those itself). An in-place change of a
    frozen weight (``load_state_dict``, ``copy_``) bumps its version and so invalidates the copy."""
    if weight is None or weight.requires_grad or not weight.is_floating_point():
        return weight
    # Under torch.compile the cache below is untraceable (a graph break at every linear), and inductor
    # fuses autocast's casts into its kernels anyway.
    if torch.compiler.is_compiling():
        return weight
    device = weight.device.type
    if not torch.is_autocast_enabled(device) or weight.dtype == torch.get_autocast_dtype(device):
        return weight
    key = (weight._version, torch.get_autocast_dtype(device))
    cached = _CAST_WEIGHTS.get(weight)
    if cached is not None and cached[0] == key:
        return cached[1]
    # Outside inference mode: a copy made during evaluation must still be usable by a training step.
    with torch.inference_mode(False), torch.no_grad():
        cast = weight.to(key[1])
    _CAST_WEIGHTS[weight] = (key, cast)
    return cast


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a plain `nn.Linear`, with its frozen weights cast once under autocast."""
    if type(layer) is not nn.Linear:
        return layer(x)
    return F.linear(x, autocast_weight(layer.weight), autocast_weight(layer.bias))


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm `Mlp.forward` through `_linear`; any other MLP type is called as it is."""
    if type(mlp) is not Mlp:
        return mlp(x)
    return mlp.drop2(_linear(mlp.fc2, mlp.norm(mlp.drop1(mlp.act(_linear(mlp.fc1, x))))))


def _qkv(attn: Attention, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, kv) of the same rows from the fused projection: one matmul and one cast of `normed` where
    two `_project` calls would cast it twice (and two smaller matmuls use the matrix units less well)."""
    width = attn.qkv.out_features // 3
    q, kv = _linear(attn.qkv, normed).split([width, 2 * width], dim=-1)
    return q, kv


def _project(attn: Attention, normed: torch.Tensor, part: str) -> torch.Tensor:
    """The query ("q") or key/value ("kv") part of the fused qkv projection, for these rows only."""
    width = attn.qkv.out_features // 3
    weight, bias = autocast_weight(attn.qkv.weight), autocast_weight(attn.qkv.bias)
    rows = slice(0, width) if part == "q" else slice(width, None)
    return F.linear(normed, weight[rows], bias[rows] if bias is not None else None)


def _attend(attn: Attention, queries: torch.Tensor | None, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """timm `Attention.forward` from projected queries `q` (B, R, C) and keys/values `kv` (B, N, 2C);
    `queries` are the normed rows that `q` came from (only the optional output gate reads them)."""
    batch, rows, _ = q.shape
    length = kv.shape[1]
    gate_layer = getattr(attn, "gate", None)  # older timm releases have no gate / norm / attn_dim
    gate = gate_layer(queries).sigmoid() if gate_layer is not None else None
    q = q.reshape(batch, rows, attn.num_heads, attn.head_dim).transpose(1, 2)
    k, v = kv.reshape(batch, length, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = attn.attn_drop(weights) @ v
    out = out.transpose(1, 2).reshape(batch, rows, attn.num_heads * attn.head_dim)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    return attn.proj_drop(_linear(attn.proj, out))


def _finish(block: Block, residual: torch.Tensor, queries: torch.Tensor | None, q: torch.Tensor, kv: torch.Tensor):
    """Attention output added to the residual rows, then the MLP half of the block."""
    out = residual + block.drop_path1(block.ls1(_attend(block.attn, queries, q, kv)))
    return out + block.drop_path2(block.ls2(_mlp(block.mlp, block.norm2(out))))


def whole_rows(block: Block, x: torch.Tensor) -> torch.Tensor:
    """``block(x)``, every row, on this module's path: the frozen weights cast once under autocast (timm's
    modules leave every cast to autocast, which repeats it on every call) and one fused qkv matmul."""
    normed = block.norm1(x)
    q, kv = _qkv(block.attn, normed)
    return _finish(block, x, normed, q, kv)


def block_rows(block: Block, x: torch.Tensor, keep: list[slice]) -> torch.Tensor:
    """``block(x)`` restricted to the token rows in `keep` (slices of dim 1, concatenated in order)."""
    normed = block.norm1(x)
    if len(keep) == 1:
        queries, residual = normed[:, keep[0]], x[:, keep[0]]
    else:
        # One gather, not a cat of slices: its backward scatters into one zero tensor instead of one per slice.
        index = torch.cat([torch.arange(x.shape[1])[s] for s in keep]).to(x.device)
        queries, residual = normed.index_select(1, index), x.index_select(1, index)
    return _finish(block, residual, queries, _project(block.attn, queries, "q"), _project(block.attn, normed, "kv"))


def prompted_block_rows(
    block: Block, tokens: torch.Tensor, prompts: torch.Tensor, prefix: int, read: str
) -> torch.Tensor:
    """``block(x)`` where x is `tokens` with `prompts` (P, C), the same for every image, inserted after the
    first `prefix` rows, restricted to the rows `read` names (see `prompts.rows_read_after`): "all" (the
    prompt rows stay, as after a shallow write), "no-prompts" (they are dropped) or "cls".

    x is never assembled: the prompts join as keys and values (and as query rows where they are kept).
    So when the tokens need no gradient (the first prompted block, trained from cached tokens), nothing
    is differentiated through their norm and projections (autograd used to compute that gradient and
    throw it away), and no rows are gathered. The prompts' layer norm runs once per batch (fp32).

    Their projections run per image on purpose. Computed once per batch and broadcast (2% fewer FLOPs),
    the projection's gradient is summed over the batch in bf16 under autocast before its matmul; per
    image, each image's gradient is summed in fp32 afterwards, as when the prompts sat in the sequence.
    With the once-per-batch version, bf16 training on ELPV's full split (10 deep prompts, 5 epochs)
    ended 2.3, 0.8 and 6.7 points below fp32 over three seeds; per image, seed 2 reached 86.7 % instead
    of 78.7 %. Such runs are chaotic (rounding-level changes move one seed by up to 2 points in fp32
    too: docs/performance.md), so the cause is not proven, but 8 points is beyond that spread (per
    image, over 18 seeds, no bf16 run ended more than 2.0 points from its fp32 twin) and 2% is not
    worth the risk."""
    batch = tokens.shape[0]

    def with_prompts(per_token: torch.Tensor, per_prompt: torch.Tensor) -> torch.Tensor:
        return torch.cat([per_token[:, :prefix], per_prompt, per_token[:, prefix:]], dim=1)

    attn = block.attn
    normed = block.norm1(tokens)
    normed_prompts = block.norm1(prompts).unsqueeze(0).expand(batch, -1, -1)
    if read == "cls":
        queries, residual = normed[:, :1], tokens[:, :1]
        q, kv_tokens = _project(attn, queries, "q"), _project(attn, normed, "kv")
    else:  # every token row is a query row: their q and kv come from one projection
        q, kv_tokens = _qkv(attn, normed)
        queries, residual = normed, tokens
    if read == "all":
        q_prompts, kv_prompts = _qkv(attn, normed_prompts)
        q = with_prompts(q, q_prompts)
        gated = getattr(attn, "gate", None) is not None  # the only reader of the normed query rows
        queries = with_prompts(normed, normed_prompts) if gated else None
        residual = with_prompts(tokens, prompts.unsqueeze(0).expand(batch, -1, -1))
    else:
        kv_prompts = _project(attn, normed_prompts, "kv")
    return _finish(block, residual, queries, q, with_prompts(kv_tokens, kv_prompts))
