"""The datasets shipped inside the package (`stages/datasets/`, origins and licences in its README.md and LICENSES.md)
and how each file becomes prompt rows, with the quirks of each source handled here and nowhere else.

Sets: gsm8k (train/test), math (train: the 7,500 MATH training problems, answers from the last \\boxed{}), and the
test-only benchmarks math500, aime24, aime25, aime26, amc23, hmmt_feb25, minervamath, olympiadbench.
Quirks:
- gsm8k: the final answer follows `####` in the worked solution; `<<calc>>` annotations are dropped.
- amc23: answers are floats (`27.0` → `27`).
- olympiadbench: the gold is the `final_answer` list, every `$` removed and the entries joined by ", " (as
  Qwen2.5-Math's evaluator reads it: `final_answer[0]` with `$` stripped). A multi-answer row such as `69$,$84`
  becomes `69,84`, which the verifier parses as the set {69, 84}: a response is correct only when it gives every
  part (in any order) and nothing else. The file's `answer` column (first entry, outer `$` only) is not used.
- minervamath: answers are kept verbatim, code-like forms included (`np.arcsin(10/13)`, `-1./3`, `4.5e33`); the
  verifier rewrites such forms on both sides before comparing (`stages.verifier.answers.latex_form`).
Not bundled: BeyondAIME (no licence stated); users prepare it from its file (`antisd data prepare jsonl`).
This module formats nothing for the model and judges no answer.
"""

from __future__ import annotations

import re
from pathlib import Path

from stages.common.errors import InputError
from stages.lm.records import read_jsonl

DATA_DIR = Path(__file__).resolve().parent.parent / "datasets"
BUILTIN = {
    "gsm8k": {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
    "math": {"train": "math/train.jsonl"},
    "math500": {"test": "math500/test.jsonl"},
    "aime24": {"test": "aime24/test.jsonl"},
    "aime25": {"test": "aime25/test.jsonl"},
    "aime26": {"test": "aime26/test.jsonl"},
    "amc23": {"test": "amc23/test.jsonl"},
    "hmmt_feb25": {"test": "hmmt_feb25/test.jsonl"},
    "minervamath": {"test": "minervamath/test.jsonl"},
    "olympiadbench": {"test": "olympiadbench/test.jsonl"},
}
BENCHMARKS = tuple(name for name, splits in BUILTIN.items() if "test" in splits)  # the sets `antisd eval` knows


def clean_answer(value) -> str:
    """A gold answer as text: whole floats without their `.0` (amc23's `27.0`), surrounding blanks cut."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def olympiad_gold(final_answer: list[str]) -> str:
    """OlympiadBench's gold: every `$` removed from each `final_answer` entry, entries joined by ", " (see above)."""
    return ", ".join(str(entry).replace("$", "").strip() for entry in final_answer)


def gsm8k_row(record: dict, index: int, split: str) -> dict:
    text = record["answer"]
    if "####" not in text:
        raise InputError(f"gsm8k/{split}.jsonl row {index}: answer has no '####'")
    reasoning, final = text.rsplit("####", 1)
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    final = final.strip().replace(",", "")
    return {
        "prompt_id": f"gsm8k-{split}-{index:05d}",
        "dataset": f"gsm8k/{split}",
        "problem": record["question"],
        "answer": final,
        "solution": f"{reasoning}\nThe final answer is \\boxed{{{final}}}.",
    }


def builtin_rows(name: str, split: str) -> list[dict]:
    """The prompt rows (without few-shot turns) of bundled set `name`, split `split`, in file order."""
    records = read_jsonl(DATA_DIR / BUILTIN[name][split])
    if name == "gsm8k":
        return [gsm8k_row(r, i, split) for i, r in enumerate(records)]
    rows = []
    for i, record in enumerate(records):
        rid = record.get("unique_id") or record.get("id", i)
        gold = olympiad_gold(record["final_answer"]) if name == "olympiadbench" else record["answer"]
        rows.append(
            {
                "prompt_id": f"{name}-{rid}",
                "dataset": name,
                "problem": record["problem"],
                "answer": clean_answer(gold),
                "solution": record.get("solution"),
            }
        )
    return rows
