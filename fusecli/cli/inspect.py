"""`fusecli inspect`: what model files hold, and whether they are safe to load; no TensorFlow."""

from __future__ import annotations

import json
from typing import Any

import click

from fusecli.cli.common import (
    FusecliCommand,
    json_option,
    print_json,
    printable,
    say,
    verbose_option,
)
from fusecli.errors import ModelFileError

_COLUMNS = ("FILE", "FORMAT", "KERAS", "MODEL", "INPUTS", "OUTPUTS", "PARAMS", "LAYERS", "SIZE",
            "UNSAFE")  # fmt: skip


@click.command(
    "inspect",
    cls=FusecliCommand,
)
@click.argument("files", nargs=-1, required=True, type=click.Path())
@json_option
@verbose_option
@click.pass_context
def inspect_command(ctx: click.Context, files: tuple[str, ...], as_json: bool) -> None:
    """Describe model files and find code in them, without TensorFlow.

    Shows each file's format, the Keras version that wrote it, model name, inputs and outputs
    (shapes and dtypes as Keras gives them, computed from the config; `?` where the config does
    not tell, as after a custom layer), parameter count, layers, size, and anything that would
    run code when the file is loaded (Lambda bytecode, custom classes... at any depth). FILES
    are .keras or .h5 files, or folders (their .keras/.h5/.hdf5 files). Reads the files with
    zipfile, json and h5py only: TensorFlow is never imported, nothing in the files is executed.
    Prints a table (or, with --json, a list of objects, one per file) on stdout. A broken file
    gives an `Error: FILE: ...` line on stderr and exit status 1; the others are still shown.

    \b
    Examples:
      fusecli inspect examples/
      fusecli inspect fused.keras --json
    """
    from fusecli.inspection import inspect_paths

    reports, failed = [], False
    for _path, result in inspect_paths(list(files)):
        if isinstance(result, ModelFileError):
            say(f"Error: {result}")
            failed = True
        else:
            reports.append(result)
    reports = printable(reports)  # what the files say, never raw to the terminal: one place
    if as_json:
        print_json(reports)
    elif reports:
        click.echo(format_table(reports))
    if failed:
        ctx.exit(1)


def format_table(reports: list[dict]) -> str:
    """One row per file, then one line per unsafe finding."""
    rows = [_COLUMNS]
    for r in reports:
        version = r["keras_version"] or "?"
        rows.append((
            r["path"],
            ".keras" if r["format"] == "keras" else ".h5",
            version,
            r["name"] or "?",
            ", ".join(_tensor_text(t) for t in r["inputs"]) or "?",
            ", ".join(_tensor_text(t) for t in r["outputs"]) or "?",
            "?" if r["params"] is None else f"{r['params']:,}",
            str(sum(r["layers"].values())),
            _size_text(r["size"]),
            str(len(r["unsafe"])) if r["unsafe"] else "-",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]  # fmt: skip
    for r in reports:
        for f in r["unsafe"]:
            lines.append(f"unsafe: {r['path']}: {f['what']} '{f['path']}' {f['reason']}")
    for r in reports:
        if r.get("recipe") is not None:
            lines.extend(f"recipe: {r['path']}: {line}" for line in recipe_lines(r))
    return "\n".join(lines)


def recipe_lines(report: dict) -> list[str]:
    """How the file was made, from its recipe: the command and options, then one line per
    source. The recipe is file data: anything not shaped as fusecli writes it is shown raw."""
    recipe = report["recipe"]
    if not isinstance(recipe, dict):
        return [json.dumps(recipe)]
    options = recipe.get("options")
    options = options if isinstance(options, dict) else {}
    flat = {**options, **(options.get("parameters") or {})} if options else {}
    flat.pop("parameters", None)
    head = " ".join(
        [f"fusecli {_text(recipe.get('version'))} {_text(recipe.get('command'))}"]
        + [f"{k}={_text(v)}" for k, v in flat.items() if v is not None]
    )
    sources = recipe.get("sources")
    lines = [head]
    for source in sources if isinstance(sources, list) else []:
        source = source if isinstance(source, dict) else {}
        lines.append(f"source {_text(source.get('file'))} sha256 {_text(source.get('sha256'))}")
    return lines


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _tensor_text(tensor: dict) -> str:
    shape = tensor["shape"]
    dims = "?" if shape is None else "(" + ", ".join("None" if d is None else str(d)
                                                      for d in shape) + ")"  # fmt: skip
    return f"{tensor['name']} {dims} {tensor['dtype'] or '?'}"


def _size_text(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"
