"""Home: what the tool answers, the active setup, and the one-click meeting demo."""

import json

import streamlit as st

from vptdash.engine import backbones, data
from vptdash.runs import presets
from vptdash.ui import jobqueue, resources, session
from vptdash.views import wording

store = resources.get_store()
setup = session.active_setup()

st.title("How many visual prompts do we really need, and where?")
st.markdown(
    "#### vptdash trains a few learnable *prompt tokens* on a frozen Vision Transformer and measures "
    "what each extra prompt buys: test accuracy against compute, latency and trainable parameters.\n"
    "#### It recommends the cheapest prompt budget within a tolerance you choose of the best accuracy, "
    "with a linear probe and full fine-tuning as the baselines."
)

left, right = st.columns([3, 2], gap="large")
with left:
    st.subheader("Active setup")
    shots = setup["shots"]
    with st.container(border=True):
        st.markdown(
            f"**Data set:** {wording.dataset_md(setup['dataset'], setup['cell_type'])}  \n"
            f"**Backbone (frozen):** `{setup['backbone']}`: {backbones.BACKBONES.get(setup['backbone'], '')}  \n"
            f"**Images:** {setup['resolution']} px, "
            f"{'all training images' if shots is None else f'{shots} training images per class (few-shot)'}"
        )
    if wording.is_elpv(setup["dataset"]):
        st.caption(f"ELPV licence and attribution: {data.ELPV_LICENSE}")
    st.markdown(
        "**How to use it:** pick or upload images on **Data**, train one budget and watch it on "
        "**Train**, sweep many budgets and read the recommendation on **Budget explorer**, and find "
        "everything again on **Runs**."
    )
    nav = st.columns(4)
    nav[0].page_link("app_pages/data.py", label="Data", icon="◼️")
    nav[1].page_link("app_pages/train.py", label="Train", icon="▶️")
    nav[2].page_link("app_pages/budget.py", label="Budget explorer", icon="⚖️")
    nav[3].page_link("app_pages/runs.py", label="Runs", icon="✍️")

with right:
    st.subheader("Meeting demo")
    demo = presets.demo_configs()
    first = demo[0]
    st.markdown(
        f"Queues **{len(demo)} runs** on {wording.dataset_md(first.dataset, first.cell_type)}, "
        f"{first.shots} images per class, `{first.backbone}` at {first.resolution} px, "
        f"{first.epochs} epochs: {', '.join(config.label() for config in demo)}. "
        "Points appear on the Budget explorer as each run finishes: measured on a 2-core AMD EPYC, the first "
        "after about 35 s, all three in about 2.5 minutes (docs/performance.md)."
    )
    demo_keys = {json.dumps(config.to_dict(), sort_keys=True) for config in demo}
    pending = [
        run
        for run in store.list_runs(status=["queued", "running"])
        if json.dumps(run["config"], sort_keys=True) in demo_keys
    ]

    def watch_demo() -> None:  # the Budget explorer, set to the demo's data, where its points appear
        session.set_active(
            dataset=first.dataset,
            cell_type=first.cell_type,
            backbone=first.backbone,
            resolution=first.resolution,
            shots=first.shots,
        )
        st.switch_page("app_pages/budget.py")

    if pending:  # a second click in a meeting must not queue the demo twice
        st.info(f"The demo is under way: {len(pending)} of its runs still to finish.", icon="ℹ️")
        if st.button(
            "Watch it on the Budget explorer",
            type="primary",
            icon="⚖️",
            key="demo_watch",
            width="stretch",
        ):
            watch_demo()
    elif st.button("Run the meeting demo", type="primary", icon="▶️", key="demo_button", width="stretch"):
        sweep_id = jobqueue.queue_sweep(store, demo, "The demo preset is not valid")
        if sweep_id:
            st.session_state["last_sweep_id"] = sweep_id
            watch_demo()

    done = store.list_runs(status="done", limit=1)
    status = resources.reference_status()
    if status.get("error"):
        st.warning(f"The precomputed reference sweep could not be loaded: {wording.md_escape(status['error'])}")
    elif not done:
        st.info("No finished runs yet: the demo button fills the charts in a few minutes.")
