"""Target regeneration: an interrupted + resumed run writes exactly the file of an uninterrupted run."""
import json

import pytest
import torch
from transformers import AutoTokenizer
from conftest import make_tiny_target
from tiny_assets import write_conversations, write_tiny_target

from data.conversations import load_conversations
from data.regenerate import generate_batch, left_pad, main, regenerate, turn_seed

N_RECORDS = 7  # two rounds in records 0 and 5 (tiny_conversations' i % 5 == 0)
SETTINGS = dict(max_new_tokens=6, batch_size=3, seed=3)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("regen")
    return write_tiny_target(root / "target"), write_conversations(root / "conversations.jsonl", n=N_RECORDS)


@pytest.fixture(scope="module", params=[0.0, 1.0], ids=["greedy", "sampled"])
def reference(request, assets, tmp_path_factory):
    """An uninterrupted run: (temperature, its output bytes)."""
    target, source = assets
    out = tmp_path_factory.mktemp("ref") / "out.jsonl"
    result = regenerate(target, source, str(out), temperature=request.param, **SETTINGS)
    assert result.written == N_RECORDS and result.already_done == 0 and result.tokens > 0
    return request.param, out.read_bytes()


def test_records_follow_the_input_turn_by_turn(assets, reference):
    target, source = assets
    temperature, data = reference
    records = [json.loads(line) for line in data.decode().splitlines()]
    originals, _ = load_conversations(source)
    tokenizer = AutoTokenizer.from_pretrained(target)
    lengths = {c.id: len(tokenizer.apply_chat_template(c.messages[:1], add_generation_prompt=True, return_dict=False))
               for c in originals}
    assert sorted(r["id"] for r in records) == sorted(lengths)                 # every record, once
    assert [lengths[r["id"]] for r in records] == sorted(lengths.values())     # shortest first prompt first
    assert len(set(lengths.values())) > 2                                      # (the order is not vacuous)
    originals = {c.id: c for c in originals}
    for record in records:
        original = originals[record["id"]]
        roles = [m["role"] for m in record["messages"]]
        assert roles == [m["role"] for m in original.messages]
        assert [m["content"] for m in record["messages"] if m["role"] == "user"] == \
               [m["content"] for m in original.messages if m["role"] == "user"]
        assert len(record["finish_reasons"]) == roles.count("assistant")
        assert record["provenance"] == {"target": target, "max_new_tokens": 6, "temperature": temperature,
                                        "seed": 3, "source": source, "dtype": "float32", "batch_size": 3,
                                        "order": "prompt_length"}



def test_output_reads_back_as_conversations(reference, tmp_path):
    path = tmp_path / "regenerated.jsonl"
    path.write_bytes(reference[1])
    _, report = load_conversations(str(path))
    assert report.records == N_RECORDS  # every drafter family can read it (an empty answer would be a counted skip)


def test_batched_greedy_equals_hf_generate_and_samples_ignore_batch_mates():
    target = make_tiny_target("llama")
    prompts = [[1, 17, 33, 250, 9, 120, 7], [1, 5], [1, 200, 201, 202, 3, 90]]
    greedy = generate_batch(target, prompts, 12, {2}, 0, 0.0, [None] * 3)
    for prompt, tokens in zip(prompts, greedy):
        hf = target.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=2,
                             pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == hf
    generators = lambda: [torch.Generator().manual_seed(turn_seed(0, str(i), 0)) for i in range(3)]  # noqa: E731
    together = generate_batch(target, prompts, 12, {2}, 0, 1.0, generators())
    alone = [generate_batch(target, [p], 12, {2}, 0, 1.0, [g])[0] for p, g in zip(prompts, generators())]
    assert together == alone and together != greedy


def test_finished_rows_leave_the_batch_without_changing_the_others():
    target = make_tiny_target("qwen2")
    prompts = [[1, 17, 33, 250, 9, 120, 7], [1, 5], [1, 200, 201, 202, 3, 90], [1, 44, 45]]
    free = generate_batch(target, prompts, 10, set(), 0, 0.0, [None] * 4)
    stop = {free[1][2], free[3][5]}  # rows 1 and 3 stop early (at the latest), so the batch shrinks twice
    stopped = generate_batch(target, prompts, 10, stop, 0, 0.0, [None] * 4)
    for prompt, tokens in zip(prompts, stopped):
        hf = target.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=sorted(stop),
                             pad_token_id=0)[0, len(prompt):].tolist()
        assert tokens == hf
    lengths = sorted(len(t) for t in stopped)
    assert lengths[0] <= 3 and lengths[-1] == 10 and len(set(lengths)) > 1  # rows did finish at different steps


def test_stopped_then_resumed_equals_uninterrupted(assets, reference, tmp_path):
    target, source = assets
    temperature, expected = reference
    out = tmp_path / "out.jsonl"
    first = regenerate(target, source, str(out), temperature=temperature, stop_after=2, **SETTINGS)
    assert first.written == 3  # whole batches
    with open(out, "ab") as f:  # a crash in the middle of writing the next batch
        f.write(expected.splitlines(keepends=True)[3][:25])
    second = regenerate(target, source, str(out), temperature=temperature, **SETTINGS)
    assert second.dropped_partial_line and second.already_done == 3 and second.written == N_RECORDS - 3
    assert out.read_bytes() == expected
    third = regenerate(target, source, str(out), temperature=temperature, **SETTINGS)
    assert third.written == 0 and third.already_done == N_RECORDS and out.read_bytes() == expected


def test_batch_cut_short_is_completed_exactly(assets, reference, tmp_path):
    """A crash after some lines of a batch: the batch is regenerated whole, only its missing records written."""
    target, source = assets
    temperature, expected = reference
    lines = expected.splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(lines[:4]) + lines[4][:-1])  # batch 2 = records 3..5: one whole, one partial line
    result = regenerate(target, source, str(out), temperature=temperature, **SETTINGS)
    assert result.dropped_partial_line and result.written == N_RECORDS - 4
    assert out.read_bytes() == expected


def test_resume_with_other_settings_is_refused(assets, reference, tmp_path):
    target, source = assets
    temperature, expected = reference
    out = tmp_path / "out.jsonl"
    out.write_bytes(expected.splitlines(keepends=True)[0])
    with pytest.raises(ValueError, match=r"out.jsonl:1 \(id 'tiny-6'\) was generated with other settings "
                                         r"\{'max_new_tokens': \{'file': 6, 'now': 7\}\}"):
        regenerate(target, source, str(out), temperature=temperature, **{**SETTINGS, "max_new_tokens": 7})
    out.write_bytes(b"not json\n")
    with pytest.raises(ValueError, match="out.jsonl:1 is not valid JSON"):
        regenerate(target, source, str(out), temperature=temperature, **SETTINGS)


def test_time_limit_stops_after_a_batch_and_a_rerun_completes_the_file(assets, reference, tmp_path):
    target, source = assets
    temperature, expected = reference
    out = tmp_path / "out.jsonl"
    first = regenerate(target, source, str(out), temperature=temperature, max_minutes=1e-9, **SETTINGS)
    assert first.out_of_time and first.written == SETTINGS["batch_size"]
    second = regenerate(target, source, str(out), temperature=temperature, **SETTINGS)
    assert not second.out_of_time and out.read_bytes() == expected


def test_prompt_cap_leaves_out_long_first_prompts_and_ends_conversations_before_a_long_prompt(assets, tmp_path):
    target, source = assets
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompt_len = lambda messages: len(tokenizer.apply_chat_template(  # noqa: E731
        messages, add_generation_prompt=True, return_dict=False))
    originals = {c.id: c for c in load_conversations(source)[0]}
    first, two_rounds = min((prompt_len(c.messages[:1]), i) for i, c in originals.items() if len(c.messages) == 4)
    cap = first + 2  # that record's second prompt (its first answer and another question added) is longer
    out = tmp_path / "out.jsonl"
    regenerate(target, source, str(out), max_prompt_tokens=cap, **SETTINGS)
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {i for i, c in originals.items() if prompt_len(c.messages[:1]) <= cap} != set(originals)
    assert [m["role"] for m in records[two_rounds]["messages"]] == ["user", "assistant"]  # cut after one round
    for record in records.values():
        messages = record["messages"]
        assert all(prompt_len(messages[:i]) <= cap for i, m in enumerate(messages) if m["role"] == "assistant")
        assert record["provenance"]["max_prompt_tokens"] == cap


def test_cli(assets, tmp_path, capsys):
    target, source = assets
    out = tmp_path / "cli.jsonl"
    main(["--target", target, "--input", source, "--output", str(out), "--max-new-tokens", "3", "--limit", "2",
          "--batch-size", "2"])
    assert "tokens/s" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 2


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
