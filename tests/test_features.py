import pytest
import torch

from tests.conftest import make_image_folder
from vptdash.engine import features, train
from vptdash.engine.train import RunConfig, run_training


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A cache of its own: other tests persist features of identical generated images in the shared one."""
    home = tmp_path / "own-home"
    home.mkdir()
    monkeypatch.setenv("VPTDASH_HOME", str(home))
    features.clear_memory()


def tiny(dataset, **overrides):
    values = dict(
        backbone="tiny-random",
        dataset=str(dataset),
        resolution=32,
        shots=4,
        epochs=1,
        batch_size=8,
        measure_latency=False,
        tuning="linear",
        num_prompts=0,
    )
    return RunConfig(**{**values, **overrides})


def count_encoded(monkeypatch):
    """Count the images that actually go through the frozen layers."""
    seen = []
    original = train.PromptedViT.encode_frozen

    def counting(self, images):
        seen.append(len(images))
        return original(self, images)

    monkeypatch.setattr(train.PromptedViT, "encode_frozen", counting)
    return seen


def test_second_probe_reuses_every_encoding(image_folder, monkeypatch):
    features.clear_memory()
    seen = count_encoded(monkeypatch)
    first = run_training(tiny(image_folder, seed=0), compute_costs=False)
    n_first = sum(seen)
    assert n_first > 0
    seen.clear()
    again = run_training(tiny(image_folder, seed=0), compute_costs=False)
    assert sum(seen) == 0
    assert again.metrics["accuracy"] == first.metrics["accuracy"]
    seen.clear()
    run_training(tiny(image_folder, seed=1), compute_costs=False)  # other shots: only new train images
    assert 0 < sum(seen) <= 3 * 4


def test_disk_cache_survives_a_new_process_view(image_folder, monkeypatch):
    features.clear_memory()
    run_training(tiny(image_folder), compute_costs=False)
    features.clear_memory()  # as if a new process started
    seen = count_encoded(monkeypatch)
    run_training(tiny(image_folder), compute_costs=False)
    assert sum(seen) == 0


def test_cache_invalidated_by_data_resolution_block_and_precision(tmp_path, monkeypatch):
    features.clear_memory()
    folder = make_image_folder(tmp_path / "a", per_class=8)
    seen = count_encoded(monkeypatch)
    run_training(tiny(folder), compute_costs=False)
    baseline = sum(seen)
    for changed in (dict(resolution=48), dict(precision="bf16"), dict(tuning="prompt", num_prompts=2, placement="3")):
        seen.clear()
        run_training(tiny(folder, **changed), compute_costs=False)
        assert sum(seen) > 0, changed
    # a new image in the folder changes the content fingerprint: everything is encoded again
    make_image_folder(tmp_path / "a", classes=("dark",), per_class=9, seed=5)
    seen.clear()
    run_training(tiny(folder), compute_costs=False)
    assert sum(seen) >= baseline


def test_cached_late_placement_matches_uncached(image_folder):
    features.clear_memory()
    config = tiny(image_folder, tuning="prompt", num_prompts=3, placement="2,3", epochs=2)
    first = run_training(config, compute_costs=False)
    second = run_training(config, compute_costs=False)  # now served from the cache
    for key in first.trainable_state:
        assert torch.allclose(first.trainable_state[key], second.trainable_state[key])


# ----------------------------------------------------------------------------- memory bound
def entry(key: str, calls: list, *, persist: bool = False, n_images: int = 4, width: int = 100) -> torch.Tensor:
    """Encodings of all `n_images` under `key`: float32 (n_images, width), 1,600 bytes at the defaults.
    Each call of the encoder is recorded with its key."""

    def encode(missing: torch.Tensor) -> torch.Tensor:
        calls.append(key)
        return missing.float()[:, None].expand(-1, width) + 0.5

    return features.cached_encodings(key, n_images, torch.arange(n_images), encode, persist=persist)


def test_memory_keeps_the_most_recently_used_entries_within_the_budget(monkeypatch):
    one = 4 * 100 * 4  # bytes of one entry
    monkeypatch.setattr(features, "MEMORY_BUDGET_BYTES", 2 * one + one // 2)  # room for two entries, not three
    calls = []
    entry("a", calls)
    entry("b", calls)
    entry("a", calls)  # a used again: b is now the least recently used
    assert calls == ["a", "b"]
    entry("c", calls)  # three entries exceed the budget: b goes
    assert calls == ["a", "b", "c"]
    entry("a", calls)
    entry("c", calls)
    assert calls == ["a", "b", "c"]  # a and c stayed
    entry("b", calls)  # b was evicted: encoded again (and now a, the least recent, goes)
    assert calls == ["a", "b", "c", "b"]
    entry("c", calls)
    entry("a", calls)
    assert calls == ["a", "b", "c", "b", "a"]


def test_an_entry_evicted_from_memory_is_read_back_from_disk_when_persisted(monkeypatch):
    monkeypatch.setattr(features, "MEMORY_BUDGET_BYTES", 4 * 100 * 4)  # one entry at a time
    calls = []
    first = entry("pooled", calls, persist=True)
    entry("other", calls)  # pushes "pooled" out of memory
    again = entry("pooled", calls, persist=True)
    assert calls == ["pooled", "other"]  # read back from disk, not encoded again
    assert torch.equal(first, again)


def test_a_budget_of_zero_still_returns_the_encodings(monkeypatch):
    monkeypatch.setattr(features, "MEMORY_BUDGET_BYTES", 0)  # nothing fits: every call encodes, none fails
    calls = []
    values = entry("k", calls)
    assert values.shape == (4, 100) and torch.equal(values[:, 0], torch.arange(4).float() + 0.5)
    entry("k", calls)
    assert calls == ["k", "k"]


def test_encoding_ahead_leaves_the_probe_nothing_to_encode(image_folder, monkeypatch):
    """What a waiting worker encodes for the demo's probe is exactly what the probe's run reads, and the
    run's answer is the same as without it."""
    features.clear_memory()
    cold = run_training(tiny(image_folder, seed=2), compute_costs=False)
    monkeypatch.setenv("VPTDASH_HOME", str(image_folder.parent / "another-home"))
    features.clear_memory()
    seen = count_encoded(monkeypatch)
    train.encode_ahead(tiny(image_folder, seed=2))
    assert sum(seen) > 0
    features.clear_memory()  # from disk, as in the worker that claims the job after warming up
    seen.clear()
    warm = run_training(tiny(image_folder, seed=2), compute_costs=False)
    assert sum(seen) == 0
    assert warm.metrics["accuracy"] == cold.metrics["accuracy"]
    assert warm.metrics["test_correct"] == cold.metrics["test_correct"]


def test_encoding_ahead_skips_runs_whose_frozen_part_is_not_kept(image_folder, monkeypatch):
    seen = count_encoded(monkeypatch)
    train.encode_ahead(tiny(image_folder, tuning="prompt", num_prompts=2, placement="deep"))
    assert seen == []
    train.encode_ahead(tiny(image_folder, tuning="prompt", num_prompts=2, placement="2,3"))
    assert sum(seen) > 0  # a late placement's frozen prefix is shared across runs, so it is worth encoding
