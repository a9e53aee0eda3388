"""The active setup every page agrees on (data set, backbone, resolution, shots), kept in the
browser session, and the widgets bound to it."""

from __future__ import annotations

from typing import Any

import streamlit as st

from vptdash.engine import backbones
from vptdash.engine.train import RunConfig

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


def init_state() -> None:
    """Seed the active setup with the offline defaults (once per session)."""
    for key, value in DEFAULT_SETUP.items():
        st.session_state.setdefault(f"active_{key}", value)


def active(key: str) -> Any:
    init_state()
    return st.session_state[f"active_{key}"]


def set_active(**values: Any) -> None:
    for key, value in values.items():
        if key not in DEFAULT_SETUP:
            raise KeyError(key)
        st.session_state[f"active_{key}"] = value


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
