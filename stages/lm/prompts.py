"""Prompt formatting: the one place that turns a problem into chat messages and token ids.

Student view: optional few-shot turns, then a user turn "<problem> Put the final answer in \\boxed{}.".
Teacher view (METHOD §4, or §9's layout): the same few-shot turns, then a user turn holding the student's user text,
the verified solution and the assessment of the rollout being scored. Both are rendered with the model's own chat template with
the assistant generation header appended; the response token ids are appended verbatim by the caller (never
re-tokenized). Every piece of text around the problem is a field of `ChatOptions` (the defaults below), settable
one by one or from a prompt template file (`read_prompt_template`). This module does not decide which solution is
privileged (that is `verify`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from stages.common.errors import InputError
from stages.common.io import read_text_file

INSTRUCTION = "Put the final answer in \\boxed{}."
CORRECT_NOTE = "Your answer is correct."
INCORRECT_NOTE = "Your answer is incorrect."
TEACHER_INSTRUCTION = "Now solve this problem step by step."  # METHOD §4's last line; "" leaves it out (a control)
ATTEMPT_HEADER = "Your previous attempt:"  # METHOD §4: before the verified solution
ASSESSMENT_HEADER = "Previous assessment:"  # METHOD §4: before the note on this rollout

TEACHER_LAYOUTS = ("paper", "official")  # the teacher turn of METHOD §4 or of §9 (see teacher_user_text)

_THINK_RE = re.compile(r"<think>.*?</think>", flags=re.DOTALL)
THINKING = ("default", "on", "off")  # the chat template's enable_thinking (Qwen3): its default, True, False
PLAIN = "plain"  # --chat-template plain: question/answer text for base models without a chat template
PLAIN_TEMPLATE = (
    "{{ bos_token or '' }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}Question: {{ message['content'] }}\n"
    "{% else %}Answer: {{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}"
)


@dataclass(frozen=True)
class ChatOptions:
    """How both views are rendered: a system turn first (None: none), Qwen3's enable_thinking, the chat template
    (None: the tokenizer's; else the Jinja text used instead, e.g. PLAIN_TEMPLATE), the answer instruction; and the
    teacher turn's framing text (METHOD §4). Each field's knob (`knob_name`) is a key of a prompt template file and of
    the metadata record."""

    system: str | None = None
    thinking: str = "default"
    template: str | None = None
    answer_instruction: str = INSTRUCTION  # appended to the problem in both views ("" = none)
    teacher_instruction: str = TEACHER_INSTRUCTION  # the teacher turn's last line ("" = none)
    teacher_attempt_header: str = ATTEMPT_HEADER
    teacher_assessment_header: str = ASSESSMENT_HEADER
    correct_note: str = CORRECT_NOTE
    incorrect_note: str = INCORRECT_NOTE

    @classmethod
    def from_knobs(cls, knobs) -> "ChatOptions":
        """From a RolloutConfig, or a dict of its values (a run config's rollout section, a file's metadata record):
        the `prompt_template` file's values, each overridden by a knob set to other than its default (a
        `chat_template` is `plain` or a Jinja file, read here; a `system_prompt` of "" means none)."""
        get = knobs.get if isinstance(knobs, dict) else lambda key, default: getattr(knobs, key, default)
        values = read_prompt_template(get("prompt_template", None))
        for field in dataclasses.fields(cls):
            value = get(knob_name(field.name), None)
            if field.name == "template" and not value:
                value = template_text(get("chat_template", None))
            if value is not None and value != field.default:
                values[field.name] = value
        return cls(**{**values, "system": values.get("system") or None})

    def record(self) -> dict:
        """What a file's metadata keeps, by knob name (the template's text, so a rescoring needs no file)."""
        return {knob_name(field.name): getattr(self, field.name) for field in dataclasses.fields(self)}

    def wrap(self, messages: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def template_kwargs(self) -> dict:
        kwargs = {} if self.thinking == "default" else {"enable_thinking": self.thinking == "on"}
        return {**kwargs, "chat_template": self.template} if self.template else kwargs


_KNOBS = {"system": "system_prompt", "template": "chat_template_text"}  # the other fields' knobs are their names


def knob_name(field: str) -> str:
    """The option, run config, template file and metadata key of ChatOptions field `field`."""
    return _KNOBS.get(field, field)


# a prompt template file's keys: every field's knob, and chat_template (a Jinja file beside the YAML file, or plain)
TEMPLATE_KEYS = (*(knob_name(field.name) for field in dataclasses.fields(ChatOptions)), "chat_template")


def read_prompt_template(path: str | None) -> dict:
    """The ChatOptions fields a prompt template YAML file sets ({} for None), by field name; InputError naming the
    file and the key for a missing file, bad YAML, an unknown key or a value of the wrong type."""
    if not path:
        return {}
    from stages.common import yaml12

    file = Path(path)
    if not file.is_file():
        raise InputError(f"{path}: no such file (give a prompt template YAML file)")
    try:
        data = yaml12.safe_load(read_text_file(file))
    except yaml12.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({yaml12.problem(exc)})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of {', '.join(TEMPLATE_KEYS)}")
    fields_by_knob = {knob_name(field.name): field.name for field in dataclasses.fields(ChatOptions)}
    values = {}
    for key, value in data.items():
        if key not in TEMPLATE_KEYS:
            raise InputError(f"{path}: unknown key {key!r} (valid: {', '.join(TEMPLATE_KEYS)})")
        if not isinstance(value, str) and not (key == "system_prompt" and value is None):
            raise InputError(f"{path}: {key} must be a string, got {type(value).__name__} {value!r}")
        if key == "thinking" and value not in THINKING:
            raise InputError(f"{path}: thinking must be one of {', '.join(THINKING)}, got {value!r}")
        if key == "chat_template":
            if "chat_template_text" in data:
                raise InputError(f"{path}: chat_template and chat_template_text: give one of them")
            value = _template_beside(file, value)
        values[fields_by_knob.get(key, "template")] = value
    return values


def _template_beside(file: Path, choice: str) -> str:
    """The Jinja text of a template file's `chat_template`: `plain`, or a file relative to the template's folder."""
    if choice == PLAIN:
        return PLAIN_TEMPLATE
    jinja = file.parent / choice
    if not jinja.is_file():
        raise InputError(f"{file}: chat_template {choice}: no such file {jinja} (a Jinja file relative to the "
                         "template's folder, or 'plain')")
    return read_text_file(jinja, f"{file}: chat_template {jinja}")


def template_text(choice: str | None) -> str | None:
    """The Jinja text of a `--chat-template` choice: None (the tokenizer's), `plain`, or a file."""
    if not choice:
        return None
    if choice == PLAIN:
        return PLAIN_TEMPLATE
    path = Path(choice)
    if not path.is_file():
        raise InputError(f"--chat-template {choice}: no such file (give a Jinja file, or 'plain')")
    return read_text_file(path, f"--chat-template {choice}")


def user_text(problem: str, instruction: str = INSTRUCTION) -> str:
    """The user turn the student sees for `problem`: the problem, then the answer instruction ("" = none)."""
    return f"{problem} {instruction}" if instruction else problem


def _few_shot_messages(few_shot) -> list[dict]:
    messages = []
    for turn in few_shot or []:
        messages.append({"role": "user", "content": turn["user"]})
        messages.append({"role": "assistant", "content": turn["assistant"]})
    return messages


def student_messages(problem: str, few_shot=None, answer_instruction: str = INSTRUCTION) -> list[dict]:
    return _few_shot_messages(few_shot) + [{"role": "user", "content": user_text(problem, answer_instruction)}]


def teacher_user_text(problem: str, privileged_text: str | None, correct: bool, instruction: str | None = None,
                      chat: ChatOptions = ChatOptions(), layout: str = "paper", peer_assessment: bool = True) -> str:
    """The teacher's user turn: the student's user text, the verified solution (None: none, the `assessment`
    source), the assessment of *this* rollout, the instruction (None: `chat.teacher_instruction`; "" = none), in
    `chat`'s framing text.

    layout paper (METHOD §4 step 3):
        {prompt}\n\n{attempt header}\n{solution}\n\n{assessment header} {note}\n{instruction}
    layout official (§9, the authors' code):
        {prompt}\n{attempt header}\n\n{solution}\n\n{assessment header} {note}\n\n{instruction}
    Without `peer_assessment` (§9) a turn that shows a solution has no assessment line; a turn without one always
    has it. Blocks that are absent (no solution, no assessment, an empty instruction) are left out with their breaks.
    """
    if layout not in TEACHER_LAYOUTS:
        raise ValueError(f"teacher layout must be one of {', '.join(TEACHER_LAYOUTS)}, got {layout!r}")
    note = chat.correct_note if correct else chat.incorrect_note
    instruction = chat.teacher_instruction if instruction is None else instruction
    assessment = f"{chat.teacher_assessment_header} {note}" if privileged_text is None or peer_assessment else None
    prompt = user_text(problem, chat.answer_instruction)
    if layout == "official":
        blocks = ([f"{chat.teacher_attempt_header}\n\n{privileged_text}"] if privileged_text is not None else []) \
            + [block for block in (assessment, instruction) if block]
        return prompt + "\n" + "\n\n".join(blocks)
    text = prompt if privileged_text is None else f"{prompt}\n\n{chat.teacher_attempt_header}\n{privileged_text}"
    text = text if assessment is None else f"{text}\n\n{assessment}"
    return f"{text}\n{instruction}" if instruction else text


def teacher_messages(problem: str, few_shot, privileged_text: str | None, correct: bool,
                     instruction: str | None = None, chat: ChatOptions = ChatOptions(), layout: str = "paper",
                     peer_assessment: bool = True) -> list[dict]:
    text = teacher_user_text(problem, privileged_text, correct, instruction, chat, layout, peer_assessment)
    return _few_shot_messages(few_shot) + [{"role": "user", "content": text}]


def encode(tokenizer, messages: list[dict], chat: ChatOptions = ChatOptions()) -> list[int]:
    """Token ids of `messages` (after `chat`'s system turn) in the tokenizer's chat template, ending with the
    assistant header."""
    if chat.template is None and not getattr(tokenizer, "chat_template", None):
        raise InputError(f"--model {getattr(tokenizer, 'name_or_path', '?')}: its tokenizer has no chat template (a "
                         "base model?); pass --chat-template plain (or a Jinja file), or use an instruct model")
    from jinja2 import TemplateError

    try:
        ids = tokenizer.apply_chat_template(chat.wrap(messages), add_generation_prompt=True, tokenize=True,
                                            **chat.template_kwargs())
    except TemplateError as exc:  # a template's syntax error, undefined name or its own raise_exception()
        where = ("--chat-template (chat_template)" if chat.template else
                 f"the chat template of {getattr(tokenizer, 'name_or_path', '?')}")
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"{where}: failed to render ({type(exc).__name__}: {reason})") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers >= 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def strip_think(text: str) -> str:
    """Remove `<think>…</think>` blocks (and an unterminated leading one) from a peer solution."""
    text = _THINK_RE.sub("", text)
    if "</think>" in text:
        text = text.split("</think>", 1)[1]
    return text.strip()
