"""Small shared Streamlit helpers for the dashboard's pages.

Only layout glue lives here: cached resources (the run store, backbones, image sets), the active
setup in `st.session_state` that every page agrees on, the sidebar with the job queue, and number
formatting. Anything that computes an answer belongs to the library (`budget`, `charts`, `jobs`...).

Nothing here keeps module-level mutable state: two browser tabs share only the run store.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import streamlit as st

from vptdash import backbones, data, paths, worker
from vptdash.store import RunStore
from vptdash.train import ConfigError, RunConfig

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
QUEUE_POLL_BUSY_S = 1.0   # sidebar refresh while something runs
WORKER_START_GRACE_S = 20.0  # a fresh worker process takes a few seconds to import torch
QUEUE_POLL_IDLE_S = 3.0   # ... and while idle (notices runs queued from another tab)
ELPV_ATTRIBUTION = data.ELPV_LICENSE


# ---------------------------------------------------------------------------------------- demo
def demo_configs() -> list[RunConfig]:
    """The one-click meeting demo: a small sweep on ELPV few-shot that finishes in about a minute.
    The preset itself lives in the library (`presets.demo_configs`), shared with the benchmarks."""
    from vptdash import presets

    return presets.demo_configs()


# ---------------------------------------------------------------------------------------- resources
@st.cache_resource(show_spinner=False)
def _store_at(path: str) -> RunStore:
    return RunStore(path)


@st.cache_resource(show_spinner="Loading the precomputed reference sweep...")
def _reference_loaded(path: str) -> dict:
    """Import the shipped reference sweep into this store once per process (idempotent anyway)."""
    try:
        from vptdash import reference
    except ImportError:  # the module is optional: a store without reference points still works
        return {"imported": 0, "error": None}
    try:
        return {"imported": int(reference.load_reference(_store_at(path))), "error": None}
    except Exception as exc:  # noqa: BLE001 - a broken reference file must not take the app down
        return {"imported": 0, "error": f"{type(exc).__name__}: {exc}"}


def ensure_navigation() -> None:
    """Make sure the page runs inside app.py's `st.navigation`, never as a legacy `pages/` page.

    Streamlit treats a project with a `pages/` folder as a v1 multipage app until some run calls
    `st.navigation`: then a page script can be run on its own, without app.py (no page config, no
    sidebar). That happens to the first visitor of a bookmarked /budget URL after a restart, and
    to every AppTest run after the first. In that case run app.py here, in this same script run
    (so a button click that started it is not lost), and stop: app.py routes to this page again."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
        from streamlit.runtime.scriptrunner import get_script_run_ctx
    except ImportError:  # pragma: no cover - other Streamlit versions
        return
    if not getattr(PagesManager, "uses_pages_directory", False):
        return
    ctx = get_script_run_ctx()
    if ctx is None:
        return
    PagesManager.uses_pages_directory = False  # app.py's st.navigation would set it too
    main = Path(ctx.main_script_path)
    exec(compile(main.read_text(encoding="utf-8"), str(main), "exec"),  # noqa: S102 - our own entry point
         {"__name__": "__main__", "__file__": str(main)})
    st.stop()


def get_store() -> RunStore:
    """The run store of this data dir ($VPTDASH_HOME), shared by all sessions of the process."""
    ensure_navigation()
    path = str(paths.store_path())
    store = _store_at(path)
    _reference_loaded(path)
    return store


def reference_status() -> dict:
    return _reference_loaded(str(paths.store_path()))


def reference_info() -> dict | None:
    try:
        from vptdash import reference
        return reference.reference_info()
    except Exception:  # noqa: BLE001
        return None


@st.cache_resource(show_spinner=False, max_entries=4)
def get_backbone(name: str, resolution: int):
    """A frozen backbone (used for its shape only: cost estimates, block strip)."""
    return backbones.create_backbone(name, img_size=resolution)


@st.cache_data(show_spinner=False, max_entries=16)
def backbone_shape(name: str, resolution: int) -> dict:
    """budget.backbone_shape plus num_patches for this resolution. Raises BackboneError."""
    from vptdash import budget

    shape = dict(budget.backbone_shape(get_backbone(name, resolution)))
    shape["num_patches"] = (resolution // shape["patch_size"]) ** 2
    return shape


@st.cache_data(show_spinner=False, max_entries=16, ttl=300)
def _shape_or_error(name: str, resolution: int) -> tuple[dict | None, str | None]:
    # Failures are cached too (for 5 minutes): an offline hub backbone must not cost a second per rerun.
    try:
        return backbone_shape(name, resolution), None
    except backbones.BackboneError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {exc}"


def backbone_shape_or_error(name: str, resolution: int) -> tuple[dict | None, str | None]:
    """(shape, None) or (None, a message for st.error)."""
    with st.spinner(f"Loading backbone {name}..."):
        return _shape_or_error(name, resolution)


@st.cache_resource(show_spinner=False, max_entries=6)
def _image_set(spec: str, resolution: int, cell_type: str | None, stamp: float) -> data.ImageSet:
    return data.load_image_set(spec, resolution, cell_type=cell_type)


def load_image_set(spec: str, resolution: int, cell_type: str | None = None) -> data.ImageSet:
    """Cached per (spec, resolution, cell type); an upload folder that changed is reloaded.
    Raises DatasetError."""
    stamp = 0.0
    if spec not in data.BUILTIN_DATASETS:
        try:
            stamp = Path(spec).stat().st_mtime
        except OSError:
            stamp = -1.0
    return _image_set(spec, resolution, cell_type, stamp)


def num_classes(spec: str, resolution: int, cell_type: str | None = None) -> int | None:
    """How many classes a data set has (None when it cannot be loaded)."""
    if spec == "elpv-binary":
        return 2
    if spec == "elpv":
        return 4
    try:
        return len(load_image_set(spec, resolution, cell_type).class_names)
    except Exception:  # noqa: BLE001
        return None


@st.cache_resource(show_spinner=False)
def freeze_heap() -> int:
    """Once per process: import the heavy libraries and move everything alive into the garbage
    collector's permanent generation (`gc.freeze`).

    torch, timm, pandas and plotly leave millions of tracked objects; without this every full
    collection walks all of them, and with a fragment polling every second or so the server burned
    ~0.1 CPU core per open tab doing nothing (measured: 2.6 s -> 0.2 s of CPU per idle 30 s)."""
    import gc

    import pandas  # noqa: F401
    import plotly.graph_objects  # noqa: F401

    from vptdash import budget, charts, jobs, report, train, uploads  # noqa: F401

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@st.cache_resource(show_spinner=False)
def warm_up() -> bool:
    """Once per server process: load the default backbone and ELPV in a background thread, so the
    first visitor of Train, Data or Budget explorer does not wait for them. VPTDASH_NO_WARMUP=1
    turns it off (tests)."""
    if os.environ.get("VPTDASH_NO_WARMUP"):
        return False

    def work() -> None:
        try:
            backbone_shape(DEFAULT_SETUP["backbone"], DEFAULT_SETUP["resolution"])
            load_image_set(DEFAULT_SETUP["dataset"], DEFAULT_SETUP["resolution"])
        except Exception:  # noqa: BLE001 - only a head start; the pages report real errors
            pass

    threading.Thread(target=work, name="vptdash-warm-up", daemon=True).start()
    return True


# ---------------------------------------------------------------------------------------- setup
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
        label, options, value="all" if current is None else int(current), format_func=str,
        help="Few-shot: only this many training images per class are used. Validation and test images "
             "do not change with it.",
        **bind(widget_key, "shots", convert=lambda v: None if v == "all" else int(v)),
    )


# ---------------------------------------------------------------------------------------- words
def upload_name(spec: str) -> str | None:
    try:
        from vptdash import uploads
        for info in uploads.list_uploads():
            if uploads.upload_spec(info.slug) == spec:
                return info.name
    except Exception:  # noqa: BLE001
        return None
    return None


def dataset_label(spec: str, cell_type: str | None = None) -> str:
    if spec == "elpv-binary":
        text = "ELPV binary (functional / defective)"
    elif spec == "elpv":
        text = "ELPV 4 classes (defect probability)"
    else:
        text = upload_name(spec) or Path(str(spec)).name or str(spec)
    if cell_type:
        text += f", {cell_type} cells"
    return text


def is_elpv(spec: str) -> bool:
    return spec in data.BUILTIN_DATASETS


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_count(value: float | None) -> str:
    """21_700_000 -> '21.7 M', 4610 -> '4.6 k'."""
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    for div, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= div:
            return f"{value / div:.3g}{unit}"
    return f"{value:.0f}"


def fmt_pct(value: float | None, digits: int = 1) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{100 * value:.{digits}f}%"


def first_line(text: Any, limit: int = 300) -> str:
    """The first line of an error message (tracebacks follow it), never failing on None or ""."""
    lines = str(text or "").strip().splitlines()
    return lines[0][:limit] if lines else "no error message recorded"


def number(value: Any) -> float | None:
    """A finite float or None."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def run_label(run: dict) -> str:
    """What a stored job is, in words: its run configuration's label, or for the job kinds that are not
    one trained model, what they do (a continual experiment, a search for blocks to skip)."""
    config = run.get("config") or {}
    try:
        kind = run.get("kind")
        if kind == "continual":
            return (f"continual {config.get('method', '?')}: {config.get('tasks', '?')} tasks, "
                    f"{config.get('num_prompts', '?')} prompts ({config.get('placement', '?')})")
        label = RunConfig.from_dict(config).label()
        if kind == "skip-search":
            return (f"skip search ({config.get('skip_search_method') or 'greedy'}, "
                    f"{config.get('skip_search_k')} blocks) for {label}")
        return label
    except Exception:  # noqa: BLE001 - a label must never break a page
        return "run"


def run_family(config: dict) -> str:
    try:
        return RunConfig.from_dict(config or {}).family()
    except Exception:  # noqa: BLE001
        return "unknown"


def progress_of(run: dict, event: dict | None, now: float | None = None) -> tuple[float, str]:
    """(fraction done 0..1, one line of status text) for a running run's latest event."""
    now = time.time() if now is None else now
    if not event:
        return 0.0, "starting..."
    phase = event.get("phase")
    step, total = number(event.get("step")), number(event.get("total_steps"))
    if phase == "setup":
        return 0.0, event.get("message") or "setting up"
    if phase in ("test", "cost"):
        return 1.0, event.get("message") or "evaluating on held-out images"
    fraction = min(1.0, step / total) if step and total else 0.0
    if fraction >= 1.0 and phase == "val" and event.get("epoch") == (run.get("config") or {}).get("epochs"):
        return 1.0, "finishing: test set, compute and latency"
    eta = number(event.get("eta_s"))
    started, elapsed = number(run.get("started_at")), number(event.get("elapsed_s"))
    if eta is not None and started is not None and elapsed is not None:
        eta = max(0.0, eta - max(0.0, now - (started + elapsed)))  # time since the event was written
    epoch = event.get("epoch")
    config_epochs = (run.get("config") or {}).get("epochs")
    text = f"epoch {epoch}/{config_epochs}" if epoch and config_epochs else "training"
    if eta is not None:
        text += f" · ETA {fmt_duration(eta)}"
    return fraction, text


# ---------------------------------------------------------------------------------------- sidebar
def start_worker(store: RunStore) -> None:
    """Queue consumers call this after submitting: start the background worker if none runs."""
    worker.ensure_worker(store)


def queue_sweep(store: RunStore, configs: list[RunConfig], failure: str) -> str | None:
    """Queue a sweep and start the worker; the sweep id, or None after showing `failure: reason`."""
    from vptdash import jobs

    try:
        sweep_id, _ = jobs.submit_sweep(store, configs)
    except ConfigError as exc:
        st.error(f"{failure}: {exc}")
        return None
    start_worker(store)
    return sweep_id


def run_table_columns() -> dict[str, Any]:
    """Column settings shared by every run table (Budget explorer, Runs), so they read the same."""
    number = st.column_config.NumberColumn
    return {
        "id": number("Run", format="%d", width="small"),
        "label": "Configuration", "family": "Family", "source": "Source",
        "seed": number("Seed", format="%d", width="small"),
        "accuracy": number("Accuracy", format="percent"),
        "balanced_accuracy": number("Balanced", format="percent"),
        "gmacs": number("GMACs", format="%.3f"),
        "latency_ms_b1": number("ms / image", format="%.2f"),
        "params_trainable": number("Trainable", format="compact"),
    }


def sidebar(store: RunStore) -> None:
    """Active setup + live job queue, on every page."""
    setup = active_setup()
    with st.sidebar:
        st.markdown("#### Active setup")
        shots = setup["shots"]
        st.markdown(
            f"**Data** {dataset_label(setup['dataset'], setup['cell_type'])}  \n"
            f"**Backbone** `{setup['backbone']}`  \n"
            f"**Images** {setup['resolution']} px · "
            f"{'all' if shots is None else shots} shots per class"
        )
        if is_elpv(setup["dataset"]):
            st.caption("ELPV: CC BY-NC-SA 4.0, Buerhop-Lutz, Deitsch et al. (ZAE Bayern / FAU)")
        st.markdown("#### Job queue")
        _queue_panel(store)


def _queue_panel(store: RunStore) -> None:
    try:
        summary = store.queue_summary()
    except Exception as exc:  # noqa: BLE001 - a locked/broken store must not crash every page
        st.warning(f"Run store unavailable: {exc}")
        return
    busy = bool(summary["running"] or summary["queued"])

    # No st.rerun() from here on purpose: an app rerun started by a fragment right after
    # st.switch_page resets the new page's widgets (Streamlit 1.67); pages refresh themselves.
    @st.fragment(run_every=QUEUE_POLL_BUSY_S if busy else QUEUE_POLL_IDLE_S)
    def queue_fragment() -> None:
        try:
            now_summary = store.queue_summary()
        except Exception as exc:  # noqa: BLE001
            st.warning(f"Run store unavailable: {exc}")
            return
        render_queue(store, now_summary)

    queue_fragment()


def _worker_gone(run: dict) -> bool:
    pid = run.get("worker_pid")
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError, ValueError):
        return False
    return False


def render_queue(store: RunStore, summary: dict) -> None:
    running = summary["running"]
    if any(_worker_gone(run) for run in running):  # killed worker: show its run as failed, not running forever
        store.fail_orphaned_runs()
        summary = store.queue_summary()
        running = summary["running"]
    if not running and not summary["queued"]:
        st.caption("Idle: nothing running.")
    for run in running:
        fraction, text = progress_of(run, run.get("latest_progress"))
        st.progress(fraction, text=f"#{run['id']} {run_label(run)}: {text}")
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
            if st.button("Start worker", key="sidebar_start_worker"):
                start_worker(store)
                st.rerun(scope="fragment")


_CSS = """
<style>
[data-testid="stMainBlockContainer"] { padding-top: 2.2rem; padding-left: 2.5rem; padding-right: 2.5rem;
                                        max-width: 100%; }
[data-testid="stMetricValue"] { font-size: 2rem; }
</style>
"""


def style() -> None:
    """A little CSS: less empty space around the page, so charts get the width on a projector."""
    st.html(_CSS)


def family_colors() -> dict[str, str]:
    try:
        from vptdash import charts
        return dict(charts.FAMILY_COLORS)
    except Exception:  # noqa: BLE001
        return {}


def show_plotly(fig, key: str | None = None) -> None:
    """Plotly as the figure was made (theme=None: Streamlit's theme would replace the large projector
    fonts and the family colours' template), no logo, PNG export at 2x."""
    st.plotly_chart(fig, key=key, theme=None,
                    config={"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}})
