"""The numbers of the arith_styles study (docs/reproduction.md), from files only.

    styles_report.py calibration runs/styles/calibrate --out docs/reproduction/styles/calibration.json
    styles_report.py styles runs/styles/grpo_s0 --out docs/reproduction/styles/runs/grpo_s0/styles.jsonl
    styles_report.py evals runs/styles/grpo_s0 --out docs/reproduction/styles/runs/grpo_s0/evals.json
    styles_report.py report docs/reproduction/styles --out docs/reproduction/styles/table.md

`calibration`: per few-shot order, the base model's accuracy at T = 1, the fraction of mixed 8-sample groups, the
deliberate-style fraction and accuracy by style, from the verified rollouts. `styles`: the same per training step of
a run directory (its verified.parquet files). `report` reads only the committed files under DOCS (calibration.json,
pmi_*/summary.json, runs/*/ and runs/official/*/{config.yaml, metrics.jsonl, styles.jsonl, evals.json,
eval_base.json}) and writes the Markdown tables: calibration, PMI probes by context, the gate's noise, the paired
training read-outs (arm − grpo of the same variant on the same seed, so the same prompts at every step), the paper-text
and authors'-code (METHOD §9, `update.variant: official`, labelled ARM@official) arms side by side over the seeds,
and the official arms' λ_i distribution and gate state per step. A run's variant is its config.yaml's update.variant
(paper when absent: the runs made before variants existed). `evals`: each held-out evaluation of a run directory as
{prompt_id: correct}, for the paired per-problem intervals.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import yaml  # noqa: E402

from stages.common import metrics as keys  # noqa: E402
from stages.common.io import atomic_write_text  # noqa: E402
from stages.lm.datasets import answer_style  # noqa: E402
from stages.method.gate import EntropyGate  # noqa: E402
from stages.method.variants import PRE_VARIANT  # noqa: E402

CONTEXTS = {"same": "this problem's peer (METHOD §4)", "other": "another problem's solution",
            "noinstruction": "this problem's peer, no 'Now solve this problem step by step.'"}


def opens_with_right_sum(problem: str, response: str) -> bool:
    """The response begins by writing the problem's own sum with its right result ("47 + 37 = 84")."""
    asked = re.fullmatch(r"What is (\d+) \+ (\d+)\?", problem.strip())
    opening = re.match(r"\s*(\d+) \+ (\d+) = (\d+)", response)
    return bool(asked and opening and opening[1] == asked[1] and opening[2] == asked[2]
                and int(opening[3]) == int(asked[1]) + int(asked[2]))


def style_stats(rows: list[dict]) -> dict:
    """Accuracy, mixed groups, deliberate fraction, and accuracy / length per style of verified rows."""
    groups = defaultdict(list)
    for row in rows:
        groups[row["prompt_id"]].append(row["reward"])
    by_style = defaultdict(list)
    for row in rows:
        by_style[answer_style(row["response_text"])].append(row)
    out = {"rollouts": len(rows), "problems": len(groups),
           "accuracy": statistics.fmean(r["reward"] for r in rows),
           "mixed_group_frac": statistics.fmean(0 < statistics.fmean(g) < 1 for g in groups.values()),
           "deliberate_frac": len(by_style["deliberate"]) / len(rows),
           # a check step anywhere (the deliberate example's "Check:"), also in responses that do not open with
           # "Split:": the part of deliberation a model can pick up without the decomposition
           "check_frac": statistics.fmean("Check:" in r["response_text"] for r in rows),
           "truncated_frac": statistics.fmean(r["finish_reason"] == "length" for r in rows)}
    if all("problem" in r for r in rows):  # whether a right first sum survives to the final answer
        right_first = [r for r in rows if opens_with_right_sum(r["problem"], r["response_text"])]
        out["right_first_sum_frac"] = len(right_first) / len(rows)
        out["accuracy_after_right_first_sum"] = (statistics.fmean(r["reward"] for r in right_first)
                                                 if right_first else None)
    for style in ("direct", "deliberate"):
        chosen = by_style[style]
        out[f"accuracy_{style}"] = statistics.fmean(r["reward"] for r in chosen) if chosen else None
        out[f"length_{style}"] = statistics.fmean(r["response_length"] for r in chosen) if chosen else None
    return out


def read_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    columns = ["prompt_id", "problem", "reward", "response_text", "response_length", "finish_reason"]
    return pq.read_table(path, columns=columns).to_pylist()


def calibration(folder: Path) -> dict:
    return {variant.name: style_stats(read_rows(variant / "verified.parquet"))
            for variant in sorted(folder.iterdir()) if (variant / "verified.parquet").exists()}


def run_styles(run_dir: Path) -> str:
    lines = []
    for step_dir in sorted(run_dir.glob("step_*")):
        if (step_dir / "verified.parquet").exists():
            lines.append(json.dumps({"step": int(step_dir.name.removeprefix("step_")),
                                     **style_stats(read_rows(step_dir / "verified.parquet"))}))
    return "\n".join(lines) + "\n"


def run_evals(run_dir: Path) -> str:
    """Per held-out evaluation of a run (the base model's as "base", then by step): {prompt_id: correct}, so paired
    differences between arms can be recomputed per problem from committed files."""
    import pyarrow.parquet as pq

    def correct(path: Path) -> dict:
        rows = pq.read_table(path, columns=["prompt_id", "correct"]).to_pylist()
        by: dict = defaultdict(list)
        for row in rows:
            by[row["prompt_id"]].append(bool(row["correct"]))
        return {pid: statistics.fmean(values) for pid, values in sorted(by.items())}

    out = {}
    if (run_dir / "eval_base.parquet").exists():
        out["base"] = correct(run_dir / "eval_base.parquet")
    for step_dir in sorted(run_dir.glob("step_*")):
        if (step_dir / "eval.parquet").exists():
            out[str(int(step_dir.name.removeprefix("step_")))] = correct(step_dir / "eval.parquet")
    return json.dumps(out, indent=0, sort_keys=True) + "\n"


def paired_bootstrap(a: dict, b: dict, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b over the problems both hold, with a 95 % percentile interval from resampling problems."""
    import random

    shared = sorted(set(a) & set(b))
    diffs = [a[p] - b[p] for p in shared]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return statistics.fmean(diffs), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


# --- the report --------------------------------------------------------------------------------------------------

def fmt(value, spec="+.3f") -> str:
    return "–" if value is None else format(value, spec)


def calibration_table(data: dict) -> list[str]:
    lines = ["| variant (--shots, _--operands) | accuracy (T = 1) | mixed groups | deliberate rollouts | accuracy direct / "
             "deliberate | length direct / deliberate | truncated | opens with the right sum / then right |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for variant, st in data.items():
        lines.append(f"| {variant} | {st['accuracy']:.3f} | {st['mixed_group_frac']:.2f} | {st['deliberate_frac']:.2f}"
                     f" | {fmt(st['accuracy_direct'], '.3f')} / {fmt(st['accuracy_deliberate'], '.3f')} | "
                     f"{fmt(st['length_direct'], '.1f')} / {fmt(st['length_deliberate'], '.1f')} | "
                     f"{st['truncated_frac']:.2f} | {fmt(st.get('right_first_sum_frac'), '.2f')} / "
                     f"{fmt(st.get('accuracy_after_right_first_sum'), '.2f')} |")
    return lines


def probe_tables(docs: Path) -> list[str]:
    summaries = {c: json.loads((docs / f"pmi_{c}" / "summary.json").read_text())
                 for c in CONTEXTS if (docs / f"pmi_{c}" / "summary.json").exists()}
    if not summaries:
        return []
    cells = defaultdict(dict)
    for context, summary in summaries.items():
        for row in summary["probes"]:
            cells[(row["probe"], row["style"], row["peer_style"], row["note"])][context] = row
    header = " | ".join(f"u, {c} context [95 %]" for c in summaries)
    lines = [f"| probe | rollout style | context style | note | n (same) | {header} |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in summaries) + " |"]
    for (probe, style, peer, note), by_context in sorted(cells.items()):
        values = []
        for context in summaries:
            row = by_context.get(context)
            values.append("–" if row is None else f"{row['mean_u']:+.3f} [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"
                          f" ({row['occurrences']})")
        same = by_context.get("same", {})
        lines.append(f"| {probe} | {style} | {peer} | {note} | {same.get('occurrences', '–')} | {' | '.join(values)} |")
    lines += ["", "| context | gate statistic over 8-problem draws: mean | sd | CV | P(draw < 0.93 × pooled median) |",
              "| --- | --- | --- | --- | --- |"]
    for context, summary in summaries.items():
        noise = summary.get("gate_noise")
        if noise:
            lines.append(f"| {context} | {noise['mean']:.3f} | {noise['std']:.3f} | {noise['cv']:.3f} | "
                         f"{noise['frac_below_down']:.3f} |")
    return lines


def load_run(folder: Path) -> dict:
    config = yaml.safe_load((folder / "config.yaml").read_text())
    update = config.get("update", {})
    variant = update.get("variant") or PRE_VARIANT
    # -batch: one λ for every response (update.lam_mode batch) where the variant would weigh each by its own λ_i
    lam_batch = update.get("lam_mode") == "batch" and variant != "paper"
    arm = update.get("method", "antisd") + ("-nogate" if update.get("gate") == "off" else "") + \
        ("-batch" if lam_batch else "") + ("" if variant == "paper" else f"@{variant}")
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    styles = []
    if (folder / "styles.jsonl").exists():
        styles = [json.loads(line) for line in (folder / "styles.jsonl").read_text().splitlines() if line.strip()]
    base = json.loads((folder / "eval_base.json").read_text()) if (folder / "eval_base.json").exists() else {}
    evals = json.loads((folder / "evals.json").read_text()) if (folder / "evals.json").exists() else {}
    return {"arm": arm, "variant": variant, "seed": config["loop"]["seed"], "rows": rows,
            "styles": {s["step"]: s for s in styles},
            "evals": evals,
            "base": base.get(keys.EVAL_ACCURACY), "warmup": update.get("warmup_steps", 5),
            "down": update.get("gate_down", 0.93)}


def gate_replay(run: dict) -> list[bool]:
    """The gate's state per step, replayed on the run's logged median teacher entropy (METHOD §5)."""
    gate = EntropyGate(warmup_steps=run["warmup"], down=run["down"], gated=True)
    states = []
    for row in run["rows"]:
        gate.update(row.get(keys.TEACHER_ENTROPY_MEDIAN))
        states.append(gate.lam > 0)
    return states


def baseline(arm: str) -> str:
    """The arm an arm is paired with: grpo of its own variant (grpo, grpo@official)."""
    return "grpo" + (arm[arm.index("@"):] if "@" in arm else "")


def run_folders(docs: Path) -> list[Path]:
    """The committed run folders: runs/NAME_sSEED (paper-text arms) and runs/official/NAME_sSEED (METHOD §9 arms)."""
    found = sorted((docs / "runs").glob("*_s*")) + sorted((docs / "runs" / "official").glob("*_s*"))
    return [folder for folder in found if (folder / "metrics.jsonl").exists()]


def last_eval(run: dict) -> tuple[str, dict] | None:
    steps = sorted((set(run["evals"]) - {"base"}), key=int)
    return (steps[-1], run["evals"][steps[-1]]) if steps else None


def training_tables(docs: Path) -> list[str]:
    runs = [load_run(folder) for folder in run_folders(docs)]
    if not runs:
        return []
    by = {(r["arm"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if r["arm"] == "grpo"})
    arms = sorted({r["arm"] for r in runs} - {"grpo", "grpo@official"}) + \
        (["grpo@official"] if any(r["arm"] == "grpo@official" for r in runs) else [])
    lines = ["| run | base | held-out accuracy by step | mean reward | deliberate fraction first → last step | "
             "\"Check:\" fraction first → last | mean length first → last | teacher H median first → last | "
             "mean u last step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in sorted(runs, key=lambda r: (r["arm"], r["seed"])):
        evals = ", ".join(f"{r[keys.STEP]}: {r[keys.EVAL_ACCURACY]:.3f}" for r in run["rows"] if keys.EVAL_ACCURACY in r)
        first, last = run["rows"][0], run["rows"][-1]
        styles = [run["styles"].get(r[keys.STEP], {}) for r in (first, last)]
        lines.append(
            f"| {run['arm']} s{run['seed']} | {fmt(run['base'], '.3f')} | {evals} | "
            f"{statistics.fmean(r[keys.REWARD_MEAN] for r in run['rows']):.3f} | "
            f"{fmt(styles[0].get('deliberate_frac'), '.2f')} → {fmt(styles[1].get('deliberate_frac'), '.2f')} | "
            f"{fmt(styles[0].get('check_frac'), '.2f')} → {fmt(styles[1].get('check_frac'), '.2f')} | "
            f"{first[keys.LENGTH_MEAN]:.1f} → {last[keys.LENGTH_MEAN]:.1f} | "
            f"{fmt(first.get(keys.TEACHER_ENTROPY_MEDIAN), '.3f')} → {fmt(last.get(keys.TEACHER_ENTROPY_MEDIAN), '.3f')}"
            f" | {fmt(last.get(keys.PMI_U_MEAN))} |")
    pairing = ("arm − grpo of the same variant; grpo@official − grpo for the official base; same seed"
               if any(r["variant"] != "paper" for r in runs) else "arm − grpo, same seed")
    lines += ["", f"Paired ({pairing}: the same prompts at every step). Training reward: mean of the "
              "per-step differences ± 2 standard errors of that mean (sd of the differences / √steps). Held-out: "
              "the difference on the same problems at the last evaluation, 95 % interval from 2,000 resamples of "
              "the problems (evals.json).", "",
              "| arm | seed | Δ mean training reward ± 2 SE (steps) | Δ deliberate fraction, mean over steps | "
              "Δ \"Check:\" fraction, mean over steps | Δ held-out accuracy, last eval [95 %] |",
              "| --- | --- | --- | --- | --- | --- |"]
    for arm in arms:
        for seed in seeds:
            partner = baseline(arm) if arm != "grpo@official" else "grpo"
            if (arm, seed) not in by or (partner, seed) not in by:
                continue
            a, g = by[(arm, seed)], by[(partner, seed)]
            steps = min(len(a["rows"]), len(g["rows"]))
            diffs = [a["rows"][i][keys.REWARD_MEAN] - g["rows"][i][keys.REWARD_MEAN] for i in range(steps)]
            delib = [a["styles"][i]["deliberate_frac"] - g["styles"][i]["deliberate_frac"] for i in range(steps)
                     if i in a["styles"] and i in g["styles"]]
            check = [a["styles"][i].get("check_frac", 0) - g["styles"][i].get("check_frac", 0) for i in range(steps)
                     if i in a["styles"] and i in g["styles"]]
            shared = sorted((set(a["evals"]) & set(g["evals"])) - {"base"}, key=int)
            if shared:
                mean, low, high = paired_bootstrap(a["evals"][shared[-1]], g["evals"][shared[-1]])
                d_eval = f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (step {shared[-1]})"
            else:
                d_eval = "–"
            spread = 2 * statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
            lines.append(f"| {arm} | {seed} | {statistics.fmean(diffs):+.3f} ± {spread:.3f} ({steps}) | "
                         f"{fmt(statistics.fmean(delib) if delib else None, '+.2f')} | "
                         f"{fmt(statistics.fmean(check) if check else None, '+.2f')} | {d_eval} |")
    lines += side_by_side(runs, by, seeds)
    lines += ["", "Gate replayed on each grpo run's logged median teacher entropy (warm-up "
              f"{runs[0]['warmup']}, τ_down = {runs[0]['down']}·H_warm):", ""]
    for seed in seeds:
        states = gate_replay(by[("grpo", seed)])
        post = states[by[("grpo", seed)]["warmup"]:]
        lines.append(f"- grpo s{seed}: open on {sum(post)} of {len(post)} post-warm-up steps "
                     f"({''.join('1' if s else '0' for s in states)})")
    return lines + official_gate_table(runs)


def side_by_side(runs: list[dict], by: dict, seeds: list[int]) -> list[str]:
    """Every arm over its seeds: last held-out accuracy (mean, range) and the paired Δ against its variant's grpo,
    the paper-text and the official arms in one table (empty without official arms)."""
    if not any(r["variant"] != "paper" for r in runs):
        return []
    lines = ["", "Paper text and authors' code (METHOD §9) side by side, over the seeds: held-out accuracy at the last "
             "evaluation, and the paired Δ to the same variant's grpo (mean of the seeds' differences; in brackets the "
             "seeds' own 95 % intervals' lowest and highest bound).", "",
             "| arm | variant | seeds | held-out accuracy, last eval: mean [min, max] | Δ to its grpo: mean "
             "[lowest bound, highest bound] | deliberate fraction, last step (mean) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for arm in sorted({r["arm"] for r in runs}, key=lambda a: (a.split("@")[0], "@" in a)):
        own = [by[(arm, seed)] for seed in seeds if (arm, seed) in by]
        accuracies = [sum(last[1].values()) / len(last[1]) for r in own if (last := last_eval(r))]
        deltas, lows, highs = [], [], []
        for run in own:
            partner = by.get((baseline(arm), run["seed"]))
            if arm.startswith("grpo") or partner is None or not last_eval(run) or not last_eval(partner):
                continue
            mean, low, high = paired_bootstrap(last_eval(run)[1], last_eval(partner)[1])
            deltas.append(mean), lows.append(low), highs.append(high)
        delib = [r["styles"][r["rows"][-1][keys.STEP]]["deliberate_frac"] for r in own
                 if r["rows"][-1][keys.STEP] in r["styles"]]
        lines.append(f"| {arm.split('@')[0]} | {own[0]['variant']} | {len(own)} | "
                     f"{fmt(statistics.fmean(accuracies) if accuracies else None, '.3f')} "
                     f"[{fmt(min(accuracies, default=None), '.3f')}, {fmt(max(accuracies, default=None), '.3f')}] | "
                     + (f"{statistics.fmean(deltas):+.3f} [{min(lows):+.3f}, {max(highs):+.3f}]" if deltas else "–")
                     + f" | {fmt(statistics.fmean(delib) if delib else None, '.2f')} |")
    return lines


def official_gate_table(runs: list[dict]) -> list[str]:
    """Per official run and step: whether λ acted (the gate), the mean and max λ_i over the responses with a teacher
    view and the share of them with λ_i > 0, the gate statistic (mean tppl below the spike threshold) and the target."""
    official = [r for r in runs if r["variant"] != "paper" and not r["arm"].startswith("grpo")]
    if not official:
        return []
    lines = ["", "The official arms' λ_i and gate per step (METHOD §9; gate 1 = λ acted; λ̄ / max / share > 0 over the "
             "responses with a teacher view; statistic = mean tppl below 3; target = max(0.93·M, 1.01), sd max(M − "
             "0.10, 1.01); warm-up steps have λ = 0):", "",
             "| run | gate by step | λ̄ by step | λ max by step | share λ > 0 by step | statistic by step | target | "
             "σ_ref |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in sorted(official, key=lambda r: (r["arm"], r["seed"])):
        rows = run["rows"]

        def series(key: str, spec: str) -> str:
            return " ".join(fmt(row.get(key), spec) for row in rows)

        lines.append(f"| {run['arm']} s{run['seed']} | {''.join(str(row.get(keys.GATE_OPEN, '–')) for row in rows)} | "
                     f"{series(keys.GATE_LAMBDA, '.3f')} | {series(keys.GATE_LAMBDA_MAX, '.3f')} | "
                     f"{series(keys.GATE_LAMBDA_ACTIVE_FRAC, '.2f')} | {series(keys.GATE_STATISTIC, '.3f')} | "
                     f"{fmt(rows[-1].get(keys.GATE_TARGET), '.3f')} | {fmt(rows[-1].get(keys.GATE_SIGMA_REF), '.3f')} |")
    return lines


def report(docs: Path) -> str:
    parts = ["<!-- written by scripts/styles_report.py report from the files in this folder -->", ""]
    if (docs / "calibration.json").exists():
        parts += ["### Calibration", "", *calibration_table(json.loads((docs / "calibration.json").read_text())), ""]
    probes = probe_tables(docs)
    if probes:
        parts += ["### PMI probes (base model)", "", *probes, ""]
    training = training_tables(docs)
    if training:
        parts += ["### Training", "", *training, ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("calibration", "styles", "evals", "report"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.what == "calibration":
        text = json.dumps(calibration(args.folder), indent=2) + "\n"
    elif args.what == "styles":
        text = run_styles(args.folder)
    elif args.what == "evals":
        text = run_evals(args.folder)
    else:
        text = report(args.folder)
    atomic_write_text(args.out, text)
    if args.what not in ("styles", "evals"):
        print(text)


if __name__ == "__main__":
    main()
