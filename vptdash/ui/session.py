"""The active setup every page agrees on (data set, backbone, resolution, shots), and the widgets
bound to it. Each browser session works on its own copy; every change is also saved with the run
store, so a reload or a second tab starts from the setup last chosen rather than from ELPV."""

from __future__ import annotations

import math
from typing import Any

import streamlit as st

from vptdash.engine import backbones, paths
from vptdash.engine.train import RunConfig
from vptdash.runs.store import RunStore

# The offline defaults every session starts from (README: "works with no network").
DEFAULT_SETUP: dict[str, Any] = {
    "dataset": "elpv-binary",
    "cell_type": None,
    "backbone": backbones.DEFAULT_BACKBONE,
    "resolution": 112,
    "shots": 16,
    "test_fraction": 0.25,
}


SETUP_KEYS = tuple(DEFAULT_SETUP)


PROMPT_COUNTS = [0, 1, 5, 10, 25, 50, 100, 200]


SETTING_KEY = "active_setup"  # where the run store keeps it


@st.cache_resource(show_spinner=False)
def _settings_store(path: str) -> RunStore:
    return RunStore(path)


def _valid(key: str, value: Any) -> bool:
    """Whether a saved value can stand for `key` (a file written by another version, or by hand)."""
    if key in ("dataset", "backbone"):
        return isinstance(value, str) and bool(value.strip())
    if key == "cell_type":
        return value in (None, "mono", "poly")
    if key == "resolution":
        return isinstance(value, int) and not isinstance(value, bool) and 16 <= value <= 1024
    if key == "shots":
        return value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
    if key == "test_fraction":
        return isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1
    return False


def saved_setup() -> dict:
    """The setup last saved with the run store: only known keys with usable values ({} if none)."""
    try:
        saved = _settings_store(str(paths.store_path())).get_setting(SETTING_KEY, {})
    except Exception:  # noqa: BLE001 - an unreadable store: start from the defaults, never fail a page
        return {}
    if not isinstance(saved, dict):
        return {}
    return {key: value for key, value in saved.items() if key in DEFAULT_SETUP and _valid(key, value)}


def save_setup() -> None:
    """Keep this session's active setup with the run store (best effort: a locked store skips it)."""
    try:
        _settings_store(str(paths.store_path())).set_setting(SETTING_KEY, active_setup())
    except Exception:  # noqa: BLE001 - saving is a convenience; the session keeps its own copy anyway
        pass


def init_state() -> None:
    """Seed the active setup once per session: the setup saved with the run store, else the offline
    defaults (values already in the session, e.g. set by a test, are kept)."""
    if st.session_state.get("active_seeded"):
        return
    values = {**DEFAULT_SETUP, **saved_setup()}
    for key, value in values.items():
        st.session_state.setdefault(f"active_{key}", value)
    st.session_state["active_seeded"] = True


def active(key: str) -> Any:
    init_state()
    return st.session_state[f"active_{key}"]


def set_active(**values: Any) -> None:
    for key, value in values.items():
        if key not in DEFAULT_SETUP:
            raise KeyError(key)
        st.session_state[f"active_{key}"] = value
    save_setup()


def active_setup() -> dict:
    init_state()
    return {key: st.session_state[f"active_{key}"] for key in SETUP_KEYS}


def base_config(**overrides: Any) -> RunConfig:
    """A RunConfig on the active setup (dataset, backbone, resolution, shots, test fraction)."""
    values = active_setup()
    return RunConfig(**{**values, **overrides})


def bind(widget_key: str, active_key: str, convert=None) -> dict:
    """Keyword arguments that tie a widget to an active-setup value: its own key (widget state
    is dropped when a page is left) and an on_change callback copying the value back (through
    `convert`). Callbacks run before the script, so the sidebar drawn before the page already
    shows the new value. Pass the current active value as the widget's value/index yourself:
    explicit defaults survive a page switch race in which seeded session-state values do not."""

    def _copy() -> None:
        value = st.session_state[widget_key]
        st.session_state[f"active_{active_key}"] = convert(value) if convert else value
        save_setup()

    return {"key": widget_key, "on_change": _copy}


SHOT_CHOICES = [1, 2, 4, 8, 16, 32, 64, 128]


def shots_widget(widget_key: str, label: str = "Training images per class (shots)") -> None:
    """The few-shot control, the same on every page (None = the whole training split)."""
    current = active("shots")
    options = sorted(set(SHOT_CHOICES) | ({int(current)} if current is not None else set())) + ["all"]
    st.select_slider(
        label,
        options,
        value="all" if current is None else int(current),
        format_func=str,
        help="Few-shot: only this many training images per class are used. Validation and test images "
        "do not change with it.",
        **bind(widget_key, "shots", convert=lambda v: None if v == "all" else int(v)),
    )
