"""A fake sampling engine for evaluation tests: it answers each problem with its gold answer in the first c samples
(c chosen per problem by the test) and with no answer in the rest, so every accuracy, pass@k and Speedup that follows
is known exactly. It implements `stages.lm.engine.Engine`; tests put it in place of `stages.lm.sampling.open_engine`.
"""

from __future__ import annotations

from pathlib import Path

from stages.lm.engine import Completion, Engine

NO_ANSWER = "I am not sure."


class GoldEngine(Engine):
    """`golds`: prompt_id → gold answer; `correct`: prompt_id → c (samples 0..c-1 correct; absent: 0).
    Every prompt it samples is appended to `calls`; `fail_on` (a prompt_id prefix) raises KeyboardInterrupt there,
    as a kill would stop a run."""

    name = "gold"
    default_batch_size = 64
    dtype_name = "none"
    revision = "gold-engine"

    def __init__(self, tokenizer, model_path: Path, golds: dict, correct: dict, fail_on: str | None = None):
        self.tokenizer, self.model_path = tokenizer, Path(model_path)
        self.golds, self.correct, self.fail_on = golds, correct, fail_on
        self.calls: list[str] = []

    def generate(self, prompt_ids, prompt_keys, settings, batch_size=0, on_progress=None):
        groups = []
        for key in prompt_keys:
            if self.fail_on is not None and key.startswith(self.fail_on):
                raise KeyboardInterrupt(f"killed at {key}")
            self.calls.append(key)
            right = f"So the answer is \\boxed{{{self.golds[key]}}}."
            texts = [right if i < self.correct.get(key, 0) else NO_ANSWER for i in range(settings.n)]
            ids = [self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
                   for text in texts]
            groups.append([Completion(x, [-0.5] * len(x), "stop") for x in ids])
        if on_progress is not None:
            on_progress(list(range(len(prompt_keys))), sum(len(c.response_token_ids) for g in groups for c in g))
        return groups


def gold_answers(names, num: int = 0) -> dict:
    """prompt_id → gold answer of the test problems of the built-in benchmarks `names` (first `num` of each)."""
    from stages.lm.datasets import PrepareConfig, build_rows

    return {row["prompt_id"]: row["answer"] for name in names
            for row in build_rows(PrepareConfig(name=name, out="", split="test", num=num))}


def install(monkeypatch, engine: GoldEngine) -> GoldEngine:
    """Make every evaluation sample with `engine` (training rollouts keep their engine)."""
    monkeypatch.setattr("stages.lm.sampling.open_engine", lambda *args, **kwargs: engine)
    return engine
