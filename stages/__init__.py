"""antisd's library: one command module per `antisd` command at this level, over role sub-packages.

Imports point one way: commands → sub-packages (`loop`, `eval` and `analyze` also call the commands they drive);
`method/`, `common/` and the verifier's checking code import nothing else of `stages/` (tests/test_layout.py).

Commands (each reads validate → read → compute → write):
    data      `antisd data prepare`: a dataset → prompts Parquet
    rollout   prompts → rollouts (sampling with an engine)
    verify    rollouts → verified rows (rewards, groups, privileged context)
    score     verified → scored rows (student/teacher log-probs, entropies, PMI)
    update    scored rows + checkpoint → the next checkpoint (one DeepSpeed step)
    loop      rollout → verify → score → update (→ eval) for N steps, resumable, as one process or N ranks
    eval      a benchmark → per-sample rows + avg@K, pass@k, maj@K; a suite of benchmarks (the paper's) → a folder
    analyze   `antisd analyze pmi`: which words the privileged context inflates and deflates
    plot      training curves of run folders
    report    the paper's table over runs: best-average checkpoint, Speedup, seed spread, pass@k curves
    merge     part files of a sharded output → one checked file
    inspect   describe any stage's Parquet file, or a run folder

method/ — the METHOD.md formulas, pure functions of tensors
    terms       the registry of methods: per-token terms (and their §9 shapes), gate defaults, formulas
    variants    the paper and official (§9) presets of every knob where the paper's text and the authors' code differ
    advantages  GRPO group advantages and the per-token advantage of a method (its parts, with §9's shaping)
    shaping     §9's shaping of the term: adaptive u-clip, per-response z-score, length mask, the u spread
    losses      aggregation, PPO-clip (with the dual clip), k3 KL, truncated IS weights, PMI statistics
    gate        the median teacher entropy and the entropy-triggered Schmitt gate
    perplexity  §9: teacher perplexity, λ_i per response, the perplexity gate and its warm-up calibration
    estimators  pass@k, avg@k, maj@k, bootstrap intervals
    comparison  best-average checkpoint, Speedup over a baseline, seed spread, pass@k curves
    probes      u at probe positions by style × context × note, the gate statistic's sampling noise

lm/ — the language model: what it reads and computes
    compat      HF folders that transformers 4.x reads as 5.x wrote them (RoPE base, tokenizer class)
    models      model resolution (local folders, the embedded GGUF), loading, the logits-path check
    prompts     student and teacher chat messages, token ids, ChatOptions and prompt template files
    datasets    the prompt sets (built-in and user files), PrepareConfig
    bundled     the datasets shipped in the package, and each source's quirks (OlympiadBench's answer lists…)
    records     a user's dataset file (JSONL, Parquet, HF datasets) as records, fields by dotted path
    pieces      token pieces → text and words (for the PMI analysis)
    logprobs    chunked per-token log-probs and entropies (fp32 LM head), the one micro-batch packer
    forward     the one forward score and the trainer run: pieces, numerics, chunk size by device
    shared_prefix  sequences that share a prefix computed with the prefix run once (its KV cache repeated)
    engine      the engine interface, SamplingSettings, Completion, per-sample seeds
    engine_hf   sampling by a KV-cached decode loop on a transformers model
    engine_vllm sampling with vLLM (imported only when chosen), the loop's resident engine
    sampling    RolloutConfig and sample(): prompt rows → rollouts rows
    scoring     ScoreConfig, student and teacher views, scored columns

verifier/ — answers and rewards
    answers     answer extraction, code-like forms as LaTeX, equivalence checks in killable worker processes
    sandbox     the guarded evaluation those workers run (model output is never eval-ed)
    reward      a user's reward function (`verify --reward module:function`) as the workers' check
    rows        VerifyConfig and verify_table(): rewards, group statistics, privileged contexts
    scores      an evaluation's scores of verified rows (avg@K and interval, pass@k, maj@K, per-problem counts)

training/ — the update step
    config      UpdateConfig (options of `antisd update`) and the gate default
    trainer     the policy in a DeepSpeed engine, the optimizer step, the checkpoint it writes
    batch       scored rows → Batch, the checks of state, revision and reference, the data's metrics
    signals     what a step trains on: sequence advantages, λ from the variant's gate, the --advantages-out table
    schedule    the learning-rate schedule (warm-up, constant/linear/cosine) by the run's update step
    lora        LoRA adapters through PEFT: attach, merged weights, the adapter folder, state checks
    micro       what one rank runs in an optimizer step: its rows in micro-batches of forward pieces
    checkpoint  the atomic checkpoint format (HF folder + DeepSpeed state + run state)
    distributed process groups, DeepSpeed config, the split of a batch across ranks

runs/ — a training run
    config      the run config (YAML + --set), its validation and digest, LoopConfig
    plan        what a step is: prompts cursor, stage configs, commands.sh, opening a run directory
    dynamic     DAPO dynamic sampling: further draws until a step has enough mixed-reward groups
    resources   what a loop keeps resident (policy, reference, vLLM, trainer) and the device between phases
    ranks       a loop as N ranks: rank 0's decisions, the collectives, the ranks' part files merged by rank 0
    shared_sampling  which prompts each rank's engine samples (the 1-rank batches), the shared evaluation engine
    launch      `loop --nproc N` (torchrun for you) and `--launcher slurm --resident` (one job, torchrun per node)
    memory      the memory model from config.json: per-GPU bytes, the vLLM share, the loop's refusal
    costs       a step's seconds, loads, bytes and jobs at scale: resident ranks beside the Slurm chain (computed)
    run_dir     the run directory: layout, manifest, metrics.jsonl, checkpoint pruning
    view        the live view on stderr; a run's steps table with its notes and next commands (demo, inspect RUN)
    tracking    TensorBoard events and Weights & Biases logging of the metrics
    slurm       rendering a run as Slurm jobs, a window of steps at a time
    suites      evaluation suites (paper, aime25-check): protocols, the suite folder, resume and shards, summary
    evaluations a run folder's evaluations (the loop's held-out one, suites'), live or collected, read in one shape
    report_table  table.md of `antisd report` from its computed report
    scheduler   sbatch submissions (ids in jobs.json) and the squeue check before a resubmission

common/ — shared by all
    errors      InputError (exit 2)
    io          checked Parquet reads, atomic writes, output locks
    parts       part files of sharded outputs and their checks
    validation  config checks (Checks, ConfigError)
    yaml12      YAML as config files are read (1.2 booleans, no repeated keys, one-line problems)
    metrics     the names of the logged metrics
    figures     PNG/HTML/CSV outputs (the only matplotlib importer)
    process     CPU threads, seeds, device choice
    card        the device's memory between phases: free bytes, peaks, giving cached blocks back
    stack       the versions of torch/transformers/DeepSpeed/vLLM needed and the APIs that decide them; DeepSpeed's
                import with its logger on stderr
    progress    progress of long stages in samples or tokens (a bar on a terminal, one-line records in files)
"""

__version__ = "0.1.0"
