"""Mutation testing of the decision layer: would the focused tests notice a small bug?

mutmut (pinned in requirements-dev.txt) changes one thing at a time in the functions that turn stored
runs into a verdict (run filters, aggregation over seeds, the Pareto front, the recommendation, the
statistics) and runs the tests that reach the changed function; a mutant is killed when one fails.

    python benchmarks/mutation.py --json          # one JSON line: mutants, killed, score, ...
    python benchmarks/mutation.py --write-docs    # also rewrites the section of docs/testing.md
    python benchmarks/mutation.py --from benchmarks/data/mutation.json --write-docs   # re-read the last run
    python benchmarks/mutation.py --known-bugs    # the bugs a review found, put back one at a time
                                                  # (with --write-docs: its section of docs/testing.md)

It works on a copy of the working tree in a temporary folder (mutmut writes its mutants/ folder next
to the code), so the checkout is never touched. Mutants listed in EQUIVALENT change no behaviour (the
reason is given); they are left out of the score and listed in the docs. Everything else that
survives is a test gap. On 2 cores the run takes about a quarter of an hour.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "testing.md"
STORED = ROOT / "benchmarks" / "data" / "mutation.json"  # the last run, re-read by --from
BEGIN, END = "<!-- mutation:begin (benchmarks/mutation.py --write-docs) -->", "<!-- mutation:end -->"

# The decision modules and, in budget.py, the functions that decide (not the wording, the sweep cost
# estimate or the table of single runs).
MODULES = ("vptdash/views/stats.py", "vptdash/views/budget.py")
BUDGET_FUNCTIONS = (
    "comparable_runs",
    "matching_probe",
    "_std",
    "_mean",
    "_sources",
    "_seed_run",
    "aggregate_over_seeds",
    "default_metric",
    "collapsed_lines",
    "pareto_front",
    "_run_metric",
    "_seed_runs",
    "_compare_rows",
    "_probe_index",
    "recommend",
)
PATTERNS = ["vptdash.views.stats.*"] + [f"vptdash.views.budget.x_{name}__mutmut_*" for name in BUDGET_FUNCTIONS]
TESTS = ("tests/test_stats.py", "tests/test_budget.py")

# mutant name -> why it cannot change what the function returns or raises. Numbers are mutmut's for
# the code as it is; a change to one of these functions renumbers its mutants, so re-check them then.
_S, _B = "vptdash.views.stats.x_", "vptdash.views.budget.x_"
_SLICE = "every chunk computes the same resamples from the same drawn indices, so overlapping or repeated slices write identical values and every slot is still written"
_INTEGERS = "Generator.integers(high) is integers(0, high): the same draws from the same stream"
_NAN = 'float("NAN") is NaN as float("nan") is (the parse ignores case)'
_KIND = "pandas ignores `kind` when sorting on several columns"
_RECORDS = "every record's keys are AGG_COLUMNS in that order, and there is at least one record here"
_NO_COLUMN = "pd.Series(None or nothing, index=...) is all NaN float, as pd.Series(np.nan, index=...) is"
_NO_SEEDS = "without an n_seeds column every row gets the same seed count, so it never breaks a tie"
_UNKNOWN_LAST = (
    "an unknown cost already sorts last by the key's first element; the second only orders rows whose costs are "
    "all unknown, and there any constant (or NaN, which never compares less) keeps the first, as 0.0 does"
)
EQUIVALENT: dict[str, str] = {
    # stats._score: every use is a difference of two scores over the same drawn images and labels
    f"{_S}_score__mutmut_3": "mean over images then seeds, or seeds then images: equal-sized groups, the same mean",
    f"{_S}_score__mutmut_4": "axis -2 is the seed axis: mean over seeds then images is the same mean (equal sizes)",
    f"{_S}_score__mutmut_7": "starting the recall sum at 1 adds the same 1/present to both sides of every difference",
    f"{_S}_score__mutmut_37": "a recall of 1 for an absent class adds the same amount to both sides of every difference",
    f"{_S}bootstrap_difference__mutmut_24": "one more class index with no images: no recall added, not counted present",
    f"{_S}bootstrap_difference__mutmut_26": "n_classes is read only when there are labels",
    f"{_S}bootstrap_difference__mutmut_48": _INTEGERS,
    f"{_S}bootstrap_difference__mutmut_56": _INTEGERS,
    f"{_S}bootstrap_difference__mutmut_68": _INTEGERS,
    f"{_S}bootstrap_difference__mutmut_85": _SLICE,
    f"{_S}bootstrap_difference__mutmut_86": _SLICE,
    f"{_S}bootstrap_difference__mutmut_87": _SLICE,
    f"{_S}bootstrap_difference__mutmut_90": _SLICE,
    f"{_S}bootstrap_difference__mutmut_113": "the per-resample scores are 2-D (resamples, seeds): axis +1 is axis -1",
    f"{_S}bootstrap_difference__mutmut_116": "the per-resample scores are 2-D (resamples, seeds): axis +1 is axis -1",
    f"{_S}compare_runs__mutmut_62": "labels are used only when every candidate equals the first, so the second is the same",
    f"{_S}compare_runs__mutmut_73": "None is as false as False in the `if per_image` that follows",
    f"{_S}correct_vector__mutmut_15": 'codec names ignore case: "ASCII" is "ascii"',
    f"{_S}labels_vector__mutmut_8": "numpy 2 makes Python ints int64 on every 64-bit platform: the dtype asked for",
    f"{_S}labels_vector__mutmut_10": "numpy 2 makes Python ints int64 on every 64-bit platform: the dtype asked for",
    f"{_S}_score__mutmut_29": "a class with no images has 0 hits: 0 / max(0, 1) is the 0.0 it would get",
    f"{_S}compare_runs__mutmut_110": "paired_seeds=None is as false as False",
    # budget
    f"{_B}_mean__mutmut_7": _NAN,
    f"{_B}_std__mutmut_6": _NAN,
    f"{_B}aggregate_over_seeds__mutmut_10": "a collapsed column of None is filled with False before use",
    f"{_B}aggregate_over_seeds__mutmut_14": "test_correct is read with Series.get, which gives None for a missing column",
    f"{_B}aggregate_over_seeds__mutmut_15": "test_correct is read with Series.get, which gives None for a missing column",
    f"{_B}aggregate_over_seeds__mutmut_16": "test_labels is read with Series.get, which gives None for a missing column",
    f"{_B}aggregate_over_seeds__mutmut_17": "test_labels is read with Series.get, which gives None for a missing column",
    f"{_B}aggregate_over_seeds__mutmut_32": _NAN,
    f"{_B}aggregate_over_seeds__mutmut_35": "groupby(sort=None) does not sort, as sort=False",
    f"{_B}aggregate_over_seeds__mutmut_45": 'na_position="last" is the default',
    f"{_B}aggregate_over_seeds__mutmut_289": _KIND,
    f"{_B}aggregate_over_seeds__mutmut_291": 'na_position="last" is the default',
    f"{_B}aggregate_over_seeds__mutmut_292": _KIND,
    f"{_B}aggregate_over_seeds__mutmut_306": _KIND,
    f"{_B}aggregate_over_seeds__mutmut_307": _KIND,
    f"{_B}pareto_front__mutmut_15": "iloc[1:0] is as empty as iloc[0:0], with the same columns",
    f"{_B}pareto_front__mutmut_35": "a single valid row is its own front: returned as the loop would keep it",
    f"{_B}aggregate_over_seeds__mutmut_279": _RECORDS,
    f"{_B}aggregate_over_seeds__mutmut_281": _RECORDS,
    # recommend
    f"{_B}recommend__mutmut_128": "the best is never in `gaps`, so gaps.get(best) is the None it would get",
    f"{_B}recommend__mutmut_137": "every return path sets the sentence before returning",
    f"{_B}recommend__mutmut_147": "every return path sets the sentence before returning",
    f"{_B}recommend__mutmut_33": _NO_COLUMN,
    f"{_B}recommend__mutmut_35": _NO_COLUMN,
    f"{_B}recommend__mutmut_57": _NO_SEEDS,
    f"{_B}recommend__mutmut_59": _NO_SEEDS,
    f"{_B}recommend__mutmut_61": _NO_SEEDS,
    f"{_B}recommend__mutmut_72": "an unknown cost already sorts last by the key's first element; among rows whose costs "
    "are all unknown 1.0 is as constant as 0.0, so the seed count decides as before",
    f"{_B}recommend__mutmut_339": _UNKNOWN_LAST,
    f"{_B}recommend__mutmut_341": _UNKNOWN_LAST,
}

# mutant name -> why a survivor that does change behaviour has no test yet. They stay in the score.
SURVIVOR_NOTES: dict[str, str] = {
    f"{_B}aggregate_over_seeds__mutmut_54": "pandas 3's fillna(None) leaves NaN, which counts as collapsed; only a float "
    "`collapsed` column with NaN shows it, and on such a column today's fillna(False) warns that pandas 4 will raise: "
    "casting the column before filling (in aggregate_over_seeds) fixes both, then a test can follow",
    f"{_B}recommend__mutmut_95": "differs only for a mean equal, to the last bit, to best - tolerance - 1e-12 (the "
    "rounding slack): a test would pin the slack, not the rule",
    f"{_B}recommend__mutmut_107": "differs only for a lower bound equal, to the last bit, to -tolerance - 1e-12 (the "
    "rounding slack): a test would pin the slack, not the rule",
    f"{_S}bootstrap_difference__mutmut_83": "leaves one resample in 251 unwritten (np.empty): one stray value cannot move "
    "a 2.5% or 97.5% percentile except by the chance of what memory held, so no deterministic test sees it; filling "
    "with NaN instead of np.empty would make it fail loudly",
}


def working_tree_files() -> list[str]:
    """Tracked files and untracked ones git does not ignore: what the tests would see here."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    return [name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


def prepare(copy: Path) -> None:
    for name in working_tree_files():
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    config = "\n".join(
        [
            "",
            "[tool.mutmut]",
            'source_paths = ["vptdash"]',
            f"only_mutate = {json.dumps(list(MODULES))}",
            f"pytest_add_cli_args_test_selection = {json.dumps(list(TESTS))}",
            'pytest_add_cli_args = ["-q"]',
            'also_copy = ["pytest.ini"]',  # its pythonpath = . must point at the mutated copy
            "",
        ]
    )
    with open(copy / "pyproject.toml", "a", encoding="utf-8") as handle:
        handle.write(config)
    # mutants/ must exist when Python starts: a PYTHONPATH entry missing at start is skipped for good,
    # and the editable install of the checkout would be tested instead of the mutants
    (copy / "mutants").mkdir()


def mutmut(copy: Path, *args: str, home: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(copy / "mutants"), VPTDASH_HOME=home)
    executable = Path(sys.executable).with_name("mutmut")
    return subprocess.run([str(executable), *args], cwd=copy, env=env, capture_output=True, text=True)


def in_scope(name: str) -> bool:
    return any(re.fullmatch(re.escape(p).replace(r"\*", ".*"), name) for p in PATTERNS)


def results(copy: Path) -> dict[str, str]:
    from mutmut.stats import status_by_exit_code  # noqa: PLC0415 - a dev-only tool, needed here only

    statuses = {}
    for meta in (copy / "mutants").rglob("*.meta"):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if in_scope(name):
                statuses[name] = status_by_exit_code[code]
    return statuses


def mutant_diffs(copy: Path, names: list[str]) -> dict[str, str]:
    """Each mutant's diff against the original function, from the mutated modules mutmut wrote
    (`mutmut show` per mutant takes seconds each)."""
    functions: dict[str, str] = {}
    for module in MODULES:
        path = copy / "mutants" / module
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        prefix = module[: -len(".py")].replace("/", ".")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name:
                functions[f"{prefix}.{node.name}"] = "\n".join(lines[node.lineno - 1 : node.end_lineno])
    diffs = {}
    for name in names:
        original = functions.get(re.sub(r"__mutmut_\d+$", "__mutmut_orig", name), "")
        mutated = functions.get(name, "")
        strip = lambda text: [re.sub(r"__mutmut_(\d+|orig)\b", "", line) for line in text.splitlines()]  # noqa: E731
        diffs[name] = "\n".join(difflib.unified_diff(strip(original), strip(mutated), lineterm="", n=0))
    return diffs


def machine() -> str:
    """The CPU and core count, for the timing's context (timings mean little without the machine)."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def run(max_children: int) -> dict:
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="vptdash-mutation-") as tmp:
        copy, home = Path(tmp) / "tree", Path(tmp) / "home"
        copy.mkdir()
        home.mkdir()
        prepare(copy)
        done = mutmut(copy, "run", "--max-children", str(max_children), *PATTERNS, home=str(home))
        statuses = results(copy)
        if not statuses or all(s == "not checked" for s in statuses.values()):
            raise SystemExit(f"mutmut produced no results:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        survivors = sorted(n for n, s in statuses.items() if s not in ("killed", "timeout") and n not in EQUIVALENT)
        diffs = mutant_diffs(copy, survivors)
    equivalent = sorted(n for n in statuses if n in EQUIVALENT)
    counted = [n for n in statuses if n not in EQUIVALENT]
    killed = sum(1 for n in counted if statuses[n] in ("killed", "timeout"))
    return {
        "mutants": len(counted),
        "killed": killed,
        "score": round(killed / len(counted), 4) if counted else 0.0,
        "survived": survivors,
        "equivalent": equivalent,
        "not_run": sorted(n for n in counted if statuses[n] not in ("killed", "timeout", "survived")),
        "statuses": {n: statuses[n] for n in survivors},
        "seconds": round(time.monotonic() - started),
        "machine": machine(),
        "load": [round(load_before, 1), round(os.getloadavg()[0], 1)],  # 1-minute load average, start and end
        "diffs": diffs,
    }


# Bugs once put into the product by hand that no test noticed: (file, the right code, the bug).
KNOWN_BUGS = {
    "recommend: a run without a known cost can be chosen": (
        "vptdash/views/budget.py",
        "if metrics[i] < threshold or costs[i] != costs[i]:",
        "if metrics[i] < threshold:",
    ),
    'recommend: no "equally cheap: the best itself"': (
        "vptdash/views/budget.py",
        "            chosen_index = best_index  # equally cheap: the best itself",
        "            pass",
    ),
    "recommend: the dearest of the runs tied for best": (
        "vptdash/views/budget.py",
        "            costs[i] if costs[i] == costs[i] else 0.0,\n            -(seeds",
        "            -costs[i] if costs[i] == costs[i] else 0.0,\n            -(seeds",
    ),
    "comparable_runs: no data-set filter": (
        "vptdash/views/budget.py",
        'if r["config"].get("dataset") == setup.get("dataset") and r["config"].get("cell_type") == setup.get("cell_type")',
        "if True",
    ),
    "comparable_runs: no backbone / resolution / shots filter": (
        "vptdash/views/budget.py",
        'kept = [r for r in on_data if all(r["config"].get(k) == setup.get(k) for k in SETUP_MATCH_KEYS)]',
        "kept = list(on_data)",
    ),
    "Budget explorer: does not filter the runs it compares": (
        "app_pages/budget.py",
        "    groups, left_out = budget.runs_by_size(finished, setup, same_setup=match)",
        '    groups, left_out = {budget.size_key(setup["shots"]): finished}, 0',
    ),
    "runs_by_size: runs of every data size pooled": (
        "vptdash/views/budget.py",
        'groups = {size_key(shots): [r for r in kept if shots_of(r["config"]) == shots] for shots in order}',
        "groups = {size_key(shots): list(kept) for shots in order}",
    ),
    "split_known_cost: a configuration without its cost stays in the answer": (
        "vptdash/views/budget.py",
        "known, unknown = frame[values.notna()], frame[values.isna()]",
        "known, unknown = frame, frame[values.isna()]",
    ),
}
KNOWN_BUG_TESTS = (
    "tests/test_budget.py",
    "tests/test_report.py",
    "tests/test_budget_page.py",
    "tests/test_budget_conventions.py",
)


def known_bugs() -> dict[str, str]:
    """Each known bug put back into a copy of the tree: the first test that fails, or "MISSED"."""
    caught = {}
    with tempfile.TemporaryDirectory(prefix="vptdash-bugs-") as tmp:
        copy, home = Path(tmp) / "tree", Path(tmp) / "home"
        for name in working_tree_files():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
        home.mkdir()
        for bug, (path, right, wrong) in KNOWN_BUGS.items():
            text = (copy / path).read_text(encoding="utf-8")
            if text.count(right) != 1:
                caught[bug] = "the code changed: update KNOWN_BUGS"
                continue
            (copy / path).write_text(text.replace(right, wrong), encoding="utf-8")
            done = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", *KNOWN_BUG_TESTS],
                cwd=copy,
                env=dict(os.environ, VPTDASH_HOME=str(home)),
                capture_output=True,
                text=True,
            )
            (copy / path).write_text(text, encoding="utf-8")
            failed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("FAILED ")]
            caught[bug] = failed[0] if done.returncode and failed else "MISSED"
    return caught


def rescore(result: dict) -> dict:
    """A stored result with today's EQUIVALENT applied: equivalent survivors leave the count."""
    survivors = result["survived"] + result["equivalent"]
    equivalent = sorted(n for n in survivors if n in EQUIVALENT)
    mutants = result["mutants"] + len(result["equivalent"]) - len(equivalent)
    return {
        **result,
        "mutants": mutants,
        "score": round(result["killed"] / mutants, 4) if mutants else 0.0,
        "survived": sorted(n for n in survivors if n not in EQUIVALENT),
        "equivalent": equivalent,
    }


def changed_lines(diff: str) -> str:
    lines = [line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return "\n".join(lines)


def doc_section(result: dict) -> str:
    parts = [
        BEGIN,
        f"`python benchmarks/mutation.py --write-docs`: {result['mutants']} mutants of the decision functions "
        f"(not counting {len(result['equivalent'])} equivalent ones), {result['killed']} killed by "
        f"{', '.join(f'`{t}`' for t in TESTS)}: score **{result['score']:.3f}**.",
        "",
    ]
    if result.get("machine"):
        parts.append(
            f"The run took {result['seconds']} s on {result['machine']} (load average "
            f"{result['load'][0]} at the start, {result['load'][1]} at the end)."
        )
        parts.append("")
    if result["survived"]:
        parts.append("Surviving mutants (each a test gap; where one is known, why it has no test yet):")
        parts.append("")
        for name in result["survived"]:
            note = f": {SURVIVOR_NOTES[name]}" if name in SURVIVOR_NOTES else ""
            parts.append(f"- `{name}` ({result['statuses'][name]}){note}")
            parts.append("")
            parts.append("  ```diff")
            parts.extend(f"  {line}" for line in changed_lines(result["diffs"].get(name, "")).splitlines())
            parts.append("  ```")
    else:
        parts.append("No mutant survived outside the equivalent ones.")
    if result["equivalent"]:
        parts.append("")
        parts.append("Equivalent mutants (left out of the score):")
        parts.append("")
        parts.extend(f"- `{name}`: {EQUIVALENT[name]}" for name in result["equivalent"])
    parts.append(END)
    return "\n".join(parts)


def write_docs(section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the text between `begin` and `end` in docs/testing.md (markers kept), or append it."""
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    if not section.startswith(begin):
        section = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line: mutants, killed, score, ...")
    parser.add_argument("--write-docs", action="store_true", help=f"rewrite the mutation section of {DOC.name}")
    parser.add_argument("--known-bugs", action="store_true", help="put back the known bugs; print what caught each")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--from", dest="stored", type=Path, help=f"re-read a stored run ({STORED.relative_to(ROOT)}) instead of running"
    )
    args = parser.parse_args(argv)
    if args.known_bugs:
        caught = known_bugs()
        lines = "\n".join(
            f"- {bug}: {'**missed**' if test == 'MISSED' else f'caught by `{test}`'}" for bug, test in caught.items()
        )
        print(lines)
        if args.write_docs:
            write_docs(lines, "<!-- known-bugs:begin -->", "<!-- known-bugs:end -->")
        return 1 if "MISSED" in caught.values() else 0
    if args.stored:
        result = rescore(json.loads(args.stored.read_text(encoding="utf-8")))
    else:
        result = run(args.max_children)
        STORED.parent.mkdir(parents=True, exist_ok=True)
        STORED.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.write_docs:
        write_docs(doc_section(result))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k not in ("diffs", "statuses")}))
    else:
        print(doc_section(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
