"""Runs: the whole history. Filter, sort, compare (only what differs), delete, export CSV / HTML."""

import datetime as dt

import pandas as pd
import streamlit as st

from vptdash.engine.train import RunConfig
from vptdash.runs.store import iso_timestamps
from vptdash.ui import jobqueue, resources, session
from vptdash.views import report, scope, wording

RESULT_COLUMNS = ["accuracy", "balanced_accuracy", "gmacs", "latency_ms_b1", "params_trainable"]
HIDDEN_IN_COMPARE = {"id", "created_at", "started_at", "finished_at", "duration_s", "sweep_id", "parent_id"}

store = resources.get_store()
st.title("Runs")

runs = store.list_runs()
if not runs:
    st.info("No runs yet. Train one on the Train page or run the meeting demo on Home.")
    st.stop()

frame = store.runs_frame()
by_id = {run["id"]: run for run in runs}
labels = {}
for spec in frame["dataset"].dropna().unique():
    labels[spec] = wording.dataset_label(spec)
frame.insert(2, "family", [wording.run_family(by_id[i]["config"]) for i in frame["id"]])
frame.insert(3, "label", [wording.run_label(by_id[i]) for i in frame["id"]])
frame.insert(4, "data set", [labels.get(spec, spec) for spec in frame["dataset"]])
frame["created"] = [dt.datetime.fromtimestamp(t) if t == t and t is not None else None for t in frame["created_at"]]
for column in RESULT_COLUMNS + ["shots", "resolution", "epochs", "seed", "backbone"]:
    if column not in frame:
        frame[column] = None

# ------------------------------------------------------------------------------------ filters
c = st.columns(4)
filters = {
    "status": c[0].multiselect(
        "Status", sorted(frame["status"].dropna().unique()), key="runs_f_status", placeholder="all"
    ),
    "data set": c[1].multiselect(
        "Data set", sorted(frame["data set"].dropna().unique()), key="runs_f_dataset", placeholder="all"
    ),
    "family": c[2].multiselect(
        "Family", sorted(frame["family"].dropna().unique()), key="runs_f_family", placeholder="all"
    ),
    "source": c[3].multiselect(
        "Source",
        sorted(frame["source"].dropna().unique()),
        key="runs_f_source",
        placeholder="all",
        help="precomputed = the reference sweep shipped with the app",
    ),
}
view = frame
for column, chosen in filters.items():
    if chosen:
        view = view[view[column].isin(chosen)]
view = view.reset_index(drop=True)

shown_columns = [
    "id",
    "status",
    "family",
    "label",
    "data set",
    "backbone",
    "shots",
    "resolution",
    "epochs",
    "seed",
    *RESULT_COLUMNS,
    "duration_s",
    "source",
    "created",
    "error",
]
st.markdown(f"**{len(view)} of {len(frame)} runs** · click a header to sort · select rows to compare or delete")
event = st.dataframe(
    view[shown_columns],
    key="runs_table",
    on_select="rerun",
    selection_mode="multi-row",
    hide_index=True,
    width="stretch",
    height="auto" if len(view) <= 10 else 480,
    column_config={
        **jobqueue.run_table_columns(),
        "status": "Status",
        "data set": "Data set",
        "backbone": "Backbone",
        "shots": st.column_config.NumberColumn("Shots", format="%d", width="small"),
        "resolution": st.column_config.NumberColumn("px", format="%d", width="small"),
        "epochs": st.column_config.NumberColumn("Epochs", format="%d", width="small"),
        "duration_s": st.column_config.NumberColumn("Took (s)", format="%.0f"),
        "created": st.column_config.DatetimeColumn("Created", format="YYYY-MM-DD HH:mm"),
        "error": st.column_config.TextColumn("Error", width="medium"),
    },
)
rows = [i for i in (event.selection.rows if event else []) if i < len(view)]
selected_ids = [int(view.iloc[i]["id"]) for i in rows]

# ------------------------------------------------------------------------------------ export
view_ids = set(int(i) for i in view["id"])
export = frame[frame["id"].isin(view_ids)].drop(columns=["created"])
e = st.columns([1, 1, 1, 3], vertical_alignment="bottom")


def build_csv(frame=export) -> bytes:  # built when clicked, on a separate thread: no st.* here
    return iso_timestamps(frame).to_csv(index=False).encode("utf-8")


e[0].download_button(
    "Export CSV",
    data=build_csv,
    file_name="vptdash-runs.csv",
    mime="text/csv",
    on_click="ignore",
    icon="⬇️",
    key="runs_csv",
    width="stretch",
)
# A report is about one data set and one setup: the listed (or selected) runs of one setup, the
# active one by default, never a mix.
finished = [by_id[i] for i in (selected_ids or sorted(view_ids)) if by_id[i]["status"] == "done"]
setups = scope.setups_in(finished)
report_setup = scope.default_setup(setups, session.active_setup())
if report_setup is not None:
    if st.session_state.get("runs_report_setup") not in setups:
        st.session_state["runs_report_setup"] = report_setup
    report_setup = e[3].selectbox(
        "Report on",
        setups,
        key="runs_report_setup",
        format_func=scope.describe,
        disabled=len(setups) == 1,
        help=f"The {'selected' if selected_ids else 'listed'} runs come from {len(setups)} "
        f"setup{'s' if len(setups) != 1 else ''}. A report covers one data set and one setup (backbone, "
        "resolution, shots): accuracies across them are not comparable.",
    )
report_rows = scope.runs_of_setup(finished, report_setup) if report_setup is not None else []
tolerance = float(st.session_state.get("budget_tolerance", 1.0))
convention = st.session_state.get("budget_convention") or "gmacs"  # the report states both; it charts this one
report_title = "vptdash: prompt budget report" + (f" · {scope.describe(report_setup)}" if report_rows else "")


def build_report(rows=report_rows, tolerance=tolerance, title=report_title, cost=convention) -> str:  # no st.*
    return report.build_html_report(rows, tolerance_points=tolerance, title=title, cost=cost)


e[1].download_button(
    "HTML report",
    data=build_report,
    file_name="vptdash-report.html",
    mime="text/html",
    on_click="ignore",
    icon="✉️",
    key="runs_report",
    width="stretch",
    disabled=not report_rows,
    help=f"A self-contained page with the charts and the recommendation for the {len(report_rows)} "
    f"finished {'selected' if selected_ids else 'listed'} runs of the setup chosen under 'Report on'.",
)
if e[2].button(
    f"Delete {len(selected_ids)} selected",
    key="runs_delete",
    disabled=not selected_ids,
    icon="✖️",
    width="stretch",
):
    st.session_state["runs_confirm_delete"] = selected_ids

doomed = [i for i in st.session_state.get("runs_confirm_delete") or [] if i in by_id]
if doomed:
    running = [i for i in doomed if by_id[i]["status"] == "running"]
    with st.container(border=True):
        st.warning(
            f"Delete {len(doomed)} run(s) ({', '.join(f'#{i}' for i in doomed[:12])}"
            f"{'...' if len(doomed) > 12 else ''}) with their learned prompts? This cannot be undone."
            + (
                f" Running runs ({', '.join(f'#{i}' for i in running)}) are cancelled first and kept; "
                "delete them once they stop."
                if running
                else ""
            )
        )
        c1, c2, _ = st.columns([1, 1, 4])
        if c1.button("Yes, delete", type="primary", key="runs_delete_yes", width="stretch"):
            for run_id in doomed:
                status = by_id[run_id]["status"]
                if status in ("queued", "running"):
                    store.request_cancel(run_id)
                if status != "running":
                    store.delete_run(run_id)
            st.session_state.pop("runs_confirm_delete", None)
            st.session_state.pop("runs_table", None)
            st.rerun()
        if c2.button("Keep them", key="runs_delete_no", width="stretch"):
            st.session_state.pop("runs_confirm_delete", None)
            st.rerun()

# ------------------------------------------------------------------------------------ compare
if len(selected_ids) >= 2:
    st.subheader(f"Compare {len(selected_ids)} runs: only what differs")
    picked = frame[frame["id"].isin(selected_ids)].set_index("id")
    settings = [k for k in RunConfig().to_dict() if k in picked.columns]
    results = [c for c in ["status", "source", *RESULT_COLUMNS] if c in picked.columns]

    def differing(columns):
        keep = []
        for column in columns:
            values = picked[column].map(lambda v: repr(v) if isinstance(v, (list, dict)) else v)
            if values.astype(str).nunique(dropna=False) > 1:
                keep.append(column)
        return keep

    def cell(column: str, value) -> str:
        number = wording.number(value) if not isinstance(value, (bool, str)) else None
        if number is None:
            return "-" if value is None or (isinstance(value, float) and value != value) else str(value)
        if column in ("accuracy", "balanced_accuracy"):
            return wording.fmt_pct(number)
        if column == "gmacs":
            return f"{number:.3f} GMACs"
        if column == "latency_ms_b1":
            return f"{number:.2f} ms"
        if column == "params_trainable":
            return f"{number:,.0f}"
        return f"{number:g}"

    diff_settings = differing(settings)
    shown_rows = diff_settings + differing(results)
    table = pd.DataFrame(
        {f"#{i} {wording.run_label(by_id[i])}": [cell(c, picked.at[i, c]) for c in shown_rows] for i in picked.index},
        index=shown_rows,
    )
    if not diff_settings:
        st.caption("These runs have the same settings (repeats).")
    st.dataframe(table, width="stretch")
elif len(selected_ids) == 1:
    st.caption("Select a second run to compare the settings that differ.")
