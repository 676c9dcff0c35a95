"""`antisd verify`: rollouts → verified rows (answer, reward, status, group stats, privileged context)."""

from __future__ import annotations

import click

from antisd_cli.options import (
    config_option,
    input_path,
    model_option,
    out_option,
    overwrite_option,
    seed_option,
    stage_errors,
)
from stages.verifier.answers import FALLBACKS
from stages.verifier.rows import PRIVILEGED_FALLBACKS, PRIVILEGED_FROM, VerifyConfig

C = VerifyConfig


@click.command("verify")
@input_path("--rollouts", "Rollouts Parquet (file or directory of part files) from `antisd rollout`.")
@out_option
@seed_option(C, "Seed of the peer picks; same seed, same output.")
@config_option(C, "workers", "Answer-check worker processes.")
@config_option(C, "timeout", "Seconds per answer check; an overrun is interrupted (worker killed if need be): "
                             "status timeout.")
@config_option(C, "fallbacks", f"Comma list of answer fallbacks tried in order when there is no \\boxed{{}}: "
                               f"{', '.join(FALLBACKS)}; 'none' = boxed only.", metavar="LIST")
@config_option(C, "max_answer_chars", "Answers (or golds) longer than this are not parsed: status error.")
@config_option(C, "worker_memory_mb", "Address-space limit of each worker in MiB (0 = none); a check over it gets "
                                      "status error.")
@config_option(C, "privileged_max_chars", "Keep the first N characters of privileged_text (0 = no limit).")
@config_option(C, "privileged_max_tokens", "Also keep only its first N tokens of --model's tokenizer (0 = not "
                                           "applied; METHOD §9: 3072).")
@config_option(C, "privileged_context_tokens", "With C > 0 the token budget is also at most C − |prompt| − 300 tokens "
                                               "(at least 128): METHOD §9's 4096 (0 = not applied).")
@config_option(C, "privileged_keep_head", "Share of the token budget kept from the start of a text over budget; the "
                                          "rest is its end, joined by '\\n...\\n' (METHOD §9: 0.25; 1 = the start "
                                          "only).")
@config_option(C, "privileged_cut_boxed", "Cut a peer's text right after its last \\boxed{} holding the gold answer "
                                          "(else its own verified answer), as METHOD §9.")
@config_option(C, "privileged_fallback", "Without a correct peer: reference (the reference solution, else no teacher "
                                         "term: METHOD §4) or assessment (the teacher sees only the note on this "
                                         "rollout: §9; source assessment).",
               type=click.Choice(PRIVILEGED_FALLBACKS))
@config_option(C, "privileged_from", "same: this problem's correct peer, else its reference (METHOD §4); other: "
                                     "another problem's (a context-only control; sources other_peer, "
                                     "other_reference).", type=click.Choice(PRIVILEGED_FROM))
@config_option(C, "reward", "Your reward function instead of math-verify: module:function or file.py:function, "
                            "called as f(problem=, answer=, response=, row=) in the same killable workers and "
                            "--timeout. It returns the reward: True/False, or any finite float (partial credit, "
                            "bonuses); a row is correct (a peer the teacher may see, an eval hit) when it is ≥ 1. A "
                            "row whose call raises or returns anything else gets reward 0 and status error; the "
                            "first traceback is logged, and verify fails when every row failed [default: "
                            "math-verify].", metavar="MODULE:FUNCTION")
@model_option(C)
@overwrite_option(C)
@stage_errors
def verify_command(**options):
    """Check each rollout's final answer and attach rewards and privileged context.

    Answers are the last \\boxed{} (then the fallbacks), compared with the gold answer by math-verify in worker
    processes with a hard timeout; nothing from the model is ever eval-ed. Every row is kept, with verify_status
    ok | no_answer | timeout | error. The privileged context of each rollout is a correct peer from its group
    (seeded, never itself), else the reference solution, else none; --model is read only for the token budget.
    `antisd loop` sets the privileged options from update.variant (official: METHOD §9's context) unless the run
    config sets them.

    \b
    Example:
      antisd verify --rollouts rollouts.parquet --out verified.parquet
      antisd verify --rollouts rollouts.parquet --out verified.parquet --fallbacks none --timeout 2
    """
    from stages.verify import run

    click.echo(str(run(VerifyConfig(**options))))
