"""Pages that follow the run store without redrawing on a timer.

A fragment with `run_every` re-executes everything in it on every tick, changed or not: a Budget
explorer that rebuilt its figures and table every 2 s while a job trained kept a core of a 2-core
laptop busy drawing the same picture. Instead a page draws its heavy part once per change of the
run store, and only a tiny fragment polls:

    versions = live.follow(store, "budget", small=progress_bar)  # polls the store's change counters
    figure = live.memo("budget_figure", (versions.runs, metric), lambda: build_figure(...))

`follow` reads `RunStore.versions()` (two integers kept by SQLite triggers: one read) on its timer and
reruns the page only when the counter the page watches moved; between changes only `small` (a
progress bar) runs. `memo` keeps a builder's last result per session and key, and builds again only
when its token (a counter, widget values) differs: a rerun for any other reason (a click elsewhere on
the page, the poll after a run was claimed) reuses the figures. A fragment rerun must draw its whole
content again (what it does not draw disappears), so returning early is no way to skip a redraw.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import NamedTuple, TypeVar

import streamlit as st

from vptdash.runs.store import RunStore

T = TypeVar("T")

POLL_BUSY_S = 2.0  # while a job runs: a finished run shows up within this
POLL_IDLE_S = 10.0  # idle: still notices runs queued or finished from another tab or the CLI

MEMO_STATE = "live_memo"  # session_state: {key: (token, value)}
SEEN_STATE = "live_seen"  # session_state: {page key: versions when the page was last drawn}


class Versions(NamedTuple):
    runs: int  # any run created, claimed, updated, finished or deleted
    progress: int  # any progress event written


def versions(store: RunStore) -> Versions:
    """The store's change counters; (-1, -1) when the store cannot be read (a page then draws as
    usual, and the next readable poll counts as a change)."""
    try:
        return Versions(*store.versions())
    except Exception:  # noqa: BLE001 - a locked or broken store must not take the page down
        return Versions(-1, -1)


def memo(key: str, token: Hashable, build: Callable[[], T]) -> T:
    """`build()`'s result, built again only when `token` differs from the one it was last built with
    under `key` in this session (one entry per key: memory stays bounded)."""
    cache = st.session_state.setdefault(MEMO_STATE, {})
    hit = cache.get(key)
    if hit is not None and hit[0] == token:
        return hit[1]
    value = build()
    cache[key] = (token, value)
    return value


def changed(seen: Versions | None, now: Versions, watch: str) -> bool:
    """Whether the `watch` counter ("runs" or "progress") moved between two readings."""
    return seen is None or getattr(seen, watch) != getattr(now, watch)


def follow(
    store: RunStore,
    key: str,
    *,
    busy: bool,
    watch: str = "runs",
    small: Callable[[], None] | None = None,
    every_busy: float = POLL_BUSY_S,
    every_idle: float | None = POLL_IDLE_S,
) -> Versions:
    """Note the store's versions as this page run draws with them, and start the page's poller: a
    fragment that, on its timer (`every_busy` while `busy`, else `every_idle`; None: never), reruns the
    whole page when the `watch` counter moved since, and otherwise only draws `small`. Call it before
    the page reads the runs it draws, at the place where `small` should appear. Returns the versions."""
    now = versions(store)
    seen = st.session_state.setdefault(SEEN_STATE, {})
    seen[key] = now

    @st.fragment(run_every=every_busy if busy else every_idle)
    def poll() -> None:
        latest = versions(store)
        if changed(seen.get(key), latest, watch):
            seen[key] = latest  # one rerun per change, even if the rerun is slow to start
            st.rerun()
        if small is not None:
            small()

    poll()
    return now
