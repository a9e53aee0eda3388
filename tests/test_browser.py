"""End to end in a real headless browser: the real server, the real background worker.

Upload a generated two-class zip on the Data page (twice: a second upload while one is saved), train
a tiny run on the Train page (tiny-random backbone, 32 px), wait for the announcement, the result card
and the charts, check that no exception is shown, that the new point stands out from precomputed ones
in the Budget explorer's figure JSON, that the CSV export has ISO 8601 timestamps and that the HTML
report of a filtered view covers that one data set; save a screenshot to test-artifacts/e2e.png. Every
page opens from its own URL on a fresh server without the sidebar listing file names, no request
leaves 127.0.0.1, and the worker ends with the server. Drives Debian's Chromium (/usr/bin/chromium;
browsers cannot be downloaded here) through Playwright's Python package.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    IDLE,
    ROOT,
    free_port,
    guard_offline,
    open_page,
    start_server,
    stop_all,
    stop_server,
    train_on_tiny_backbone,
    wait_healthy,
    wait_idle,
)

ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.browser


def tiny_zip(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, level in (("dark", 40), ("bright", 210)):
            for index in range(12):
                pixels = np.clip(level + rng.normal(0, 20, (40, 40)), 0, 255).astype(np.uint8)
                png = io.BytesIO()
                Image.fromarray(pixels).save(png, "PNG")
                archive.writestr(f"{name}/{index:02d}.png", png.getvalue())
    return buffer.getvalue()


# URL path -> the page's title (h1); "" is the default page, "home" reaches it too
PAGE_TITLES = {
    "": "How many visual prompts do we really need, and where?",
    "home": "How many visual prompts do we really need, and where?",
    "data": "Data",
    "train": "Train one budget",
    "budget": "Budget explorer",
    "levers": "Cost levers",
    "attention": "Attention and prompt condensation",
    "continual": "Continual learning: new classes over time",
    "runs": "Runs",
}
RAW_FILE_NAMES = {"app", "attention", "budget", "continual", "data", "home", "levers", "runs", "train"}
# Records the sidebar menu's link texts every 25 ms from the first paint on: a brief flash counts too.
RECORD_NAV = """
window.__navSeen = [];
setInterval(() => {
  const nav = document.querySelector("[data-testid='stSidebarNav']");
  if (nav) window.__navSeen.push(Array.from(nav.querySelectorAll('a')).map(a => a.innerText.trim()));
}, 25);
"""


def needs_browser() -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium: apt-get install -y chromium (scripts/test.sh does it)")
    pytest.importorskip("playwright.sync_api")


@pytest.fixture
def server(tmp_path):
    needs_browser()
    home = tmp_path / "home"
    port = free_port()
    process = start_server(home, port, tmp_path / "streamlit.log", VPTDASH_NO_WARMUP="1")
    try:
        wait_healthy(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_all(process, home)  # the worker follows the server; this also covers a test failing half-way


def figure_markers(page) -> list[dict]:
    """Every plotly trace drawn on the page, as the browser holds it (name, points, marker)."""
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('.js-plotly-plot')).flatMap(el => (el.data || []).map(t => ({
            name: t.name, x: Array.from(t.x || []), symbol: t.marker ? t.marker.symbol : null,
            size: t.marker ? t.marker.size : null, opacity: t.marker ? t.marker.opacity : null})))"""
    )


def download(page, button_name: str) -> str:
    with page.expect_download(timeout=60_000) as info:
        page.get_by_role("button", name=button_name, exact=True).click()
    return Path(info.value.path()).read_text(encoding="utf-8")


def add_precomputed_neighbours(home: Path) -> None:
    """Two precomputed runs on the setup of the run just made (as if shipped with a reference sweep)."""
    from vptdash.runs.store import RunStore

    store = RunStore(home / "data" / "runs.sqlite")
    [live] = store.list_runs(status="done", source="live")
    rows = []
    for index, prompts in enumerate((1, 5)):
        config = {**live["config"], "num_prompts": prompts, "placement": "shallow"}
        costs = {**live["costs"], "gmacs": float(live["costs"].get("gmacs") or 0.01) * (1.1 + index)}
        rows.append({**live, "config": config, "costs": costs, "created_at": 1000.0 + index})
    assert store.import_runs(rows, source="precomputed") == 2


def test_upload_train_and_see_the_result(server, tmp_path):
    from playwright.sync_api import sync_playwright

    home = tmp_path / "home"

    ARTIFACTS.mkdir(exist_ok=True)
    started = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1000}, accept_downloads=True)
        outside = guard_offline(context)
        page = context.new_page()
        try:
            page.goto(server)
            page.wait_for_selector("[data-testid='stApp']", timeout=60_000)
            wait_idle(page)
            assert page.get_by_text("How many visual prompts").count()

            # Data: upload a zip of class folders and make it the active data set
            open_page(page, "Data")
            page.get_by_text("My own images").click()
            wait_idle(page)
            page.locator(".st-key-data_zip input[type=file]").set_input_files(
                {"name": "dark-vs-bright.zip", "mimeType": "application/zip", "buffer": tiny_zip()}
            )
            page.locator(".st-key-data_zip_save button:not([disabled])").wait_for(timeout=30_000)
            page.locator(".st-key-data_zip_save button").click()
            page.get_by_text("Saved **dark-vs-bright**".replace("**", "")).wait_for(timeout=30_000)
            wait_idle(page)
            assert page.locator("[data-testid='stImage']").count() >= 2, "thumbnails per class"

            # a second upload while one is saved (the saved-uploads box exists now) becomes the pick
            page.locator(".st-key-data_zip input[type=file]").set_input_files(
                {"name": "second-set.zip", "mimeType": "application/zip", "buffer": tiny_zip(seed=1)}
            )
            page.locator(".st-key-data_zip").filter(has_text="second-set.zip").wait_for(timeout=30_000)
            wait_idle(page)  # the new file is uploaded before Save is pressed
            page.locator(".st-key-data_zip_save button:not([disabled])").wait_for(timeout=30_000)
            page.locator(".st-key-data_zip_save button").click()
            page.get_by_text("Saved second-set").wait_for(timeout=30_000)
            wait_idle(page)
            assert page.locator("[data-testid='stException']").count() == 0
            assert page.locator("h2").filter(has_text="Active data set: second-set").count() == 1

            # Train: tiny backbone, 32 px, 3 epochs
            train_on_tiny_backbone(page)  # 32 px
            epochs = page.locator(".st-key-train_epochs input")
            epochs.fill("3")
            epochs.press("Enter")
            wait_idle(page)
            assert "32 px" in page.locator("[data-testid='stSidebar']").inner_text()
            page.locator(".st-key-train_submit button").click()

            # the background worker picks it up; the sidebar announces the result as it lands
            page.locator("[data-testid='stToast']").filter(has_text="New result #").wait_for(timeout=120_000)
            page.get_by_text("Test accuracy", exact=True).wait_for(timeout=60_000)
            page.locator("[data-testid='stPlotlyChart']").first.wait_for(timeout=30_000)
            wait_idle(page)
            metrics = page.locator("[data-testid='stMetric']").all_inner_texts()
            assert any("Test accuracy" in m and "%" in m for m in metrics), metrics
            assert page.locator("[data-testid='stPlotlyChart']").count() >= 2  # curve + confusion matrix
            assert page.locator("[data-testid='stException']").count() == 0
            page.get_by_text("Showing run").scroll_into_view_if_needed()  # the result card, not the form's end
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "e2e.png"))

            # the new point stands out from precomputed ones on the same setup (figure JSON in the browser)
            add_precomputed_neighbours(home)
            open_page(page, "Budget explorer", settle_ms=500)
            points = [t for t in figure_markers(page) if isinstance(t["symbol"], list)]
            made_here = [(t["symbol"][i], t["size"][i], t["opacity"][i]) for t in points for i in range(len(t["x"]))]
            assert ("diamond", 19, 1) in made_here, made_here  # the run made here
            assert any(s == "circle" and o < 1 and z < 19 for s, z, o in made_here), made_here  # precomputed
            names = {t["name"] for t in figure_markers(page)}
            assert "◆ run here (dashboard / CLI)" in names and "● precomputed (reference sweep)" in names

            # Runs: CSV timestamps are ISO 8601 with the time zone
            open_page(page, "Runs")
            rows = list(csv.DictReader(io.StringIO(download(page, "Export CSV"))))
            assert rows
            for row in rows:
                created = dt.datetime.fromisoformat(row["created_at"])
                assert created.utcoffset() == dt.timedelta(0), row["created_at"]

            # Runs: the report of a view filtered to one data set covers that data set only
            page.locator(".st-key-runs_f_dataset [role='combobox']").click()
            page.get_by_role("option", name="second-set").click()
            page.keyboard.press("Escape")
            wait_idle(page)
            report = download(page, "HTML report")
            assert "second-set" in report.split("</h1>")[0]  # the title names the data set ...
            assert "ELPV" not in report  # ... and nothing of the reference sweep is in it
            assert page.locator("[data-testid='stException']").count() == 0
            assert not outside, outside  # nothing left 127.0.0.1
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "e2e-failure.png"))
            raise
        finally:
            browser.close()
    assert time.monotonic() - started < 240


def test_every_page_opens_from_its_url_offline(server):
    """A fresh server's first visitor opens a deep link: the menu shows page titles from the first
    paint (never the raw file names), and every page's URL opens that page, without leaving 127.0.0.1."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        outside = guard_offline(context)
        context.add_init_script(RECORD_NAV)
        page = context.new_page()
        try:
            for path, title in [("train", PAGE_TITLES["train"]), *PAGE_TITLES.items()]:
                page.goto(f"{server}/{path}")
                page.wait_for_selector(IDLE, timeout=60_000)
                page.locator("h1").filter(has_text=title).first.wait_for(timeout=30_000)
                assert page.get_by_text("Page not found").count() == 0, path
                assert page.locator("[data-testid='stException']").count() == 0, path
                seen = {text for texts in page.evaluate("window.__navSeen") for text in texts}
                shown = {text.split("\n")[-1].strip() for text in seen}
                assert shown and not shown & RAW_FILE_NAMES, (path, seen)
                assert page.url.rstrip("/").endswith(path) or path in ("", "home"), page.url
            assert not outside, outside
        finally:
            browser.close()


def test_the_worker_ends_with_the_server(tmp_path):
    """Ctrl-C on the dashboard: its background worker (here serving a queued run) is gone in seconds."""
    from playwright.sync_api import sync_playwright

    from tests.conftest import make_image_folder
    from vptdash.engine.train import RunConfig
    from vptdash.runs import jobs, worker
    from vptdash.runs.store import RunStore

    needs_browser()
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    store = RunStore(home / "data" / "runs.sqlite")
    images = make_image_folder(tmp_path / "images", classes=("dark", "bright"))
    config = RunConfig(
        backbone="tiny-random", dataset=str(images), resolution=32, epochs=500, batch_size=2, measure_latency=False
    )
    run_id = jobs.submit_run(store, config)
    port = free_port()
    server = start_server(home, port, tmp_path / "streamlit.log", VPTDASH_NO_WARMUP="1")
    try:
        wait_healthy(port, server)
        with sync_playwright() as pw:  # the first visitor: the server adopts or starts the worker
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/runs")
            page.wait_for_selector(IDLE, timeout=60_000)
            browser.close()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and store.get_run(run_id)["status"] != "running":
            time.sleep(0.2)
        assert store.get_run(run_id)["status"] == "running" and worker.worker_alive(store)
        pid = store.get_run(run_id)["worker_pid"]
        assert worker.read_owner(store) == server.pid
        stop_server(server)  # Ctrl-C
        stopped = time.monotonic()
        while time.monotonic() - stopped < 15 and worker.process_alive(pid):
            time.sleep(0.1)
        assert not worker.process_alive(pid), "the worker outlived the server"
        assert time.monotonic() - stopped < 15
        assert not worker.worker_alive(store)
        store.fail_orphaned_runs()  # what the next start does for a job that did not stop in time
        assert store.get_run(run_id)["status"] in ("cancelled", "failed")  # never 'running' forever
    finally:
        stop_all(server, home)
        if os.environ.get("VPTDASH_KEEP_LOGS"):
            print((tmp_path / "streamlit.log").read_text())
