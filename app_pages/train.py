"""Train: one prompt budget (or a baseline), watched live, with a result card against the linear probe."""

import html

import streamlit as st

from vptdash.engine import backbones
from vptdash.engine.clip import CLIP_BACKBONES, TINY_CLIP
from vptdash.engine.cost import block_macs
from vptdash.engine.prompts import PROMPT_TYPES, default_prompt_rank
from vptdash.engine.train import FULL_FINETUNE_LR, LR_AUTO, ConfigError, RunConfig, parse_lr
from vptdash.methods import skipping, vlprompts
from vptdash.runs import jobs
from vptdash.runs.presets import demo_base
from vptdash.ui import jobqueue, look, resources, session
from vptdash.views import budget, charts, wording

# "auto": each configuration's rate is chosen on the validation split (the engine's search); numbers are fixed.
LR_CHOICES = [LR_AUTO, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
PLACEMENTS = ["shallow", "deep", "pick blocks"]
LIVE = ("queued", "running")
# One recipe: the page starts from the meeting demo's (and so the reference sweep's) epochs and precision.
RECIPE = demo_base()
RECIPE_HELP = (
    f"Starts at the recipe of the meeting demo and the precomputed reference sweep ({RECIPE.epochs} epochs, "
    f"batch {RECIPE.batch_size}, {RECIPE.precision}), so new points compare with the reference points."
)
INLINE_SEARCH_GMACS = 20.0  # a skip search estimated under this (about a second of CPU) runs inline, else as a job

store = resources.get_store()
st.title("Train one budget")
setup = session.active_setup()
st.caption(
    f"On **{wording.dataset_md(setup['dataset'], setup['cell_type'])}** (change it on the Data page). "
    "Training runs in a background worker: leave the page or queue more, nothing is lost."
)

# ------------------------------------------------------------------------------------ controls
controls_col, monitor_col = st.columns([2, 3], gap="large")
with controls_col:
    with st.container(border=True):
        st.markdown("##### Setup")
        names = list(backbones.BACKBONES)
        if setup["backbone"] not in names:
            names.append(setup["backbone"])
        st.selectbox(
            "Backbone (frozen)",
            names,
            index=names.index(setup["backbone"]),
            **session.bind("train_backbone", "backbone"),
        )
        setup = session.active_setup()
        if setup["backbone"] in backbones.BACKBONES:  # under the box: a long name + description would be cut off
            st.caption(backbones.BACKBONES[setup["backbone"]])
        shape, backbone_error = resources.backbone_shape_or_error(setup["backbone"], setup["resolution"])
        c = st.columns(2)
        with c[0]:
            patch = shape["patch_size"] if shape else 16
            sizes = sorted({patch * k for k in range(2, 33) if 32 <= patch * k <= 448} | {setup["resolution"]})
            st.select_slider(
                "Resolution (px)",
                sizes,
                value=setup["resolution"],
                help=f"Multiples of the {patch}-px patch size.",
                **session.bind("train_resolution", "resolution", convert=int),
            )
        with c[1]:
            session.shots_widget("train_shots", "Images per class (shots)")
        if backbone_error:
            st.error(f"Backbone `{setup['backbone']}` cannot be built here: {wording.md_escape(backbone_error)}")

    depth = shape["depth"] if shape else 12
    with st.container(border=True):
        st.markdown("##### Prompt budget")
        num_prompts = st.select_slider(
            "Prompt tokens",
            session.PROMPT_COUNTS,
            value=10,
            key="train_prompts",
            help="0 prompts = a linear probe on the frozen features.",
        )
        placement_mode = st.segmented_control(
            "Placement",
            PLACEMENTS,
            default="shallow",
            key="train_placement",
            disabled=num_prompts == 0,
            required=True,
            help="Shallow: prompts enter once, before block 0. Deep: new prompts at every block. "
            "Pick blocks: any subset of blocks.",
        )
        blocks: list[int] = [0]
        if placement_mode == "pick blocks" and num_prompts > 0:
            strip_key = f"train_blocks_{depth}"
            blocks = (
                st.pills(
                    f"Blocks that get prompts ({depth} blocks, 0 = first)",
                    list(range(depth)),
                    selection_mode="multi",
                    default=[0],
                    key=strip_key,
                    format_func=lambda b: f"{b}",
                )
                or []
            )
        dropout = st.slider(
            "Prompt dropout",
            0.0,
            0.5,
            value=0.0,
            step=0.05,
            key="train_dropout",
            disabled=num_prompts == 0,
            help="Randomly drops prompt tokens while training.",
        )
        # Prompt type and rank: bilinear prompts P = Z W, optionally whitened
        c = st.columns([1])  # full width: three options do not fit half a column at 1600 px
        prompt_type = (
            c[0].segmented_control(
                "Prompt type",
                list(PROMPT_TYPES),
                default="standard",
                key="train_prompt_type",
                required=True,
                disabled=num_prompts == 0,
                help="Standard: free prompt vectors. Bilinear: P = Z W with a low rank c (fewer parameters, "
                "often faster learning). Bilinear-whitened: W starts from the whitening matrix of your training images "
                "(see Cost levers).",
            )
            or "standard"
        )
        n_placed = 1 if placement_mode == "shallow" else depth if placement_mode == "deep" else max(1, len(blocks))
        auto_rank = default_prompt_rank(max(1, int(num_prompts)), n_placed)
        rank_input = st.columns([1, 1])[0].number_input(
            "Rank c (0 = auto)",
            min_value=0,
            max_value=int(shape["embed_dim"]) if shape else 4096,
            value=0,
            step=1,
            key="train_prompt_rank",
            disabled=num_prompts == 0 or prompt_type == "standard",
            help=f"0 = the recipe: 75 shallow, 50 deep, at most the prompt count (here {auto_rank}).",
        )
        prompt_rank = int(rank_input) if prompt_type != "standard" and rank_input else None

    with st.container(border=True):  # the other cost lever: blocks never executed
        st.markdown("##### Skip blocks")
        skip_key = f"train_skip_{depth}"
        suggestion = st.session_state.pop("skip_suggestion", None)
        if suggestion is not None:  # from "Apply" below or from the Cost levers page
            st.session_state[skip_key] = [int(b) for b in suggestion if 0 <= int(b) < depth]
        skip_blocks = (
            st.pills(
                f"Blocks never executed ({depth} blocks): GMACs and latency drop with each",
                list(range(depth)),
                selection_mode="multi",
                key=skip_key,
                format_func=lambda b: f"{b}",
            )
            or []
        )
        c = st.columns([1, 2])
        skip_k = c[0].number_input(
            "k", min_value=1, max_value=max(1, depth - 1), value=min(4, max(1, depth - 1)), step=1, key="train_skip_k"
        )
        skip_method = (
            c[1].segmented_control(
                "Search",
                list(skipping.SKIP_METHODS),
                default="greedy",
                key="train_skip_method",
                required=True,
                help="Greedy: drop the least useful block, repeat (cheap). DAS: "
                "REINFORCE over skip scores (a few hundred steps).",
            )
            or "greedy"
        )
        # A row of its own: beside the search choice the label was cut off ("Suggest 4 bl...").
        suggest_clicked = st.button(
            f"Suggest {int(skip_k)} blocks",
            key="train_skip_suggest",
            width="stretch",
            icon="✂️",
            disabled=backbone_error is not None,
            help="Searches on your training and validation images; a long search runs "
            "in the background (watch it here or on Cost levers).",
        )

        @st.fragment(
            run_every=2.0
            if (store.get_run(st.session_state.get("train_skip_job", -1)) or {}).get("status") in LIVE
            else None
        )
        def skip_job_status() -> None:
            job = store.get_run(st.session_state.get("train_skip_job", -1))
            if job is None:
                return
            if job["status"] in LIVE:
                events = store.progress(job["id"])
                fraction, text = wording.progress_of(job, events[-1] if events else None)
                st.progress(fraction, text=f"Search #{job['id']} {job['status']}: {text}")
            elif job["status"] == "failed":
                st.error(f"Search #{job['id']} failed: {wording.md_escape(wording.first_line(job.get('error')))}")
            else:
                found = skipping.stored_result(store, job["id"])
                if found is not None and st.button(
                    f"Apply search #{job['id']}: skip {', '.join(map(str, found.skip))} "
                    f"(loss {found.base_loss:.3f} → {found.chosen_loss:.3f})",
                    key="train_skip_apply",
                ):
                    st.session_state["skip_suggestion"] = list(found.skip)
                    st.session_state.pop("train_skip_job", None)
                    st.rerun()

        skip_job_status()

    with st.container(border=True):
        st.markdown("##### Training")
        c = st.columns([2, 3, 2])
        with c[0]:
            epochs = st.number_input(
                "Epochs", min_value=1, max_value=500, value=RECIPE.epochs, step=1, key="train_epochs", help=RECIPE_HELP
            )
        with c[1]:
            lr = st.select_slider(
                "Learning rate",
                LR_CHOICES,
                value=LR_AUTO,
                key="train_lr",
                format_func=lambda v: "auto" if v == LR_AUTO else f"{v:g}",
                help="auto: chosen for this configuration on the validation split (about twice the training "
                "time); the linear probe is then fitted to convergence. A number: that fixed rate.",
            )
        with c[2]:
            seed = st.number_input("Seed", min_value=0, max_value=10_000, value=0, step=1, key="train_seed")
        c = st.columns([1, 1])
        with c[0]:
            precision = st.segmented_control(
                "Precision",
                ["auto", "fp32", "bf16"],
                default=RECIPE.precision,
                key="train_precision",
                required=True,
                help=RECIPE_HELP,
            )
        with c[1]:
            measure_latency = st.toggle(
                "Measure latency",
                value=True,
                key="train_latency",
                help="Times the model at batch 1 and 32 after training (a few seconds).",
            )
        with st.expander("More settings"):
            c = st.columns(2)
            batch_size = c[0].number_input(
                "Batch size", min_value=1, max_value=1024, value=RECIPE.batch_size, step=1, key="train_batch"
            )
            optimizer = c[1].selectbox("Optimizer", ["adamw", "sgd"], key="train_optimizer")
            weight_decay = c[0].number_input(
                "Weight decay", min_value=0.0, max_value=1.0, value=1e-4, format="%.0e", key="train_wd"
            )
            warmup = c[1].number_input(
                "Warm-up epochs", min_value=0.0, max_value=50.0, value=1.0, step=0.5, key="train_warmup"
            )

if num_prompts == 0:
    placement = "none"
elif placement_mode == "pick blocks":
    placement = ",".join(str(b) for b in sorted(blocks))
else:
    placement = placement_mode or "shallow"

common = dict(
    seed=int(seed),
    epochs=int(epochs),
    batch_size=int(batch_size),
    optimizer=optimizer,
    weight_decay=float(weight_decay),
    warmup_epochs=float(warmup),
    precision=precision or RECIPE.precision,
    measure_latency=bool(measure_latency),
)
pending = session.base_config(
    tuning="prompt",
    num_prompts=int(num_prompts),
    placement=placement,
    prompt_dropout=float(dropout),
    lr=parse_lr(lr),
    prompt_type=prompt_type if num_prompts else "standard",
    prompt_rank=prompt_rank if num_prompts else None,
    skip_blocks=sorted(int(b) for b in skip_blocks),
    **common,
)
st.session_state["train_pending_config"] = pending.to_dict()  # what "Train" would queue (tests read it)


def suggest_skips(k: int, method: str) -> None:
    """Run the skip search inline when it is tiny, else as a "skip-search" job for the worker."""
    config = session.base_config(seed=int(seed), precision=precision or RECIPE.precision)
    per_image = (
        block_macs(shape["num_prefix_tokens"] + shape["num_patches"], shape["embed_dim"], shape["mlp_dim"]) / 1e9
    )
    try:
        if skipping.estimated_gmacs(depth, per_image, k, method) < INLINE_SEARCH_GMACS:
            row = skipping.skip_search_now(store, config, k, method, source="live")
            found = skipping.stored_result(store, row["id"])
            if found is None:
                st.error(f"Search failed: {wording.md_escape(wording.first_line(row.get('error') or row['status']))}")
                return
            st.session_state["skip_suggestion"] = list(found.skip)
        else:
            st.session_state["train_skip_job"] = skipping.submit_skip_search(store, config, k, method)
            jobqueue.start_worker(store)
    except ConfigError as exc:
        st.error(f"Search not started: {wording.md_escape(exc)}")
        return
    st.rerun()


if suggest_clicked and shape:
    suggest_skips(int(skip_k), skip_method)


def submit(config: RunConfig) -> None:
    if num_prompts and placement_mode == "pick blocks" and not blocks and config.tuning == "prompt":
        st.error("Pick at least one block for the prompts, or choose shallow / deep.")
        return
    try:
        config.validate(depth=shape["depth"] if shape else None)
        run_id = jobs.submit_run(store, config)
    except ConfigError as exc:
        st.error(f"Not queued: {wording.md_escape(exc)}")
        return
    jobqueue.start_worker(store)
    st.session_state["train_run_id"] = run_id
    st.session_state["train_watch"] = run_id
    st.rerun()


with controls_col:
    if st.button(
        f"Train {pending.label()}",
        type="primary",
        icon="▶️",
        key="train_submit",
        disabled=backbone_error is not None,
        width="stretch",
    ):
        submit(pending)
    b = st.columns(2)
    if b[0].button(
        "Linear probe",
        key="train_probe",
        disabled=backbone_error is not None,
        width="stretch",
        icon="➡️",
        help="Baseline: frozen features + a linear head, no prompts.",
    ):
        submit(session.base_config(tuning="linear", num_prompts=0, placement="none", lr=parse_lr(lr), **common))
    if b[1].button(
        "Full fine-tune",
        key="train_full",
        disabled=backbone_error is not None,
        width="stretch",
        icon="♾️",
        help=f"Baseline: every backbone weight is trained (learning rate {FULL_FINETUNE_LR:g}).",
    ):
        submit(session.base_config(tuning="full", num_prompts=0, placement="none", lr=FULL_FINETUNE_LR, **common))

# ------------------------------------------------------------------------------------ CLIP prompts
with controls_col, st.expander("Vision-language prompts on CLIP: zero-shot, CoOp, MaPLe"):
    st.caption(
        "A frozen CLIP on the active data set and shots: CoOp learns text context (free per image once the "
        "class set's text features exist), MaPLe also feeds coupled prompts to the image tower (they cost "
        "compute per image). `tiny-clip` is random: it shows the path works, its accuracy means nothing."
    )
    clip_backbone = st.selectbox(
        "CLIP backbone",
        list(CLIP_BACKBONES),
        format_func=lambda n: f"{n}: {CLIP_BACKBONES[n]}",
        key="train_clip_backbone",
    )
    clip_weights = st.text_input(
        "Weights file (an open_clip state dict; empty: from the hub)",
        key="train_clip_weights",
        disabled=clip_backbone == TINY_CLIP,
    )
    clip_method = (
        st.segmented_control(
            "Method",
            list(vlprompts.FAMILIES),
            format_func=vlprompts.FAMILIES.get,
            default="coop",
            key="train_clip_method",
            required=True,
        )
        or "coop"
    )
    c = st.columns(2)
    clip_text = c[0].number_input(
        "Text prompts",
        min_value=1,
        max_value=64,
        value=vlprompts.DEFAULT_TEXT_PROMPTS["coop"],
        key="train_clip_text",
        disabled=clip_method == "zeroshot",
        help="Learnable context tokens in front of the class name; MaPLe couples one vision prompt to each.",
    )
    clip_depth = c[1].number_input(
        "Prompt depth (MaPLe)",
        min_value=1,
        max_value=48,
        value=vlprompts.MAPLE_DEPTH,
        key="train_clip_depth",
        disabled=clip_method != "maple",
        help=f"Layers with prompts in both towers; {vlprompts.MAPLE_DEPTH} is MaPLe's, capped at the model's layers.",
    )
    clip_b2n = st.toggle(
        "Base-to-novel",
        key="train_clip_b2n",
        help="Train on the first half of the classes; test base and novel classes apart (needs 4 classes).",
    )
    if st.button("Queue CLIP run", key="train_clip_submit", icon="▶️", width="stretch"):
        active = session.active_setup()
        clip_config = vlprompts.VLPromptConfig(
            backbone=clip_backbone,
            weights=(clip_weights or "").strip() or None if clip_backbone != TINY_CLIP else None,
            dataset=active["dataset"],
            cell_type=active["cell_type"],
            shots=active["shots"],
            test_fraction=active["test_fraction"],
            method=clip_method,
            text_prompts=None if clip_method == "zeroshot" else int(clip_text),
            prompt_depth=int(clip_depth) if clip_method == "maple" and clip_depth != vlprompts.MAPLE_DEPTH else None,
            base_to_novel=bool(clip_b2n),
            seed=int(seed),
        )
        try:
            clip_run = vlprompts.submit_vlprompt(store, clip_config)
        except ConfigError as exc:
            st.error(f"Not queued: {wording.md_escape(exc)}")
        else:
            jobqueue.start_worker(store)
            st.session_state["train_run_id"] = clip_run
            st.session_state["train_watch"] = clip_run
            st.rerun()

# ------------------------------------------------------------------------------------ the watched run
recent = [run for run in store.list_runs(limit=40) if run["source"] != "precomputed" and run["kind"] != "skip-search"]
with monitor_col:
    if not recent:
        st.info("No run yet: set a budget on the left and press **Train**.", icon="⬅️")
        st.stop()
    by_id = {run["id"]: run for run in recent}
    if st.session_state.get("train_watch") not in by_id:
        mine = st.session_state.get("train_run_id")
        st.session_state["train_watch"] = mine if mine in by_id else recent[0]["id"]
    watch = st.selectbox(
        "Showing run",
        list(by_id),
        key="train_watch",
        format_func=lambda i: (
            f"#{i} · {wording.run_label(by_id[i])} · "  # no status: it changes while shown
            f"{wording.dataset_label(by_id[i]['config'].get('dataset', '?'))}"
        ),
    )


def result_card(run: dict) -> None:
    metrics, costs, config = run["metrics"], run["costs"], run["config"]
    is_probe = wording.run_family(config) == "linear probe"
    baseline = (
        None
        if is_probe
        else budget.matching_probe(store.list_runs(status="done", dataset=config.get("dataset")), config)
    )
    base_m, base_c = (baseline["metrics"], baseline["costs"]) if baseline else ({}, {})

    delta = wording.signed_delta
    cols = st.columns(3) + st.columns(3)[:2]
    cols[0].metric(
        "Test accuracy",
        wording.fmt_pct(metrics.get("accuracy")),
        delta(metrics.get("accuracy"), base_m.get("accuracy"), "{:+.1f} pts", 100),
        help="Share of held-out test images classified correctly.",
    )
    cols[1].metric(
        "Balanced accuracy",
        wording.fmt_pct(metrics.get("balanced_accuracy")),
        delta(metrics.get("balanced_accuracy"), base_m.get("balanced_accuracy"), "{:+.1f} pts", 100),
        help="Mean recall over classes: the honest figure when classes are imbalanced (ELPV).",
    )
    gmacs = wording.number(costs.get("gmacs"))
    full_graph = wording.number(costs.get("gmacs_full_graph"))
    cols[2].metric(
        "GMACs per image (executed graph)",
        "-" if gmacs is None else f"{gmacs:.3g}",
        delta(costs.get("gmacs"), base_c.get("gmacs"), "{:+.3g}"),
        delta_color="inverse",
        help="The executed graph: what runs here (deep prompts enter as keys and values only, the last block "
        "computes only the class token). Full graph, every token through every block as in published tables: "
        + ("not counted" if full_graph is None else f"{full_graph:.3g}")
        + ".",
    )
    latency = wording.number(costs.get("latency_ms_b1"))
    cols[3].metric(
        "Latency, ms per image",
        "-" if latency is None else f"{latency:.2f}",
        delta(costs.get("latency_ms_b1"), base_c.get("latency_ms_b1"), "{:+.2f} ms"),
        delta_color="inverse",
        help="Batch 1, on this machine's CPU.",
    )
    params = wording.number(costs.get("params_trainable"))
    cols[4].metric(
        "Trainable parameters",
        wording.fmt_count(params),
        delta(costs.get("params_trainable"), base_c.get("params_trainable"), "{:+,.0f}"),
        delta_color="inverse",
    )
    if config.get("tuning") == vlprompts.KIND:  # a CLIP run: no linear probe on its backbone to compare with
        st.caption(wording.clip_summary(metrics, costs))
        return
    if metrics.get("lr_source") == "validation" and metrics.get("l2") is not None:
        st.caption(f"Logistic regression fitted to convergence; L2 strength {metrics['l2']:g} chosen on validation.")
    elif metrics.get("lr_source") and wording.number(metrics.get("lr")) is not None:
        how = "chosen on validation" if metrics["lr_source"] == "validation" else "fixed"
        st.caption(f"Learning rate {metrics['lr']:g}, {how}.")
    if engine := wording.engine_line(metrics, run.get("timings")):
        st.caption(wording.md_escape(engine))
    if metrics.get("collapsed"):
        st.error("Collapsed: this run is not a usable model.", icon="⚠️")
        st.text(str(metrics.get("collapse_reason") or ""))  # names classes (user folder names): shown as plain text
    if is_probe:
        st.caption("This run is the linear-probe baseline for its data.")
    elif baseline:
        st.caption(
            f"Deltas against the linear probe #{baseline['id']} on the same data "
            f"({baseline['source']}, seed {baseline['config'].get('seed')})."
        )
    else:
        st.caption("No linear probe on the same data yet, so no deltas.")
        if st.button("Queue a linear probe for this setup", key=f"train_queue_probe_{run['id']}"):
            probe = RunConfig.from_dict({**config, "tuning": "linear", "num_prompts": 0, "placement": "none"})
            try:
                jobs.submit_run(store, probe)
            except ConfigError as exc:
                st.error(f"Not queued: {wording.md_escape(exc)}")
            else:
                jobqueue.start_worker(store)
                st.rerun()


def monitor(run_id: int) -> None:
    first = store.get_run(run_id)
    live = first is not None and first["status"] in LIVE

    @st.fragment(run_every=1.0 if live else None)
    def view() -> None:
        run = store.get_run(run_id)
        if run is None:
            st.warning(f"Run #{run_id} was deleted.")
            return
        cache = st.session_state.get("train_events")
        if not cache or cache["run_id"] != run_id:
            cache = {"run_id": run_id, "events": []}
        cache["events"] = cache["events"] + store.progress(run_id, since=len(cache["events"]))
        st.session_state["train_events"] = cache
        events, status = cache["events"], run["status"]

        st.subheader(f"Run #{run_id}: {wording.md_escape(wording.run_label(run))}")
        if status == "queued":
            ahead = sum(1 for r in store.list_runs(status=["queued", "running"]) if r["id"] < run_id)
            st.info(f"Queued: {ahead} run{'s' if ahead != 1 else ''} ahead of it.", icon="ℹ️")
        elif status == "running":
            fraction, text = jobqueue.progress_line(store, run, events[-1] if events else None)
            st.progress(fraction, text=text)
        if status in LIVE:
            if run["cancel_requested"]:
                st.caption("Cancelling: the worker stops before the next training step.")
            elif st.button("Cancel", key="train_cancel", icon="✖️"):
                store.request_cancel(run_id)
                st.rerun(scope="fragment")

        if status == "done":
            result_card(run)
        elif status == "failed":
            st.error(f"This run failed: {wording.md_escape(wording.first_line(run.get('error')))}")
        elif status == "cancelled":
            epochs_done = (run.get("timings") or {}).get("epochs_completed")
            st.warning("Cancelled" + (f" after {epochs_done} epoch(s)." if epochs_done is not None else "."))

        if status != "queued":
            look.show_plotly(charts.training_curve_figure(events), key="train_curve")
        if status == "done":
            metrics = run["metrics"]
            look.show_plotly(
                charts.confusion_figure(
                    metrics.get("confusion_matrix") or [],
                    [html.escape(str(n)) for n in metrics.get("class_names") or []],  # plotly reads tags in labels
                ),
                key="train_confusion",
            )

    view()


with monitor_col:
    monitor(int(watch))
