"""PMI probes (METHOD §7 made testable): u at chosen positions of the responses, split by the rollout's style × the
style of the privileged context × the teacher's note on this rollout, with intervals from a bootstrap over problems;
and the sampling noise of the gate's statistic (METHOD §5) at a step's size.

Pure functions over plain records; `stages.analyze` decodes the scored rows into them. A record is one rollout:
`problem` (its prompt_id), `style` and `peer_style` (labels), `note` ("correct" | "incorrect": what the teacher was
told about this rollout), `first_u` (u of the first response token) and `words` [(stripped word, u of the word)].
"""

from __future__ import annotations

import random
import statistics
from collections import defaultdict
from typing import Sequence

from stages.method.gate import median_teacher_entropy

FIRST_TOKEN = "<first token>"  # the probe name of the first response token


def probe_values(record: dict, probe: str) -> list[float]:
    """The u of each occurrence of `probe` in one rollout: the first token's u, or every word equal to the probe
    (case-insensitive)."""
    if probe == FIRST_TOKEN:
        return [] if record["first_u"] is None else [record["first_u"]]
    wanted = probe.lower()
    return [u for word, u in record["words"] if word.lower() == wanted]


def cluster_bootstrap(sums: Sequence[float], counts: Sequence[int], *, resamples: int, seed: int,
                      confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of Σsums / Σcounts when whole problems (one sum and count each) are drawn with
    replacement: occurrences within a problem are not independent, problems are."""
    rng = random.Random(seed)
    size = len(sums)
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(size) for _ in range(size)]
        total = sum(counts[i] for i in picks)
        ratios.append(sum(sums[i] for i in picks) / total)
    ratios.sort()
    alpha = (1.0 - confidence) / 2.0
    return ratios[min(resamples - 1, int(alpha * resamples))], ratios[max(0, int((1 - alpha) * resamples) - 1)]


def probe_table(records: Sequence[dict], probes: Sequence[str], *, resamples: int = 1000, seed: int = 0) -> list[dict]:
    """One row per (probe, style, peer_style, note) cell seen: rollouts with the probe, occurrences, problems, mean u
    and its 95 % interval (null with fewer than 2 problems)."""
    rows = []
    for probe in (FIRST_TOKEN, *[p for p in probes if p != FIRST_TOKEN]):
        cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for record in records:
            values = probe_values(record, probe)
            if values:
                cells[(record["style"], record["peer_style"], record["note"])][record["problem"]].extend(values)
        for (style, peer_style, note), by_problem in sorted(cells.items()):
            sums = [sum(v) for v in by_problem.values()]
            counts = [len(v) for v in by_problem.values()]
            low = high = None
            if len(by_problem) >= 2:
                low, high = cluster_bootstrap(sums, counts, resamples=resamples, seed=seed)
            rows.append({"probe": probe, "style": style, "peer_style": peer_style, "note": note,
                         "occurrences": sum(counts), "problems": len(by_problem),
                         "mean_u": sum(sums) / sum(counts), "ci_low": low, "ci_high": high})
    return rows


def gate_noise(entropies_by_problem: dict[str, list[list[float]]], subset: int, *, draws: int = 1000,
               seed: int = 0, down: float = 0.93) -> dict | None:
    """How much the gate's statistic moves with the step's problems alone: the median teacher entropy of `subset`
    problems drawn without replacement, `draws` times. Returns its mean, standard deviation, coefficient of
    variation and the fraction of draws below `down` × the median of all problems (how often sampling noise alone
    would close an open gate whose H_warm equals the pooled median); None with fewer than `subset` problems."""
    problems = sorted(entropies_by_problem)
    if subset < 1 or len(problems) < subset:
        return None
    pooled, _ = median_teacher_entropy([h for p in problems for h in entropies_by_problem[p]],
                                       [True] * sum(len(entropies_by_problem[p]) for p in problems))
    rng = random.Random(seed)
    medians = []
    for _ in range(draws):
        rows = [h for p in rng.sample(problems, subset) for h in entropies_by_problem[p]]
        medians.append(median_teacher_entropy(rows, [True] * len(rows))[0])
    mean = statistics.fmean(medians)
    std = statistics.pstdev(medians)
    return {"problems": len(problems), "subset": subset, "draws": draws, "pooled_median": pooled,
            "mean": mean, "std": std, "cv": std / mean if mean else None,
            "frac_below_down": sum(m < down * pooled for m in medians) / draws, "down": down}
