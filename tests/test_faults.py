"""Unlucky machines: a full disk, a damaged run store, a read-only data dir, Ctrl-C and SIGTERM.

Real faults where the machine allows them without harm (a tiny tmpfs, a read-only bind mount, a real
subprocess that gets a real signal), injected errors where it does not; each ends in one line that
says what is wrong, with the history and the disk as they were."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from tests.browser_support import sigint_as_at_a_terminal
from vptdash import cli
from vptdash.engine import data, features
from vptdash.engine.train import RunConfig
from vptdash.runs import reference, worker
from vptdash.runs import store as store_module
from vptdash.runs.store import RunStore, StoreCorrupt, StoreReadOnly

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--backbone",
    "tiny-random",
    "--resolution",
    "32",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--no-latency",
    "--lr",
    "0.01",
]


def one_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip() and "Warning" not in x and "warn(" not in x]
    assert len(lines) == 1, lines
    assert "Traceback" not in text
    return lines[0]


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def history_store(n: int = 30) -> RunStore:
    store = RunStore()
    for seed in range(n):
        run_id = store.create_run(RunConfig(seed=seed).to_dict(), status="running")
        store.append_progress_many(run_id, [{"phase": "train", "step": k, "pad": "x" * 200} for k in range(10)])
        store.finish_run(run_id, "done", metrics={"accuracy": seed / 100})
    return store


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str):
    if os.geteuid() != 0:
        pytest.skip("a tmpfs needs root here")
    where.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs on this machine")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` read-only for this process: permissions when not root, a read-only bind mount when
    root (root ignores permissions)."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if subprocess.run(["mount", "--bind", str(folder), str(folder)]).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)]).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# ---------------------------------------------------------------------------------------------- disk full


def enospc_after_partial_write(real_save):
    """torch.save that writes half a file and then fails the way torch does on a full disk."""

    def save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 half a file")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")

    return save


def test_disk_full_on_the_image_cache_costs_only_speed(image_folder, monkeypatch):
    monkeypatch.setattr(data.torch, "save", enospc_after_partial_write(torch.save))
    data.clear_memory_cache()
    image_set = data.load_image_set(image_folder, 32)
    assert len(image_set.labels) == 36
    cache = Path(os.environ["VPTDASH_HOME"]) / "cache" / "datasets"
    assert leftovers(cache) == []


def test_disk_full_on_the_feature_cache_costs_only_speed(monkeypatch):
    monkeypatch.setattr(features.torch, "save", enospc_after_partial_write(torch.save))
    features.clear_memory()
    calls = []

    def encode(idx):
        calls.append(len(idx))
        return idx.float()[:, None] * 2

    got = features.cached_encodings("k-full", 5, torch.arange(5), encode, persist=True)
    assert got.squeeze(1).tolist() == [0, 2, 4, 6, 8] and calls == [5]
    assert leftovers(Path(os.environ["VPTDASH_HOME"]) / "cache") == []
    features.clear_memory()  # nothing reached the disk: a new process computes them again
    features.cached_encodings("k-full", 5, torch.arange(5), encode, persist=True)
    assert calls == [5, 5]


def test_a_run_that_cannot_be_recorded_says_so_in_one_line(image_folder, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(RunStore, "finish_run", disk_full)
    code = cli.main(["train", "--dataset", str(image_folder), *TINY, "--quiet"])
    assert code == 1
    assert "database or disk is full" in one_line(capsys.readouterr().err)


def test_learned_tensors_that_cannot_be_saved_fail_the_run_with_one_line(image_folder, monkeypatch, capsys):
    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "save_file", full)
    code = cli.main(["train", "--dataset", str(image_folder), *TINY, "--quiet"])
    assert code == 1
    assert "could not be saved" in one_line(capsys.readouterr().err)
    (run,) = RunStore().list_runs()
    assert run["status"] == "failed" and run["metrics"].get("accuracy") is not None  # the numbers are kept
    assert leftovers(RunStore().path.parent) == []


def test_a_really_full_disk(image_folder, tmp_path, monkeypatch, capsys):
    """VPTDASH_HOME on a 160 kB tmpfs: the run store fits, the image cache does not."""
    with mounted_tmpfs(tmp_path / "small", "160k") as home:
        monkeypatch.setenv("VPTDASH_HOME", str(home))
        data.clear_memory_cache()
        code = cli.main(["train", "--dataset", str(image_folder), *TINY, "--quiet"])
        err = capsys.readouterr().err
        if code != 0:
            line = one_line(err)
            assert any(word in line for word in ("full", "space", "could not")), line
            print(line)
        assert leftovers(home) == []
        shutil.rmtree(home / "cache")  # room again: the history is as it was, not damaged
        store_module.forget_integrity_checks()
        assert isinstance(RunStore(home / "data" / "runs.sqlite").list_runs(), list)  # not damaged by it


# ---------------------------------------------------------------------------------------------- damaged store


def damage(path: Path, how: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = bytearray(path.read_bytes())
    if how == "truncated":
        raw = raw[: len(raw) // 3]
    else:  # garbage over two whole pages in the middle; the header stays valid
        page = 4096
        start = (len(raw) // 2) // page * page
        raw[start : start + 2 * page] = os.urandom(2 * page)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["truncated", "garbage-in-the-middle"])
def test_damaged_store_is_refused_then_recovered_from_the_backup(how, capsys):
    store = history_store()
    backup = store.backup()  # the rolling backup as it stands after these runs
    extra = store.create_run(RunConfig(seed=99).to_dict(), status="queued")  # after the backup
    path = store.path
    damage(path, how)
    damaged_bytes = path.read_bytes()
    store_module.forget_integrity_checks()  # a new process: the check runs again

    with pytest.raises(StoreCorrupt, match="damaged"):
        RunStore(path)
    assert cli.main(["runs", "list"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "damaged" in line and "runs recover" in line
    assert path.read_bytes() == damaged_bytes  # nothing was written into it

    assert cli.main(["runs", "recover"]) == 0
    out = capsys.readouterr().out
    assert "restored the latest backup (30 runs)" in out
    kept = list(path.parent.glob("runs.sqlite.damaged-*"))
    assert [p.read_bytes() for p in kept if not p.name.endswith(("-wal", "-shm"))] == [damaged_bytes]
    restored = RunStore(path)
    assert len(restored.list_runs(status="done")) == 30 and restored.get_run(extra) is None
    assert backup.exists()


def test_a_damaged_store_never_replaces_a_good_backup():
    store = history_store(5)
    good = store.backup().read_bytes()
    damage(store.path, "garbage-in-the-middle")
    with pytest.raises(StoreCorrupt):
        store.backup()
    assert store.backup_path().read_bytes() == good
    assert leftovers(store.path.parent) == []


def test_backups_are_rolling_not_per_write():
    store = history_store(2)
    first = store.backup_path().stat().st_mtime_ns
    run_id = store.create_run(RunConfig().to_dict(), status="running")
    store.finish_run(run_id, "done")
    assert store.backup_path().stat().st_mtime_ns == first  # within BACKUP_INTERVAL_S: not rewritten
    assert store.backup_if_due(interval_s=0) is not None


def test_damaged_store_on_the_dashboard_offers_to_start_again(monkeypatch, tmp_path):
    monkeypatch.setenv("VPTDASH_NO_WARMUP", "1")
    monkeypatch.setattr(reference, "REFERENCE_FILE", tmp_path / "none.json")
    monkeypatch.setattr(worker, "ensure_worker", lambda store, **kw: True)
    store = history_store(3)
    store.backup()
    damage(store.path, "truncated")
    store_module.forget_integrity_checks()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception
    assert "damaged" in at.error[0].value and len(at.error[0].value.splitlines()) == 1
    at.button(key="store_recover").click().run()
    assert not at.exception
    assert "backup was restored" in at.success[0].value
    assert len(RunStore().list_runs()) == 3


# ---------------------------------------------------------------------------------------------- read-only


def test_read_only_data_dir_reads_the_history_and_says_what_to_fix(image_folder, tmp_path, monkeypatch, capsys):
    store = history_store(4)
    data_dir = store.path.parent
    before = sorted(p.name for p in data_dir.iterdir())
    with read_only(data_dir):
        store_module.forget_integrity_checks()
        assert cli.main(["runs", "list"]) == 0
        assert capsys.readouterr().out.count(" done ") == 4
        assert cli.main(["runs", "export", "--csv", str(tmp_path / "out.csv")]) == 0
        assert (tmp_path / "out.csv").read_text().count("\n") == 5
        capsys.readouterr()
        assert cli.main(["train", "--dataset", str(image_folder), *TINY, "--quiet"]) == 1
        line = one_line(capsys.readouterr().err)
        assert "read-only" in line and "writable" in line
        with pytest.raises(StoreReadOnly):
            RunStore().create_run({}, status="queued")

        monkeypatch.setenv("VPTDASH_NO_WARMUP", "1")
        monkeypatch.setattr(reference, "REFERENCE_FILE", tmp_path / "none.json")
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
        for page in ("home", "data", "train", "budget", "levers", "attention", "continual", "runs"):
            at.switch_page(f"app_pages/{page}.py").run()
            assert not at.exception, (page, [e.value for e in at.exception])
            assert any("read-only" in w.value for w in at.warning), page
        assert len(at.dataframe[0].value) == 4  # Runs lists the four runs
    assert sorted(p.name for p in data_dir.iterdir()) == before


# ---------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize(("sig", "code", "words"), [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_cancels_the_cli_run_with_one_line(sig, code, words, image_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "vptdash", "train", "--dataset", str(image_folder), *TINY, "--epochs", "500"]
    process = subprocess.Popen(
        argv,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_at_a_terminal,  # as a user's Ctrl-C finds it, even when CI runs us in the background
    )
    store = RunStore()
    deadline = time.monotonic() + 240
    try:
        while True:  # until it is really training
            runs = store.list_runs(status="running")
            if runs and (store.latest_progress(runs[0]["id"]) or {}).get("phase") in ("train", "val"):
                break
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the run never started training"
            time.sleep(0.3)
        process.send_signal(sig)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code
    last = [x for x in err.strip().splitlines() if x.strip()][-1]
    assert words in last and f"run {runs[0]['id']} marked cancelled" in last
    assert "Traceback" not in err
    run = store.get_run(runs[0]["id"])
    assert run["status"] == "cancelled" and run["finished_at"] is not None


def test_a_store_cannot_be_created_in_a_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    with read_only(folder):
        assert cli.main(["runs", "--store", str(folder / "runs.sqlite"), "list"]) == 1
        line = one_line(capsys.readouterr().err)
        assert "read-only" in line and "cannot be created" in line
    assert list(folder.iterdir()) == []


def test_sigterm_stops_a_parallel_sweep_and_its_worker_processes(image_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "vptdash", "sweep", "--dataset", str(image_folder), *TINY, "--epochs", "500"]
    argv += ["--prompts", "1,2", "--placement", "shallow", "--processes", "2", "--quiet"]
    process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    store = RunStore()
    deadline = time.monotonic() + 240
    try:
        while not any(
            (store.latest_progress(run["id"]) or {}).get("phase") in ("train", "val")
            for run in store.list_runs(status="running")
        ):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no run started training"
            time.sleep(0.3)
        children = [int(p) for p in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)  # without stopping its workers it would wait for all 500 epochs
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143
    assert "marked cancelled" in [x for x in err.strip().splitlines() if x.strip()][-1]
    assert {run["status"] for run in store.list_runs()} == {"cancelled"}
    time.sleep(1)
    alive = [
        pid
        for pid in children
        if Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    ]
    assert alive == [] or all("resource_tracker" in Path(f"/proc/{pid}/cmdline").read_text() for pid in alive)
