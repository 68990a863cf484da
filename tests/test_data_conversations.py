"""data/conversations.py: every source format and every kind of bad input, on tiny files written here."""
import json

import datasets
import pytest

import data.conversations as conversations
from data.conversations import Conversation, load_conversations


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def sharegpt(*turns):
    return [{"from": f, "value": v} for f, v in turns]


def test_openai_jsonl_is_read_as_is(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [
        {"id": "a", "source": "t0", "messages": [user("Hi"), assistant("Hello")]},
        {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, user("Q"), assistant("A")]},
    ])
    convs, report = load_conversations(src)
    assert convs == [
        Conversation("a", [user("Hi"), assistant("Hello")]),
        Conversation("b", [{"role": "system", "content": "Be brief."}, user("Q"), assistant("A")]),
    ]
    assert (report.records, report.kept, dict(report.skipped), report.notes) == (2, 2, {}, [])
    assert report.summary() == f"{src}: kept 2 of 2 records"


def test_sharegpt_roles_are_mapped(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([
        {"id": "x", "conversations": sharegpt(("system", "S"), ("human", "H1"), ("gpt", "G1"), ("user", "H2"),
                                              ("chatgpt", "G2"), ("human", "H3"), ("bard", "G3"), ("human", "H4"),
                                              ("model", "G4"), ("Human", "H5"), ("assistant", "G5"))},
    ], indent=2))
    (conv,), report = load_conversations(str(path))
    assert conv.id == "x"
    assert [(m["role"], m["content"]) for m in conv.messages] == [
        ("system", "S"), ("user", "H1"), ("assistant", "G1"), ("user", "H2"), ("assistant", "G2"),
        ("user", "H3"), ("assistant", "G3"), ("user", "H4"), ("assistant", "G4"), ("user", "H5"),
        ("assistant", "G5")]
    assert report.notes == [] and report.kept == 1


def test_sharegpt_jsonl_and_missing_ids(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", [{"conversations": sharegpt(("human", "H"), ("gpt", "G"))}])
    (conv,), _ = load_conversations(src)
    assert conv == Conversation("s.jsonl:1", [user("H"), assistant("G")])


def test_skips_are_counted_with_locations(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": "ok", "messages": [user("Q"), assistant("A")]},
        {"id": "noasst", "messages": [user("Q")]},
        {"id": "role", "conversations": sharegpt(("human", "Q"), ("bing", "A"))},
        {"id": "empty", "messages": [user("Q"), assistant("  \n")]},
        {"id": "nouser", "conversations": sharegpt(("gpt", "A"))},
        {"id": "none", "messages": []},
        {"id": "nofield", "text": "Q A"},
        {"id": "image", "messages": [user([{"type": "image_url", "image_url": "x"}]), assistant("A")]},
        ["not", "an", "object"],
    ])
    convs, report = load_conversations(src)
    assert [c.id for c in convs] == ["ok"]
    assert report.records == 9 and report.kept == 1
    assert dict(report.skipped) == {
        "no assistant turn": 1, "unknown role 'bing'": 1, "empty text": 1, "no user turn": 1,
        "empty conversation": 1, "no 'messages' or 'conversations' field": 1, "non-text content": 1,
        "record is not a JSON object": 1}
    assert report.examples["no assistant turn"] == ["bad.jsonl:2 (id 'noasst')"]
    assert report.examples["record is not a JSON object"] == ["bad.jsonl:9"]
    assert "unknown role 'bing': 1 [e.g. bad.jsonl:3 (id 'role')]" in report.summary()


def test_malformed_jsonl_lines_are_counted_skips_naming_file_and_line(tmp_path):
    path = tmp_path / "m.jsonl"
    good = json.dumps({"id": "g", "messages": [user("Q"), assistant("A")]})
    path.write_text(f"{good}\n{{\"id\": \"cut\", \"messa\n\n{good}\nnot json\n{good}\n{good}\n{{\n")
    convs, report = load_conversations(str(path))
    assert len(convs) == 4 and report.records == 7
    assert report.skipped == {"malformed JSON": 3}
    lines = [e.split(" ")[0] for e in report.examples["malformed JSON"]]
    assert lines == ["m.jsonl:2", "m.jsonl:5", "m.jsonl:8"]  # the blank line 3 is not a record
    assert "JSONDecodeError" in report.examples["malformed JSON"][0]


def test_file_that_is_not_json_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("hello, these are notes\n")
    with pytest.raises(ValueError, match=r"notes.jsonl is not JSON Lines or a JSON array \(first non-blank byte is b'h'\)"):
        load_conversations(str(path))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        load_conversations(str(tmp_path / "empty.jsonl"))


def test_all_records_unusable_is_an_error_with_the_reasons(tmp_path):
    src = write_jsonl(tmp_path / "u.jsonl", [{"id": "q", "messages": [user("Q")]}])
    with pytest.raises(ValueError, match=r"no usable conversation in .*u.jsonl: .*no assistant turn: 1"):
        load_conversations(src)


def test_leading_non_user_turns_are_dropped_and_counted(tmp_path):
    src = write_jsonl(tmp_path / "l.jsonl", [
        {"id": "a", "conversations": sharegpt(("gpt", "G0"), ("human", "H1"), ("gpt", "G1"))},
        {"id": "b", "conversations": sharegpt(("system", "S"), ("gpt", "G0"), ("human", "H1"), ("gpt", "G1"))},
        {"id": "c", "conversations": sharegpt(("human", "H1"), ("gpt", "G1"))},
    ])
    convs, report = load_conversations(src)
    assert [c.messages for c in convs] == [
        [user("H1"), assistant("G1")],
        [{"role": "system", "content": "S"}, user("H1"), assistant("G1")],  # the system prompt stays
        [user("H1"), assistant("G1")],
    ]
    assert report.repaired == {"dropped leading non-user turns": 2}
    assert "repaired dropped leading non-user turns: 2" in report.summary()


def test_same_role_turns_are_merged_and_trailing_turns_dropped(tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [
        {"id": "m", "conversations": sharegpt(("human", "H1"), ("human", "H2"), ("gpt", "G1"), ("gpt", "G2"),
                                              ("gpt", "G3"), ("human", "H3"))},
        {"id": "s", "messages": [{"role": "system", "content": ""}, user("Q"), assistant("A")]},
    ])
    convs, report = load_conversations(src)
    assert convs[0].messages == [user("H1\n\nH2"), assistant("G1\n\nG2\n\nG3")]
    assert convs[1].messages == [user("Q"), assistant("A")]
    assert report.repaired == {"merged consecutive same-role turns": 3, "dropped trailing non-assistant turns": 1,
                               "dropped empty system turn": 1}


def test_end_of_text_marker_ending_an_answer_is_stripped(tmp_path):
    """T0's answers end in GPT-2's '<|endoftext|>'; some answers are nothing else."""
    src = write_jsonl(tmp_path / "t0.jsonl", [
        {"id": "a", "messages": [user("Q <|endoftext|>"), assistant("Yes.<|endoftext|>")]},
        {"id": "b", "messages": [user("Q"), assistant("<|endoftext|>")]},
        {"id": "c", "messages": [user("Q"), assistant("a <|endoftext|> b</s><|endoftext|>")]},
    ])
    convs, report = load_conversations(src)
    assert [c.messages for c in convs] == [[user("Q <|endoftext|>"), assistant("Yes.")],
                                           [user("Q"), assistant("a <|endoftext|> b")]]
    assert report.repaired == {"stripped end-of-text marker ending an answer": 2}
    assert report.skipped == {"empty text": 1}


def test_limit_counts_kept_conversations(tmp_path):
    src = write_jsonl(tmp_path / "n.jsonl", [{"id": str(i), "messages": [user("Q"), assistant("A")]}
                                             if i != 1 else {"id": "1", "messages": []} for i in range(6)])
    convs, report = load_conversations(src, limit=3)
    assert [c.id for c in convs] == ["0", "2", "3"]
    assert (report.records, report.kept, report.skipped["empty conversation"]) == (4, 3, 1)
    assert report.notes == ["stopped after limit=3 conversations"]
    with pytest.raises(ValueError, match="limit must be None or >= 1"):
        load_conversations(src, limit=0)


# ----------------------------------------------------------------------------------------------------------
# JSON arrays, complete and truncated
# ----------------------------------------------------------------------------------------------------------

def sharegpt_array_text(n):
    """Pretty-printed like ShareGPT_V3 (indent 2), non-ASCII text so byte and char offsets differ."""
    records = [{"id": f"r{i}", "conversations": sharegpt(("human", f"Grüße {i} — ¿qué?"), ("gpt", f"ok {i} ✓"))}
               for i in range(n)]
    return json.dumps(records, indent=2, ensure_ascii=False)


@pytest.mark.parametrize("chunk_chars", [conversations._READ_CHUNK_CHARS, 7, 64])
def test_truncated_json_array_recovers_complete_records(tmp_path, monkeypatch, chunk_chars):
    monkeypatch.setattr(conversations, "_READ_CHUNK_CHARS", chunk_chars)  # exercise refills mid-record
    text = sharegpt_array_text(5)
    fourth = text.index('{\n    "id": "r3"')
    cut = text.index("ok 3")  # inside record r3's last string
    path = tmp_path / "sharegpt.json"
    path.write_bytes(text[:cut].encode())
    convs, report = load_conversations(str(path))
    assert [c.id for c in convs] == ["r0", "r1", "r2"]
    assert convs[2].messages == [user("Grüße 2 — ¿qué?"), assistant("ok 2 ✓")]
    stop_byte = len(text[:fourth].encode())
    stop_line = text[:fourth].count("\n") + 1
    assert report.notes == [
        f"truncated JSON array: recovered 3 complete records from {path}, stopped at byte {stop_byte:,} "
        f"(line {stop_line:,}) of {len(text[:cut].encode()):,} bytes (Unterminated string starting at)"]
    assert stop_line == 41  # `[` on line 1, then 13 lines per record: r3 starts on line 1 + 3 * 13 + 1


@pytest.mark.parametrize("chunk_chars", [conversations._READ_CHUNK_CHARS, 5])
def test_complete_json_array_has_no_note(tmp_path, monkeypatch, chunk_chars):
    monkeypatch.setattr(conversations, "_READ_CHUNK_CHARS", chunk_chars)
    path = tmp_path / "whole.json"
    path.write_text(sharegpt_array_text(4), encoding="utf-8")
    convs, report = load_conversations(str(path))
    assert [c.id for c in convs] == ["r0", "r1", "r2", "r3"] and report.notes == []


def test_array_cut_between_records_and_mid_file_garbage(tmp_path):
    text = sharegpt_array_text(3)
    path = tmp_path / "cut.json"
    path.write_text(text[:text.index('{\n    "id": "r2"')])  # ends after "r1"'s `},\n  `
    convs, report = load_conversations(str(path))
    assert len(convs) == 2 and report.notes[0].startswith("truncated JSON array: recovered 2 complete records")

    broken = text.replace('"id": "r1"', '"id": r1', 1)  # a syntax error in the middle of the file costs r1 only
    path.write_text(broken)
    convs, report = load_conversations(str(path))
    assert [c.id for c in convs] == ["r0", "r2"] and report.notes == []
    assert (report.records, report.skipped) == (3, {"malformed JSON": 1})
    at = len(broken[:broken.index("r1,")].encode())  # non-ASCII text before it: bytes, not chars
    assert report.examples["malformed JSON"] == [f"cut.json[1] at line 16, byte {at:,} (Expecting value)"]


# ----------------------------------------------------------------------------------------------------------
# Hugging Face datasets
# ----------------------------------------------------------------------------------------------------------

def test_save_to_disk_dataset_with_messages_column(tmp_path):
    ds = datasets.Dataset.from_list([
        {"id": "d0", "messages": [user("Q"), assistant("A")]},
        {"id": "d1", "messages": [user("Q")]},
    ])
    ds.save_to_disk(str(tmp_path / "ds"))
    convs, report = load_conversations(str(tmp_path / "ds"))
    assert convs == [Conversation("d0", [user("Q"), assistant("A")])]
    assert report.examples["no assistant turn"] == ["ds[1] (id 'd1')"]


def test_dataset_dict_uses_train_split_and_sharegpt_column(tmp_path):
    rows = [{"conversations": sharegpt(("human", "H"), ("gpt", "G"))}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows * 2)}).save_to_disk(str(tmp_path / "dd"))
    convs, report = load_conversations(str(tmp_path / "dd"))
    assert convs == [Conversation("dd[0]", [user("H"), assistant("G")])] and report.records == 1

    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "nt"))
    with pytest.raises(ValueError, match=r"has splits \['test'\] but no 'train' split"):
        load_conversations(str(tmp_path / "nt"))


def test_dataset_without_a_conversation_column_is_an_error(tmp_path):
    datasets.Dataset.from_list([{"prompt": "Q", "answer": "A"}]).save_to_disk(str(tmp_path / "qa"))
    with pytest.raises(ValueError, match=r"columns \['answer', 'prompt'\] but no 'messages' or 'conversations'"):
        load_conversations(str(tmp_path / "qa"))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"conversation source .*nowhere.jsonl does not exist"):
        load_conversations(str(tmp_path / "nowhere.jsonl"))
