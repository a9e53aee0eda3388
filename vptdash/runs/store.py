"""Run history and job queue in one SQLite file.

Several processes use the store at once: the Streamlit server (creates runs, polls progress),
the background worker (claims queued runs, appends progress, finishes them) and CLI processes.
To keep that safe and simple:

* the database is in WAL mode, so readers never block the single writer and vice versa;
* every operation opens its own short-lived connection (cheap for SQLite), so no connection
  is ever shared between threads or inherited across ``fork``;
* every write runs in ``BEGIN IMMEDIATE``: the write lock is taken up front, so a
  read-then-write (claiming a job, numbering a progress event) cannot interleave with another
  process, and lock waits go through the busy timeout instead of failing with "database is
  locked" on a lock upgrade.

Conventions:

* timestamps (``created_at``, ``started_at``, ``finished_at``) are UTC epoch seconds (float);
  a duration is a plain subtraction, ``pandas.to_datetime(x, unit="s", utc=True)`` for display;
* ``config``, ``metrics``, ``costs``, ``timings`` and progress events are JSON stored as TEXT;
  non-finite floats (NaN, inf) become ``null`` and numpy / 0-d torch scalars become Python
  numbers, so whatever a training loop reports can be stored;
* ``metrics`` / ``costs`` / ``timings`` read back as dicts (``{}`` when nothing was recorded);
* CSV exports write the timestamps as ISO 8601 with the time zone (``iso_timestamps``), so a
  spreadsheet shows dates, not epoch floats;
* ``settings`` holds small JSON values every process and browser tab shares (the active setup);
* artifacts (learned prompts, heads) are safetensors files next to the database, under
  ``<database stem>.artifacts/run_<id>.safetensors``: one folder per database, so two stores in the same
  folder never overwrite each other's run files.

pandas is imported only by the methods that build frames: the worker never needs it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import shutil
import sqlite3
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vptdash.engine import paths

if TYPE_CHECKING:  # pragma: no cover
    import pandas
    import torch

RUN_STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED_STATUSES = ("done", "failed", "cancelled")
SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 10.0
ORPHAN_ERROR = "worker process died"

# Columns every row of `runs_frame()` starts with, in this order (see `runs_frame`).
FRAME_BASE_COLUMNS = (
    "id",
    "status",
    "kind",
    "source",
    "created_at",
    "started_at",
    "finished_at",
    "duration_s",
    "parent_id",
    "sweep_id",
    "error",
)
TIMESTAMP_COLUMNS = ("created_at", "started_at", "finished_at")
# (run dict key, prefix used when one of its keys collides with an earlier column)
_FRAME_GROUPS = (("config", "config."), ("metrics", "metric."), ("costs", "cost."), ("timings", "timing."))
_RESULT_FIELDS = ("metrics", "costs", "timings")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- AUTOINCREMENT: ids of deleted runs are never reused, so a stale artifact file or a page
-- still showing an old id can never be confused with a new run.
CREATE TABLE IF NOT EXISTS runs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    status           TEXT NOT NULL,
    kind             TEXT NOT NULL,
    source           TEXT NOT NULL,
    created_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    parent_id        INTEGER,
    sweep_id         TEXT,
    dataset          TEXT,              -- copy of config["dataset"], for filtering
    config           TEXT NOT NULL,
    metrics          TEXT NOT NULL DEFAULT '{}',
    costs            TEXT NOT NULL DEFAULT '{}',
    timings          TEXT NOT NULL DEFAULT '{}',
    error            TEXT,
    worker_pid       INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    artifact_path    TEXT,              -- relative to the store's folder
    dedupe_key       TEXT UNIQUE        -- set by import_runs; NULL for live runs
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE INDEX IF NOT EXISTS runs_sweep ON runs(sweep_id);
-- Shared preferences (JSON values); added without a version bump: CREATE IF NOT EXISTS adds it to
-- an existing file, and an older vptdash simply ignores it.
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS progress (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    seq    INTEGER NOT NULL,            -- 0, 1, 2 ... per run: `progress(since=n)` is seq >= n
    t      REAL NOT NULL,               -- when it was recorded (epoch s)
    event  TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
-- Change counters: a page polls these (one cheap read) and redraws only when something changed.
-- Triggers keep them right whichever process (server, worker, CLI) writes.
INSERT OR IGNORE INTO meta(key, value) VALUES ('runs_version', '0'), ('progress_version', '0');
CREATE TRIGGER IF NOT EXISTS runs_version_insert AFTER INSERT ON runs BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'runs_version';
END;
CREATE TRIGGER IF NOT EXISTS runs_version_update AFTER UPDATE ON runs BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'runs_version';
END;
CREATE TRIGGER IF NOT EXISTS runs_version_delete AFTER DELETE ON runs BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'runs_version';
END;
CREATE TRIGGER IF NOT EXISTS progress_version_insert AFTER INSERT ON progress BEGIN
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'progress_version';
END;
"""


BACKUP_INTERVAL_S = 300.0  # the rolling backup is refreshed after a finished run at most this often
SQLITE_MAGIC = b"SQLite format 3\x00"
_CHECKED_FILES: set[tuple[str, int, int]] = set()  # files that passed the integrity check in this process


class StoreError(RuntimeError):
    """The database file cannot be used by this version of vptdash."""


class StoreCorrupt(StoreError):
    """The database file is damaged; `recover_store` moves it aside (keeping it) and starts again."""


class StoreReadOnly(StoreError):
    """The store can be read but not written (a read-only data dir or file)."""


# --------------------------------------------------------------------------- JSON helpers


def _clean_json(value: Any) -> Any:
    """Make `value` strictly JSON-serialisable: NaN/inf -> None, numpy/torch scalars -> numbers."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_clean_json(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy scalars/arrays, torch tensors: no import needed
        return _clean_json(value.tolist())
    if hasattr(value, "item"):
        return _clean_json(value.item())
    raise TypeError(f"cannot store {type(value).__name__} as JSON: {value!r}")


def _dumps(value: Any) -> str:
    # allow_nan=False: a NaN that slipped through would be written as invalid JSON.
    return json.dumps(_clean_json(value), allow_nan=False, separators=(",", ":"))


def _loads(text: str | None, default: Any = None) -> Any:
    return default if text is None else json.loads(text)


def _dataset_of(config: dict) -> str | None:
    value = config.get("dataset")
    if value is None or isinstance(value, str):
        return value
    return _dumps(value)


def _status_list(status: str | Iterable[str]) -> list[str]:
    statuses = [status] if isinstance(status, str) else list(status)
    unknown = set(statuses) - set(RUN_STATUSES)
    if unknown:
        raise ValueError(f"unknown run status {sorted(unknown)}; expected one of {RUN_STATUSES}")
    return statuses


def _pid_or_own(pid: int | None) -> int:
    # Always record some pid: a running run without one could never be detected as orphaned.
    return os.getpid() if pid is None else pid


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs. A zombie counts as dead: a worker killed while its parent (the
    Streamlit server, which never waits for it) lives on stays a zombie that `os.kill(pid, 0)` still finds."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (macOS): trust os.kill
        return True
    return state not in ("Z", "X")


def dedupe_key(source: str, kind: str, sweep_id: str | None, config: dict, created_at: float | None = None) -> str:
    """Identity of an imported run: the same run imported twice gets the same key."""
    payload = json.dumps(
        _clean_json([source, kind, sweep_id, config, created_at]), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------- the store


class RunStore:
    """Run history + job queue. Cheap to create; safe to use from many threads and processes."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else paths.store_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the folder of the run store {self.path.parent}: {exc.strerror or exc}"
            ) from None
        # A read-only folder or file (a copied data dir, a full-disk remount): the history can still be
        # read, through SQLite's immutable mode, since no -wal/-shm file can be created beside it.
        self.read_only = self.path.exists() and not (
            os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)
        )
        if not self.path.exists() and not os.access(self.path.parent, os.W_OK):
            raise StoreReadOnly(
                f"the run store {self.path} cannot be created: {self.path.parent} is read-only; make it "
                "writable, or set VPTDASH_HOME to a writable folder"
            )
        try:
            if self.path.exists() and self.path.stat().st_size > 0:
                self._check_integrity()  # before any write: nothing is written into a damaged file
            if self.read_only:
                self._check_readable()
            else:
                self._init_db()
        except sqlite3.OperationalError as exc:  # no room for the -wal/-shm files, a locked or vanished disk
            raise StoreError(f"the run store {self.path} cannot be opened: {exc}{disk_hint(exc)}") from None
        except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
            raise self._corrupt(str(exc)) from None

    def _corrupt(self, detail: str) -> StoreCorrupt:
        return StoreCorrupt(
            f"the run store {self.path} is damaged ({first_line_of(detail)}); "
            "`python -m vptdash runs recover` (or the button on the dashboard) moves it aside, keeping it, "
            "and starts again from the latest backup or empty"
        )

    def _check_readable(self) -> None:
        with self._read() as conn:
            conn.execute("SELECT COUNT(*) FROM runs").fetchone()

    def _check_integrity(self) -> None:
        """Refuse a damaged file up front: a bad header or a torn page would otherwise surface as a
        traceback somewhere later, and garbage in the middle would pass until the app wrote into it.
        Once per file and process (a worker opens its store again and again)."""
        stat = self.path.stat()
        identity = (str(self.path.resolve()), stat.st_ino, stat.st_dev)
        if identity in _CHECKED_FILES:
            return
        with open(self.path, "rb") as handle:
            header = handle.read(len(SQLITE_MAGIC))
        if header != SQLITE_MAGIC:
            raise self._corrupt("not an SQLite file: its header is overwritten or cut off")
        with self._read() as conn:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)").fetchall()]
        if problems != ["ok"]:
            raise self._corrupt("integrity check: " + "; ".join(problems))
        _CHECKED_FILES.add(identity)

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    # ---------------------------------------------------------------- connections

    def _connect(self) -> sqlite3.Connection:
        # timeout= is SQLite's busy timeout: wait for another process's write lock instead of
        # failing. isolation_level=None: we issue BEGIN ourselves (see module docstring).
        if self.read_only:
            uri = f"{self.path.resolve().as_uri()}?immutable=1"
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            conn.row_factory = sqlite3.Row
            return conn
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")  # per connection: cascades progress deletes
        conn.execute("PRAGMA synchronous = NORMAL")  # durable enough in WAL, no fsync per commit
        return conn

    def _refuse_write(self) -> None:
        if self.read_only:
            raise StoreReadOnly(
                f"the run store {self.path} is read-only: nothing can be recorded; make "
                f"{self.path.parent} writable, or set VPTDASH_HOME to a writable folder"
            )

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._refuse_write()
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _init_db(self) -> None:
        with self._read() as conn:
            self._enable_wal(conn)
            # One IMMEDIATE transaction: processes starting together create the schema once.
            conn.executescript(
                "BEGIN IMMEDIATE;" + _SCHEMA + "INSERT OR IGNORE INTO meta(key, value)"
                f" VALUES ('schema_version', '{SCHEMA_VERSION}'); COMMIT;"
            )
            version = int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}; this vptdash "
                f"understands up to {SCHEMA_VERSION}. Upgrade vptdash."
            )
        # version < SCHEMA_VERSION would be migrated here once there is a version 2.

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # WAL is a property of the file, so this only does work the first time. Switching needs
        # a moment of exclusive access; if another process is initialising too, retry briefly.
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if mode.lower() != "wal":  # e.g. some network file systems
            warnings.warn(
                f"SQLite WAL mode unavailable for {self.path} (journal_mode={mode}); concurrent access will be slower",
                RuntimeWarning,
                stacklevel=3,
            )

    def journal_mode(self) -> str:
        """The database's current journal mode ("wal" normally)."""
        with self._read() as conn:
            return conn.execute("PRAGMA journal_mode").fetchone()[0]

    # ---------------------------------------------------------------- rows <-> dicts

    def _row_to_run(self, row: sqlite3.Row) -> dict:
        run = dict(row)
        run["config"] = _loads(run["config"], {})
        for field in _RESULT_FIELDS:
            run[field] = _loads(run[field], {})
        run["cancel_requested"] = bool(run["cancel_requested"])
        if run["artifact_path"] is not None:
            run["artifact_path"] = str(self.path.parent / run["artifact_path"])
        return run

    @staticmethod
    def _require_row(conn: sqlite3.Connection, run_id: int, columns: str = "id") -> sqlite3.Row:
        row = conn.execute(f"SELECT {columns} FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"no run with id {run_id}")
        return row

    # ---------------------------------------------------------------- runs

    def create_run(
        self,
        config: dict,
        *,
        status: str = "queued",
        kind: str = "train",
        source: str = "live",
        parent_id: int | None = None,
        sweep_id: str | None = None,
    ) -> int:
        """Record a new run and return its id.

        status="queued" puts it on the worker's queue. A process that runs the job itself (CLI)
        should pass status="running" rather than create-then-`mark_running`, so the worker can
        never claim it in between; it then gets started_at=now and this process's pid.
        """
        _status_list(status)
        now = time.time()
        running = status == "running"
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO runs (status, kind, source, created_at, started_at, finished_at,"
                " parent_id, sweep_id, dataset, config, worker_pid)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    status,
                    kind,
                    source,
                    now,
                    now if running else None,
                    now if status in FINISHED_STATUSES else None,
                    parent_id,
                    sweep_id,
                    _dataset_of(config),
                    _dumps(config),
                    os.getpid() if running else None,
                ),
            )
            return cur.lastrowid

    def get_run(self, run_id: int) -> dict | None:
        """All columns of the run (JSON decoded), or None. Progress: see `progress()`."""
        with self._read() as conn:
            row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return None if row is None else self._row_to_run(row)

    def list_runs(
        self,
        *,
        status: str | Iterable[str] | None = None,
        kind: str | None = None,
        source: str | None = None,
        sweep_id: str | None = None,
        dataset: str | None = None,
        limit: int | None = None,
    ) -> list[dict]:
        """Runs matching every given filter, newest first (by created_at, then id)."""
        where, params = [], []
        if status is not None:
            statuses = _status_list(status)
            if not statuses:
                return []
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            params += statuses
        for column, value in (("kind", kind), ("source", source), ("sweep_id", sweep_id), ("dataset", dataset)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "SELECT * FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [self._row_to_run(row) for row in rows]

    def runs_frame(self, **filters) -> "pandas.DataFrame":
        """One row per run (filters as in `list_runs`, newest first), flat columns:

        1. `FRAME_BASE_COLUMNS`: id, status, kind, source, created_at, started_at, finished_at,
           duration_s (finished_at - started_at, NaN until finished), parent_id, sweep_id, error;
        2. every config key under its own name (e.g. "dataset", "num_prompts");
        3. every metrics key, then every costs key, then every timings key, also bare.

        A key whose name is already taken by an earlier column gets its group's prefix:
        "config.<k>", "metric.<k>", "cost.<k>", "timing.<k>" (so a metric "status" becomes
        "metric.status"; "accuracy" in both metrics and costs gives "accuracy" and
        "cost.accuracy"). Within a group, columns appear in first-seen order. Missing keys are
        NaN/None; nested values (dicts, lists) are JSON strings. Timestamps are epoch seconds.
        """
        import pandas as pd  # noqa: PLC0415 - slow to import; the worker process never needs frames

        runs = self.list_runs(**filters)
        names = _frame_column_names(runs)
        records = [_frame_record(run, names) for run in runs]
        return pd.DataFrame.from_records(records, columns=[*FRAME_BASE_COLUMNS, *names.values()])

    def mark_running(self, run_id: int, *, pid: int | None = None) -> None:
        """status=running, started_at=now, worker_pid=pid (default: this process)."""
        with self._write() as conn:
            self._require_row(conn, run_id)
            conn.execute(
                "UPDATE runs SET status = 'running', started_at = ?, worker_pid = ? WHERE id = ?",
                (time.time(), _pid_or_own(pid), run_id),
            )

    def finish_run(
        self,
        run_id: int,
        status: str,
        *,
        metrics: dict | None = None,
        costs: dict | None = None,
        timings: dict | None = None,
        error: str | None = None,
    ) -> None:
        """Final status + finished_at; metrics/costs/timings are merged as in `update_results`.

        Overrides any earlier final status on purpose: if the orphan sweep wrongly failed a run
        whose worker was in fact alive, the worker's own result is the truth.
        """
        if status not in FINISHED_STATUSES:
            raise ValueError(f"finish_run status must be one of {FINISHED_STATUSES}, not {status!r}")
        with self._write() as conn:
            self._merge_results(conn, run_id, metrics=metrics, costs=costs, timings=timings)
            conn.execute(
                "UPDATE runs SET status = ?, finished_at = ?, error = ? WHERE id = ?",
                (status, time.time(), error, run_id),
            )
        self.backup_if_due()

    # ---------------------------------------------------------------- backup

    def backup_path(self) -> Path:
        return backup_path_of(self.path)

    def backup_if_due(self, interval_s: float = BACKUP_INTERVAL_S) -> Path | None:
        """Refresh the rolling backup when it is older than `interval_s`; never raises (a backup that
        cannot be written costs only the safety net, not the run)."""
        try:
            target = self.backup_path()
            if target.exists() and time.time() - target.stat().st_mtime < interval_s:
                return None
            return self.backup()
        except (OSError, sqlite3.Error, StoreError):
            return None

    def backup(self) -> Path:
        """A consistent copy of the store (SQLite's online backup: other processes keep writing),
        written beside it and swapped in only once it passes the integrity check, so a damaged
        store never replaces a good backup."""
        target = self.backup_path()
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            with self._read() as source:
                dest = sqlite3.connect(tmp)
                try:
                    source.backup(dest)
                    ok = dest.execute("PRAGMA quick_check").fetchone()[0] == "ok"
                except sqlite3.DatabaseError:  # damage SQLite meets while copying ("malformed"), not only in the check
                    ok = False
                finally:
                    dest.close()
            if not ok:
                raise StoreCorrupt(f"the run store {self.path} fails its integrity check; the backup is kept as it was")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def update_results(
        self, run_id: int, *, metrics: dict | None = None, costs: dict | None = None, timings: dict | None = None
    ) -> None:
        """Shallow-merge into the stored dicts (new keys win; keys not given are kept)."""
        with self._write() as conn:
            self._merge_results(conn, run_id, metrics=metrics, costs=costs, timings=timings)

    def update_config(self, run_id: int, config: dict) -> None:
        """Replace a run's stored configuration (a job that settles part of it only while it runs, such
        as condensation's per-block prompt counts). Unknown ids raise KeyError."""
        with self._write() as conn:
            self._require_row(conn, run_id)
            conn.execute("UPDATE runs SET config = ? WHERE id = ?", (_dumps(config), run_id))

    def _merge_results(self, conn: sqlite3.Connection, run_id: int, **updates) -> None:
        row = self._require_row(conn, run_id, ", ".join(_RESULT_FIELDS))
        for field, update in updates.items():
            if update:
                merged = {**_loads(row[field], {}), **update}
                conn.execute(f"UPDATE runs SET {field} = ? WHERE id = ?", (_dumps(merged), run_id))

    def delete_run(self, run_id: int) -> None:
        """Remove the run, its progress (cascade) and its artifact file. Unknown ids: no-op."""
        with self._write() as conn:
            conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        self._artifact_file(run_id).unlink(missing_ok=True)

    # ---------------------------------------------------------------- progress

    def append_progress(self, run_id: int, event: dict) -> None:
        self.append_progress_many(run_id, [event])

    def append_progress_many(self, run_id: int, events: list[dict]) -> None:
        """Append events in order, in one transaction. KeyError if the run does not exist."""
        if not events:
            return
        encoded = [_dumps(event) for event in events]  # fail before taking the lock
        now = time.time()
        with self._write() as conn:
            self._require_row(conn, run_id)
            # Safe read-then-write: BEGIN IMMEDIATE holds the write lock for the whole block.
            start = conn.execute(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM progress WHERE run_id = ?", (run_id,)
            ).fetchone()[0]
            conn.executemany(
                "INSERT INTO progress (run_id, seq, t, event) VALUES (?, ?, ?, ?)",
                [(run_id, start + i, now, text) for i, text in enumerate(encoded)],
            )

    def progress(self, run_id: int, *, since: int = 0) -> list[dict]:
        """Events in append order, skipping the first `since` (the ones a poller already has)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT event FROM progress WHERE run_id = ? AND seq >= ? ORDER BY seq", (run_id, since)
            ).fetchall()
        return [json.loads(row[0]) for row in rows]

    def latest_progress(self, run_id: int) -> dict | None:
        with self._read() as conn:
            return self._latest_progress(conn, run_id)

    @staticmethod
    def _latest_progress(conn: sqlite3.Connection, run_id: int) -> dict | None:
        row = conn.execute(
            "SELECT event FROM progress WHERE run_id = ? ORDER BY seq DESC LIMIT 1", (run_id,)
        ).fetchone()
        return None if row is None else json.loads(row[0])

    # ---------------------------------------------------------------- artifacts

    def _artifact_file(self, run_id: int) -> Path:
        return self.path.parent / f"{self.path.stem}.artifacts" / f"run_{run_id}.safetensors"

    def save_artifact(
        self, run_id: int, tensors: dict[str, "torch.Tensor"], metadata: dict[str, str] | None = None
    ) -> Path:
        """Write the tensors to <stem>.artifacts/run_<id>.safetensors and record it on the run.

        Written to a temporary file and renamed, so a reader never sees half a file.
        """
        with self._read() as conn:
            self._require_row(conn, run_id)
        self._refuse_write()
        final = self._artifact_file(run_id)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"run {run_id}'s learned tensors cannot be saved in {final.parent}: {exc.strerror}"
            ) from None
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        # clone(): safetensors refuses views and tensors sharing storage (e.g. tied weights).
        payload = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        try:
            save_file(payload, str(tmp), metadata=meta)
            os.replace(tmp, final)
        except Exception as exc:  # noqa: BLE001 - safetensors reports a full disk as its own error type
            raise StoreError(f"run {run_id}'s learned tensors could not be saved in {final.parent}: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        relative = final.relative_to(self.path.parent).as_posix()
        with self._write() as conn:
            updated = conn.execute("UPDATE runs SET artifact_path = ? WHERE id = ?", (relative, run_id)).rowcount
        if not updated:  # deleted while we were writing: don't leave an orphan file
            final.unlink(missing_ok=True)
            raise KeyError(f"no run with id {run_id}")
        return final

    def _recorded_artifact(self, run_id: int) -> Path:
        run = self.get_run(run_id)
        if run is None:
            raise KeyError(f"no run with id {run_id}")
        if run["artifact_path"] is None:
            raise KeyError(f"run {run_id} has no saved artifact")
        path = Path(run["artifact_path"])
        if not path.exists():
            raise FileNotFoundError(f"artifact of run {run_id} is missing: {path}")
        return path

    def load_artifact(self, run_id: int) -> dict[str, "torch.Tensor"]:
        """Tensors saved by `save_artifact` (on CPU). KeyError if the run has none."""
        return load_file(str(self._recorded_artifact(run_id)))

    def load_artifact_metadata(self, run_id: int) -> dict[str, str]:
        """The `metadata` given to `save_artifact` (without loading the tensors)."""
        with safe_open(str(self._recorded_artifact(run_id)), framework="pt") as f:
            return dict(f.metadata() or {})

    # ---------------------------------------------------------------- export

    def export_csv(self, path: str | Path, **filters) -> Path:
        """`runs_frame(**filters)` as CSV (no index column), timestamps in ISO 8601 (`iso_timestamps`)."""
        path = Path(path)
        iso_timestamps(self.runs_frame(**filters)).to_csv(path, index=False)
        return path

    # ---------------------------------------------------------------- settings

    def get_setting(self, key: str, default: Any = None) -> Any:
        """A shared setting (JSON value) or `default` when unset or unreadable."""
        with self._read() as conn:
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        if row is None:
            return default
        try:
            return json.loads(row[0])
        except ValueError:
            return default

    def set_setting(self, key: str, value: Any) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, _dumps(value)),
            )

    # ---------------------------------------------------------------- job queue

    def claim_next_queued(self, *, worker_pid: int | None = None, kinds: Iterable[str] | None = None) -> dict | None:
        """Take the oldest queued run (of one of `kinds`, when given), mark it running for `worker_pid`
        (default: this process) and return it; None if there is none. Atomic across processes."""
        kind_filter, params = "", []
        if kinds is not None:
            params = list(kinds)
            if not params:
                return None
            kind_filter = f" AND kind IN ({','.join('?' * len(params))})"
        with self._write() as conn:
            row = conn.execute(
                f"SELECT id FROM runs WHERE status = 'queued'{kind_filter} ORDER BY id LIMIT 1", params
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE runs SET status = 'running', started_at = ?, worker_pid = ? WHERE id = ?",
                (time.time(), _pid_or_own(worker_pid), row["id"]),
            )
            claimed = conn.execute("SELECT * FROM runs WHERE id = ?", (row["id"],)).fetchone()
        return self._row_to_run(claimed)

    def request_cancel(self, run_id: int) -> None:
        """Queued: cancelled at once. Running: flag the worker checks between steps.
        Finished: nothing to do. KeyError for an unknown id."""
        with self._write() as conn:
            status = self._require_row(conn, run_id, "status")["status"]
            if status == "queued":
                conn.execute(
                    "UPDATE runs SET status = 'cancelled', finished_at = ?, cancel_requested = 1 WHERE id = ?",
                    (time.time(), run_id),
                )
            elif status == "running":
                conn.execute("UPDATE runs SET cancel_requested = 1 WHERE id = ?", (run_id,))

    def cancel_runs_of(self, pid: int, *, sweep_id: str | None = None, reason: str = "interrupted") -> list[int]:
        """Cancel the runs process `pid` is running, and the unfinished runs of `sweep_id`: the CLI
        after Ctrl-C or SIGTERM, so they read cancelled instead of running until a worker sweep
        calls them dead. Returns their ids."""
        sql = "SELECT id FROM runs WHERE (status = 'running' AND worker_pid = ?)"
        params: list[Any] = [pid]
        if sweep_id is not None:
            sql += " OR (status IN ('queued', 'running') AND sweep_id = ?)"
            params.append(sweep_id)
        with self._write() as conn:
            ids = [row[0] for row in conn.execute(sql + " ORDER BY id", params)]
            conn.executemany(
                "UPDATE runs SET status = 'cancelled', finished_at = ?, cancel_requested = 1, error = ? WHERE id = ?",
                [(time.time(), f"cancelled: {reason}", run_id) for run_id in ids],
            )
        return ids

    def is_cancel_requested(self, run_id: int) -> bool:
        """True if cancel was requested, or if the run no longer exists (deleted while
        running: the worker should stop rather than write into a missing row)."""
        with self._read() as conn:
            row = conn.execute("SELECT cancel_requested FROM runs WHERE id = ?", (run_id,)).fetchone()
        return row is None or bool(row[0])

    def fail_orphaned_runs(self, alive_pids: set[int] | None = None) -> list[int]:
        """Fail running runs whose worker process is gone; return their ids.

        A pid is alive if it is in `alive_pids`, or, when that is None, if `os.kill(pid, 0)`
        finds it. Running runs without a recorded pid are left alone (nothing to check).
        """
        is_alive = pid_alive if alive_pids is None else alive_pids.__contains__
        failed = []
        with self._write() as conn:
            rows = conn.execute(
                "SELECT id, worker_pid FROM runs WHERE status = 'running' AND worker_pid IS NOT NULL"
            ).fetchall()
            for row in rows:
                if not is_alive(row["worker_pid"]):
                    conn.execute(
                        "UPDATE runs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                        (time.time(), ORPHAN_ERROR, row["id"]),
                    )
                    failed.append(row["id"])
        return failed

    def versions(self) -> tuple[int, int]:
        """(runs version, progress version): counters that grow with every change to any run (created,
        claimed, finished, updated, deleted) and with every progress event. Equal values mean nothing
        changed, so a polling page can skip its redraw."""
        with self._read() as conn:
            values = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('runs_version', 'progress_version')"))
        return int(values.get("runs_version", 0)), int(values.get("progress_version", 0))

    def queue_summary(self) -> dict:
        """{"running": [run dicts, each with "latest_progress"], "queued": n, "done": n,
        "failed": n, "cancelled": n}, read from one consistent snapshot."""
        with self._read() as conn:
            conn.execute("BEGIN")  # one read transaction: counts and running list agree
            counts = dict(conn.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"))
            rows = conn.execute("SELECT * FROM runs WHERE status = 'running' ORDER BY started_at, id").fetchall()
            running = []
            for row in rows:
                run = self._row_to_run(row)
                run["latest_progress"] = self._latest_progress(conn, run["id"])
                running.append(run)
            conn.execute("COMMIT")
        summary: dict[str, Any] = {"running": running}
        for status in ("queued", "done", "failed", "cancelled"):
            summary[status] = counts.get(status, 0)
        return summary

    # ---------------------------------------------------------------- bulk import / export

    def import_runs(self, rows: list[dict], *, source: str = "precomputed", refresh_costs: bool = False) -> int:
        """Insert finished runs (e.g. the reference sweep shipped with the app); return how
        many were new.

        Each row: "config" (required); optional "status" (finished statuses only, default
        "done"), "kind" (default "train"), "sweep_id", "metrics", "costs", "timings", "error",
        "created_at", "started_at", "finished_at", "progress" (list of events), "dedupe_key",
        "parent_key" (the dedupe_key of the parent run, resolved to its id here).
        Idempotent: rows whose dedupe_key is already stored are skipped; without an explicit
        key it is `dedupe_key(source, kind, sweep_id, config, created_at)`. With refresh_costs, an
        already stored row of the same source takes the file's "costs" (a shipped file whose GMACs and
        latency were re-counted after the graph changed: otherwise old and new figures would mix).
        All rows go in one transaction: an invalid row imports nothing. Live runs have no stored key;
        the key their export derived (`_run_key`) counts as present too, so a store re-importing its own
        export (a benchmark restoring its checkpoint) adds nothing.
        """
        now = time.time()
        inserted, parents = 0, []
        with self._write() as conn:
            live_keys = self._live_run_keys(conn)
            for row in rows:
                run_id = self._insert_imported(conn, row, source, now, live_keys)
                if run_id is None:
                    if refresh_costs and row.get("costs") and row.get("dedupe_key"):
                        conn.execute(
                            "UPDATE runs SET costs = ? WHERE dedupe_key = ? AND source = ?",
                            (_dumps(row["costs"]), row["dedupe_key"], source),
                        )
                    continue
                inserted += 1
                if row.get("parent_key"):
                    parents.append((run_id, row["parent_key"]))
            # After all inserts, so a parent later in `rows` is found too.
            for run_id, parent_key in parents:
                conn.execute(
                    "UPDATE runs SET parent_id = (SELECT id FROM runs WHERE dedupe_key = ?) WHERE id = ?",
                    (parent_key, run_id),
                )
        return inserted

    @staticmethod
    def _live_run_keys(conn: sqlite3.Connection) -> set[str]:
        """The keys `export_runs` derives for runs without a stored one (`_run_key`), reading only the
        columns the key needs: this runs on every import, the reference sweep's at each app start."""
        rows = conn.execute(
            "SELECT dedupe_key, source, kind, sweep_id, config, created_at FROM runs WHERE dedupe_key IS NULL"
        )
        return {_run_key({**dict(r), "config": _loads(r["config"], {})}) for r in rows}

    @staticmethod
    def _insert_imported(
        conn: sqlite3.Connection, row: dict, source: str, now: float, live_keys: set[str]
    ) -> int | None:
        config = row["config"]
        status = row.get("status", "done")
        if status not in FINISHED_STATUSES:
            raise ValueError(f"import_runs takes finished runs only, got status {status!r}")
        kind = row.get("kind", "train")
        key = row.get("dedupe_key") or dedupe_key(source, kind, row.get("sweep_id"), config, row.get("created_at"))
        if key in live_keys:  # a live run of this store, exported earlier
            return None
        cur = conn.execute(
            "INSERT OR IGNORE INTO runs (status, kind, source, created_at, started_at,"
            " finished_at, sweep_id, dataset, config, metrics, costs, timings, error, dedupe_key)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                status,
                kind,
                source,
                row.get("created_at", now),
                row.get("started_at"),
                row.get("finished_at", now),
                row.get("sweep_id"),
                _dataset_of(config),
                _dumps(config),
                *(_dumps(row.get(f) or {}) for f in _RESULT_FIELDS),
                row.get("error"),
                key,
            ),
        )
        if cur.rowcount == 0:  # dedupe_key already present
            return None
        run_id = cur.lastrowid
        conn.executemany(
            "INSERT INTO progress (run_id, seq, t, event) VALUES (?, ?, ?, ?)",
            [(run_id, i, now, _dumps(e)) for i, e in enumerate(row.get("progress") or [])],
        )
        return run_id

    def export_runs(self, *, include_progress: bool = True, **filters) -> list[dict]:
        """Runs (filters as in `list_runs`) in the shape `import_runs` takes, oldest first.

        Every row carries a "dedupe_key" (the stored one, or one derived from the run's own
        source/kind/sweep/config/created_at) so re-importing the file is idempotent, and a
        "parent_key" when the run has a parent, so lineage survives the round trip.
        """
        runs = list(reversed(self.list_runs(**filters)))
        keys = {run["id"]: _run_key(run) for run in runs}
        exported = []
        for run in runs:
            row = {
                field: run[field]
                for field in (
                    "config",
                    "status",
                    "kind",
                    "sweep_id",
                    "metrics",
                    "costs",
                    "timings",
                    "error",
                    "created_at",
                    "started_at",
                    "finished_at",
                )
            }
            row["dedupe_key"] = keys[run["id"]]
            if run["parent_id"] is not None:
                parent = keys.get(run["parent_id"]) or self._key_of(run["parent_id"])
                if parent is not None:
                    row["parent_key"] = parent
            if include_progress:
                row["progress"] = self.progress(run["id"])
            exported.append(row)
        return exported

    def _key_of(self, run_id: int) -> str | None:
        run = self.get_run(run_id)
        return None if run is None else _run_key(run)


# --------------------------------------------------------------------------- helpers


def forget_integrity_checks() -> None:
    """Check every store file again when next opened, as a new process would (tests; after a repair)."""
    _CHECKED_FILES.clear()


def disk_hint(exc: BaseException) -> str:
    """What SQLite's terse I/O errors usually mean on a laptop."""
    text = str(exc).lower()
    return " (is the disk full? free some space and try again)" if ("i/o" in text or "full" in text) else ""


def first_line_of(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else "no detail"


def backup_path_of(store_path: str | Path) -> Path:
    store_path = Path(store_path)
    return store_path.with_name(f"{store_path.stem}.backup{store_path.suffix or '.sqlite'}")


def recover_store(path: str | Path | None = None) -> dict:
    """Move a damaged store aside (renamed, never deleted, with its -wal/-shm files) and put the
    latest good backup in its place, or nothing (a fresh store is created on the next open).

    Returns {"moved_to": path or None, "restored_backup": bool, "runs": count in the new store}."""
    path = Path(path) if path is not None else paths.store_path()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved_to = None
    if path.exists():
        moved_to = path.with_name(f"{path.name}.damaged-{stamp}")
        os.replace(path, moved_to)
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                os.replace(side, moved_to.with_name(moved_to.name + suffix))
    restored = False
    backup = backup_path_of(path)
    if backup.exists():
        try:
            check = sqlite3.connect(f"{backup.resolve().as_uri()}?mode=ro", uri=True)
            try:
                restored = check.execute("PRAGMA quick_check").fetchone()[0] == "ok"
            finally:
                check.close()
        except sqlite3.Error:
            restored = False
        if restored:
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                shutil.copyfile(backup, tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    store = RunStore(path)
    return {"moved_to": moved_to, "restored_backup": restored, "runs": len(store.list_runs())}


def _run_key(run: dict) -> str:
    return run["dedupe_key"] or dedupe_key(
        run["source"], run["kind"], run["sweep_id"], run["config"], run["created_at"]
    )


def _frame_column_names(runs: list[dict]) -> dict[tuple[str, str], str]:
    """(group, key) -> column name, following the scheme in `RunStore.runs_frame`."""
    taken = set(FRAME_BASE_COLUMNS)
    names: dict[tuple[str, str], str] = {}
    for group, prefix in _FRAME_GROUPS:
        for run in runs:
            for key in run[group]:
                if (group, key) in names:
                    continue
                name = key
                while name in taken:  # `while`: even "config.x" could already be a key
                    name = prefix + name
                taken.add(name)
                names[(group, key)] = name
    return names


def _frame_record(run: dict, names: dict[tuple[str, str], str]) -> dict:
    record = {column: run.get(column) for column in FRAME_BASE_COLUMNS}
    if run["started_at"] is not None and run["finished_at"] is not None:
        record["duration_s"] = run["finished_at"] - run["started_at"]
    for (group, key), name in names.items():
        value = run[group].get(key)
        record[name] = _dumps(value) if isinstance(value, (dict, list)) else value
    return record


def iso_timestamp(value: Any) -> str | None:
    """Epoch seconds -> "2026-11-26T12:36:16+00:00" (UTC, to the second); None when missing."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(seconds):
        return None
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc).isoformat(timespec="seconds")


def iso_timestamps(frame: "pandas.DataFrame") -> "pandas.DataFrame":
    """A copy of a runs frame with TIMESTAMP_COLUMNS as ISO 8601 strings with the time zone."""
    frame = frame.copy()
    for column in TIMESTAMP_COLUMNS:
        if column in frame:
            frame[column] = [iso_timestamp(value) for value in frame[column]]
    return frame
