"""Continual learning: sequential prompt tuning vs null-space prompts (NSP2, the official recipe) vs joint
training, on the generated 30-class textures (5 tasks of 6 classes, class order shuffled per seed), with
the offline DINOv2 ViT-S/14. Prints a markdown section and writes it into docs/results.md (only the
section "## Continual learning").

    python benchmarks/continual_nsp2.py                          # the full run: 3 seeds, 112 px, 20 epochs
    python benchmarks/continual_nsp2.py --seeds 0 --resolution 56 --epochs 4 --shots 16   # a reduced run

ELPV is not benchmarked here: 4 ordinal classes make at most 2 tasks of 2 classes, where the old heads'
logit scale decides most of the measured forgetting (`continual.ELPV_NOTE`).
Runs go into their own run store (default: <data dir>/benchmarks/continual.sqlite); finished runs with
the same configuration are reused, so an interrupted benchmark resumes.

    python benchmarks/continual_nsp2.py --profile --seeds 0 --epochs 1   # where the time goes; estimate at 20 epochs

Where the time goes (measured 2026-11-26 on the 2-core AMD EPYC, load average 5-7 from other jobs, two of
them niced background benchmarks; the times are indicative, the ratios were measured back to back):
- Threads decided everything. With torch's default of 2 threads on 2 shared cores every parallel op
  waits for the slower thread, and a core is often busy elsewhere: a training step at 56 px, batch 8
  took 1.8-3.0 s with 2 threads and 0.27 s with 1 (interleaved in one process); at 112 px, batch 32,
  7.4-7.6 s and 3.2-3.6 s; a 384 x 384 float64 eigh (the NSP2 projector) 150-170 ms and 36-51 ms.
  With only the two niced jobs running (load average 3.5) 2 threads still lost: 4.3-5.4 s against
  2.2-2.5 s at 112 px, 0.6-1.4 s against 0.19 s at 56 px.
  So the benchmark runs with 1 thread (--threads). Threads change no figure beyond float rounding.
- Evaluation after each task runs only the seen tasks' test images (the later tasks' images entered no
  metric), and the final nearest-class-mean accuracy reuses the last evaluation's test features.
  With 1 thread the figures are bit-identical to the earlier code's; with 2 threads only the feature
  drift differs, by about 1e-7 (relative).
- Not worth changing: the projectors (eigh per block and task: about 1 s a run), the augmentation
  (under 1 % of a step) and the null-space statistics (about 4 % of an NSP2 run at 112 px). A training
  step is matrix products (aten::addmm and aten::mm: 78 % of a 112 px step), so the rest is training.
- The reduced run of the stored section (--seeds 0 --resolution 56 --epochs 1 --shots 8 --batch-size 8
  --max-test 5): sequential / NSP2 / joint took 110 / 112 / 44 s with the earlier code and 2 threads,
  17 / 21 / 14 s now (back to back, load average 6-7).
- The default run, from `--profile --seeds 0 --epochs 1` extrapolated to 20 epochs (only the training
  steps grow with the epochs; data, evaluation, NCM, null-space statistics and projectors do not):
  2.1 s per step of batch 32 at 112 px with 1 thread (load average 5); sequential 600 steps, 23 min a
  run; NSP2 600 steps, 24 min; joint 580 steps, 22.5 min: about 70 min for one seed of the three, 3.5 h
  for the default 3 seeds. Training steps are 88-94 % of each estimate. At another moment (load average
  7) the same step took 3.2-3.6 s, which would make one seed about 105 min.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import checkpoint_in, checkpoint_out, machine, today, write_section  # noqa: E402
from vptdash.engine import paths  # noqa: E402
from vptdash.methods import continual  # noqa: E402
from vptdash.methods.continual import ContinualConfig  # noqa: E402
from vptdash.runs.store import RunStore  # noqa: E402
from vptdash.views import stats  # noqa: E402

HEADING = "## Continual learning"
DATASET = "textures-30"
# Finished runs travel with the repository (a machine's data dir does not outlive it), so the seeds of
# the faithful recipe, about half an hour each per method, can be added over several sessions.
CHECKPOINT = Path(__file__).resolve().parent / "data" / "continual_runs.json"
# The paper (ViT-B/16 IN-21k, 10-split CIFAR-100): sequential VPT 87.3 / 12.3, NSP2 91.7 / 3.3.
PAPER_SEQ_FORGETTING, PAPER_NSP_FORGETTING = 12.3, 3.3
PAPER = (
    "NSP2 paper (ViT-B/16 IN-21k, 10 tasks of 10 classes): forgetting 12.3 → 3.3 points on CIFAR-100 "
    "(−73 %), 19.4 → 5.1 on ImageNet-R (−74 %)"
)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# A finished run is reused only if it measured these (runs of older code did not: they are trained again,
# and kept in the store).
MEASURED = ("ncm_task_il_matrix",)


def benchmark_config(**overrides) -> ContinualConfig:
    """The benchmark's configuration (official recipe, textures-30, 5 tasks, 30 images per class, 112 px),
    with `overrides` (method, seed, resolution, ...)."""
    values = dict(
        backbone="dinov2_s14",
        dataset=DATASET,
        tasks=5,
        shots=30,
        resolution=112,
        epochs=continual.RECIPES["official"]["epochs"],
        batch_size=32,
        max_test_per_class=None,
        lr=1e-2,
        weight_decay=1e-4,
        precision="fp32",
    )
    return continual.recipe_config("official", **{**values, **overrides})


def train_and_record(store: RunStore, config: ContinualConfig, sweep_id: str, loads: list[float], echo=None) -> dict:
    """Train `config` now; a finished run records where it ran (machine, load average at its end, also
    appended to `loads`), and the checkpoint is exported, so the run travels with the repository."""
    row = continual.run_continual_now(store, config, sweep_id=sweep_id, echo=echo)
    loads.append(os.getloadavg()[0])
    if row["status"] == "done":
        store.update_results(row["id"], timings={"machine": machine(), "load_average_end": loads[-1]})
        row = store.get_run(row["id"])
    checkpoint_out(store, CHECKPOINT, kind=continual.KIND)
    if row["status"] != "done":
        log(f"  {row['status']}: {row.get('error')}")
    return row


def finished(store: RunStore, config: ContinualConfig, *, any_code: bool = False) -> dict | None:
    """The newest finished run of `config` that measured everything the section shows; with `any_code`,
    failing that, the newest of any code version (its missing figures print as n/a)."""
    wanted = config.to_dict()
    same = [
        row
        for row in store.list_runs(status="done", kind=continual.KIND)
        if all(row["config"].get(k) == v for k, v in wanted.items())
    ]
    same.sort(key=lambda row: row["created_at"], reverse=True)
    complete = [row for row in same if all(row["metrics"].get(key) is not None for key in MEASURED)]
    if complete:
        return complete[0]
    return same[0] if any_code and same else None


def interval(values: list[float | None], scale: float = 100.0, *, accuracy: bool = True) -> str:
    """mean [95 % t-interval over seeds] (`stats.mean_interval`); the mean alone for one seed (no interval:
    say so). An accuracy's interval is cut at 0 and 100 % (a t-interval over 3 seeds near 100 % reaches past
    what can happen); a forgetting (best earlier minus final: negative when a task improved later) is not."""
    found = stats.mean_interval([v for v in values if v is not None], bounds=(0.0, 1.0) if accuracy else None)
    if 0 < found.n < len(values):  # runs of older code did not measure it
        measured = [v for v in values if v is not None]
        shown = f"{scale * found.mean:.1f}" if found.n < 2 else interval(measured, scale, accuracy=accuracy)
        return f"{shown} ({found.n} of {len(values)} runs)"
    if found.n == 0:
        return "n/a"
    if found.n < 2:
        return f"{scale * found.mean:.1f} (1 seed)"
    return f"{scale * found.mean:.1f} [{scale * found.low:.1f}, {scale * found.high:.1f}]"


def paired_interval(a: list[float], b: list[float], scale: float = 100.0) -> tuple[float, float | None]:
    """Mean of a - b over seeds (same seed = same class order and images) and its 95 % half-width."""
    found = stats.mean_interval([x - y for x, y in zip(a, b) if x is not None and y is not None])
    if found.n < 2:
        return scale * found.mean, None
    return scale * found.mean, scale * (found.high - found.mean)


def metric(rows: list[dict], key: str) -> list[float | None]:
    return [r["metrics"].get(key) for r in sorted(rows, key=lambda r: r["config"]["seed"])]


def matrix_text(matrix) -> str:
    return "[" + "; ".join(" ".join("—" if v is None else f"{100 * v:.0f}" for v in row) for row in matrix) + "]"


def observations(by_method: dict[str, list[dict]]) -> list[str]:
    """What the table says, as sentences computed from it (so a rerun cannot leave stale prose)."""
    seq, nsp, joint = by_method.get("sequential") or [], by_method.get("nsp2") or [], by_method.get("joint") or []
    if not seq or not nsp:
        return []
    seeds = len(seq)
    lines = []
    f_seq, f_nsp = metric(seq, "forgetting"), metric(nsp, "forgetting")
    diff, half = paired_interval(f_nsp, f_seq)
    m_seq, m_nsp = 100 * float(np.mean(f_seq)), 100 * float(np.mean(f_nsp))
    noise = "" if half is None else f" (95 % interval of the paired difference ±{half:.1f})"
    within = half is not None and abs(diff) <= half
    reduction = f"{100 * (m_nsp / m_seq - 1):+.0f} %" if m_seq > 0.5 else "n/a: sequential hardly forgets"
    paper = 100 * (PAPER_NSP_FORGETTING / PAPER_SEQ_FORGETTING - 1)
    verdict = (
        "within noise: this run cannot tell them apart"
        if within
        else "one seed: no interval, so no verdict beyond this seed"
        if half is None
        else "outside the seeds' noise"
    )
    lines.append(
        f"- Class-incremental forgetting, NSP2 vs sequential: {m_nsp:.1f} vs {m_seq:.1f} points, "
        f"NSP2 − sequential = {diff:+.1f}{noise}, {verdict}. Relative change {reduction}; the paper's is "
        f"{paper:.0f} % ({PAPER_SEQ_FORGETTING} → {PAPER_NSP_FORGETTING})."
    )
    a_seq, a_nsp = metric(seq, "avg_accuracy"), metric(nsp, "avg_accuracy")
    diff, half = paired_interval(a_nsp, a_seq)
    lines.append(
        f"- Final class-incremental accuracy, NSP2 − sequential: {diff:+.1f} points"
        + (f" (±{half:.1f})" if half is not None else " (one seed)")
        + (f"; joint training reaches {100 * np.mean(metric(joint, 'avg_accuracy')):.1f}." if joint else ".")
    )
    t_seq, t_nsp = metric(seq, "forgetting_task_il"), metric(nsp, "forgetting_task_il")
    lines.append(
        f"- With the task given, forgetting is {100 * np.mean(t_nsp):.1f} (NSP2) vs {100 * np.mean(t_seq):.1f} "
        "(sequential) points: what the prompts themselves lost for old tasks; the rest of the class-incremental "
        "forgetting is old images assigned to newer classes by heads that never saw them together."
    )
    for name, entries in (("sequential", seq), ("NSP2", nsp), ("joint", joint)):
        if not entries:
            continue
        before = 100 * float(np.mean(metric(entries, "ncm_accuracy_initial")))
        after = 100 * float(np.mean(metric(entries, "ncm_accuracy")))
        lines.append(
            f"- Nearest-class-mean accuracy over all {len(entries[0]['metrics']['class_names'])} classes, "
            f"{name}: {before:.1f} with untrained prompts → {after:.1f} after the last task ({after - before:+.1f})."
        )
    n_seq, n_nsp = metric(seq, "ncm_forgetting_task_il"), metric(nsp, "ncm_forgetting_task_il")
    if all(v is not None for v in n_seq + n_nsp):
        seq_drop = stats.mean_interval(n_seq)
        diff, half = paired_interval(n_nsp, n_seq)
        seq_verdict = (
            "one seed: no interval"
            if seq_drop.n < 2
            else "a measurable drop (its 95 % interval excludes 0)"
            if seq_drop.low > 0
            else "not distinguishable from no drop (its 95 % interval includes 0)"
        )
        lines.append(
            "- Features, task given (nearest class mean among each old task's own classes, no head), from right "
            f"after the task was learned to after the last task: sequential loses {interval(n_seq, accuracy=False)} "
            f"points, {seq_verdict}; NSP2 {interval(n_nsp, accuracy=False)}; NSP2 − sequential {diff:+.1f}"
            + (f" (±{half:.1f})." if half is not None else " (one seed).")
        )
    l_seq, l_nsp = metric(seq, "learning_accuracy"), metric(nsp, "learning_accuracy")
    lines.append(
        f"- Learning accuracy (each task right after it was learned, class-incremental): NSP2 "
        f"{100 * np.mean(l_nsp):.1f} vs sequential {100 * np.mean(l_seq):.1f}"
        + (": the projection also limits what new tasks learn." if np.mean(l_nsp) < np.mean(l_seq) - 0.05 else ".")
    )
    lines.append(f"- Seeds: {seeds} per method.")
    return lines


def section(
    rows: list[dict],
    settings: dict,
    command: str,
    wall_minutes: float,
    loads: list[float],
    *,
    stored_only: bool = False,
) -> list[str]:
    by_method = {m: [r for r in rows if r["config"]["method"] == m] for m in continual.METHODS}
    example = rows[0]
    trained_on = sorted({r["timings"].get("machine") or "not recorded" for r in rows})
    lines = [
        (
            f"Written on {today()} from the finished runs (`--stored-only`: nothing trained in this invocation). "
            f"Trained on: {'; '.join(trained_on)}, one thread each beside other jobs: times are indicative."
            if stored_only
            else f"Machine: {machine()}, shared with other developers' jobs (load average {min(loads):.0f}–"
            f"{max(loads):.0f} on 2 cores while it ran: times are indicative). Date: {today()}."
        ),
        f"Command: `{command}` ({len(rows)} runs, {wall_minutes:.0f} min of wall time in this invocation; finished "
        "runs in the benchmark's store are reused).",
        "Seeds finished: "
        + "; ".join(
            f"{continual.METHOD_LABELS[m].split(' (')[0]} {', '.join(str(r['config']['seed']) for r in entries)}"
            for m, entries in by_method.items()
            if entries
        )
        + ".",
        "",
        f"Settings: generated `{DATASET}` (10 patterns × 3 scales; {' / '.join(map(str, example['metrics']['test_sizes']))} "
        f"test images per task), {settings['tasks']} tasks of 6 classes in an order shuffled per seed, "
        f"{settings['shots']} training images per class, offline DINOv2 ViT-S/14 at {settings['resolution']} px. "
        f"Official NSP2 recipe (`recipe='official'`): {settings['num_prompts']} prompts in every block, init "
        f"uniform(−1, 1), logits / {settings['temperature']:g} in the loss, random resized crop + flip every step, "
        f"AdamW lr {settings['lr']:g} with a warm-up epoch and cosine decay, {settings['epochs']} epochs per task "
        f"(batch {settings['batch_size']}: {settings['epochs'] * -(-settings['shots'] * 6 // settings['batch_size'])} "
        "steps; the paper trains about 2,000), projectors blended with eta = 0.97 and divided by their "
        "Frobenius norm, LayerNorm consistency loss. Joint: one training on all tasks' images for the same "
        "number of epochs.",
        "",
        "Columns in % (mean [95 % t-interval over seeds], accuracies' intervals cut at 0 and 100): *avg accuracy* after the last task, class-incremental; "
        "*forgetting*: mean over old tasks of best earlier minus final accuracy; *task given*: prediction among "
        "the task's own classes; *learning*: each task right after it was learned; *NCM*: nearest-class-mean "
        "accuracy over all classes on the pooled features (no head), with untrained prompts and after the last task; "
        "*features*: nearest class mean among each task's own classes, measured after every task (right after "
        "learning, after the last task, and the forgetting between them).",
        "",
        "| method | avg accuracy | forgetting | task given: avg | task given: forgetting | learning | NCM before | "
        "NCM after | features: right after | features: after last | features: forgetting | minutes per run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, entries in by_method.items():
        if not entries:
            continue
        lines.append(
            f"| {continual.METHOD_LABELS[method]} | {interval(metric(entries, 'avg_accuracy'))} | "
            f"{interval(metric(entries, 'forgetting'), accuracy=False)} | {interval(metric(entries, 'avg_accuracy_task_il'))} | "
            f"{interval(metric(entries, 'forgetting_task_il'), accuracy=False)} | "
            f"{interval(metric(entries, 'learning_accuracy')) if method != 'joint' else '—'} | "
            f"{interval(metric(entries, 'ncm_accuracy_initial'))} | {interval(metric(entries, 'ncm_accuracy'))} | "
            f"{interval(metric(entries, 'ncm_learning_task_il')) if method != 'joint' else '—'} | "
            f"{interval(metric(entries, 'avg_ncm_task_il'))} | "
            f"{interval(metric(entries, 'ncm_forgetting_task_il'), accuracy=False) if method != 'joint' else '—'} | "
            f"{np.mean([r['timings']['train_seconds'] for r in entries]) / 60:.1f} |"
        )
    lines += ["", *observations(by_method), ""]
    lines.append(
        "Mean accuracy matrices (rows: after task i, columns: task j, %, class-incremental): "
        + ", ".join(
            f"{continual.METHOD_LABELS[m].split(' (')[0]} {matrix_text(continual.mean_matrix(entries))}"
            for m, entries in by_method.items()
            if entries and m != "joint"
        )
        + "."
    )
    nullity = [n for r in by_method["nsp2"] for n in r["metrics"]["nullity"]]
    if nullity:
        k1 = [k[0] for n in nullity for k in n["blocks"].values()]
        k2 = [k[1] for n in nullity for k in n["blocks"].values()]
        dims = next(iter(nullity[0]["dims"].values()))
        lines += [
            "",
            f"NSP2 nullity at the elbow, per prompted block and task: {min(k1)}–{max(k1)} of {dims[0]} "
            f"(affinity condition), {min(k2)}–{max(k2)} of {dims[1]} (aggregation condition).",
        ]
    lines += ["", PAPER + ".", ""]
    return lines


def profile(configs: list[ContinualConfig], target_epochs: int) -> int:
    """Each configuration run once, in this process and outside any store: seconds per phase, and the
    same run estimated at `target_epochs` epochs per task. Only the training phases ("inputs": augmented
    images and their patch embedding, "train": forward, backward, projected step) grow with the epochs:
    every epoch runs the same steps on the same number of images. Data, encoding, evaluation, NCM, the
    null-space statistics and the projectors are per task or per run, so they stay as measured."""
    log(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start")
    total_estimate = 0.0
    phases_order = ("data", "encode", "ncm", "inputs", "train", "null_space", "projectors", "evaluate")
    print("| run | steps | s/step | " + " | ".join(phases_order) + f" | total s | est. s at {target_epochs} epochs |")
    print("|---|---|---|" + "---|" * len(phases_order) + "---|---|")
    for config in configs:
        result = continual.run_continual(config)
        timings, phases = result.timings, result.timings["phases"]
        growing = phases.get("inputs", 0.0) + phases.get("train", 0.0)
        estimate = timings["train_seconds"] + growing * (target_epochs / config.epochs - 1)
        total_estimate += estimate
        steps = max(1, timings["steps"])
        print(
            f"| {config.method} seed {config.seed} | {timings['steps']} | {growing / steps:.3f} | "
            + " | ".join(f"{phases.get(name, 0.0):.1f}" for name in phases_order)
            + f" | {timings['train_seconds']:.1f} | {estimate:.0f} |",
            flush=True,
        )
    print(
        f"\nEstimated total at {target_epochs} epochs per task: {total_estimate / 60:.1f} min for "
        f"{len(configs)} runs ({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end)."
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(continual.METHODS))
    parser.add_argument("--resolution", type=int, default=112)
    parser.add_argument("--epochs", type=int, default=continual.RECIPES["official"]["epochs"])
    parser.add_argument("--shots", type=int, default=30, help="training images per class (the set has 30)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-test", type=int, default=None, help="test images per class (default: all 10)")
    parser.add_argument("--store", default=str(paths.data_dir() / "benchmarks" / "continual.sqlite"))
    parser.add_argument("--no-write", action="store_true", help="print the section, do not touch docs/results.md")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine 2 threads ran 2-10x slower, see the docstring)",
    )
    parser.add_argument(
        "--stored-only",
        action="store_true",
        help="train nothing: write the section from the asked runs that have finished (store or checkpoint)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run each configuration once outside the store, print where its time went and an estimate "
        "of the same run at --profile-epochs; touches neither the store nor the docs",
    )
    parser.add_argument(
        "--profile-epochs",
        type=int,
        default=continual.RECIPES["official"]["epochs"],
        help="epochs per task the --profile estimate extrapolates to (default: the official recipe's)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    base = benchmark_config(
        shots=args.shots,
        resolution=args.resolution,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_test_per_class=args.max_test,
    )
    settings = base.to_dict()
    if args.profile:
        return profile(continual.continual_configs(base, methods, seeds), args.profile_epochs)
    Path(args.store).parent.mkdir(parents=True, exist_ok=True)
    store = RunStore(args.store)
    checkpoint_in(store, CHECKPOINT)
    rows, loads, started = [], [os.getloadavg()[0]], time.perf_counter()
    for config in continual.continual_configs(base, methods, seeds):
        row = finished(store, config, any_code=args.stored_only)
        if row is None and args.stored_only:
            log(f"{config.label()}: not finished yet, left out")
            continue
        if row is None:
            log(f"{config.label()} ...")
            last = [0.0]

            def echo(event: dict) -> None:
                if event.get("phase") == "task" or time.perf_counter() - last[0] > 60:
                    last[0] = time.perf_counter()
                    log(
                        f"  {event.get('phase')} task {event.get('task')} step {event.get('step')}/{event.get('total_steps')}"
                    )

            row = train_and_record(store, config, f"bench-{DATASET}", loads, echo=echo)
            if row["status"] != "done":
                return 1
        m = row["metrics"]
        log(
            f"  {config.method} seed {config.seed}: avg {m['avg_accuracy']:.3f}, forgetting {m['forgetting']}, "
            f"NCM {m['ncm_accuracy_initial']:.3f} -> {m['ncm_accuracy']:.3f}, {row['timings']['train_seconds'] / 60:.1f} min"
        )
        rows.append(row)
    command = "python benchmarks/continual_nsp2.py" + "".join(
        f" --{flag} {value}"
        for flag, value, default in (
            ("seeds", args.seeds, "0,1,2"),
            ("resolution", args.resolution, 112),
            ("epochs", args.epochs, continual.RECIPES["official"]["epochs"]),
            ("shots", args.shots, 30),
            ("batch-size", args.batch_size, 32),
            ("max-test", args.max_test, None),
        )
        if value != default
    )
    unpaired: list[dict] = []
    if args.stored_only:
        command += " --stored-only"
        # Comparisons pair methods seed by seed: only seeds every asked method has finished are shown.
        complete = set.intersection(
            *({r["config"]["seed"] for r in rows if r["config"]["method"] == m} for m in methods)
        )
        unpaired = [r for r in rows if r["config"]["seed"] not in complete]
        rows = [r for r in rows if r["config"]["seed"] in complete]
        if not rows:
            log("no seed has finished for every method: nothing to write")
            return 1
    body = section(rows, settings, command, (time.perf_counter() - started) / 60, loads, stored_only=args.stored_only)
    if unpaired:
        body.insert(
            3,
            "Also finished, left out until every method has its seed: "
            + "; ".join(
                f"{continual.METHOD_LABELS[r['config']['method']].split(' (')[0]} seed {r['config']['seed']}"
                for r in unpaired
            )
            + ".",
        )
    text = HEADING + "\n\n" + "\n".join(body)
    print(text)
    if not args.no_write:
        write_section(HEADING, "\n".join(body))
        log("wrote docs/results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
