"""When would `torch.compile` pay for a training step? Measured, not assumed.

    python benchmarks/compile_step.py                 # batches 8, 16, 32 in the precision this machine
                                                      # trains in, plus fp32 at batch 32; about 8 minutes
    python benchmarks/compile_step.py --batches 32 --precisions bf16

For each (batch, precision) two fresh child processes train the engine's standard configuration
(dinov2_s14, 112 px, 10 deep prompts, the step `vptdash.bench` times) from cached patch tokens:
- the first with an empty inductor cache: `torch.compile` of `forward_from_frozen`, the seconds of the
  compile and first step ("cold"), then eager and compiled steps interleaved (median of each);
- the second with the cache the first filled: the compile as a second run on the same machine pays it.
It also reports how far the compiled logits are from eager ones (same weights, same input).

From those, the steps a run must train before the compile has paid for itself (compile seconds /
seconds saved per step), beside the steps the dashboard's runs train: the meeting demo's runs (16 images
per class) and the shipped reference's at 64 per class and on the full split, learning-rate search
included (`train.search_cost_factor`). Results are kept per machine in
`benchmarks/data/compile_runs.json`; the section "## torch.compile: when it would pay" of
docs/performance.md is written from that file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, machine, today, write_section  # noqa: E402

RUNS = ROOT / "benchmarks" / "data" / "compile_runs.json"
PERFORMANCE_MD = ROOT / "docs" / "performance.md"
HEADING = "## torch.compile: when it would pay"


def child(batch: int, precision: str, threads: int, steps: int) -> dict:
    """One process: compile, then eager and compiled steps interleaved. Prints nothing but its JSON."""
    import torch

    from vptdash.bench import timed_step
    from vptdash.engine.backbones import load_backbone
    from vptdash.engine.compiled import compile_forward
    from vptdash.engine.prompts import PromptedViT
    from vptdash.engine.train import training_precision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    backbone = load_backbone("dinov2_s14", None, 112)
    model = PromptedViT(backbone, 2, num_prompts=10, placement="deep", seed=0)
    images = torch.rand(batch, 3, 112, 112)
    labels = torch.randint(0, 2, (batch,))
    with torch.no_grad():
        encoded = model.encode_frozen(images).float()
    step = timed_step(model, encoded, labels, precision=precision)  # bench's engine step, one optimizer
    compiled = compile_forward(model.forward_from_frozen)  # as a long run compiles it
    compile_s = step(compiled)  # tracing, inductor's code generation and C++ builds, and the first step
    eager_times, compiled_times = [], []
    for _ in range(steps + 1):
        eager_times.append(step(model.forward_from_frozen))
        compiled_times.append(step(compiled))
    with torch.no_grad(), training_precision(model, precision):
        gap = float((compiled(encoded).float() - model.forward_from_frozen(encoded).float()).abs().max())
    return {
        "compile_and_first_step_s": compile_s,
        "eager_step_s": statistics.median(eager_times[1:]),
        "compiled_step_s": statistics.median(compiled_times[1:]),
        "max_abs_logit_gap": gap,
    }


def measure(batch: int, precision: str, threads: int, steps: int) -> dict:
    """Cold (empty inductor cache) then warm (the cache the cold run filled), each in a fresh process."""
    result = {"batch": batch, "precision": precision, "threads": threads}
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        for phase in ("cold", "warm"):
            command = [sys.executable, __file__, "--child", str(batch), precision, str(threads), str(steps)]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            result[phase] = json.loads(out.strip().splitlines()[-1])
            print(f"  batch {batch} {precision} {phase}: {result[phase]}", flush=True)
    return result


def dashboard_runs() -> list[tuple[str, int, int]]:
    """(what, batch, training steps with the learning-rate search) for the runs the dashboard trains."""
    from benchmarks.reference_sweep import reference_config
    from vptdash.engine import data
    from vptdash.engine.train import search_cost_factor
    from vptdash.runs.presets import demo_base

    demo = demo_base()
    runs = [("meeting demo run (16 per class, fixed rate)", demo)]
    for size, words in (
        ("16", "reference, 16 per class"),
        ("64", "reference, 64 per class"),
        ("full", "reference, full split"),
    ):
        runs.append((words, reference_config("elpv-binary", size, 10, "deep", 0)))
    out = []
    for words, config in runs:
        _, split = data.load_and_split(config)
        steps = math.ceil(len(split.train) / config.batch_size) * config.epochs * search_cost_factor(config)
        out.append((words, config.batch_size, round(steps)))
    return out


def machine_kind() -> str:
    """The CPU, what its bf16 speed depends on, and the precision setting (as `bench` keeps its results)."""
    from vptdash.engine.precision import cpu_description, machine_override

    cpu = cpu_description()
    flags = set(cpu.get("flags") or [])
    bf16 = "AMX" if any(f.startswith("amx") for f in flags) else "avx512_bf16" if "avx512_bf16" in flags else "no bf16"
    setting = machine_override()
    return f"{cpu.get('cpu')}, {bf16}" + (f", VPTDASH_PRECISION={setting}" if setting else "")


def keep(result: dict) -> list[dict]:
    """Append this machine's results, replacing the earlier ones of the same kind of machine."""
    stored = json.loads(RUNS.read_text())["runs"] if RUNS.exists() else []
    stored = [r for r in stored if r["kind"] != result["kind"]] + [result]
    RUNS.parent.mkdir(parents=True, exist_ok=True)
    RUNS.write_text(json.dumps({"runs": stored}, indent=1) + "\n")
    return stored


def break_even(row: dict, phase: str) -> float | None:
    saved = row["cold"]["eager_step_s"] - row["cold"]["compiled_step_s"]
    if saved <= 0:
        return None
    # The compile's own first step would have cost an eager step anyway.
    return (row[phase]["compile_and_first_step_s"] - row["cold"]["eager_step_s"]) / saved


def markdown(stored: list[dict]) -> str:
    lines = [
        f"Produced by `python benchmarks/compile_step.py` (results kept per machine in "
        f"`benchmarks/data/compile_runs.json`; this text written on {today()}). The engine's standard step "
        "(dinov2_s14, 112 px, 10 deep prompts, from cached patch tokens, as `bench` times it): "
        "`torch.compile(forward_from_frozen)` against eager, each (batch, precision) in two fresh processes, "
        "the first with an empty inductor cache (cold), the second reading what the first stored (warm). "
        "Step times are medians of eager and compiled steps interleaved in one process. Break-even: steps a "
        "run must train before the compile has paid for itself ((compile and first step - one eager step) / "
        "seconds saved per step).",
    ]
    for result in stored:
        lines += [
            "",
            f"### {result['kind']}",
            "",
            f"{result['machine']}; {result['date']}, {result['load']}; the dashboard's runs train: "
            + "; ".join(f"{what}: {steps} steps at batch {batch}" for what, batch, steps in result["runs"])
            + ".",
            "",
            "| batch | precision | eager step s | compiled step s | speedup | compile s cold / warm "
            "| break-even steps cold / warm | max logit gap |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in result["rows"]:
            cold, warm = row["cold"], row["warm"]
            speedup = cold["eager_step_s"] / cold["compiled_step_s"]
            even = [break_even(row, phase) for phase in ("cold", "warm")]
            even_text = " / ".join("never" if e is None else f"{e:.0f}" for e in even)
            lines.append(
                f"| {row['batch']} | {row['precision']} | {cold['eager_step_s']:.3f} | {cold['compiled_step_s']:.3f} "
                f"| {speedup:.2f}x | {cold['compile_and_first_step_s']:.1f} / {warm['compile_and_first_step_s']:.1f} "
                f"| {even_text} | {cold['max_abs_logit_gap']:.2g} |"
            )
        lines += ["", *verdicts(result)]
    return "\n".join(lines)


def verdicts(result: dict) -> list[str]:
    """Which of the dashboard's runs the compile would pay for, cold and warm, at their own batch."""
    rows = {(row["batch"], row["precision"]): row for row in result["rows"]}
    out = []
    for what, batch, steps in result["runs"]:
        row = rows.get((batch, result["trains_in"]))
        if row is None:
            continue
        parts = []
        for phase in ("cold", "warm"):
            even = break_even(row, phase)
            saved = row["cold"]["eager_step_s"] - row["cold"]["compiled_step_s"]
            net = steps * saved - (row[phase]["compile_and_first_step_s"] - row["cold"]["eager_step_s"])
            verdict = "never pays" if even is None else ("pays" if steps >= even else "does not pay")
            parts.append(f"{phase}: {verdict} ({round(net):+d} s for the run)")
        out.append(f"- {what}, {steps} steps at batch {batch} in {result['trains_in']}: " + "; ".join(parts) + ".")
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        batch, precision, threads, steps = sys.argv[2:6]
        print(json.dumps(child(int(batch), precision, int(threads), int(steps))))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="8,16,32")
    parser.add_argument("--precisions", default="auto", help="comma-separated; auto: what this machine trains in")
    parser.add_argument("--fp32-batch", type=int, default=32, help="also time fp32 at this batch (0: no)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--from-stored", action="store_true", help="only rewrite the section from the file")
    args = parser.parse_args()
    if not args.from_stored:
        from vptdash.engine.precision import block_shapes, choose_precision

        # What "auto" trains the standard step in here (10 deep prompts: 65 + 10 tokens at 112 px, batch 32).
        trains_in = choose_precision("auto", block_shapes(32 * 75, 384, 1536)).precision
        precisions = [trains_in if p == "auto" else p for p in args.precisions.split(",")]
        plan = [(int(b), p) for p in precisions for b in args.batches.split(",")]
        if args.fp32_batch and (args.fp32_batch, "fp32") not in plan:
            plan.append((args.fp32_batch, "fp32"))
        load = f"load average {os.getloadavg()[0]:.1f} at the start"
        text = machine()
        print(f"# {text}; {load}", flush=True)
        rows = [measure(batch, precision, args.threads, args.steps) for batch, precision in plan]
        result = {
            "kind": machine_kind(),
            "machine": text,
            "date": today(),
            "load": f"{load}, {os.getloadavg()[0]:.1f} at the end, {args.threads} threads",
            "trains_in": trains_in,
            "runs": dashboard_runs(),
            "rows": rows,
        }
        stored = keep(result)
    else:
        stored = json.loads(RUNS.read_text())["runs"]
    write_section(HEADING, markdown(stored), PERFORMANCE_MD)
    print(markdown(stored))


if __name__ == "__main__":
    main()
