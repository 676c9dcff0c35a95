"""Does another transformers version read a checkpoint the way this one wrote it?

    python scripts/check_checkpoint_compat.py CKPT --json a.json                  # the writing version (.venv)
    /path/to/venv-4.57/bin/python scripts/check_checkpoint_compat.py CKPT --json b.json --compare a.json

Prints (and saves) what a reader sees: transformers version, RoPE base, tokenizer class, the chat-templated ids of a
fixed conversation, and the logits of a fixed input; `--compare` exits 1 unless the second reading equals the first
(ids exactly, logits within 1e-4: the same fp32 weights through kernels of two versions). Needs only torch and
transformers (it imports nothing of antisd), so it runs in any environment.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MESSAGES = [{"role": "user", "content": "What is 12 + 25? Put the final answer in \\boxed{}."}]


def read(folder: Path) -> dict:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    rope = getattr(config, "rope_theta", None)
    if rope is None and isinstance(getattr(config, "rope_parameters", None), dict):
        rope = config.rope_parameters.get("rope_theta")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits[0, -4:, :8]
    return {"transformers": transformers.__version__, "rope_theta": rope, "tokenizer": type(tokenizer).__name__,
            "ids": list(map(int, ids)), "logits": logits.tolist()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--json", type=Path, help="write the reading here")
    parser.add_argument("--compare", type=Path, help="a reading by another version to compare with")
    args = parser.parse_args()
    reading = read(args.checkpoint)
    print(json.dumps({k: v for k, v in reading.items() if k != "logits"}))
    if args.json:
        args.json.write_text(json.dumps(reading))
    if args.compare:
        other = json.loads(args.compare.read_text())
        worst = max(abs(a - b) for row_a, row_b in zip(reading["logits"], other["logits"]) for a, b in zip(row_a, row_b))
        same = reading["ids"] == other["ids"] and reading["rope_theta"] == other["rope_theta"] and worst <= 1e-4
        print(f"{other['transformers']} vs {reading['transformers']}: rope_theta {other['rope_theta']} / "
              f"{reading['rope_theta']}, ids {'equal' if reading['ids'] == other['ids'] else 'DIFFER'}, "
              f"max |Δ logit| {worst:.2e} → {'same model' if same else 'DIFFERENT'}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
