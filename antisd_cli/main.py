"""The `antisd` click group. Commands live one per module and are imported only when used, so `--help` is fast."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from stages import (
    __version__,  # command name -> module in antisd_cli holding a click command of the same name (dashes → underscores)
)

COMMANDS = {
    "data": "data",
    "rollout": "rollout",
    "verify": "verify",
    "score": "score",
    "update": "update",
    "loop": "loop",
    "eval": "eval",
    "analyze": "analyze",
    "plot": "plot",
    "report": "report",
    "merge": "merge",
    "inspect": "inspect",
    "demo": "demo",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(name for name in COMMANDS if self._module(name) is not None)

    def _module(self, name):
        try:
            return importlib.import_module(f"antisd_cli.{COMMANDS[name]}")
        except ModuleNotFoundError as exc:
            if exc.name == f"antisd_cli.{COMMANDS[name]}":
                return None
            raise

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = self._module(name)
        return None if module is None else getattr(module, name.replace("-", "_") + "_command")


class OneLineFormatter(logging.Formatter):
    """`2026-12-01T23:04:10 INFO stages.verify: message` with any newline in the message shown as ⏎: one record per
    line, for grep and `tail -f` on a cluster log."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "").replace("\n", " ⏎ ")


def log_handler(stream) -> logging.Handler:
    """Rich rendering on a terminal; plain one-line records (no wrapping, no colour) when `stream` is a file or pipe."""
    if stream.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", "[%X]"))
        return handler
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLineFormatter())
    return handler


@click.group(
    cls=LazyGroup,
    context_settings={"show_default": True, "help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.version_option(__version__, prog_name="antisd")
@click.option("-v", "--verbose", count=True, help="Debug log output on stderr (default: info).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("--local_rank", "--local-rank", type=int, default=None, hidden=True, expose_value=False,
              help="Appended by the deepspeed launcher; LOCAL_RANK from the environment is used instead.")
def cli(verbose: int, quiet: bool) -> None:
    """GRPO + Anti-Self-Distillation for math-reasoning RL, as Parquet-in/Parquet-out stages.

    \b
    Pipeline:  data prepare → rollout → verify → score → update   (or `loop` for all of them)
    Example:
      antisd data prepare arith --out prompts.parquet --num 64
      antisd rollout --prompts prompts.parquet --out rollouts.parquet --n 8
      antisd verify --rollouts rollouts.parquet --out verified.parquet
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, handlers=[log_handler(sys.stderr)], force=True)
    for noisy in ("transformers", "deepspeed", "DeepSpeed", "torch", "accelerate", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
