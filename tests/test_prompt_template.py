"""`--prompt-template FILE.yaml`: one file for the chat options and the teacher view's framing text (METHOD §4). It
shapes the student prompt at rollout, travels resolved in the metadata so score renders the teacher view from it
without the file, loses to a flag set to other than its default, and refuses unknown keys and wrong types."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from stages.common.errors import InputError
from stages.common.io import read_artifact
from stages.lm.prompts import TEMPLATE_KEYS, ChatOptions, encode, read_prompt_template, teacher_messages

REPO = Path(__file__).resolve().parent.parent
JINJA = ("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}<<assistant>>{% endif %}")
TEMPLATE = textwrap.dedent("""\
    system_prompt: You are terse.
    answer_instruction: "End with 'Answer: N'."
    thinking: off
    chat_template: jinja/mine.jinja
    teacher_attempt_header: 'A correct solution:'
    teacher_assessment_header: 'Grade of your attempt:'
    correct_note: Right.
    incorrect_note: Wrong.
    teacher_instruction: Try again.
    """)
MINE = ChatOptions(system="You are terse.", thinking="off", template=JINJA, answer_instruction="End with 'Answer: N'.",
                   teacher_instruction="Try again.", teacher_attempt_header="A correct solution:",
                   teacher_assessment_header="Grade of your attempt:", correct_note="Right.", incorrect_note="Wrong.")


def write_template(folder: Path, text: str = TEMPLATE) -> Path:
    (folder / "jinja").mkdir(exist_ok=True)
    (folder / "jinja" / "mine.jinja").write_text(JINJA)
    path = folder / "mine.yaml"
    path.write_text(text)
    return path


def _cli(*args):
    from antisd_cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_the_example_file_is_the_defaults_and_names_every_key():
    from stages.common.yaml12 import safe_load

    example = REPO / "examples" / "prompts" / "default.yaml"
    assert ChatOptions.from_knobs({"prompt_template": str(example)}) == ChatOptions()
    text = example.read_text()
    assert set(safe_load(text)) == set(TEMPLATE_KEYS) - {"chat_template", "chat_template_text"}
    assert all(f"{key}:" in text for key in TEMPLATE_KEYS)  # the two template keys as comments


def test_a_template_file_sets_every_option_with_the_jinja_beside_it(tmp_path):
    path = write_template(tmp_path)
    assert ChatOptions.from_knobs({"prompt_template": str(path)}) == MINE  # `thinking: off` stays the string
    text = teacher_messages("P?", [], "sol", False, chat=MINE)[-1]["content"]
    assert text == "P? End with 'Answer: N'.\n\nA correct solution:\nsol\n\nGrade of your attempt: Wrong.\nTry again."
    # a knob set to other than its default wins; one left at its default keeps the file's value
    knobs = {"prompt_template": str(path), "answer_instruction": "Say N.", "system_prompt": "", "thinking": "default",
             "chat_template": "plain"}
    mixed = ChatOptions.from_knobs(knobs)
    assert (mixed.answer_instruction, mixed.system, mixed.thinking) == ("Say N.", None, "off")
    assert mixed.template.startswith("{{ bos_token") and mixed.correct_note == "Right."
    assert ChatOptions.from_knobs(MINE.record()) == MINE  # the metadata record round-trips


@pytest.mark.parametrize("text, message", [
    ("sistem_prompt: hi\n", r"unknown key 'sistem_prompt' \(valid: system_prompt, thinking"),
    ("correct_note: 3\n", r"correct_note must be a string, got int 3"),
    ("teacher_instruction: [a, b]\n", r"teacher_instruction must be a string, got list"),
    ("thinking: maybe\n", r"thinking must be one of default, on, off, got 'maybe'"),
    ("chat_template: absent.jinja\n", r"chat_template absent.jinja: no such file"),
    ("chat_template: plain\nchat_template_text: x\n", r"chat_template and chat_template_text: give one of them"),
    ("- a list\n", r"expected a mapping of system_prompt"),
    ("correct_note: a\ncorrect_note: b\n", r"not valid YAML \(found duplicate key 'correct_note'"),
])
def test_a_bad_template_file_is_one_error_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=f"bad.yaml: {message}"):
        read_prompt_template(str(path))


def test_a_bad_template_stops_rollout_and_a_run_config_before_any_work(tmp_path, arith_prompts, tiny_model_dir):
    from stages.runs import config as run_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("system_prompt: hi\nsistem_prompt: typo\n")
    out = tmp_path / "r.parquet"
    result = _cli("-q", "rollout", "--model", tiny_model_dir, "--prompts", arith_prompts, "--out", out,
                  "--engine", "hf", "--prompt-template", bad)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"--prompt-template: {bad}: unknown key 'sistem_prompt'" in result.stderr and not out.exists()
    with pytest.raises(InputError, match=r"rollout.prompt_template: .*bad.yaml: unknown key 'sistem_prompt'"):
        run_config.resolve({"rollout": {"prompt_template": str(bad)}})
    good = write_template(tmp_path)
    knobs = run_config.resolve({"rollout": {"prompt_template": str(good)}}).stages["rollout"]
    assert ChatOptions.from_knobs(knobs) == MINE  # what the loop's stages and its vLLM context length read


def test_rollout_and_score_render_both_views_from_the_template(tmp_path, arith_prompts, tiny_model_dir):
    """The student prompt is the template's; score, given no template (its file is gone by then), renders the teacher
    view from the rollouts' metadata; flags set on the command line override the file's values."""
    from stages import verify
    from stages.lm.models import load_tokenizer
    from stages.lm.scoring import metadata_chat
    from stages.verifier.rows import VerifyConfig

    tokenizer = load_tokenizer(tiny_model_dir)
    template = write_template(tmp_path)
    common = ["--model", tiny_model_dir, "--prompts", arith_prompts, "--n", 2, "--num", 2, "--max-new-tokens", 3,
              "--engine", "hf", "--threads", 1, "--no-progress", "--prompt-template", template]
    runs = {"file": ([], [], MINE),
            "flags": (["--answer-instruction", "Say N.", "--system-prompt", ""], ["--teacher-instruction", ""],
                      replace(MINE, answer_instruction="Say N.", system=None, teacher_instruction=""))}
    rolled = {}
    for name, (rollout_flags, _, _) in runs.items():
        rolled[name] = tmp_path / f"{name}_r.parquet"
        result = _cli("rollout", *common, *rollout_flags, "--out", rolled[name])
        assert result.exit_code == 0, result.output
    template.unlink()
    (tmp_path / "jinja" / "mine.jinja").unlink()
    for name, (_, score_flags, expected) in runs.items():
        verified = verify.run(VerifyConfig(rollouts=str(rolled[name]), out=str(tmp_path / f"{name}_v.parquet"),
                                           workers=1))
        scored = tmp_path / f"{name}_s.parquet"
        result = _cli("score", "--model", tiny_model_dir, "--verified", verified, "--out", scored, "--threads", 1,
                      *score_flags)
        assert result.exit_code == 0, result.output
        table, metadata = read_artifact(scored, "scored")
        assert metadata_chat(metadata) == expected  # what the teacher saw, recorded
        rows = table.to_pylist()
        teacher_rows = [r for r in rows if r["privileged_source"] != "none"]
        assert teacher_rows
        for row in rows:
            student = tokenizer.decode(row["prompt_token_ids"])
            assert student.endswith(f"<<user>> {row['problem']} {expected.answer_instruction}\n<<assistant>>")
            assert (f"<<system>> {expected.system}\n" in student if expected.system else "<<system>>" not in student)
            assert "<|im_start|>" not in student  # the template's Jinja, not the tokenizer's
        for row in teacher_rows:
            ids = encode(tokenizer, teacher_messages(row["problem"], row["few_shot"], row["privileged_text"],
                                                     row["correct"], chat=expected), expected)
            assert row["teacher_prompt_token_ids"] == ids
            teacher = tokenizer.decode(ids)
            note = "Right." if row["correct"] else "Wrong."
            assert f"A correct solution:\n{row['privileged_text']}\n\nGrade of your attempt: {note}" in teacher
            assert ("Try again." in teacher) == (name == "file") and "Your previous attempt:" not in teacher
