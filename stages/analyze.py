"""`antisd analyze pmi`: which words the privileged context inflates (u ≫ 0) and deflates (u ≪ 0) (METHOD §7).

In: scored Parquet files (schemas.SCORED). Out, in one folder: `tokens.csv` (one row per word type), `pieces.csv` (one
row per token id), `heatmap.png` (2-D histogram over (p_s, p_t) coloured by mean u), `rollouts.html` (tokens coloured
by u, hover shows s, t, u, H), `probes.csv` (mean u at probe positions by rollout style × context style × the
teacher's note, `stages.method.probes`) and `summary.json` (deliberation vs shortcut words, the probes, the gate's
sampling noise).

Definitions (u_t = t_t − s_t, p_s = e^s, p_t = e^t, per response token; rows whose privileged_source is "none" have
u = 0 by construction and are left out of every statistic):
- Token text comes from the sampled ids (never from response_text): byte-level BPE pieces are decoded to bytes and
  through an incremental UTF-8 decoder, so a character split over two pieces appears on the piece that completes it.
- Words follow the GPT-2 pre-tokenizer's idea of a word: a new word starts at a piece that begins with whitespace,
  after a whitespace piece (a lone " " piece instead prefixes the next word, as in " 12345"), where the character class
  changes (letter / digit / other) and at special tokens; whitespace runs form their own word.
- A word's s, t and u are the SUMS over its pieces (chain rule: log p(word) = Σ log p(piece), so u_word is the word's
  PMI with c); p_student/p_teacher = e^{Σ s}, e^{Σ t}; H is the teacher entropy at the word's first piece.
- Word types are the stripped word text, case kept; whitespace-only words show as ␣ and \\n.
- The deliberation / shortcut lists match word types case-insensitively; the defaults are METHOD §7's.
- Probes: the first response token, and every occurrence of each `--probe` word. A rollout's style (and its
  context's) is "deliberate" when its text begins with `--style-marker`, else "direct" ("-" without a marker).

With `--prompts` the files are made first: the prompts are sampled, verified and scored with `--model` by the rollout,
verify and score commands, into the output folder (`scored_inputs`). Not done here: drawing the heatmap and the
HTML page, which live in `stages.common.figures` with the other figures.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.common import validation
from stages.common.errors import InputError
from stages.common.io import atomic_write_json, atomic_write_text, read_artifact
from stages.lm.pieces import BYTE_DECODER, PieceDecoder, display_word, visible, word_spans  # noqa: F401

log = logging.getLogger(__name__)

DELIBERATION_WORDS = ("Wait", "Let", "Maybe", "Alternatively", "But", "Hmm")  # METHOD §7
SHORTCUT_WORDS = ("Given", "Assign", "holds", "Therefore")  # METHOD §7
OUTPUT_FILES = ("tokens.csv", "pieces.csv", "probes.csv", "heatmap.png", "rollouts.html", "summary.json")
COLUMNS = ["prompt_id", "sample_idx", "problem", "reward", "correct", "privileged_source", "privileged_text",
           "response_text", "response_token_ids", "student_logprobs", "teacher_logprobs", "pmi", "teacher_entropy"]


@dataclass(frozen=True)
class PmiConfig:
    """Options of `antisd analyze pmi`."""

    scored: tuple[str, ...] = ()  # scored Parquet files (or part directories), pooled
    out: str = "pmi"  # output folder (created; its parent must exist)
    model: str | None = None  # tokenizer source; None = config.model of the first scored file, else smollm2-135m
    prompts: str | None = None  # a prompts Parquet: rollout, verify and score it with `model` first (into `out`)
    n: int = 4  # --prompts mode: samples per prompt
    temperature: float = 1.0  # --prompts mode: sampling temperature
    max_new_tokens: int = 256  # --prompts mode: response length cap
    deliberation_words: tuple[str, ...] = DELIBERATION_WORDS  # matched case-insensitively on the stripped word
    shortcut_words: tuple[str, ...] = SHORTCUT_WORDS
    min_count: int = 5  # printed tables and heatmap labels: only word types seen at least this often
    top: int = 10  # printed table: this many most inflated and most deflated word types
    rollouts: int = 8  # rollouts rendered in rollouts.html (half correct, half wrong where possible)
    seed: int = 0  # picks the rendered rollouts
    clip: float = 2.0  # colour scales of u are clipped to ±clip
    bins: int = 20  # heatmap bins per axis over [0, 1]
    probes: tuple[str, ...] = ()  # words whose u probes.csv reports (the first response token always)
    style_marker: str | None = None  # a text beginning with it is "deliberate", else "direct"; None = no styles
    resamples: int = 1000  # bootstrap resamples (over problems) of the probe intervals
    gate_subset: int = 0  # problems per draw of the gate-noise estimate (a step's prompts); 0 = not estimated
    gate_draws: int = 1000  # draws of the gate-noise estimate
    overwrite: bool = False  # replace existing output files in `out`

    def __post_init__(self):
        check = validation.Checks(self)
        check.at_least(1, "n", "max_new_tokens", "min_count")
        check.at_least(0, "temperature", "top", "rollouts")
        check.above(0, "clip")
        check.at_least(2, "bins")
        check.at_least(1, "resamples", "gate_draws")
        check.at_least(0, "gate_subset")
        check.require(bool(self.deliberation_words), "deliberation_words", "give at least one word")
        check.require(bool(self.shortcut_words), "shortcut_words", "give at least one word")
        check.done()


# --- statistics (pure) -------------------------------------------------------------------------------------------


def type_table(types: list, s: np.ndarray, t: np.ndarray, u: np.ndarray, h: np.ndarray) -> list[dict]:
    """One row per type: count, mean/median u, mean p_s = e^s, mean p_t = e^t, mean H; sorted by mean u (desc).

    `types[i]` is the type (word or token id) of occurrence i and s, t, u, h [N] its values. Ties: higher count
    first, then first appearance.
    """
    order: dict = {}
    for i, key in enumerate(types):
        order.setdefault(key, []).append(i)
    rows = []
    for key, idx in order.items():
        idx = np.asarray(idx)
        rows.append({
            "type": key, "count": int(len(idx)), "mean_u": float(u[idx].mean()), "median_u": float(np.median(u[idx])),
            "mean_p_student": float(np.exp(s[idx]).mean()), "mean_p_teacher": float(np.exp(t[idx]).mean()),
            "mean_teacher_entropy": float(h[idx].mean()),
        })
    rows.sort(key=lambda r: (-r["mean_u"], -r["count"]))
    return rows


def word_group_summary(lowered: np.ndarray, s: np.ndarray, t: np.ndarray, u: np.ndarray,
                       vocabulary: tuple[str, ...]) -> dict:
    """Mean u of a word list, per listed word and pooled over all their occurrences.

    `lowered` [N] holds the lower-cased word type of each occurrence; s, t, u [N] its values. A word never seen has
    count 0 and null statistics.
    """

    def stats(mask: np.ndarray) -> dict:
        if not mask.any():
            return {"count": 0, "mean_u": None, "median_u": None, "mean_p_student": None, "mean_p_teacher": None}
        return {"count": int(mask.sum()), "mean_u": float(u[mask].mean()), "median_u": float(np.median(u[mask])),
                "mean_p_student": float(np.exp(s[mask]).mean()), "mean_p_teacher": float(np.exp(t[mask]).mean())}

    names = [w.lower() for w in vocabulary]
    return {"words": {w: stats(lowered == w.lower()) for w in vocabulary}, **stats(np.isin(lowered, names))}


def pick_rollouts(correct: list[bool], n: int, seed: int) -> list[int]:
    """Positions of `n` rollouts to render, half correct and half wrong where possible, in input order."""
    rng = random.Random(seed)
    right = [i for i, c in enumerate(correct) if c]
    wrong = [i for i, c in enumerate(correct) if not c]
    take_right = min(len(right), max(n - len(wrong), (n + 1) // 2))
    chosen = rng.sample(right, take_right) + rng.sample(wrong, min(len(wrong), n - take_right))
    return sorted(chosen)


# --- the stage ---------------------------------------------------------------------------------------------------


def scored_inputs(config: PmiConfig, loaded=None) -> list[Path]:
    """The scored files to analyse; with `prompts`, first sample, verify and score them into `out`.

    The intermediate files (rollouts/verified/scored.parquet in `out`) are ordinary stage outputs; existing ones are
    reused, so an interrupted analysis resumes.
    """
    if config.prompts is None:
        if not config.scored:
            raise InputError("analyze pmi: give at least one scored Parquet file, or --prompts")
        return [Path(p) for p in config.scored]
    if config.scored:
        raise InputError("analyze pmi: give scored files or --prompts, not both")
    from stages import rollout, score, verify
    from stages.lm.models import DEFAULT_MODEL, load_model
    from stages.lm.sampling import RolloutConfig
    from stages.lm.scoring import ScoreConfig
    from stages.verifier.rows import VerifyConfig

    out = Path(config.out)
    out.mkdir(exist_ok=True)
    model = config.model or DEFAULT_MODEL
    files = {name: out / f"{name}.parquet" for name in ("rollouts", "verified", "scored")}
    if not files["scored"].exists():
        loaded = loaded or load_model(model)
        if not files["rollouts"].exists():
            rollout.run(RolloutConfig(prompts=config.prompts, out=str(files["rollouts"]), model=model,
                                      n=config.n, temperature=config.temperature,
                                      max_new_tokens=config.max_new_tokens, seed=config.seed), loaded=loaded)
        if not files["verified"].exists():
            verify.run(VerifyConfig(rollouts=str(files["rollouts"]), out=str(files["verified"]), seed=config.seed))
        score.run(ScoreConfig(verified=str(files["verified"]), out=str(files["scored"]), model=model),
                  loaded=loaded)
    return [files["scored"]]


def check_config(config: PmiConfig) -> Path:
    """Validate the output folder before any work (the options were checked when `config` was made); return it."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: output must be a folder, but a file exists there")
    if not out.parent.exists():
        raise InputError(f"{out}: parent folder {out.parent} does not exist")
    existing = [name for name in OUTPUT_FILES if (out / name).exists()]
    if existing and not config.overwrite:
        raise InputError(f"{out}: already holds {', '.join(existing)} (pass --overwrite to replace)")
    return out


def read_scored(paths: list[Path]) -> tuple[list[dict], dict]:
    """All rows of the scored files (checked: per-token lists aligned) and the first file's metadata."""
    rows, first_meta = [], None
    for path in paths:
        table, meta = read_artifact(path, "scored", columns=COLUMNS)
        if meta.get("teacher") is False:  # `score --no-teacher` (a grpo loop's default): teacher = student, u = 0
            raise InputError(f"{path}: scored without the teacher pass (u = 0 on every token); nothing to analyse "
                             "(rescore it with `antisd score`, or run grpo with score.teacher: true)")
        if meta.get("entropy") is False:  # `score --no-entropy` (METHOD §9 needs none): the entropy columns hold 0
            log.warning("%s: scored without entropies (score --no-entropy): its teacher entropies read 0", path)
        first_meta = meta if first_meta is None else first_meta
        for i, row in enumerate(table.to_pylist()):
            lengths = {len(row[k]) for k in ("response_token_ids", "student_logprobs", "teacher_logprobs", "pmi",
                                             "teacher_entropy")}
            if len(lengths) != 1:
                raise InputError(f"{path}: row {i} ({row['prompt_id']}#{row['sample_idx']}): per-token lists differ "
                                 f"in length {sorted(lengths)}")
            rows.append(row)
    return rows, first_meta or {}


def load_analysis_tokenizer(model: str | None, metadata: dict, source: Path):
    """The tokenizer of `model`, or of the scored file's model; a folder with a tokenizer but no weights will do."""
    from stages.lm.models import DEFAULT_MODEL, EMBEDDED_MODELS, load_tokenizer, resolve_model

    from_meta = model is None
    name = model or (metadata.get("config") or {}).get("model") or DEFAULT_MODEL
    folder = Path(name)
    has_tokenizer = (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()
    try:
        folder = folder if name not in EMBEDDED_MODELS and folder.is_dir() and has_tokenizer else resolve_model(name)
        return load_tokenizer(folder)
    except InputError as exc:
        hint = f" (model named in the metadata of {source}; pass --model)" if from_meta else ""
        raise InputError(f"{exc}{hint}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"--model {name}: could not load its tokenizer ({str(exc).splitlines()[0]})") from None


def collect(rows: list[dict], decoder: PieceDecoder) -> dict:
    """Flatten the rows into word occurrences and token occurrences: types plus [N] arrays of s, t, u, H."""
    words, word_values, piece_ids, piece_values, piece_correct = [], [], [], [], []
    for row in rows:
        values = np.array([row["student_logprobs"], row["teacher_logprobs"], row["pmi"], row["teacher_entropy"]],
                          dtype=np.float64).reshape(4, -1)  # [4, T]: s, t, u, H
        texts, specials = decoder.decode(row["response_token_ids"])
        for a, b in word_spans(texts, specials):
            words.append(display_word("".join(texts[a:b])))
            word_values.append((*values[:3, a:b].sum(axis=1), values[3, a]))  # sums of s, t, u; H at the first piece
        piece_ids.extend(int(i) for i in row["response_token_ids"])
        piece_values.append(values)
        piece_correct.extend([bool(row["correct"])] * values.shape[1])
    return {"words": words, "word_values": np.array(word_values, dtype=np.float64).reshape(-1, 4).T,  # [4, W]
            "piece_ids": piece_ids, "piece_values": np.concatenate(piece_values, axis=1),  # [4, N]
            "piece_correct": np.array(piece_correct, dtype=bool)}


def probe_records(rows: list[dict], decoder: PieceDecoder, marker: str | None) -> list[dict]:
    """The rollouts as `stages.method.probes` records: problem, styles, note, first-token u and the words' u."""

    def style(text: str | None) -> str:
        return "-" if not marker else "deliberate" if (text or "").lstrip().startswith(marker) else "direct"

    records = []
    for row in rows:
        texts, specials = decoder.decode(row["response_token_ids"])
        words = [(display_word("".join(texts[a:b])), float(sum(row["pmi"][a:b])))
                 for a, b in word_spans(texts, specials)]
        records.append({"problem": row["prompt_id"], "style": style(row["response_text"]),
                        "peer_style": style(row["privileged_text"]),
                        "note": "correct" if row["correct"] else "incorrect",
                        "first_u": float(row["pmi"][0]) if row["pmi"] else None, "words": words})
    return records


def extremes(table: list[dict], min_count: int, top: int) -> tuple[list[dict], list[dict]]:
    """The `top` most inflated and most deflated types among those seen at least `min_count` times."""
    frequent = [r for r in table if r["count"] >= min_count]
    inflated = [r for r in frequent if r["mean_u"] > 0][:top]
    deflated = [r for r in reversed(frequent) if r["mean_u"] < 0][:top]
    return inflated, deflated


def heatmap_labels(piece_rows: list[dict], decoder: PieceDecoder, config: PmiConfig) -> list[tuple]:
    """Tokens to annotate: the listed deliberation/shortcut tokens seen, then the 3 most inflated and deflated.

    Only tokens seen at least `min_count` times; at most 12 labels; each at its (mean p_s, mean p_t).
    """
    listed = {w.lower() for w in config.deliberation_words + config.shortcut_words}
    frequent = [r for r in piece_rows if r["count"] >= config.min_count]
    chosen = [r for r in frequent if decoder.piece_text(r["token_id"]).strip().lower() in listed]
    inflated, deflated = extremes(frequent, 1, 3)
    for row in inflated + deflated:
        if row not in chosen:
            chosen.append(row)
    return [(r["text"], r["mean_p_student"], r["mean_p_teacher"]) for r in chosen[:12]]


def build_summary(config: PmiConfig, data: dict, word_rows: list[dict], counts: dict) -> dict:
    """summary.json: counts, overall mean u, deliberation vs shortcut words, the extreme word types."""
    s, t, u, _ = data["word_values"]
    lowered = np.array([w.lower() for w in data["words"]])
    deliberation = word_group_summary(lowered, s, t, u, config.deliberation_words)
    shortcut = word_group_summary(lowered, s, t, u, config.shortcut_words)
    piece_u, correct = data["piece_values"][2], data["piece_correct"]
    inflated, deflated = extremes(word_rows, config.min_count, config.top)
    both = deliberation["mean_u"] is not None and shortcut["mean_u"] is not None
    return {
        **counts,
        "tokens": int(piece_u.size), "words": len(data["words"]), "word_types": len(word_rows),
        "mean_u_token": float(piece_u.mean()), "frac_u_negative_token": float((piece_u < 0).mean()),
        "mean_u_token_correct": float(piece_u[correct].mean()) if correct.any() else None,
        "mean_u_token_wrong": float(piece_u[~correct].mean()) if (~correct).any() else None,
        "deliberation": deliberation, "shortcut": shortcut,
        "deliberation_minus_shortcut_mean_u": deliberation["mean_u"] - shortcut["mean_u"] if both else None,
        "min_count": config.min_count, "top_inflated": inflated, "top_deflated": deflated,
        "definitions": {"u": "t - s per token; a word's s, t, u are sums over its pieces, H is at its first piece",
                        "excluded": "rows with privileged_source none (u = 0 by construction)"},
    }


def run(config: PmiConfig, loaded=None) -> Path:
    """Analyse the scored files of `config` into its output folder; `loaded` lends its tokenizer."""
    out = check_config(config)
    paths = scored_inputs(config, loaded)
    rows, metadata = read_scored(paths)
    used = [row for row in rows if row["privileged_source"] != "none"]
    if not used:
        raise InputError(f"{paths[0]}: every row has privileged_source none (u = 0); nothing to analyse")
    tokenizer = loaded.tokenizer if loaded is not None else load_analysis_tokenizer(config.model, metadata, paths[0])
    decoder = PieceDecoder(tokenizer)
    log.info("analysing %d of %d rollouts (%d without privileged context left out)", len(used), len(rows),
             len(rows) - len(used))

    # --- statistics
    data = collect(used, decoder)
    word_rows = [{"word": r.pop("type"), **r} for r in type_table(data["words"], *data["word_values"])]
    piece_rows = []
    for row in type_table(data["piece_ids"], *data["piece_values"]):
        token_id = row.pop("type")
        piece_rows.append({"token_id": token_id, "piece": tokenizer.convert_ids_to_tokens(token_id),
                           "text": visible(decoder.piece_text(token_id)), **row})
    counts = {"inputs": [str(p) for p in paths], "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
              "rows": len(rows), "rows_analysed": len(used), "rows_without_context": len(rows) - len(used)}
    summary = build_summary(config, data, word_rows, counts)
    from stages.method.probes import gate_noise, probe_table

    summary["probes"] = probe_table(probe_records(used, decoder, config.style_marker), config.probes,
                                    resamples=config.resamples, seed=config.seed)
    entropies: dict[str, list] = {}
    for row in used:
        entropies.setdefault(row["prompt_id"], []).append(row["teacher_entropy"])
    summary["gate_noise"] = gate_noise(entropies, config.gate_subset, draws=config.gate_draws, seed=config.seed)
    summary["word_lists"] = {"deliberation": list(config.deliberation_words), "shortcut": list(config.shortcut_words),
                             "style_marker": config.style_marker}

    # --- rollouts to render
    rendered = []
    for i in pick_rollouts([bool(r["correct"]) for r in used], config.rollouts, config.seed):
        row = used[i]
        texts, specials = decoder.decode(row["response_token_ids"])
        values = zip(row["student_logprobs"], row["teacher_logprobs"], row["pmi"], row["teacher_entropy"])
        rendered.append({
            "header": {"prompt": row["prompt_id"], "sample": row["sample_idx"], "reward": row["reward"],
                       "context": row["privileged_source"]},
            "problem": row["problem"], "tokens": [(x, sp, *v) for x, sp, v in zip(texts, specials, values)],
        })

    # --- write (summary.json last: its presence marks a complete folder)
    from stages.common.figures import draw_pmi_heatmap, render_rollouts_html, to_csv

    out.mkdir(exist_ok=True)
    stat_columns = ["count", "mean_u", "median_u", "mean_p_student", "mean_p_teacher", "mean_teacher_entropy"]
    atomic_write_text(out / "tokens.csv", to_csv(word_rows, ["word", *stat_columns]))
    atomic_write_text(out / "pieces.csv", to_csv(piece_rows, ["token_id", "piece", "text", *stat_columns]))
    atomic_write_text(out / "probes.csv", to_csv(summary["probes"], ["probe", "style", "peer_style", "note",
                                                                     "occurrences", "problems", "mean_u", "ci_low",
                                                                     "ci_high"]))
    atomic_write_text(out / "rollouts.html", render_rollouts_html(rendered, config.clip))
    labels = heatmap_labels(piece_rows, decoder, config)
    s, t, u, _ = data["piece_values"]
    draw_pmi_heatmap(out / "heatmap.png", np.exp(s), np.exp(t), u, labels, bins=config.bins, clip=config.clip)
    atomic_write_json(out / "summary.json", summary)
    mean_u = {g: "n/a" if summary[g]["mean_u"] is None else f"{summary[g]['mean_u']:+.3f}"
              for g in ("deliberation", "shortcut")}
    log.info("%d tokens, %d words (%d types); mean u: deliberation %s, shortcut %s", summary["tokens"],
             summary["words"], summary["word_types"], mean_u["deliberation"], mean_u["shortcut"])
    return out
