"""Never recompute what is frozen: a cache of what the frozen part of the network computes per image.

A prompted model whose first prompted block is k computes the same tokens for blocks 0..k-1 on every
epoch and in every run that shares the backbone, the data, the resolution and the blocks skipped below
k. This cache keeps those encodings per image, so a sweep encodes each image once per distinct k:
linear probes (k = depth: the pooled CLS feature) and late-block placements become nearly free, and
the val/test encodings are shared by every seed.

Keys name everything the encoding depends on: backbone + weights fingerprint, resolution, the
dataset's content fingerprint, k, the skipped blocks below k and the precision. Pooled features (small)
are also kept on disk under the cache dir, so a new process (the dashboard's worker, a CLI sweep)
starts warm; token encodings (large) stay in memory, bounded.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from vptdash.engine import paths

MEMORY_BUDGET_BYTES = 3 * 1024**3  # token encodings kept in memory; least recently used go first
_lock = threading.Lock()
_memory: "OrderedDict[str, _Entry]" = OrderedDict()
_fingerprints: dict[int, tuple[torch.Tensor, str]] = {}


class _Entry:
    """Encodings of all N images of one dataset under one key; rows fill in as they are needed."""

    def __init__(self, n_images: int):
        self.n_images = n_images
        self.values: torch.Tensor | None = None
        self.done = torch.zeros(n_images, dtype=torch.bool)

    def nbytes(self) -> int:
        return 0 if self.values is None else self.values.numel() * self.values.element_size()


def dataset_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """Content hash of a decoded image set (computed once per tensor object: ~0.1 s for ELPV)."""
    cached = _fingerprints.get(id(images))
    if cached is not None and cached[0] is images:
        return cached[1]
    digest = hashlib.sha1()
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    value = digest.hexdigest()[:16]
    _fingerprints[id(images)] = (images, value)
    return value


def encoding_key(
    backbone_id: str, resolution: int, data_id: str, first_block: int, skipped_below: tuple[int, ...], precision: str
) -> str:
    text = f"{backbone_id}|{resolution}|{data_id}|k={first_block}|skip={skipped_below}|{precision}"
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _disk_path(key: str) -> Path:
    return paths.cache_dir() / "features" / f"{key}.pt"


def _load_from_disk(key: str, n_images: int) -> _Entry | None:
    try:
        path = _disk_path(key)
        if not path.exists():
            return None
        saved = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable cache dir, a torn or foreign file: just a cache miss
        return None
    if saved["done"].shape != (n_images,):
        return None
    entry = _Entry(n_images)
    entry.values, entry.done = saved["values"], saved["done"]
    return entry


def _save_to_disk(key: str, entry: _Entry) -> None:
    """Best effort: a full or read-only cache dir costs the next process some speed, nothing else,
    and leaves no partial file behind."""
    try:
        path = _disk_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save({"values": entry.values, "done": entry.done}, tmp)  # ENOSPC arrives as RuntimeError
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except (OSError, RuntimeError):
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _evict_over_budget() -> None:
    while _memory and sum(e.nbytes() for e in _memory.values()) > MEMORY_BUDGET_BYTES:
        _memory.popitem(last=False)


def cached_encodings(
    key: str, n_images: int, indices: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor], *, persist: bool
) -> torch.Tensor:
    """Encodings of the images at `indices`, computing only those not seen before under `key`.

    `encode(missing_indices)` returns their encodings (float32). `persist` keeps the entry on disk
    too (use it for small pooled features)."""
    with _lock:
        entry = _memory.get(key)
        if entry is None and persist:
            entry = _load_from_disk(key, n_images)
        if entry is None:
            entry = _Entry(n_images)
        _memory[key] = entry
        _memory.move_to_end(key)
        missing = indices[~entry.done[indices]]
    if len(missing):
        fresh = encode(missing)
        with _lock:
            if entry.values is None:
                entry.values = torch.zeros((n_images, *fresh.shape[1:]), dtype=fresh.dtype)
            entry.values[missing] = fresh
            entry.done[missing] = True
            if persist:
                _save_to_disk(key, entry)
            _evict_over_budget()
    return entry.values[indices]


def clear_memory() -> None:
    with _lock:
        _memory.clear()
        _fingerprints.clear()
