"""The reference shipped with the app, on the recipe that chooses on validation: resumable, machine recorded.

Grid: ELPV binary and 4-class x 16 and 64 images per class and the whole training split x the linear
probe and 1, 5, 10, 50 prompts shallow and deep x seeds 0, 1, 2 (162 runs). Learning rates are "auto"
(each configuration's own, chosen on the validation split by successive halving); the probe is the
converged logistic regression. Each finished run is appended to a checkpoint JSON (atomic rewrite), so
a stopped sweep loses at most the run in progress and `--resume` continues with the next one. Every
run records the machine it ran on (CPU model, its bf16/AMX flags, threads, load average) and the date.

    python benchmarks/reference_sweep.py --resume                         # the whole grid (CPU hours)
    python benchmarks/reference_sweep.py --resume --datasets elpv-binary --sizes 16 --prompts 0,10 \\
        --placements deep --seeds 0                                       # a slice
    python benchmarks/reference_sweep.py --write-reference                # ship what the checkpoint holds
    python benchmarks/reference_sweep.py --write-docs                     # its sections of docs/results.md

`--write-reference` writes vptdash/runs/reference/elpv_reference_v2.json (the loader prefers it to the
older 16-shot file) and, for the runs named by SHIP_ARTIFACTS, their trained prompts and head as
safetensors beside it, so the Attention page has trained runs on a fresh install. With
`--examples-only` it writes only those runs, to elpv_trained_examples.json, which the app loads beside
whichever reference ships (for use before the whole grid has run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from benchmarks.common import write_section  # noqa: E402
from vptdash.engine import paths  # noqa: E402
from vptdash.engine.train import RunConfig, run_training, search_cost_factor  # noqa: E402
from vptdash.runs import reference  # noqa: E402
from vptdash.runs.jobs import kind_of  # noqa: E402
from vptdash.views import budget  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "benchmarks" / "data" / "reference_sweep_runs.json"


def artifact_cache():
    """Every run's trained state, kept out of the repository (a full grid's is about 50 MB) under the
    data dir; --write-reference copies the few that ship."""
    return paths.data_dir() / "reference_sweep_artifacts"


RECIPE_NAME = "lr-auto-v1"

DATASETS = ("elpv-binary", "elpv")
SIZES = ("16", "64", "full")
COUNTS = (0, 1, 5, 10, 50)
PLACEMENTS = ("shallow", "deep")
SEEDS = (0, 1, 2)
# Per data size: epochs and batch. Few-shot sets are small, so more passes at a small batch; the whole
# training split (about 1,700 images) gets 10 epochs at batch 32 (530 steps).
SCHEDULE = {"16": (20, 8), "64": (20, 16), "full": (10, 32)}
# The runs whose prompts and head ship with the app (a few hundred KiB in all).
SHIP_ARTIFACTS = (
    {"dataset": "elpv-binary", "shots": 16, "num_prompts": 10, "placement": "deep", "seed": 0},
    {"dataset": "elpv-binary", "shots": 16, "num_prompts": 10, "placement": "shallow", "seed": 0},
)


def reference_config(dataset: str, size: str, count: int, placement: str, seed: int) -> RunConfig:
    epochs, batch = SCHEDULE[size]
    values = dict(
        backbone="dinov2_s14",
        dataset=dataset,
        shots=None if size == "full" else int(size),
        resolution=112,
        epochs=epochs,
        batch_size=batch,
        lr="auto",
        precision="bf16",
        val_fraction=0.1,
        seed=seed,
        measure_latency=False,
    )
    if count == 0:
        values.update(tuning="linear", num_prompts=0, placement="none")
    else:
        values.update(tuning="prompt", num_prompts=count, placement=placement)
    return RunConfig(**values)


def grid(datasets, sizes, counts, placements, seeds) -> list[RunConfig]:
    configs, seen = [], set()
    for dataset, size, seed, count, placement in itertools.product(datasets, sizes, seeds, counts, placements):
        config = reference_config(dataset, size, count, placement, seed)
        key = run_key(config)
        if key not in seen:
            seen.add(key)
            configs.append(config)
    return configs


def run_key(config: RunConfig) -> str:
    payload = json.dumps([RECIPE_NAME, config.to_dict()], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def machine() -> dict:
    """What the run's speed and numerics depend on: CPU model and the flags bf16 matmuls use, threads, load."""
    cpu, flags = platform.processor() or "cpu", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("cpu", platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512f", "avx2"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "flags": wanted,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def read_checkpoint(path: Path) -> dict:
    if not path.is_file():
        return {"meta": {"recipe": RECIPE_NAME}, "runs": []}
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, path)  # a stop at any moment leaves the old checkpoint or the new one


def run_one(config: RunConfig) -> dict:
    """Train one configuration; the row in the shape `RunStore.import_runs` takes."""
    events: list[dict] = []
    started_at = time.time()
    at_start = machine()

    def keep(event: dict) -> None:  # the validation curve and the outcome, not every step
        if event.get("phase") in ("val", "test"):
            events.append(event)

    result = run_training(config, on_event=keep, compute_costs=True, measure_latency=False)
    key = run_key(config)
    cache = artifact_cache()
    cache.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().clone() for name, t in result.trainable_state.items()}
    save_file(state, str(cache / f"{key[:24]}.safetensors"), metadata={"class_names": ",".join(result.class_names)})
    return {
        "config": config.to_dict(),
        "status": result.status,
        "kind": kind_of(config),
        "sweep_id": f"reference-{RECIPE_NAME}",
        "metrics": result.metrics,
        "costs": result.costs,
        "timings": {**result.timings, "machine": at_start, "search_cost_factor": search_cost_factor(config)},
        "created_at": started_at,
        "started_at": started_at,
        "finished_at": time.time(),
        "progress": events,
        "dedupe_key": key,
    }


def sweep(configs: list[RunConfig], checkpoint: Path, *, resume: bool) -> dict:
    content = read_checkpoint(checkpoint)
    if content["runs"] and not resume:
        raise SystemExit(
            f"error: {checkpoint} already holds {len(content['runs'])} runs: pass --resume to continue, "
            "or move the file away to start over"
        )
    done = {row["dedupe_key"] for row in content["runs"]}
    todo = [c for c in configs if run_key(c) not in done]
    print(
        f"{len(configs) - len(todo)} of {len(configs)} runs already in {checkpoint.name}; {len(todo)} to go", flush=True
    )
    for position, config in enumerate(todo, 1):
        size = "full split" if config.shots is None else f"{config.shots} shots"
        label = f"{config.dataset}, {size}, {config.label()}, seed {config.seed}"
        if run_key(config) in {row["dedupe_key"] for row in read_checkpoint(checkpoint)["runs"]}:
            print(f"[{position}/{len(todo)}] {label}: finished meanwhile by another sweep, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        row = run_one(config)
        seconds = time.perf_counter() - t0
        content = read_checkpoint(checkpoint)  # re-read: nothing another writer added is lost
        content["runs"] = [r for r in content["runs"] if r["dedupe_key"] != row["dedupe_key"]] + [row]
        content["meta"].setdefault("machines", [])
        content["meta"]["machines"].append(row["timings"]["machine"])
        write_json(checkpoint, content)
        metrics = row["metrics"]
        chosen = f"lr {metrics['lr']:g}" if metrics.get("lr") is not None else f"L2 {metrics.get('l2')}"
        print(
            f"[{position}/{len(todo)}] {label}: test acc {100 * metrics['accuracy']:.1f}% "
            f"(balanced {100 * metrics['balanced_accuracy']:.1f}%), {chosen} ({metrics['lr_source']}), "
            f"collapsed {metrics['collapsed']}, {seconds:.0f} s",
            flush=True,
        )
    return read_checkpoint(checkpoint)


def matches(config: dict, wanted: dict) -> bool:
    return all(config.get(k) == v for k, v in wanted.items())


def write_reference(checkpoint: Path, *, examples_only: bool = False) -> None:
    """The shipped file from the checkpoint's finished runs, and the artifacts of SHIP_ARTIFACTS beside it.

    examples_only: write only the runs whose trained prompts ship (to the examples file, which the app
    loads beside whichever reference it ships), so the Attention page works before the whole grid is done
    without a partial grid replacing the older reference on the Budget explorer."""
    content = read_checkpoint(checkpoint)
    runs = [dict(row) for row in content["runs"] if row["status"] == "done"]
    if not runs:
        raise SystemExit(f"error: {checkpoint} holds no finished runs")
    folder = reference.ARTIFACT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for row in runs:
        if any(matches(row["config"], wanted) for wanted in SHIP_ARTIFACTS):
            name = f"{row['dedupe_key'][:24]}.safetensors"
            source = artifact_cache() / name
            if source.is_file():
                state = load_file(str(source))
                save_file(state, str(folder / name), metadata={"class_names": ",".join(row["metrics"]["class_names"])})
            elif not (folder / name).is_file():  # trained on another machine, and never shipped
                print(f"no trained state kept for {row['config']['num_prompts']} {row['config']['placement']}")
                continue
            row["artifact"] = name  # shipped before, from the machine that trained it: it stays
    if examples_only:
        runs = [row for row in runs if "artifact" in row]
    machines = content["meta"].get("machines") or []
    meta = {
        "command": "python benchmarks/reference_sweep.py --resume ... then --write-reference"
        + (" --examples-only" if examples_only else ""),
        "recipe": f"{RECIPE_NAME}: lr chosen per configuration on the validation split (successive halving "
        "over AdamW 3e-4, 1e-3, 3e-3, 1e-2); linear probe = L-BFGS logistic regression, L2 chosen on validation; "
        "bf16, 112 px, val 10%, test = stratified 25% (656 images)",
        "machine": machines[-1] if machines else machine(),
        "machines": sorted({json.dumps({k: m.get(k) for k in ("cpu", "flags", "cores", "gpu")}) for m in machines}),
        "date": _dt.date.today().isoformat(),
        "note": "ELPV (binary: defective if p > 0.5; and 4 classes), offline DINOv2 ViT-S/14. ELPV: CC BY-NC-SA 4.0.",
    }
    path = reference.EXAMPLES_FILE if examples_only else reference.REFERENCE_V2_FILE
    write_json(path, {"meta": meta, "runs": runs})
    shipped = sum("artifact" in row for row in runs)
    print(f"wrote {len(runs)} runs to {path} ({path.stat().st_size / 1024:.0f} KiB), {shipped} with trained prompts")


# ------------------------------------------------------------------------------------------ docs
SIZES_HEADING = "## The reference across data sizes (learning rate chosen on validation)"
PAPER_HEADING = "## Full training split against the ELPV paper"
# Deitsch et al., same 75/25 protocol (test on a stratified 25%), binary (defective if p > 0.5).
PAPER = (("CNN (VGG-19), Deitsch et al.", 0.8842), ("SVM, Deitsch et al.", 0.8244))
SIZE_WORDS = {"16": "16 images per class", "64": "64 images per class", "full": "the full training split"}


def _size_of(config: dict) -> str:
    return "full" if config.get("shots") is None else str(config["shots"])


def _frames(content: dict) -> dict[tuple[str, str], pd.DataFrame]:
    """(dataset, size) -> the aggregated frame the Budget explorer would show for that slice."""
    rows = [dict(row, id=i + 1, source="reference") for i, row in enumerate(content["runs"])]
    out = {}
    for dataset in DATASETS:
        for size in SIZES:
            chosen = [r for r in rows if r["config"]["dataset"] == dataset and _size_of(r["config"]) == size]
            if chosen:
                out[(dataset, size)] = budget.aggregate_over_seeds(budget.runs_table(chosen))
    return out


def _interval(row: pd.Series, metric: str) -> str:
    mean, low, high = row[f"{metric}_mean"], row[f"{metric}_low"], row[f"{metric}_high"]
    if mean != mean:
        return "n/a"
    if low != low:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _std_points(row: pd.Series, metric: str) -> str:
    return f"{100 * row[f'{metric}_std']:.1f}" if row["n_seeds"] > 1 else "n/a"


def _machines(content: dict) -> str:
    seen = {}
    for row in content["runs"]:
        m = row.get("timings", {}).get("machine") or {}
        key = (m.get("cpu"), tuple(m.get("flags") or ()), m.get("cores"), m.get("gpu"))
        seen.setdefault(key, []).append(m)
    parts = []
    for (cpu, flags, cores, gpu), ms in seen.items():
        loads = [m["load_average"][0] for m in ms if m.get("load_average")]
        dates = sorted(m.get("date", "")[:10] for m in ms)
        load = f", load average {min(loads):.1f}-{max(loads):.1f}" if loads else ""
        parts.append(
            f"{cpu} ({cores} cores, flags {' '.join(flags) or 'none'}{', GPU ' + gpu if gpu else ''}): "
            f"{len(ms)} run{'' if len(ms) == 1 else 's'}, {dates[0]} to {dates[-1]}{load}"
        )
    return "; ".join(parts)


def docs_sections(content: dict) -> tuple[str, str]:
    """The two sections of docs/results.md, from the checkpoint alone (no training)."""
    frames = _frames(content)
    lines = [
        "Produced by `python benchmarks/reference_sweep.py --write-docs` from "
        "`benchmarks/data/reference_sweep_runs.json` on " + _dt.date.today().isoformat() + ".",
        "Recipe "
        + RECIPE_NAME
        + ": each prompt configuration's AdamW learning rate chosen on the validation split by successive "
        "halving over 3e-4, 1e-3, 3e-3, 1e-2 (head in its own parameter group); the linear probe is an L-BFGS "
        "logistic regression fitted to convergence, its L2 strength chosen on validation. DINOv2 ViT-S/14 "
        "frozen, 112 px, bf16 autocast, validation 10%, test a stratified 25% (656 images, the same for "
        "every run). Epochs and batch: 16 images per class 20 x 8, 64 per class 20 x 16, full split 10 x 32.",
        "Machines: " + _machines(content) + ".",
        "",
        "Accuracy and balanced accuracy: mean over the seeds that did not collapse, [95% t interval, cut at 0 and "
        "100]; std is "
        "the seed standard deviation (points). Collapsed runs (one class on validation, or a diverged loss) "
        "are counted, never averaged in. GMACs per image: executed graph (what runs here) / full graph "
        "(every token through every block, the convention of published tables). The verdict under each "
        "table is the Budget explorer's own sentence (`views.budget.recommend`, tolerance 1 point, on the "
        "default metric: balanced accuracy when one class is over 60% of the test set), with paired "
        "bootstrap intervals on the same test images.",
    ]
    for (dataset, size), frame in frames.items():
        metric = budget.default_metric(frame)
        lines += [
            "",
            f"### {dataset}, {SIZE_WORDS[size]}",
            "",
            "| configuration | seeds (collapsed) | accuracy % | std | balanced accuracy % | std "
            "| lr chosen | GMACs executed / full | trainable params | train s, search included (load varied) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for _, row in frame.iterrows():
            full = "n/a" if row["gmacs_full_graph"] != row["gmacs_full_graph"] else f"{row['gmacs_full_graph']:.3f}"
            lines.append(
                f"| {row['label']} | {row['n_seeds']} ({row['n_collapsed']}) | {_interval(row, 'accuracy')} "
                f"| {_std_points(row, 'accuracy')} | {_interval(row, 'balanced_accuracy')} "
                f"| {_std_points(row, 'balanced_accuracy')} | {row['lr_text'] or 'n/a'} "
                f"| {row['gmacs']:.3f} / {full} | {row['params_trainable']:,.0f} | {row['train_seconds']:.0f} |"
            )
        majority = frame["majority_accuracy"].max()
        lines += ["", f"Majority class: {100 * majority:.1f}% of the test set."]
        result = budget.recommend(frame, 1.0, cost="gmacs", metric=metric)
        if result is not None:
            lines += ["", f"Verdict ({budget.METRIC_WORDS.get(metric, metric)}): {result.sentence}"]
        lines += _collapse_list(frame)
        if (dataset, size) in SPREAD_TARGET_SLICES:
            lines += _spread_lines(frame, metric, size)
    return "\n".join(lines), _paper_section(content, frames)


# Where the reference is asked to be steady: at most this seed standard deviation, or an account of why not.
SPREAD_TARGET_POINTS = 2.0
SPREAD_TARGET_SLICES = {("elpv-binary", "64"), ("elpv-binary", "full")}


def _spread_lines(frame: pd.DataFrame, metric: str, size: str) -> list[str]:
    """Each configuration's seed standard deviation against the target, and how much of it the image sample
    explains: the converged probe has no training randomness, so its spread is the seeds' draw of training
    images (none on the full split, where every seed sees the same images)."""
    words = budget.METRIC_WORDS.get(metric, metric)
    measured = frame[frame["n_seeds"] > 1]
    if measured.empty:
        return []
    base = metric.removesuffix("_mean")  # the frame's columns: <metric>_mean, <metric>_std, ...
    std = {row["label"]: 100 * row[f"{base}_std"] for _, row in measured.iterrows()}
    within = [f"{label} ({value:.1f})" for label, value in std.items() if value <= SPREAD_TARGET_POINTS]
    above = [f"{label} ({value:.1f})" for label, value in std.items() if value > SPREAD_TARGET_POINTS]
    probe = measured[measured["num_prompts"] == 0]
    if probe.empty:
        why = ""
    elif size == "full":
        why = (
            " Every seed trains on the same images here, so the spread is the training's own: initialisation, "
            "batch order and the learning rate each seed's search chose."
        )
    else:
        why = (
            f" The linear probe, fitted to convergence, has no training randomness: its {std[probe.iloc[0]['label']]:.1f} "
            "points are the seeds' different draws of training images, a part every configuration shares; the "
            "rest is the training's own (initialisation, batch order, the learning rate each seed's search chose)."
        )
    return [
        "",
        f"Seed spread of {words} against the target of at most {SPREAD_TARGET_POINTS:g} points (standard deviation "
        f"over seeds, points): within it {', '.join(within) or 'none'}; above it {', '.join(above) or 'none'}." + why,
    ]


def _collapse_list(frame: pd.DataFrame) -> list[str]:
    collapsed = budget.collapsed_lines(frame)
    return ["", "Collapsed runs: " + "; ".join(collapsed) + "."] if collapsed else []


def _paper_section(content: dict, frames: dict) -> str:
    frame = frames.get(("elpv-binary", "full"))
    lines = [
        "Produced by `python benchmarks/reference_sweep.py --write-docs` on " + _dt.date.today().isoformat() + ".",
        "ELPV binary (defective if p > 0.5), the ELPV paper's protocol: test on a stratified 25% (656 images), "
        "train on the rest less a 10% validation split; recipe and machines as in the section above.",
    ]
    if frame is None or len(frame) == 0:
        return "\n".join(lines + ["", "No full-split runs in the checkpoint yet."])
    result = budget.recommend(frame, 1.0, cost="gmacs", metric="accuracy_mean")
    lines += [
        "",
        "| model | seeds | accuracy % [95% CI] | balanced accuracy % |",
        "|---|---|---|---|",
    ]
    for _, row in frame.iterrows():
        lines.append(
            f"| {row['label']} (this dashboard) | {row['n_seeds']} | {_interval(row, 'accuracy')} "
            f"| {_interval(row, 'balanced_accuracy')} |"
        )
    for name, accuracy in PAPER:
        lines.append(f"| {name} (paper) | n/a | {100 * accuracy:.2f} | n/a |")
    lines.append("")
    for _, row in frame.iterrows():
        mean = row["accuracy_mean"]
        above = [name for name, accuracy in PAPER if mean > accuracy]
        below = [name for name, accuracy in PAPER if mean <= accuracy]
        where = "; ".join(
            part
            for part in (
                f"above {', '.join(above)}" if above else "",
                f"below {', '.join(below)}" if below else "",
            )
            if part
        )
        seeds = f"{row['n_seeds']} seed{'s' if row['n_seeds'] != 1 else ''}"
        low, high = row["accuracy_low"], row["accuracy_high"]
        inside = [name for name, accuracy in PAPER if low == low and low <= accuracy <= high]
        if inside:  # the mean is on one side, but the seeds do not tell it apart from the paper's figure
            where += f"; its 95% interval includes {', '.join(inside)}"
        note = ""
        if row["n_seeds"] > 1 and row["accuracy_std"] == 0:
            note = (
                " Its seeds agree exactly: a logistic regression fitted to convergence on one split has no seed."
                if row["label"] == "linear probe"
                else " Its seeds scored the same accuracy (656 test images: steps of 0.15 points), not the same "
                "predictions: their balanced accuracies differ."
                if row["balanced_accuracy_std"] > 0
                else " Its seeds scored the same accuracy and balanced accuracy."
            )
        lines.append(f"- {row['label']} ({100 * mean:.1f}%, {seeds}): {where.rstrip('.')}.{note}")
    if result is not None and result.probe is not None:
        prompts = frame[frame["tuning"] != "linear"].sort_values("accuracy_mean", ascending=False)
        if len(prompts):
            top = prompts.iloc[0]
            gap = (result.vs_probe or {}).get(top.name)
            if gap is not None:
                interval = (
                    f"95% CI {100 * gap.low:+.1f} to {100 * gap.high:+.1f}, {gap.method}"
                    if gap.has_interval
                    else "no interval: one seed and no per-image results"
                )
                lines += [
                    "",
                    f"{'Best prompt configuration' if len(prompts) > 1 else 'The only prompt configuration'} run on "
                    f"the full split so far, {top['label']}, against the converged "
                    f"linear probe (paired on the same test images and seeds): {100 * gap.difference:+.1f} "
                    f"points of accuracy ({interval}).",
                ]
        lines += ["", f"Verdict (accuracy): {result.sentence}"]
    return "\n".join(lines)


def write_docs(checkpoint: Path) -> None:
    sizes, paper = docs_sections(read_checkpoint(checkpoint))
    write_section(SIZES_HEADING, sizes)
    write_section(PAPER_HEADING, paper)
    print(f"wrote {SIZES_HEADING!r} and {PAPER_HEADING!r} to docs/results.md")


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--sizes", default=",".join(SIZES), help="images per class, or 'full'")
    parser.add_argument("--prompts", default=",".join(map(str, COUNTS)), help="0 = the linear probe")
    parser.add_argument("--placements", default=",".join(PLACEMENTS))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--resume", action="store_true", help="continue the checkpoint's sweep")
    parser.add_argument("--write-reference", action="store_true", help="only write the shipped reference file")
    parser.add_argument("--write-docs", action="store_true", help="only write its sections of docs/results.md")
    parser.add_argument(
        "--examples-only",
        action="store_true",
        help="with --write-reference: only the runs whose trained prompts ship, to the examples file",
    )
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    if args.write_reference:
        write_reference(checkpoint, examples_only=args.examples_only)
        return
    if args.write_docs:
        write_docs(checkpoint)
        return
    sizes = _list(args.sizes)
    bad = [s for s in sizes if s not in SCHEDULE]
    if bad:
        raise SystemExit(f"error: sizes must be among {', '.join(SCHEDULE)}, got {', '.join(bad)}")
    configs = grid(
        _list(args.datasets),
        sizes,
        [int(c) for c in _list(args.prompts)],
        _list(args.placements),
        [int(s) for s in _list(args.seeds)],
    )
    sweep(configs, checkpoint, resume=args.resume)


if __name__ == "__main__":
    main()
