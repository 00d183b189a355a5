"""Argument helpers shared by the ``mono-quant`` subcommands (``cli.py``, ``bench.py``)."""

from __future__ import annotations

import argparse
import os
import re

__all__ = [
    "CLIError",
    "Parser",
    "max_threads",
    "observer_choices",
    "observer_kind",
    "one_line",
    "positive_int",
    "thread_count",
]

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


def max_threads() -> int:
    """The most CPU threads ``--threads`` takes: this machine's logical CPU count."""
    return os.cpu_count() or 1


def thread_count(text: str) -> int:
    """An argparse type: a thread count from 1 to ``max_threads()``.

    More threads than CPUs only wait for each other, and OpenMP crashes creating tens of thousands.
    """
    top = max_threads()
    allowed = f"expected an integer from 1 to {top} (the CPUs of this machine)"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}") from None
    if not 1 <= value <= top:
        raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}")
    return value


def observer_choices() -> str:
    """The observer names ``--observer`` and ``--kinds`` take, as one line (the registry's names)."""
    from mono_quant.core.registry import ALIASES, OBSERVERS

    return (
        f"{', '.join(OBSERVERS)} (aliases: {', '.join(ALIASES)}; class names such as "
        "HistogramObserver work too)"
    )


def observer_kind(text: str) -> str:
    """The registry name (``mono_quant.core.registry.OBSERVERS``) of an observer name on the command line.

    Raises:
        ValueError: an unknown name; the message lists the names (``observer_choices``).
    """
    from mono_quant.core.registry import observer_name

    name = text.strip()
    try:
        return observer_name(name)
    except ValueError:
        raise ValueError(f"unknown observer {name!r}; choose from {observer_choices()}") from None


def one_line(e: BaseException) -> str:
    """``"TypeName: first line of the message"``, without terminal colour codes."""
    text = _ANSI.sub("", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
