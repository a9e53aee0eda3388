"""Who may use the dashboard: everyone on this machine by default, and only holders of the access
token when it is shared on a network.

The default server address is the loopback one (`.streamlit/config.toml`), so nobody else can reach
the app. Sharing is explicit: `scripts/start.sh --share` listens on every interface, sets
`VPTDASH_SHARE=1` and an access token (`VPTDASH_TOKEN`, generated and printed when not given). A
server that listens beyond loopback counts as shared even when started some other way, so a
forgotten `--server.address 0.0.0.0` never exposes an open app.

The gate is a simple form (no st.login, which needs an identity provider): the token is compared in
constant time and remembered in the browser session once entered. In shared mode error details are
hidden from visitors: a traceback shows file paths and internals."""

from __future__ import annotations

import hmac
import os
import secrets

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

SHARE_ENV = "VPTDASH_SHARE"
TOKEN_ENV = "VPTDASH_TOKEN"
LOOPBACK_ADDRESSES = ("127.0.0.1", "localhost", "::1")
SESSION_KEY = "vptdash_access_granted"
MIN_TOKEN_LENGTH = 12


def new_token() -> str:
    """A fresh access token: 128 random bits, URL-safe, easy to paste."""
    return secrets.token_urlsafe(16)


def token_matches(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison; an empty expected token never matches (sharing without a token
    must not mean "no password")."""
    if not expected or given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def listens_beyond_loopback(address: str | None) -> bool:
    """True when the server address reaches other machines (unset means every interface)."""
    return (address or "").strip() not in LOOPBACK_ADDRESSES


def is_shared(address: str | None = None, env: dict | None = None) -> bool:
    """Shared mode: asked for explicitly (VPTDASH_SHARE=1) or implied by a non-loopback address."""
    env = os.environ if env is None else env
    if env.get(SHARE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    return listens_beyond_loopback(address)


def require_access() -> None:
    """Call near the top of app.py, before any page runs: on a shared server, shows only the token
    prompt until this browser session has entered the right token, then stops the script."""
    if get_script_run_ctx() is None:
        # Not a browser session: a process re-running app.py as its __main__ (multiprocessing's spawn
        # does that for a sweep started under AppTest) has no visitor to ask and no config to read.
        return
    if not is_shared(st.get_option("server.address")):
        return
    st.set_option("client.showErrorDetails", "none")  # visitors see that something failed, not where
    expected = os.environ.get(TOKEN_ENV, "")
    if len(expected) < MIN_TOKEN_LENGTH:
        st.error(
            f"This dashboard is shared on a network but has no access token of at least {MIN_TOKEN_LENGTH} "
            f"characters: start it with `bash scripts/start.sh --share` (it prints one), or set {TOKEN_ENV}."
        )
        st.stop()
    if st.session_state.get(SESSION_KEY):
        return
    st.title("vptdash")
    with st.form("vptdash_access", clear_on_submit=True):
        given = st.text_input("Access token", type="password", key="vptdash_access_token")
        entered = st.form_submit_button("Open the dashboard")
    if entered:
        if token_matches(given, expected):
            st.session_state[SESSION_KEY] = True
            st.rerun()
        st.error("That token is not right. Ask whoever started the dashboard for it.")
    st.stop()
