"""Hostile and careless input over the CLI, the library and the pages.

Every case asserts the same four things: a short message that names the problem, no traceback, the
run history as it was (or one honest failed run where the data itself is bad), and nothing written
outside the data dir (each CLI case runs in an empty working directory that must stay empty).
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit import config
from streamlit.testing.v1 import AppTest

from vptdash import cli
from vptdash.engine import data
from vptdash.engine.train import ConfigError, RunConfig
from vptdash.runs import reference, uploads, worker
from vptdash.runs.store import RunStore
from vptdash.ui import access
from vptdash.views.wording import md_escape

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
HOSTILE = "![x](https://tracker.example/p.png) [Login expired: sign in](https://phish.example/login)"
# Class folder names cannot hold "/", so the class name carries relative links and an HTML tag instead.
HOSTILE_CLASS = "![c](tracker.example?c.png) [sign in](phish.example?x) <b>bold</b>"
TINY = ["--backbone", "tiny-random", "--resolution", "32", "--epochs", "1", "--batch-size", "8", "--no-latency"]
# An unescaped link or image, raw HTML, or a bare URL that GitHub-flavoured Markdown would autolink.
UNESCAPED = re.compile(r"(?<!\\)\]\((?!\))|(?<!\\)!\[|(?<!\\)<(a|img|b|script)\b|https?://|www\.")


def png(level: int, size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), level, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def zip_of(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in members:
            archive.writestr(name, payload)
    return buffer.getvalue()


def error_lines(text: str) -> list[str]:
    """What a person reads on stderr, without library deprecation warnings (not ours to fix)."""
    return [
        line for line in text.strip().splitlines() if line.strip() and "Warning" not in line and "warn(" not in line
    ]


def assert_one_clear_line(text: str, *words: str) -> str:
    lines = error_lines(text)
    assert len(lines) == 1, lines
    assert "Traceback" not in text and 'File "' not in text
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    return lines[0]


@pytest.fixture
def history(image_folder, tmp_path, monkeypatch):
    """A store with two finished runs, an empty working directory, and a check afterwards that the
    history is intact and the working directory still empty."""
    store = RunStore()
    store.import_runs(
        [
            {"config": RunConfig(dataset=str(image_folder), seed=s).to_dict(), "metrics": {"accuracy": 0.5}}
            for s in (0, 1)
        ],
        source="precomputed",
    )
    before = {run["id"]: run["status"] for run in store.list_runs()}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    state = {"store": store, "folder": image_folder, "tmp": tmp_path, "new_runs_allowed": 0}
    yield state
    after = {run["id"]: run["status"] for run in store.list_runs()}
    assert {k: after.get(k) for k in before} == before  # nothing lost, nothing changed
    assert len(after) - len(before) <= state["new_runs_allowed"]
    assert list(cwd.iterdir()) == []  # nothing written where the command ran


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err


# ---------------------------------------------------------------------------------------------- CLI: options

REFUSED_UP_FRONT = [  # (arguments, words the message must contain): nothing may be stored
    (["train", "--seed", "-5"], ["--seed", "-5"]),
    (["train", "--split-seed", "-1"], ["--split-seed", "-1"]),
    (["train", "--seed", str(2**32)], ["--seed", str(2**32)]),
    (["train", "--seed", "seven"], ["--seed", "seven"]),
    (["sweep", "--seeds", "0,-1"], ["--seeds", "-1"]),
    (["sweep", "--seeds", f"1,{2**33}"], ["--seeds", str(2**33)]),
    (["continual", "--seeds", "-3"], ["--seeds", "-3"]),
    (["train", "--placement", ""], ["placement"]),
    (["train", "--placement", "none"], ["placement"]),
    (["train", "--placement", "0,x"], ["placement", "0,x"]),
    (["train", "--placement", "-1"], ["placement", "-1"]),
    (["train", "--prompts", "5000"], ["prompt count"]),
    (["train", "--prompts", "-1"], ["prompt count"]),
    (["train", "--epochs", "0"], ["epochs"]),
    (["train", "--lr", "0"], ["learning rate"]),
    (["train", "--lr", "nan"], ["learning rate"]),
    (["train", "--resolution", "5"], ["resolution"]),
    (["train", "--shots", "0"], ["shots"]),
    (["train", "--test-fraction", "1.5"], ["test fraction"]),
    (["train", "--val-fraction", "0.9"], ["val fraction"]),
    (["train", "--batch-size", "0"], ["batch size"]),
    (["train", "--prompt-dropout", "1"], ["dropout"]),
    (["train", "--warmup-epochs", "-1"], ["warm-up"]),
    (["train", "--prompt-rank", "4"], ["rank"]),
    (["sweep", "--processes", "0", "--prompts", "1"], ["--processes"]),
    (["condense", "--run", "999", "--keep", "1"], ["999"]),
    (["condense", "--run", "1", "--keep-fraction", "0.5"], ["run 1", "no stored prompts"]),
]


@pytest.mark.parametrize(("argv", "words"), REFUSED_UP_FRONT, ids=[" ".join(a) for a, _ in REFUSED_UP_FRONT])
def test_cli_refuses_bad_options_before_storing_anything(argv, words, history, capsys):
    extra = [] if argv[0] in ("condense", "continual") else ["--dataset", str(history["folder"]), *TINY]
    code, err = run_cli([argv[0], *extra, *argv[1:]], capsys)  # the case's own options win
    assert code == 2
    assert_one_clear_line(err, *words)


DEPTH_CHECKED = [  # only known once the backbone is built: still refused, and the run is not kept
    (["--placement", "0,99"], ["placement", "99", "0..3"]),
    (["--skip-blocks", "0,1,2,3"], ["skip every block"]),
    (["--skip-blocks", "7"], ["skip blocks", "7"]),
]


@pytest.mark.parametrize(("argv", "words"), DEPTH_CHECKED, ids=[" ".join(a) for a, _ in DEPTH_CHECKED])
def test_cli_invalid_for_this_backbone_is_not_stored(argv, words, history, capsys):
    code, err = run_cli(["train", "--dataset", str(history["folder"]), *TINY, "--quiet", *argv], capsys)
    assert code == 2
    assert_one_clear_line(err, *words)


def bad_zip(tmp: Path) -> Path:
    path = tmp / "not-a-zip.zip"
    path.write_bytes(b"PK\x03\x04 but then nothing a zip reader accepts")
    return path


def traversal_zip(tmp: Path) -> Path:
    path = tmp / "evil.zip"
    path.write_bytes(zip_of([("../../escaped.png", png(10)), ("a/1.png", png(10)), ("b/1.png", png(200))]))
    return path


def one_class_folder(tmp: Path) -> Path:
    folder = tmp / "one-class" / "only"
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"{i}.png").write_bytes(png(i * 10))
    return folder.parent


BAD_DATA = [  # the data itself is unusable: one failed run says why, in one line
    (lambda tmp: tmp / "does-not-exist", ["does-not-exist"]),
    (bad_zip, ["not-a-zip.zip"]),
    (traversal_zip, ["outside"]),
    (one_class_folder, ["one class"]),
]


@pytest.mark.parametrize(("make", "words"), BAD_DATA, ids=["missing", "not-a-zip", "traversal-zip", "one-class"])
def test_cli_bad_data_fails_in_one_line(make, words, history, capsys):
    dataset = make(history["tmp"])
    history["new_runs_allowed"] = 1
    code, err = run_cli(["train", "--dataset", str(dataset), *TINY, "--quiet"], capsys)
    assert code == 1
    assert_one_clear_line(err, "failed", *words)
    assert not (history["tmp"].parent / "escaped.png").exists() and not (history["tmp"] / "escaped.png").exists()


@pytest.mark.parametrize(
    ("content", "name", "words"),
    [
        (b"", "empty.pt", ["empty.pt", "the file is empty"]),
        (b"garbage, not a tensor file", "garbage.pt", ["garbage.pt", "not a plain state dict"]),
        (None, "missing.pt", ["not found", "missing.pt"]),
    ],
    ids=["empty", "garbage", "missing"],
)
def test_cli_bad_weights_give_one_line(content, name, words, history, capsys):
    weights = history["tmp"] / name
    if content is not None:
        weights.write_bytes(content)
    history["new_runs_allowed"] = 1
    argv = ["train", "--dataset", str(history["folder"]), *TINY, "--quiet", "--weights", str(weights)]
    code, err = run_cli(argv, capsys)
    assert code == 1
    line = assert_one_clear_line(err, *words)
    assert len(line) < 300 and not line.rstrip().endswith(": .")


@pytest.mark.parametrize(
    ("target", "words"),
    [("/nonexistent/x.csv", ["/nonexistent/x.csv"]), (".", ["cannot write"])],
    ids=["missing-folder", "a-directory"],
)
def test_cli_export_to_an_impossible_path(target, words, history, capsys):
    target = str(history["tmp"]) if target == "." else target
    code, err = run_cli(["runs", "export", "--csv", target], capsys)
    assert code == 1
    assert_one_clear_line(err, "error", *words)


@pytest.mark.parametrize("damage", ["garbage-header", "truncated", "text-file"])
def test_cli_damaged_store_given_with_store_option(damage, history, capsys):
    path = history["tmp"] / f"{damage}.sqlite"
    if damage == "text-file":
        path.write_text("id,status\n1,done\n")
    else:
        good = RunStore(path)
        for seed in range(200):
            good.create_run({"seed": seed, "pad": "x" * 500}, status="done")
        raw = path.read_bytes() + (path.with_name(path.name + "-wal").read_bytes() if damage == "x" else b"")
        raw = b"garbage!" * 4 + raw[32:] if damage == "garbage-header" else raw
        path.with_name(path.name + "-wal").unlink(missing_ok=True)
        path.with_name(path.name + "-shm").unlink(missing_ok=True)
        path.write_bytes(raw[: len(raw) // 3] if damage == "truncated" else raw)
    code, err = run_cli(["runs", "--store", str(path), "list"], capsys)
    assert code == 1
    assert_one_clear_line(err, "damaged", "runs recover")


def test_cli_store_in_an_impossible_place(history, capsys):
    code, err = run_cli(["runs", "--store", "/proc/vptdash/runs.sqlite", "list"], capsys)
    assert code == 1
    assert_one_clear_line(err, "/proc/vptdash")


# ---------------------------------------------------------------------------------------------- library


def test_md_escape_defuses_the_phishing_name():
    escaped = md_escape(HOSTILE)
    assert not UNESCAPED.search(escaped), escaped
    # every character of the name is still there, only escaped: a reader sees exactly what was typed
    assert escaped.replace("\\", "") == HOSTILE


@pytest.mark.parametrize(
    "text",
    [
        "<img src=x onerror=alert(1)>",
        "# heading\n- list",
        "**bold** _it_ `code`",
        ":red[alert] :material/home:",
        "$x^2$",
    ],
)
def test_md_escape_leaves_no_markdown_or_html_active(text):
    escaped = md_escape(text)
    assert "\n" not in escaped
    assert not re.search(r"(?<!\\)[<>*_`#\[\]:$-]", escaped), escaped


def test_upload_errors_name_the_users_file_not_the_staging_copy():
    with pytest.raises(data.DatasetError) as caught:
        uploads.save_zip_upload("cells.zip", zip_of([(f"only/{i}.png", png(i)) for i in range(4)]))
    message = str(caught.value)
    assert "cells.zip" in message and "one class" in message
    assert ".staging" not in message and "upload.zip" not in message and "\n" not in message


def test_upload_errors_for_an_unsafe_zip_name_the_users_file():
    with pytest.raises(data.DatasetError) as caught:
        uploads.save_zip_upload("trip photos", zip_of([("../x.png", png(1)), ("a/1.png", png(2))]))
    assert "trip photos" in str(caught.value) and "upload.zip" not in str(caught.value)
    assert list(p for p in uploads.list_uploads()) == []


def test_exif_rotated_jpeg_loads_upright(tmp_path):
    # Stored 60 wide x 20 high, tagged "rotate 90 clockwise to view" (orientation 6): upright it is
    # 20 wide x 60 high, white on the left third of the stored image -> the top of the upright one.
    stored = np.zeros((20, 60, 3), np.uint8)
    stored[:, :20] = 255
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    pixels = data.decode_image_bytes(buffer.getvalue(), 30)[0].float().mean(0)  # (30, 30), resized
    assert pixels[:8].mean() > 200 and pixels[-8:].mean() < 50  # bright top, dark bottom: upright


def test_undecodable_upload_image_gives_one_line():
    with pytest.raises(data.DatasetError) as caught:
        data.decode_image_bytes(b"\x89PNG\r\n\x1a\n but truncated", 32)
    assert "\n" not in str(caught.value) and "cannot" in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value"), [("seed", -1), ("seed", 2**32), ("split_seed", -5), ("seed", True), ("seed", 1.5)]
)
def test_run_config_refuses_seeds_numpy_cannot_take(field, value):
    with pytest.raises(ConfigError, match="seed"):
        RunConfig(**{field: value}).validate()


def test_token_comparison_and_loopback_rules():
    assert access.token_matches("s3cret-token-123", "s3cret-token-123")
    assert not access.token_matches("s3cret-token-12", "s3cret-token-123")
    assert not access.token_matches("", "")  # sharing without a token is never "no password"
    assert not access.token_matches(None, "s3cret-token-123")
    assert not access.listens_beyond_loopback("127.0.0.1") and not access.listens_beyond_loopback("localhost")
    assert access.listens_beyond_loopback("0.0.0.0") and access.listens_beyond_loopback("")
    assert access.is_shared("127.0.0.1", {"VPTDASH_SHARE": "1"}) and not access.is_shared("127.0.0.1", {})


# ---------------------------------------------------------------------------------------------- pages

PAGES = [
    "app_pages/home.py",
    "app_pages/data.py",
    "app_pages/train.py",
    "app_pages/budget.py",
    "app_pages/levers.py",
    "app_pages/attention.py",
    "app_pages/continual.py",
    "app_pages/runs.py",
]
# Selectbox and multiselect options, table cells and figure specs are plain text in Streamlit (only
# labels, radio and slider options, captions, alerts, Markdown and headers interpret Markdown).
PLAIN_TEXT = {("Selectbox", "options"), ("Selectbox", "raw_value"), ("Multiselect", "options")}
PLAIN_TEXT |= {("Multiselect", "raw_values"), ("Multiselect", "default")}


def element_strings(message, path=""):
    for field, value in message.ListFields():
        if field.name in ("spec", "data", "arrow_data", "styler", "figure", "id", "form_id", "widget_id"):
            continue
        values = value if not isinstance(value, (str, bytes)) and hasattr(value, "__len__") else [value]
        if hasattr(value, "ListFields"):
            values = [value]
        for item in values:
            if isinstance(item, str):
                yield path + field.name, item
            elif hasattr(item, "ListFields"):
                yield from element_strings(item, path + field.name + ".")


def walk(node):
    proto = getattr(node, "proto", None)
    if proto is not None and hasattr(proto, "ListFields"):
        yield type(node).__name__, proto
    for child in getattr(node, "children", {}).values():
        yield from walk(child)


@pytest.fixture
def hostile_app(monkeypatch, tmp_path):
    """An upload, class names, a file name, run errors and a failed run all carrying hostile text."""
    monkeypatch.setenv("VPTDASH_NO_WARMUP", "1")
    monkeypatch.setattr(reference, "REFERENCE_FILE", tmp_path / "no-reference.json")
    monkeypatch.setattr(worker, "ensure_worker", lambda store, **kw: True)
    files = [(f"{HOSTILE[:30]}{i}.png", png(40 + i), HOSTILE_CLASS) for i in range(8)]
    for level, name in ((200, "[b](x.y)"), (120, "![d](d.png)"), (80, "[e](e.e)")):  # 4 classes: Continual
        files += [(f"{name}{i}.png", png(level + i), name) for i in range(8)]
    info = uploads.save_files_upload(HOSTILE, files)
    spec = uploads.upload_spec(info.slug)
    store = RunStore()
    config = RunConfig(dataset=spec, num_prompts=5, placement="deep", backbone="tiny-random", resolution=32)
    failed = store.create_run(config.to_dict(), status="running")
    store.finish_run(failed, "failed", error=f"{HOSTILE}\nTraceback (most recent call last): ...")
    done = store.create_run({**config.to_dict(), "seed": 1}, status="running")
    store.finish_run(
        done,
        "done",
        metrics={"accuracy": 0.5, "balanced_accuracy": 0.5, "class_names": [HOSTILE_CLASS, "[b](x.y)"]},
        costs={"gmacs": 0.01, "params_trainable": 100},
    )
    return spec


@pytest.mark.parametrize("page", PAGES)
def test_pages_show_hostile_names_as_text(page, hostile_app):
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["active_dataset"] = hostile_app
    at.session_state["active_backbone"] = "tiny-random"
    at.session_state["active_resolution"] = 32
    at.session_state["cl_dataset"] = hostile_app
    at.run()
    at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    leaks = [
        (kind, name, text[:120])
        for root in (at.main, at.sidebar)
        for kind, proto in walk(root)
        for name, text in element_strings(proto)
        if (kind, name.split(".")[-1]) not in PLAIN_TEXT and UNESCAPED.search(text)
    ]
    assert leaks == []
    shown = " ".join(text for root in (at.main, at.sidebar) for _, p in walk(root) for _, text in element_strings(p))
    assert "Login expired" in shown.replace("\\", "")  # the name is shown, as text


# ---------------------------------------------------------------------------------------------- who may see it

TOKEN = "correct-horse-battery-staple"


@pytest.fixture
def shared(monkeypatch, tmp_path):
    monkeypatch.setenv("VPTDASH_NO_WARMUP", "1")
    monkeypatch.setattr(reference, "REFERENCE_FILE", tmp_path / "no-reference.json")
    monkeypatch.setenv(access.SHARE_ENV, "1")
    monkeypatch.setenv(access.TOKEN_ENV, TOKEN)
    details = config.get_option("client.showErrorDetails")
    yield
    config.set_option("client.showErrorDetails", details)


def app_text(at: AppTest) -> str:
    return " ".join(text for root in (at.main, at.sidebar) for _, p in walk(root) for _, text in element_strings(p))


def test_shared_mode_shows_only_the_token_prompt_until_the_token_is_entered(shared):
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert [w.label for w in at.text_input] == ["Access token"]
    assert "Job queue" not in app_text(at) and "visual prompts" not in app_text(at)

    at.text_input[0].input("correct-horse-battery-stapl")  # one character short
    at.button[0].click().run()
    assert "not right" in " ".join(e.value for e in at.error)
    assert "Job queue" not in app_text(at)

    at.text_input[0].input(TOKEN)
    at.button[0].click().run()
    assert not at.exception
    assert "Job queue" in app_text(at) and "visual prompts" in app_text(at)  # sidebar and the Home page
    at.switch_page("app_pages/runs.py").run()  # remembered for the session: no second prompt
    assert "Access token" not in [w.label for w in at.text_input] and "Job queue" in app_text(at)


def test_shared_mode_without_a_real_token_refuses_to_open(shared, monkeypatch):
    monkeypatch.setenv(access.TOKEN_ENV, "short")
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert "no access token" in " ".join(e.value for e in at.error)
    assert list(at.text_input) == [] and "Job queue" not in app_text(at)


def test_the_default_server_listens_on_loopback_only(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "VPTDASH_HOME": str(tmp_path / "home"), "VPTDASH_NO_WARMUP": "1", "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as reply:
                    if reply.read() == b"ok":
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.5)
        listening = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    listening.append(address)
        assert listening == ["0100007F"], listening  # 127.0.0.1 only: no 0.0.0.0, no ::
    finally:
        server.terminate()
        server.wait(timeout=30)
