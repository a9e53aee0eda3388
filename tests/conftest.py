"""Shared fixtures: an isolated VPTDASH_HOME per test and small generated image sets."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own data dir; the converted backbone cache is shared per session
    (converting is deterministic and takes seconds)."""
    home = tmp_path_factory.mktemp("vptdash-home")
    shared_cache = tmp_path_factory.getbasetemp() / "shared-cache"
    shared_cache.mkdir(exist_ok=True)
    (home / "cache").symlink_to(shared_cache, target_is_directory=True)
    monkeypatch.setenv("VPTDASH_HOME", str(home))
    # torch.compile's cache too (importing vptdash pointed it at the user's cache, before any test ran)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(home / "inductor"))
    # No background loading and no warm worker process started by the app in tests (tests/test_worker.py
    # tests the warm worker itself).
    monkeypatch.setenv("VPTDASH_NO_WARMUP", "1")
    return home


@pytest.fixture(autouse=True)
def keep_main_module():
    """AppTest leaves the app script as sys.modules["__main__"]; multiprocessing's spawn would then re-run
    it in every child a later test starts (tests/test_store.py's writers died of it). Put it back."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


def make_image_folder(
    root: Path, classes=("dark", "bright", "striped"), per_class: int = 12, size: int = 40, seed: int = 0
) -> Path:
    """Classes that a tiny model can tell apart: brightness and stripes, plus noise."""
    rng = np.random.default_rng(seed)
    for class_index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = 40 + 170 * (class_index % 2)
            pixels = rng.normal(base, 20, (size, size, 3))
            if class_index == 2:
                pixels[:, ::4] = 255 - pixels[:, ::4]
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def cost_spies(monkeypatch, tmp_path):
    """This test's own cost cache, and how often fvcore counted and the latency timer ran (both still run)."""
    from vptdash.engine import cost  # here, not at the top: conftest loads before any test imports vptdash

    monkeypatch.setattr(cost, "default_cost_cache_path", lambda: tmp_path / "costs.json")
    calls = {"fvcore": 0, "latency": 0}
    real_fvcore, real_latency = cost.fvcore_gmacs, cost.latency_costs

    def fvcore_spy(*args, **kwargs):
        calls["fvcore"] += 1
        return real_fvcore(*args, **kwargs)

    def latency_spy(*args, **kwargs):
        calls["latency"] += 1
        return real_latency(*args, **kwargs)

    monkeypatch.setattr(cost, "fvcore_gmacs", fvcore_spy)
    monkeypatch.setattr(cost, "latency_costs", latency_spy)
    return calls
