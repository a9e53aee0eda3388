"""Which precision trains fastest on this machine, measured, never assumed.

bf16 is not always faster on a CPU. Measured on three 2-core machines of this project: a Xeon with AMX
ran bf16 matmuls 6.5x faster than fp32, a Xeon with avx512_bf16 but no AMX ran them at half the fp32
speed, an AMD EPYC 2.7x faster. So `precision="auto"` times fp32 and bf16 matrix products at the
shapes of the run (the linear layers of a ViT block for its batch and tokens), once per machine and
shape, keeps the answer in the cache dir, and trains in whichever is faster. A forced "fp32" or
"bf16" is used as given. `VPTDASH_PRECISION=fp32` (or bf16) makes "auto" mean that precision on this
machine without measuring: for a machine whose owner knows better than a short matmul timing (a laptop
that throttles), and for timing one machine as another (an AMX Xeon forced to fp32 stands in for a CPU
without fast bf16).

The cache key names the CPU model, its relevant flags, the thread count, the OpenMP wait setting and the
torch version, so a changed machine (or a laptop on battery with fewer threads) measures again.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from vptdash.engine import openmp
from vptdash.engine.paths import cache_dir

PRECISIONS = ("fp32", "bf16")
CHOICES = ("auto", *PRECISIONS)
# bf16 must beat fp32 by this factor to be chosen: within measurement noise fp32 wins (exact numerics).
BF16_MARGIN = 1.10
FORCE_ENV = "VPTDASH_PRECISION"
FLAGS_OF_INTEREST = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "fma")
Shapes = Sequence[tuple[int, int, int]]


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and why: measured throughputs (GFLOP/s) when it was measured."""

    precision: str
    reason: str
    gflops_fp32: float | None = None
    gflops_bf16: float | None = None
    cached: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_description() -> dict:
    """CPU model, the flags that decide bf16 speed, threads, OpenMP wait setting and torch version: the
    cache key's parts."""
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if model is None and line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif not flags and line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            if model is not None and flags:
                break
    except OSError:  # not Linux: the model name from platform is all we have
        pass
    model = model or platform.processor() or "cpu"
    return {
        "cpu": model,
        "flags": sorted(f for f in FLAGS_OF_INTEREST if f in flags),
        "threads": torch.get_num_threads(),
        "openmp_wait": openmp.in_force(),
        "torch": torch.__version__,
    }


def block_shapes(tokens: int, dim: int, mlp_dim: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the matrix products of one ViT block for `tokens` rows: qkv, projection, MLP in and
    out. These carry nearly all of a block's multiply-adds."""
    return [(tokens, dim, 3 * dim), (tokens, dim, dim), (tokens, dim, mlp_dim), (tokens, mlp_dim, dim)]


def matmul_gflops(dtype: torch.dtype, shapes: Shapes, *, seconds: float = 0.3) -> float:
    """Sustained GFLOP/s of this set of products in `dtype` (best of repeated rounds of the whole set)."""
    pairs = [(torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    for a, b in pairs:  # warm up kernels and allocator
        torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for a, b in pairs:
            torch.mm(a, b)
        best = max(best, flops / (time.perf_counter() - start) / 1e9)
        if time.perf_counter() > deadline:
            return best


def _cache_file() -> Path:
    return cache_dir() / "precision.json"


def _read_cache(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_cache(path: Path, entries: dict) -> None:
    """Atomic: a reader sees the old file or the new one. A failed write only costs a re-measurement."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".precision-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(entries, handle, indent=1, sort_keys=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass


def machine_override() -> str | None:
    """The precision `VPTDASH_PRECISION` sets for "auto" on this machine, or None (unset, empty or auto)."""
    value = os.environ.get(FORCE_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in PRECISIONS:
        raise ValueError(f"{FORCE_ENV} must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


def cache_key(shapes: Shapes, machine: dict | None = None) -> str:
    return json.dumps({"machine": machine or cpu_description(), "shapes": [list(s) for s in shapes]}, sort_keys=True)


def choose_precision(
    requested: str,
    shapes: Shapes,
    *,
    measure: Callable[[torch.dtype, Shapes], float] | None = None,
    cache_path: Path | None = None,
) -> PrecisionChoice:
    """The precision to train in: `requested` itself unless it is "auto"; for "auto" the faster of
    fp32 and bf16 at these shapes (bf16 only when it is at least BF16_MARGIN faster), measured once per
    machine and shapes and then read from the cache."""
    if requested not in CHOICES:
        raise ValueError(f"precision must be one of {', '.join(CHOICES)}, got {requested!r}")
    if requested != "auto":
        return PrecisionChoice(requested, f"{requested} as requested")
    forced = machine_override()
    if forced:
        return PrecisionChoice(forced, f"{forced}: set for this machine by {FORCE_ENV} (not measured)")
    measure = measure or (lambda dtype, s: matmul_gflops(dtype, s))
    path = cache_path or _cache_file()
    key = cache_key(shapes)
    entries = _read_cache(path)
    found = entries.get(key)
    cached = isinstance(found, dict) and {"fp32", "bf16"} <= set(found)
    if cached:
        fp32, bf16 = float(found["fp32"]), float(found["bf16"])
    else:
        fp32, bf16 = measure(torch.float32, shapes), measure(torch.bfloat16, shapes)
        entries[key] = {"fp32": fp32, "bf16": bf16, "measured_at": time.time()}
        _write_cache(path, entries)
    ratio = bf16 / fp32 if fp32 > 0 else float("inf")
    if ratio >= BF16_MARGIN:
        precision = "bf16"
        reason = f"bf16: matmuls at this run's shapes ran {ratio:.2f}x faster than fp32 here"
    else:
        precision = "fp32"
        reason = (
            f"fp32: bf16 matmuls at this run's shapes ran at {ratio:.2f}x the fp32 speed here "
            f"(bf16 is chosen from {BF16_MARGIN:.2f}x)"
        )
    return PrecisionChoice(precision, reason, gflops_fp32=fp32, gflops_bf16=bf16, cached=cached)
