import json

import pytest
import torch

from vptdash import bench, cli
from vptdash.bench import matmul_peak_gflops, step_flops
from vptdash.engine import paths
from vptdash.engine.backbones import load_backbone
from vptdash.engine.prompts import PromptedViT
from vptdash.engine.train import RunConfig
from vptdash.runs.store import RunStore

KEYS = (
    "peak_gflops_fp32",
    "peak_gflops_bf16",
    "engine_images_per_s",
    "naive_images_per_s",
    "speedup_vs_naive",
    "engine_gflops",
    "efficiency_vs_bf16_peak",
    "efficiency_vs_best_peak",
    "engine_images_per_s_b8",
    "naive_images_per_s_b8",
    "speedup_vs_naive_b8",
    "speedup_vs_naive_late_b8",
    "precision",
    "precision_reason",
    "sweep_seconds",
)


def test_matmul_peak_is_positive():
    assert matmul_peak_gflops(torch.float32, size=256, seconds=0.1) > 0


def test_step_flops_counts_attention_and_backward():
    from torch.utils.flop_counter import FlopCounterMode

    from vptdash.engine.cost import unfused_attention

    backbone = load_backbone("tiny-random", None, 32)
    model = PromptedViT(backbone, 2, num_prompts=4, placement="deep", seed=0)
    encoded = model.encode_frozen(torch.randn(2, 3, 32, 32))
    labels = torch.tensor([0, 1])
    flops = step_flops(model, encoded, labels, from_frozen=True)
    with unfused_attention(model), FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_from_frozen(encoded)
    forward_flops = counter.get_total_flops()
    assert forward_flops * 1.8 < flops < forward_flops * 3.5  # backward through the frozen blocks, no weight grads
    whole = step_flops(model, encoded, labels, from_frozen=True, row_selection=False)  # the naive loop's graph
    assert flops < 0.75 * whole and model.row_selection


def test_bench_prints_the_json_keys_last(capsys):
    argv = ["bench", "--json", "--backbone", "tiny-random", "--resolution", "32", "--steps", "1", "--precision", "fp32"]
    code = cli.main(argv)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert set(KEYS) <= set(result)
    assert result["engine_images_per_s"] > 0 and result["speedup_vs_naive"] > 0
    assert result["speedup_vs_naive_late"] > 0
    assert result["precision"] == "fp32" and result["precision_reason"] == "fp32 as requested"
    best = max(result["peak_gflops_fp32"], result["peak_gflops_bf16"])
    assert result["efficiency_vs_best_peak"] == result["engine_gflops"] / best  # the definition
    # fp32 long runs train eagerly (the compile hardly pays in fp32): nothing compiled is reported
    assert result["long_runs_compile"] is False and not any(k.endswith("_compiled") for k in result)


def test_bench_times_the_compiled_step_where_long_runs_compile(capsys, monkeypatch):
    from vptdash.engine import compiled

    through = []
    monkeypatch.setattr(compiled, "compile_forward", lambda forward: lambda x: through.append(1) or forward(x))
    monkeypatch.setenv(compiled.COMPILE_ENV, "on")
    argv = ["bench", "--json", "--backbone", "tiny-random", "--resolution", "32", "--steps", "1", "--precision", "fp32"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["long_runs_compile"] is True and through
    for suffix in ("", "_late"):
        assert result[f"compile_seconds{suffix}"] > 0
        ratio = result[f"naive_images_per_s{suffix}"] / result[f"engine_images_per_s{suffix}_compiled"]
        assert result[f"speedup_vs_naive{suffix}_compiled"] == pytest.approx(1 / ratio)
    assert "engine_images_per_s_b8_compiled" not in result  # short few-shot runs never compile
    best = max(result["peak_gflops_fp32"], result["peak_gflops_bf16"])
    assert result["efficiency_vs_best_peak_compiled"] == result["engine_gflops_compiled"] / best


def test_parity_record_keeps_pairs_across_invocations(tmp_path):
    """benchmarks/performance.py --resume: each pair is saved as it finishes; a re-run seed replaces its row."""
    from benchmarks.performance import load_parity_runs, save_parity_run

    path = tmp_path / "parity.json"
    row = {"setting": "linear probe", "seed": 1, "acc_fp32": 0.8, "acc_bf16": 0.81}
    save_parity_run(row, path)
    save_parity_run({**row, "setting": "10 deep prompts", "seed": 0}, path)
    save_parity_run({**row, "acc_bf16": 0.79}, path)
    runs = load_parity_runs(path)
    assert [(r["setting"], r["seed"]) for r in runs] == [("10 deep prompts", 0), ("linear probe", 1)]
    assert runs[1]["acc_bf16"] == 0.79 and runs[1]["commit"] and runs[1]["date"]


def test_paired_difference_interval_and_seed_ranges():
    from benchmarks.performance import paired_difference, parse_seeds

    stats = paired_difference([1.0, 2.0, 3.0])  # mean 2, sd 1, t(2 df) = 4.303
    assert stats["mean"] == 2.0 and stats["sd"] == 1.0
    assert abs(stats["high"] - (2.0 + 4.303 / 3**0.5)) < 1e-9 and abs(stats["low"] - (2.0 - 4.303 / 3**0.5)) < 1e-9
    assert paired_difference([0.5])["low"] != paired_difference([0.5])["low"]  # one seed: no interval (NaN)
    assert parse_seeds("0-2,7, 9") == [0, 1, 2, 7, 9]


def test_the_timed_sweep_reports_its_floor_from_the_runs_it_stored(image_folder, monkeypatch):
    """`bench --sweep`'s floor: each stored run's executed-graph GMACs per image x the images it pushed
    through them (a training image twice, an evaluated or encoded one once), 2 FLOP per MAC, at the better
    peak; worked here from the stored runs by that definition."""
    base = dict(backbone="tiny-random", dataset=str(image_folder), resolution=32, epochs=2, batch_size=8, lr=0.01)
    configs = [
        RunConfig(**base, tuning="linear", num_prompts=0, measure_latency=False),
        RunConfig(**base, num_prompts=2, placement="deep", measure_latency=False, eval_every=2),
    ]
    monkeypatch.setattr(bench, "meeting_sweep_configs", lambda: configs)
    seconds, floor = bench.time_meeting_sweep(1, peaks=(100.0, 40.0))  # fp32 is the better peak here
    assert seconds > 0 and floor["peak_gflops"] == 100.0 and floor["peak_precision"] == "fp32"
    rows = {row["config"]["num_prompts"]: row for row in RunStore(paths.data_dir() / "bench-sweep.sqlite").list_runs()}
    probe, prompts = rows[0], rows[2]
    probe_sizes, sizes = probe["metrics"]["split_sizes"], prompts["metrics"]["split_sizes"]
    encode = sum(probe_sizes.values()) * probe["costs"]["gmacs"] * 2 / 100.0
    # 2 epochs x train images, twice; one validation pass (eval_every=2 of 2 epochs) and the test split, once
    train = 2 * (2 * sizes["train"]) * prompts["costs"]["gmacs"] * 2 / 100.0
    evaluate = (sizes["val"] + sizes["test"]) * prompts["costs"]["gmacs"] * 2 / 100.0
    assert floor["encode_s"] == pytest.approx(encode)
    assert floor["train_s"] == pytest.approx(train)
    assert floor["eval_s"] == pytest.approx(evaluate)
    assert floor["floor_s"] == pytest.approx(encode + train + evaluate)
    assert bench.time_meeting_sweep(1)[1] is None  # no peaks, no floor


def test_a_sweep_of_several_processes_is_floored_at_their_combined_peak(monkeypatch):
    """Two 1-thread processes side by side may multiply faster than one 2-thread process: the floor takes
    the larger rate (a floor must not understate the machine), and restores the thread count."""

    def peak(dtype, seconds):
        return {torch.float32: 60.0, torch.bfloat16: 100.0}[dtype]  # per process share

    monkeypatch.setattr(bench, "matmul_peak_gflops", peak)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    assert bench.sweep_peaks(104.0, 245.0, 2, 0.1) == (120.0, 245.0)  # 2 x 60 beats 104; 2 x 100 does not beat 245
    assert set_to == [1, 2]
    assert bench.sweep_peaks(104.0, 245.0, 1, 0.1) == (104.0, 245.0)  # one process: the all-thread peaks
