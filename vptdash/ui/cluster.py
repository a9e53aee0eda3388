"""The sidebar's cluster setting: where the dashboard's queued training runs go.

Saved next to the run store (`runs.cluster.save_cluster_settings`), because the background worker
that dispatches the runs is another process; it reads the setting before each run it starts.
VPTDASH_RAY_ADDRESS gives the default until somebody saves a setting here."""

from __future__ import annotations

import importlib.util

import streamlit as st

from vptdash.runs import cluster
from vptdash.runs.store import RunStore


def cluster_setting(store: RunStore) -> None:
    """An expander in the sidebar: a Ray cluster address (empty: this machine) and a run's resources."""
    current = cluster.cluster_settings(store)
    where = f"Ray cluster `{current.address}`" if current.address else "this machine"
    with st.sidebar.expander(f"Runs train on {where}", expanded=False):
        with st.form("cluster_setting_form", border=False):
            address = st.text_input(
                "Ray cluster address",
                value=current.address or "",
                key="cluster_address",
                placeholder="e.g. 10.0.0.5:6379 (empty: this machine)",
                help="Queued training runs go to this Ray cluster; results are stored here. Uploaded image sets "
                "travel to the nodes (once per node, by content hash). Default: $VPTDASH_RAY_ADDRESS.",
            )
            left, right = st.columns(2)
            cpus = left.number_input("CPUs per run", min_value=0.25, max_value=256.0, value=float(current.cpus_per_run))
            gpus = right.number_input("GPUs per run", min_value=0.0, max_value=16.0, value=float(current.gpus_per_run))
            if st.form_submit_button("Save", key="cluster_save"):
                settings = cluster.ClusterSettings(
                    address=address.strip() or None,
                    cpus_per_run=float(cpus),
                    gpus_per_run=float(gpus),
                    max_retries=current.max_retries,
                )
                cluster.save_cluster_settings(store, settings)
                st.rerun()
        if current.address and importlib.util.find_spec("ray") is None:
            st.warning("Ray is not installed here: runs sent to a cluster will fail. `pip install 'ray>=2.9'`")
