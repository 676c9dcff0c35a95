"""Docs stay true: the CLI reference matches --help, the README documents every Parquet column, and every command
and option the README and docs/ show exists."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import click

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
    setup = readme.split("## Set-up", 1)[1].split("## A tour", 1)[0]
    assert "source .venv/bin/activate" in setup and ".venv/bin/antisd" in setup  # the tour's bare `antisd`
    assert "--index-url https://download.pytorch.org/whl/cpu" in setup  # a pip that reaches PyPI only


# --- every `antisd ...` command the docs show must parse: commands exist and take the options given -------------

DOCS = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "cli.md")]
_SEPARATORS = {"|", "||", "&", "&&", ";", ">", ">>", "2>", "<"}
_PROSE_CLAIM = re.compile(r"((?:`[a-z-]+`(?:,\s*|\s+and\s+)?)+)\s+takes?\s+`(--[a-z][a-z-]*)")


def _command_lines(text: str) -> list[str]:
    """Shell lines of fenced code blocks (continuations joined) plus inline `antisd ...` spans."""
    lines, fenced, current = [], False, ""
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            current += " " + line.rstrip()
            if current.endswith("\\"):
                current = current[:-1]
                continue
            lines.append(current.strip())
            current = ""
    lines += re.findall(r"`(antisd [^`]+)`", text)
    return lines


def _invocations(line: str) -> list[list[str]]:
    """Token lists following each `antisd` / `antisd_cli` in a shell line, up to a separator or comment."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose: not a command line
        return []
    found = []
    for start, token in enumerate(tokens):
        if token in ("antisd", "antisd_cli"):
            rest = []
            for item in tokens[start + 1:]:
                if item in _SEPARATORS:
                    break
                rest.append(item)
            found.append(rest)
    return found


def _resolve(words: list[str]):
    """(click command, the words naming it, remaining tokens) for `antisd WORDS...`."""
    from antisd_cli.main import cli

    command, path, rest = cli, [], list(words)
    ctx = click.Context(cli)
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(ctx, rest[0])
        if sub is None:
            break
        command, path, rest = sub, path + [rest[0]], rest[1:]
    return command, path, rest


def _options(command) -> set[str]:
    names = {"--help", "-h"}
    for param in command.params:
        names.update(param.opts)
        names.update(getattr(param, "secondary_opts", []))
    return names


def test_documented_commands_exist_and_take_their_options():
    problems, checked = [], 0
    for doc in DOCS:
        for line in _command_lines(doc.read_text()):
            for words in _invocations(line):
                if not words or words[0].startswith("-") and words[0] not in ("-v", "-q"):
                    continue
                words = [w for w in words if w not in ("-v", "-vv", "-q")]
                command, path, rest = _resolve(words)
                if not path:
                    problems.append(f"{doc.name}: `antisd {' '.join(words)}`: no such command")
                    continue
                known = _options(command)
                checked += 1
                for token in rest:
                    flag = token.split("=", 1)[0]
                    if flag.startswith("--") and flag not in known:
                        problems.append(f"{doc.name}: `antisd {' '.join(path)}` has no option {flag}")
    assert checked > 20  # the README's tour alone shows more: the parser still finds the commands
    assert not problems, "\n".join(problems)


def test_documented_option_claims_hold():
    """Prose such as "`rollout` and `score` take `--shard I/N`" is checked against those commands."""
    from antisd_cli.main import cli

    ctx = click.Context(cli)
    problems, claims = [], 0
    for doc in DOCS:
        for names, flag in _PROSE_CLAIM.findall(" ".join(doc.read_text().split())):
            for name in re.findall(r"`([a-z-]+)`", names):
                command = cli.get_command(ctx, name)
                if command is None:
                    continue
                claims += 1
                if flag not in _options(command):
                    problems.append(f"{doc.name}: says `{name}` takes {flag}; it does not")
    assert claims > 0  # the README's scaling-out section makes such claims: the pattern must still find them
    assert not problems, "\n".join(problems)
