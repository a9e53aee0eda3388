"""The compiled training step: compiled only where it pays, only full batches through it, the same model
as eager, and a compiler failure never fails a run."""

import shutil

import pytest
import torch

from tests.test_train import tiny_config
from vptdash.engine import compiled
from vptdash.engine.train import architecture_key, run_training


@pytest.mark.parametrize(
    "precision, images, warm, expected",
    [
        ("bf16", compiled.COLD_MIN_IMAGES, False, True),
        ("bf16", compiled.COLD_MIN_IMAGES - 1, False, False),
        ("bf16", compiled.WARM_MIN_IMAGES, True, True),
        ("bf16", compiled.WARM_MIN_IMAGES - 1, True, False),
        ("fp32", 10**7, True, False),  # in fp32 the compiled step was hardly faster
    ],
)
def test_auto_compiles_long_bf16_runs_only(precision, images, warm, expected):
    decision = compiled.decide(precision, images, warm=warm, from_cache=True, chosen="auto")
    assert decision.compile is expected
    assert decision.reason.startswith("compiled" if expected else "not compiled")


def test_the_setting_overrides_the_rule_but_never_compiles_full_fine_tuning(monkeypatch):
    assert compiled.decide("fp32", 8, warm=False, from_cache=True, chosen="on").compile
    assert not compiled.decide("bf16", 10**7, warm=True, from_cache=True, chosen="off").compile
    assert not compiled.decide("bf16", 10**7, warm=True, from_cache=False, chosen="on").compile
    monkeypatch.setenv(compiled.COMPILE_ENV, "ON ")
    assert compiled.setting() == "on"
    monkeypatch.setenv(compiled.COMPILE_ENV, "fast")
    with pytest.raises(ValueError, match="VPTDASH_COMPILE must be one of auto, on, off"):
        compiled.setting()


def test_a_compile_is_remembered_per_step_and_a_corrupt_note_means_cold():
    assert not compiled.compiled_before("arch", 32, "bf16")
    compiled.remember("arch", 32, "bf16")
    compiled.remember("arch", 32, "bf16")
    assert compiled.compiled_before("arch", 32, "bf16")
    assert not compiled.compiled_before("arch", 16, "bf16") and not compiled.compiled_before("other", 32, "bf16")
    compiled._marker().write_text("{not json")
    assert not compiled.compiled_before("arch", 32, "bf16")
    compiled.remember("arch", 8, "bf16")  # a corrupt note is replaced, not a crash
    assert compiled.compiled_before("arch", 8, "bf16")


def test_only_full_batches_go_through_the_compiled_step(image_folder, monkeypatch):
    shapes = []

    def spy(forward):
        def through(encoded):
            shapes.append(encoded.shape[0])
            return forward(encoded)

        return through

    monkeypatch.setattr(compiled, "compile_forward", spy)
    monkeypatch.setenv(compiled.COMPILE_ENV, "on")
    config = tiny_config(image_folder, batch_size=5, epochs=2, precision="fp32")
    result = run_training(config, compute_costs=False)
    train = result.metrics["split_sizes"]["train"]
    assert train % 5, "the split must leave a partial batch for this test to mean anything"
    assert shapes and set(shapes) == {5}
    assert len(shapes) == (train // 5) * 2  # every full batch of both epochs, no partial one
    assert result.timings["compiled"] is True and "compile_first_step_s" in result.timings


def test_a_failing_compile_trains_on_eagerly_to_the_same_model(image_folder, monkeypatch):
    config = tiny_config(image_folder, seed=4, precision="fp32")
    eager = run_training(config, compute_costs=False)

    def broken(forward):
        def fail(encoded):
            raise RuntimeError("no C++ compiler found")

        return fail

    monkeypatch.setattr(compiled, "compile_forward", broken)
    monkeypatch.setenv(compiled.COMPILE_ENV, "on")
    fallback = run_training(config, compute_costs=False)
    assert fallback.status == "done"
    assert fallback.timings["compiled"] is False
    assert (
        "compile failed" in fallback.timings["compile_reason"]
        and "no C++ compiler" in fallback.timings["compile_reason"]
    )
    for key, value in eager.trainable_state.items():
        assert torch.equal(fallback.trainable_state[key], value), key
    assert not compiled.compiled_before(architecture_key(config), config.batch_size, "fp32")


def test_a_short_run_is_not_compiled_and_says_why(image_folder):
    result = run_training(tiny_config(image_folder, precision="bf16"), compute_costs=False)
    assert result.timings["compiled"] is False
    assert f"pays from {compiled.COLD_MIN_IMAGES:,}" in result.timings["compile_reason"]


@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
    reason="torch.compile's CPU backend builds C++ (without a compiler runs fall back to eager: tested above)",
)
def test_the_compiled_step_trains_the_same_model_as_eager(image_folder, monkeypatch):
    """A real inductor compile (fp32, where compiled and eager agree to float rounding)."""
    config = tiny_config(image_folder, seed=2, batch_size=6, precision="fp32")
    eager = run_training(config, compute_costs=False)
    monkeypatch.setenv(compiled.COMPILE_ENV, "on")
    events = []
    fast = run_training(config, compute_costs=False, on_event=events.append)
    assert fast.timings["compiled"] is True, fast.timings["compile_reason"]
    assert any("compiling the training step once" in str(e.get("message")) for e in events)
    for key, value in eager.trainable_state.items():
        torch.testing.assert_close(fast.trainable_state[key], value, atol=1e-4, rtol=1e-4)
    assert compiled.compiled_before(architecture_key(config), 6, "fp32")  # the next run knows it is warm


def test_the_eta_leaves_out_the_one_time_compile(image_folder, monkeypatch):
    import time

    def slow_first_call(forward):
        calls = []

        def through(encoded):
            if not calls:
                time.sleep(1.5)  # the compile, in the first step
            calls.append(1)
            return forward(encoded)

        return through

    monkeypatch.setattr(compiled, "compile_forward", slow_first_call)
    monkeypatch.setenv(compiled.COMPILE_ENV, "on")
    events = []
    run_training(tiny_config(image_folder, precision="fp32", epochs=4), compute_costs=False, on_event=events.append)
    steps = [e for e in events if e["phase"] == "train"]
    assert steps[1]["total_steps"] - steps[1]["step"] >= 8
    # With the 1.5 s counted as a step's time, 8+ steps left would read as 6 s or more.
    assert steps[1]["eta_s"] < 1.0


def test_inductors_cache_sits_beside_vptdashs_unless_the_user_chose_one(tmp_path):
    import os
    import subprocess
    import sys

    code = "import vptdash, os; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["VPTDASH_HOME"] = str(tmp_path)
    chosen = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert chosen.stdout.strip() == str(tmp_path / "cache" / "inductor")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "mine")
    kept = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert kept.stdout.strip() == str(tmp_path / "mine")
