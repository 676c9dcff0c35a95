"""An example reward for `antisd verify --reward examples/rewards/exact_final_line.py:exact_final_line`.

Correct when the last non-empty line of the response, stripped of a trailing period, equals the reference answer
exactly (string equality, no math parsing): a strict format reward for datasets whose answers are labels or codes.
The response is untrusted model output: compare it, never eval it.
"""


def exact_final_line(problem: str, answer: str, response: str, row: dict) -> bool:
    lines = [line.strip() for line in response.splitlines() if line.strip()]
    return bool(lines) and lines[-1].rstrip(".").strip() == answer.strip()
