"""The `fusecli` command line: a thin layer over the Python API, one module per command.

A command's module is imported when that command runs (or `--help` lists it): `fusecli fuse`
does not pay for the imports of `tune`.
"""

from __future__ import annotations

import importlib

import click

from fusecli import __version__

# name -> the module that defines it, as `<name>_command`
_COMMANDS = {
    "fuse": "fusecli.cli.fuse",
    "merge": "fusecli.cli.merge",
    "predict": "fusecli.cli.predict",
    "combine": "fusecli.cli.combine",
    "tune": "fusecli.cli.tune",
    "inspect": "fusecli.cli.inspect",
    "export": "fusecli.cli.export",
}


class _Commands(click.Group):
    """A group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _COMMANDS:
            return None
        module = importlib.import_module(_COMMANDS[cmd_name])
        return getattr(module, f"{cmd_name}_command")


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fusecli")
def cli() -> None:
    """Fuse saved Keras models into one: as a new model whose output is the weighted sum of
    theirs (fuse), by merging their weights (merge), or at the level of saved scores (predict,
    combine, tune).

    \b
    Example:
      fusecli fuse rgb.h5 pose.h5 --w 0.8 0.2 -o fused.keras
    """


def main() -> None:
    cli(prog_name="fusecli")
