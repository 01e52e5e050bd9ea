"""The ``torchupdates`` command line (also ``python -m torchupdates``) and the demo behind it.

A layer on top of the library: ``import torchupdates`` never imports this package, and the
library never depends on it. Each command is a :class:`~torchupdates.cli._command.Command`
defined in its own module; adding one means adding it to :data:`COMMANDS`.

- ``compare`` (:mod:`.compare`): train the same MLP with every rule, with ``_datasets``
  (digits, MNIST-style files), ``_training`` (model, loop), ``_report`` (table, JSON, plot)
  and ``_rulespec`` (``nesterov(rmsprop):0.01``-style rule specifications).
- ``bench`` (:mod:`.bench`): time one step of every rule beside torch.optim, with
  ``_bench_cases`` (what is timed), ``_bench_probes`` (memory ceiling, scaling, compile
  times) and ``_bench_report`` (tables and JSON).
- ``_command``: what a command is, and option types shared by the commands.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ._command import Command, CommandError, MissingDependencyError
from .bench import COMMAND as BENCH
from .compare import COMMAND as COMPARE

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: tuple[Command, ...] = (COMPARE, BENCH)
"""The subcommands, in the order ``--help`` lists them."""

PROG = "torchupdates"


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The argument parser: global options and one subparser per command.

    Parameters
    ----------
    commands : sequence of Command, optional
        The subcommands (default: :data:`COMMANDS`).

    Returns
    -------
    argparse.ArgumentParser
        Parsed options carry the chosen :class:`Command` as ``command``.
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Lasagne's update rules for PyTorch: command-line tools.",
        epilog=f"Run '{PROG} COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command_name")
    for command in commands:
        subparser = subparsers.add_parser(
            command.name, help=command.summary, description=command.description, epilog=command.epilog or None
        )
        command.configure(subparser)
        subparser.set_defaults(command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit code: 0 on success, 2 for bad options (with a message on stderr), 1 when
        an optional dependency is missing. ``--help`` and ``--version`` return 0.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits for --help, --version and bad options
        return exit_.code if isinstance(exit_.code, int) else 2
    command: Command | None = getattr(args, "command", None)
    if command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return command.run(args)
    except CommandError as error:
        print(f"{PROG} {command.name}: error: {error}", file=sys.stderr)
        return 2
    except MissingDependencyError as error:
        print(f"{PROG} {command.name}: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. piped into head: stop quietly, as Python's docs advise
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG} {command.name}: interrupted", file=sys.stderr)
        return 130
