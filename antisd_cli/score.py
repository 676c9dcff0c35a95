"""`antisd score`: verified rollouts → student/teacher log-probs, entropies and PMI (a thin shell over stages.score)."""

from __future__ import annotations

import click

from antisd_cli.options import (
    MODEL_HELP,
    attn_option,
    config_option,
    dtype_option,
    input_path,
    model_option,
    out_option,
    overwrite_option,
    shard_option,
    stage_errors,
    threads_option,
)
from stages.lm.prompts import TEACHER_LAYOUTS
from stages.lm.scoring import ScoreConfig

C = ScoreConfig


@click.command("score")
@input_path("--verified", "Verified rollouts (Parquet file or directory of part files) from `antisd verify`.")
@model_option(C, MODEL_HELP + " The policy that sampled the rollouts: by default the one their metadata records; "
                              "a run whose log-probs sit further than one model's numerics from the sampler's "
                              "(mean |s − q| > ln 2 − ln top-p nats) gets a warning.",
              show_default="the rollouts' model (their metadata)")
@config_option(C, "reference", "A frozen reference policy (HF folder or embedded name) whose log-probs of the response "
                               "tokens under the student prompt are stored as ref_logprobs, for update --kl-coef. "
                               "Default: none.", metavar="MODEL")
@out_option
@config_option(C, "temperature", "Softmax temperature of the log-probs. Default: the rollout's sampling temperature "
                                 "from the input metadata, else 1.0.")
@config_option(C, "chunk_size", "Response positions per LM-head/log-softmax chunk (bounds the [chunk × vocab] logits; "
                                 "default: 64 on CPU, on "
                                 "CUDA as many as fit 4 GiB of fp32 logits).")
@config_option(C, "micro_batch_tokens", "Padded tokens (sequences × longest) per forward pass; sequences are sorted "
                                        "by length.")
@config_option(C, "share_prefix", "Run each prompt's common prompt prefix once for its views (the same numbers, "
                                  "fewer positions).")
@config_option(C, "teacher", "Run the teacher pass (t, H, u); --no-teacher for a method that does not read u "
                             "(grpo): the teacher columns then repeat the student's and pmi is 0.")
@config_option(C, "teacher_instruction", "The teacher prompt's last line (METHOD §4); '' leaves it out (a control). "
                                         "Default: the rollouts' (their --prompt-template's, else 'Now solve this "
                                         "problem step by step.').")
@config_option(C, "teacher_layout", "The teacher turn: paper (METHOD §4: '{prompt}\\n\\nYour previous attempt:\\n"
                                    "{solution}\\n\\nPrevious assessment: …\\nNow solve …') or official (§9: "
                                    "'{prompt}\\nYour previous attempt:\\n\\n{solution}\\n\\nNow solve …').",
               type=click.Choice(TEACHER_LAYOUTS))
@config_option(C, "peer_assessment", "Keep the assessment line when a solution is shown (METHOD §4); "
                                     "--no-peer-assessment drops it there (§9); a teacher turn without a solution "
                                     "always has it.")
@config_option(C, "entropy", "Compute the full-vocabulary entropies; --no-entropy stores 0 (metadata entropy: false) "
                             "and spares the softmax over the vocabulary: enough for METHOD §9, whose λ and gate read "
                             "the teacher perplexity (column teacher_ppl).")
@dtype_option(C)
@config_option(C, "device", "auto, cpu, cuda or cuda:N.")
@attn_option(C)
@threads_option(C)
@shard_option(C)
@overwrite_option(C)
@stage_errors
def score_command(**options):
    """Add per-token student/teacher log-probs, entropies and PMI to verified rollouts.

    The same weights score each response twice over its stored token ids: under the student prompt (the old
    policy, s_t) and under the teacher prompt of METHOD §4 (verified solution + assessment, t_t), giving
    u_t = t_t − s_t, the full-vocabulary teacher entropy and the teacher perplexity. Rows without privileged context
    get u = 0. `antisd loop` sets --teacher-layout, --peer-assessment and --entropy from update.variant (official:
    METHOD §9) unless the run config sets them.
    With --reference, a frozen reference model also scores the student view (ref_logprobs, for update --kl-coef).

    \b
    Example:
      antisd score --verified verified.parquet --model smollm2-135m --out scored.parquet
      antisd score --verified verified.parquet --out scored/ --shard 0/4 --micro-batch-tokens 16384
      antisd score --verified verified.parquet --model ckpt_0003 --reference smollm2-135m --out scored.parquet
    """
    from stages.score import run

    click.echo(str(run(ScoreConfig(**options))))
