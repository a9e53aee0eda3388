"""The sidebar on every page: the active setup and the live job queue, and queueing runs for the
background worker."""

from __future__ import annotations

import os
import time
from typing import Any

import streamlit as st

from vptdash.engine.train import ConfigError, RunConfig
from vptdash.runs import eta, jobs, worker
from vptdash.runs.store import RunStore, StoreError, pid_alive
from vptdash.ui import live
from vptdash.ui.cluster import cluster_setting
from vptdash.ui.session import active_setup
from vptdash.views.wording import dataset_md, is_elpv, md_escape, progress_of, run_label

QUEUE_POLL_BUSY_S = 1.0  # sidebar refresh while something runs


WORKER_START_GRACE_S = 20.0  # a fresh worker process takes a few seconds to import torch


QUEUE_POLL_IDLE_S = 3.0  # ... and while idle (notices runs queued from another tab)


ANNOUNCE_AT_MOST = 3  # toasts per poll: a finished sweep announces its first results and a count
# Markdown/HTML specials backslash-escaped, control characters and line breaks made spaces
_LITERAL = {ord(c): "\\" + c for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"}
_LITERAL.update({code: " " for code in [*range(32), 127, 0x2028, 0x2029]})


def _literal(text: object) -> str:
    """`text` shown literally in a toast (Markdown): run labels carry users' placement strings."""
    return str(text).translate(_LITERAL)


def announcement(run: dict) -> str:
    """The toast for a run made here that just finished: its number, label and test accuracy."""
    accuracy = (run.get("metrics") or {}).get("accuracy")
    tail = f": {100 * float(accuracy):.1f}% test accuracy" if isinstance(accuracy, (int, float)) else ""
    return _literal(f"New result #{run['id']} {run_label(run)}{tail}")


def announce_new_results(store: RunStore, summary: dict) -> list[int]:
    """Toast each run made here (not precomputed) that finished since this session last looked;
    the first look only takes note. Reads the run list only when the count of finished runs moved.
    Returns the ids announced."""
    seen = st.session_state.get("queue_seen_done")
    if seen is not None and seen[0] == summary["done"]:
        return []
    done = store.list_runs(status="done")
    ids = {run["id"] for run in done}
    st.session_state["queue_seen_done"] = (summary["done"], ids)
    if seen is None:
        return []
    fresh = sorted(
        (run for run in done if run["id"] not in seen[1] and run["source"] != "precomputed"), key=lambda r: r["id"]
    )
    for run in fresh[:ANNOUNCE_AT_MOST]:
        st.toast(announcement(run), icon="✔️")
    if len(fresh) > ANNOUNCE_AT_MOST:
        st.toast(f"... and {len(fresh) - ANNOUNCE_AT_MOST} more new results", icon="✔️")
    return [run["id"] for run in fresh]


def progress_line(store: RunStore, run: dict, event: dict | None) -> tuple[float, str]:
    """`progress_of` with the ETA over every phase: the history of earlier runs of the same architecture
    is read once per change of the runs, not on every poll."""
    history = None
    if run.get("kind") in eta.TRAINING_KINDS:
        history = live.memo(
            f"eta_history_{run['id']}", live.versions(store).runs, lambda: eta.phase_history(store, run["config"])
        )
    return progress_of(run, event, history=history)


def start_worker(store: RunStore) -> None:
    """Queue consumers call this after submitting: start the background worker if none runs."""
    worker.ensure_worker(store)


@st.cache_resource(show_spinner=False)
def _adopt_once(path: str, _store: RunStore) -> bool:
    try:
        if worker.adopt(_store):
            return True
        if _store.queue_summary()["queued"]:
            worker.ensure_worker(_store)
            return True
        if not os.environ.get("VPTDASH_NO_WARMUP"):
            # A worker that waits with the demo's backbone and images loaded: the first press of the demo
            # skips the worker's start (imports) and that loading. It exits after 10 idle minutes.
            worker.ensure_worker(_store, warm=True)
            return True
    except Exception:  # noqa: BLE001 - a locked store must not take the app down; queueing starts one too
        return False
    return False


def adopt_worker(store: RunStore) -> bool:
    """Once per server process: a worker left by an earlier server (still finishing a job) follows
    this one now, and runs queued before a restart start again; with neither, a warm worker is started
    to wait for the first job (not with VPTDASH_NO_WARMUP=1). True if a worker serves the store."""
    return _adopt_once(str(store.path), store)


def queue_sweep(store: RunStore, configs: list[RunConfig], failure: str) -> str | None:
    """Queue a sweep and start the worker; the sweep id, or None after showing `failure: reason`."""
    try:
        sweep_id, _ = jobs.submit_sweep(store, configs)
    except (ConfigError, StoreError) as exc:
        st.error(f"{failure}: {md_escape(exc)}")
        return None
    start_worker(store)
    return sweep_id


def run_table_columns() -> dict[str, Any]:
    """Column settings shared by every run table (Budget explorer, Runs), so they read the same."""
    number = st.column_config.NumberColumn
    return {
        "id": number("Run", format="%d", width="small"),
        "label": "Configuration",
        "family": "Family",
        "source": "Source",
        "seed": number("Seed", format="%d", width="small"),
        "accuracy": number("Accuracy", format="percent"),
        "balanced_accuracy": number("Balanced", format="percent"),
        "gmacs": number(
            "GMACs (executed)",
            format="%.3f",
            help="Per image, the executed graph: what runs here (deep prompts as keys and values only, the last "
            "block computes only the class token). Published tables count the full graph: every token through "
            "every block.",
        ),
        "gmacs_full_graph": number(
            "GMACs (full graph)",
            format="%.3f",
            help="Per image, every token through every block: the convention of published FLOPs tables.",
        ),
        "latency_ms_b1": number("ms / image", format="%.2f"),
        "params_trainable": number("Trainable", format="compact"),
    }


def sidebar(store: RunStore, *, licence: bool = True) -> None:
    """Active setup + live job queue, on every page (`licence=False` where the page shows it itself)."""
    setup = active_setup()
    with st.sidebar:
        st.markdown("#### Active setup")
        shots = setup["shots"]
        st.markdown(
            f"**Data** {dataset_md(setup['dataset'], setup['cell_type'])}  \n"
            f"**Backbone** {md_escape(setup['backbone'])}  \n"
            f"**Images** {setup['resolution']} px · "
            f"{'all' if shots is None else shots} shots per class"
        )
        if licence and is_elpv(setup["dataset"]):
            st.caption("ELPV: CC BY-NC-SA 4.0, Buerhop-Lutz, Deitsch et al. (ZAE Bayern / FAU)")
        st.markdown("#### Job queue")
        _queue_panel(store)
    cluster_setting(store)


def _queue_panel(store: RunStore) -> None:
    try:
        summary = store.queue_summary()
    except Exception as exc:  # noqa: BLE001 - a locked/broken store must not crash every page
        st.warning(f"Run store unavailable: {md_escape(exc)}")
        return
    busy = bool(summary["running"] or summary["queued"])

    # No st.rerun() from here on purpose: an app rerun started by a fragment right after
    # st.switch_page resets the new page's widgets (Streamlit 1.67); pages refresh themselves.
    @st.fragment(run_every=QUEUE_POLL_BUSY_S if busy else QUEUE_POLL_IDLE_S)
    def queue_fragment() -> None:
        try:
            now_summary = store.queue_summary()
        except Exception as exc:  # noqa: BLE001
            st.warning(f"Run store unavailable: {md_escape(exc)}")
            return
        render_queue(store, now_summary)
        announce_new_results(store, now_summary)

    queue_fragment()


def _worker_gone(run: dict) -> bool:
    pid = run.get("worker_pid")
    if not pid:
        return False
    try:
        return not pid_alive(int(pid))
    except (OSError, ValueError):
        return False


def render_queue(store: RunStore, summary: dict) -> None:
    running = summary["running"]
    if any(_worker_gone(run) for run in running) and not store.read_only:  # killed worker: failed, not running
        store.fail_orphaned_runs()
        summary = store.queue_summary()
        running = summary["running"]
    if not running and not summary["queued"]:
        st.caption("Idle: nothing running.")
    for run in running:
        fraction, text = progress_line(store, run, run.get("latest_progress"))
        st.progress(fraction, text=f"#{run['id']} {md_escape(run_label(run))}: {md_escape(text)}")
    parts = [f"{summary['queued']} queued", f"{summary['done']} done"]
    if summary["failed"]:
        parts.append(f"{summary['failed']} failed")
    if summary["cancelled"]:
        parts.append(f"{summary['cancelled']} cancelled")
    st.caption(" · ".join(parts))
    if summary["queued"] and not running and not worker.worker_alive(store):
        waiting = store.list_runs(status="queued")
        oldest = min((run["created_at"] for run in waiting), default=time.time())
        if time.time() - oldest > WORKER_START_GRACE_S:  # a worker just started needs a few seconds
            st.warning("Runs are queued but no worker is running.")
            # A callback, not `if st.button(...)` + st.rerun(scope="fragment"): it runs before whichever rerun
            # the click causes (a fragment rerun in the browser, a full one under AppTest), so no explicit
            # rerun is needed, and a fragment-scoped rerun cannot be called outside a fragment rerun.
            st.button("Start worker", key="sidebar_start_worker", on_click=start_worker, args=(store,))
