"""Cached resources shared by every session of the server process: the run store (with the shipped
reference sweep imported once), backbones, image sets, and the process-wide warm-up.

Nothing here keeps module-level mutable state of its own: Streamlit's caches hold it, and two
browser tabs share only the run store."""

from __future__ import annotations

import gc
import os
import sqlite3
import threading
from pathlib import Path

import pandas  # noqa: F401 - imported before gc.freeze so its objects are frozen too
import plotly.graph_objects  # noqa: F401 - as above
import streamlit as st

from vptdash.engine import backbones, data, paths, train  # noqa: F401 - train: loaded before gc.freeze
from vptdash.runs import jobs, recount, reference, uploads  # noqa: F401 - jobs, uploads: loaded before gc.freeze
from vptdash.runs.store import RunStore, StoreCorrupt, StoreError, recover_store
from vptdash.ui.session import DEFAULT_SETUP
from vptdash.views import budget, charts, report  # noqa: F401 - charts, report: loaded before gc.freeze
from vptdash.views.wording import md_escape


@st.cache_resource(show_spinner=False)
def _store_at(path: str) -> RunStore:
    return RunStore(path)


@st.cache_resource(show_spinner="Loading the precomputed reference sweep...")
def _reference_loaded(path: str) -> dict:
    """Import the shipped reference sweep into this store once per process (idempotent anyway)."""
    if _store_at(path).read_only:
        return {"imported": 0, "error": None}  # the banner already says nothing can be written
    try:
        return {"imported": int(reference.load_reference(_store_at(path))), "error": None}
    except Exception as exc:  # noqa: BLE001 - a broken reference file must not take the app down
        return {"imported": 0, "error": f"{type(exc).__name__}: {exc}"}


@st.cache_resource(show_spinner="Counting the full-graph compute of older runs...")
def _full_graph_recounted(path: str) -> str:
    """Runs stored before the full-graph count existed get it, once per process (the same function as
    `vptdash runs recount`); what cannot be counted here stays "cost unknown" on the charts."""
    try:
        return recount.fill_full_graph(_store_at(path)).line()
    except Exception as exc:  # noqa: BLE001 - an older run that cannot be recounted must not take the app down
        return f"not recounted: {type(exc).__name__}: {exc}"


def get_store() -> RunStore:
    """The run store of this data dir ($VPTDASH_HOME), shared by all sessions of the process.

    A store that cannot be opened stops the page with one line saying why; a damaged one also offers
    to move it aside (kept) and start again from the latest backup. A read-only one is shown with a
    banner: the history can be read, nothing can be recorded."""
    try:
        path = str(paths.store_path())
        store = _store_at(path)
    except StoreCorrupt as exc:
        st.error(md_escape(exc))
        if st.button("Move the damaged file aside and start again", key="store_recover", type="primary"):
            try:
                outcome = recover_store(path)
            except (StoreError, sqlite3.Error, OSError) as problem:
                st.error(md_escape(f"It could not be moved: {getattr(problem, 'strerror', None) or problem}"))
                st.stop()
            _store_at.clear()
            _reference_loaded.clear()
            _full_graph_recounted.clear()
            st.session_state["store_recovered"] = outcome
            st.rerun()
        st.stop()
    except (StoreError, sqlite3.Error, OSError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        st.error(md_escape(f"The run store cannot be opened: {detail}"))
        st.stop()
    recovered = st.session_state.pop("store_recovered", None)
    if recovered:
        st.success(
            md_escape(
                f"The damaged store was kept as {recovered['moved_to']}; "
                + ("the latest backup was restored" if recovered["restored_backup"] else "an empty store was started")
                + f" ({recovered['runs']} runs)."
            )
        )
    if store.read_only:
        st.warning(
            f"The data folder {md_escape(store.path.parent)} is read-only: the run history can be read, but "
            "nothing can be recorded. Make it writable (or set `VPTDASH_HOME` to a writable folder) and restart."
        )
    _reference_loaded(path)
    _full_graph_recounted(path)
    return store


def reference_status() -> dict:
    return _reference_loaded(str(paths.store_path()))


def reference_info() -> dict | None:
    try:
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

    The heavy libraries are imported at the top of this module, so they are loaded by now.
    torch, timm, pandas and plotly leave millions of tracked objects; without this every full
    collection walks all of them, and with a fragment polling every second or so the server burned
    ~0.1 CPU core per open tab doing nothing (measured: 2.6 s -> 0.2 s of CPU per idle 30 s)."""
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
