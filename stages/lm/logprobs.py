"""Per-response-token log-probs and full-vocabulary entropies from a causal LM, without [tokens × vocab] logits.

Shared by `score` (no grad: student and teacher views) and `update` (with grad: the new policy), so the trainer and
the scorer use one set of numerics. The network body runs once per micro-batch; the LM head, log-softmax and entropy
then run over chunks of response positions, so the float32 [B, T, V] tensor is never materialized. With grad
enabled, each chunk is checkpointed: only hidden states are kept for backward.

Alignment: response token k of sequence i sits at index start_i + k; it is predicted by the hidden state at
start_i + k − 1. Responses are aligned by index in the response, never by absolute position (METHOD §1).

Logits: the body's hidden states go through the LM head and then through what the model's own `forward` does to
its logits, for the families known to do something (`output_logits`: Gemma-2/3-style final soft-capping, Cohere's
logit scale, Granite's logits scaling). Any other family could post-process in its `forward` unseen, so every model
loaded for scoring or training is checked once against `model(...).logits` on a probe (`check_logits_path`), and
refused when the two disagree.
Micro-batches: `pack_by_tokens` is the one packing rule (score's views and the trainer's rows); callers pass what
it packs.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def fp32_head(model, enabled: bool = True):
    """(weight, bias) of the LM head as float32 copies, made once per forward so that every chunk multiplies in fp32
    and autograd sums the chunks' gradients of the (tied) head in fp32, cast back to the weight's dtype once; None
    when not `enabled`, when the head is already fp32 (CPU: the module itself runs, bit for bit as before), or when
    its weight is partitioned (ZeRO-3: only the module call gathers it)."""
    head = model.get_output_embeddings()
    weight = head.weight
    if not enabled or weight.dtype == torch.float32 or weight.numel() == 0 or hasattr(weight, "ds_id"):
        return None
    bias = getattr(head, "bias", None)
    return weight.float(), (bias.float() if bias is not None else None)


def output_logits(model, hidden: torch.Tensor, head=None) -> torch.Tensor:
    """The model's output logits for hidden states [N, H] → [N, V] float32: the LM head (in fp32 from `head`, a
    `fp32_head` pair, when given), then the family's own post-processing as its `forward` applies it (scale, then
    soft-cap)."""
    if head is not None:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            logits = F.linear(hidden.float(), head[0], head[1])  # [N, V] fp32 matmul
    else:
        logits = model.get_output_embeddings()(hidden)
    config = model.config
    if getattr(model, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        logits = logits * model.logit_scale
    if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
        logits = logits / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:  # Gemma-2/3: cap · tanh(logits / cap)
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def _chunk_stats(hidden: torch.Tensor, targets: torch.Tensor, model, temperature: float, with_entropy: bool,
                 head_weight=None, head_bias=None):
    """Log-prob of `targets` and entropy for one chunk of hidden states [N, H] → ([N], [N])."""
    head = None if head_weight is None else (head_weight, head_bias)
    logits = output_logits(model, hidden, head)  # [N, V]
    if temperature != 1.0:
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)  # [N]
    token_logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm  # [N]
    if not with_entropy:
        return token_logprobs, torch.zeros_like(token_logprobs)
    probs = torch.softmax(logits, dim=-1)  # [N, V]
    entropy = log_norm - (probs * logits).sum(-1)  # H = logZ − E_p[logit]  [N]
    return token_logprobs, entropy


def pack_by_tokens(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Pack sequence positions into micro-batches of at most `budget` padded tokens (count × longest).

    Longest first (ties: the lower position first), a batch grows while (count + 1) × its longest ≤ `budget`; a
    sequence longer than the budget goes alone. Returns positions into `lengths`, deterministically.
    """
    batches: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def pad_batch(sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into input_ids and attention_mask, both [B, L]."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids.to(device), attention_mask.to(device)


def response_token_stats(
    model,
    sequences: list[list[int]],
    response_starts: list[int],
    *,
    pad_id: int = 0,
    temperature: float = 1.0,
    chunk_size: int = 64,
    with_entropy: bool = True,
    lm_head_fp32: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Log π(y_k | prefix) and H_k for every response token of every sequence.

    sequences[i] = prompt ids + response ids; response_starts[i] = len(prompt ids) (≥ 1).
    Returns two lists of 1-D float32 tensors, [T_i] each (T_i = len(sequences[i]) − response_starts[i]).
    Gradient flows into the model iff grad mode is on; entropy is always detached (a logged statistic).
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_batch(sequences, pad_id, device)  # [B, L]
    body = getattr(model, model.base_model_prefix)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
    # Gather the predicting positions of all response tokens into one flat list, then process in chunks.
    rows, cols, lengths = [], [], []
    for row, (seq, start) in enumerate(zip(sequences, response_starts)):
        if start < 1:
            raise ValueError(f"sequence {row}: response must follow at least one prompt token")
        count = len(seq) - start
        rows.append(torch.full((count,), row, dtype=torch.long))
        cols.append(torch.arange(start - 1, len(seq) - 1, dtype=torch.long))
        lengths.append(count)
    rows_t, cols_t = torch.cat(rows).to(device), torch.cat(cols).to(device)  # [N]
    targets = input_ids[rows_t, cols_t + 1]  # [N]
    return stats_of_positions(model, hidden[rows_t, cols_t], targets, lengths, temperature=temperature,
                              chunk_size=chunk_size, with_entropy=with_entropy, lm_head_fp32=lm_head_fp32)


def stats_of_positions(model, flat_hidden: torch.Tensor, targets: torch.Tensor, lengths: list[int], *,
                       temperature: float, chunk_size: int, with_entropy: bool, lm_head_fp32: bool = True
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Log-probs of `targets` [N] and entropies from their predicting hidden states [N, H], in chunks of positions,
    split into the sequences' `lengths` (Σ = N). With grad enabled each chunk is checkpointed (hidden states kept).
    A 16-bit LM head multiplies in fp32 (`fp32_head`, with `lm_head_fp32`): logits, and u = t − s taken from them,
    then carry no bf16 rounding (2^-8 relative: ~0.05 nats at |logit| 10), and the head's gradient sums in fp32."""
    logprob_chunks, entropy_chunks = [], []
    use_checkpoint = torch.is_grad_enabled()
    head = fp32_head(model, lm_head_fp32) or (None, None)
    for begin in range(0, flat_hidden.shape[0], chunk_size):
        piece, piece_targets = flat_hidden[begin : begin + chunk_size], targets[begin : begin + chunk_size]
        if use_checkpoint:
            lp, ent = checkpoint(_chunk_stats, piece, piece_targets, model, temperature, with_entropy, *head,
                                 use_reentrant=False)
        else:
            lp, ent = _chunk_stats(piece, piece_targets, model, temperature, with_entropy, *head)
        logprob_chunks.append(lp)
        entropy_chunks.append(ent.detach())
    flat_logprobs = torch.cat(logprob_chunks) if logprob_chunks else flat_hidden.new_zeros(0)
    flat_entropy = torch.cat(entropy_chunks) if entropy_chunks else flat_hidden.new_zeros(0)
    return list(torch.split(flat_logprobs, lengths)), list(torch.split(flat_entropy, lengths))


def naive_response_token_stats(model, sequences, response_starts, *, pad_id=0, temperature=1.0):
    """Reference implementation through full [B, L, V] logits (tests and the memory benchmark only)."""
    device = next(model.parameters()).device
    input_ids, attention_mask = pad_batch(sequences, pad_id, device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / temperature  # [B, L, V]
    log_probs = F.log_softmax(logits, dim=-1)
    out_lp, out_ent = [], []
    for row, (seq, start) in enumerate(zip(sequences, response_starts)):
        positions = torch.arange(start - 1, len(seq) - 1, device=device)
        lp = log_probs[row, positions]  # [T, V]
        out_lp.append(lp.gather(-1, input_ids[row, positions + 1].unsqueeze(-1)).squeeze(-1))
        out_ent.append(-(lp.exp() * lp).sum(-1))
    return out_lp, out_ent


# Largest |Δ log-prob| tolerated between the chunked path and model(...).logits on the probe. Both run the same body
# and LM head; they differ only in the matmul shapes (gathered rows vs the full sequence), so in float32 they agree
# to ~1e-6 and in 16-bit formats to the rounding of the logits (bf16: 2^-8 relative, ≈ 0.05 nats at |logit| ≈ 10).
# A missed post-processing moves log-probs by the size of the transform itself: a soft-cap or scale changes logits
# by units, not hundredths.
_PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
_PROBE_TOLERANCE_16BIT = 0.25


def check_logits_path(model, label: str) -> None:
    """Refuse (ValueError naming `label`) a model whose `model(...).logits` the chunked path does not reproduce.

    One probe sequence of 16 token ids through both paths, no gradient; the model's train/eval mode is kept.
    """
    parameter = next(model.parameters())
    vocab = model.get_output_embeddings().weight.shape[0]
    sequence = [(7919 * (k + 1)) % vocab for k in range(16)]  # spread over the vocabulary, deterministic
    with torch.no_grad():
        ours, _ = response_token_stats(model, [sequence], [1], with_entropy=False)
        ids = torch.tensor([sequence], device=parameter.device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()  # [1, 16, V]
        reference = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)  # [15]
    both = torch.isfinite(ours[0]) & torch.isfinite(reference)
    if not torch.equal(torch.isfinite(ours[0]), torch.isfinite(reference)):
        gap = math.inf
    else:  # a model broken in both paths alike (NaN weights) is the stages' to report, per row
        gap = float((ours[0] - reference)[both].abs().max()) if bool(both.any()) else 0.0
    tolerance = _PROBE_TOLERANCE.get(parameter.dtype, _PROBE_TOLERANCE_16BIT)
    if not gap <= tolerance:
        raise ValueError(f"{label}: its forward post-processes the logits in a way antisd's log-prob path does not "
                         f"reproduce ({type(model).__name__}: max |Δ log-prob| {gap:.3g} > {tolerance:g} on a probe); "
                         "scores and updates would be wrong, so it is refused")
