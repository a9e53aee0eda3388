"""Burstiness and whitening for bilinear prompts (BPT, Wang et al. ICCV 2025; methods.md section 3).

The quantity: for a block with query/key weights (row-vector convention, ``q = x W_q``) and the patch
tokens ``X`` (n x d) entering it,

    qkx = W_q W_k^T X^T            (d x n per image)

is what a prompt's query meets in the attention logits (``logit(p, x_j) = p . qkx[:, j]``); its gradient
with respect to the prompt is made of these columns. A few entries are huge ("burstiness": X roughly
Laplacian, ``W_q W_k^T`` hyper-Laplacian), which makes prompt learning slow and unstable.

Whitening: ``Sigma = mean over images of qkx qkx^T / n`` (the uncentred second moment of the columns
of qkx over every patch of every training image), eigendecomposition ``Sigma = U S U^T`` (symmetric
PSD, so this is its SVD with V = U), and

    W = U S^(-1/2) U^T,            so that  W Sigma W^T = I.

One deliberate difference from a literal reading of methods.md ("qkx averaged over images"): the
average is taken over the per-image second moments, not over qkx itself. Averaging qkx first leaves
a d x n matrix of rank <= n, and at 112 px there are n = 64 patches for d = 384 dimensions, so
Sigma would be singular and S^(-1/2) undefined. Eigenvalues below ``eps * max(S)`` are clamped
(eps = 1e-6), which only matters for degenerate data.

X is the patch tokens as the block's attention sees them: the tokens entering the block (patch +
position embedding for block 0; prefix tokens removed; computed by the frozen backbone without prompts,
skipped blocks skipped) after the block's own pre-attention LayerNorm ``norm1``, since in a pre-norm ViT
W_q and W_k multiply ``norm1(x)``, prompts included. (On ELPV at 112 px, without norm1 the block-0
statistics are dominated by the position embedding and a few directions: 10 eigenvalues hold all but
2e-4 of Sigma, and whitening raised the kurtosis instead of lowering it; measured, see docs/results.md.)
The bilinear-whitened prompt module takes ``c`` seeded random columns of W as the rows of its
``W`` (c x d); for several placed blocks each block gets its own whitening matrix, from that block's
q/k weights and input tokens (the BPT reference implementation's deep variant does the same).

Burstiness picture: the entries of qkx before whitening and of ``W qkx`` after, each divided by its
own standard deviation, as a histogram with a log count axis, and their kurtosis (3 for a Gaussian).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from vptdash.engine import backbones, data

WHITENING_EPS = 1e-6
MAX_IMAGES = 256  # training images used for the statistics (a seeded subset beyond that)
ENCODE_BATCH = 64


# ---------------------------------------------------------------------------------------- the math
def qk_product(block) -> torch.Tensor:
    """``W_q W_k^T`` (d x d) of a timm attention block, without biases.

    timm stores q, k, v stacked in one Linear (``qkv.weight``: 3d x d, ``q = x A^T``), so in the
    row-vector convention ``W_q = A_q^T`` and ``W_q W_k^T = A_q^T A_k``."""
    weight = block.attn.qkv.weight.detach().float()
    d = weight.shape[1]
    return weight[:d].T @ weight[d : 2 * d]


@torch.no_grad()
def qkx_of(block, tokens: torch.Tensor) -> torch.Tensor:
    """``W_q W_k^T X^T`` per image: tokens (N, n, d) entering the block -> (N, d, n), float32, with
    X = the block's pre-attention LayerNorm of the tokens (what W_q and W_k multiply in a pre-norm ViT)."""
    x = block.norm1(tokens.float()).float()
    return torch.matmul(qk_product(block), x.transpose(1, 2))


def second_moment(qkx: torch.Tensor) -> torch.Tensor:
    """Sigma (d x d, float64): mean over images of ``qkx qkx^T / n``."""
    columns = qkx.double().transpose(1, 2).reshape(-1, qkx.shape[1])  # every patch of every image
    return columns.T @ columns / max(1, columns.shape[0])


def whitening_matrix(qkx: torch.Tensor, eps: float = WHITENING_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, Sigma): ``W = U S^(-1/2) U^T`` with ``W Sigma W^T = I`` (float64 both)."""
    sigma = second_moment(qkx)
    values, vectors = torch.linalg.eigh((sigma + sigma.T) / 2)
    floor = eps * float(values.max().clamp_min(1e-300))
    inv_sqrt = values.clamp_min(floor).rsqrt()
    return (vectors * inv_sqrt) @ vectors.T, sigma


def kurtosis(values: torch.Tensor | np.ndarray) -> float:
    """Pearson kurtosis E[(x - mu)^4] / var^2 (3 for a Gaussian, 6 for a Laplacian)."""
    x = torch.as_tensor(values).double().flatten()
    centred = x - x.mean()
    var = centred.pow(2).mean()
    return float(centred.pow(4).mean() / var.pow(2)) if var > 0 else float("nan")


# ---------------------------------------------------------------------------------------- tokens
@torch.no_grad()
def block_inputs(
    backbone,
    images: torch.Tensor,
    blocks: Sequence[int],
    skip_blocks: Sequence[int] = (),
    batch_size: int = ENCODE_BATCH,
) -> dict[int, torch.Tensor]:
    """Patch tokens (prefix tokens removed) entering each of `blocks`, from the frozen backbone
    without prompts, float32. `images` are normalised (N, 3, R, R)."""
    wanted = sorted(set(int(b) for b in blocks))
    skipped = set(int(b) for b in skip_blocks)
    prefix = int(backbone.num_prefix_tokens)
    out: dict[int, list[torch.Tensor]] = {b: [] for b in wanted}
    for start in range(0, len(images), batch_size):
        x = backbone.patch_embed(images[start : start + batch_size].float())
        x = backbone.norm_pre(backbone.patch_drop(backbone._pos_embed(x)))
        for index in range(wanted[-1] + 1 if wanted else 0):
            if index in out:
                out[index].append(x[:, prefix:].float())
            if index not in skipped:
                x = backbone.blocks[index](x)
    return {b: torch.cat(parts) for b, parts in out.items()}


def whitening_matrices(
    backbone, images: torch.Tensor, blocks: Sequence[int], skip_blocks: Sequence[int] = ()
) -> list[torch.Tensor]:
    """One (d x d) float32 whitening matrix per block in `blocks` (in that order)."""
    tokens = block_inputs(backbone, images, blocks, skip_blocks)
    return [whitening_matrix(qkx_of(backbone.blocks[b], tokens[b]))[0].float() for b in blocks]


# ---------------------------------------------------------------------------------------- data
def train_images(config, backbone, max_images: int = MAX_IMAGES) -> torch.Tensor:
    """The run's TRAIN split images (same data, shots, split and shot seed as `run_training`),
    normalised with the backbone's statistics; a fixed-seed subset of `max_images` beyond that."""
    image_set, split = data.load_and_split(config)
    index = split.train
    if len(index) > max_images:
        keep = torch.randperm(len(index), generator=torch.Generator().manual_seed(0))[:max_images]
        index = index[keep.sort().values]
    cfg = backbone.pretrained_cfg
    return data.normalize(image_set.images[index], cfg["mean"], cfg["std"])


_CACHE: dict[tuple, list[torch.Tensor]] = {}
_CACHE_SIZE = 4


def whitening_for_config(config, backbone, blocks: Sequence[int]) -> list[torch.Tensor]:
    """Whitening matrices of the placed `blocks` from the run's training images (remembered per
    backbone object, data, split and blocks in this process: sweeps over seeds of one budget reuse
    them only when the shot draw is the same)."""
    key = (
        id(backbone),
        config.backbone,
        config.weights,
        config.dataset,
        config.cell_type,
        config.resolution,
        config.shots,
        config.test_fraction,
        config.val_fraction,
        config.split_seed,
        config.seed,
        tuple(blocks),
        tuple(sorted(config.skip_blocks)),
    )
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = whitening_matrices(backbone, train_images(config, backbone), blocks, config.skip_blocks)
    return _CACHE[key]


def clear_whitening_cache() -> None:
    """Forget the whitening matrices remembered in this process (e.g. after data changed on disk)."""
    _CACHE.clear()


# ---------------------------------------------------------------------------------------- burstiness
@dataclass
class Burstiness:
    """Histogram data of qkx entries before / after whitening, in units of their own std."""

    block: int
    n_images: int
    n_entries: int
    edges: list[float]
    before: list[int]
    after: list[int]
    gaussian: list[float]  # expected counts of a standard normal with the same number of entries
    kurtosis_before: float
    kurtosis_after: float
    max_before: float  # largest |entry| / std
    max_after: float
    effective_rank: int  # eigenvalues of Sigma above the clamp eps * max (grey images: fewer than d)
    dim: int
    identity_error: float  # max |W Sigma W^T - I| on the span of those eigenvectors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def burstiness(
    backbone, images: torch.Tensor, block: int = 0, skip_blocks: Sequence[int] = (), bins: int = 81
) -> Burstiness:
    """The burstiness picture for one block on these (normalised) images."""
    tokens = block_inputs(backbone, images, [block], skip_blocks)[block]
    qkx = qkx_of(backbone.blocks[block], tokens).double()
    white, sigma = whitening_matrix(qkx)
    after = torch.matmul(white, qkx)
    values, vectors = torch.linalg.eigh((sigma + sigma.T) / 2)
    kept = vectors[:, values > WHITENING_EPS * float(values.max())]
    product = kept.T @ white @ sigma @ white.T @ kept
    identity_error = (
        float((product - torch.eye(kept.shape[1], dtype=product.dtype)).abs().max()) if kept.numel() else 0.0
    )

    def standardised(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten()
        return (x - x.mean()) / x.std().clamp_min(1e-300)

    zb, za = standardised(qkx), standardised(after)
    reach = float(max(zb.abs().max(), za.abs().max(), 4.0))
    edges = torch.linspace(-reach, reach, bins + 1, dtype=torch.float64)
    before_counts = torch.histogram(zb, bins=edges).hist
    after_counts = torch.histogram(za, bins=edges).hist
    cdf = 0.5 * (1 + torch.erf(edges / math.sqrt(2)))
    gaussian = (cdf[1:] - cdf[:-1]) * zb.numel()
    return Burstiness(
        block=int(block),
        n_images=int(len(images)),
        n_entries=int(zb.numel()),
        edges=edges.tolist(),
        before=[int(v) for v in before_counts.tolist()],
        after=[int(v) for v in after_counts.tolist()],
        gaussian=gaussian.tolist(),
        kurtosis_before=kurtosis(qkx),
        kurtosis_after=kurtosis(after),
        max_before=float(zb.abs().max()),
        max_after=float(za.abs().max()),
        effective_rank=int(kept.shape[1]),
        dim=int(len(sigma)),
        identity_error=identity_error,
    )


def burstiness_for_config(config, block: int = 0, max_images: int = MAX_IMAGES) -> Burstiness:
    """The picture on a run configuration's training images (the user's data, shots and split)."""
    backbone = backbones.load_backbone(config.backbone, config.weights, config.resolution)
    return burstiness(backbone, train_images(config, backbone, max_images), block, config.skip_blocks)
