"""The structure rules that a linter cannot see: no module reaches into another vptdash module's private
names, and job kinds are plug-ins (jobs executes a kind it was never told about by name).

The layer and cycle contracts are import-linter's (pyproject.toml), run by scripts/test.sh."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from vptdash.engine.train import RunConfig
from vptdash.runs import jobs
from vptdash.runs.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
CHECKED = [
    *sorted((ROOT / "vptdash").rglob("*.py")),
    *sorted((ROOT / "app_pages").glob("*.py")),
    ROOT / "app.py",
    *sorted((ROOT / "benchmarks").glob("*.py")),
]


def vptdash_modules() -> set[str]:
    names = set()
    for path in (ROOT / "vptdash").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def private_uses(source: str, modules: set[str]) -> list[str]:
    """`from vptdash.x import _name` and `x._name` where `x` was imported as a vptdash module."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vptdash"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in modules:
                    aliases[alias.asname or alias.name] = full
                elif alias.name.startswith("_"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_the_private_name_check_sees_both_forms():
    modules = {"vptdash.engine.train", "vptdash.engine"}
    source = "from vptdash.engine import train\nfrom vptdash.engine.train import _Inputs\ntrain._predict(1)\n"
    assert private_uses(source, modules) == [
        "line 2: from vptdash.engine.train import _Inputs",
        "line 3: train._predict",
    ]
    assert private_uses("from vptdash.engine import train\ntrain.predict(1)\n", modules) == []


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_uses_another_modules_private_names(path):
    assert private_uses(path.read_text(encoding="utf-8"), vptdash_modules()) == []


def test_every_builtin_job_kind_is_registered_by_the_methods_package():
    import vptdash.methods  # noqa: F401 - importing it registers the kinds

    assert set(jobs.registered_kinds()) >= {"train", "probe", "condense", "skip-search", "continual"}


def test_a_kind_registered_from_outside_runs_through_execute_run(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    seen = []

    def execute_echo(store, run_id, *, echo=None):
        row = jobs.claim_job(store, run_id)
        seen.append(row["kind"])
        jobs.ProgressWriter(store, run_id, echo)({"phase": "setup", "message": "echoing"})
        store.finish_run(run_id, "done", metrics={"answer": 42})
        return store.get_run(run_id)

    jobs.register_kind("echo-test", execute_echo)
    try:
        run_id = store.create_run(RunConfig().to_dict(), status="queued", kind="echo-test")
        row = jobs.execute_run(store, run_id)
    finally:
        jobs.unregister_kind("echo-test")
    assert "echo-test" not in jobs.registered_kinds()
    assert seen == ["echo-test"]
    assert row["status"] == "done" and row["metrics"]["answer"] == 42
    assert store.latest_progress(run_id)["message"] == "echoing"


def test_a_job_of_an_unknown_kind_fails_with_one_line_and_the_worker_goes_on(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    run_id = store.create_run(RunConfig().to_dict(), status="queued", kind="no-such-kind")
    row = jobs.execute_run(store, run_id)
    assert row["status"] == "failed"
    assert row["error"].startswith("no executor for job kind 'no-such-kind' (known: train, probe")
    assert "\n" not in row["error"]  # one line: a user-facing error, no traceback


def test_two_plugins_cannot_take_the_same_kind():
    def first(store, run_id, *, echo=None):
        return {}

    def second(store, run_id, *, echo=None):
        return {}

    jobs.register_kind("twice", first)
    try:
        jobs.register_kind("twice", first)  # the same function again (a re-import) is fine
        with pytest.raises(ValueError, match="already registered"):
            jobs.register_kind("twice", second)
    finally:
        jobs.unregister_kind("twice")
    with pytest.raises(ValueError, match="built in"):
        jobs.register_kind("train", first)
