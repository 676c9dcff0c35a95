"""The error that means bad user input: a one-line message naming the file, row or option; exit code 2 at the CLI."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (missing file, wrong option value); the CLI prints it on one line and exits 2."""
