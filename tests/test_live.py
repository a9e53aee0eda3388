"""The mechanism behind pages that redraw only when the run store changed (vptdash.ui.live), under
AppTest: a builder runs again only when its token changes; the poller reruns the page only when the
counter it watches moved."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from vptdash.runs.store import RunStore
from vptdash.ui import live

TIMEOUT = 30


def memo_script() -> None:
    import streamlit as st

    from vptdash.ui import live

    token = st.session_state.get("token", 0)
    builds = st.session_state.setdefault("builds", [])
    value = live.memo("figure", token, lambda: builds.append(token) or f"figure {token}")
    st.write(value)


def test_memo_builds_once_per_token():
    at = AppTest.from_function(memo_script, default_timeout=TIMEOUT)
    at.run()
    at.run()
    at.run()
    assert at.session_state["builds"] == [0]  # three page runs, one build
    at.session_state["token"] = 1
    at.run()
    at.run()
    assert at.session_state["builds"] == [0, 1]
    at.session_state["token"] = 0  # one entry per key: an older token builds again
    at.run()
    assert at.session_state["builds"] == [0, 1, 0]
    assert at.markdown[0].value == "figure 0"


def test_changed_watches_one_counter():
    seen = live.Versions(runs=3, progress=10)
    assert not live.changed(seen, live.Versions(3, 11), "runs")  # a progress tick: the page stays
    assert live.changed(seen, live.Versions(3, 11), "progress")
    assert live.changed(seen, live.Versions(4, 10), "runs")
    assert live.changed(None, seen, "runs")  # never drawn: draw


def test_versions_move_with_runs_and_progress_only(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    start = live.versions(store)
    run_id = store.create_run({"dataset": "x"}, status="running")
    after_create = live.versions(store)
    assert after_create.runs > start.runs and after_create.progress == start.progress
    store.append_progress(run_id, {"phase": "train", "step": 1})
    after_tick = live.versions(store)
    assert after_tick.runs == after_create.runs and after_tick.progress > after_create.progress
    assert live.versions(store) == after_tick  # reading changes nothing


def test_unreadable_store_reads_as_unknown_versions():
    class Broken:
        def versions(self):
            raise OSError("database is locked")

    assert live.versions(Broken()) == live.Versions(-1, -1)
