"""What an update step trains on besides the model: the sequence advantages (METHOD §2, with DAPO's overlong shaping),
λ from the gate of the run's variant (the entropy gate of §5, or the perplexity gate and λ_i of §9), the per-token
advantage parts, and the `--advantages-out` table of them.

The trainer and `antisd update --no-train` both call these, so a dry run shows exactly the numbers a step would
train on. Pure given a Batch, a resolved UpdateConfig and a gate (whose state the step advances); no model, no
loss, no files (`stages.update` writes the table).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import torch

import schemas
from stages.common import metrics as keys
from stages.method.advantages import TokenAdvantageParts, group_advantages, overlong_penalty, shaped_token_advantages
from stages.method.gate import EntropyGate
from stages.method.perplexity import KIND as PERPLEXITY_KIND
from stages.method.perplexity import PerplexityGate, perplexity_lambdas
from stages.method.shaping import response_u_std
from stages.method.terms import get_term
from stages.training.batch import Batch, mean_or_none, pad_rows, teacher_rows
from stages.training.config import UpdateConfig, gated

log = logging.getLogger(__name__)


# --- the gate of the variant -------------------------------------------------------------------------------------

def make_gate(config: UpdateConfig) -> EntropyGate | PerplexityGate:
    """A fresh gate for `config` (resolved): the entropy gate of METHOD §5 or the perplexity gate of §9."""
    if config.gate_statistic == "entropy":
        return EntropyGate(config.warmup_steps, config.gate_down, config.lam_max, gated(config))
    return PerplexityGate(config.warmup_steps, config.ppl_target_ratio, config.ppl_target_offset,
                          config.ppl_target_floor, config.ppl_reactivate_ratio, config.ppl_spike, gated(config))


def gate_kind(gate_state: dict) -> str:
    """`entropy` or `perplexity`: the kind of gate a run state holds (states before §9 hold the entropy gate)."""
    return gate_state.get("kind", "entropy")


def load_gate(gate: EntropyGate | PerplexityGate, gate_state: dict) -> bool:
    """Continue `gate` from a run state's gate; False (nothing loaded: the gate calibrates afresh) when the state
    holds the other kind of gate (a run switched variant). Other settings than the state's: a warning, ours win."""
    mine = PERPLEXITY_KIND if isinstance(gate, PerplexityGate) else "entropy"
    if gate_kind(gate_state) != mine:
        log.warning("the run state holds the %s gate, this step runs the %s gate: it calibrates afresh",
                    gate_kind(gate_state), mine)
        return False
    if isinstance(gate, EntropyGate):
        saved = {k: gate_state.get(k) for k in ("warmup_steps", "down", "lam_max", "gated")}
        current = {k: getattr(gate, k) for k in saved}
    else:
        current = gate.hyper_parameters()
        saved = {k: gate_state.get(k) for k in current}
    if saved != current:
        log.warning("gate settings differ from the run state's %s; using %s", saved, current)
    gate.load_state_dict(gate_state, strict=False)
    return True


# --- one step's advantages and λ ----------------------------------------------------------------------------------

def sequence_advantages(config: UpdateConfig, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A_seq_i of every row (METHOD §2; Dr.GRPO without the std with adv_scale none), after the overlong shaping
    of the rewards when it is on; returns ([N] float32, the shaping [N] or None)."""
    rewards, shaping = torch.tensor(batch.rewards, dtype=torch.float64), None
    if config.overlong_buffer > 0:
        shaping = overlong_penalty([len(r) for r in batch.response_ids], batch.max_new_tokens,
                                   config.overlong_buffer, config.overlong_penalty)  # [N]
        rewards = rewards + shaping
    seq_adv = group_advantages(rewards, batch.group_ids, eps=config.adv_eps, scale=config.adv_scale).float()  # [N]
    return seq_adv, shaping


@dataclass(frozen=True)
class StepLambda:
    """λ of one step: one value for every row (METHOD §5) or λ_i per row (§9), the σ_ref of the adaptive u-clip
    (None: no clip this step), and the gate's metrics."""

    lam: float | torch.Tensor  # float, or [N] float64
    sigma_ref: float | None
    metrics: dict

    def rows(self, rows: list[int]):
        """λ of `rows`: the float, or the [len(rows)] slice."""
        return self.lam if not isinstance(self.lam, torch.Tensor) else self.lam[rows]

    def of_row(self, row: int) -> float:
        return float(self.lam if not isinstance(self.lam, torch.Tensor) else self.lam[row])


def step_lambda(gate: EntropyGate | PerplexityGate, config: UpdateConfig, batch: Batch, median_entropy) -> StepLambda:
    """Advance `gate` by this step and return its λ (0 for a method that reads no u; see StepLambda)."""
    uses_teacher = get_term(config.method).uses_teacher
    teacher = teacher_rows(batch)
    # a warm-up step: the gate calibrates and λ = 0 (the ungated entropy gate of sd calibrates with λ = λ_max)
    warmup = int(gate.calibrating and (gate.gated or not isinstance(gate, EntropyGate))) if uses_teacher else None
    if isinstance(gate, EntropyGate):
        lam = gate.update(median_entropy)
        lam = lam if uses_teacher else 0.0  # report the λ that acted
        return StepLambda(lam, None, {
            keys.GATE_OPEN: int(gate.open), keys.GATE_WARMUP: warmup, keys.GATE_LAMBDA: lam,
            keys.GATE_H_WARM: gate.h_warm,
            keys.GATE_LAMBDA_MAX: lam, keys.GATE_LAMBDA_ACTIVE_FRAC: float(lam > 0) if any(teacher) else None,
            **dict.fromkeys((keys.GATE_STATISTIC, keys.GATE_TARGET, keys.GATE_REACTIVATE, keys.GATE_PPL_M,
                             keys.GATE_SIGMA_REF, keys.GATE_PPL_SPIKE_FRAC))})
    ppl = [p if t and p is not None else None for p, t in zip(batch.teacher_ppl, teacher)]
    stds = []
    if gate.calibrating:
        rows = [i for i, t in enumerate(teacher) if t]
        if rows:
            pmi = pad_rows([batch.pmi[i] for i in rows], max(len(batch.pmi[i]) for i in rows))  # [R, T]
            lengths = torch.tensor([len(batch.pmi[i]) for i in rows])
            stds = response_u_std(pmi, torch.arange(pmi.shape[1])[None, :] < lengths[:, None]).tolist()
    acting = gate.update(stds, [p for p in ppl if p is not None])
    tppl = torch.tensor([float("nan") if p is None else p for p in ppl], dtype=torch.float64)  # [N]
    if not uses_teacher or not acting:
        lam = torch.zeros_like(tppl)
    elif config.lam_mode == "batch":
        lam = torch.where(torch.tensor(teacher), config.lam_max, 0.0).to(torch.float64)
    else:
        lam = perplexity_lambdas(tppl, gate.target, config.lam_scale, config.ppl_ratio_max, config.lam_max,
                                 config.ppl_spike)
    on_teacher = lam[torch.tensor(teacher, dtype=torch.bool)] if any(teacher) else None
    if on_teacher is None and not uses_teacher:
        on_teacher = torch.zeros(1, dtype=torch.float64)  # grpo: report the λ that acted, 0
    measured = [p for p in ppl if p is not None]
    return StepLambda(lam, gate.sigma_ref if config.u_clip == "adaptive" else None, {
        keys.GATE_OPEN: int(acting), keys.GATE_WARMUP: warmup, keys.GATE_H_WARM: None,
        keys.GATE_LAMBDA: float(on_teacher.mean()) if on_teacher is not None else None,
        keys.GATE_LAMBDA_MAX: float(on_teacher.max()) if on_teacher is not None else None,
        keys.GATE_LAMBDA_ACTIVE_FRAC: float((on_teacher > 0).double().mean()) if on_teacher is not None else None,
        keys.GATE_STATISTIC: gate.last_statistic, keys.GATE_TARGET: gate.target,
        keys.GATE_REACTIVATE: gate.reactivate, keys.GATE_PPL_M: gate.ppl_m, keys.GATE_SIGMA_REF: gate.sigma_ref,
        keys.GATE_PPL_SPIKE_FRAC: mean_or_none([float(p > config.ppl_spike) for p in measured])})


def step_signals(gate: EntropyGate | PerplexityGate, config: UpdateConfig, batch: Batch
                 ) -> tuple[dict, StepLambda, torch.Tensor, torch.Tensor | None, list[int]]:
    """Advance `gate` by this step: (the data's metrics, λ, sequence advantages [N], the overlong shaping or None,
    the rows that carry a loss: all but truncated ones with overlong_filter)."""
    from stages.training.batch import batch_metrics

    data_metrics = batch_metrics(batch)
    lam = step_lambda(gate, config, batch, data_metrics[keys.TEACHER_ENTROPY_MEDIAN])
    seq_adv, shaping = sequence_advantages(config, batch)  # [N]
    trained = [i for i in range(len(batch)) if not (config.overlong_filter and batch.finish_reason[i] == "length")]
    return data_metrics, lam, seq_adv, shaping, trained


def advantage_parts(config: UpdateConfig, seq_adv: torch.Tensor, pmi: torch.Tensor, mask: torch.Tensor, lam,
                    sigma_ref: float | None) -> TokenAdvantageParts:
    """The per-token parts of A_{i,t} for padded rows [B, T] with the config's shaping (METHOD §2 / §9)."""
    return shaped_token_advantages(
        config.method, seq_adv, pmi, mask, lam, variant=config.variant, sigma_ref=sigma_ref,
        u_clip_k=config.u_clip_k, u_clamp=config.u_clamp, term_norm=config.term_norm,
        norm_clamp=config.term_norm_clamp, length_mask_tokens=config.length_mask)


def has_learning_signal(config: UpdateConfig, batch: Batch, seq_adv: torch.Tensor, lam: StepLambda,
                        trained: list[int]) -> bool:
    """Whether the step has a gradient to follow: some trained token's A_{i,t} ≠ 0 (METHOD §2), or a KL term to the
    reference (β > 0 with ref_logprobs). Without either, the PPO-clip loss −min(ρ·A, clip(ρ)·A) is 0 for every token
    and so is its gradient, exactly: every group's rewards equal (A_seq = 0) and λ = 0 (warm-up, closed gate, grpo)."""
    if config.kl_coef > 0 and batch.ref_logprobs is not None:
        return True
    lengths = [len(batch.response_ids[i]) for i in trained]
    if not trained or not any(lengths):
        return False
    width = max(lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # [R, T]
    pmi = pad_rows([batch.pmi[i] for i in trained], width)  # [R, T]
    parts = advantage_parts(config, seq_adv[trained], pmi, mask, lam.rows(trained), lam.sigma_ref)
    return bool((parts.advantages[mask] != 0).any())


# --- the --advantages-out table -----------------------------------------------------------------------------------

def advantages_table(config: UpdateConfig, batch: Batch, seq_adv: torch.Tensor, lam: StepLambda,
                     trained: list[int]) -> pa.Table:
    """One row per response (schemas.ADVANTAGES): its sequence advantage, λ_i, tppl_i and the per-token u, term
    before and after normalisation and final advantage, computed over the whole step at once (the trainer computes
    the same function per micro-batch: equal to float rounding of the elementwise term, ≤ 1 ulp)."""
    lengths = [len(r) for r in batch.response_ids]
    width = max(lengths + [1])
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # [N, T]
    pmi = pad_rows(batch.pmi, width)  # [N, T]
    parts = advantage_parts(config, seq_adv, pmi, mask, lam.lam, lam.sigma_ref)

    def lists(values: torch.Tensor) -> list[list[float]]:
        return [values[i, : lengths[i]].tolist() for i in range(len(lengths))]

    trained_rows = set(trained)
    columns = {
        "prompt_id": batch.group_ids, "sample_idx": [int(n.rsplit("/", 1)[1]) for n in batch.names],
        "reward": batch.rewards, "privileged_source": batch.privileged_source,
        "trained": [i in trained_rows for i in range(len(batch))], "seq_advantage": seq_adv.tolist(),
        "lam": [lam.of_row(i) for i in range(len(batch))], "teacher_ppl": batch.teacher_ppl,
        "response_token_ids": batch.response_ids, "u": lists(parts.u), "term": lists(parts.term),
        "term_normalized": lists(parts.normalized), "advantage": lists(parts.advantages),
    }
    return pa.Table.from_pydict(columns, schema=schemas.ADVANTAGES)
