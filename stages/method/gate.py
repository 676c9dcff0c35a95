"""The entropy-triggered gate of METHOD §5: one λ per step from the batch median teacher entropy.

`median_teacher_entropy` is the one definition of the step's H (score, merge and update all call it);
`gate_step` is the pure Schmitt-trigger rule; `EntropyGate` adds the warm-up calibration and the state that must
survive restarts (its `state_dict()` is plain JSON). The gate does not reduce across ranks: every rank passes the
median of the whole step's tokens (each reads the whole scored file).
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

STATE_VERSION = 1


def median_teacher_entropy(teacher_entropy: Sequence[Sequence[float]], has_teacher: Sequence[bool]
                           ) -> tuple[float | None, int]:
    """H = median of the teacher entropy H_t over all response tokens of the rows with a teacher view (METHOD §5),
    and how many tokens entered it; (None, 0) when there are none.

    Rows without privileged context (`has_teacher` false: u = 0, no teacher pass) are left out. An even count takes
    the mean of the two middle values. Computed in float64 over the exact float32 values, so every caller (score's
    file metadata, merge, the update's gate) gets the same number for the same rows.
    """
    pool = sorted(float(h) for entropies, teacher in zip(teacher_entropy, has_teacher) if teacher for h in entropies)
    n = len(pool)
    if n == 0:
        return None, 0
    return (pool[n // 2] if n % 2 else (pool[n // 2 - 1] + pool[n // 2]) / 2), n


def gate_step(open_: bool, median_entropy: float, h_warm: float, down: float) -> bool:
    """Schmitt trigger (METHOD §5): g=1 and H < down·H_warm → 0; g=0 and H ≥ H_warm → 1; otherwise g unchanged."""
    if open_ and median_entropy < down * h_warm:
        return False
    if not open_ and median_entropy >= h_warm:
        return True
    return open_


class Recalibrating:
    """What both gates share: a re-calibration request applied once (they implement `recalibrate`)."""

    recalibration_requested: bool

    def recalibrate(self) -> None:
        raise NotImplementedError

    def request_recalibration(self, requested: bool, force: bool = False) -> bool:
        """Apply a re-calibration request once: re-calibrate when it is new (the previous step ran without it) or
        when `force`d; remember the request for the next step. Returns whether it re-calibrated.

        A run that keeps the request on (a loop config with it set, or commands.sh rerun by hand) thus re-calibrates
        at its first step only, not at every step (which would keep the gate in warm-up for ever).
        """
        start = force or (requested and not self.recalibration_requested)
        if start:
            self.recalibrate()
        self.recalibration_requested = requested
        return start


class EntropyGate(Recalibrating):
    """λ_k = g_k · λ_max with g from a Schmitt trigger on the step's median teacher entropy H_k (METHOD §5).

    Gated (default, `antisd`): the first `warmup_steps` calls of `update` return λ = 0 and record H; at the end of
    the warm-up H_warm = median of those W per-step medians (mean of the middle two for even W) and g = 1. Each
    later call first applies `gate_step` to that step's H, then returns g·λ_max (so the step whose H drops below
    down·H_warm already gets λ = 0). Ungated (`gated=False`, the `sd` default): λ = λ_max on every call, warm-up
    included; H_warm is still calibrated and g reported as 1, for the metrics.
    A step without a measurement (H None or NaN: no teacher tokens in the batch) counts as a step but is not
    recorded and leaves g unchanged; if the whole warm-up had none, calibration waits for the first finite H.
    `recalibrate()` forgets H_warm and re-runs the warm-up over the next W steps (λ = 0 again when gated);
    `request_recalibration()` does it once per request (the request in force is part of the state).
    """

    def __init__(self, warmup_steps: int = 5, down: float = 0.93, lam_max: float = 0.5, gated: bool = True):
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1 (H_warm needs a measurement), got {warmup_steps}")
        if not 0.0 < down <= 1.0:
            raise ValueError(f"down must be in (0, 1], got {down}")
        if lam_max < 0:
            raise ValueError(f"lam_max must be >= 0, got {lam_max}")
        self.warmup_steps, self.down, self.lam_max, self.gated = int(warmup_steps), float(down), float(lam_max), bool(gated)
        self.step = 0  # calls of update() so far
        self.warmup_end = self.warmup_steps  # H_warm is fixed at the call whose step count reaches this
        self.warm_medians: list[float] = []
        self.h_warm: float | None = None
        self.open = not self.gated
        self.last_median: float | None = None
        self.lam = self.lam_max if not self.gated else 0.0
        self.recalibration_requested = False  # the request in force at the last step (see request_recalibration)

    @property
    def calibrating(self) -> bool:
        return self.h_warm is None

    @property
    def tau_down(self) -> float | None:
        return None if self.h_warm is None else self.down * self.h_warm

    def update(self, median_entropy: float | None) -> float:
        """Advance one step with this step's median teacher entropy H; return the λ to use for this step."""
        self.step += 1
        was_calibrating = self.calibrating
        measured = median_entropy is not None and math.isfinite(float(median_entropy))
        self.last_median = float(median_entropy) if measured else None
        if self.calibrating:
            if measured:
                self.warm_medians.append(float(median_entropy))
            if self.step >= self.warmup_end and self.warm_medians:
                self.h_warm = float(statistics.median(self.warm_medians))
                self.open = True
        elif self.gated and measured:
            self.open = gate_step(self.open, float(median_entropy), self.h_warm, self.down)
        if not self.gated:
            self.open, self.lam = True, self.lam_max
        else:
            self.lam = 0.0 if was_calibrating or not self.open else self.lam_max
        return self.lam

    def recalibrate(self) -> None:
        """Measure H_warm again over the next `warmup_steps` steps (METHOD §5: a resumed run may, on request)."""
        self.warm_medians = []
        self.h_warm = None
        self.warmup_end = self.step + self.warmup_steps
        self.open = not self.gated

    def state_dict(self) -> dict:
        """Everything needed to continue identically, as JSON-able values (no NaN: missing values are None)."""
        return {"version": STATE_VERSION, "warmup_steps": self.warmup_steps, "down": self.down,
                "lam_max": self.lam_max, "gated": self.gated, "step": self.step, "warmup_end": self.warmup_end,
                "warm_medians": list(self.warm_medians), "h_warm": self.h_warm, "open": self.open,
                "last_median": self.last_median, "lam": self.lam,
                "recalibration_requested": self.recalibration_requested}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore `state_dict()` output. strict: the hyper-parameters stored must equal this gate's (else
        ValueError naming them); with strict=False this gate's hyper-parameters win and the counters are loaded."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"gate state version {state.get('version')!r}, expected {STATE_VERSION}")
        if strict:
            differ = [k for k in ("warmup_steps", "down", "lam_max", "gated") if state[k] != getattr(self, k)]
            if differ:
                raise ValueError("gate state was saved with different " + ", ".join(
                    f"{k} ({state[k]} != {getattr(self, k)})" for k in differ))
        self.step, self.warmup_end = int(state["step"]), int(state["warmup_end"])
        self.warm_medians = [float(x) for x in state["warm_medians"]]
        self.h_warm = None if state["h_warm"] is None else float(state["h_warm"])
        self.open = bool(state["open"]) if self.gated else True
        self.last_median = None if state["last_median"] is None else float(state["last_median"])
        self.lam = float(state["lam"])
        self.recalibration_requested = bool(state.get("recalibration_requested", False))  # absent from older states
