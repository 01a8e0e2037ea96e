"""The docs cannot drift: the site builds with `mkdocs build --strict` (a broken link fails it), its
parameter reference lists every MLproject parameter and CLI option, the guides' own parameter tables
agree with MLproject, the README's links resolve, every table row has its header's cells, and the front
pages carry no tracker words."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from fer_mlflow.cli import cli

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]


def reference_module():
    """tools/docs_reference.py, the mkdocs hook that writes the reference page, imported by path."""
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "tools" / "docs_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sections(page: str) -> dict[str, str]:
    """The reference page cut at its `## `name`` headings: entry point -> its text."""
    parts = re.split(r"^## `([a-z_]+)`$", page, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def rows(section: str) -> list[list[str]]:
    """A section's table rows, each as its cells (the header and rule left out)."""
    lines = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in cells(line)] for line in lines]


def cells(line: str) -> list[str]:
    """A Markdown table row's cells, split at each pipe not escaped as ``\\|`` (GitHub splits at a bare
    pipe even inside backticks)."""
    return re.split(r"(?<!\\)\|", line.strip())[1:-1]


def test_the_reference_lists_every_mlproject_parameter_and_cli_option():
    page = sections(reference_module().render())
    assert set(page) == set(ENTRY_POINTS) | set(cli.commands)
    for name, entry in ENTRY_POINTS.items():
        table = rows(page[name])
        assert {row[0] for row in table} >= {f"`{param}`" for param in entry["parameters"]}, name
        options = [p for p in cli.commands[name].params if isinstance(p, click.Option) and not p.hidden]
        assert {row[1] for row in table} >= {f"`{option.opts[0]}`" for option in options}, name
        for row in table:
            assert row[4], f"{name} {row[0]}: no meaning; give its click option a help text"


def test_a_parameter_added_to_mlproject_alone_still_gets_its_row(tmp_path):
    """The page is written from the files, not from a list kept by hand: a new MLproject parameter
    appears at once, marked as missing from the CLI."""
    mlproject = yaml.safe_load((ROOT / "MLproject").read_text())
    mlproject["entry_points"]["train"]["parameters"]["new_knob"] = {"type": "float", "default": 0.5}
    (tmp_path / "MLproject").write_text(yaml.safe_dump(mlproject))
    table = rows(sections(reference_module().render(tmp_path))["train"])
    assert ["`new_knob`", "(not in the CLI)", "float", "`0.5`", ""] in table


def guide_tables() -> list[tuple[str, list[list[str]]]]:
    """Every hand-written parameter table of the guides ("| parameter | default | meaning |"), as
    (page, rows of cells)."""
    tables = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        lines = page.read_text().splitlines()
        for start, line in enumerate(lines):
            if line.startswith("| parameter | default |"):
                body = []
                for row in lines[start + 2:]:
                    if not row.startswith("|"):
                        break
                    body.append([cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]])
                tables.append((page.relative_to(ROOT).as_posix(), body))
    return tables


def same_default(written: str, default) -> bool:
    """A default as a guide writes it against MLproject's (`0.00001` is 1e-05, `true` is True)."""
    try:
        return float(written) == float(default)
    except ValueError:
        return written.lower() == str(default).lower()


def test_the_guides_parameter_tables_match_mlproject():
    """The guides explain some entry points' parameters at length, by hand: each such table lists
    exactly one entry point's parameters, with MLproject's defaults, so none goes missing or stale."""
    tables = guide_tables()
    assert len(tables) >= 4, "the clean, train, predict and sweep guides' tables were not found"
    for page, body in tables:
        names = [name for row in body for name in re.findall(r"`([a-z_]+)`", row[0])]
        entry = max(ENTRY_POINTS, key=lambda e: len(set(ENTRY_POINTS[e]["parameters"]) & set(names)))
        parameters = ENTRY_POINTS[entry]["parameters"]
        assert set(names) == set(parameters), f"{page}, the table of {entry}: missing " \
            f"{sorted(set(parameters) - set(names))}, not in MLproject {sorted(set(names) - set(parameters))}"
        for row in body:
            row_names = re.findall(r"`([a-z_]+)`", row[0])
            written = re.findall(r"`([^`]*)`", row[1]) or [part.strip() for part in row[1].split(",")]
            if len(written) != len(row_names):
                continue
            for name, value in zip(row_names, written):
                if parameters[name].get("default", "") != "":  # an empty default is described in words
                    assert same_default(value, parameters[name]["default"]), \
                        f"{page}: {name} defaults to {parameters[name]['default']!r} in MLproject, not {value!r}"


def test_the_readme_links_resolve():
    """GitHub shows the README: each relative link in it names a file of the project (the site's
    own links are checked by `mkdocs build --strict`)."""
    for target in re.findall(r"\]\(([^)#\s]+)", (ROOT / "README.md").read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to {target}, which is not there"


def test_every_table_row_has_its_headers_cells():
    """A renderer drops the cells a row has beyond its header's (a figure's date or command would
    vanish) and leaves missing ones blank: every row of every page's tables has the header's count."""
    pages = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        header = None
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if not line.startswith("|"):
                header = None
                continue
            count = len(cells(line))
            header = header or count
            assert count == header, f"{page.relative_to(ROOT)}:{number}: {count} cells under a header of {header}"


@pytest.mark.parametrize("name", ["README.md", "BENCHMARKS.md"])
def test_the_front_pages_speak_of_what_was_measured_not_of_the_tracker(name):
    """A newcomer reads these first: figures and headings say what was measured and when, never a
    tracker's words (an issue's number, a round of work, a run's letter)."""
    text = (ROOT / name).read_text()
    found = re.findall(r"\bissue\b|\bstop \d+|\bsession\b|\bruns? (?-i:[A-Z])\b", text, flags=re.I)
    assert not found, f"{name}: {found}"


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason='mkdocs is not installed: pip install -e ".[docs]"')
    pytest.importorskip("material", reason='mkdocs-material is not installed: pip install -e ".[docs]"')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "parameters" / "index.html").read_text()
    assert "distill_temperature" in reference and "--max-faces" in reference
    # BENCHMARKS.md's table of current figures is included in the site, not copied into it.
    assert "benchmarks/bench_serving.py" in (tmp_path / "site" / "benchmarks" / "index.html").read_text()
