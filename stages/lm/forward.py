"""The one forward that `score` (no grad: the old policy, teacher and reference views) and the trainer (with grad: the
new policy) both run, so that s_t and the trainer's first log-probs agree by construction (METHOD §1, §3).

A forward *piece* is either a `SharedPrefix` (a group's prompt run once, its KV cache repeated over the suffixes:
`stages.lm.shared_prefix`) or `FullSequences` (right-padded whole sequences: `stages.lm.logprobs`). `Numerics` holds
what decides the numbers beyond the weights: temperature, pad id, positions per LM-head chunk, the fp32 LM head.
`chunk_positions` picks the chunk size by device when the option is None (auto): 64 on CPU (what every CPU result so
far used), on CUDA as many positions as fit a memory budget for the fp32 [chunk, vocab] logits and their temporaries
(verl chunks its log-probs similarly; 64-position chunks re-read a 0.78 GB LM head ~130 times per 8k-token response).

Not here: which rows form a piece (`stages.lm.scoring` for score, `stages.training.micro` for the trainer), gradients
and losses (`stages.training.trainer`). With ZeRO-3 every module call is a collective, so ranks must make the same
number of calls: the trainer refuses ZeRO-3 on more than one rank (`stages.training.batch.check_zero3_ranks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.lm.logprobs import response_token_stats
from stages.lm.shared_prefix import SharedPrefix, shared_prefix_token_stats

CPU_CHUNK = 64  # positions per LM-head chunk on CPU (bench/score.py: 1.00× a bare forward, +19 MiB)
LOGITS_BUDGET_BYTES = 4 * 2**30  # CUDA: fp32 logits + softmax + product, 3 × 4 bytes per position and vocabulary entry
LOGITS_TEMPORARIES = 3
MAX_CHUNK = 4096


@dataclass(frozen=True)
class FullSequences:
    """A forward piece of whole sequences (prompt + response), right-padded: the unshared path."""

    sequences: list[list[int]]
    response_starts: list[int]

    @property
    def tokens(self) -> int:
        return len(self.sequences) * max(len(s) for s in self.sequences)


@dataclass(frozen=True)
class Numerics:
    """What fixes the per-token numbers of a forward besides the weights."""

    pad_id: int = 0
    temperature: float = 1.0
    chunk_size: int = CPU_CHUNK  # positions per LM-head chunk (resolved: `chunk_positions`)
    with_entropy: bool = True
    lm_head_fp32: bool = True  # a 16-bit head multiplies in fp32 (stages.lm.logprobs.fp32_head)

    def kwargs(self) -> dict:
        return dict(pad_id=self.pad_id, temperature=self.temperature, chunk_size=self.chunk_size,
                    with_entropy=self.with_entropy, lm_head_fp32=self.lm_head_fp32)


def chunk_positions(option: int | None, device: str, vocab_size: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """Positions per LM-head chunk: `option` when set; auto (None): CPU_CHUNK on CPU, on CUDA the largest power of
    two whose fp32 logits and temporaries (LOGITS_TEMPORARIES × 4 bytes × vocab per position) fit `budget_bytes`
    (Qwen3, vocab 151,936: 2,048 positions in 4 GiB), between CPU_CHUNK and MAX_CHUNK."""
    if option is not None:
        return option
    if not str(device).startswith("cuda"):
        return CPU_CHUNK
    fits = max(1, budget_bytes // (LOGITS_TEMPORARIES * 4 * vocab_size))
    return max(CPU_CHUNK, min(MAX_CHUNK, 1 << (fits.bit_length() - 1)))


def piece_token_stats(model, piece, numerics: Numerics) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Log-probs and entropies of every response token of `piece`: two lists of 1-D float32 [T_i], in its order."""
    if isinstance(piece, SharedPrefix):
        return shared_prefix_token_stats(model, piece, **numerics.kwargs())
    return response_token_stats(model, piece.sequences, piece.response_starts, **numerics.kwargs())


def pieces_logprobs(model, pieces: list, numerics: Numerics) -> torch.Tensor:
    """The response-token log-probs of `pieces` concatenated in order: [Σ T_i] (the trainer's forward)."""
    logprobs: list[torch.Tensor] = []
    for piece in pieces:
        logprobs += piece_token_stats(model, piece, numerics)[0]
    return torch.cat(logprobs)
