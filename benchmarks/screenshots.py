"""Screenshots of every dashboard page for the README (docs/screenshots/*.png).

    python benchmarks/screenshots.py --demo              # fresh store, press the meeting demo, wait, shoot
    python benchmarks/screenshots.py --home DIR          # an existing VPTDASH_HOME as it is
    python benchmarks/screenshots.py --tiny              # fresh store + a few tiny-random runs (seconds)

Starts `streamlit run app.py` on a free port with VPTDASH_HOME set, drives Debian's Chromium through
Playwright at 1600x1000 and saves one PNG per page (the app also imports the shipped reference sweep
into the store by itself). --demo clicks "Run the meeting demo" like a presenter would, saves
budget-live.png while the sweep runs, and waits for the worker to finish before the page shots.
The worker process started by the app is stopped at the end.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import browser_support  # noqa: E402
from tests.browser_support import CHROMIUM, CHROMIUM_ARGS, ROOT, free_port, start_server, stop_all, wait_healthy  # noqa: E402

# every page of the app, in its navigation order: (file name, the link's text)
PAGES = [
    ("home", "Home"),
    ("data", "Data"),
    ("train", "Train"),
    ("budget", "Budget explorer"),
    ("levers", "Cost levers"),
    ("attention", "Attention"),
    ("continual", "Continual"),
    ("runs", "Runs"),
]


SETTLE_MS = 800  # let charts finish drawing before a screenshot


def wait_idle(page) -> None:
    browser_support.wait_idle(page, settle_ms=SETTLE_MS)


def tiny_zip(n_per_class: int = 24, size: int = 48) -> bytes:
    """Two generated texture classes (horizontal vs vertical stripes under heavy noise) as a zip of
    class folders: hard enough for a random tiny backbone that budgets differ, plus one skipped file."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    grid = np.arange(size)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, axis in (("horizontal", 0), ("vertical", 1)):
            for index in range(n_per_class):
                period = rng.uniform(6, 14)
                wave = np.sin(2 * np.pi * grid / period + rng.uniform(0, 2 * np.pi))
                stripes = np.repeat(wave[:, None], size, 1) if axis == 0 else np.repeat(wave[None, :], size, 0)
                pixels = np.clip(128 + 35 * stripes + rng.normal(0, 60, (size, size)), 0, 255).astype(np.uint8)
                png = io.BytesIO()
                Image.fromarray(pixels).save(png, "PNG")
                archive.writestr(f"{name}/{name}_{index:02d}.png", png.getvalue())
        archive.writestr("horizontal/readme.txt", "not an image")
    return buffer.getvalue()


TINY = {"backbone": "tiny-random", "resolution": 32, "shots": 8}


def seed_tiny_runs(home: Path) -> str:
    """A generated upload and a small finished sweep on it (tiny-random backbone, 2 seeds) in the store
    at `home`; returns the data spec. Seconds per run: made for screenshots, not for conclusions."""
    os.environ["VPTDASH_HOME"] = str(home)
    sys.path.insert(0, str(ROOT))
    from vptdash.engine.train import RunConfig
    from vptdash.runs import jobs, uploads
    from vptdash.runs.store import RunStore

    info = uploads.save_zip_upload("stripes (generated demo data)", tiny_zip())
    spec = uploads.upload_spec(info.slug)
    store = RunStore()
    base = RunConfig(dataset=spec, epochs=10, lr=3e-2, batch_size=8, **TINY)
    configs = jobs.sweep_configs(base, [0, 1, 5, 20, 50], ["shallow", "deep"], [0, 1])
    configs.append(
        RunConfig.from_dict({**base.to_dict(), "tuning": "full", "num_prompts": 0, "placement": "none", "lr": 1e-3})
    )
    _, ids = jobs.submit_sweep(store, configs)
    jobs.execute_queued(store, ids)
    return spec


def use_tiny_setup(page) -> None:
    """In the browser, like a user: pick the generated upload, the tiny backbone, 32 px, 8 shots."""
    browser_support.open_page(page, "Data", SETTLE_MS)
    page.get_by_text("My own images").click()
    wait_idle(page)
    page.locator(".st-key-data_use_saved").get_by_role("button").click()
    wait_idle(page)
    browser_support.train_on_tiny_backbone(page, SETTLE_MS)
    page.locator(".st-key-train_shots input[type='range']").focus()
    page.keyboard.press("ArrowLeft")  # 16 -> 8 shots
    wait_idle(page)


def queue_text(page) -> str:
    return page.locator("[data-testid='stSidebar']").inner_text().split("Job queue")[-1]


def run_demo(page, base: str, out: Path, timeout_s: float) -> None:
    page.goto(base)
    wait_idle(page)
    page.get_by_role("button", name="Run the meeting demo").click()
    page.wait_for_url("**/budget", timeout=60_000)
    started, live_saved = time.monotonic(), False
    while time.monotonic() - started < timeout_s:
        page.wait_for_timeout(5000)
        text = queue_text(page)
        done = "0 queued" in text and "Idle" in text
        print(f"  {time.monotonic() - started:5.0f} s  {' '.join(text.split())[:100]}", flush=True)
        finished = re.search(r"(\d+) done", text)
        if not live_saved and not done and finished and int(finished.group(1)) >= 2:
            page.screenshot(path=str(out / "budget-live.png"))
            live_saved = True
        if done:
            return
    raise TimeoutError("the demo sweep did not finish in time")


def compare_runs(page, path: Path) -> None:
    """Runs page: tick the first two rows (the grid is a canvas: click the checkbox cells) and shoot
    the "only what differs" comparison."""
    grid = page.locator(".st-key-runs_table [data-testid='stDataFrame']").first
    box = grid.bounding_box()
    if box is None:
        return
    for row in (0, 2):
        page.mouse.click(box["x"] + 15, box["y"] + 35 * (row + 1) + 17)
        wait_idle(page)
    heading = page.get_by_text("only what differs")
    if heading.count():
        heading.first.scroll_into_view_if_needed()
        page.wait_for_timeout(800)
        page.screenshot(path=str(path))
        print(f"saved {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None, help="VPTDASH_HOME to show (default: a fresh one)")
    parser.add_argument("--demo", action="store_true", help="press the meeting demo and wait for it")
    parser.add_argument("--tiny", action="store_true", help="add a generated upload and a few tiny runs first")
    parser.add_argument(
        "--use-tiny",
        action="store_true",
        help="show the generated upload and tiny backbone (already in --home) as the active setup",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the demo sweep")
    args = parser.parse_args(argv)

    home = args.home or Path(tempfile.mkdtemp(prefix="vptdash-shots-"))
    if args.tiny:
        seed_tiny_runs(home)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(home, port, home / "streamlit.log")
    base = f"http://127.0.0.1:{port}/"
    try:
        wait_healthy(port, server)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            if args.demo:
                run_demo(page, base, args.out, args.timeout)
            page.goto(base)  # the app's own navigation from here: one session, like a presenter
            wait_idle(page)
            if args.tiny or args.use_tiny:
                use_tiny_setup(page)
            for name, link in PAGES:
                browser_support.open_page(page, link, SETTLE_MS)
                page.wait_for_timeout(1500)  # plotly finishes drawing
                page.screenshot(path=str(args.out / f"{name}.png"))
                print(f"saved {args.out / f'{name}.png'}")
            compare_runs(page, args.out / "runs-compare.png")
            browser.close()
    finally:
        stop_all(server, home)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
