"""vptdash: how many visual prompts do we really need, and where?

Entry point: `streamlit run app.py`. Pages only lay out widgets and charts; the work happens in the
`vptdash` library and in a background worker process that runs queued jobs from the run store.
"""

import streamlit as st

from vptdash.ui import access, jobqueue, look, resources, session

st.set_page_config(layout="wide", page_title="vptdash", page_icon=":material/tune:")

resources.freeze_heap()  # once per process: keeps garbage collection cheap for the polling fragments
session.init_state()
look.style()
pages = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/data.py", title="Data", icon=":material/photo_library:"),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/budget.py", title="Budget explorer", icon=":material/insights:"),
    st.Page("pages/levers.py", title="Cost levers", icon=":material/content_cut:"),
    st.Page("pages/attention.py", title="Attention", icon=":material/visibility:"),
    st.Page("pages/continual.py", title="Continual", icon=":material/timeline:"),
    st.Page("pages/runs.py", title="Runs", icon=":material/history:"),
]
page = st.navigation(pages)  # first: from here on Streamlit ignores the legacy pages/ folder semantics
access.require_access()  # shared on a network: nothing below runs until this session entered the token
store = resources.get_store()  # also imports the precomputed reference sweep, once per process
resources.warm_up()  # default backbone + ELPV load in the background, once per process
jobqueue.sidebar(store)
page.run()
