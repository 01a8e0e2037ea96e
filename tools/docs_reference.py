"""The parameter reference of the docs site, written from the code so that it cannot drift.

mkdocs runs this file as a hook (`hooks:` in mkdocs.yml): on every build, `on_files` adds the page
`reference/parameters.md`, rendered from MLproject and the click commands of `fer_mlflow.cli`, so a
parameter added to either is in the next build. Nothing is committed, hence nothing to forget to
regenerate. `python tools/docs_reference.py` prints the page.

Each entry point gets one table: a row per MLproject parameter and CLI option, matched by name; a
name found on one side only still gets its row (and tests/test_mlproject.py fails on it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGE = "reference/parameters.md"
WORDS = {"boolean": "true / false", "float": "number", "widths": "channel counts, e.g. 16,32,128,256"}


def describe_type(param_type: click.ParamType) -> str:
    """A click type in words: the choices of a Choice, the bounds of a range, else its name."""
    inner = getattr(param_type, "inner", None)  # the CLI's Auto wraps a type to also take 'auto'
    if inner is not None:
        return f"{describe_type(inner)} or `auto`"
    if isinstance(param_type, click.Choice):
        return " / ".join(f"`{choice}`" for choice in param_type.choices)
    if isinstance(param_type, (click.IntRange, click.FloatRange)):
        low = "" if param_type.min is None else f"{param_type.min} {'<' if param_type.min_open else '<='} "
        high = "" if param_type.max is None else f" {'<' if param_type.max_open else '<='} {param_type.max}"
        kind = "integer" if isinstance(param_type, click.IntRange) else "number"
        return f"{kind}, {low}x{high}"
    return WORDS.get(param_type.name, param_type.name)


def cell(text) -> str:
    """A value fit for one cell of a Markdown table."""
    return " ".join(str(text).split()).replace("|", "\\|")


def shown(default) -> str:
    """A default as a user types it; MLflow's empty string is 'none given'."""
    if default is None or default == "":
        return "(none)"
    return f"`{str(default).lower() if isinstance(default, bool) else default}`"


def entry_point_rows(name: str, entry: dict | None, command: click.Command | None) -> list[str]:
    """The table rows of one entry point: every MLproject parameter and every visible CLI option."""
    options = {} if command is None else {
        p.name: p for p in command.params if isinstance(p, click.Option) and not p.hidden}
    parameters = {} if entry is None else entry.get("parameters", {})
    rows = []
    for param in list(options) + [p for p in parameters if p not in options]:
        option, spec = options.get(param), parameters.get(param)
        flag = f"`{option.opts[0]}`" if option else "(not in the CLI)"
        mlproject = f"`{param}`" if spec is not None else "(not in MLproject)"
        default = shown(spec.get("default")) if spec is not None else shown(option.default)
        kind = describe_type(option.type) if option else spec.get("type", "string")
        meaning = option.help if option and option.help else ""
        rows.append(f"| {mlproject} | {flag} | {cell(kind)} | {cell(default)} | {cell(meaning)} |")
    return rows


def render(root: Path = ROOT) -> str:
    """The whole reference page as Markdown, from `root`'s MLproject and `fer_mlflow.cli`."""
    # The CLI of this checkout, not of another copy that may be installed (an editable install elsewhere).
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from fer_mlflow.cli import cli

    entry_points = yaml.safe_load((root / "MLproject").read_text())["entry_points"]
    lines = [
        "# Parameter reference",
        "",
        "Generated from MLproject and the command line (`fer_mlflow/cli.py`) each time the site is",
        "built, so every parameter is here. Run an entry point with MLflow's runner or without it:",
        "",
        "```bash",
        "mlflow run . -e <entry point> --env-manager local -P name=value ...",
        "fer-mlflow <entry point> --name value ...",
        "```",
        "",
        "The guides say what each stage logs and why its defaults are what they are.",
    ]
    for name in list(entry_points) + [c for c in cli.commands if c not in entry_points]:
        command = cli.commands.get(name)
        summary = (command.help or "").strip().splitlines()[0] if command else "(no CLI command)"
        lines += ["", f"## `{name}`", "", summary, ""]
        if name not in entry_points:
            lines += ["(not an MLproject entry point: run it as `fer-mlflow " + name + "`)", ""]
        lines += ["| `-P` (MLproject) | CLI option | type | default | meaning |", "|---|---|---|---|---|"]
        lines += entry_point_rows(name, entry_points.get(name), command)
    return "\n".join(lines) + "\n"


def on_files(files, config):
    """mkdocs hook: add the generated reference page to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


if __name__ == "__main__":
    print(render(), end="")
