"""benchmarks/meeting_demo.py: the per-phase split it reads from the run store, and the compute floor."""

import json

import pytest
import torch

from benchmarks.meeting_demo import (
    FLOOR_CONVENTION,
    keep_result,
    machine_kind,
    phase_split,
    section,
    sections,
    stored_results,
    warm_up_seconds,
)
from vptdash.bench import step_flops
from vptdash.engine.cost import analytic_gmacs
from vptdash.engine.train import RunConfig, build_model
from vptdash.runs.floor import run_work
from vptdash.runs.floor import runs_floor as demo_floor


def test_phases_run_from_their_first_event_to_the_next_phase_and_the_last_to_the_finish():
    run = {"started_at": 100.0, "finished_at": 130.0}
    events = [
        {"phase": "setup", "elapsed_s": 0.0},
        {"phase": "setup", "elapsed_s": 1.0},
        {"phase": "train", "elapsed_s": 4.0},
        {"phase": "val", "elapsed_s": 9.0},  # validation inside the epochs: still training
        {"phase": "train", "elapsed_s": 12.0},
        {"phase": "test", "elapsed_s": 20.0},
        {"phase": "cost", "elapsed_s": 23.5},
    ]
    assert phase_split(run, events) == {"setup_s": 4.0, "train_s": 16.0, "test_s": 3.5, "cost_s": 6.5}


def test_a_run_that_has_not_finished_has_no_length_for_its_last_phase():
    events = [{"phase": "setup", "elapsed_s": 0.0}, {"phase": "train", "elapsed_s": 2.0}]
    assert phase_split({"started_at": 5.0, "finished_at": None}, events) == {"setup_s": 2.0, "train_s": None}


SIZES = {"train": 30, "val": 10, "test": 60}


def stored(config: dict, gmacs: float, epochs: int) -> dict:
    return {
        "config": config,
        "metrics": {"split_sizes": SIZES},
        "costs": {"gmacs": gmacs},
        "timings": {"epochs_trained_all_candidates": epochs},
    }


PROBE = stored({"tuning": "linear", "num_prompts": 0, "placement": "none"}, gmacs=1.0, epochs=0)
PROMPTS = stored({"tuning": "prompt", "num_prompts": 10, "placement": "deep", "epochs": 20}, gmacs=2.0, epochs=20)
PROMPT_EVENTS = [
    {"phase": "setup"},
    {"phase": "train", "step": 1},
    {"phase": "val", "epoch": 10},
    {"phase": "train", "step": 41},
    {"phase": "val", "epoch": 20},
    {"phase": "test"},
    {"phase": "cost"},
]


def test_a_prompt_run_trains_on_every_epochs_images_and_evaluates_each_validation_pass_and_the_test_split():
    assert run_work(PROMPTS, PROMPT_EVENTS) == {
        "gmacs": 2.0,
        "train_images": 20 * 30,
        "eval_images": 2 * 10 + 60,
        "encode_images": 0,
    }


def test_the_linear_probe_encodes_every_image_once_and_its_fit_reads_cached_features():
    assert run_work(PROBE, [{"phase": "train"}, {"phase": "test"}]) == {
        "gmacs": 1.0,
        "train_images": 0,
        "eval_images": 0,
        "encode_images": 30 + 10 + 60,
    }


def test_the_floor_is_the_demos_macs_at_the_better_peak():
    """By hand: the prompt run trains 600 images at 2 x 2.0 GMACs (2400 GMACs) and evaluates 80 at 2.0 (160);
    the probe encodes 100 at 1.0 (100). 2660 GMACs = 5320 GFLOPs; at 266 GFLOP/s (bf16, above fp32's 100):
    20.0 s, of which training 4800 / 266, evaluation 320 / 266, encoding 200 / 266."""
    works = [run_work(PROBE, []), run_work(PROMPTS, PROMPT_EVENTS)]
    floor = demo_floor(works, peak_gflops_fp32=100.0, peak_gflops_bf16=266.0)
    assert floor["floor_s"] == pytest.approx(20.0)
    assert floor["train_s"] == pytest.approx(4800 / 266)
    assert floor["eval_s"] == pytest.approx(320 / 266)
    assert floor["encode_s"] == pytest.approx(200 / 266)
    assert floor["gmacs_total"] == pytest.approx(2660)
    assert floor["per_run_s"] == pytest.approx([200 / 266, 5120 / 266])
    assert (floor["peak_gflops"], floor["peak_precision"]) == (266.0, "bf16")
    # where fp32 peaks higher, the floor is taken at fp32's peak: 5320 / 532
    faster_fp32 = demo_floor(works, peak_gflops_fp32=532.0, peak_gflops_bf16=266.0)
    assert faster_fp32["floor_s"] == pytest.approx(10.0) and faster_fp32["peak_precision"] == "fp32"
    # a machine set to fp32 (standing in for a CPU without fast bf16) is held to fp32's peak: 5320 / 100
    forced = demo_floor(works, peak_gflops_fp32=100.0, peak_gflops_bf16=266.0, precision="fp32")
    assert forced["floor_s"] == pytest.approx(53.2) and (forced["peak_gflops"], forced["peak_precision"]) == (
        100.0,
        "fp32",
    )
    with pytest.raises(ValueError, match="fp16"):
        demo_floor(works, 100.0, 266.0, precision="fp16")


def result(**extra) -> dict:
    return {
        "date": "2026-11-26 18:00 UTC",
        "machine": {
            "cpu": "AMD EPYC",
            "cores": 2,
            "threads": 2,
            "flags": ["avx512_bf16"],
            "torch": "2",
            "load_average": [1.0, 1.0, 1.0],
        },
        "first_point_s": 4.2,
        "demo_complete_s": 80.0,
        "runs": [{"label": "10 deep prompts", "precision": "bf16", "queue_wait_s": 1.0, "floor_s": 19.25}],
        **extra,
    }


def test_the_docs_section_states_the_floor_its_split_its_peak_and_its_convention():
    floor = {
        "floor_s": 40.0,
        "train_s": 30.0,
        "eval_s": 8.0,
        "encode_s": 2.0,
        "peak_gflops": 245.5,
        "peak_precision": "bf16",
        "peak_gflops_fp32": 104.6,
        "peak_gflops_bf16": 245.5,
        "gmacs_total": 4910.0,
    }
    text = section(
        result(warm_up_s=31.5, floor_s=40.0, efficiency_vs_floor=0.5, floor=floor, floor_convention=FLOOR_CONVENTION)
    )
    assert "| 40.0 s (training 30.0, evaluation 8.0, probe encoding 2.0, which the warm worker does before" in text
    assert "| efficiency vs the floor (floor / complete) | 0.5 |" in text
    assert "| 19.25 |" in text  # the run's own floor beside its measured phases
    assert "245.5 GFLOP/s (bf16; fp32 104.6, bf16 245.5" in text
    assert FLOOR_CONVENTION in text and "2 x training images" in FLOOR_CONVENTION
    assert "(as before a meeting; its warm-up took 31.5 s)" in text


def test_a_result_measured_before_the_floor_existed_still_makes_a_section():
    text = section(result())
    assert "| click -> demo complete | 80.0 s | 60 s |" in text and "floor:" not in text
    assert "(as before a meeting), then one press" in text


def test_the_warm_up_time_is_the_workers_own_line_and_none_before_it_is_written():
    log = "worker 12: nice 5, 2 torch threads\nwarmed up in 27.3 s\n"
    assert warm_up_seconds(log) == 27.3
    assert warm_up_seconds("worker 12: nice 5, 2 torch threads\n") is None
    assert warm_up_seconds("warm-up skipped: disk gone\n") is None


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["deep", "shallow"])
def test_the_floors_training_convention_is_the_executed_flops_of_a_real_training_step(placement):
    """A training image counts 2 x its forward MACs: torch's own FLOP counter over one real step (forward and
    backward, as the engine executes it: frozen weights get no weight gradient) on the demo's backbone at
    the demo's resolution agrees within 1% with 2 FLOP/MAC x 2 x batch x the analytic executed-graph GMACs."""
    config = RunConfig(backbone="dinov2_s14", resolution=112, num_prompts=10, placement=placement)
    model = build_model(config, 2)
    batch = 8
    executed = step_flops(
        model, torch.randn(batch, 3, 112, 112), torch.zeros(batch, dtype=torch.long), from_frozen=False
    )
    convention = 2 * 2 * batch * analytic_gmacs(model, 112) * 1e9
    assert executed == pytest.approx(convention, rel=0.01)


def test_results_are_kept_one_per_kind_of_machine_and_summarised_side_by_side(tmp_path):
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(result()))  # a file from before there were several: one result
    assert [r["demo_complete_s"] for r in stored_results(path)] == [80.0]
    amx = result(demo_complete_s=36.8)
    amx["machine"] = {**amx["machine"], "cpu": "Intel Xeon", "flags": ["amx_bf16", "avx512_bf16"]}
    forced = json.loads(json.dumps(amx))
    forced["machine"]["precision_setting"] = "fp32"
    forced["demo_complete_s"] = 58.0
    assert machine_kind(amx) == "Intel Xeon, AMX" and machine_kind(forced) == "Intel Xeon, AMX, VPTDASH_PRECISION=fp32"
    keep_result(amx, path)
    keep_result(forced, path)
    newer = result(demo_complete_s=70.0)  # the same kind as the first: replaces it, goes last
    kept = keep_result(newer, path)
    assert [r["demo_complete_s"] for r in kept] == [36.8, 58.0, 70.0]
    assert stored_results(path) == kept
    text = sections(kept)
    assert "| click -> demo complete | 36.8 s | 58.0 s | 70.0 s | 60 s |" in text
    assert text.count("### (") == 3 and "### (2) Intel Xeon, AMX, VPTDASH_PRECISION=fp32" in text
