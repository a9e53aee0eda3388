"""`python -m vptdash ...`: the same training and sweeps as the dashboard, headless.

python -m vptdash train --dataset elpv-binary --shots 16 --prompts 10 --placement deep --json
python -m vptdash sweep --prompts 0,1,5,10,50 --placement shallow,deep --seeds 0,1,2
python -m vptdash probe --dataset elpv
python -m vptdash runs list
python -m vptdash runs export --csv runs.csv
python -m vptdash runs recount    # full-graph GMACs for runs stored before they were counted
python -m vptdash train --backbone tiny-clip --method maple --text-prompts 2 --prompt-depth 2 --dataset ZIP --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
from typing import Any, Sequence

from vptdash import bench
from vptdash.engine.clip import is_clip_backbone
from vptdash.engine.train import LR_AUTO, MAX_SEED, ConfigError, RunConfig, parse_lr, used_lr
from vptdash.methods import condense, continual, search, skipping, vlprompts
from vptdash.runs import cluster, presets, recount, worker
from vptdash.runs.executors import get_executor
from vptdash.runs.jobs import new_sweep_id, run_now, sweep_configs
from vptdash.runs.store import RunStore, StoreError, disk_hint, recover_store

JSON_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "val_accuracy",
    "gmacs",
    "gmacs_full_graph",
    "params_trainable",
    "params_total",
    "latency_ms_b1",
    "train_seconds",
    "lr",
    "lr_source",
    "collapsed",
    "precision",
    "compiled",
    "compile_reason",
    "run_id",
    "status",
)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _seed(text: str) -> int:
    """A seed numpy accepts, checked before anything is stored or loaded."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seeds go from 0 to {MAX_SEED}, got {value}")
    return value


def _seed_list(text: str) -> list[int]:
    seeds = [_seed(part.strip()) for part in text.split(",") if part.strip() != ""]
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds, got {text!r}")
    return seeds


def _lr_arg(text: str) -> float | str:
    try:
        return parse_lr(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


def parse_placements(text: str) -> list[str]:
    """'shallow,deep' -> two placements; a custom block list goes after ';' ('shallow;0,5,11')."""
    if ";" in text:
        return [part.strip() for part in text.split(";") if part.strip()]
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if all(part.isdigit() for part in parts):
        return [",".join(parts)]
    return parts


def _add_run_options(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    defaults = RunConfig()
    parser.add_argument(
        "--backbone",
        default=defaults.backbone,
        help="dinov2_s14 (offline default), tiny-random, or any timm ViT name (needs network or --weights)",
    )
    parser.add_argument("--weights", default=None, help="local weights file (safetensors or torch) for the backbone")
    parser.add_argument(
        "--dataset", default="elpv-binary", help="elpv | elpv-binary | a folder or .zip of class folders"
    )
    parser.add_argument("--cell-type", choices=["mono", "poly"], default=None, help="ELPV only: filter by cell type")
    parser.add_argument(
        "--shots", type=int, default=None, help="images per class for training (default: the whole training split)"
    )
    parser.add_argument("--resolution", type=int, default=defaults.resolution)
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--split-seed", type=_seed, default=defaults.split_seed)
    if sweep:
        parser.add_argument("--prompts", type=_int_list, default=[0, 1, 5, 10, 50, 100])
        parser.add_argument(
            "--placement",
            type=parse_placements,
            default=["shallow", "deep"],
            help="comma-separated placements; custom block lists after ';' e.g. 'deep;8,9,10,11'",
        )
        parser.add_argument("--seeds", type=_seed_list, default=[0])
        parser.add_argument("--resume", action="store_true", help="skip configurations already done in the store")
        parser.add_argument(
            "--executor",
            choices=["local", "ray"],
            default="local",
            help="where the runs execute; results land in the same run store either way",
        )
        parser.add_argument(
            "--ray-address",
            default=None,
            help="an existing Ray cluster (default: $VPTDASH_RAY_ADDRESS, else start a local one)",
        )
        parser.add_argument("--cpus-per-run", type=float, default=None, help="Ray: CPUs each run reserves (default 1)")
        parser.add_argument("--gpus-per-run", type=float, default=None, help="Ray: GPUs each run reserves (default 0)")
        parser.add_argument(
            "--processes",
            type=int,
            default=1,
            help="local executor: worker processes sharing this machine's threads (2 is fastest on "
            "2 cores for few-shot runs); latency is then measured first, on a quiet machine",
        )
    else:
        parser.add_argument("--prompts", type=int, default=defaults.num_prompts)
        parser.add_argument("--placement", default=defaults.placement, help="shallow | deep | block list like 0,5,11")
        parser.add_argument("--seed", type=_seed, default=defaults.seed)
        parser.add_argument("--tuning", choices=["prompt", "linear", "full"], default="prompt")
    parser.add_argument("--prompt-dropout", type=float, default=defaults.prompt_dropout)
    parser.add_argument(
        "--prompt-type",
        choices=["standard", "bilinear", "bilinear-whitened"],
        default=defaults.prompt_type,
        help="bilinear: P = Z W of low rank; bilinear-whitened: W starts from the data's whitening matrix",
    )
    parser.add_argument(
        "--prompt-rank",
        type=int,
        default=None,
        help="rank c of bilinear prompts (default: 75 shallow, 50 deep, at most the prompt count)",
    )
    parser.add_argument("--skip-blocks", type=_int_list, default=[], help="blocks never executed, e.g. 3,7")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument(
        "--lr",
        type=_lr_arg,
        default=LR_AUTO,
        help="'auto' (default): chosen per configuration on the validation split; linear probes then fit "
        "a converged logistic regression. A number: that fixed rate",
    )
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default=defaults.optimizer)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto (default): whichever of fp32 and bf16 measures faster on this machine at the run's shapes",
    )
    parser.add_argument("--no-latency", action="store_true", help="skip latency measurement (faster)")
    parser.add_argument("--store", default=None, help="run store path (default: the user data dir, or $VPTDASH_HOME)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the results on the last line")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def config_from_args(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    values = dict(
        backbone=args.backbone,
        weights=args.weights,
        dataset=args.dataset,
        cell_type=args.cell_type,
        shots=args.shots,
        resolution=args.resolution,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        prompt_dropout=args.prompt_dropout,
        prompt_type=args.prompt_type,
        prompt_rank=args.prompt_rank,
        skip_blocks=list(args.skip_blocks),
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        batch_size=args.batch_size,
        warmup_epochs=args.warmup_epochs,
        precision=args.precision,
        measure_latency=not args.no_latency,
    )
    values.update(overrides)
    return RunConfig(**values)


def _printer(quiet: bool):
    if quiet:
        return None

    def show(event: dict) -> None:
        phase = event.get("phase")
        if phase == "val":
            print(
                f"  epoch {event['epoch']:>3}  loss {event['loss']:.4f}  val acc {event['val_accuracy']:.3f}"
                f"  ({event['elapsed_s']:.1f}s, eta {event['eta_s']:.0f}s)",
                file=sys.stderr,
            )
        elif phase in ("setup", "cost"):
            print(f"  {event.get('message', phase)}", file=sys.stderr)

    return show


def summary(row: dict) -> dict[str, Any]:
    metrics, costs, timings = row.get("metrics") or {}, row.get("costs") or {}, row.get("timings") or {}
    merged = {**costs, **timings, **metrics, "run_id": row["id"], "status": row["status"]}
    result = {key: merged.get(key) for key in JSON_KEYS}
    if "lr_source" not in metrics:  # stored before rates were chosen, or not finished: what its config says
        config = RunConfig.from_dict(row.get("config") or {})
        result["lr"] = used_lr(config, metrics)
        result["lr_source"] = None if config.lr_is_auto else "fixed"
    if row.get("error"):
        result["error"] = row["error"].splitlines()[0]
    return result


def _report(row: dict, as_json: bool) -> int:
    result = summary(row)
    if as_json:
        print(json.dumps(result))
    else:
        config = RunConfig.from_dict(row["config"])
        if row["status"] == "failed":
            print(f"run {row['id']} failed: {result.get('error') or 'no error message recorded'}", file=sys.stderr)
        elif row["status"] == "cancelled":
            epochs = (row.get("timings") or {}).get("epochs_completed")
            print(
                f"run {row['id']} [cancelled] {config.label()} on {config.dataset}"
                + (f" after {epochs} epoch(s)" if epochs is not None else "")
                + ": no test accuracy",
                file=sys.stderr,
            )
        else:
            acc, bal = result["accuracy"], result["balanced_accuracy"]
            print(
                f"run {row['id']} [{row['status']}] {config.label()} on {config.dataset}: "
                + (f"test accuracy {acc:.3f} (balanced {bal:.3f}), " if acc is not None else "")
                + (f"{result['gmacs']:.3f} GMACs/image, " if result["gmacs"] is not None else "")
                + (f"{result['params_trainable']} trainable params" if result["params_trainable"] else "").rstrip(", ")
            )
            if result["lr_source"] == "validation":
                chosen = (row.get("metrics") or {}).get("l2")
                what = f"L2 {chosen:g}" if result["lr"] is None and chosen is not None else f"lr {result['lr']:g}"
                print(f"  {what}, chosen on the validation split")
            if result["collapsed"]:
                print(f"  warning: collapsed: {(row.get('metrics') or {}).get('collapse_reason')}")
    return 0 if row["status"] in ("done", "cancelled") else 1


def cmd_train(args: argparse.Namespace, *, tuning: str | None = None) -> int:
    store = RunStore(args.store)
    tuning = tuning or args.tuning
    overrides = {
        "tuning": tuning,
        "num_prompts": 0 if tuning == "linear" else args.prompts,
        "placement": "none" if tuning == "linear" else args.placement,
        "seed": args.seed,
    }
    row = run_now(store, config_from_args(args, **overrides), echo=_printer(args.quiet or args.json))
    return _report(row, args.json)


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.processes < 1:  # before anything is announced or stored
        print("error: --processes must be at least 1", file=sys.stderr)
        return 2
    store = RunStore(args.store)
    configs = sweep_configs(config_from_args(args), args.prompts, args.placement, args.seeds)
    for config in configs:  # every configuration is checked before the first one runs
        config.validate()
    if args.resume:  # an interrupted sweep continues where it stopped: finished configurations are kept
        # compared as RunConfig (defaults filled in), so runs stored before a new field existed still match
        finished = [RunConfig.from_dict(row["config"]) for row in store.list_runs(status="done")]
        configs = [c for c in configs if c not in finished]
    sweep_id = new_sweep_id()
    args.sweep_id = sweep_id  # an interrupt cancels what is left of it (main)
    print(f"{sweep_id}: {len(configs)} runs on the {args.executor} executor", file=sys.stderr)
    outcome = {"done": 0, "failures": 0}

    def report(row: dict) -> None:
        outcome["done"] += 1
        outcome["failures"] += row["status"] == "failed"
        result = summary(row)
        if args.json:
            print(json.dumps({**result, "config": row["config"]}), flush=True)
        elif not args.quiet:
            acc = result["accuracy"]
            print(
                f"[{outcome['done']}/{len(configs)}] run {row['id']} {RunConfig.from_dict(row['config']).label()} "
                f"seed {row['config']['seed']}: {row['status']}" + (f", acc {acc:.3f}" if acc is not None else ""),
                file=sys.stderr,
            )

    options = ray_options(args) if args.executor == "ray" else {"processes": args.processes}
    get_executor(args.executor, **options).run(store, configs, sweep_id=sweep_id, source="cli", on_done=report)
    return 1 if outcome["failures"] else 0


def ray_options(args: argparse.Namespace) -> dict[str, Any]:
    """--ray-address / --cpus-per-run / --gpus-per-run over the environment's cluster settings."""
    settings = cluster.cluster_settings()
    return {
        "address": args.ray_address or settings.address,
        "cpus_per_run": settings.cpus_per_run if args.cpus_per_run is None else args.cpus_per_run,
        "gpus_per_run": settings.gpus_per_run if args.gpus_per_run is None else args.gpus_per_run,
        "max_retries": settings.max_retries,
    }


def _skip_options(text: str) -> list[list[int]]:
    """'none;3,7;3,7,11' -> [[], [3, 7], [3, 7, 11]]."""
    return [[] if part.strip() in ("", "none") else _int_list(part) for part in text.split(";")]


def cmd_search(args: argparse.Namespace) -> int:
    """Find the cheapest budget within --tolerance points of the best with a fraction of the grid's runs."""
    store = RunStore(args.store)
    spec = search.SearchSpec(
        prompt_counts=args.prompts,
        placements=args.placement,
        prompt_types=[t.strip() for t in args.prompt_types.split(",") if t.strip()],
        skip_options=args.skip_options,
        seeds=args.seeds,
        tolerance=args.tolerance,
        max_runs=args.max_runs,
        z=args.z,
    )
    settings = cluster.ClusterSettings(**ray_options(args)) if args.executor == "ray" else None
    if settings is not None and not settings.address:
        print("error: a search on Ray needs --ray-address or $VPTDASH_RAY_ADDRESS", file=sys.stderr)
        return 2
    row = search.search_now(
        store, config_from_args(args), spec, echo=None if args.quiet else _search_printer(), settings=settings
    )
    state = search.search_state(store, row["id"]) or {}
    out = {"run_id": row["id"], "status": row["status"], **{k: state.get(k) for k in ("runs", "budget", "grid_runs")}}
    out["chosen"] = (state.get("chosen") or {}).get("label")
    out["best"] = (state.get("best") or {}).get("label")
    if row.get("error"):
        out["error"] = row["error"].splitlines()[0]
    if args.json:
        print(json.dumps(out))
    elif out["chosen"]:
        print(
            f"search {row['id']}: {out['chosen']} (best: {out['best']}) after {out['runs']} of the grid's "
            f"{out['grid_runs']} runs; {state.get('open_contenders', 0)} contender(s) still open"
        )
    else:
        print(f"search {row['id']} {row['status']}: {out.get('error', 'no answer')}", file=sys.stderr)
    return 0 if row["status"] in ("done", "cancelled") else 1


def _search_printer():
    def show(event: dict) -> None:
        if event.get("phase") == "search" and event.get("chosen"):
            print(
                f"[{event['runs']}/{event['budget']}] now: {event['chosen']['label']} "
                f"({100 * event['chosen']['mean']:.1f}% over {event['chosen']['seeds']} seed(s))",
                file=sys.stderr,
            )

    return show


def cmd_condense(args: argparse.Namespace) -> int:
    """Prompt condensation of a stored run: Taylor-score its prompts, keep the global top K
    (or a fraction), fine-tune the kept ones, store the result as a child run."""
    store = RunStore(args.store)
    row = condense.condense_now(
        store,
        args.run,
        keep=args.keep,
        keep_fraction=args.keep_fraction,
        epochs=args.epochs,
        lr=args.lr,
        echo=_printer(args.quiet or args.json),
    )
    if args.json:
        metrics = row.get("metrics") or {}
        extra = {
            key: metrics.get(key)
            for key in (
                "kept_prompts",
                "parent_prompts",
                "kept_counts",
                "accuracy_pruned",
                "parent_accuracy",
                "parent_gmacs",
            )
        }
        print(json.dumps({**summary(row), "parent_id": row.get("parent_id"), **extra}))
        return 0 if row["status"] in ("done", "cancelled") else 1
    return _report(row, False)


def cmd_skip_search(args: argparse.Namespace) -> int:
    """Which k blocks can this task skip: greedy or DAS search, stored as a "skip-search" job."""
    store = RunStore(args.store)
    config = config_from_args(args, num_prompts=args.prompts, placement=args.placement, seed=args.seed)
    row = skipping.skip_search_now(
        store,
        config,
        args.k,
        args.method,
        steps=args.steps,
        candidates=args.candidates,
        echo=_printer(args.quiet or args.json),
    )
    result = skipping.stored_result(store, row["id"])
    summary_keys = (
        "method",
        "k",
        "skip",
        "order",
        "base_loss",
        "chosen_loss",
        "redundancy",
        "evaluations",
        "block_runs",
        "steps",
        "seconds",
        "n_train",
        "n_val",
        "stopped",
    )
    out = {
        "run_id": row["id"],
        "status": row["status"],
        **({k: getattr(result, k) for k in summary_keys} if result else {}),
    }
    if row.get("error"):
        out["error"] = row["error"].splitlines()[0]
    if args.json:
        print(json.dumps(out))
    elif result:
        print(
            f"run {row['id']}: skip blocks {','.join(map(str, result.skip))} ({result.method}, validation loss "
            f"{result.base_loss:.3f} -> {result.chosen_loss:.3f}, {result.evaluations} subnetworks, "
            f"{result.seconds:.0f} s)"
        )
        print(f"train it with: python -m vptdash train ... --skip-blocks {','.join(map(str, result.skip))}")
    else:
        print(f"run {row['id']} {row['status']}: {row.get('error') or ''}", file=sys.stderr)
    return 0 if row["status"] in ("done", "cancelled") else 1


def cmd_runs(args: argparse.Namespace) -> int:
    if args.runs_command == "recover":
        outcome = recover_store(args.store)
        moved = outcome["moved_to"]
        print(
            (f"moved the damaged store to {moved}; " if moved else "no store file was there; ")
            + ("restored the latest backup" if outcome["restored_backup"] else "started an empty store")
            + f" ({outcome['runs']} runs)"
        )
        return 0
    store = RunStore(args.store)
    if args.runs_command == "recount":
        if store.read_only:
            print(f"error: the run store {store.path} is read-only: nothing can be recounted", file=sys.stderr)
            return 1
        print(recount.fill_full_graph(store).line())
        return 0
    if args.runs_command == "export":
        try:
            path = store.export_csv(args.csv)
        except OSError as exc:
            print(f"error: cannot write {args.csv}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
        return 0
    frame = store.runs_frame()
    if frame.empty:
        print("no runs yet")
        return 0
    columns = [
        c
        for c in (
            "id",
            "status",
            "kind",
            "source",
            "dataset",
            "tuning",
            "num_prompts",
            "placement",
            "seed",
            "accuracy",
            "balanced_accuracy",
            "gmacs",
            "latency_ms_b1",
        )
        if c in frame.columns
    ]
    print(frame[columns].to_string(index=False))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    # The worker process itself (never a process that only starts one): yield to the dashboard, use the cores.
    settings = worker.yield_to_ui()
    print(f"worker {os.getpid()}: nice {settings['nice']}, {settings['threads']} torch threads", file=sys.stderr)
    store = RunStore(args.store)
    warm = None
    if args.warm:

        def warm() -> bool:
            return presets.warm_demo(should_stop=lambda: worker.other_job_waiting(store, presets.is_demo_config))

    lanes = worker.default_lanes() if args.lanes is None else args.lanes
    return worker.serve(store, idle_exit_s=args.idle_exit, owner=args.follow_owner, warm=warm, lanes=lanes)


def _add_continual_options(parser: argparse.ArgumentParser) -> None:
    """Options of `python -m vptdash continual`."""
    d = continual.ContinualConfig()
    parser.add_argument(
        "--dataset",
        default=d.dataset,
        help=f"elpv | {' | '.join(continual.GENERATED_DATASETS)} (generated) | a folder or .zip of class folders",
    )
    parser.add_argument("--cell-type", choices=["mono", "poly"], default=None, help="ELPV only: filter by cell type")
    parser.add_argument("--tasks", type=int, default=d.tasks, help="number of tasks the classes are split into")
    parser.add_argument("--order", type=_int_list, default=None, help="class indices in arrival order, e.g. 3,1,0,2")
    parser.add_argument(
        "--method", default="sequential,nsp2,joint", help=f"comma-separated, from {','.join(continual.METHODS)}"
    )
    parser.add_argument("--seeds", type=_seed_list, default=[0])
    parser.add_argument("--backbone", default=d.backbone)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--resolution", type=int, default=d.resolution)
    parser.add_argument(
        "--shots", type=int, default=d.shots, help="training images per class (0: the whole training split)"
    )
    parser.add_argument("--test-fraction", type=float, default=d.test_fraction)
    parser.add_argument("--max-test-per-class", type=int, default=None)
    parser.add_argument("--split-seed", type=_seed, default=d.split_seed)
    parser.add_argument("--prompts", type=int, default=d.num_prompts, help="prompt tokens per prompted block")
    parser.add_argument("--placement", default=d.placement, help="lastK (default last4) | deep | shallow | block list")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="epochs per task")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--eta", type=float, default=d.eta, help="NSP2 stability/plasticity blend (1: pure projection)")
    parser.add_argument(
        "--null-threshold",
        type=float,
        default=None,
        help="NSP2 nullity: singular values <= this x the largest (default: at the spectrum's elbow)",
    )
    parser.add_argument("--ln-loss-weight", type=float, default=d.ln_loss_weight)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=d.precision)
    parser.add_argument("--store", default=None)
    parser.add_argument("--json", action="store_true", help="one JSON object per run on stdout")
    parser.add_argument("--quiet", action="store_true")


def cmd_continual(args: argparse.Namespace) -> int:
    """Run every (seed, method) in this process, one stored run each, grouped by one sweep id."""
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    base = continual.ContinualConfig(
        backbone=args.backbone,
        weights=args.weights,
        dataset=args.dataset,
        cell_type=args.cell_type,
        resolution=args.resolution,
        shots=args.shots or None,
        test_fraction=args.test_fraction,
        max_test_per_class=args.max_test_per_class,
        split_seed=args.split_seed,
        tasks=args.tasks,
        class_order=args.order,
        num_prompts=args.prompts,
        placement=args.placement,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        precision=args.precision,
        eta=args.eta,
        null_threshold=args.null_threshold,
        ln_loss_weight=args.ln_loss_weight,
    )
    configs = continual.continual_configs(base, methods, args.seeds)  # all checked before the first one runs
    store = RunStore(args.store)
    sweep_id = "continual-" + new_sweep_id().removeprefix("sweep-")
    rows = []
    for position, config in enumerate(configs, 1):
        if not args.quiet and not args.json:
            print(f"[{position}/{len(configs)}] {config.label()}", file=sys.stderr)
        row = continual.run_continual_now(store, config, sweep_id=sweep_id)
        rows.append(row)
        metrics = row.get("metrics") or {}
        result = {
            "run_id": row["id"],
            "status": row["status"],
            "method": config.method,
            "seed": config.seed,
            **{k: metrics.get(k) for k in continual.SUMMARY_KEYS},
            "train_seconds": (row.get("timings") or {}).get("train_seconds"),
        }
        if row.get("error"):
            result["error"] = row["error"].splitlines()[0]
        if args.json:
            print(json.dumps(result), flush=True)
        elif not args.quiet:
            print(
                "  "
                + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k in continual.SUMMARY_KEYS and v is not None)
                + (f"  [{row['status']}] {result.get('error', '')}" if row["status"] != "done" else ""),
                file=sys.stderr,
            )
    if not args.json and not args.quiet:
        print(f"{sweep_id}:", file=sys.stderr)
        for line in continual.summarize_runs(rows):
            print(
                f"  {line['label']:<32} avg accuracy {_pm(line, 'avg_accuracy')}  forgetting {_pm(line, 'forgetting')}"
                f"  ({line['seeds']} seeds)",
                file=sys.stderr,
            )
    return 1 if any(row["status"] == "failed" for row in rows) else 0


def _pm(line: dict, key: str) -> str:
    mean, std = line.get(f"{key}_mean"), line.get(f"{key}_std")
    return "n/a" if mean is None else f"{100 * mean:.1f} ± {100 * (std or 0):.1f}"


class _Parser(argparse.ArgumentParser):
    """A bad option gives one line naming it, not the whole usage block (`--help` has that).
    Subcommand parsers are of the same class (argparse uses type(parent))."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m vptdash", description="Visual prompt tuning budgets, headless.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train and evaluate one configuration")
    _add_run_options(train)
    _add_clip_options(train)
    probe = sub.add_parser("probe", help="linear probe on cached CLS features (the fast baseline)")
    _add_run_options(probe)
    # lr "auto": a logistic regression fitted to convergence; epochs only count with a fixed --lr
    probe.set_defaults(epochs=100)
    sweep = sub.add_parser("sweep", help="a grid of prompt counts x placements x seeds")
    _add_run_options(sweep, sweep=True)
    _add_clip_options(sweep, sweep=True)
    condense = sub.add_parser(
        "condense", help="prompt condensation: keep a run's most important prompts, fine-tune them"
    )
    condense.add_argument(
        "--run", type=int, required=True, help="id of a finished prompt-tuning run with stored prompts"
    )
    keep = condense.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep", type=int, default=None, help="prompt vectors to keep, over all placed blocks")
    keep.add_argument("--keep-fraction", type=float, default=None, help="fraction of the prompt vectors to keep (0..1]")
    condense.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs for the kept prompts")
    condense.add_argument(
        "--lr", type=float, default=None, help="fine-tuning learning rate (default: a tenth of the parent's)"
    )
    condense.add_argument("--store", default=None)
    condense.add_argument("--json", action="store_true")
    condense.add_argument("--quiet", action="store_true")
    _add_continual_options(sub.add_parser("continual", help="continual learning: classes arrive task after task"))
    skip = sub.add_parser("skip-search", help="find k blocks this task can skip (greedy baseline or DAS search)")
    _add_run_options(skip)
    skip.add_argument("--k", type=int, required=True, help="how many blocks to skip")
    skip.add_argument("--method", choices=["greedy", "das"], default="greedy")
    skip.add_argument("--steps", type=int, default=300, help="DAS: REINFORCE steps")
    skip.add_argument("--candidates", type=_int_list, default=None, help="blocks that may be skipped (default: all)")
    search_parser = sub.add_parser("search", help="the cheapest budget within X points of the best, without the grid")
    _add_run_options(search_parser, sweep=True)
    search_parser.add_argument("--tolerance", type=float, default=1.0, help="accuracy points (1.0 = 1%%)")
    search_parser.add_argument("--max-runs", type=int, default=None, help="run budget (default: 40%% of the grid)")
    search_parser.add_argument("--prompt-types", default="standard", help="comma-separated prompt types to search")
    search_parser.add_argument(
        "--skip-options", type=_skip_options, default=[[]], help="block sets to skip, ';'-separated: 'none;3,7'"
    )
    search_parser.add_argument("--z", type=float, default=search.DEFAULT_Z, help="how sure the race must be")
    runs = sub.add_parser("runs", help="the run history")
    runs.add_argument("--store", default=None)
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    runs_sub.add_parser("list")
    export = runs_sub.add_parser("export")
    export.add_argument("--csv", required=True)
    runs_sub.add_parser(
        "recover",
        help="move a damaged run store aside (kept, renamed *.damaged-<time>) and restore the latest backup, "
        "or start an empty store",
    )
    runs_sub.add_parser(
        "recount",
        help="add the full-graph GMACs (every token through every block, as published tables count) to "
        "finished runs stored without them; counted from each run's configuration, no training",
    )
    bench_cmd = sub.add_parser("bench", help="engine speed against the machine's peak and a naive reference loop")
    bench_cmd.add_argument("--json", action="store_true")
    bench_cmd.add_argument("--sweep", action="store_true", help="also time the standard meeting sweep end to end")
    bench_cmd.add_argument(
        "--steps", type=int, default=10, help="timed steps per loop (median; the first, warm-up step is not timed)"
    )
    bench_cmd.add_argument("--backbone", default="dinov2_s14")
    bench_cmd.add_argument("--resolution", type=int, default=112)
    bench_cmd.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="the engine's precision (auto: whichever measures faster on this machine; the naive loop is fp32)",
    )
    worker = sub.add_parser("worker", help="the dashboard's background worker: runs the queued jobs")
    worker.add_argument("--store", default=None)
    worker.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    worker.add_argument(
        "--follow-owner",
        action="store_true",
        help="exit (cancelling the running job) once the process in the store's .worker.owner file ends",
    )
    worker.add_argument(
        "--warm",
        action="store_true",
        help="before waiting for jobs, load what the meeting demo needs (libraries, backbone, image set)",
    )
    worker.add_argument(
        "--lanes",
        type=int,
        choices=(1, 2),
        default=None,
        help="runs side by side when several are queued, the cores split between them (default: 2 from two "
        "cores on, else 1)",
    )
    return parser


# Commands that run jobs in this process: Ctrl-C or SIGTERM cancels their runs.
_RUNS_HERE = ("train", "probe", "sweep", "search", "condense", "continual", "skip-search")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, like Ctrl-C's KeyboardInterrupt."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.given_options = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    runs_here = args.command in _RUNS_HERE
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if runs_here:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(args, runs_here)
    finally:  # main may be called again in this process (tests, scripts): leave its signals as they were
        for sig, handler in previous.items():
            if signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)


def _main(args: argparse.Namespace, runs_here: bool) -> int:
    try:
        return _dispatch(args)
    except ConfigError as exc:  # an impossible budget: say why, store nothing, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted (Ctrl-C)"
        print(f"{how}: {_cancel_own_runs(args, how) if runs_here else 'stopped'}", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    except StoreError as exc:  # damaged, read-only or unusable run store: what is wrong and what to do
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:  # e.g. "database or disk is full" while recording
        print(f"error: the run store could not record this: {exc}{disk_hint(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


def _cancel_own_runs(args: argparse.Namespace, how: str) -> str:
    """Mark the runs this process was executing as cancelled; the words for the one line printed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the bookkeeping
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        cancelled = RunStore(args.store).cancel_runs_of(
            os.getpid(), sweep_id=getattr(args, "sweep_id", None), reason=how
        )
    except (StoreError, sqlite3.Error, OSError) as exc:
        return f"the run could not be marked cancelled ({exc})"
    if not cancelled:
        return "nothing was running"
    return f"run{'s' if len(cancelled) > 1 else ''} {', '.join(map(str, cancelled))} marked cancelled"


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("train", "sweep"):
        clip_options = sorted(CLIP_OPTIONS & getattr(args, "given_options", set()))
        if is_clip_backbone(args.backbone):
            return cmd_vlprompt(args)
        if clip_options:
            raise ConfigError(f"{', '.join(clip_options)}: only for CLIP backbones (tiny-clip, open_clip:<model>)")
    if args.command == "train":
        return cmd_train(args)
    if args.command == "probe":
        return cmd_train(args, tuning="linear")
    if args.command == "sweep":
        return cmd_sweep(args)
    if args.command == "search":
        return cmd_search(args)
    if args.command == "condense":
        return cmd_condense(args)
    if args.command == "continual":
        return cmd_continual(args)
    if args.command == "skip-search":
        return cmd_skip_search(args)
    if args.command == "runs":
        return cmd_runs(args)
    if args.command == "worker":
        return cmd_worker(args)
    if args.command == "bench":
        return bench.main(
            as_json=args.json,
            sweep=args.sweep,
            steps=args.steps,
            backbone=args.backbone,
            resolution=args.resolution,
            precision=args.precision,
        )
    return 2


# ---------------------------------------------------------------------------------------- CLIP prompts
CLIP_OPTIONS = {"--method", "--text-prompts", "--vision-prompts", "--prompt-depth", "--base-to-novel", "--templates"}
# Recipe options whose CLIP default (MaPLe's recipe, vlprompts.VLPromptConfig) replaces the ViT default
# unless given on the command line.
CLIP_RECIPE = {
    "--shots": "shots",
    "--epochs": "epochs",
    "--lr": "lr",
    "--batch-size": "batch_size",
    "--optimizer": "optimizer",
    "--weight-decay": "weight_decay",
    "--warmup-epochs": "warmup_epochs",
    "--resolution": "resolution",
}


def _add_clip_options(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """Options of vision-language prompt runs (`--backbone tiny-clip` or `open_clip:<model>[@tag]`)."""
    group = parser.add_argument_group("CLIP backbones (tiny-clip, open_clip:<model>[@tag] with --weights FILE)")
    if sweep:
        group.add_argument("--method", default="zeroshot,coop,maple", help="comma-separated: zeroshot,coop,maple")
        group.add_argument("--text-prompts", type=_int_list, default=[2, 4], help="context lengths to sweep")
        group.add_argument("--prompt-depth", type=_int_list, default=None, help="MaPLe depths to sweep (default 9)")
    else:
        group.add_argument("--method", choices=list(vlprompts.FAMILIES), default="coop")
        group.add_argument("--text-prompts", type=int, default=None, help="learnable context length (CoOp 4, MaPLe 2)")
        group.add_argument(
            "--prompt-depth", type=int, default=None, help="MaPLe: layers with prompts in both towers (default 9)"
        )
    group.add_argument(
        "--vision-prompts", type=int, default=None, help="MaPLe: vision prompts per layer (= text prompts: coupled)"
    )
    group.add_argument("--base-to-novel", action="store_true", help="train on half the classes, test base and novel")
    group.add_argument(
        "--templates", default=None, help="zero-shot templates separated by '|', e.g. 'a photo of a {}.|a {}.'"
    )


def _vlprompt_config(args: argparse.Namespace, **overrides: Any) -> vlprompts.VLPromptConfig:
    values: dict[str, Any] = {
        "backbone": args.backbone,
        "weights": args.weights,
        "dataset": args.dataset,
        "cell_type": args.cell_type,
        "test_fraction": args.test_fraction,
        "val_fraction": args.val_fraction,
        "split_seed": args.split_seed,
        "base_to_novel": args.base_to_novel,
        "vision_prompts": args.vision_prompts,
        "measure_latency": not args.no_latency,
    }
    values.update(
        {key: getattr(args, key) for option, key in CLIP_RECIPE.items() if option in getattr(args, "given_options", ())}
    )
    if values.get("lr") == LR_AUTO:
        raise ConfigError("a CLIP run takes a fixed --lr (default: its recipe's); --lr auto is for visual prompt runs")
    if args.templates:
        values["templates"] = [t.strip() for t in args.templates.split("|") if t.strip()]
    values.update(overrides)
    return vlprompts.VLPromptConfig.from_dict(values)


def _vlprompt_summary(row: dict) -> dict[str, Any]:
    metrics, costs = row.get("metrics") or {}, row.get("costs") or {}
    extra = {key: metrics.get(key) for key in ("base_accuracy", "novel_accuracy", "harmonic_mean")}
    extra.update({key: costs.get(key) for key in ("text_gmacs_per_class_set", "text_gmacs_per_image_amortised")})
    config = vlprompts.VLPromptConfig.from_dict(row.get("config") or {})
    return {**summary(row), **extra, "method": config.method, "label": config.label()}


def cmd_vlprompt(args: argparse.Namespace) -> int:
    """CoOp, MaPLe or zero-shot on a CLIP backbone: one run (train) or a grid (sweep), in this process."""
    store = RunStore(args.store)
    if args.command == "train":
        chosen = {"method": args.method, "text_prompts": args.text_prompts, "prompt_depth": args.prompt_depth}
        configs = [_vlprompt_config(args, **chosen, seed=args.seed)]
        sweep_id = None
    else:
        methods = [m.strip() for m in args.method.split(",") if m.strip()]
        configs = vlprompts.sweep_vlprompt_configs(
            _vlprompt_config(args), methods, args.text_prompts, args.prompt_depth or [None], args.seeds
        )
        sweep_id = new_sweep_id()
        if args.executor != "local" or args.processes != 1:
            print(
                "note: CLIP sweeps run one after the other in this process (--executor/--processes unused)",
                file=sys.stderr,
            )
    for config in configs:  # every configuration is checked before the first one runs
        config.validate()
    failures = 0
    for position, config in enumerate(configs, 1):
        if not args.quiet and not args.json and len(configs) > 1:
            print(f"[{position}/{len(configs)}] {config.label()}", file=sys.stderr)
        row = vlprompts.vlprompt_now(store, config, sweep_id=sweep_id, echo=_printer(args.quiet or args.json))
        failures += row["status"] == "failed"
        result = _vlprompt_summary(row)
        if args.json:
            print(json.dumps(result), flush=True)
        elif row["status"] == "failed":
            print(f"run {row['id']} failed: {row['error']}", file=sys.stderr)
        else:
            acc, gmacs = result["accuracy"], result["gmacs"]
            print(
                f"run {row['id']} [{row['status']}] {result['label']} on {config.dataset}: "
                + (f"test accuracy {acc:.3f}, " if acc is not None else "")
                + (f"{gmacs:.4f} GMACs/image (text tower once per class set: " if gmacs is not None else "")
                + (f"{result['text_gmacs_per_class_set']:.4f} GMACs), " if gmacs is not None else "")
                + f"{result['params_trainable']} trainable params"
            )
    return 1 if failures else 0


def run() -> None:
    """The `vptdash` console command (pyproject's [project.scripts]): the same as `python -m vptdash`."""
    sys.exit(main())
