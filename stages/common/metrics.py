"""The names of the per-step metrics (METHOD §6), defined once: metrics.json, metrics.jsonl, TensorBoard, `plot`,
the live view and the docs use these strings.

Namespaced as in verl (`actor/…`, `gate/…`). The pure functions of `stages.method` return plain records; the modules
that log them name the values here. Held-out evaluation adds `eval/<summary key>` (`stages.eval`'s summary keys,
`eval/accuracy`, `eval/pass@1`, …; with `loop.eval_suite`, `stages.runs.suites.loop_metrics`: `eval/accuracy` = the
suite average, `eval/average`, `eval/<benchmark>/accuracy`, `eval/<benchmark>/avg@n`), and the loop adds a
`timing_s/<stage>` per stage it ran.
"""

from __future__ import annotations

import schemas

STEP = "step"

# the data of the step (training.batch.batch_metrics)
REWARD_MEAN = "reward/mean"
REWARD_ACCURACY = "reward/accuracy"
REWARD_ZERO_VARIANCE_FRAC = "reward/zero_variance_frac"
LENGTH_MEAN = "response/length_mean"
LENGTH_MAX = "response/length_max"
TRUNCATED_FRAC = "response/truncated_frac"
OVERLONG_PENALTY_MEAN = "reward/overlong_penalty_mean"  # update.overlong_buffer > 0: the mean shaping added
OVERLONG_FILTERED = "response/overlong_filtered"  # update.overlong_filter: truncated rows left out of the loss
TEACHER_ENTROPY_MEDIAN = "teacher/entropy_median"
TEACHER_PPL_MEAN = "teacher/ppl_mean"  # mean tppl_i over the rows with a teacher view (METHOD §9)
STUDENT_ENTROPY_MEAN = "student/entropy_mean"
PMI_U_MEAN = "pmi/u_mean"
PMI_ANTISD_TERM_MEAN = "pmi/antisd_term_mean"
PMI_NEG_FRAC = "pmi/neg_frac"
PRIVILEGED = {source: f"privileged/{source}" for source in schemas.PRIVILEGED_SOURCES}
LOGPROB_MISMATCH_MEAN = "rollout/logprob_mismatch_mean"
LOGPROB_MISMATCH_MAX = "rollout/logprob_mismatch_max"

# the gate (METHOD §5) and the optimizer step (training.trainer)
GATE_OPEN = "gate/open"
GATE_LAMBDA = "gate/lambda"
GATE_H_WARM = "gate/h_warm"
# 1 in the gate's warm-up steps, which calibrate it with λ = 0 by construction (METHOD §5, §9), whatever gate/open
# says; 0 after; None for a method that reads no u (grpo)
GATE_WARMUP = "gate/warmup"
# λ per response and the perplexity gate (METHOD §9); with one λ per step (§5) max = λ and active_frac is 0 or 1
GATE_LAMBDA_MAX = "gate/lambda_max"
GATE_LAMBDA_ACTIVE_FRAC = "gate/lambda_active_frac"  # rows with a teacher view whose λ_i > 0
GATE_STATISTIC = "gate/statistic"  # the perplexity gate's statistic: mean tppl below the spike threshold
GATE_TARGET = "gate/target"
GATE_REACTIVATE = "gate/reactivate"
GATE_PPL_M = "gate/ppl_m"  # M: the upper median of the warm-up's tppl
GATE_SIGMA_REF = "gate/sigma_ref"  # σ_ref: the warm-up's mean per-response std of u
GATE_PPL_SPIKE_FRAC = "gate/ppl_spike_frac"  # rows with a teacher view whose tppl is above the spike threshold
PMI_CLIPPED_FRAC = "pmi/clipped_frac"  # response tokens whose u the adaptive clip set to 0
CLIP_FRAC_DUAL = "actor/clip_frac_dual"  # tokens with A < 0 and ρ > c (the dual clip binds)
PG_LOSS = "actor/pg_loss"
CLIP_FRAC = "actor/clip_frac"
APPROX_KL = "actor/approx_kl"
KL_REF = "actor/kl_ref"
GRAD_NORM = "actor/grad_norm"
# 1: every trained token's advantage was 0 and no KL term acted (uniform groups, λ = 0): no gradient, so the step took
# no optimizer step (the checkpoint keeps the weights, the run state advances); 0 otherwise
NO_SIGNAL = "actor/no_signal"
LR = "actor/lr"
UPDATE_TOK_S = "throughput/update_tok_s"

# the loop (stages.loop)
ROLLOUT_TOK_S = "throughput/rollout_tok_s"
SCORE_TOK_S = "throughput/score_tok_s"
LOAD_FRACTION = "overhead/load_fraction"
MEMORY_PEAK = "memory/peak_gib"  # + /<phase>: CUDA bytes allocated, on CPU the process's peak RSS (stages.common.card)
EVAL_PREFIX = "eval/"
EVAL_ACCURACY = EVAL_PREFIX + "accuracy"


# the step at which the base model's held-out evaluation (the run's eval_base) is drawn by `antisd plot` and logged to
# TensorBoard: before step 0, whose evaluation is of the weights after step 0's update
BASE_STEP = -1


def timing(stage: str) -> str:
    """Seconds spent in `stage` (rollout, verify, score, update, eval, weight_sync, model_load, step)."""
    return f"timing_s/{stage}"


def memory_peak(phase: str) -> str:
    """The peak memory of `phase` (rollout, verify, score, update, eval) in GiB, reset at the phase's start."""
    return f"{MEMORY_PEAK}/{phase}"


def sampling(name: str) -> str:
    """What a step's dynamic sampling drew and kept (stages.runs.dynamic: draws, groups_mixed, groups_kept, …)."""
    return f"sampling/{name}"


def evaluation(summary_key: str) -> str:
    """A held-out evaluation summary value (`accuracy`, `pass@1`, …) as a step metric."""
    return EVAL_PREFIX + summary_key


NAMESPACES = ("reward", "response", "teacher", "student", "pmi", "privileged", "rollout", "gate", "actor",
              "throughput", "timing_s", "overhead", "eval", "sampling", "memory")
