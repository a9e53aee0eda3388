"""Budget explorer: plan a sweep with its estimated cost, then read accuracy against cost and the
recommended budget as runs complete."""

import plotly.graph_objects as go
import streamlit as st

from vptdash.engine.prompts import PromptConfigError
from vptdash.engine.train import ConfigError
from vptdash.methods import search
from vptdash.runs import jobs
from vptdash.ui import jobqueue, look, resources, session
from vptdash.views import attention_charts, budget, charts, style, wording

METRICS = {"accuracy_mean": "Accuracy", "balanced_accuracy_mean": "Balanced accuracy"}
COST_TABS = {"latency_ms_b1": "Latency (ms)", "params_trainable": "Trainable parameters"}  # after compute

store = resources.get_store()
setup = session.active_setup()
st.title("Budget explorer")
st.caption(
    f"Accuracy against cost on **{wording.dataset_md(setup['dataset'], setup['cell_type'])}**: "
    "each point is one configuration (mean over seeds, bars = 95% interval; hollow circles = collapsed runs, "
    "left out of the means). Change the data set on the Data page."
)

# ------------------------------------------------------------------------------------ results
summary = store.queue_summary()
busy = bool(summary["running"] or summary["queued"])


@st.fragment(run_every=2.0 if busy else 10.0)  # slow poll when idle: runs from other tabs show up too
def results() -> None:
    setup = session.active_setup()
    sweep_id = st.session_state.get("last_sweep_id")
    if sweep_id:
        sweep = store.list_runs(sweep_id=sweep_id)
        finished = sum(1 for r in sweep if r["status"] in ("done", "failed", "cancelled"))
        if sweep and finished < len(sweep):
            st.progress(
                finished / len(sweep),
                text=f"Sweep: {finished} of {len(sweep)} runs finished; points appear as they complete.",
            )
        failed = [r for r in sweep if r["status"] == "failed"]
        if failed:
            st.error(
                f"{len(failed)} run(s) of the sweep failed, e.g. #{failed[0]['id']}: "
                f"{wording.md_escape(wording.first_line(failed[0].get('error')))}"
            )

    finished = store.list_runs(status="done", dataset=setup["dataset"])
    # the majority class's share is a property of the test set: every run on this data set knows it
    on_data, _ = budget.comparable_runs(finished, setup, same_setup=False)

    c = st.columns([2, 3, 3])
    metric = c[0].segmented_control(
        "Metric",
        list(METRICS),
        format_func=METRICS.get,
        key="budget_metric",
        default=budget.default_metric(
            budget.runs_table(on_data)
        ),  # balanced when one class is over 60% of the test set
        required=True,
        help="Balanced accuracy = mean recall over classes (honest on imbalanced data; the default when one "
        "class is over 60% of the test set). Accuracy's chance line is the majority class, balanced accuracy's 1/K.",
    )
    convention = c[1].segmented_control(
        "Compute counted as",
        list(budget.COMPUTE_CONVENTIONS),
        format_func=lambda key: budget.COMPUTE_CONVENTIONS[key].capitalize(),
        key="budget_convention",
        default="gmacs",  # what a deployment here pays
        required=True,
        help=budget.CONVENTION_HELP,
    )
    tolerance = c[2].slider(
        "Tolerance (accuracy points)",
        0.5,
        10.0,
        value=1.0,
        step=0.5,
        key="budget_tolerance",
        help="How much accuracy you would give up for a cheaper budget.",
    )
    c = st.columns([5, 3])
    match = c[1].toggle(
        f"Only `{setup['backbone']}`, {setup['resolution']} px",
        key="budget_match",
        value=True,
        help="Compare like with like: runs on the active backbone and resolution. Runs with another number "
        "of training images are never compared: pick the data size.",
    )
    groups, left_out = budget.runs_by_size(finished, setup, same_setup=match)
    sizes = budget.size_options(groups)
    if st.session_state.get("budget_size") not in sizes:
        st.session_state.pop("budget_size", None)  # a size no run has any more (another data set)
    size = (
        c[0].segmented_control(
            "Data size",
            sizes,
            format_func=budget.size_label,
            key="budget_size",
            default=budget.default_size(sizes, setup["shots"]),
            required=True,
            help="Training images per class. Runs of different sizes are never compared with each other; "
            "side by side gives each size its own chart and answer.",
        )
        if sizes
        else None
    )
    shown_groups = budget.chosen_sizes(groups, size)
    table = budget.runs_table([run for rows in shown_groups.values() for run in rows])
    if left_out and not groups:
        st.info(
            f"{left_out} finished run(s) on this data set use another backbone or resolution: "
            "turn the switch off to see them."
        )
    metric = metric or "accuracy_mean"
    convention = convention or "gmacs"
    cost_tabs = {convention: "Compute (GMACs)", **COST_TABS}  # the axis names the convention
    agg_all = budget.aggregate_over_seeds(table)  # configurations of every size shown (shots is in the key)
    st.session_state["budget_points"] = len(agg_all)

    chart_col, table_col = st.columns([5, 2], gap="medium")
    with table_col:
        st.markdown(f"**{len(table)} finished runs** · select rows to highlight them")
        shown = table[
            [  # accuracy before the long label: the narrow column must not cut it off
                "id",
                "accuracy",
                "label",
                "balanced_accuracy",
                "shots",
                "seed",
                "gmacs",
                "gmacs_full_graph",
                "latency_ms_b1",
                "params_trainable",
                "family",
                "source",
            ]
        ].reset_index(drop=True)
        event = st.dataframe(
            shown,
            key="budget_table",
            on_select="rerun",
            selection_mode="multi-row",
            hide_index=True,
            width="stretch",
            height=700,
            column_config={
                **jobqueue.run_table_columns(),
                "accuracy": st.column_config.NumberColumn("Accuracy", format="percent", pinned=True),
                "shots": st.column_config.NumberColumn(
                    "Images / class", format="%d", help="Empty: the full training split"
                ),
                "gmacs": st.column_config.NumberColumn(
                    "GMACs (executed graph)", format="%.3f", help=budget.CONVENTION_HELP
                ),
                "gmacs_full_graph": st.column_config.NumberColumn(
                    "GMACs (full graph)", format="%.3f", help=budget.CONVENTION_HELP
                ),
            },
        )
        selected = [int(shown.iloc[i]["id"]) for i in (event.selection.rows if event else []) if i < len(shown)]
    with chart_col:
        if not len(table):
            st.info(
                "No finished runs for this setup yet. Plan and queue a sweep below, or run the meeting demo on Home."
            )
        tabs = st.tabs(list(cost_tabs.values()))
        for tab, cost in zip(tabs, cost_tabs):
            with tab:
                answers = budget.answers_by_size(shown_groups, tolerance, cost=cost, metric=metric)
                if not answers:  # the empty chart, with its axes, says what will appear
                    look.show_plotly(charts.cost_accuracy_figure(None, cost=cost), key=f"budget_chart_{cost}")
                panels = st.columns(len(answers)) if len(answers) > 1 else [st.container()]
                for panel, answer in zip(panels, answers):
                    with panel:
                        if len(answers) > 1:
                            st.markdown(f"##### {answer.heading}")
                        if answer.recommendation is not None:
                            st.success(f"#### {wording.md_escape(answer.recommendation.sentence)}", icon="✔️")
                        fig = charts.cost_accuracy_figure(
                            answer.agg,
                            cost=cost,
                            metric=metric,
                            recommendation=answer.recommendation,
                            highlight_ids=selected,
                            title=answer.heading if len(answers) > 1 else None,
                        )
                        # condensed runs: an arrow from each parent to its condensed child (before/after on hover)
                        attention_charts.add_condensation_arrows(
                            fig, answer.agg, answer.table, cost=cost, metric=metric
                        )
                        # legend under the plot: the points get the width (projector)
                        fig.update_layout(
                            legend={"orientation": "h", "x": 0, "y": -0.16, "yanchor": "top"},
                            margin={"b": 40},
                            height=680 if len(answers) == 1 else 560,
                        )
                        look.show_plotly(fig, key=f"budget_chart_{cost}_{answer.key}")
                        if answer.cost_unknown:
                            st.markdown(
                                "**Cost unknown**, so not drawn and never recommended:\n"
                                + "\n".join(f"- {wording.md_escape(line)}" for line in answer.cost_unknown)
                            )
        collapsed = budget.collapsed_lines(agg_all)
        if collapsed:
            st.markdown(
                f"**○ {len(collapsed)} collapsed run{'s' if len(collapsed) != 1 else ''}**, drawn hollow and left "
                "out of every mean and of the recommendation:\n"
                + "\n".join(f"- {wording.md_escape(line)}" for line in collapsed)
            )
    sources = set(table["source"].dropna()) if len(table) else set()
    if "precomputed" in sources:
        info = resources.reference_info() or {}
        details = ", ".join(f"{k}: {info[k]}" for k in ("machine", "date") if info.get(k))
        command = f" with `{info['command']}`" if info.get("command") else ""
        st.caption(
            f"● Circles are **precomputed** reference points shipped with the app, computed{command}"
            f"{' (' + details + ')' if details else ''}. ◆ Diamonds are runs made here."
        )


results()

# ------------------------------------------------------------------------------------ plan a sweep
done_here = store.list_runs(status="done", dataset=setup["dataset"], limit=1)
with st.expander("Plan a sweep: estimated cost before anything runs", expanded=not done_here, icon="⚙️"):
    c = st.columns([3, 2, 2, 1, 1])
    counts = c[0].multiselect(
        "Prompt counts",
        session.PROMPT_COUNTS,
        default=[0, 1, 5, 10, 50],
        key="budget_counts",
        help="0 = the linear probe (always included).",
    )
    placements = c[1].multiselect(
        "Placements", ["shallow", "deep"], default=["shallow", "deep"], key="budget_placements"
    )
    custom = c[2].text_input(
        "Custom blocks (optional)",
        key="budget_custom",
        placeholder="e.g. 8,9,10,11",
        help="One more placement: prompts in these blocks only (0 = first block).",
    )
    n_seeds = c[3].number_input(
        "Seeds",
        min_value=1,
        max_value=10,
        value=1,
        step=1,
        key="budget_seeds",
        help="Each configuration is trained with seeds 0..n-1: the spread shows the noise.",
    )
    epochs = c[4].number_input("Epochs", min_value=1, max_value=500, value=10, step=1, key="budget_epochs")
    grid_placements = list(placements) + ([custom.replace(" ", "")] if custom.strip() else [])
    shots = setup["shots"]
    st.caption(
        f"Backbone `{setup['backbone']}` at {setup['resolution']} px, "
        f"{'all' if shots is None else shots} training images per class (change them on the Train page)."
    )

    shape, backbone_error = resources.backbone_shape_or_error(setup["backbone"], setup["resolution"])
    n_classes = resources.num_classes(setup["dataset"], setup["resolution"], setup["cell_type"])
    grid, configs, problem = None, [], None
    if backbone_error:
        problem = f"Backbone `{setup['backbone']}` cannot be built here: {wording.md_escape(backbone_error)}"
    elif n_classes is None:
        problem = "The active data set cannot be loaded: pick another one on the Data page."
    elif not counts or (not grid_placements and any(counts)):
        problem = "Pick at least one prompt count and one placement."
    else:
        try:
            grid = budget.estimate_grid(
                shape["depth"],
                shape["embed_dim"],
                shape["mlp_dim"],
                shape["num_patches"],
                shape["patch_size"],
                n_classes,
                [int(x) for x in counts],
                grid_placements or ["shallow"],
                num_prefix_tokens=shape["num_prefix_tokens"],
                has_class_token=shape["has_class_token"],
                row_selection=shape["row_selection"],
            )
            configs = jobs.sweep_configs(
                session.base_config(epochs=int(epochs)),
                [int(x) for x in counts],
                grid_placements or ["shallow"],
                list(range(int(n_seeds))),
            )
            for config in configs:
                config.validate(depth=shape["depth"])
        except (PromptConfigError, ConfigError, ValueError) as exc:
            problem, grid, configs = str(exc), None, []
    if problem:
        st.warning(problem)
    if grid is not None and len(grid):
        left, right = st.columns([3, 2], gap="large")
        with left:
            fig = go.Figure()
            for family in budget.ordered_families(grid["family"]):
                rows = grid[grid["family"] == family]
                fig.add_trace(
                    go.Bar(
                        x=rows["label"].tolist(),
                        y=rows["gmacs_analytic"].astype(float).tolist(),
                        name=family,
                        marker_color=style.family_color(family),
                        customdata=rows[["relative_cost", "params_trainable", "tokens"]].to_numpy().tolist(),
                        hovertemplate="%{x}<br>%{y:.3f} GMACs per image (x%{customdata[0]:.2f} the linear probe)"
                        "<br>%{customdata[1]:,} trainable parameters<br>%{customdata[2]} tokens"
                        "<extra></extra>",
                    )
                )
            fig.update_layout(
                template="plotly_white",
                font={"size": 17},
                height=420,
                bargap=0.25,
                title={"text": "Estimated compute per configuration", "font": {"size": 22}},
                yaxis_title="GMACs per image (analytic)",
                xaxis_title="Configuration",
                margin={"l": 70, "r": 20, "t": 70, "b": 90},
                legend_title_text="Family",
            )
            look.show_plotly(fig, key="budget_estimate_chart")
        with right:
            st.dataframe(
                grid[["label", "tokens", "gmacs_analytic", "relative_cost", "params_trainable"]],
                hide_index=True,
                width="stretch",
                column_config={
                    "label": "Configuration",
                    "tokens": st.column_config.NumberColumn("Tokens", help="Sequence length through the blocks"),
                    "gmacs_analytic": st.column_config.NumberColumn("GMACs", format="%.3f", help="Per image, analytic"),
                    "relative_cost": st.column_config.NumberColumn(
                        "× probe", format="%.2f", help="Compute relative to the linear probe"
                    ),
                    "params_trainable": st.column_config.NumberColumn("Trainable", format="compact"),
                },
            )
            st.caption(
                "Analytic count of multiply-adds per image: grows with the tokens prompts add. "
                "Deep prompts are only read by the block they are written to (the next block "
                "replaces them), so at the same count they cost less compute than shallow ones, "
                "while training many more parameters."
            )
    n_runs = len(configs)
    if st.button(
        f"Queue {n_runs} run{'s' if n_runs != 1 else ''}",
        type="primary",
        key="budget_queue",
        disabled=not configs,
        icon="▶️",
    ):
        sweep_id = jobqueue.queue_sweep(store, configs, "Not queued")
        if sweep_id:
            st.session_state["last_sweep_id"] = sweep_id
            st.rerun()

# ------------------------------------------------------------------------------------ search instead of a grid
with st.expander("Search instead of the grid: the cheapest budget within X points", icon="✳️"):
    st.caption(
        "Tries every configuration above once, then spends seeds only where they could change the answer. "
        "Its runs land here like a sweep's. Replayed on the reference sweep: docs/results.md."
    )
    c = st.columns([2, 2, 2, 2])
    search_tolerance = c[0].slider("Within (points)", 0.5, 10.0, value=1.0, step=0.5, key="search_tolerance")
    search_types = c[1].multiselect(
        "Prompt types", ["standard", "bilinear", "bilinear-whitened"], default=["standard"], key="search_types"
    )
    search_skips = c[2].text_input(
        "Blocks to skip (options)", key="search_skips", placeholder="none;10,11", help="';' between options"
    )
    grid_size = len(configs) * max(1, len(search_types)) * max(1, len([p for p in search_skips.split(";") if p]))
    search_budget = c[3].number_input(
        "Run budget",
        min_value=1,
        max_value=max(1, grid_size),
        value=max(1, -(-2 * grid_size // 5)),
        key="search_budget",
    )
    try:
        skip_options = [
            [int(b) for b in p.split(",") if b.strip()] if p.strip() not in ("", "none") else []
            for p in (search_skips or "none").split(";")
        ]
        search_spec = search.SearchSpec(
            prompt_counts=[int(x) for x in counts],
            placements=grid_placements or ["shallow"],
            prompt_types=search_types or ["standard"],
            skip_options=skip_options,
            seeds=list(range(int(n_seeds))),
            tolerance=float(search_tolerance),
            max_runs=int(search_budget),
        )
    except ValueError as exc:
        search_spec = None
        st.warning(f"Blocks to skip: {wording.md_escape(exc)}")
    if st.button("Start the search", key="search_start", disabled=not configs or search_spec is None):
        try:
            search_id = search.submit_search(store, session.base_config(epochs=int(epochs)), search_spec)
        except ConfigError as exc:
            st.error(f"Not started: {wording.md_escape(exc)}")
        else:
            st.session_state["last_search_id"] = search_id
            jobqueue.start_worker(store)

    @st.fragment(run_every=2.0)
    def search_progress() -> None:
        search_id = st.session_state.get("last_search_id")
        row = store.get_run(search_id) if search_id else None
        if row is None:
            return
        state = search.search_state(store, search_id) or {}
        runs, budget_runs = state.get("runs", 0), state.get("budget") or 1
        if row["status"] in ("queued", "running"):
            st.progress(min(1.0, runs / budget_runs), text=f"Search #{search_id}: {runs} of at most {budget_runs} runs")
        elif row["status"] == "failed":
            st.error(f"Search #{search_id} failed: {wording.first_line(row.get('error'))}")
        chosen, best = state.get("chosen"), state.get("best")
        if chosen:
            text = (
                f"{'Answer' if row['status'] == 'done' else 'Current answer'}: **{chosen['label']}** "
                f"({100 * chosen['mean']:.1f}% over {chosen['seeds']} seed(s)); best seen: {best['label']} "
                f"({100 * best['mean']:.1f}%), after {runs} of the grid's {state['grid_runs']} runs"
            )
            if state.get("open_contenders") and row["status"] == "done":
                text += f"; {state['open_contenders']} configuration(s) could still change it with more seeds"
            st.markdown(text + ".")

    search_progress()
