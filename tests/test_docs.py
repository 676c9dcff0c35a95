"""Docs stay true: the CLI reference matches --help, and the README documents every Parquet column."""

from __future__ import annotations

import sys
from pathlib import Path

import schemas

REPO = Path(__file__).resolve().parent.parent


def test_cli_reference_matches_help():
    sys.path.insert(0, str(REPO / "scripts"))
    import gen_cli_docs

    expected = gen_cli_docs.render()
    assert (REPO / "docs" / "cli.md").read_text() == expected, "run: .venv/bin/python scripts/gen_cli_docs.py"


def test_readme_documents_every_column():
    readme = (REPO / "README.md").read_text()
    for artifact, schema in schemas.SCHEMAS.items():
        for field in schema:
            assert f"`{field.name}`" in readme, f"README lacks the {artifact} column {field.name}"


def test_readme_shows_the_two_setup_commands():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
