"""`antisd analyze pmi`: word merging, the word table on hand-made scored rows with known u, HTML escaping, files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

import schemas
from antisd_cli.main import cli
from stages.analyze import (
    PieceDecoder,
    PmiConfig,
    display_word,
    pick_rollouts,
    run,
    type_table,
    word_group_summary,
    word_spans,
)
from stages.common.figures import render_rollouts_html, u_color
from stages.common.io import build_metadata, write_artifact
from stages.lm.models import load_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def words_of(tokenizer, text: str) -> list[str]:
    texts, specials = PieceDecoder(tokenizer).decode(ids_of(tokenizer, text))
    return [display_word("".join(texts[a:b])) for a, b in word_spans(texts, specials)]


def scored_row(prompt_id, sample_idx, token_ids, s, t, h, source="peer", correct=True, problem="What is 1 + 1?",
               text="x"):
    """A complete SCORED row; u = t − s computed in float32 as the score stage stores it."""
    s32, t32 = np.asarray(s, np.float32), np.asarray(t, np.float32)
    n = len(token_ids)
    return {
        "prompt_id": prompt_id, "dataset": "test", "problem": problem, "answer": "2", "solution": None,
        "few_shot": [], "sample_idx": sample_idx, "prompt_token_ids": [1, 2], "response_token_ids": token_ids,
        "response_text": text, "sampling_logprobs": [0.0] * n, "finish_reason": "stop", "response_length": n,
        "extracted_answer": None, "reward": float(correct), "correct": correct, "verify_status": "ok",
        "group_size": 2, "group_mean_reward": 0.5, "privileged_text": None if source == "none" else "sol",
        "privileged_source": source, "peer_sample_idx": 1 - sample_idx if source == "peer" else None,
        "student_logprobs": s32.tolist(),
        "teacher_logprobs": t32.tolist(), "teacher_entropy": list(map(float, h)), "student_entropy": [1.0] * n,
        "pmi": (t32 - s32).tolist(), "teacher_prompt_length": 10,
    }


def write_scored(path, rows, model):
    table = pa.Table.from_pylist(rows, schema=schemas.SCORED)
    write_artifact(table, path, "scored", build_metadata("scored", {"model": str(model)}))
    return path


@pytest.fixture
def known_scored(tmp_path, tiny_model_dir, tokenizer):
    """Three rollouts whose per-word u is known exactly (values are binary fractions, exact in float32).

    Row A (peer, correct): " Given"(u=+1) " the"(0) " box"+"ed"(+1 − 0.5) "\\n"(0) "Wait"(−2) ","(0) EOS(+0.5)
    Row B (reference, wrong): " Wait"(−1) " the"(+1) " Given"(+3)
    Row C (none): " Hmm" " Wait" with u = 0 — must be left out entirely.
    """
    tok = lambda text: ids_of(tokenizer, text)  # noqa: E731
    eos = tokenizer.eos_token_id
    ids_a = tok(" Given") + tok(" the") + tok(" boxed") + tok("\n") + tok("Wait") + tok(",") + [eos]
    assert len(ids_a) == 8, tokenizer.convert_ids_to_tokens(ids_a)  # " boxed" is two pieces
    row_a = scored_row("p0", 0, ids_a, s=[-1, -0.5, -2, -0.25, -1, -0.125, -0.5, -1],
                       t=[0, -0.5, -1, -0.75, -1, -2.125, -0.5, -0.5], h=[1.5, 2, 3, 4, 5, 6, 7, 8])
    ids_b = tok(" Wait") + tok(" the") + tok(" Given")
    row_b = scored_row("p0", 1, ids_b, s=[-0.5, -1, -3], t=[-1.5, 0, 0], h=[1, 1, 1], source="reference",
                       correct=False)
    ids_c = tok(" Hmm") + tok(" Wait")
    row_c = scored_row("p1", 0, ids_c, s=[-4, -4], t=[-4, -4], h=[1, 1], source="none")
    return write_scored(tmp_path / "scored.parquet", [row_a, row_b, row_c], tiny_model_dir)


def read_csv(path):
    with open(path) as handle:
        return {row["word"]: row for row in csv.DictReader(handle)}


# --- word merging -------------------------------------------------------------------------------------------------


def test_multi_piece_words_merge_into_one_word(tokenizer):
    assert words_of(tokenizer, " boxed naïve") == ["boxed", "naïve"]
    assert len(ids_of(tokenizer, " boxed naïve")) == 4


def test_digits_split_by_the_tokenizer_form_one_number_word(tokenizer):
    assert words_of(tokenizer, "x = 12345") == ["x", "=", "12345"]


def test_line_start_word_is_split_from_the_newline_and_punctuation(tokenizer):
    assert words_of(tokenizer, "7.\n\nWait, let's") == ["7", ".", "\\n\\n", "Wait", ",", "let", "'s"]


def test_character_split_over_pieces_is_decoded_once(tokenizer):
    ids = ids_of(tokenizer, "漢字 鬱")
    texts, specials = PieceDecoder(tokenizer).decode(ids)
    assert len(ids) > 3 and "" in texts  # some piece holds only part of a character
    assert "".join(texts) == tokenizer.decode(ids)
    assert [display_word("".join(texts[a:b])) for a, b in word_spans(texts, specials)] == ["漢字", "鬱"]


def test_special_token_is_its_own_word(tokenizer):
    ids = ids_of(tokenizer, "done") + [tokenizer.eos_token_id]
    texts, specials = PieceDecoder(tokenizer).decode(ids)
    assert specials == [False, True]
    assert word_spans(texts, specials) == [(0, 1), (1, 2)]


def test_piece_texts_reassemble_the_decoded_response(tokenizer):
    text = "So the answer is \\boxed{37}.\n\nAlternatively, 12 + 25 = 37 — naïve 🙂"
    ids = ids_of(tokenizer, text)
    texts, _ = PieceDecoder(tokenizer).decode(ids)
    assert "".join(texts) == text


# --- pure statistics ----------------------------------------------------------------------------------------------


def test_type_table_sorts_by_mean_u_and_counts():
    s = np.log(np.array([0.5, 0.25, 1.0, 0.5]))
    t = np.log(np.array([1.0, 0.5, 0.5, 0.5]))
    rows = type_table(["a", "b", "a", "c"], s, t, t - s, np.array([1.0, 2.0, 3.0, 4.0]))
    assert [r["type"] for r in rows] == ["b", "a", "c"]  # a and c tie at u = 0: the more frequent first
    a = rows[1]
    assert a["count"] == 2 and a["mean_p_student"] == pytest.approx(0.75) and a["mean_p_teacher"] == pytest.approx(0.75)
    assert a["mean_u"] == pytest.approx(0.0) and a["mean_teacher_entropy"] == pytest.approx(2.0)


def test_word_group_summary_is_case_insensitive_and_reports_missing_words():
    lowered = np.array(["wait", "wait", "the", "hmm"])
    u = np.array([-1.0, -3.0, 5.0, 1.0])
    summary = word_group_summary(lowered, -np.ones(4), u - 1, u, ("Wait", "Hmm", "Maybe"))
    assert summary["words"]["Wait"]["count"] == 2 and summary["words"]["Wait"]["mean_u"] == pytest.approx(-2.0)
    assert summary["words"]["Maybe"] == {"count": 0, "mean_u": None, "median_u": None, "mean_p_student": None,
                                         "mean_p_teacher": None}
    assert summary["count"] == 3 and summary["mean_u"] == pytest.approx(-1.0)


def test_u_color_is_white_at_zero_and_saturates_at_the_clip():
    assert u_color(0.0, 2.0) == "#ffffff"
    assert u_color(2.0, 2.0) == u_color(50.0, 2.0) == "#b2182b"
    assert u_color(-2.0, 2.0) == u_color(-1e9, 2.0) == "#2166ac"
    assert u_color(float("nan"), 2.0) == "#ffffff"


def test_pick_rollouts_mixes_correct_and_wrong():
    chosen = pick_rollouts([True] * 10 + [False] * 10, 4, seed=3)
    assert len(chosen) == 4 and sum(i < 10 for i in chosen) == 2
    assert pick_rollouts([True, True], 5, seed=0) == [0, 1]


# --- the stage on known values ------------------------------------------------------------------------------------


def test_tokens_csv_has_the_known_word_statistics(known_scored, tmp_path):
    out = run(PmiConfig(scored=(str(known_scored),), out=str(tmp_path / "pmi")))
    words = read_csv(out / "tokens.csv")
    expected = {  # word: (count, mean u, median u, mean p_student, mean p_teacher)
        "Given": (2, 2.0, 2.0, (math.exp(-1) + math.exp(-3)) / 2, 1.0),
        "Wait": (2, -1.5, -1.5, (math.exp(-0.125) + math.exp(-0.5)) / 2, (math.exp(-2.125) + math.exp(-1.5)) / 2),
        "the": (2, 0.5, 0.5, (math.exp(-0.5) + math.exp(-1)) / 2, (math.exp(-0.5) + 1) / 2),
        "boxed": (1, 0.5, 0.5, math.exp(-2.25), math.exp(-1.75)),
        "<|im_end|>": (1, 0.5, 0.5, math.exp(-1), math.exp(-0.5)),
        "\\n": (1, 0.0, 0.0, math.exp(-1), math.exp(-1)),
        ",": (1, 0.0, 0.0, math.exp(-0.5), math.exp(-0.5)),
    }
    assert set(words) == set(expected)
    for word, (count, mean_u, median_u, p_s, p_t) in expected.items():
        row = words[word]
        assert int(row["count"]) == count, word
        assert float(row["mean_u"]) == pytest.approx(mean_u, abs=1e-5), word
        assert float(row["median_u"]) == pytest.approx(median_u, abs=1e-5), word
        assert float(row["mean_p_student"]) == pytest.approx(p_s, rel=1e-5), word
        assert float(row["mean_p_teacher"]) == pytest.approx(p_t, rel=1e-5), word
    assert float(words["boxed"]["mean_teacher_entropy"]) == pytest.approx(3.0)  # H at the first piece
    assert list(words) == ["Given", "the", "boxed", "<|im_end|>", "\\n", ",", "Wait"]  # by mean u, then count


def test_summary_contrasts_deliberation_and_shortcut_words(known_scored, tmp_path):
    out = run(PmiConfig(scored=(str(known_scored),), out=str(tmp_path / "pmi"), min_count=2))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == 3 and summary["rows_analysed"] == 2 and summary["rows_without_context"] == 1
    assert summary["tokens"] == 11 and summary["words"] == 10
    assert summary["deliberation"]["count"] == 2 and summary["deliberation"]["mean_u"] == pytest.approx(-1.5)
    assert summary["deliberation"]["words"]["Hmm"]["count"] == 0  # only in the row without context
    assert summary["shortcut"]["count"] == 2 and summary["shortcut"]["mean_u"] == pytest.approx(2.0)
    assert summary["deliberation_minus_shortcut_mean_u"] == pytest.approx(-3.5)
    assert [r["word"] for r in summary["top_inflated"]] == ["Given", "the"]
    assert [r["word"] for r in summary["top_deflated"]] == ["Wait"]
    assert summary["mean_u_token_wrong"] == pytest.approx(1.0)


def test_custom_word_lists_change_the_groups(known_scored, tmp_path):
    out = run(PmiConfig(scored=(str(known_scored),), out=str(tmp_path / "pmi"), deliberation_words=("the",),
                        shortcut_words=("BOXED", "given")))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["deliberation"]["mean_u"] == pytest.approx(0.5)
    assert summary["shortcut"]["count"] == 3 and summary["shortcut"]["mean_u"] == pytest.approx(1.5)


def test_pieces_csv_keeps_the_per_token_table(known_scored, tmp_path, tokenizer):
    out = run(PmiConfig(scored=(str(known_scored),), out=str(tmp_path / "pmi")))
    with open(out / "pieces.csv") as handle:
        pieces = {int(r["token_id"]): r for r in csv.DictReader(handle)}
    ed = pieces[ids_of(tokenizer, " boxed")[1]]
    assert ed["text"] == "ed" and float(ed["mean_u"]) == pytest.approx(-0.5)
    assert pieces[ids_of(tokenizer, " Wait")[0]]["text"] == "␣Wait"


def test_heatmap_is_a_real_png(known_scored, tmp_path):
    out = run(PmiConfig(scored=(str(known_scored),), out=str(tmp_path / "pmi"), min_count=1))
    data = (out / "heatmap.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_html_escapes_model_text(tmp_path, tiny_model_dir, tokenizer):
    ids = ids_of(tokenizer, '<script>alert("x")</script> & done')
    n = len(ids)
    row = scored_row("p0", 0, ids, s=[-1.0] * n, t=[-0.5] * n, h=[1.0] * n, problem="<img src=x onerror=alert(1)>")
    path = write_scored(tmp_path / "evil.parquet", [row], tiny_model_dir)
    page = (run(PmiConfig(scored=(str(path),), out=str(tmp_path / "pmi"))) / "rollouts.html").read_text()
    assert "<script>" not in page and "<img" not in page
    assert ">&lt;</span>" in page and "&lt;img src=x onerror=alert(1)&gt;" in page and "&amp;" in page
    assert 'title="&#x27;&lt;' in page  # the hover text is escaped too (repr of the piece "<")


def test_render_rollouts_html_shows_hover_values():
    page = render_rollouts_html(
        [{"header": {"prompt": "a"}, "problem": "p", "tokens": [(" Wait", False, -0.5, -1.5, -1.0, 2.25)]}], clip=2.0)
    assert 'title="&#x27; Wait&#x27; s=-0.500 t=-1.500 u=-1.000 H=2.250"' in page
    assert f"background:{u_color(-1.0, 2.0)}" in page


# --- CLI ----------------------------------------------------------------------------------------------------------


def test_cli_prints_the_table_and_the_folder(known_scored, tmp_path):
    out = tmp_path / "pmi"
    result = CliRunner().invoke(cli, ["analyze", "pmi", str(known_scored), "--out", str(out), "--min-count", "1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == str(out)
    assert "Deliberation vs shortcut" in result.stdout and "Wait" in result.stdout and "-1.500" in result.stdout
    for name in ("tokens.csv", "pieces.csv", "heatmap.png", "rollouts.html", "summary.json"):
        assert (out / name).exists(), name


def test_cli_refuses_to_overwrite_an_analysis(known_scored, tmp_path):
    out = tmp_path / "pmi"
    args = ["analyze", "pmi", str(known_scored), "--out", str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    before = (out / "tokens.csv").read_text()
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "--overwrite" in result.stderr and "summary.json" in result.stderr
    assert (out / "tokens.csv").read_text() == before
    assert CliRunner().invoke(cli, args + ["--overwrite"]).exit_code == 0


def _bad_rows(tmp_path, tiny_model_dir, kind):
    if kind == "none_only":
        rows = [scored_row("p", 0, [260], s=[-1.0], t=[-1.0], h=[1.0], source="none")]
    else:
        rows = [scored_row("p", 0, [260, 260], s=[-1.0, -1.0], t=[-1.0, -1.0], h=[1.0, 1.0])]
        rows[0]["teacher_entropy"] = [1.0]
    return write_scored(tmp_path / f"{kind}.parquet", rows, tiny_model_dir)


@pytest.mark.parametrize("kind, message", [("none_only", "privileged_source none"), ("ragged", "1 values for 2 response tokens")])
def test_cli_rejects_unusable_scored_rows(tmp_path, tiny_model_dir, kind, message):
    path = _bad_rows(tmp_path, tiny_model_dir, kind)
    result = CliRunner().invoke(cli, ["analyze", "pmi", str(path), "--out", str(tmp_path / "pmi")])
    assert result.exit_code == 2 and message in result.stderr and str(path) in result.stderr
    assert not (tmp_path / "pmi").exists()


def test_cli_rejects_a_file_of_an_earlier_stage(tmp_path, arith_prompts):
    result = CliRunner().invoke(cli, ["analyze", "pmi", str(arith_prompts), "--out", str(tmp_path / "pmi")])
    assert result.exit_code == 2 and str(arith_prompts) in result.stderr and "scored" in result.stderr


@pytest.mark.parametrize("args, message", [
    ([], "at least one scored"),
    (["{scored}", "--prompts", "{scored}"], "not both"),
    (["{scored}", "--model", "/no/such/model"], "/no/such/model"),
    (["{scored}", "--deliberation-words", " , "], "at least one word"),
    (["{scored}", "--clip", "0"], "--clip"),
])
def test_cli_bad_input_exits_2(known_scored, tmp_path, args, message):
    args = [a.replace("{scored}", str(known_scored)) for a in args]
    result = CliRunner().invoke(cli, ["analyze", "pmi", *args, "--out", str(tmp_path / "pmi")])
    assert result.exit_code == 2, result.output
    assert message in result.stderr


def test_cli_names_a_vanished_metadata_model(tmp_path, tokenizer):
    ids = ids_of(tokenizer, " the")
    path = write_scored(tmp_path / "s.parquet", [scored_row("p", 0, ids, [-1.0], [0.0], [1.0])], tmp_path / "gone")
    result = CliRunner().invoke(cli, ["analyze", "pmi", str(path), "--out", str(tmp_path / "pmi")])
    assert result.exit_code == 2 and "pass --model" in result.stderr and str(path) in result.stderr


def test_prompts_mode_samples_verifies_and_scores_first(tmp_path, arith_prompts, tiny_model_dir):
    out = tmp_path / "pmi"
    result = CliRunner().invoke(cli, ["analyze", "pmi", "--prompts", str(arith_prompts), "--model", str(tiny_model_dir),
                                      "--n", "2", "--max-new-tokens", "6", "--min-count", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    import pyarrow.parquet as pq

    scored = pq.read_table(out / "scored.parquet")
    assert scored.num_rows == 4 * 2
    assert (out / "tokens.csv").read_text().startswith("word,")
    assert json.loads((out / "summary.json").read_text())


# --- probes and the gate's noise -----------------------------------------------------------------------------------


def _record(problem, style, peer, note, first_u, words):
    return {"problem": problem, "style": style, "peer_style": peer, "note": note, "first_u": first_u, "words": words}


def test_probe_table_splits_cells_and_weights_occurrences():
    from stages.method.probes import FIRST_TOKEN, probe_table

    records = [_record("p0", "deliberate", "direct", "correct", -1.0, [("Split", -1.0), ("Check", -2.0)]),
               _record("p1", "deliberate", "direct", "correct", -3.0, [("check", -4.0), ("Check", 0.0)]),
               _record("p1", "direct", "direct", "incorrect", 0.5, [("12", 0.5)])]
    rows = {(r["probe"], r["style"], r["note"]): r for r in probe_table(records, ["Check"], resamples=200)}
    first = rows[(FIRST_TOKEN, "deliberate", "correct")]
    assert first["mean_u"] == pytest.approx(-2.0) and first["problems"] == 2 and first["occurrences"] == 2
    check = rows[("Check", "deliberate", "correct")]
    assert check["occurrences"] == 3 and check["mean_u"] == pytest.approx(-2.0)  # pooled: (−2 − 4 + 0) / 3
    # resampling whole problems: p0 alone gives −2, p1 alone −2: every resample is −2
    assert check["ci_low"] == pytest.approx(-2.0) and check["ci_high"] == pytest.approx(-2.0)
    assert rows[(FIRST_TOKEN, "direct", "incorrect")]["ci_low"] is None  # one problem: no interval
    assert ("Check", "direct", "incorrect") not in rows


def test_cluster_bootstrap_interval_covers_the_problem_means_and_is_seeded():
    from stages.method.probes import cluster_bootstrap

    sums, counts = [-4.0, 0.0, 2.0, -1.0], [2, 1, 1, 1]
    low, high = cluster_bootstrap(sums, counts, resamples=500, seed=1)
    assert -2.0 <= low < -0.6 < high <= 2.0  # the pooled mean −0.6 lies inside; bounds within the problem ratios
    assert (low, high) == cluster_bootstrap(sums, counts, resamples=500, seed=1)


def test_gate_noise_is_zero_for_identical_problems_and_positive_otherwise():
    from stages.method.probes import gate_noise

    same = {f"p{i}": [[1.0, 2.0, 3.0]] for i in range(10)}
    flat = gate_noise(same, 4, draws=50)
    assert flat["std"] == 0 and flat["cv"] == 0 and flat["frac_below_down"] == 0 and flat["pooled_median"] == 2.0
    spread = {f"p{i}": [[float(i)] * 3] for i in range(10)}
    noisy = gate_noise(spread, 4, draws=400, seed=2)
    assert noisy["cv"] > 0.1 and 0 < noisy["frac_below_down"] < 1
    assert gate_noise(spread, 11) is None


def test_probes_csv_and_summary_through_the_stage(tmp_path, tiny_model_dir, tokenizer):
    tok = lambda text: ids_of(tokenizer, text)  # noqa: E731
    ids = tok("Split") + tok(":") + tok(" Check")
    rows = [scored_row("p0", 0, ids, s=[-1, -1, -1], t=[-2, -1, -3], h=[1, 2, 3], text="Split: Check"),
            scored_row("p1", 0, ids, s=[-1, -1, -1], t=[-1.5, -1, -1], h=[1, 2, 3], text="Split: Check",
                       correct=False)]
    rows[0]["privileged_text"] = rows[1]["privileged_text"] = "12 + 25 = 37."
    path = write_scored(tmp_path / "s.parquet", rows, tiny_model_dir)
    out = run(PmiConfig(scored=(str(path),), out=str(tmp_path / "pmi"), probes=("Check",), style_marker="Split:",
                        gate_subset=1, gate_draws=20))
    summary = json.loads((out / "summary.json").read_text())
    cells = {(r["probe"], r["note"]): r for r in summary["probes"]}
    assert cells[("<first token>", "correct")]["mean_u"] == pytest.approx(-1.0)
    assert cells[("Check", "correct")]["mean_u"] == pytest.approx(-2.0)
    assert cells[("Check", "incorrect")]["mean_u"] == pytest.approx(0.0)
    assert {r["style"] for r in summary["probes"]} == {"deliberate"} and {r["peer_style"] for r in summary["probes"]} == {"direct"}
    assert summary["gate_noise"]["subset"] == 1 and summary["gate_noise"]["std"] == 0  # both rows: H median 2
    assert summary["word_lists"]["shortcut"] == ["Given", "Assign", "holds", "Therefore"]
    with open(out / "probes.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(summary["probes"])


def test_cli_refuses_a_file_scored_without_the_teacher_pass(tmp_path, tiny_model_dir):
    import json

    import pyarrow.parquet as pq

    path = _bad_rows(tmp_path, tiny_model_dir, "ragged").with_name("ok.parquet")
    rows = [scored_row("p", 0, [260], s=[-1.0], t=[-1.0], h=[1.0])]
    write_scored(path, rows, tiny_model_dir)
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"antisd"])
    meta["teacher"] = False  # what `score --no-teacher` (a grpo loop) records
    pq.write_table(table.replace_schema_metadata({b"antisd": json.dumps(meta).encode()}), path)
    result = CliRunner().invoke(cli, ["analyze", "pmi", str(path), "--out", str(tmp_path / "pmi")])
    assert result.exit_code == 2 and "without the teacher pass" in result.stderr and str(path) in result.stderr
