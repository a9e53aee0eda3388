"""vptdash: how many visual prompts do we really need, and where?

Entry point: `streamlit run app.py`. Pages only lay out widgets and charts; the work happens in the
`vptdash` library and in a background worker process that runs queued jobs from the run store.

The page scripts live in `app_pages/`, not `pages/`: Streamlit treats a `pages/` folder next to the
entry script as a legacy multipage app, which lists raw file names in the sidebar on a fresh server's
first load. Icons are emoji, not `:material/...:` icons (the page icon would be fetched from Google's
font CDN, and the app works offline), and emoji whose glyph is also in DejaVu Sans: a machine without an
emoji font (a bare Linux, the screenshots) still draws them rather than empty boxes.
"""

import streamlit as st

from vptdash.ui import access, jobqueue, look, resources, session

st.set_page_config(layout="wide", page_title="vptdash", page_icon="⚖️")

resources.freeze_heap()  # once per process: keeps garbage collection cheap for the polling fragments
session.init_state()
look.style()
pages = [
    st.Page("app_pages/home.py", title="Home", icon="ℹ️", default=True, url_path="start"),
    st.Page("app_pages/data.py", title="Data", icon="◼️"),
    st.Page("app_pages/train.py", title="Train", icon="▶️"),
    st.Page("app_pages/budget.py", title="Budget explorer", icon="⚖️"),
    st.Page("app_pages/levers.py", title="Cost levers", icon="✂️"),
    st.Page("app_pages/attention.py", title="Attention", icon="☝️"),
    st.Page("app_pages/continual.py", title="Continual", icon="↪️"),
    st.Page("app_pages/runs.py", title="Runs", icon="✍️"),
    # The default page lives at "/"; a bookmarked /home reaches the same page instead of "Page not found".
    st.Page("app_pages/home.py", title="Home", icon="ℹ️", url_path="home", visibility="hidden"),
]
page = st.navigation(pages)  # first: from here on Streamlit ignores the legacy pages/ folder semantics
access.require_access()  # shared on a network: nothing below runs until this session entered the token
store = resources.get_store()  # also imports the precomputed reference sweep, once per process
resources.warm_up()  # default backbone + ELPV load in the background, once per process
jobqueue.sidebar(store, licence=page.url_path != "data")  # the Data page shows the licence itself
jobqueue.adopt_worker(store)  # once per process: a worker left by the previous server follows this one
page.run()
