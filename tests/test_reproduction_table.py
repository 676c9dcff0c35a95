"""scripts/reproduction_table.py: the table of docs/reproduction.md, on hand-made run directories."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from conftest import load_script

ROOT = Path(__file__).resolve().parent.parent


def _run(root: Path, name: str, method: str, seed: int, evals: dict[int, float], lam: float, gate: str = "auto",
         steps: int = 4) -> None:
    folder = root / name
    folder.mkdir()
    config = {"update": {"method": method, "gate": gate, "warmup_steps": 2}, "loop": {"steps": steps, "seed": seed}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "eval_base.json").write_text(json.dumps({"eval/accuracy": 0.2}))
    rows = []
    for step in range(steps):
        row = {"step": step, "response/length_mean": 20.0 + step, "reward/mean": 0.1 * step,
               "gate/open": int(step >= 2), "gate/lambda": lam if step >= 2 else 0.0}
        if step in evals:
            row["eval/accuracy"] = evals[step]
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(table: str, method: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| `{method}` | "))  # the summary row
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_table_values_by_hand(tmp_path):
    _run(tmp_path, "grpo_s0", "grpo", 0, {1: 0.3, 3: 0.5}, 0.0)
    _run(tmp_path, "grpo_s1", "grpo", 1, {1: 0.4, 3: 0.3}, 0.0)
    _run(tmp_path, "antisd_s0", "antisd", 0, {1: 0.5, 3: 0.6}, 0.5)
    _run(tmp_path, "antisd_s1", "antisd", 1, {1: 0.2, 3: 0.1}, 0.5)
    _run(tmp_path, "sd-nogate_s0", "sd", 0, {1: 0.1}, 0.5, gate="off")
    table = load_script("reproduction_table").main(tmp_path)
    # GRPO seed means: step 1 → 0.35, step 3 → 0.40 (best); AntiSD seed means: 0.35, 0.35 → never reaches 0.40.
    assert "GRPO's best seed-mean held-out accuracy: 0.400" in table
    grpo = _row(table, "grpo")
    assert grpo[1:7] == ["2", "4", "0.200 (0.200, 0.200)", "0.400 (0.500, 0.300)", "0.450 (0.500, 0.400)", "3"]
    assert grpo[7] == "+0.000 (+0.000, +0.000)"
    antisd = _row(table, "antisd")
    assert antisd[4] == "0.350 (0.600, 0.100)" and antisd[6] == "never"
    assert antisd[7] == "-0.050 (+0.100, -0.200)"  # paired by seed: 0.6 − 0.5, 0.1 − 0.3
    assert antisd[8] == "21.5 (21.5, 21.5)"  # mean of 20, 21, 22, 23
    assert antisd[9] == "0.150 (0.150, 0.150)"  # mean reward of the last 4 steps: 0, .1, .2, .3
    assert antisd[10] == "1.00 (1.00, 1.00)" and antisd[11] == "0.25 (0.25, 0.25)"  # after warm-up open; λ 0,0,.5,.5
    assert "| `antisd` | 0.350 | 0.350 |" in table  # the by-step curve
    sd = _row(table, "sd-nogate")  # gate=off names the variant; its one evaluation is both final and best
    assert sd[4] == "0.100" and sd[5] == "0.100" and sd[6] == "never" and sd[7] == "-0.400"


def test_unfinished_runs_are_left_out(tmp_path):
    _run(tmp_path, "grpo_s0", "grpo", 0, {1: 0.3, 3: 0.5}, 0.0)
    folder = tmp_path / "grpo_s1"
    _run(tmp_path, "grpo_s1", "grpo", 1, {1: 0.9}, 0.0)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")  # killed after step 1
    _run(tmp_path, "base", "antisd", 0, {}, 0.0, steps=0)  # the study's shared base evaluation: a 0-step loop
    grpo = _row(load_script("reproduction_table").main(tmp_path), "grpo")
    assert grpo[1] == "1" and grpo[4] == "0.500"


def test_first_step_compares_with_grpo_on_the_same_seeds_only(tmp_path):
    # GRPO seed 2 is weak: over seeds 0-2 GRPO's best mean is 0.40, over the shared seeds 0-1 it is 0.55
    _run(tmp_path, "grpo_s0", "grpo", 0, {1: 0.5, 3: 0.6}, 0.0)
    _run(tmp_path, "grpo_s1", "grpo", 1, {1: 0.4, 3: 0.5}, 0.0)
    _run(tmp_path, "grpo_s2", "grpo", 2, {1: 0.0, 3: 0.1}, 0.0)
    _run(tmp_path, "sd_s0", "sd", 0, {1: 0.5, 3: 0.6}, 0.5)
    _run(tmp_path, "sd_s1", "sd", 1, {1: 0.4, 3: 0.4}, 0.5)  # mean 0.45, 0.50: below 0.55 at every step
    table = load_script("reproduction_table").main(tmp_path)
    assert _row(table, "sd")[6] == "never"  # unpaired it would read "1" (0.45 ≥ 0.40)


def test_paired_curves_script_reads_the_committed_csv():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "scripts/reproduction_paired.py", "docs/reproduction/arith/curves.csv"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| `")}
    assert "| 0.623 | never |" in rows["`antisd-nogate`"] and "| 0.615 | 7 |" in rows["`antisd`"]
    assert (ROOT / "docs" / "reproduction" / "arith" / "paired.md").read_text() == out.stdout
