"""Hugging Face engine for `rollout`: batched sampling with a KV cache, per-token sampling log-probs, and rows that
leave the batch when they stop.

How it samples: prompts × n samples are laid out as rows, sorted by prompt length (longest first) and cut into
batches of whole groups (`batch_size` // n prompts: `stages.lm.engine.prompt_batches`, which the ranks of a loop
deal out, so N ranks compute the batches of one), left-padded, prefilled (each distinct prompt once, its cache
repeated over its rows), then decoded one token per step under `torch.inference_mode` by our own loop over the
model's forward (not `model.generate`). At each step the logits go through temperature and top-p
(`processed_scores`), each row draws its token with its own seeded generator (`sample_tokens`) and records its
log-probability under the processed distribution. This is why:
- a row that emits EOS leaves the batch and the KV cache at once, so a batch costs the tokens it samples, not
  rows × the longest response (with `generate`, one long sample kept all 64 rows decoding to max_new_tokens);
- owning the processing avoids `generation_config` defaults such as top_k=50 and transformers' own warpers;
- every row has its own `torch.Generator` seeded from (seed, prompt_id, sample_idx), so a sample does not depend
  on which other rows share its batch, on `--batch-size` or on `--shard` (up to floating-point differences of
  padded batches, which can flip a draw that sits on a probability boundary);
- no [steps × batch × vocab] score tensor is kept (`output_scores` would hold 1.6 GB for 64 rows × 128 tokens).

Temperature 0 is greedy decoding; its log-probs are then those of the unscaled model (temperature 1). Generation of a
row stops at the first id of the model's `generation_config.eos_token_id`; that EOS id is kept as the last response
token (finish_reason "stop") because the trainer must learn to stop. This module does no file I/O.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from stages.lm.compat import cache_kwargs, output_cache
from stages.lm.engine import Completion, Engine, SamplingSettings, prompt_batches, sample_seed


def processed_scores(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Scores of the sampling distribution: logits / T, then top-p (nucleus) masking to −inf. [B, V] → [B, V].

    temperature 0 means greedy and leaves the logits unscaled. The top-p rule is transformers' TopPLogitsWarper:
    drop the lowest-probability tokens whose cumulative mass is ≤ 1 − top_p, always keeping the top token.
    """
    scores = logits.float()
    if temperature > 0 and temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        sorted_scores, sorted_index = torch.sort(scores, descending=False)  # [B, V]
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(1, sorted_index, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def sample_tokens(
    scores: torch.Tensor, generators: Sequence[torch.Generator] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of `scores` [B, V]; return (token ids [B], their log-probs [B]).

    Sampling is the exponential race argmax_v p_v / q_v with q_v ~ Exp(1) drawn from the row's generator (an exact
    draw from p, as vLLM does). `generators=None` means greedy: argmax of the scores.
    """
    log_probs = torch.log_softmax(scores, dim=-1)  # [B, V]
    if generators is None:
        tokens = scores.argmax(dim=-1)
    else:
        noise = torch.stack(
            [torch.empty(scores.shape[-1], device=scores.device).exponential_(generator=g) for g in generators]
        )  # [B, V]
        tokens = (log_probs.exp() / noise).argmax(dim=-1)
    return tokens, log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def cut_response(tokens: list[int], eos_ids: set[int], max_new_tokens: int) -> tuple[list[int], str]:
    """Response ids up to and including the first EOS ("stop"), else the first max_new_tokens ids ("length")."""
    for position, token in enumerate(tokens[:max_new_tokens]):
        if token in eos_ids:
            return tokens[: position + 1], "stop"
    return tokens[:max_new_tokens], "length"


def eos_token_ids(model, tokenizer) -> set[int]:
    """Stop ids: the model's generation_config.eos_token_id (int or list), else the tokenizer's EOS."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        raise RuntimeError("the model defines no EOS token id; cannot stop generation")
    return {int(i) for i in (configured if isinstance(configured, (list, tuple)) else [configured])}


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows [B, L]: 0 at each row's first real token (pads get 1, as in `generate`)."""
    positions = attention_mask.cumsum(-1) - 1
    return positions.masked_fill_(attention_mask == 0, 1)


def row_batches(prompt_ids: list[list[int]], n: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """(prompt index, sample index) rows in batches of whole groups (`stages.lm.engine.prompt_batches`: longest prompt
    first, max(1, batch_size // n) prompts each); a prompt's samples stay adjacent and in one batch."""
    return [[(p, j) for p in batch for j in range(n)]
            for batch in prompt_batches([len(ids) for ids in prompt_ids], n, batch_size)]


class HFEngine(Engine):
    """Sampling by our decode loop over an already-loaded `stages.lm.models.LoadedModel`."""

    name = "hf"
    default_batch_size = 64  # rows per batch; stopped rows leave it, so a larger batch wastes no steps (bench: 64
    #   rows × ≤ 128 tokens took 16 s in one batch, 21 s in two of 32)

    def __init__(self, loaded, share_prefill: bool = True):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_path = loaded.path
        self.revision = loaded.revision
        self.dtype_name = str(loaded.dtype).replace("torch.", "")
        self.device = str(loaded.device)
        self.eos_ids = eos_token_ids(loaded.model, loaded.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.share_prefill = share_prefill  # compute a repeated prompt once per batch (the group's n samples)

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [B, L]
        for row, seq in enumerate(sequences):
            input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq):] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def _shared_prefill(self, sequences: list[list[int]]):
        """The KV cache of every row's prompt but its last token, each distinct prompt computed once and the cache
        repeated over its rows (decoding then starts from the last prompt token); None when no prompt repeats.

        Rows are left-padded to the batch's longest prompt, with position ids from the attention mask, so the cache is
        the one a prefill of all rows would have built.
        """
        first: dict[tuple, int] = {}
        rows = [first.setdefault(tuple(seq), len(first)) for seq in sequences]
        if len(first) == len(sequences):
            return None
        unique = [list(seq) for seq in first]
        input_ids, attention_mask = self._left_pad(unique)  # [U, L]: the longest prompt is among them
        positions = padded_positions(attention_mask)
        body = getattr(self.loaded.model, self.loaded.model.base_model_prefix)
        cache = output_cache(body(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                                  position_ids=positions[:, :-1], use_cache=True))
        cache.batch_select_indices(torch.tensor(rows, device=input_ids.device))
        return cache

    def generate_batch(self, sequences: list[list[int]], seeds: list[int] | None, settings: SamplingSettings,
                       on_tokens: Callable[[int], None] | None = None):
        """Prefill `sequences` and decode until every row stops; returns [(response ids, log-probs, reason)] per row.
        `on_tokens(k)` after each decode step that sampled k tokens (the progress of a long batch)."""
        generators = None
        if seeds is not None:
            generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        input_ids, attention_mask = self._left_pad(sequences)  # [B, L]
        positions = padded_positions(attention_mask)
        responses: list[list[int]] = [[] for _ in sequences]
        logprobs: list[list[float]] = [[] for _ in sequences]
        with torch.inference_mode():
            cache = self._shared_prefill(sequences) if self.share_prefill else None
            if cache is not None:  # the prompts but their last token are in the cache
                input_ids, positions = input_ids[:, -1:], positions[:, -1:]
            active = list(range(len(sequences)))  # batch row → index into `sequences`
            for step in range(settings.max_new_tokens):
                output = self.loaded.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                           **cache_kwargs(self.loaded.model, cache), use_cache=True, logits_to_keep=1)
                cache = output_cache(output)
                scores = processed_scores(output.logits[:, -1], settings.temperature, settings.top_p)  # [B, V]
                row_generators = None if generators is None else [generators[row] for row in active]
                tokens, token_logprobs = sample_tokens(scores, row_generators)
                keep = []
                for i, (row, token, logprob) in enumerate(zip(active, tokens.tolist(), token_logprobs.tolist())):
                    responses[row].append(token)
                    logprobs[row].append(logprob)
                    if token not in self.eos_ids:
                        keep.append(i)
                if on_tokens is not None:
                    on_tokens(len(active))
                if not keep or step == settings.max_new_tokens - 1:
                    break
                if len(keep) < len(active):  # rows that stopped leave the batch and the cache
                    index = torch.tensor(keep, device=tokens.device)
                    cache.batch_select_indices(index)
                    tokens, attention_mask = tokens[index], attention_mask[index]
                    active = [active[i] for i in keep]
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=1)
                input_ids = tokens.unsqueeze(-1)  # [B, 1]
                positions = attention_mask.sum(-1, keepdim=True) - 1
        results = []
        for ids, row_logprobs in zip(responses, logprobs):
            ids, reason = cut_response(ids, self.eos_ids, settings.max_new_tokens)
            results.append(Completion(ids, row_logprobs[: len(ids)], reason))
        return results

    def generate(
        self,
        prompt_ids: list[list[int]],
        prompt_keys: list[str],
        settings: SamplingSettings,
        batch_size: int = 0,
        on_progress: Callable[[list[int], int], None] | None = None,
    ) -> list[list[Completion]]:
        """n completions per prompt, in sample order; `on_progress(prompt indices of finished rows, tokens)`, the
        tokens as each decode step samples them (a batch of long responses runs for minutes: its log must move)."""
        on_tokens = None if on_progress is None else (lambda tokens: on_progress([], tokens))
        results: list[list[Completion | None]] = [[None] * settings.n for _ in prompt_ids]
        for batch in row_batches(prompt_ids, settings.n, batch_size or self.default_batch_size):
            seeds = None
            if settings.temperature > 0:
                seeds = [sample_seed(settings.seed, prompt_keys[p], j) for p, j in batch]
            completions = self.generate_batch([prompt_ids[p] for p, _ in batch], seeds, settings, on_tokens)
            for (p, j), completion in zip(batch, completions):
                results[p][j] = completion
            if on_progress is not None:
                on_progress([p for p, _ in batch], 0)  # its tokens were counted as they were sampled
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Nothing to release: the LoadedModel belongs to the caller."""
