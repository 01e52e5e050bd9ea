"""What a command-line command is: a name, its options and a function that runs it.

:mod:`torchupdates.cli` lists the commands; each lives in its own module (``compare`` in
:mod:`torchupdates.cli.compare`) and describes itself with a :class:`Command`, so a new
command (a step benchmark, say) is one module plus one line in the list.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = [
    "Command",
    "CommandError",
    "MissingDependencyError",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "torch_threads",
]


class CommandError(Exception):
    """A problem with what the user asked for, reported as ``prog: error: message``, exit code 2."""


class MissingDependencyError(Exception):
    """An optional package a command needs is not installed; reported with how to install it, exit code 1."""


@dataclass(frozen=True)
class Command:
    """A subcommand of ``python -m torchupdates``.

    Attributes
    ----------
    name : str
        What the user types, e.g. ``"compare"``.
    summary : str
        One line for the command list of ``python -m torchupdates --help``.
    description : str
        The text at the top of the command's own ``--help``.
    configure : callable
        Adds the command's options to its ``argparse`` parser.
    run : callable
        Runs the command on the parsed options and returns the exit code. Raises
        :class:`CommandError` for bad options it can only detect while running and
        :class:`MissingDependencyError` when an optional package is missing.
    epilog : str
        Text after the options in the command's ``--help`` (default: none).
    """

    name: str
    summary: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str = ""


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """An ``argparse`` type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with torch using ``count`` threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
