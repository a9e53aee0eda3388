"""Continual learning: new classes arrive over time; does tuning the prompts in the null space of the
old tasks keep the model from forgetting them?"""

import datetime

import streamlit as st

from vptdash.engine.train import ConfigError
from vptdash.methods import continual
from vptdash.runs import uploads
from vptdash.ui import jobqueue, look, resources, session
from vptdash.ui.live import follow
from vptdash.views import continual_charts, wording

LIVE = ("queued", "running")
SHOTS = [8, 16, 32, 64, "all"]
LR_CHOICES = [1e-3, 3e-3, 1e-2, 3e-2]
PLACEMENTS = {"last4": "last 4 blocks", "deep": "every block", "shallow": "block 0 only"}

store = resources.get_store()
st.title("Continual learning: new classes over time")
st.caption(
    "New defect types arrive after deployment. The same prompts and a growing head learn the classes "
    "task after task; after each task every task seen so far is tested, predicting among all classes "
    "seen so far. **Sequential** tuning is the forgetting baseline, **null-space prompts (NSP2)** project "
    "every prompt update so old tasks' attention outputs do not move, **joint** training on everything "
    "at once is the upper bound. Runs go to the background worker."
)
setup = session.active_setup()


@st.cache_data(show_spinner="Reading the classes...", max_entries=16)
def class_names(spec: str, resolution: int, cell_type: str | None) -> list[str]:
    return continual.dataset_class_names(spec, resolution, cell_type)


def dataset_options() -> dict[str, str]:
    options = {"elpv": wording.dataset_label("elpv"), **{k: f"{k}: generated" for k in continual.GENERATED_DATASETS}}
    try:
        for info in uploads.list_uploads():
            options[uploads.upload_spec(info.slug)] = f"{info.name} (upload)"
    except Exception:  # noqa: BLE001 - a broken uploads folder must not hide the built-in sets
        pass
    if setup["dataset"] not in options and setup["dataset"] != "elpv-binary":
        options[setup["dataset"]] = wording.dataset_label(setup["dataset"])
    return options


controls, results = st.columns([2, 3], gap="large")
with controls:
    with st.container(border=True):
        st.markdown("##### Data and tasks")
        options = dataset_options()
        if st.session_state.get("cl_dataset") not in options:
            st.session_state.pop("cl_dataset", None)
        spec = st.selectbox(
            "Image set",
            list(options),
            index=0,
            format_func=options.get,
            key="cl_dataset",
            help="ELPV has 4 classes (2 tasks of 2). The generated textures-30 set has 30 (5 tasks of 6, the "
            "benchmark's setting); textures-10 has 10 (up to 5 tasks of 2). cues-30 has 5 families of 6 classes "
            "whose cues conflict (5 tasks: one family each), where later tasks can make the features forget. "
            "Uploads with at least 4 classes work too.",
        )
        if spec == "elpv":
            st.info(continual.ELPV_NOTE, icon="ℹ️")
        cell_type = setup["cell_type"] if spec == "elpv" else None
        try:
            names = class_names(spec, int(setup["resolution"]), cell_type)
        except Exception as exc:  # noqa: BLE001 - unreadable data: say so, keep the page
            st.error(f"Cannot read this image set: {wording.md_escape(exc)}")
            names = []
        max_tasks = len(names) // 2
        tasks, order, shuffle = 1, list(range(len(names))), False
        if max_tasks < 2:
            st.warning(
                f"This set has {len(names)} classes: continual learning needs at least 4 (2 tasks of 2 classes)."
            )
        else:
            tasks = st.number_input(
                "Number of tasks",
                min_value=2,
                max_value=max_tasks,
                value=min(max_tasks, 5),
                step=1,
                key=f"cl_tasks_{spec}",
                help=f"The classes are split into this many tasks (at most {max_tasks}: every "
                "task needs 2 classes), in the arrival order below.",
            )
            shuffle = st.toggle(
                "Shuffle the class order with each seed",
                value=True,
                key="cl_shuffle",
                help="As the official NSP2 recipe does: every seed gets its own arrival order, so no result "
                "depends on one lucky order. Off: pick the order below.",
            )
            if shuffle:
                order = None
                preview = continual.ContinualConfig(dataset=spec, tasks=int(tasks), seed=0).arrival_order(len(names))
                st.caption("Seed 0's order, for example:")
            else:
                picked = st.multiselect(
                    "Arrival order of the classes",
                    names,
                    default=names,
                    key=f"cl_order_{spec}",
                    help="Clear and pick the classes in the order they should arrive.",
                )
                if sorted(picked) == sorted(names):
                    order = [names.index(n) for n in picked]
                else:
                    st.caption("Pick every class once; until then the data set's order is used.")
                preview = order
            try:
                split = continual.split_classes(len(names), tasks, preview)
                st.caption(
                    " → ".join(
                        f"**T{i + 1}** " + ", ".join(wording.md_escape(names[c]) for c in t)
                        for i, t in enumerate(split)
                    )
                )
            except ConfigError as exc:
                st.error(wording.md_escape(exc))

    with st.container(border=True):
        st.markdown("##### Methods")
        methods = (
            st.pills(
                "Methods",
                list(continual.METHODS),
                selection_mode="multi",
                key="cl_methods",
                default=list(continual.METHODS),
                format_func=continual_charts.method_label,
                label_visibility="collapsed",
            )
            or []
        )
        c = st.columns(2)
        seeds = c[0].number_input(
            "Seeds",
            min_value=1,
            max_value=5,
            value=1,
            step=1,
            key="cl_seeds",
            help="Each method runs once per seed (0, 1, ...): mean ± std over seeds.",
        )
        eta = c[1].slider(
            "NSP2 eta",
            0.5,
            1.0,
            value=continual.DEFAULT_ETA,
            step=0.01,
            key="cl_eta",
            help="Stability/plasticity blend: update = eta × projected + (1 − eta) × free. 1 = pure "
            "null-space projection.",
        )
        recipe = st.radio(
            "Recipe",
            list(continual.RECIPES),
            key="cl_recipe",
            format_func=continual.RECIPE_LABELS.get,
            help="Official: as the NSP2 authors' code (prompts in every block, init uniform(-1, 1), projector "
            "divided by its Frobenius norm, logits / 28 in the loss, augmented images, longer training); slow on "
            "a CPU. Compact: the earlier CPU-friendly variant (last 4 blocks, plain projector).",
        )
        defaults = continual.RECIPES[recipe or "official"]
        with st.expander("Training settings"):
            c = st.columns(2)
            shots = c[0].select_slider("Training images per class", SHOTS, value=32, key="cl_shots")
            epochs = c[1].number_input(
                "Epochs per task",
                min_value=1,
                max_value=100,
                value=int(defaults["epochs"]),
                step=1,
                key=f"cl_epochs_{recipe}",
            )
            prompts = c[0].select_slider("Prompts per block", [1, 2, 4, 8, 16], value=4, key="cl_prompts")
            placement = c[1].selectbox(
                "Prompted blocks",
                list(PLACEMENTS),
                index=list(PLACEMENTS).index(defaults["placement"]),
                format_func=PLACEMENTS.get,
                key=f"cl_placement_{recipe}",
                help="Every block: the official recipe. Last 4 blocks: the blocks before run once per image "
                "(fast on CPU).",
            )
            lr = c[0].select_slider(
                "Learning rate", LR_CHOICES, value=1e-2, key="cl_lr", format_func=lambda v: f"{v:g}"
            )
            st.caption(f"Backbone `{setup['backbone']}` at {setup['resolution']} px (from the active setup).")

    base = continual.recipe_config(
        recipe or "official",
        backbone=setup["backbone"],
        dataset=spec,
        cell_type=cell_type,
        resolution=int(setup["resolution"]),
        shots=None if shots == "all" else int(shots),
        tasks=int(tasks),
        class_order=order,
        shuffle_classes=bool(shuffle),
        num_prompts=int(prompts),
        placement=placement,
        epochs=int(epochs),
        lr=float(lr),
        eta=float(eta),
    )
    st.session_state["cl_pending"] = base.to_dict()  # what the button would queue (tests read it)
    count = len(methods) * int(seeds)
    if st.button(
        f"Run {count} continual run{'s' if count != 1 else ''}",
        type="primary",
        key="cl_submit",
        icon="▶️",
        width="stretch",
        disabled=not methods or max_tasks < 2,
    ):
        try:
            configs = continual.continual_configs(base, methods, list(range(int(seeds))))
            sweep_id = "continual-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            for config in configs:
                continual.submit_continual(store, config, sweep_id=sweep_id)
        except ConfigError as exc:
            st.error(f"Not queued: {wording.md_escape(exc)}")
        else:
            st.session_state["cl_experiment"] = sweep_id
            jobqueue.start_worker(store)
            st.rerun()


# ------------------------------------------------------------------------------------ results
def experiment_label(group: dict) -> str:
    when = datetime.datetime.fromtimestamp(group["created_at"]).strftime("%d %b %H:%M")
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(group["statuses"].items()))
    methods = "/".join(continual_charts.method_label(m).split(" ")[0] for m in group["methods"])
    return f"{when} · {wording.dataset_label(str(group['dataset']))} · {group['tasks']} tasks · {methods} · {statuses}"


def show_results(rows: list[dict]) -> None:
    done = [r for r in rows if r["status"] == "done"]
    for r in rows:
        if r["status"] == "failed":
            st.error(
                f"Run #{r['id']} ({r['config'].get('method')}, seed {r['config'].get('seed')}) failed: "
                f"{wording.md_escape(wording.first_line(r.get('error')))}"
            )
    if not done:
        st.info("No finished run in this experiment yet.")
        return
    tasks = done[0]["metrics"].get("tasks") or []
    view = st.segmented_control(
        "Read the results as", list(continual.VIEWS), default="class-incremental", key="cl_view", required=True
    )
    matrix_key, avg_key, forget_key, meaning = continual.VIEWS[view or "class-incremental"]
    st.caption(meaning)
    summary = continual.summarize_runs(done)
    cols = st.columns(max(len(summary), 1))
    for col, line in zip(cols, summary):
        avg, forget = line.get(f"{avg_key}_mean"), line.get(f"{forget_key}_mean")
        col.metric(
            continual_charts.method_short(line["method"]),
            wording.fmt_pct(avg),
            help=f"{continual_charts.method_label(line['method'])}: average accuracy over all tasks after the "
            f"last one, mean of {line['seeds']} seed(s).",
        )
        std = line.get(f"{avg_key}_std")
        forgetting = (
            "forgetting n/a (trained once)"
            if forget is None
            else f"forgetting **{wording.fmt_pct(forget)}** ± {wording.fmt_pct(line.get(f'{forget_key}_std'))}"
        )
        col.caption(f"± {wording.fmt_pct(std)} · {forgetting}")
    by_method = {m: [r for r in done if r["config"].get("method") == m] for m in continual.METHODS}
    matrices = {m: continual.mean_matrix(rs, matrix_key) for m, rs in by_method.items() if rs}
    if not any(matrices.values()):
        st.info("These runs were trained before this view was measured: run the experiment again to see it.")
    look.show_plotly(continual_charts.accuracy_heatmaps(matrices, tasks), key="cl_heatmaps")
    look.show_plotly(continual_charts.accuracy_lines(matrices, tasks), key="cl_lines")
    look.show_plotly(
        continual_charts.summary_bars(summary, accuracy_key=avg_key, forgetting_key=forget_key), key="cl_summary"
    )
    look.show_plotly(continual_charts.diagnostics_bars(summary), key="cl_diagnostics")
    st.caption(
        "Who forgot? A drop from *right after learning* to *after the last task* that the *task given* accuracy "
        "does not show is old images assigned to newer classes (the heads never saw the tasks together). A drop "
        "of the *nearest-class-mean* accuracy (class means of the pooled training features, no head) means the "
        "features themselves got worse: that is what null-space prompts are meant to prevent."
    )
    recipes = sorted({str(r["config"].get("recipe", "compact")) for r in done})
    st.caption("Recipe: " + "; ".join(continual.RECIPE_LABELS.get(r, r) for r in recipes) + ".")
    with st.expander("Per run"):
        st.dataframe(
            [
                {
                    "run": r["id"],
                    "method": r["config"].get("method"),
                    "seed": r["config"].get("seed"),
                    **{k: r["metrics"].get(k) for k in continual.SUMMARY_KEYS},
                    "minutes": round((r.get("timings") or {}).get("train_seconds", 0) / 60, 1),
                }
                for r in done
            ],
            hide_index=True,
        )
        drift = {m: continual.mean_matrix(rs, "feature_drift") for m, rs in by_method.items() if rs}
        st.caption(
            "Feature drift: how far the pooled features of each task's test images moved since that task "
            "was learned (mean relative change), after each later task: "
            + "; ".join(
                f"{continual_charts.method_label(m)} {wording.fmt_pct(d[-1][0]) if d and len(d) > 1 else '-'}"
                for m, d in drift.items()
            )
            + " (task 1 after the last task)."
        )


with results:
    groups = continual.list_experiments(store)
    if not groups:
        st.info(
            "No continual experiment yet: pick the data, tasks and methods, then press **Run**.",
            icon="⬅️",
        )
        st.stop()
    by_id = {g["id"]: g for g in groups}
    if st.session_state.get("cl_experiment") not in by_id:
        st.session_state["cl_experiment"] = groups[0]["id"]
    chosen = st.selectbox(
        "Experiment", list(by_id), key="cl_experiment", format_func=lambda k: experiment_label(by_id[k])
    )
    live = any(r["status"] in LIVE for r in by_id[chosen]["rows"])

    def experiment_progress() -> None:
        rows = [store.get_run(r["id"]) for r in by_id[chosen]["rows"]]
        running = [r for r in rows if r is not None and r["status"] in LIVE]
        for r in running:
            event = store.latest_progress(r["id"])
            fraction, _ = wording.progress_of(r, event)
            task = f"task {event['task']}/{event['tasks']} · " if event and event.get("task") else ""
            eta = (
                f" · ETA {wording.fmt_duration(event.get('eta_s'))}" if event and event.get("eta_s") is not None else ""
            )
            st.progress(
                fraction,
                text=f"#{r['id']} {continual_charts.method_label(r['config'].get('method'))}, "
                f"seed {r['config'].get('seed')}: {r['status']} · {task}"
                f"epoch {event.get('epoch', '-') if event else '-'}{eta}",
            )
        if running and st.button("Cancel the remaining runs", key="cl_cancel", icon="✖️"):
            for r in running:
                store.request_cancel(r["id"])
            st.rerun(scope="fragment")

    # Only the progress bars poll; the results are drawn again when a run of the store changed (one of
    # this experiment's runs finished), not every second.
    follow(store, "continual", busy=live, small=experiment_progress, every_busy=1.0, every_idle=None)
    rows = [row for row in (store.get_run(r["id"]) for r in by_id[chosen]["rows"]) if row is not None]
    st.fragment(show_results)(rows)  # its view switch reruns only the results
