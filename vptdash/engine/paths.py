"""Where vptdash keeps its data, caches and uploads.

`VPTDASH_HOME` overrides everything (tests and CI point it at a temporary folder);
otherwise the platform's per-user data and cache folders are used.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "vptdash"


def _home_override() -> Path | None:
    value = os.environ.get("VPTDASH_HOME")
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    """Run store, uploads and run artifacts."""
    home = _home_override()
    path = home / "data" if home else Path(platformdirs.user_data_dir(APP_NAME))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_location() -> Path:
    """Where `cache_dir` is, without creating it."""
    home = _home_override()
    return home / "cache" if home else Path(platformdirs.user_cache_dir(APP_NAME))


def cache_dir() -> Path:
    """Converted weights, decoded datasets, compiled training steps: safe to delete, rebuilt on demand."""
    path = cache_location()
    path.mkdir(parents=True, exist_ok=True)
    return path


def uploads_dir() -> Path:
    path = data_dir() / "uploads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def store_path() -> Path:
    return data_dir() / "runs.sqlite"
