"""scripts/gpu_check.sh --cpu-smoke: the GPU check's flow at toy size on CPU (a Qwen3-shaped random model, a resident
run killed at step 1's checkpoint and resumed, a run without the resident trainer, a run as 1 rank under torchrun,
evaluation every step), and the tokenizer it carries to the GPU machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_cpu_smoke_runs_the_gpu_checks_flow(tmp_path):
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-smoke", "--out", str(tmp_path / "out"),
                             "--python", sys.executable], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "gpu_check.sh: passed" in result.stdout and "killed at step 1's checkpoint: exit -9" in result.stdout
    for run, steps in (("run_resident", 2), ("run_not_resident", 2), ("run_torchrun", 1)):
        rows = (tmp_path / "out" / run / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == steps and all('"memory/peak_gib/update"' in row and '"eval/accuracy"' in row
                                          for row in rows)
    assert "run C (torchrun --nproc-per-node 1): exit 0" in result.stdout


def test_the_carried_tokenizer_decodes_every_id_of_qwen3s_vocabulary(tmp_path, embedded_model_dir):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    from transformers import AutoTokenizer

    folder = gpu_check.prepare_tokenizer(tmp_path / "tok")
    extended, original = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(embedded_model_dir)
    assert len(extended) == gpu_check.QWEN3_VOCAB == 151_936
    text = "What is 12 + 30? The final answer is \\boxed{42}."
    assert extended(text)["input_ids"] == original(text)["input_ids"]  # encoding unchanged: no merge reaches fillers
    assert extended.decode([151_935, 49_152]) == "<pad151935><pad49152>"
