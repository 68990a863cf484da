"""The evaluation CLI end to end on a tiny saved target + Medusa drafter, and lossless decoding of chat prompts
that end right at a multi-turn boundary."""
import json

import pytest
import torch

from conftest import perturbed_medusa

from drafters import MedusaModel, load_drafter
from drafters.draft_lm import build_draft_lm
from inference.eval_config import ConfigError, EvalConfig
from inference.evaluate import evaluate_drafter, format_table, main
from inference.metrics import answer_repetition, repeated_ngrams
from target.model import stop_tokens
from inference.proposers import MedusaProposer
from inference.speculative import speculative_generate
from target.model import load_target
from conftest import make_tiny_target
from tiny_assets import tiny_tokenizer, write_questions, write_tiny_target

REPORT_FIELDS = {"tau", "speedup", "tokens_per_s", "baseline_tokens_per_s", "target_forwards", "new_tokens"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    target_dir = write_tiny_target(root / "target")
    target, _ = load_target(target_dir)
    drafter = perturbed_medusa(target)
    drafter.config.head_topk_accuracy = [[0.5, 0.2, 0.1], [0.3, 0.1, 0.1], [0.2, 0.1, 0.05]]
    drafter.save_pretrained(root / "drafter")
    return {"target": target_dir, "drafter": str(root / "drafter"), "questions": write_questions(root / "q.jsonl"),
            "root": root}


def test_evaluate_cli_writes_report_and_is_lossless(saved, capsys):
    out = saved["root"] / "eval.json"
    main(["--target", saved["target"], "--drafter", saved["drafter"], "--questions", saved["questions"],
          "--output", str(out), "--max-new-tokens", "24", "--check-lossless", "--max-tree-nodes", "8",
          "--min-speedup", "0.01"])
    report = json.loads(out.read_text())
    assert report["lossless"] == {"checked": 5, "mismatches": 0}  # 4 questions, one with two turns
    assert set(report["per_category"]) == {"writing", "qa"}
    for row in [report["overall"], *report["per_category"].values()]:
        assert REPORT_FIELDS <= set(row)
        assert row["tau"] == pytest.approx(row["new_tokens"] / row["target_forwards"])
        assert row["tau"] >= 1.0
    cats = report["per_category"].values()
    assert report["overall"]["new_tokens"] == sum(r["new_tokens"] for r in cats)
    assert report["overall"]["target_forwards"] == sum(r["target_forwards"] for r in cats)
    assert 2 <= report["setup"]["proposer"]["nodes"] <= 8
    answers = report["answers"]  # the target's own answers, in question order, one text per turn
    questions = [json.loads(line) for line in open(saved["questions"])]
    assert [(a["question_id"], a["category"], len(a["turns"])) for a in answers] == \
        [(q["question_id"], q["category"], len(q["turns"])) for q in questions]
    assert sum(map(sum, (a["new_tokens"] for a in answers))) == report["overall"]["new_tokens"]
    assert all(n <= 24 and (stop or n == 24) for a in answers for n, stop in zip(a["new_tokens"], a["stopped"]))
    rep = report["answer_repetition"]
    assert (rep["turns"], rep["turns_at_budget"]) == (5, sum(not s for a in answers for s in a["stopped"]))
    assert rep["repeated_share"] == sum(map(sum, (a["repeated"] for a in answers))) / report["overall"]["new_tokens"]
    table = capsys.readouterr().out
    assert f"target's answers: {rep['turns_at_budget']} of 5 ran to max_new_tokens" in table
    assert table.splitlines()[0].split()[:3] == ["category", "tau", "speedup"] and "overall" in table
    assert format_table(report) in table


def test_evaluate_refuses_drafter_of_another_target(saved, tmp_path):
    other = MedusaModel.from_target(make_tiny_target("qwen2", vocab_size=999, hidden_size=32), num_heads=2)
    other.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="hidden_size: drafter 32, target 64; vocab_size: drafter 999, target 320"):
        load_drafter(str(tmp_path / "bad"), load_target(saved["target"])[0])


def test_prompt_at_multi_turn_boundary_is_lossless(saved):
    target, _ = load_target(saved["target"])
    tok = tiny_tokenizer()
    drafter = load_drafter(saved["drafter"], target)
    messages = [{"role": "user", "content": "Tell me about the cat."},
                {"role": "assistant", "content": "The cat sat on a mat."},
                {"role": "user", "content": "Why?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")
    reference = target.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
    proposer = MedusaProposer(drafter, [(0,), (1,), (0, 0), (0, 0, 0)])
    result = speculative_generate(target, proposer, torch.tensor(prompt), 32, stop_tokens(target, tok))
    assert result.tokens == reference


def test_vocab_cli_adds_a_frequent_token_set_that_the_evaluation_uses(saved, tmp_path):
    import shutil

    from data.vocab import main as vocab_main
    from drafters.vocab import get_draft_vocab
    from tiny_assets import write_conversations

    drafter_dir = tmp_path / "drafter"
    shutil.copytree(saved["drafter"], drafter_dir)
    data = write_conversations(tmp_path / "chats.jsonl", n=40)
    vocab_main(["--drafter", str(drafter_dir), "--target", saved["target"], "--data", data, "--size", "50",
                "--holdout", "4"])
    target, _ = load_target(saved["target"])
    drafter = load_drafter(str(drafter_dir), target)
    vocab = get_draft_vocab(drafter.config)
    assert len(vocab) == 50 == len(set(vocab)) and vocab == sorted(vocab)
    assert 0.5 < drafter.config.draftsmith["draft_vocab_heldout_coverage"] <= 1
    out = tmp_path / "eval.json"
    main(["--target", saved["target"], "--drafter", str(drafter_dir), "--questions", saved["questions"],
          "--output", str(out), "--max-new-tokens", "16", "--check-lossless", "--tree", "chain"])
    report = json.loads(out.read_text())
    assert report["setup"]["proposer"]["draft_vocab"] == 50 and report["lossless"]["mismatches"] == 0


def test_attention_benchmark_decodes_identically_with_both_attentions(saved, capsys):
    from inference.bench_attention import main as bench_main

    bench_main(["--target", saved["target"], "--drafter", saved["drafter"], "--questions", saved["questions"],
                "--limit", "3", "--max-new-tokens", "12", "--rounds", "2", "--tree", "[[0],[1],[0,0]]"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("verify forward, 6 nodes on a 300-token cache, median of 2: sdpa ")
    assert lines[1] == "tree (rank paths): [[0], [1], [0, 0]]"
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert list(rows) == ["plain", "sdpa", "grouped"]
    assert rows["plain"][:4] == ["36", "tokens,", "36", "target"]  # 3 questions x 12 tokens
    assert rows["sdpa"][0] == rows["grouped"][0] == "36" and rows["sdpa"][2] == rows["grouped"][2]
    assert int(rows["sdpa"][2]) < 36  # fewer target forwards than tokens: drafts were accepted
    bench_main(["--target", saved["target"], "--rounds", "1"])  # the verify forward alone, no drafter
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("verify forward, 6 nodes on a 300-token cache, median of 1: sdpa ")


def test_bfloat16_draft_lm_beside_float32_target_stays_lossless_in_both_loops(saved):
    """--draft-dtype: a bf16 copy of the draft drafts in draftsmith's loop and transformers' alike; verification
    in the target's fp32 keeps both exact. The caller's draft is left in fp32."""
    target, tokenizer = load_target(saved["target"])
    draft = build_draft_lm(target, 2, [0, 1])  # the target's own layers: nearly every draft is accepted
    config = EvalConfig(questions=saved["questions"], max_new_tokens=12, check_lossless=True, compare_hf=True,
                        draft_dtype="bfloat16")
    report = evaluate_drafter(target, tokenizer, draft, config, progress=False)
    assert report["setup"]["draft_dtype"] == "bfloat16" and report["setup"]["dtype"] == "float32"
    assert next(draft.parameters()).dtype == torch.float32
    assert report["lossless"]["mismatches"] == 0 == report["hf_assisted"]["lossless"]["mismatches"]
    assert report["lossless"]["checked"] == 5
    assert report["overall"]["tau"] > 2


def test_draft_dtype_is_refused_for_heads_and_unknown_names(saved, capsys):
    base = ["--target", saved["target"], "--questions", saved["questions"], "--max-new-tokens", "4"]
    with pytest.raises(SystemExit):
        main(base + ["--drafter", saved["drafter"], "--draft-dtype", "bfloat16"])
    assert "--draft-dtype='bfloat16' is for draft_lm drafters; this drafter is medusa" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--drafter", saved["drafter"], "--draft-dtype", "fp8"])
    assert "--draft-dtype='fp8' must be one of float32, bfloat16, float16 or null" in capsys.readouterr().err
    target, tokenizer = load_target(saved["target"])
    with pytest.raises(ConfigError, match="eval.draft_dtype='bfloat16' is for draft_lm drafters"):
        evaluate_drafter(target, tokenizer, load_drafter(saved["drafter"], target),
                         EvalConfig(questions=saved["questions"], max_new_tokens=4, draft_dtype="bfloat16"))


def test_prompt_lookup_is_reported_lossless_for_every_kind(saved, capsys):
    """--prompt-lookup: draftsmith's loop copies where the sequence repeats itself (tiny random targets loop)
    and drafts elsewhere, beside a draft LM and beside Medusa heads alike; the report counts the lookup steps,
    the output stays the target's greedy output, and n-grams under 2 are refused."""
    target, tokenizer = load_target(saved["target"])
    draft = build_draft_lm(target, 1, [0])
    config = EvalConfig(questions=saved["questions"], max_new_tokens=24, check_lossless=True, compare_hf=True,
                        prompt_lookup=3, prompt_lookup_tokens=5)
    report = evaluate_drafter(target, tokenizer, draft, config, progress=False)
    setup = report["setup"]["proposer"]
    assert setup["prompt_lookup"] == {"max_ngram": 3, "min_ngram": 2, "tokens": 5}
    assert 0 < setup["lookup_steps"] <= report["overall"]["verify_steps"]
    assert report["lossless"]["mismatches"] == 0 == report["hf_assisted"]["lossless"]["mismatches"]
    hf_lookup = report["hf_prompt_lookup"]  # transformers' own prompt lookup, no draft, in the same run
    assert hf_lookup["settings"] == {"prompt_lookup_num_tokens": 5, "max_matching_ngram_size": 3}
    assert hf_lookup["lossless"] == {"checked": 5, "mismatches": 0} and hf_lookup["overall"]["tau"] > 1
    assert "transformers prompt lookup (no draft), same prompts:" in format_table(report)
    assert f"prompt lookup: {setup['lookup_steps']} of {report['overall']['verify_steps']} steps" in \
        format_table(report)
    out = saved["root"] / "lookup.json"
    base = ["--target", saved["target"], "--questions", saved["questions"], "--max-new-tokens", "24"]
    main(base + ["--drafter", saved["drafter"], "--prompt-lookup", "3", "--tree", "chain", "--check-lossless",
                 "--output", str(out)])
    medusa = json.loads(out.read_text())
    assert medusa["lossless"] == {"checked": 5, "mismatches": 0}
    assert 0 < medusa["setup"]["proposer"]["lookup_steps"] <= medusa["overall"]["verify_steps"]
    with pytest.raises(SystemExit):
        main(base + ["--drafter", saved["drafter"], "--prompt-lookup", "1"])
    assert "--prompt-lookup=1 is the longest n-gram matched: >= 2, or 0 (off)" in capsys.readouterr().err


def test_repeated_ngrams_counts_tokens_that_end_an_earlier_ngram():
    assert repeated_ngrams([1, 2, 3, 1, 2, 3, 1, 2], n=3) == 3   # (1,2,3) (2,3,1) (3,1,2) each seen again
    assert repeated_ngrams([5, 5, 5, 5], n=2) == 2 and repeated_ngrams([1, 2, 3], n=8) == 0
    answers = [{"new_tokens": [10, 6], "stopped": [False, True], "repeated": [4, 0]},
               {"new_tokens": [4], "stopped": [True], "repeated": [1]}]
    assert answer_repetition(answers) == {"ngram": 8, "turns": 3, "turns_at_budget": 1, "repeated_share": 0.25}
    assert answer_repetition([])["repeated_share"] == 0.0


def test_a_killed_evaluation_keeps_the_report_of_the_questions_done(saved, tmp_path, monkeypatch):
    """--output in a folder that does not exist yet is made before anything runs, and the report is rewritten after
    each question: a kill in question 3 leaves the report of questions 1 and 2, marked partial."""
    import inference.evaluate as evaluate

    calls, answer = [], evaluate.answer

    def killed_in_question_3(generate, *args, **kwargs):
        calls.append(generate)
        if len(calls) == 2 + 2 * 2 + 1:  # the warm-ups of plain and draftsmith, two questions of both, then a kill
            raise KeyboardInterrupt
        return answer(generate, *args, **kwargs)

    monkeypatch.setattr(evaluate, "answer", killed_in_question_3)
    out = tmp_path / "not" / "yet" / "eval.json"
    with pytest.raises(KeyboardInterrupt):
        main(["--target", saved["target"], "--drafter", saved["drafter"], "--questions", saved["questions"],
              "--output", str(out), "--max-new-tokens", "8", "--tree", "chain", "--check-lossless"])
    report = json.loads(out.read_text())
    assert report["partial"] == {"questions_done": 2, "of": 4}
    assert report["setup"]["num_questions"] == 2 and len(report["answers"]) == 2
    assert report["lossless"] == {"checked": 3, "mismatches": 0}  # question 0 has two turns
    assert report["setup"]["questions"] == saved["questions"] and "packed_linear_layers" in report["setup"]
    assert not list(out.parent.glob(".*.tmp"))


def test_an_empty_question_selection_is_refused_before_anything_loads(saved, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as stop:
        main(["--target", str(tmp_path / "no-target"), "--drafter", saved["drafter"], "--questions", str(empty),
              "--output", str(tmp_path / "eval.json")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(empty) in err and "no questions" in err
    assert not (tmp_path / "eval.json").exists()
