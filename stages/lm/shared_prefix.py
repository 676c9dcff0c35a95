"""Sequences that share a prefix (a group's prompt, or the common head of its teacher prompts) computed with the
prefix run once: its KV cache is repeated over the group and only the suffixes run through the network.

A `SharedPrefix` holds one prefix and the suffixes that follow it; each sequence's response is its suffix from
`response_starts[i]` on (0: the response follows the prefix directly, its first token predicted by the prefix's last
position). `shared_prefix_token_stats` gives the same per-token log-probs and entropies as
`stages.lm.logprobs.response_token_stats` on the full sequences (to float rounding: other matmul shapes), with
gradient through the repeated cache into the prefix pass when grad mode is on. Positions continue from the prefix
length; suffixes are right-padded, which leaves every real token's attention exact under the causal mask. Suffixes of
very different lengths run in separate passes over the same prefix cache (`length_buckets`: longest first, a new
pass when a suffix is under 3/4 of its pass's longest), so one long response does not pad all the others to it.

Not with gradient checkpointing: transformers drops the cache of checkpointed layers, so a caller that trains with
it uses the unshared path. This module decides nothing about what to group: callers pass the units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from stages.lm.compat import cache_kwargs, output_cache
from stages.lm.logprobs import stats_of_positions


@dataclass(frozen=True)
class SharedPrefix:
    """Sequences prefix + suffixes[i]; the response of sequence i is suffixes[i][response_starts[i]:]."""

    prefix: list[int]
    suffixes: list[list[int]]
    response_starts: list[int]

    def __len__(self) -> int:
        return len(self.suffixes)

    @property
    def tokens(self) -> int:
        """Positions the forward over this unit computes: the prefix once, each pass's suffixes padded to the
        pass's longest."""
        lengths = [len(s) for s in self.suffixes]
        return len(self.prefix) + sum(len(rows) * lengths[rows[0]] for rows in length_buckets(lengths))


BUCKET_FILL = 0.75  # a suffix shorter than this fraction of its pass's longest starts a new pass


def length_buckets(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of `lengths` grouped into passes, longest first; a pass ends before the first length under
    BUCKET_FILL × its longest (padding a pass wastes at most a quarter of each of its rows)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets and lengths[i] >= BUCKET_FILL * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of `sequences`."""
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for other in sequences[1:]:
        k = 0
        while k < length and other[k] == first[k]:
            k += 1
        length = k
    return length


def share(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> SharedPrefix:
    """The unit of sequences prompts[i] + responses[i] with their common prompt prefix shared (≥ 1 token kept in
    the prefix; the response never enters it)."""
    length = common_prefix_length(prompts)
    if length < 1:
        raise ValueError("sequences to share a prefix must have a common first token")
    prefix = list(prompts[0][:length])
    suffixes = [list(p[length:]) + list(r) for p, r in zip(prompts, responses)]
    return SharedPrefix(prefix, suffixes, [len(p) - length for p in prompts])


def split(unit: SharedPrefix, budget: int) -> list[SharedPrefix]:
    """`unit` cut into consecutive pieces whose `tokens` fit `budget` (at least one sequence each)."""
    pieces, start = [], 0
    while start < len(unit):
        end = start + 1
        while end < len(unit) and SharedPrefix(unit.prefix, unit.suffixes[start:end + 1], []).tokens <= budget:
            end += 1
        pieces.append(SharedPrefix(unit.prefix, unit.suffixes[start:end], unit.response_starts[start:end]))
        start = end
    return pieces


def shared_prefix_token_stats(model, unit: SharedPrefix, *, pad_id: int = 0, temperature: float = 1.0,
                              chunk_size: int = 64, with_entropy: bool = True, lm_head_fp32: bool = True
                              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Log π(y_k | ·) and H_k of every response token of every sequence of `unit`: two lists of 1-D float32 [T_i]."""
    device = next(model.parameters()).device
    body = getattr(model, model.base_model_prefix)
    prefix_ids = torch.tensor([unit.prefix], dtype=torch.long, device=device)  # [1, p]
    prefix_out = body(input_ids=prefix_ids, use_cache=True)
    prefix_hidden = prefix_out.last_hidden_state[0]  # [p, H]
    cache = output_cache(prefix_out)
    count, p = len(unit), len(unit.prefix)
    if max(len(s) for s in unit.suffixes) == 0:  # every response empty and the prompts all prefix: nothing to predict
        empty = prefix_hidden.new_zeros(0)
        return [empty] * count, [empty] * count
    buckets = length_buckets([len(suffix) for suffix in unit.suffixes])
    prefix_kv = [(layer.keys, layer.values) for layer in cache.layers] if len(buckets) > 1 else None
    rows_hidden: list[torch.Tensor | None] = [None] * count
    for rows in buckets:
        if prefix_kv is None:  # one pass: the prefix's own cache, repeated
            cache.batch_repeat_interleave(count)
            pass_cache = cache
        else:  # a fresh cache per pass from the prefix's keys and values (the gradient reaches the prefix through each)
            from transformers import DynamicCache

            repeated = [(k.repeat_interleave(len(rows), 0), v.repeat_interleave(len(rows), 0)) for k, v in prefix_kv]
            pass_cache = DynamicCache(ddp_cache_data=repeated, config=model.config)
        width = len(unit.suffixes[rows[0]])
        if width == 0:
            for row in rows:
                rows_hidden[row] = prefix_hidden.new_zeros((0, prefix_hidden.shape[-1]))
            continue
        suffix_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)  # [k, W]
        for i, row in enumerate(rows):
            suffix_ids[i, : len(unit.suffixes[row])] = torch.tensor(unit.suffixes[row], dtype=torch.long)
        positions = torch.arange(p, p + width, device=device).expand(len(rows), width)  # [k, W]
        attention = torch.ones((len(rows), p + width), dtype=torch.long, device=device)  # [k, p + W]
        hidden = body(input_ids=suffix_ids, attention_mask=attention, position_ids=positions,
                      **cache_kwargs(body, pass_cache), use_cache=True).last_hidden_state  # [k, W, H]
        for i, row in enumerate(rows):
            rows_hidden[row] = hidden[i]
    # The predictor of suffix position j is suffix position j − 1, or the prefix's last position for j = 0.
    predictors, targets, lengths = [], [], []
    for row, (suffix, start) in enumerate(zip(unit.suffixes, unit.response_starts)):
        length = len(suffix) - start
        if length and start == 0:
            predictors.append(prefix_hidden[p - 1 : p])
        if length:
            predictors.append(rows_hidden[row][max(start - 1, 0) : len(suffix) - 1])
        targets.extend(suffix[start:])
        lengths.append(length)
    flat_hidden = torch.cat(predictors) if predictors else prefix_hidden.new_zeros((0, prefix_hidden.shape[-1]))
    target_ids = torch.tensor(targets, dtype=torch.long, device=device)  # [N]
    return stats_of_positions(model, flat_hidden, target_ids, lengths, temperature=temperature,
                              chunk_size=chunk_size, with_entropy=with_entropy, lm_head_fp32=lm_head_fp32)
