"""The compute floor of stored runs: the seconds their arithmetic needs at a machine's best measured
matmul peak, so a timing can be read against what the CPU can do at all (`benchmarks/meeting_demo.py` for
the meeting demo, `python -m vptdash bench --sweep` for the standard meeting sweep).

Counted from each stored run's executed-graph GMACs per image (`costs["gmacs"]`, the dashboard's
convention) and the images each phase pushed through it (CONVENTION). The factor 2 for a training image
agrees within 1% with torch's FLOP counter over a real training step (tests/test_meeting_demo.py).
"""

from __future__ import annotations

from vptdash.engine.train import RunConfig

# A prompt-tuning step over B images costs about twice their forward MACs: the forward, plus a backward
# that carries gradients back to the prompts through every activation (as many MACs again) and computes no
# weight gradient (the backbone is frozen). Evaluation and the probe's frozen encoding are forwards.
TRAIN_PASSES = 2
CONVENTION = (
    "floor = 2 FLOP/MAC x sum over the runs of GMACs/image x (2 x training images + evaluated images + "
    "encoded images) / best matmul peak (GFLOP/s, the larger of fp32 and bf16, or the one precision "
    "VPTDASH_PRECISION sets for the machine); GMACs/image = the run's stored "
    "executed-graph count (costs['gmacs']); a training step over B images costs about 2x their forward MACs "
    "(the forward, plus the input-gradient backward to the prompts; the frozen weights get no weight gradient); "
    "evaluated = validation passes x validation images + test images, 1x each; encoded = the linear probe's "
    "frozen features, 1x per image (train, validation and test; its fit and evaluation read cached features "
    "and are not counted). Cost measurement (GMAC count, latency) is not counted"
)


def run_work(run: dict, events: list[dict]) -> dict:
    """What one stored run pushed through its executed graph: its GMACs per image and the images of
    each phase. Training images = epochs trained (all candidates) x training images; validation passes are
    the run's "val" events (never thinned in the store). The rung validations of a learning-rate search are
    not among them (the demo and the meeting sweep never search), so a search's floor is a little low."""
    config = RunConfig.from_dict(run["config"] or {})
    sizes = (run.get("metrics") or {}).get("split_sizes") or {}
    gmacs = float(run["costs"]["gmacs"])
    if config.is_linear_probe:
        return {"gmacs": gmacs, "train_images": 0, "eval_images": 0, "encode_images": sum(sizes.values())}
    epochs = int(run["timings"]["epochs_trained_all_candidates"])
    val_passes = sum(1 for event in events if event.get("phase") == "val")
    return {
        "gmacs": gmacs,
        "train_images": epochs * sizes["train"],
        "eval_images": val_passes * sizes["val"] + sizes["test"],
        "encode_images": 0,
    }


def floor_seconds(work: dict, peak_gflops: float) -> dict:
    """Seconds per phase and in all of one run's `run_work` at `peak_gflops` (CONVENTION)."""
    seconds_per_gmac = 2 / peak_gflops  # 1 MAC = 2 FLOPs
    phases = {
        "train_s": TRAIN_PASSES * work["train_images"] * work["gmacs"] * seconds_per_gmac,
        "eval_s": work["eval_images"] * work["gmacs"] * seconds_per_gmac,
        "encode_s": work["encode_images"] * work["gmacs"] * seconds_per_gmac,
    }
    return {"floor_s": sum(phases.values()), **phases}


def runs_floor(
    works: list[dict], peak_gflops_fp32: float, peak_gflops_bf16: float, *, precision: str | None = None
) -> dict:
    """The floor of several runs at the better of the two measured peaks, with its phases summed over runs.
    `precision`: the one precision the machine is set to (`precision.machine_override()`): only its peak
    counts, as on a CPU that has only that one fast (an AMX Xeon forced to fp32 stands in for one without)."""
    peaks = {"fp32": peak_gflops_fp32, "bf16": peak_gflops_bf16}
    if precision is None:
        peak_precision = "bf16" if peak_gflops_bf16 >= peak_gflops_fp32 else "fp32"
    elif precision in peaks:
        peak_precision = precision
    else:
        raise ValueError(f"precision must be fp32, bf16 or None, got {precision!r}")
    peak = peaks[peak_precision]
    per_run = [floor_seconds(work, peak) for work in works]
    totals = {key: sum(run[key] for run in per_run) for key in ("floor_s", "train_s", "eval_s", "encode_s")}
    return {
        **totals,
        "peak_gflops": peak,
        "peak_precision": peak_precision,
        "peak_gflops_fp32": peak_gflops_fp32,
        "peak_gflops_bf16": peak_gflops_bf16,
        "gmacs_total": sum(
            w["gmacs"] * (TRAIN_PASSES * w["train_images"] + w["eval_images"] + w["encode_images"]) for w in works
        ),
        "per_run_s": [run["floor_s"] for run in per_run],
    }
