"""Precision chosen by measurement: the faster of fp32 and bf16 at the run's shapes, cached per machine."""

import pytest
import torch

from vptdash.engine import precision


def fake(fp32: float, bf16: float, calls: list):
    def measure(dtype, shapes):
        calls.append(dtype)
        return fp32 if dtype == torch.float32 else bf16

    return measure


SHAPES = precision.block_shapes(tokens=8 * 75, dim=384, mlp_dim=1536)


def test_bf16_is_chosen_only_where_it_measured_faster(tmp_path):
    calls = []
    amx = precision.choose_precision("auto", SHAPES, measure=fake(330, 2150, calls), cache_path=tmp_path / "a.json")
    assert amx.precision == "bf16" and "6.52x faster" in amx.reason
    no_amx = precision.choose_precision("auto", SHAPES, measure=fake(320, 165, calls), cache_path=tmp_path / "b.json")
    assert no_amx.precision == "fp32" and "0.52x the fp32 speed" in no_amx.reason
    assert calls == [torch.float32, torch.bfloat16] * 2  # both measured, each once


def test_a_bf16_gain_within_noise_keeps_fp32(tmp_path):
    within = precision.choose_precision("auto", SHAPES, measure=fake(100, 109, []), cache_path=tmp_path / "c.json")
    assert within.precision == "fp32"  # 1.09x < the 1.10x margin
    beyond = precision.choose_precision("auto", SHAPES, measure=fake(100, 111, []), cache_path=tmp_path / "d.json")
    assert beyond.precision == "bf16"


def test_the_measurement_is_cached_per_machine_and_shapes(tmp_path):
    path, calls = tmp_path / "p.json", []
    first = precision.choose_precision("auto", SHAPES, measure=fake(300, 600, calls), cache_path=path)
    again = precision.choose_precision("auto", SHAPES, measure=fake(900, 1, calls), cache_path=path)
    assert (first.cached, again.cached) == (False, True)
    assert again.precision == "bf16" and again.gflops_bf16 == 600  # read back, not re-measured
    other = precision.block_shapes(tokens=32 * 75, dim=384, mlp_dim=1536)
    precision.choose_precision("auto", other, measure=fake(300, 600, calls), cache_path=path)
    assert len(calls) == 4  # other shapes: measured again
    assert not list(tmp_path.glob(".precision-*"))  # the atomic write leaves no temporary file


def test_a_forced_precision_is_used_as_given_and_nothing_is_measured(tmp_path):
    calls = []
    for forced in ("fp32", "bf16"):
        choice = precision.choose_precision(forced, SHAPES, measure=fake(1, 1000, calls), cache_path=tmp_path / "f")
        assert choice.precision == forced and choice.gflops_fp32 is None
    assert calls == [] and not (tmp_path / "f").exists()


def test_the_machine_setting_decides_auto_without_measuring_and_a_request_still_wins(tmp_path, monkeypatch):
    calls = []
    # bf16 measures 1000x faster here, so only the setting can make "auto" fp32
    for value, expected in (("fp32", "fp32"), (" BF16 ", "bf16")):
        monkeypatch.setenv("VPTDASH_PRECISION", value)
        choice = precision.choose_precision("auto", SHAPES, measure=fake(1, 1000, calls), cache_path=tmp_path / "m")
        assert choice.precision == expected and "VPTDASH_PRECISION" in choice.reason
    monkeypatch.setenv("VPTDASH_PRECISION", "fp32")
    assert precision.choose_precision("bf16", SHAPES, measure=fake(1, 1000, calls)).precision == "bf16"
    assert calls == []
    monkeypatch.setenv("VPTDASH_PRECISION", "auto")
    assert (
        precision.choose_precision("auto", SHAPES, measure=fake(1, 1000, calls), cache_path=tmp_path / "a").precision
        == "bf16"
    )
    assert len(calls) == 2


def test_a_bad_machine_setting_is_named(monkeypatch):
    monkeypatch.setenv("VPTDASH_PRECISION", "fp16")
    with pytest.raises(ValueError, match="VPTDASH_PRECISION must be one of auto, fp32, bf16, got 'fp16'"):
        precision.choose_precision("auto", SHAPES, measure=fake(1, 1, []))


def test_a_corrupt_cache_is_measured_again(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    calls = []
    choice = precision.choose_precision("auto", SHAPES, measure=fake(300, 100, calls), cache_path=path)
    assert choice.precision == "fp32" and len(calls) == 2


def test_block_shapes_are_a_blocks_products():
    assert precision.block_shapes(10, 4, 16) == [(10, 4, 12), (10, 4, 4), (10, 4, 16), (10, 16, 4)]


def test_the_real_measurement_runs_and_names_this_cpu(tmp_path):
    choice = precision.choose_precision("auto", precision.block_shapes(64, 64, 256), cache_path=tmp_path / "r.json")
    assert choice.precision in ("fp32", "bf16") and choice.gflops_fp32 > 0 and choice.gflops_bf16 > 0
    assert precision.cpu_description()["threads"] == torch.get_num_threads()


def test_a_run_with_precision_auto_trains_in_the_measured_precision_and_says_why(image_folder):
    from vptdash.engine.train import RunConfig, run_training

    config = RunConfig(
        backbone="tiny-random",
        dataset=str(image_folder),
        resolution=32,
        shots=None,
        epochs=1,
        batch_size=8,
        lr=1e-2,
        precision="auto",
        measure_latency=False,
    )
    result = run_training(config, compute_costs=False)
    assert result.metrics["precision"] in ("fp32", "bf16")
    assert "faster" in result.metrics["precision_reason"] or "speed" in result.metrics["precision_reason"]
    forced = run_training(RunConfig(**{**config.to_dict(), "precision": "fp32"}), compute_costs=False)
    assert (forced.metrics["precision"], forced.metrics["precision_reason"]) == ("fp32", "fp32 as requested")
