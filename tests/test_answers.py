"""Answer extraction, math-verify equivalence, eval guard and killable worker pool (stages.verifier.answers, stages.verifier.sandbox)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from stages.verifier import answers
from stages.verifier.answers import AnswerCheck, check_answers, extract_answer, extract_boxed, run_checks

TIMEOUT = 1.0  # seconds per check in these tests
SLACK = 2.5  # allowed on top of TIMEOUT for one check (grace before the kill + a loaded 2-core machine)


# --- extraction ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\frac{\\sqrt{2}}{2}} end", "\\frac{\\sqrt{2}}{2}"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),  # the last one wins
        ("\\fbox{7}", "7"),
        ("\\boxed {9}", "9"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),  # escaped braces are not structure
        ("\\boxed{3} and a broken \\boxed{4", "3"),  # unbalanced last box is skipped
        ("Put it in \\boxed{} ... \\boxed{5} ... \\boxed{ }", "5"),  # blank boxes are skipped
        ("\\boxed{ x + 1 }", "x + 1"),
        ("no box here", None),
        ("\\boxed{", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_boxed_beats_fallbacks():
    assert extract_answer("The answer is 3. #### 4 \\boxed{5}") == "5"


@pytest.mark.parametrize(
    "text, fallbacks, expected",
    [
        ("Natalia sold 48 clips.\n#### 72", "hash", "72"),
        ("#### 1,000\nmore text", "hash", "1,000"),
        ("So the answer is 37. Hope that helps.", "answer-is", "37"),
        ("The final answer is $3.5$.", "answer-is", "3.5"),
        ("answer: 12\nbye", "answer-is", "12"),
        ("the answer is 1 ... no wait, the answer is 2.", "answer-is", "2"),
        ("I think it is 3, or maybe -1,234.5 overall", "last-number", "-1234.5"),
        ("values 1,2,3", "last-number", "3"),
        ("The answer is 37.", "none", None),  # fallbacks off: boxed only
        ("The answer is 37.", "hash", None),  # only the listed fallbacks run
        ("12 apples. The answer is 37.", "last-number,answer-is", "37"),  # listed order is tried order
        ("12 apples. The answer is 37 ok", "answer-is,last-number", "37 ok"),
        ("no number at all", "hash,answer-is,last-number", None),
    ],
)
def test_fallbacks(text, fallbacks, expected):
    assert extract_answer(text, fallbacks) == expected


def test_default_fallbacks_are_hash_then_answer_is():
    assert answers.parse_fallbacks(answers.DEFAULT_FALLBACKS) == ("hash", "answer-is")
    assert extract_answer("it is 5") is None  # last-number is off by default
    assert extract_answer("#### 8\nThe answer is 9") == "8"


@pytest.mark.parametrize("bad", ["hash,oops", "hash,hash", "none,hash"])
def test_parse_fallbacks_rejects(bad):
    with pytest.raises(ValueError, match="fallbacks"):
        answers.parse_fallbacks(bad)


def test_parse_fallbacks_none_and_empty():
    assert answers.parse_fallbacks("none") == ()
    assert answers.parse_fallbacks("") == ()
    assert answers.parse_fallbacks(["last-number"]) == ("last-number",)


def test_extraction_is_linear_on_megabyte_inputs():
    hostile = ["\\boxed{" * 150_000, "{" * 1_000_000, "answer is " * 100_000, "1," * 500_000, "#" * 1_000_000]
    started = time.perf_counter()
    for text in hostile:
        extract_answer(text, "hash,answer-is,last-number")
    assert time.perf_counter() - started < 5.0


# --- eval guard ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", ["Integer (27 )", "Float ('27.0' )", "Symbol ('yotta' )", "E ", "-Integer (3 )",
                                  "Rational (Integer (1 ),Integer (2 ))", "Float ('1.5e3' )"])
def test_eval_guard_allows_number_constructors(code):
    assert answers.eval_allowed(code)


@pytest.mark.parametrize("code", ["__import__ ('os' ).system ('touch x' )", "open ('x' ,'w' )",
                                  "Integer (1 ).__class__", "lambda :Integer (1 )", "eval ('1' )",
                                  "Symbol ('a;b' )", "Integer (1 ).func", "getattr (Integer ,'x' )"])
def test_eval_guard_blocks_other_code(code):
    assert not answers.eval_allowed(code)


# --- equivalence (through the worker pool) ---------------------------------------------------------------------

EQUIVALENCE = [  # (gold, response, correct)
    ("27", "\\boxed{27}", True),
    ("27", "\\boxed{27.0}", True),
    ("27", "\\boxed{28}", False),
    ("-3", "\\boxed{3}", False),
    ("\\frac{1}{2}", "\\boxed{0.5}", True),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", True),
    ("\\frac{1}{3}", "\\boxed{0.5}", False),
    ("1000", "\\boxed{1,000}", True),
    ("(0,1]", "\\boxed{(0, 1]}", True),
    ("(0,1]", "\\boxed{(0,1)}", False),
    ("\\{1,2\\}", "\\boxed{\\{2,1\\}}", True),
    ("\\{1,2\\}", "\\boxed{\\{1,3\\}}", False),
    ("90", "\\boxed{90^\\circ}", True),
    ("5", "\\boxed{5\\text{ cm}}", True),
    ("25\\%", "\\boxed{25}", True),
    ("x+1", "\\boxed{1+x}", True),
    ("x+1", "\\boxed{x+2}", False),
    ("\\frac{\\sqrt{2}}{2}", "\\boxed{\\sqrt{2}/2}", True),
    ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}", True),
    ("\\pi", "\\boxed{3.14159}", False),
    ("72", "She has 72 now.\n#### 72", True),
    ("37", "The answer is 37.", True),
]


def test_equivalence_table():
    checks = check_answers([r for _, r, _ in EQUIVALENCE], [g for g, _, _ in EQUIVALENCE], timeout=5.0, workers=2)
    wrong = [(g, r, c) for (g, r, expected), c in zip(EQUIVALENCE, checks) if c.correct != expected or c.status != "ok"]
    assert not wrong


def test_statuses_and_length_cap():
    checks = check_answers(["no answer", "\\boxed{" + "1" * 50 + "}", "\\boxed{4}"], ["4", "4", "4"],
                           timeout=5.0, workers=1, max_answer_chars=20)
    assert [c.status for c in checks] == ["no_answer", "error", "ok"]
    assert checks[0] == AnswerCheck(None, False, "no_answer")
    assert checks[1].extracted_answer == "1" * 20 and "too long" in checks[1].detail
    assert checks[2].correct


def test_identical_pairs_are_checked_once():
    calls = []
    checks = check_answers(["\\boxed{4}"] * 5 + ["\\boxed{5}"], ["4"] * 6, timeout=5.0, workers=2,
                           on_progress=lambda done, total: calls.append(total))
    assert [c.correct for c in checks] == [True] * 5 + [False]
    assert set(calls) == {2}


def test_unbalanced_fallback_answer_cannot_close_the_box():
    checks = check_answers(["The answer is 3} \\boxed{5."], ["5"], timeout=5.0, workers=1)
    assert checks[0].extracted_answer == "3} \\boxed{5"
    assert not checks[0].correct and checks[0].detail == "unbalanced braces"
    assert answers.balanced("\\{1,2\\}") and answers.balanced("{a{b}}") and not answers.balanced("}{")


def test_check_answers_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        check_answers(["a"], ["1", "2"])


# --- the pool: soft timeout, hard kill, crash, guard in the worker ----------------------------------------------

def stubborn_check(gold: str, answer: str) -> bool:
    """A check stuck where no signal reaches it (like a long C call): SIGALRM blocked, then sleep."""
    if answer == "hang":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    if answer == "crash":
        os._exit(3)
    if answer == "hog":
        return len(bytearray(4 << 30)) > 0
    if answer == "spin":
        while True:
            pass
    return gold == answer


def parse_expr_check(gold: str, answer: str) -> bool:
    """A check that (wrongly) hands model text to sympy's parse_expr: the worker's guard must stop the eval."""
    from sympy.parsing.sympy_parser import parse_expr

    return parse_expr(answer) == parse_expr(gold)


def test_hung_worker_is_killed_and_replaced():
    pairs = [("1", "1"), ("1", "hang"), ("2", "2"), ("3", "3"), ("4", "5")]
    started = time.perf_counter()
    results = run_checks(pairs, timeout=TIMEOUT, workers=1, check=stubborn_check)
    elapsed = time.perf_counter() - started
    assert [r[0] for r in results] == ["ok", "timeout", "ok", "ok", "ok"]
    assert [r[1] for r in results] == [True, False, True, True, False]
    assert "killed" in results[1][2] and results[1][3] <= TIMEOUT + SLACK
    assert elapsed < TIMEOUT + SLACK + 10  # one kill, one replacement start


def test_busy_loop_is_interrupted_without_a_kill():
    results = run_checks([("1", "spin"), ("1", "1")], timeout=TIMEOUT, workers=1, check=stubborn_check)
    assert results[0][0] == "timeout" and "interrupted" in results[0][2]
    assert results[1][:2] == ("ok", True)


def test_crashed_worker_gives_error_and_the_rest_finish():
    results = run_checks([("1", "crash"), ("2", "2")], timeout=TIMEOUT, workers=1, check=stubborn_check)
    assert results[0][0] == "error" and "died" in results[0][2]
    assert results[1][:2] == ("ok", True)


def test_memory_limit_gives_error():
    results = run_checks([("1", "hog"), ("2", "2")], timeout=5.0, workers=1, check=stubborn_check, memory_mb=1024)
    assert results[0][0] == "error" and "MemoryError" in results[0][2]
    assert results[1][:2] == ("ok", True)


def test_guard_blocks_eval_inside_workers(tmp_path):
    target = tmp_path / "PWNED"
    results = run_checks([("1", f"__import__('os').system('touch {target}')"), ("2", "2")], timeout=5.0,
                         workers=1, check=parse_expr_check)
    assert results[0][0] == "error" and "UnsafeEval" in results[0][2]
    assert results[1][:2] == ("ok", True)  # number literals still evaluate
    assert not target.exists()


# --- injection corpus ------------------------------------------------------------------------------------------

def injection_corpus(sentinel_dir) -> list[str]:
    """Model outputs that would write a file if anything eval-ed them, or blow up time or memory."""
    touch = f"touch {sentinel_dir}/PWNED"
    return [
        f"\\boxed{{__import__('os').system('{touch}1')}}",
        f"\\boxed{{open('{sentinel_dir}/PWNED2','w').write('y')}}",
        f"\\boxed{{(lambda: __import__('os').system('{touch}3'))()}}",
        f"\\boxed{{eval(\"__import__('os').system('{touch}4')\")}}",
        f"The answer is __import__('subprocess').call(['touch', '{sentinel_dir}/PWNED5']).",
        f"#### exec(\"open('{sentinel_dir}/PWNED6','w')\")",
        "\\boxed{open('PWNED7','w').write('y')}",  # relative path: the test's cwd
        "\\boxed{9^{9^{9^{9}}}}",
        "The answer is 9**9**9**9",
        "\\boxed{10^{10^{10^{10}}}}",
        "\\boxed{1000000!}",
        "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
        "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
        "\\boxed{" + "\\frac{1}{" * 2_000 + "2" + "}" * 2_000 + "}",
        "x" * 1_000_000,
        "\\boxed{" + "1" * 1_000_000 + "}",
        "\\boxed{" * 150_000,
        "\\boxed{\\frac{1}{0}}",
        "\\boxed{0^{-1}}",
        "\\boxed{\\input{/etc/passwd}}",
    ]


def test_injection_corpus_is_harmless(tmp_path, monkeypatch):
    sentinel_dir = tmp_path / "sentinel"
    sentinel_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    corpus = injection_corpus(sentinel_dir)
    started = time.perf_counter()
    checks = check_answers(corpus, ["1"] * len(corpus), fallbacks="hash,answer-is,last-number", timeout=TIMEOUT,
                           workers=2, max_answer_chars=25_000)
    elapsed = time.perf_counter() - started
    assert list(sentinel_dir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentinel"]
    assert all(c.status in answers.STATUSES and not c.correct for c in checks)
    assert all(c.seconds <= TIMEOUT + SLACK for c in checks)
    # timeouts run two at a time; everything else is milliseconds
    assert elapsed < len(corpus) * (TIMEOUT + SLACK) / 2 + 10
    assert {c.status for c in checks} >= {"ok", "timeout", "error"}
