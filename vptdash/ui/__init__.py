"""Streamlit helpers for the pages: the active setup in the session, cached resources, the sidebar's
job queue, the look. The only part of vptdash that imports Streamlit."""
