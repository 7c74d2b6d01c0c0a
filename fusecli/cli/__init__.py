"""The `fusecli` command line: a thin layer over the Python API, one module per command."""

from __future__ import annotations

import click

from fusecli import __version__
from fusecli.cli.combine import combine_command
from fusecli.cli.export import export_command
from fusecli.cli.fuse import fuse_command
from fusecli.cli.inspect import inspect_command
from fusecli.cli.merge import merge_command
from fusecli.cli.predict import predict_command
from fusecli.cli.tune import tune_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fusecli")
def cli() -> None:
    """Fuse saved Keras models into one: as a new model whose output is the weighted sum of
    theirs (fuse), by merging their weights (merge), or at the level of saved scores (predict,
    combine, tune).

    \b
    Example:
      fusecli fuse rgb.h5 pose.h5 --w 0.8 0.2 -o fused.keras
    """


cli.add_command(fuse_command)
cli.add_command(merge_command)
cli.add_command(predict_command)
cli.add_command(combine_command)
cli.add_command(tune_command)
cli.add_command(inspect_command)
cli.add_command(export_command)


def main() -> None:
    cli(prog_name="fusecli")
