"""Regenerate docs/cli.md from the commands' --help (a test fails when the file drifts).

Run: .venv/bin/python scripts/gen_cli_docs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from antisd_cli.main import cli  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _walk(command: click.Command, path: list[str]):
    yield path
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from _walk(command.get_command(ctx, name), path + [name])


def render() -> str:
    runner = CliRunner()
    parts = ["# antisd command reference\n", "Generated from `--help` by `scripts/gen_cli_docs.py`; do not edit.\n"]
    for path in _walk(cli, []):
        result = runner.invoke(cli, path + ["--help"], terminal_width=110, env={"COLUMNS": "110"})
        title = " ".join(["antisd", *path])
        parts.append(f"\n## `{title}`\n\n```text\n{result.output.rstrip()}\n```\n")
    return "".join(parts)


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
    print(DOC)
