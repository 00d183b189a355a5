"""Argument helpers shared by the ``mono-quant`` subcommands (``cli.py``, ``bench.py``)."""

from __future__ import annotations

import argparse
import re

__all__ = ["CLIError", "Parser", "one_line", "positive_int"]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class CLIError(Exception):
    """A mistake in the command line: printed as one line on stderr, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises ``CLIError`` (one line) instead of printing usage and exiting."""

    def error(self, message: str):
        raise CLIError(f"{self.prog}: error: {message}")


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def one_line(e: BaseException) -> str:
    """``"TypeName: first line of the message"``, without terminal colour codes."""
    text = _ANSI.sub("", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
