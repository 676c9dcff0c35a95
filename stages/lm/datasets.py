"""The prompt sets: built-in datasets and users' JSONL/Parquet files → PROMPTS rows. `DataSource` says which prompts (a
run config's `loop.train` / `loop.eval`); `PrepareConfig` is a DataSource and where `antisd data prepare` writes it.

Built-in sets ship inside the package (`stages.lm.bundled`: gsm8k and math train, the test-only benchmarks math500,
aime24, aime25, aime26, amc23, hmmt_feb25, minervamath, olympiadbench), plus `arith`, a seeded generator of
additions (two-digit by default; `operands` sets the range) with a two-example few-shot prefix (the format in which
SmolLM2-135M has enough mixed groups for RL, docs/stack-notes.md), and `arith_styles`, the same additions with
worked examples in two answer styles: direct (`12 + 25 = 37. …`) and deliberate (split into tens and ones, add,
check by subtraction; `answer_style` tells them apart), chosen and ordered by `shots`. Users' own data comes in as
JSONL, Parquet or a Hugging Face dataset with field-mapping options, each naming a top-level column or a dotted path
into nested ones (`reward_model.ground_truth`, `prompt.-1.content`: `field_value`), each row optionally with its own
few-shot turns (a list of {user, assistant}).
Built-in few-shot user turns carry the student instruction (`stages.lm.prompts.user_text`); nothing else here formats
for the model.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import pyarrow as pa

from stages.common import validation
from stages.common.errors import InputError
from stages.common.io import build_metadata, write_artifact
from stages.lm import prompts as prompt_format
from stages.lm.bundled import BUILTIN, builtin_rows, clean_answer
from stages.lm.records import checked_few_shot, field_present, field_value, hf_records, read_jsonl, read_parquet_records

log = logging.getLogger(__name__)

USER_FORMATS = ("jsonl", "parquet", "hf")  # hf: a Hugging Face `datasets` folder or cached dataset name
DATASETS = ("arith", "arith_styles", *BUILTIN, *USER_FORMATS)
SPLITS = ("train", "test")

ARITH_FEW_SHOT = [
    ("What is 3 + 4?", "3 + 4 = 7. The final answer is \\boxed{7}."),
    ("What is 12 + 25?", "12 + 25 = 37. The final answer is \\boxed{37}."),
]
STYLES = ("direct", "deliberate")  # arith_styles: the two answer styles
DELIBERATE_MARKER = "Split:"  # how a deliberate answer begins (answer_style)
STYLE_EXAMPLES = ("small", "direct", "deliberate")  # arith_styles: 3 + 4 and 12 + 25 direct, 47 + 36 deliberate
ARITH_TEST_SIZE = 1000  # the first pairs of a fixed shuffle are held out; train never sees them
ARITH_OPERANDS = "10-99"  # arith, arith_styles: the range both operands are drawn from (inclusive)
ARITH_OPERAND_MAX = 999


@dataclass(frozen=True)
class DataSource:
    """Which prompts: a dataset and how its rows are read (`antisd data prepare` without its output; a run config's
    loop.train and loop.eval)."""

    name: str = "arith"  # one of DATASETS
    split: str = "train"  # train | test (arith, gsm8k); math has only train, the benchmarks only test; hf: any split
    num: int = 0  # keep the first N rows after shuffling (0 = all)
    seed: int = 0  # shuffles the rows (0 keeps file order for built-in sets) and draws arith problems
    few_shot: bool = True  # arith, arith_styles: prepend the two worked examples
    shots: str = "direct,deliberate"  # arith_styles: its worked examples in order, from STYLE_EXAMPLES
    operands: str = ARITH_OPERANDS  # arith, arith_styles: LO-HI, the range of both operands
    path: str | None = None  # jsonl/parquet: input file; hf: a dataset folder or a Hub dataset name
    # jsonl/parquet/hf: the fields read, each a top-level column or a dotted path into nested ones (`field_value`)
    problem_field: str = "problem"
    answer_field: str = "answer"
    solution_field: str | None = "solution"
    id_field: str | None = None
    few_shot_field: str | None = "few_shot"  # jsonl/parquet: per-row few-shot turns [{user, assistant}] (optional)
    dedupe: bool = False  # jsonl/parquet/hf: keep the first row of each problem text (DAPO-Math-17k repeats each)
    answer_boxed: bool = False  # jsonl/parquet/hf: the answer is the last \boxed{} of the answer field's text (MATH)

    def __post_init__(self):
        check = validation.Checks(self)
        check.choice("name", DATASETS)
        if self.name != "hf":
            check.choice("split", SPLITS)
        else:
            check.require(bool(self.split.strip()), "split", "must name a split of the dataset")
        names = [name.strip() for name in self.shots.split(",") if name.strip()]
        unknown = [name for name in names if name not in STYLE_EXAMPLES]
        check.require(bool(names) and not unknown, "shots",
                      f"comma list of {', '.join(STYLE_EXAMPLES)}, got {self.shots!r}")
        check.require(operand_range(self.operands) is not None, "operands",
                      f"a range LO-HI of whole numbers, 1 <= LO, LO + 3 <= HI <= {ARITH_OPERAND_MAX} "
                      f"(e.g. {ARITH_OPERANDS}), got {self.operands!r}")
        if self.name in BUILTIN and self.split in SPLITS and self.split not in BUILTIN[self.name]:
            check.fail("split", f"{self.name} has only {', '.join(BUILTIN[self.name])}, got {self.split!r}")
        check.at_least(0, "num")
        check.require(self.name not in USER_FORMATS or bool(self.path), "path", f"required for {self.name}")
        check.done()


@dataclass(frozen=True)
class PrepareConfig(DataSource):
    """Options of `antisd data prepare`: a DataSource and the Parquet file it is written to."""

    out: str = field(kw_only=True)  # output Parquet path
    overwrite: bool = field(default=False, kw_only=True)

    @classmethod
    def of(cls, source: DataSource, out: str | Path) -> "PrepareConfig":
        return cls(**{f.name: getattr(source, f.name) for f in fields(DataSource)}, out=str(out))


def operand_range(text: str) -> tuple[int, int] | None:
    """`LO-HI` → (LO, HI) when both are whole numbers with 1 <= LO, LO + 3 <= HI <= ARITH_OPERAND_MAX (at least
    16 pairs, so the held-out quarter is never empty); None otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not match:
        return None
    low, high = int(match[1]), int(match[2])
    return (low, high) if 1 <= low and low + 3 <= high <= ARITH_OPERAND_MAX else None


def arith_rows(split: str, seed: int, name: str = "arith", operands: str = ARITH_OPERANDS) -> list[dict]:
    """All additions of `split` with both operands in `operands`: a fixed shuffle holds out the first
    min(ARITH_TEST_SIZE, a quarter of the pairs) as test (for the default range, the same pairs for arith and
    arith_styles, whose reference solution is the direct one)."""
    bounds = operand_range(operands)
    if bounds is None:  # PrepareConfig refuses it first; a direct caller gets the same rule
        raise ValueError(f"operands: not a valid range LO-HI: {operands!r}")
    low, high = bounds
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    random.Random(1234).shuffle(pairs)
    test_size = min(ARITH_TEST_SIZE, len(pairs) // 4)
    chosen = pairs[:test_size] if split == "test" else pairs[test_size:]
    if split == "train":
        random.Random(seed).shuffle(chosen)
    rows = []
    for a, b in chosen:
        rows.append(
            {
                "prompt_id": f"{name}-{split}-{a:02d}+{b:02d}",
                "dataset": f"{name}/{split}",
                "problem": f"What is {a} + {b}?",
                "answer": str(a + b),
                "solution": direct_solution(a, b),
            }
        )
    return rows


def direct_solution(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}. The final answer is \\boxed{{{a + b}}}."


def deliberate_solution(a: int, b: int) -> str:
    """Tens, ones, their sum, and a check by subtraction (ASCII minus: one token, as the model writes it)."""
    tens, ones, total = a // 10 * 10 + b // 10 * 10, a % 10 + b % 10, a + b
    return (f"{DELIBERATE_MARKER} {a // 10 * 10} + {b // 10 * 10} = {tens} and {a % 10} + {b % 10} = {ones}, so "
            f"{tens} + {ones} = {total}. Check: {total} - {b} = {a}. The final answer is \\boxed{{{total}}}.")


def answer_style(text: str) -> str:
    """arith_styles: "deliberate" when a response (or peer solution) begins with DELIBERATE_MARKER, else "direct"."""
    return "deliberate" if text.lstrip().startswith(DELIBERATE_MARKER) else "direct"


def styles_few_shot(shots: str) -> list[tuple[str, str]]:
    """arith_styles' worked examples named in the comma list `shots`, in that order."""
    examples = {"small": ("What is 3 + 4?", direct_solution(3, 4)),
                "direct": ("What is 12 + 25?", direct_solution(12, 25)),
                "deliberate": ("What is 47 + 36?", deliberate_solution(47, 36))}
    return [examples[name.strip()] for name in shots.split(",") if name.strip()]


def user_rows(config: DataSource) -> list[dict]:
    path = Path(config.path)
    if config.name == "hf":
        records = hf_records(config.path, config.split)
    elif not path.exists():
        raise InputError(f"{path}: no such file")
    else:
        records = read_jsonl(path) if config.name == "jsonl" else read_parquet_records(path)
    rows = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{path}: row {i} is not an object of fields (got {type(record).__name__})")
        problem, answer = field_value(record, config.problem_field), field_value(record, config.answer_field)
        for name, value in ((config.problem_field, problem), (config.answer_field, answer)):
            if value is None and field_present(record, name):
                raise InputError(f"{path}: row {i} field '{name}' is null (every row needs a problem and an answer; "
                                 "drop or fill that row)")
            if value is None:
                raise InputError(f"{path}: row {i} has no field '{name}' (row has: {', '.join(map(str, record))}; "
                                 "see --problem-field/--answer-field)")
            if isinstance(value, (dict, list)):
                raise InputError(f"{path}: row {i} field '{name}' holds a {type(value).__name__}, not text (name a "
                                 f"path into it, e.g. '{name}.0.content' or '{name}.KEY')")
        if config.answer_boxed:
            answer = _boxed_answer(str(answer), f"{path}: row {i} field '{config.answer_field}'")
        solution = field_value(record, config.solution_field)
        rid = field_value(record, config.id_field)
        few_shot = field_value(record, config.few_shot_field)
        rows.append(
            {
                "prompt_id": f"{path.stem}-{rid if rid is not None else i}",
                "dataset": path.stem,
                "problem": str(problem),
                "answer": clean_answer(answer),
                "solution": None if solution is None else str(solution),
                "few_shot": checked_few_shot(few_shot, f"{path}: row {i} field '{config.few_shot_field}'"),
            }
        )
    return rows


def _boxed_answer(text: str, where: str) -> str:
    """The last \boxed{…} of a worked solution (MATH's answers live there); InputError naming the row if none."""
    from stages.verifier.answers import extract_boxed

    answer = extract_boxed(text)
    if answer is None or not answer.strip():
        raise InputError(f"{where}: no \\boxed{{…}} answer in it (--answer-boxed)")
    return answer


def build_rows(config: DataSource) -> list[dict]:
    """The prompt rows of `config`, shuffled/truncated, few-shot attached; pure apart from reading files."""
    if config.name == "arith":
        rows = arith_rows(config.split, config.seed, operands=config.operands)
        shots = ARITH_FEW_SHOT if config.few_shot else []
    elif config.name == "arith_styles":
        rows = arith_rows(config.split, config.seed, name="arith_styles", operands=config.operands)
        shots = styles_few_shot(config.shots) if config.few_shot else []
    elif config.name in BUILTIN:
        rows = builtin_rows(config.name, config.split)
        if config.seed:
            random.Random(config.seed).shuffle(rows)
        shots = []
    else:  # USER_FORMATS: each row carries its own few-shot turns
        rows = user_rows(config)
        if config.dedupe:
            rows = first_of_each_problem(rows, config.path)
        if config.seed:
            random.Random(config.seed).shuffle(rows)
        shots = None
    if config.num:
        rows = rows[: config.num]
    if not rows:
        raise InputError(f"data prepare {config.name}: no rows")
    ids = [r["prompt_id"] for r in rows]
    if len(set(ids)) != len(ids):
        repeated = next(i for i, count in Counter(ids).items() if count > 1)
        raise InputError(f"data prepare {config.name}: prompt id {repeated!r} is not unique (check --id-field; "
                         "--dedupe keeps the first row of each problem when the source repeats problems)")
    if shots is None:
        return rows
    few_shot = [{"user": prompt_format.user_text(q), "assistant": a} for q, a in shots]
    return [{**row, "few_shot": few_shot} for row in rows]


def first_of_each_problem(rows: list[dict], source) -> list[dict]:
    """`rows` without the ones whose problem text an earlier row already has (ids of the kept rows unchanged)."""
    seen: set[str] = set()
    kept = [row for row in rows if not (row["problem"] in seen or seen.add(row["problem"]))]
    log.info("%s: %d rows, %d distinct problems kept (--dedupe)", source, len(rows), len(kept))
    return kept


def prompts_table(config: DataSource) -> pa.Table:
    """The PROMPTS table of `config`, in memory (`antisd loop` validates it before its run directory is written)."""
    import schemas

    return pa.Table.from_pylist(build_rows(config), schema=schemas.PROMPTS)


def write_prompts(table: pa.Table, config: DataSource, out: str | Path) -> Path:
    return write_artifact(table, out, "prompts", build_metadata("prompts", config, rows=table.num_rows))
