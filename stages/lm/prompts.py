"""Prompt formatting: the one place that turns a problem into chat messages and token ids.

Student view: optional few-shot turns, then a user turn "<problem> Put the final answer in \\boxed{}.".
Teacher view (METHOD §4): the same few-shot turns, then a user turn holding the student's user text, the verified
solution and the assessment of the rollout being scored. Both are rendered with the model's own chat template with
the assistant generation header appended; the response token ids are appended verbatim by the caller (never
re-tokenized). This module does not decide which solution is privileged (that is `verify`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

INSTRUCTION = "Put the final answer in \\boxed{}."
CORRECT_NOTE = "Your answer is correct."
INCORRECT_NOTE = "Your answer is incorrect."
TEACHER_INSTRUCTION = "Now solve this problem step by step."  # METHOD §4's last line; "" leaves it out (a control)

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
    """How both views are rendered: a system turn first (None: none), Qwen3's enable_thinking, and the chat template
    (None: the tokenizer's; else the Jinja text used instead, e.g. PLAIN_TEMPLATE)."""

    system: str | None = None
    thinking: str = "default"
    template: str | None = None
    answer_instruction: str = INSTRUCTION  # appended to the problem in both views ("" = none)

    @classmethod
    def from_knobs(cls, knobs) -> "ChatOptions":
        """From a RolloutConfig, or a dict of its values (a run config's rollout section, a file's metadata); a
        `chat_template` is `plain` or a Jinja file, read here."""
        get = knobs.get if isinstance(knobs, dict) else lambda key, default: getattr(knobs, key, default)
        template = get("chat_template_text", None) or template_text(get("chat_template", None))
        instruction = get("answer_instruction", INSTRUCTION)
        return cls(get("system_prompt", None) or None, get("thinking", "default") or "default", template,
                   INSTRUCTION if instruction is None else instruction)

    def record(self) -> dict:
        """What a scored file's metadata keeps (the template's text, so a rescoring needs no file)."""
        return {"system_prompt": self.system, "thinking": self.thinking, "chat_template_text": self.template,
                "answer_instruction": self.answer_instruction}

    def wrap(self, messages: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def template_kwargs(self) -> dict:
        kwargs = {} if self.thinking == "default" else {"enable_thinking": self.thinking == "on"}
        return {**kwargs, "chat_template": self.template} if self.template else kwargs


def template_text(choice: str | None) -> str | None:
    """The Jinja text of a `--chat-template` choice: None (the tokenizer's), `plain`, or a file."""
    if not choice:
        return None
    if choice == PLAIN:
        return PLAIN_TEMPLATE
    from pathlib import Path

    path = Path(choice)
    if not path.is_file():
        from stages.common.errors import InputError

        raise InputError(f"--chat-template {choice}: no such file (give a Jinja file, or 'plain')")
    return path.read_text()


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


def teacher_user_text(problem: str, privileged_text: str, correct: bool,
                      instruction: str = TEACHER_INSTRUCTION, answer_instruction: str = INSTRUCTION) -> str:
    """METHOD §4 step 3: problem prompt, the verified solution, the assessment of *this* rollout, the instruction."""
    note = CORRECT_NOTE if correct else INCORRECT_NOTE
    text = f"{user_text(problem, answer_instruction)}\n\nYour previous attempt:\n{privileged_text}\n\nPrevious assessment: {note}"
    return f"{text}\n{instruction}" if instruction else text


def teacher_messages(problem: str, few_shot, privileged_text: str, correct: bool,
                     instruction: str = TEACHER_INSTRUCTION, answer_instruction: str = INSTRUCTION) -> list[dict]:
    return _few_shot_messages(few_shot) + [
        {"role": "user", "content": teacher_user_text(problem, privileged_text, correct, instruction,
                                                      answer_instruction)}
    ]


def encode(tokenizer, messages: list[dict], chat: ChatOptions = ChatOptions()) -> list[int]:
    """Token ids of `messages` (after `chat`'s system turn) in the tokenizer's chat template, ending with the
    assistant header."""
    if chat.template is None and not getattr(tokenizer, "chat_template", None):
        from stages.common.errors import InputError

        raise InputError(f"--model {getattr(tokenizer, 'name_or_path', '?')}: its tokenizer has no chat template (a "
                         "base model?); pass --chat-template plain (or a Jinja file), or use an instruct model")
    ids = tokenizer.apply_chat_template(chat.wrap(messages), add_generation_prompt=True, tokenize=True,
                                        **chat.template_kwargs())
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers >= 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def strip_think(text: str) -> str:
    """Remove `<think>…</think>` blocks (and an unterminated leading one) from a peer solution."""
    text = _THINK_RE.sub("", text)
    if "</think>" in text:
        text = text.split("</think>", 1)[1]
    return text.strip()
