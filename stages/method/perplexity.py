"""λ per response from the teacher's perplexity, and the perplexity gate, of the authors' code (METHOD §9).

`teacher_perplexity` is the one definition of tppl_i (score writes it as a column, update reads it);
`perplexity_lambdas` the λ_i controller; `ppl_gate_step` the Schmitt rule; `PerplexityGate` the warm-up calibration
(σ_ref, M, target, reactivate) and the gate state that must survive restarts (its `state_dict()` is plain JSON).

Every rank reads the whole scored file, so every rank calibrates on all of the step's responses and holds the same
values without communication. The authors' code averages per-rank statistics over ranks instead (the mean of
per-rank upper medians for M): ours equals theirs on one rank and does not depend on the number of ranks.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from stages.method.gate import Recalibrating

STATE_VERSION = 1
KIND = "perplexity"  # the run state's gate.kind (the entropy gate of METHOD §5 has none)


def teacher_perplexity(teacher_logprobs: Sequence[float]) -> float | None:
    """tppl_i = exp(−mean_t t_t): the teacher's perplexity of response i  (METHOD §9), in float64 over the stored
    float32 log-probs; None for an empty response."""
    if len(teacher_logprobs) == 0:
        return None
    return math.exp(-math.fsum(float(x) for x in teacher_logprobs) / len(teacher_logprobs))


def upper_median(values: Sequence[float]) -> float:
    """The upper median: sorted(values)[n // 2] (the larger middle value for an even n)  (METHOD §9)."""
    if not values:
        raise ValueError("upper_median of no values")
    return sorted(values)[len(values) // 2]


def ppl_target(m: float, ratio: float, offset: float, floor: float) -> float:
    """target = max(ratio·M − offset, floor)  (METHOD §9: antisd max(0.93·M, 1.01); sd max(M − 0.10, 1.01))."""
    return max(ratio * m - offset, floor)


def perplexity_lambdas(tppl: torch.Tensor, target: float, scale: float, ratio_max: float, lam_max: float,
                       spike: float) -> torch.Tensor:
    """λ_i = clamp(scale · ln(clamp(tppl_i / target, 0.5, ratio_max)), 0, λ_max), and λ_i = 0 where tppl_i > spike
    (the spike mask) or tppl_i is NaN (no teacher view)  (METHOD §9; scale 0.2, ratio_max 3, λ_max 0.5, spike 3).

    So 0 ≤ λ_i ≤ scale·ln(ratio_max) and λ_i = 0 whenever tppl_i ≤ target. The lower clamp 0.5 never binds (its
    logarithm is negative and λ is clamped at 0). tppl: [N] float64. Returns [N] float64.
    """
    ratio = (tppl / target).clamp(0.5, ratio_max)  # [N]
    lam = (scale * torch.log(ratio)).clamp(0.0, lam_max)  # [N]
    keep = torch.isfinite(tppl) & (tppl <= spike)  # [N]
    return torch.where(keep, lam, torch.zeros_like(lam))


def ppl_gate_statistic(tppl: Sequence[float | None], spike: float) -> float | None:
    """The gate's statistic: the mean tppl over the step's responses with tppl < spike (METHOD §9); None if none."""
    pool = [p for p in tppl if p is not None and p < spike]
    return math.fsum(pool) / len(pool) if pool else None


def ppl_gate_step(open_: bool, statistic: float, target: float, reactivate: float) -> bool:
    """Schmitt trigger (METHOD §9): open and statistic < target → closed; closed and statistic > reactivate → open."""
    if open_ and statistic < target:
        return False
    if not open_ and statistic > reactivate:
        return True
    return open_


class PerplexityGate(Recalibrating):
    """The warm-up calibration and the perplexity gate of METHOD §9, step by step.

    The first `warmup_steps` calls of `update` are the warm-up (λ = 0 for every method): they pool every response's
    u spread (the finite values of `response_u_std`) and every tppl < spike. At the end of the warm-up σ_ref = their
    mean, M = the upper median of the pooled tppl, target = max(ratio·M − offset, floor), reactivate =
    reactivate_ratio·M; the gate opens. After the warm-up each call returns whether λ acts this step (the gate is
    open; always, ungated), then records this step's statistic (`ppl_gate_statistic`) and decides the gate of the
    *next* step from it: the decision is made at a step boundary, so the step whose statistic falls below target still
    trains with λ and the one after does not. A step without a statistic leaves the gate as it is.
    `recalibrate()` re-runs the warm-up; `request_recalibration()` does it once per request (as `EntropyGate`).
    """

    def __init__(self, warmup_steps: int = 5, target_ratio: float = 0.93, target_offset: float = 0.0,
                 target_floor: float = 1.01, reactivate_ratio: float = 1.07, spike: float = 3.0, gated: bool = True):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 (M needs a measurement), got {warmup_steps}")
        self.warmup_steps, self.gated = int(warmup_steps), bool(gated)
        self.target_ratio, self.target_offset = float(target_ratio), float(target_offset)
        self.target_floor, self.reactivate_ratio, self.spike = float(target_floor), float(reactivate_ratio), float(spike)
        self.step = 0
        self.warmup_end = self.warmup_steps
        self.warm_u_stds: list[float] = []
        self.warm_ppl: list[float] = []
        self.sigma_ref: float | None = None
        self.ppl_m: float | None = None
        self.target: float | None = None
        self.reactivate: float | None = None
        self.open = True  # the gate of the next step (opens with the calibration; ungated: always)
        self.acting = False  # whether λ acted at the last step
        self.last_statistic: float | None = None
        self.recalibration_requested = False

    @property
    def calibrating(self) -> bool:
        return self.ppl_m is None

    def hyper_parameters(self) -> dict:
        return {"warmup_steps": self.warmup_steps, "gated": self.gated, "target_ratio": self.target_ratio,
                "target_offset": self.target_offset, "target_floor": self.target_floor,
                "reactivate_ratio": self.reactivate_ratio, "spike": self.spike}

    def update(self, u_stds: Sequence[float], tppl: Sequence[float | None]) -> bool:
        """Advance one step with its responses' u spreads and perplexities (teacher rows only; None or NaN entries
        are skipped); return whether λ acts in this step."""
        self.step += 1
        statistic = ppl_gate_statistic(tppl, self.spike)
        self.last_statistic = statistic
        if self.calibrating:
            self.warm_u_stds += [float(s) for s in u_stds if s is not None and math.isfinite(s)]
            self.warm_ppl += [float(p) for p in tppl if p is not None and p < self.spike]
            if self.step >= self.warmup_end and self.warm_ppl:
                self._calibrate()
            self.acting = False
            return False
        self.acting = self.open or not self.gated
        if self.gated and statistic is not None:
            self.open = ppl_gate_step(self.open, statistic, self.target, self.reactivate)
        return self.acting

    def _calibrate(self) -> None:
        self.sigma_ref = math.fsum(self.warm_u_stds) / len(self.warm_u_stds) if self.warm_u_stds else None
        self.ppl_m = upper_median(self.warm_ppl)
        self.target = ppl_target(self.ppl_m, self.target_ratio, self.target_offset, self.target_floor)
        self.reactivate = self.reactivate_ratio * self.ppl_m
        self.open = True

    def recalibrate(self) -> None:
        """Calibrate σ_ref and M again over the next `warmup_steps` steps (λ = 0 meanwhile)."""
        self.warm_u_stds, self.warm_ppl = [], []
        self.sigma_ref = self.ppl_m = self.target = self.reactivate = None
        self.warmup_end = self.step + self.warmup_steps
        self.open = True

    def state_dict(self) -> dict:
        """Everything needed to continue identically, as JSON-able values (missing values are None)."""
        return {"kind": KIND, "version": STATE_VERSION, **self.hyper_parameters(), "step": self.step,
                "warmup_end": self.warmup_end, "warm_u_stds": list(self.warm_u_stds), "warm_ppl": list(self.warm_ppl),
                "sigma_ref": self.sigma_ref, "ppl_m": self.ppl_m, "target": self.target,
                "reactivate": self.reactivate, "open": self.open, "acting": self.acting,
                "last_statistic": self.last_statistic, "recalibration_requested": self.recalibration_requested}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore `state_dict()` output. strict: the stored hyper-parameters must equal this gate's (ValueError
        naming them); otherwise this gate's hyper-parameters win and the calibration and counters are loaded."""
        if state.get("kind") != KIND or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a perplexity gate state (kind {state.get('kind')!r}, version "
                             f"{state.get('version')!r}; expected {KIND!r}, {STATE_VERSION})")
        mine = self.hyper_parameters()
        differ = [k for k in mine if state.get(k) != mine[k]]
        if strict and differ:
            raise ValueError("gate state was saved with different " + ", ".join(
                f"{k} ({state.get(k)} != {mine[k]})" for k in differ))
        optional = lambda key: None if state[key] is None else float(state[key])  # noqa: E731
        self.step, self.warmup_end = int(state["step"]), int(state["warmup_end"])
        self.warm_u_stds = [float(x) for x in state["warm_u_stds"]]
        self.warm_ppl = [float(x) for x in state["warm_ppl"]]
        self.sigma_ref, self.ppl_m = optional("sigma_ref"), optional("ppl_m")
        self.target, self.reactivate = optional("target"), optional("reactivate")
        if self.ppl_m is not None and differ:  # other target constants: the calibrated M holds, the thresholds follow
            self.target = ppl_target(self.ppl_m, self.target_ratio, self.target_offset, self.target_floor)
            self.reactivate = self.reactivate_ratio * self.ppl_m
        self.open = bool(state["open"])
        self.acting = bool(state["acting"])
        self.last_statistic = optional("last_statistic")
        self.recalibration_requested = bool(state["recalibration_requested"])
