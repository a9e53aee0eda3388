"""End to end in a real headless browser: the real server, the real background worker.

Upload a generated two-class zip on the Data page, train a tiny run on the Train page (tiny-random
backbone, 32 px), wait for the result card and the charts, check that no exception is shown, and
save a screenshot to test-artifacts/e2e.png. Drives Debian's Chromium (/usr/bin/chromium; browsers
cannot be downloaded here) through Playwright's Python package.
"""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    free_port,
    open_page,
    start_server,
    stop_all,
    train_on_tiny_backbone,
    wait_healthy,
    wait_idle,
)

ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.browser


def tiny_zip() -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, level in (("dark", 40), ("bright", 210)):
            for index in range(12):
                pixels = np.clip(level + rng.normal(0, 20, (40, 40)), 0, 255).astype(np.uint8)
                png = io.BytesIO()
                Image.fromarray(pixels).save(png, "PNG")
                archive.writestr(f"{name}/{index:02d}.png", png.getvalue())
    return buffer.getvalue()


@pytest.fixture
def server(tmp_path):
    chromium = Path(CHROMIUM)
    if not chromium.exists():
        pytest.skip("needs Debian's chromium: apt-get install -y chromium (scripts/test.sh does it)")
    pytest.importorskip("playwright.sync_api")
    home = tmp_path / "home"
    port = free_port()
    process = start_server(home, port, tmp_path / "streamlit.log", VPTDASH_NO_WARMUP="1")
    try:
        wait_healthy(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_all(process, home)  # the worker is detached (start_new_session): stopped too


def test_upload_train_and_see_the_result(server, tmp_path):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    started = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
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

            # Train: tiny backbone, 32 px, 3 epochs
            train_on_tiny_backbone(page)  # 32 px
            epochs = page.locator(".st-key-train_epochs input")
            epochs.fill("3")
            epochs.press("Enter")
            wait_idle(page)
            assert "32 px" in page.locator("[data-testid='stSidebar']").inner_text()
            page.locator(".st-key-train_submit button").click()

            # the background worker picks it up; the fragment polls the store every second
            page.get_by_text("Test accuracy").wait_for(timeout=120_000)
            page.locator("[data-testid='stPlotlyChart']").first.wait_for(timeout=30_000)
            wait_idle(page)
            metrics = page.locator("[data-testid='stMetric']").all_inner_texts()
            assert any("Test accuracy" in m and "%" in m for m in metrics), metrics
            assert page.locator("[data-testid='stPlotlyChart']").count() >= 2  # curve + confusion matrix
            assert page.locator("[data-testid='stException']").count() == 0
            page.get_by_text("Showing run").scroll_into_view_if_needed()  # the result card, not the form's end
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / "e2e.png"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "e2e-failure.png"))
            raise
        finally:
            browser.close()
    assert time.monotonic() - started < 180
