"""A compiled training step, for the runs long enough to pay for the compile.

`torch.compile` (inductor) fuses what eager autocast does between the matmuls: the bf16 casts, GELU,
layer norm, softmax. Measured on a 2-core AMX Xeon (`benchmarks/compile_step.py`, docs/performance.md,
"torch.compile: when it would pay"): a bf16 step runs 1.23-1.31x faster (batch 8-32), an fp32 step
1.05x, and the compile costs about 56-66 s the first time on a machine and about 4-5 s once inductor's
cache holds the graph. So it pays only for long bf16 runs: break-even at roughly 13,800-18,200 trained
images cold (1,731 steps at batch 8 ... 567 at batch 32) and 900-1,300 warm. The meeting demo's runs (640
images) never compile; the reference's full-split runs (about 36,000 with the learning-rate search) do.
The rule compiles from 18,500 trained images cold and 1,500 warm (below).

The rule (`decide`) is that measurement turned into thresholds, in trained images so it holds across
batch sizes; `VPTDASH_COMPILE=on|off` overrides it. A compile that fails (no C++ compiler on a laptop,
an unsupported operator) falls back to eager for the rest of the run: never a failed run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vptdash.engine import paths

COMPILE_ENV = "VPTDASH_COMPILE"
SETTINGS = ("auto", "on", "off")
# Trained images (steps x batch, every candidate of the learning-rate search counted) from which the
# compile pays: the highest measured break-even of the three batches in images (batch 32's, cold and
# warm), rounded up.
COLD_MIN_IMAGES = 18_500
WARM_MIN_IMAGES = 1_500


@dataclass
class Decision:
    compile: bool
    reason: str


def setting() -> str:
    """`VPTDASH_COMPILE`: auto (the default), on or off."""
    value = os.environ.get(COMPILE_ENV, "").strip().lower() or "auto"
    if value not in SETTINGS:
        raise ValueError(f"{COMPILE_ENV} must be one of {', '.join(SETTINGS)}, got {value!r}")
    return value


def decide(precision: str, images: int, *, warm: bool, from_cache: bool, chosen: str | None = None) -> Decision:
    """Whether a run that trains `images` images (all candidates) in `precision` compiles its step.
    `warm`: this machine compiled this step before (inductor's cache holds it). `from_cache`: the step
    starts from cached frozen encodings (full fine-tuning does not, and is never compiled)."""
    chosen = chosen or setting()
    if not from_cache:
        return Decision(False, "not compiled: only steps from cached frozen encodings are")
    if chosen == "off":
        return Decision(False, f"not compiled: {COMPILE_ENV}=off")
    if chosen == "on":
        return Decision(True, f"compiled: {COMPILE_ENV}=on")
    if precision != "bf16":
        return Decision(False, f"not compiled: in {precision} the compiled step was only 1.05x faster")
    needed = WARM_MIN_IMAGES if warm else COLD_MIN_IMAGES
    cache = "in inductor's cache" if warm else "not compiled here before"
    if images < needed:
        return Decision(False, f"not compiled: {images:,} training images, the compile ({cache}) pays from {needed:,}")
    return Decision(True, f"compiled: {images:,} training images, the compile ({cache}) pays from {needed:,}")


def _cache_dir() -> Path:
    """inductor's cache folder, wherever it is (`vptdash/__init__.py` puts it beside vptdash's caches
    unless the user set TORCHINDUCTOR_CACHE_DIR): the note of what compiled lives with what it describes."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or paths.cache_location() / "inductor")


def _marker() -> Path:
    return _cache_dir() / "vptdash-compiled-steps.json"


def _step_key(architecture: str, batch: int, precision: str) -> str:
    return json.dumps([architecture, batch, precision, torch.__version__], sort_keys=True)


def compiled_before(architecture: str, batch: int, precision: str) -> bool:
    """Whether a step of this architecture, batch and precision was compiled on this machine (warm cache)."""
    try:
        return _step_key(architecture, batch, precision) in json.loads(_marker().read_text())
    except (OSError, ValueError, TypeError):
        return False


def remember(architecture: str, batch: int, precision: str) -> None:
    """Note a successful compile, so the next run of this step knows inductor's cache holds it."""
    try:
        seen = json.loads(_marker().read_text()) if _marker().exists() else []
        if not isinstance(seen, list):
            seen = []
    except (OSError, ValueError):
        seen = []
    key = _step_key(architecture, batch, precision)
    if key in seen:
        return
    tmp = _marker().with_suffix(f".{os.getpid()}.tmp")
    try:
        _cache_dir().mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(seen + [key]))
        os.replace(tmp, _marker())
    except OSError:  # a read-only cache costs the next run a cold estimate, nothing more
        tmp.unlink(missing_ok=True)


def compile_forward(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`torch.compile(forward)`. Compiling happens at the first call; shapes are static, so the caller
    sends only full batches through it (a new batch shape would compile again)."""
    return torch.compile(forward, dynamic=False)
