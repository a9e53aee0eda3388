"""Every table in the docs' results (docs/results.md, docs/performance.md) comes from a stored script
output: a section the script wrote and kept (benchmarks/data/sections/), or data in benchmarks/data/
that the script's own formatting turns into the same lines. A figure typed or edited by hand in a table
fails here. Sections whose runs were never stored are listed in UNSTORED with the reason, so that gap is
visible, and a new table outside both lists fails until it is generated or listed.

Hand-written readings (READINGS) may cite only figures that a script printed: every number in them must
appear in one of the sources listed for it (script-written sections, a stored data file, or a benchmark
script's notes: its docstring, where a figure is pasted with its command).

Fast: no training and no counting, only the scripts' formatting functions over stored JSON."""

from __future__ import annotations

import ast
import json
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from benchmarks import common, performance, pull_elpv, results_elpv, row_selection_costs
from vptdash.runs.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "docs" / "results.md", ROOT / "docs" / "performance.md"]

# Tables whose runs are not in the repository: the stores lived in a data dir, not in benchmarks/data.
# Their scripts now keep each section they write (benchmarks/data/sections/), so the next regeneration
# makes them checked by test_every_stored_section_is_what_the_docs_show; then drop them from here.
UNSTORED = {
    ("results", "## Prompt condensation"): "condense_elpv.py's run store is not in the repository",
    (
        "results",
        "## Cost levers: bilinear prompts and layer skipping",
    ): "levers_elpv.py's store is not in the repository",
    (
        "performance",
        "## bf16 autocast vs fp32 on ELPV",
    ): "the 16-shot parity pairs were not kept (only the full-split ones are)",
}
# Written by hand from the figures of the sections named here (script-written sections, a stored data file,
# or a benchmark script whose notes carry a figure pasted with its command):
# test_readings_cite_only_stored_figures checks that every number they cite is printed in one of them.
# (The "### Reading" of the cost-levers section is not here: levers_elpv.reading() writes it from the
# same data as its tables.)
READINGS = {
    ("performance", "## Interpretation (by hand, from the figures above)"): [
        ("performance", "## `python -m vptdash bench --json --sweep`"),
        ("performance", "## bf16 autocast vs fp32 on ELPV"),
        ("performance", "## bf16 autocast vs fp32 on ELPV, full training split"),
        ("performance", "## bf16 vs fp32, full training split: the pairs summarised"),
        ("performance", "## Profile of one training step"),
        ("performance", "## Profile of one training step at batch 8"),
        ("performance", "## torch.compile: when it would pay"),
        ("performance", "## Where the meeting sweep's time goes"),
        ("performance", "## OpenMP wait policy, one training step side by side"),
        ("results", "## Costs after row selection"),  # GMACs per placement after row selection
        "benchmarks/performance.py",  # 1.15x: two 1-thread processes against one 2-thread, per pair
        "vptdash/engine/compiled.py",  # the compile rule's thresholds, in trained images
    ],
    ("results", "## Reading the core-engine results"): [("results", "## Core engine: ELPV at 112 px")],
}
# Script-written sections with no table, written before sections were kept in benchmarks/data/sections/.
UNSTORED_PROSE = {
    ("performance", "## Profile of one training step"): "performance.py's profile, run before sections were kept",
}
# Checked below against stored data (not as whole stored sections).
CHECKED = {
    ("results", "## Costs after row selection"),
    ("results", "## Core engine: ELPV at 112 px"),
    ("performance", "## `python -m vptdash bench --json --sweep`"),
    ("performance", "## bf16 autocast vs fp32 on ELPV, full training split"),
}


def sections(path: Path) -> dict[str, str]:
    """{"## heading": body} for every level-2 section of a markdown file (body without the heading)."""
    found, heading, lines = {}, None, []
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            if heading:
                found[heading] = "\n".join(lines).strip()
            heading, lines = line, []
        elif heading:
            lines.append(line)
    if heading:
        found[heading] = "\n".join(lines).strip()
    return found


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def doc_section(doc: str, heading: str) -> str:
    return sections(ROOT / "docs" / f"{doc}.md")[heading]


# ----------------------------------------------------------------------------- sections kept as written
def stored_sections():
    return sorted(common.SECTIONS.glob("*.md")) if common.SECTIONS.exists() else []


@pytest.mark.parametrize("stored", stored_sections(), ids=lambda p: p.stem)
def test_every_stored_section_is_what_the_docs_show(stored):
    text = stored.read_text()
    heading, body = text.split("\n", 1)
    doc = stored.stem.split("--", 1)[0]
    assert common.section_output(heading, ROOT / "docs" / f"{doc}.md") == stored
    assert doc_section(doc, heading) == body.strip(), f"{doc}.md '{heading}' differs from {stored.name}"


def test_write_section_keeps_what_it_wrote(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "SECTIONS", tmp_path / "sections")
    doc = tmp_path / "doc.md"
    common.write_section("## One", "| a | 1.5 |", doc)
    common.write_section("## Two", "text", doc)
    common.write_section("## One", "| a | 2.5 |", doc)  # replaced in place, copy updated
    assert sections(doc) == {"## One": "| a | 2.5 |", "## Two": "text"}
    assert common.section_output("## One", doc).read_text() == "## One\n\n| a | 2.5 |\n"


# ----------------------------------------------------------------------------- sections checked against data
def test_row_selection_costs_section_is_generated_from_its_stored_counts():
    stored = json.loads(row_selection_costs.OUTPUT.read_text())
    expected = row_selection_costs.section(stored["rows"], stored["backbone"], stored["resolution"], stored["date"])
    assert doc_section("results", row_selection_costs.HEADING) == expected.strip()


def test_pull_section_is_generated_from_its_stored_measurements():
    """Every figure of the prompt-pull section, its per-seed summary and its reading come from
    benchmarks/data/pull_elpv.json (the measurements of every run, kept by pull_elpv.py)."""
    stored = json.loads(pull_elpv.OUTPUT.read_text())
    expected = "\n".join(pull_elpv.section(**stored))
    assert doc_section("results", pull_elpv.HEADING) == expected.strip()


def test_bench_table_is_the_raw_json_printed_beside_it():
    """One column per machine, each the command's raw JSON, kept in benchmarks/data/bench_runs.json."""
    body = doc_section("performance", performance.BENCH_HEADING)
    runs = json.loads(performance.BENCH_RUNS.read_text())["runs"]
    assert body == performance.bench_runs_markdown(runs).strip()
    printed = [json.loads(raw) for raw in re.findall(r"```json\n(.*?)\n```", body, re.S)]
    assert printed == [run["result"] for run in runs]
    table = {line.split("|")[1].strip(" `"): line for line in body.splitlines() if line.startswith("| `")}
    for index, run in enumerate(runs):  # every cell is its run's value
        for key, value in run["result"].items():
            if key != "cpu":
                cell = table[key].split("|")[2 + index].strip()
                assert cell == (f"{value:.3f}" if isinstance(value, float) else str(value)), (key, index)


def test_full_split_parity_table_is_generated_from_the_stored_pairs():
    body = doc_section("performance", "## bf16 autocast vs fp32 on ELPV, full training split")
    assert performance.parity_markdown(performance.load_parity_runs()) in body


def test_core_engine_tables_match_the_stored_runs(tmp_path):
    """Accuracy, balanced accuracy, seeds, trainable parameters and train seconds come from the stored runs
    (benchmarks/data/results_elpv_runs.json); GMACs from the stored row-selection counts where they hold
    that configuration. Not stored: latency and the GMACs of 1 and 5 prompts (the checkpoint was saved
    before the costs were re-counted; results_elpv.py now saves it after)."""
    store = RunStore(tmp_path / "runs.sqlite")
    store.import_runs(json.loads(results_elpv.CHECKPOINT.read_text()), source="cli")
    counted = json.loads(row_selection_costs.OUTPUT.read_text())["rows"]
    gmacs = {row["label"]: f"{row['after']:.3f}" for row in counted}
    body = doc_section("results", results_elpv.HEADING)
    doc_rows = [line for line in table_lines(body) if not line.startswith(("| task", "|---"))]
    generated = []
    for shots in (lambda s: s == 64, lambda s: s is None):
        table = results_elpv.markdown(results_elpv.summarise(results_elpv.table(store, shots)))
        generated += [line for line in table_lines(table) if not line.startswith(("| task", "|---"))]
    assert len(doc_rows) == len(generated) == 22
    gmacs_checked = 0
    for doc_line, stored_line in zip(doc_rows, generated):
        doc_cells = [c.strip() for c in doc_line.strip("|").split("|")]
        stored_cells = [c.strip() for c in stored_line.strip("|").split("|")]
        # task, setting, seeds, accuracy, balanced | GMACs, latency b1, b32 | params, train s
        assert doc_cells[:5] + doc_cells[8:] == stored_cells[:5] + stored_cells[8:], doc_line
        if doc_cells[1] in gmacs:
            assert doc_cells[5] == gmacs[doc_cells[1]], doc_line
            gmacs_checked += 1
    assert gmacs_checked == 12  # (a): probe and 10 / 50 prompts of both placements, 2 tasks; (b): the probes


# ----------------------------------------------------------------------------- nothing left out
def test_every_results_table_is_checked_or_its_gap_named():
    stored = {(p.stem.split("--", 1)[0], p.read_text().split("\n", 1)[0]) for p in stored_sections()}
    with_tables = {
        (path.stem, heading) for path in DOCS for heading, body in sections(path).items() if table_lines(body)
    }
    unchecked = with_tables - stored - CHECKED - set(UNSTORED) - set(READINGS)
    assert not unchecked, f"tables with no stored script output: {sorted(unchecked)}"
    stale = (set(UNSTORED) | CHECKED | set(READINGS) | set(UNSTORED_PROSE)) - {
        (p.stem, h) for p in DOCS for h in sections(p)
    }
    assert not stale, f"listed sections no longer in the docs: {sorted(stale)}"
    assert not (set(UNSTORED) & stored), "a section now stored: remove it from UNSTORED"


def test_processes_section_reads_the_ratio_of_medians():
    runs = [
        {"round": 0, "processes": 1, "seconds": 200.0},
        {"round": 0, "processes": 2, "seconds": 100.0},
        {"round": 1, "processes": 1, "seconds": 220.0},
        {"round": 1, "processes": 2, "seconds": 200.0},
    ]
    text = performance.processes_markdown(runs)
    assert "| 1 process, all threads | 2 | 210 | 200 | 220 |" in text
    assert "| 2 processes, threads split | 2 | 150 | 100 | 200 |" in text
    assert "1.40x (ratio of medians; per alternating round 1.10x to 2.00x)" in text  # 210 / 150; 220/200, 200/100
    assert performance.processes_markdown([]).startswith("No timings yet")


# ----------------------------------------------------------------------------- hand-written readings
# A figure is a number with decimals, a number with a unit (%, x, s, ms, points, GFLOP, GMACs, images/s),
# or an integer above SMALL. Deliberately not checked, because they are not measurements:
# - small integers without a unit: counts of seeds, blocks, threads, epochs, block numbers such as 8-11;
# - dates and years, version numbers, scientific notation (hyperparameters such as lr 1e-2);
# - digits inside names: ViT-S/14, dinov2_s14, fp32, b32, avx512_bf16, commit hashes;
# - anything in `code` or a code block: commands, flags, field names (a figure must not hide there);
# - a threshold written after >= or <=: the targets, stated beside the measurement they judge.
SMALL = 12
UNIT = r"(?:%|x(?![\w])|\s?(?:s|ms|min|points?|GFLOP|GMACs?|images/s)\b)"
NUMBER = re.compile(
    r"(?<![\w/.])(?<![A-Za-z]-)(?P<threshold>(?<=[<>]= )|(?<=[≤≥] ))?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?P<unit>" + UNIT + r")?(?![\w.]*[A-Za-z_\d])"
)
NOT_FIGURES = [
    re.compile(r"```.*?```", re.S),  # code blocks
    re.compile(r"`[^`]*`"),  # code spans
    re.compile(r"\b\d{4}-\d{2}-\d{2}\b"),  # dates
    re.compile(r"\b\d+\.\d+\.\d+\S*"),  # version numbers
    re.compile(r"\b\d+(?:\.\d+)?e[-+]?\d+\b"),  # scientific notation
]
# A printed number sources a cited one when it rounds to it from at most this many more decimals (242.794
# sources 243, 3.389 sources 3.39): enough for the scripts' formats, too few for a full-precision float in
# a data file to round to whatever a text cites.
EXTRA_DECIMALS = 3


def cited_figures(text: str) -> list[tuple[str, str]]:
    """(number, context) for every figure a hand-written text cites, numbers as written less signs and
    thousands separators."""
    for pattern in NOT_FIGURES:
        text = pattern.sub(" ", text)
    found = []
    for match in NUMBER.finditer(text):
        if match.group("threshold") is not None:
            continue
        number = match.group("num").replace(",", "")
        if "." not in number and not match.group("unit"):
            if int(number) <= SMALL or re.fullmatch(r"(19|20)\d\d", number):
                continue
        found.append((number, text[max(0, match.start() - 40) : match.end() + 20].replace("\n", " ")))
    return found


# Stamps in a stored output that are not figures, so that their parts source none (14:31 would source 31).
STAMPS = re.compile(r"\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}:\d{2}(?::\d{2})?\b|\b\d+\.\d+\.\d+\S*")


def corpus_numbers(texts: list[str]) -> set[Decimal]:
    """Every number in the stored outputs, as written (liberally: inside names, code and tables too), less
    dates, clock times and version numbers."""
    return {
        Decimal(n.replace(",", ""))
        for text in texts
        for n in re.findall(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?", STAMPS.sub(" ", text))
    }


def is_printed(number: str, corpus: set[Decimal]) -> bool:
    """A cited number is printed when a stored number equals it or rounds to it (3.39 for 3.389, 243 for
    242.794); never the other way round (3.39 is not sourced by a printed 3.4)."""
    cited = Decimal(number)
    places = cited.as_tuple().exponent
    return any(
        value == cited
        or (places - EXTRA_DECIMALS <= value.as_tuple().exponent < places)
        and value.quantize(Decimal(1).scaleb(places), ROUND_HALF_UP) == cited
        for value in corpus
    )


def script_notes(script: str) -> str:
    """A benchmark script's docstring: where a figure is pasted together with the command that printed it."""
    return ast.get_docstring(ast.parse((ROOT / script).read_text())) or ""


def reading_sources(doc: str, heading: str) -> list[str]:
    """The texts a reading may cite figures from."""
    texts = []
    for source in READINGS[(doc, heading)]:
        if isinstance(source, tuple):
            texts.append(doc_section(*source))
        elif source.endswith(".py"):
            texts.append(script_notes(source))
        else:
            texts.append((ROOT / source).read_text())
    return texts


@pytest.mark.parametrize("reading", sorted(READINGS), ids=lambda r: r[1].lstrip("# "))
def test_readings_cite_only_stored_figures(reading):
    doc, heading = reading
    corpus = corpus_numbers(reading_sources(doc, heading))
    unsourced = [(n, context) for n, context in cited_figures(doc_section(doc, heading)) if not is_printed(n, corpus)]
    assert not unsourced, f"{doc}.md '{heading}' cites figures no script printed:\n" + "\n".join(
        f"  {n}: ...{context}..." for n, context in unsourced
    )


def test_every_section_is_script_written_or_a_checked_reading():
    stored = {(p.stem.split("--", 1)[0], p.read_text().split("\n", 1)[0]) for p in stored_sections()}
    known = stored | CHECKED | set(UNSTORED) | set(READINGS) | set(UNSTORED_PROSE)
    unknown = {(path.stem, heading) for path in DOCS for heading in sections(path)} - known
    assert not unknown, (
        f"sections neither written by a script nor listed as a hand-written reading: {sorted(unknown)} "
        "(let a script write it, or add it to READINGS so that its figures are checked)"
    )


def test_the_figure_check_catches_hand_typed_figures_and_ignores_names():
    text = (
        "About 4% per step (0.339 vs 0.353 s), deep 9.5% faster, 100 deep prompts 1.7-2.0x, 102 vs 260 s "
        "per run, 27-30 images/s. Not figures: 2026-11-24, torch 2.14.1, ViT-S/14, dinov2_s14, fp32, b32, "
        "commit d6ff38e, 3 seeds, 4 of 12 blocks, lr 1e-2, `--seeds 0-17`, `speedup_vs_naive` >= 0.6."
    )
    assert [n for n, _ in cited_figures(text)] == [
        "4",
        "0.339",
        "0.353",
        "9.5",
        "100",
        "1.7",
        "2.0",
        "102",
        "260",
        "27",
        "30",
    ]
    corpus = corpus_numbers(["| speedup | 3.389 |", "sweep 242.794 s", "1,706 images", "ratio 3.4 (2026-11-26 14:31)"])
    assert is_printed("3.39", corpus) and is_printed("243", corpus) and is_printed("1706", corpus)
    assert is_printed("3.389", corpus) and is_printed("3.4", corpus)
    assert not is_printed("31", corpus) and not is_printed("26", corpus) and not is_printed("2026", corpus)
    assert not is_printed("3.38", corpus) and not is_printed("3.41", corpus) and not is_printed("242", corpus)
    assert not is_printed("0.85", corpus_numbers(["0.8521341463414634"]))  # too many decimals to round from


# Measurements the README quotes, and where they are printed. (The suite's test count and time are not
# here: the README states them with the run they come from, and they change with every test added.)
README_SOURCES = [
    ("performance", "## The meeting demo, one press in a real browser"),  # 34 s / 138 s on the Home row
    "benchmarks/performance.py",  # 1.15x for two processes on full-split runs
]


def test_readme_measurements_are_printed():
    corpus = corpus_numbers([doc_section(*s) if isinstance(s, tuple) else script_notes(s) for s in README_SOURCES])
    quoted = [
        (n, context)
        for line in (ROOT / "README.md").read_text().splitlines()
        if "measured" in line
        for n, context in cited_figures(line)
        if re.search(rf"(?<![\d.]){re.escape(n)}\s?(?:s|x)\b", line)
    ]
    assert len(quoted) >= 3, quoted  # the meeting demo's two times and the two-process ratio, at least
    unsourced = [(n, context) for n, context in quoted if not is_printed(n, corpus)]
    assert not unsourced, f"README quotes measurements no script printed: {unsourced}"
