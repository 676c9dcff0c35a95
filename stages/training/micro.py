"""What one rank runs in one optimizer step: its share of the step's rows, cut into micro-batches (one backward
each), each made of forward pieces.

With `share_prefix` the rows of one prompt form a unit whose prompt runs once (`stages.lm.shared_prefix`): units are
dealt to ranks by the positions they compute and packed into micro-batches of at most `budget` positions, a unit
larger than the budget cut into pieces. Without it, rows are dealt and packed one by one as full sequences. Either
way the rows of a micro-batch are listed in the order its pieces return their log-probs (`stages.lm.forward`, the
forward score runs too). No model here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from stages.lm.forward import FullSequences
from stages.lm.logprobs import pack_by_tokens
from stages.lm.shared_prefix import SharedPrefix, share, split
from stages.training.distributed import split_by_tokens


@dataclass(frozen=True)
class MicroBatch:
    """Rows (batch indices, in the order the pieces yield them) and the forward pieces that compute them."""

    rows: list[int]
    pieces: list  # SharedPrefix | FullSequences


def _units(prompts: Sequence[Sequence[int]], rows: list[int]) -> list[list[int]]:
    """`rows` grouped by identical prompt, groups in order of first appearance, rows ascending within a group."""
    groups: dict[tuple, list[int]] = {}
    for row in sorted(rows):
        groups.setdefault(tuple(prompts[row]), []).append(row)
    return list(groups.values())


def rank_micro_batches(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], rows: list[int],
                       world_size: int, rank: int, budget: int, share_prefix: bool) -> list[MicroBatch]:
    """This rank's micro-batches of the optimizer step over `rows` (rows with an empty response are left out)."""
    if not share_prefix:
        totals = [len(prompts[i]) + len(responses[i]) for i in rows]
        mine = sorted(rows[j] for j in split_by_tokens(totals, world_size)[rank] if responses[rows[j]])
        packed = pack_by_tokens([len(prompts[i]) + len(responses[i]) for i in mine], budget)
        return [MicroBatch(rows=[mine[p] for p in batch],
                           pieces=[FullSequences([prompts[mine[p]] + responses[mine[p]] for p in batch],
                                                 [len(prompts[mine[p]]) for p in batch])]) for batch in packed]
    pieces: list[tuple[list[int], SharedPrefix]] = []  # (rows, piece), every unit cut to the budget
    for unit_rows in _units(prompts, [i for i in rows if responses[i]]):
        unit = share([prompts[i] for i in unit_rows], [responses[i] for i in unit_rows])
        start = 0
        for piece in split(unit, budget):
            pieces.append((unit_rows[start:start + len(piece)], piece))
            start += len(piece)
    mine = [pieces[j] for j in sorted(split_by_tokens([p.tokens for _, p in pieces], world_size)[rank])]
    return [MicroBatch(rows=[i for k in batch for i in mine[k][0]], pieces=[mine[k][1] for k in batch])
            for batch in pack_summed([p.tokens for _, p in mine], budget)]


def pack_summed(costs: Sequence[int], budget: int) -> list[list[int]]:
    """Positions into `costs` in order, a batch growing while its summed cost stays ≤ `budget` (≥ 1 item each):
    pieces run one after the other, so their costs add (unlike padded rows, whose cost is count × longest)."""
    batches: list[list[int]] = []
    total = 0
    for index, cost in enumerate(costs):
        if batches and total + cost <= budget:
            batches[-1].append(index)
            total += cost
        else:
            batches.append([index])
            total = cost
    return batches
