"""The benchmark CLI on a tiny saved target, a Medusa drafter and a draft LM: the results file, the interleaving of
methods per question, resuming after an interruption, the plots, losslessness, and its refusals."""
import json

import pytest
import torch

from drafters.draft_lm import build_draft_lm
from inference import bench_drafters
from inference.bench_log import BenchmarkError, RawLog
from inference.benchmark import main
from target.model import load_target
from conftest import perturbed_medusa
from tiny_assets import write_questions, write_tiny_target

ORDER = ["plain", "medusa", "draft", "k1", "hf-lookup", "hf-assisted(draft)"]
SUMMARY = {"tau", "speedup", "tokens_per_s", "baseline_tokens_per_s", "target_forwards", "new_tokens", "seconds",
           "verify_steps", "accept_length_histogram", "acceptance_by_depth", "alpha"}


class Interrupted(Exception):
    """Stands in for a kill in the middle of a benchmark."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    target_dir = write_tiny_target(root / "target")
    target, _ = load_target(target_dir)
    perturbed_medusa(target).save_pretrained(root / "medusa" / "drafter")
    build_draft_lm(target, 2, [0]).save_pretrained(root / "draft")  # one target layer, one fresh: some rejections
    return {"root": root, "target": target_dir, "medusa": str(root / "medusa" / "drafter"),
            "draft": str(root / "draft"), "questions": write_questions(root / "q.jsonl")}


def command(saved, output, *extra):
    return ["--target", saved["target"], "--drafters", saved["medusa"], f"draft={saved['draft']}",
            f"k1={saved['draft']}@draft_k=1@adaptive-k=false",
            "--baselines", "plain", "hf-lookup", "hf-assisted", "--questions", saved["questions"],
            "--max-new-tokens", "12", "--tree", "chain", "--no-progress", "--output", str(output), *extra]


@pytest.fixture(scope="module")
def straight(saved):
    calls = []
    output = saved["root"] / "straight"
    results = main(command(saved, output), on_answer=lambda i, q, name: calls.append((i, name)))
    return {"results": results, "calls": calls, "output": output}


def raw_tokens(output):
    """question id -> method -> the tokens of each turn, from the benchmark's raw log."""
    rows = [json.loads(line) for line in (output / "answers.jsonl").read_text().splitlines()[1:]]
    return {r["question_id"]: {m: [t["tokens"] for t in turns] for m, turns in r["methods"].items()} for r in rows}


def test_every_method_runs_on_each_question_in_turn(straight):
    assert straight["calls"] == [(i, name) for i in range(4) for name in ORDER]
    assert straight["results"]["setup"]["order"] == "per question: " + ", ".join(ORDER)


def test_results_file_holds_every_figure_and_the_run_is_lossless(straight, saved):
    results = json.loads((straight["output"] / "results.json").read_text())
    assert list(results) == ["command", "arguments", "machine", "versions", "setup", "methods", "notes", "plots",
                             "answer_repetition", "answers"]
    assert results["command"].startswith("python -m inference.benchmark --target ")
    assert {"cpu", "cpu_count", "torch_threads", "device"} <= set(results["machine"])
    assert results["versions"]["torch"] == torch.__version__
    assert results["notes"] == []
    assert (results["setup"]["num_questions"], results["setup"]["num_answers"]) == (4, 5)
    assert list(results["methods"]) == ORDER
    plain = results["methods"]["plain"]["overall"]
    assert plain["tau"] == 1.0 and plain["speedup"] == 1.0
    for name, method in results["methods"].items():
        rows = [method["overall"], *method["per_category"].values()]
        assert set(method["per_category"]) == {"writing", "qa"}
        for row in rows:
            assert SUMMARY <= set(row)
            assert row["tau"] == pytest.approx(row["new_tokens"] / row["target_forwards"])
            assert row["speedup"] == pytest.approx(row["tokens_per_s"] / row["baseline_tokens_per_s"])
            assert sum(row["accept_length_histogram"].values()) == row["verify_steps"]
        assert method["overall"]["new_tokens"] == plain["new_tokens"]  # the same answers, to the token
        if name != "plain":
            assert method["lossless"] == {"checked": 5, "mismatches": 0}
    medusa, draft = results["methods"]["medusa"], results["methods"]["draft"]
    assert medusa["drafter_kind"] == "medusa" and medusa["proposer"]["paths"] == [[0], [0, 0], [0, 0, 0]]
    assert draft["overall"]["tau"] > 1.0 and len(draft["overall"]["acceptance_by_depth"]) >= 1
    k1 = results["methods"]["k1"]  # the same draft with options of its own
    assert (draft["proposer"]["k"], draft["proposer"]["adaptive"], draft["options"]) == (4, True, {})
    assert (k1["proposer"]["k"], k1["proposer"]["adaptive"]) == (1, False)
    assert k1["options"] == {"draft_k": 1, "adaptive_k": False}
    assert set(k1["overall"]["accept_length_histogram"]) <= {"0", "1"}  # one drafted token a step
    assert results["methods"]["hf-assisted(draft)"]["drafter"] == saved["draft"]
    assert results["methods"]["hf-lookup"]["settings"] == {"prompt_lookup_num_tokens": 8, "max_matching_ngram_size": 3}
    tokens = raw_tokens(straight["output"])
    assert all(turns == answers["plain"] for answers in tokens.values() for turns in answers.values())


def test_markdown_table_and_plots_are_written(straight):
    output = straight["output"]
    table = (output / "results.md").read_text()
    for name in ORDER:
        assert f"| {name} |" in table
    assert "| overall |" in table and "0 of 5" in table
    assert set(straight["results"]["plots"]) == {"tau_speedup_per_category.png", "acceptance_by_depth.png",
                                                 "accept_length_histogram.png"}
    for name in straight["results"]["plots"]:
        data = (output / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, name  # an image with content, not a blank frame
        assert f"]({name})" in table


def test_an_interrupted_benchmark_resumes_where_it_stopped(straight, saved, tmp_path):
    def stop_in_question_2(i, q, name):
        if (i, name) == (2, "draft"):
            raise Interrupted

    with pytest.raises(Interrupted):
        main(command(saved, tmp_path), on_answer=stop_in_question_2)
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 3  # the header and questions 0 and 1
    calls = []
    results = main(command(saved, tmp_path), on_answer=lambda i, q, name: calls.append((i, name)))
    assert calls == [(i, name) for i in (2, 3) for name in ORDER]  # questions 0 and 1 were not answered again
    assert raw_tokens(tmp_path) == raw_tokens(straight["output"])
    assert results["setup"]["num_answers"] == 5
    for name, method in results["methods"].items():
        assert method["overall"]["new_tokens"] == straight["results"]["methods"][name]["overall"]["new_tokens"]


def test_a_rerun_with_other_arguments_is_refused(straight, saved, capsys):
    before = (straight["output"] / "answers.jsonl").read_text()
    with pytest.raises(SystemExit):
        main(command(saved, straight["output"], "--draft-k", "2"))
    assert "other arguments (draft_k differ); give another --output" in capsys.readouterr().err
    assert (straight["output"] / "answers.jsonl").read_text() == before


def test_a_line_cut_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "answers.jsonl"
    header = {"arguments": {"a": 1}, "setups": {}}
    path.write_text(json.dumps(header) + "\n" + json.dumps({"question_id": 0}) + "\n" + '{"question_id": 1, "me')
    log = RawLog(path, {"a": 1})
    assert log.done() == {0}
    log.append({"question_id": 1})
    assert [json.loads(line) for line in path.read_text().splitlines()][1:] == [{"question_id": 0}, {"question_id": 1}]
    path.write_text(json.dumps(header) + "\nnot json\n")
    with pytest.raises(BenchmarkError, match="answers.jsonl:2 is not a JSON line; delete"):
        RawLog(path, {"a": 1})


def test_options_apply_to_the_drafter_kinds_that_take_them(saved, tmp_path, capsys):
    base = ["--target", saved["target"], "--questions", saved["questions"], "--output", str(tmp_path)]
    for extra, message in ((["--drafters", saved["medusa"], "--draft-k", "2"],
                            "--draft-k=2 is for draft_lm drafters, and no drafter given is one"),
                           (["--drafters", saved["medusa"], saved["draft"], "--tree", "dynamic"],
                            "--tree='dynamic' (EAGLE-2 dynamic trees) is for eagle drafters; this drafter is medusa"),
                           (["--drafters", saved["medusa"], f"medusa={saved['draft']}"],
                            "two methods would be named 'medusa'"),
                           (["--drafters", "eagle3"], "drafter 'eagle3' is neither a folder nor in the zoo for "),
                           (["--drafters", f"{saved['medusa']}@draft_k=2"],
                            "drafter medusa: --draft-k=2 is for draft_lm drafters; this drafter is medusa"),
                           (["--drafters", f"{saved['draft']}@max_new_tokens=3"],
                            "'max_new_tokens=3' is not a drafter option key=value")):
        with pytest.raises(SystemExit):
            main(base + extra)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "answers.jsonl").exists()


def test_zoo_names_resolve_to_zoo_folders(tmp_path, monkeypatch):
    (tmp_path / "smollm2-135m-instruct" / "eagle3").mkdir(parents=True)
    monkeypatch.setattr(bench_drafters, "ZOO", tmp_path)
    [spec] = bench_drafters.parse_drafters(["eagle3@tree=dynamic"], "smollm2-135m-instruct")
    assert (spec.name, spec.path) == ("eagle3", str(tmp_path / "smollm2-135m-instruct" / "eagle3"))
    assert spec.options == {"tree": "dynamic"}
    with pytest.raises(ValueError, match=r"neither a folder nor in the zoo for smollm2-135m-instruct \(eagle3\)"):
        bench_drafters.parse_drafters(["medusa"], "smollm2-135m-instruct")


def test_prompt_lookup_beside_a_drafter_is_counted_per_question(saved, tmp_path):
    """A drafter with prompt lookup: the copies it verified are counted per question in the raw log (read from the
    proposer as each question runs) and summed in the results; decoding stays lossless."""
    results = main(["--target", saved["target"], "--drafters", f"lk={saved['medusa']}@prompt_lookup=2",
                    "--questions", saved["questions"], "--max-new-tokens", "24", "--tree", "chain",
                    "--no-progress", "--output", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()[1:]]
    counts = [row["lookup"]["lk"] for row in rows]
    proposer, lossless = results["methods"]["lk"]["proposer"], results["methods"]["lk"]["lossless"]
    assert proposer["lookup_steps"] == sum(c["lookup_steps"] for c in counts) > 0
    assert proposer["lookup_accepted"] == sum(c["lookup_accepted"] for c in counts)
    assert all(c["lookup_accepted"] <= 8 * c["lookup_steps"] for c in counts)  # 8 tokens copied at most per step
    assert lossless == {"checked": 5, "mismatches": 0}


def test_hf_assisted_without_a_draft_lm_is_skipped_with_a_note(saved, tmp_path):
    results = main(["--target", saved["target"], "--drafters", saved["medusa"], "--baselines", "hf-assisted",
                    "--questions", saved["questions"], "--limit", "1", "--max-new-tokens", "4", "--tree", "chain",
                    "--no-progress", "--output", str(tmp_path)])
    assert list(results["methods"]) == ["plain", "medusa"]
    assert results["notes"] == ["hf-assisted skipped: transformers' assisted generation needs a draft-LM drafter, "
                                "and none was given"]
    assert "Note: hf-assisted skipped" in (tmp_path / "results.md").read_text()


def test_a_model_card_embeds_the_benchmark(straight, saved, tmp_path):
    import shutil

    from inference.bench_report import method_table
    from train.push import main as push_main

    shutil.copytree(saved["medusa"], tmp_path / "drafter")
    push_main(["--drafter", str(tmp_path / "drafter"), "--repo-id", "user/tiny-medusa", "--benchmark",
               str(straight["output"]), "--dry-run", str(tmp_path / "upload")])
    card = (tmp_path / "upload" / "README.md").read_text()
    assert "## Benchmark" in card and "\n".join(method_table(straight["results"])) in card
    for name in straight["results"]["plots"]:
        assert f"](benchmark/{name})" in card
        assert (tmp_path / "upload" / "benchmark" / name).read_bytes() == (straight["output"] / name).read_bytes()
    assert "of `q.jsonl`" in card and str(saved["root"]) not in card  # a local question file: its name only
