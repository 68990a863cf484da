"""A bad-input corpus: malformed files of every format draftsmith reads, written here and run through every loader.

Each case asserts what is kept, what is skipped and the exact message: a bad record costs that record alone and is
named by file and line (or index), and a file that cannot be used at all is one line that names it and says what
to do (a ValueError raised by draftsmith's own code, which the CLIs print as one line).
"""
import json

import datasets
import pytest

import data.conversations as conversations
from cli.errors import is_user_error
from data.conversations import load_conversations
from data.questions import load_questions
from data.tokenize import build_token_dataset
from tiny_assets import tiny_tokenizer

DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON parser recurses
GRUSSE_UTF8, GRUSSE_LATIN1 = "Grüße".encode(), "Grüße".encode("latin-1")  # the Latin-1 one is not UTF-8: 0xfc


def openai(i: int) -> dict:
    return {"id": f"o{i}", "messages": [{"role": "user", "content": f"Grüße {i}"},
                                        {"role": "assistant", "content": f"ok {i} ✓"}]}


def sharegpt(i: int) -> dict:
    return {"id": f"s{i}", "conversations": [{"from": "human", "value": f"Grüße {i}"},
                                             {"from": "gpt", "value": f"¿sí {i}?"}]}


def good(i: int) -> dict:
    """Both turn styles, alternating; 13 lines each in an indent-2 array."""
    return openai(i) if i % 2 else sharegpt(i)


def array_text(items: list) -> str:
    return json.dumps(items, indent=2, ensure_ascii=False)


def at(data: bytes, needle: bytes) -> tuple[int, int]:
    """(1-based line, byte offset) of the first `needle` in `data`."""
    byte = data.index(needle)
    return data[:byte].count(b"\n") + 1, byte


def user_error(excinfo) -> str:
    """The error's message, checked to be what the CLIs print as one line."""
    assert is_user_error(excinfo.value) and "\n" not in str(excinfo.value)
    return str(excinfo.value)


# ----------------------------------------------------------------------------------------------------------
# JSON arrays (ShareGPT files)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_chars", [conversations._READ_CHUNK_CHARS, 64])
def test_json_array_bad_element_in_the_middle_costs_only_that_element(tmp_path, monkeypatch, chunk_chars):
    monkeypatch.setattr(conversations, "_READ_CHUNK_CHARS", chunk_chars)  # small: refills inside elements
    data = array_text([good(i) for i in range(200)]).replace('"id": "s60"', '"id": s60', 1).encode()
    (tmp_path / "sharegpt.json").write_bytes(data)
    convs, report = load_conversations(str(tmp_path / "sharegpt.json"))
    assert [c.id for c in convs] == [good(i)["id"] for i in range(200) if i != 60]
    assert (report.records, report.kept, report.skipped, report.notes) == (200, 199, {"malformed JSON": 1}, [])
    line, byte = at(data, b"s60,")
    assert line == 1 + 60 * 13 + 2  # `[`, 60 records, then `{` and the id line
    assert report.examples["malformed JSON"] == [f"sharegpt.json[60] at line {line}, byte {byte:,} (Expecting value)"]
    assert report.summary().endswith(f"kept 199 of 200 records; skipped 1 (malformed JSON: 1 [e.g. sharegpt.json[60] "
                                     f"at line {line}, byte {byte:,} (Expecting value)])")


def bad_array() -> bytes:
    """Nine elements: garbage, a string that lost its closing quote, Latin-1 text and a number between good
    records of both styles."""
    text = array_text([good(0), "GARBAGE", good(2), good(3), good(4), good(5), good(6), 42, good(8)])
    text = text.replace('"GARBAGE"', "xyz").replace('"Grüße 3"', '"Grüße 3')
    return text.encode().replace(GRUSSE_UTF8 + b" 5", GRUSSE_LATIN1 + b" 5")


@pytest.mark.parametrize("chunk_chars", [conversations._READ_CHUNK_CHARS, 7])
def test_json_array_every_kind_of_bad_element_is_skipped_and_named(tmp_path, monkeypatch, chunk_chars):
    monkeypatch.setattr(conversations, "_READ_CHUNK_CHARS", chunk_chars)
    data = bad_array()
    (tmp_path / "bad.json").write_bytes(data)
    convs, report = load_conversations(str(tmp_path / "bad.json"))
    assert [c.id for c in convs] == ["s0", "s2", "s4", "s6", "s8"]
    assert convs[1].messages == [{"role": "user", "content": "Grüße 2"}, {"role": "assistant", "content": "¿sí 2?"}]
    assert (report.records, report.kept, report.notes) == (9, 5, [])
    assert report.skipped == {"malformed JSON": 2, "not UTF-8": 1, "record is not a JSON object": 1}
    (garbage_line, garbage), (quote_line, quote) = at(data, b"xyz"), at(data, "Grüße 3\n".encode())
    latin1_line, latin1 = at(data, GRUSSE_LATIN1)
    assert report.examples == {
        "malformed JSON": [f"bad.json[1] at line {garbage_line}, byte {garbage:,} (Expecting value)",
                           f"bad.json[3] at line {quote_line}, byte {quote + len('Grüße 3'.encode()):,} "
                           "(Invalid control character at)"],  # the newline where the string should have closed
        "not UTF-8": [f"bad.json[5] at line {latin1_line}, byte {latin1 + 2:,} (0xfc is not UTF-8)"],  # 'ü'
        "record is not a JSON object": ["bad.json[7]"],
    }
    assert (garbage_line, quote_line, latin1_line) == (15, 34, 60)


MISMATCHED = {  # elements whose brackets do not pair up -> where their parse fails, and why
    "B1": ('{"id": "b1", "messages": [}', "[}", "Expecting value"),                     # `]` lost
    "B3": ('[{"from": "human", "value": "hi"]', '"hi"]', "Expecting ',' delimiter"),    # `}` lost
    "B5": ('{"id": "b5", "messages": ]}', ": ]", "Expecting value"),                      # `[` lost
}


@pytest.mark.parametrize("chunk_chars", [conversations._READ_CHUNK_CHARS, 7])
def test_json_array_elements_with_mismatched_brackets_cost_only_themselves(tmp_path, monkeypatch, chunk_chars):
    monkeypatch.setattr(conversations, "_READ_CHUNK_CHARS", chunk_chars)
    text = array_text([good(0), "B1", good(2), "B3", good(4), "B5", good(6)])
    for name, (element, _, _) in MISMATCHED.items():
        text = text.replace(f'"{name}"', element)
    data = text.encode()
    (tmp_path / "brackets.json").write_bytes(data)
    convs, report = load_conversations(str(tmp_path / "brackets.json"))
    assert [c.id for c in convs] == ["s0", "s2", "s4", "s6"]
    assert (report.records, report.kept, report.skipped, report.notes) == (7, 4, {"malformed JSON": 3}, [])
    where = {name: at(data, needle.encode()) for name, (_, needle, _) in MISMATCHED.items()}
    assert report.examples["malformed JSON"] == [
        f"brackets.json[{i}] at line {where[name][0]}, byte {where[name][1] + len(needle) - 1:,} ({why})"
        for i, (name, (_, needle, why)) in zip((1, 3, 5), MISMATCHED.items())]  # at the closer that does not fit


@pytest.mark.parametrize("chunk_chars", [conversations._READ_CHUNK_CHARS, 7])
def test_json_array_closed_early_says_what_was_not_read(tmp_path, monkeypatch, chunk_chars):
    monkeypatch.setattr(conversations, "_READ_CHUNK_CHARS", chunk_chars)
    text = array_text([good(0), good(1), good(2)])
    data = text.replace('\n  },\n  {\n    "id": "o1"', '\n  }],\n  {\n    "id": "o1"', 1).encode()  # a stray `]`
    (tmp_path / "early.json").write_bytes(data + b"\n")
    convs, report = load_conversations(str(tmp_path / "early.json"))
    assert [c.id for c in convs] == ["s0"] and report.skipped == {}
    line, byte = at(data, b'],\n')
    assert report.notes == [f"{tmp_path / 'early.json'}: text follows the JSON array's closing `]` from byte "
                            f"{byte + 1:,} (line {line}) of {len(data) + 1:,} bytes and was not read; if records "
                            "follow, remove the `]` that closed the array early"]
    (tmp_path / "fine.json").write_bytes(text.encode() + b"\n\n  \n")  # blanks after the `]` are no matter
    assert load_conversations(str(tmp_path / "fine.json"))[1].notes == []


def test_json_array_deeply_nested_element_is_skipped(tmp_path):
    data = array_text([good(0), "DEEP", good(2)]).replace('"DEEP"', DEEP).encode()
    (tmp_path / "deep.json").write_bytes(data)
    convs, report = load_conversations(str(tmp_path / "deep.json"))
    assert [c.id for c in convs] == ["s0", "s2"] and report.skipped == {"nested too deeply": 1}
    line, byte = at(data, b"[[[")
    assert report.examples["nested too deeply"] == [
        f"deep.json[1] at line {line}, byte {byte:,} (JSON nested too deeply to parse)"]


def test_json_array_cut_at_the_end_keeps_what_came_before_it(tmp_path):
    text = array_text([good(0), "GARBAGE", good(2), good(3)]).replace('"GARBAGE"', "xyz")
    data = text[:text.index("ok 3")].encode()  # cut inside the last record's answer
    (tmp_path / "cut.json").write_bytes(data)
    convs, report = load_conversations(str(tmp_path / "cut.json"))
    assert [c.id for c in convs] == ["s0", "s2"] and report.skipped == {"malformed JSON": 1}
    line, byte = at(data, b'{\n    "id": "o3"')
    assert report.notes == [f"truncated JSON array: recovered 2 complete records from {tmp_path / 'cut.json'}, "
                            f"stopped at byte {byte:,} (line {line}) of {len(data):,} bytes "
                            "(Unterminated string starting at)"]


# ----------------------------------------------------------------------------------------------------------
# JSON Lines
# ----------------------------------------------------------------------------------------------------------

def bad_jsonl() -> bytes:
    lines = [
        json.dumps(good(0), ensure_ascii=False).encode(),  # 1: kept (ShareGPT style)
        b'{"id": "cut", "messages": [',  # 2: malformed
        json.dumps(good(3), ensure_ascii=False).encode().replace(GRUSSE_UTF8, GRUSSE_LATIN1),  # 3: Latin-1
        b'{"id": "deep", "messages": ' + DEEP.encode() + b"}",  # 4: nested too deeply
        b"",  # 5: blank, not a record
        b"42",  # 6: not an object
        json.dumps(good(7), ensure_ascii=False).encode(),  # 7: kept (OpenAI style)
        b'{"id": "q", "messages": [{"role": "user", "content": "Q"}]}',  # 8: no answer
    ]
    return b"\n".join(lines) + b"\n"


def test_jsonl_every_kind_of_bad_line_is_skipped_and_named(tmp_path):
    data = bad_jsonl()
    (tmp_path / "bad.jsonl").write_bytes(data)
    convs, report = load_conversations(str(tmp_path / "bad.jsonl"))
    assert [(c.id, c.where) for c in convs] == [("s0", "bad.jsonl:1"), ("o7", "bad.jsonl:7")]
    assert (report.records, report.kept) == (7, 2)
    column = data.split(b"\n")[2].index(GRUSSE_LATIN1) + 3  # 'ü' is the third byte
    assert report.examples == {
        "malformed JSON": ["bad.jsonl:2 (JSONDecodeError: Expecting value: line 2 column 1 (char 28))"],  # the line ends in its newline
        "not UTF-8": [f"bad.jsonl:3 (byte 0xfc at column {column} is not UTF-8)"],
        "nested too deeply": ["bad.jsonl:4 (JSON nested too deeply to parse)"],
        "record is not a JSON object": ["bad.jsonl:6"],
        "no assistant turn": ["bad.jsonl:8 (id 'q')"],
    }
    assert sum(report.skipped.values()) == 5 and set(report.skipped.values()) == {1}


def test_no_usable_record_is_one_line_naming_the_file_and_the_reasons(tmp_path):
    path = tmp_path / "none.jsonl"
    path.write_bytes(b'{"id": "cut", "messages": [\n' + b"{" + GRUSSE_LATIN1 + b"}\n")
    with pytest.raises(ValueError) as err:
        load_conversations(str(path))
    assert user_error(err) == (
        f"no usable conversation in {path}: {path}: kept 0 of 2 records; skipped 2 (malformed JSON: 1 "
        "[e.g. none.jsonl:1 (JSONDecodeError: Expecting value: line 2 column 1 (char 28))]; not UTF-8: 1 "
        "[e.g. none.jsonl:2 (byte 0xfc at column 4 is not UTF-8)])")


# ----------------------------------------------------------------------------------------------------------
# Hugging Face `datasets` folders
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("column", ["messages", "conversations"])
def test_dataset_folder_mixing_openai_and_sharegpt_turns_keeps_both(tmp_path, column):
    rows = [good(0), good(1), good(2),
            {"id": "bing", column: [{"role": "user", "content": "Q"}, {"role": "bing", "content": "A"}]},
            {"id": "q", column: [{"from": "human", "value": "Q"}]}]
    # One column for every row: Arrow merges the two turn styles, giving every turn all four keys (None when missing).
    datasets.Dataset.from_list([{"id": r["id"], column: r.get("messages") or r.get("conversations")}
                                for r in rows]).save_to_disk(str(tmp_path / "mixed"))
    convs, report = load_conversations(str(tmp_path / "mixed"))
    assert [(c.id, c.where) for c in convs] == [("s0", "mixed[0]"), ("o1", "mixed[1]"), ("s2", "mixed[2]")]
    assert convs[0].messages == [{"role": "user", "content": "Grüße 0"}, {"role": "assistant", "content": "¿sí 0?"}]
    assert (report.records, report.kept) == (5, 3)
    assert report.examples == {"unknown role 'bing'": ["mixed[3] (id 'bing')"], "no assistant turn": ["mixed[4] (id 'q')"]}


def test_damaged_dataset_folder_is_one_line(tmp_path):
    datasets.Dataset.from_list([good(0)]).save_to_disk(str(tmp_path / "ds"))
    (arrow,) = (tmp_path / "ds").glob("*.arrow")
    arrow.write_bytes(b"not an arrow file" * 10)
    with pytest.raises(ValueError) as err:
        load_conversations(str(tmp_path / "ds"))
    message = user_error(err)
    assert message.startswith(f"dataset folder {tmp_path / 'ds'} cannot be read (ArrowInvalid: ")
    assert message.endswith("); it is damaged: write it again with `dataset.save_to_disk(path)`.")


# ----------------------------------------------------------------------------------------------------------
# After tokenizing: skips name the record's file:line or file[index]
# ----------------------------------------------------------------------------------------------------------

def test_tokenization_skips_name_file_and_line(tmp_path):
    long_prompt = {"role": "user", "content": " ".join(["the cat sat on a mat"] * 20)}
    records = [good(1), {"id": "long", "messages": [long_prompt, {"role": "assistant", "content": "yes"}]},
               {"messages": [long_prompt, {"role": "assistant", "content": "no"}]}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "t.json").write_text(json.dumps(records))
    reason = "no assistant tokens within max_length=32"
    for name, expected in [("t.jsonl", ["t.jsonl:2 (id 'long')", "t.jsonl:3"]),
                           ("t.json", ["t.json[1] (id 'long')", "t.json[2]"])]:
        ds, report = build_token_dataset(str(tmp_path / name), tiny_tokenizer(), max_length=32)
        assert len(ds) == 1 and report.skipped == {reason: 2} and report.examples == {reason: expected}


# ----------------------------------------------------------------------------------------------------------
# Evaluation questions (Spec-Bench / MT-bench JSONL)
# ----------------------------------------------------------------------------------------------------------

QUESTION = b'{"question_id": 1, "category": "writing", "turns": ["Gr\xc3\xbc\xc3\x9fe"]}'


def test_questions_not_utf8_is_one_line_naming_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(QUESTION + b"\n" + QUESTION.replace(b"1", b"2").replace(GRUSSE_UTF8, GRUSSE_LATIN1) + b"\n")
    with pytest.raises(ValueError) as err:
        load_questions(str(path))
    column = QUESTION.index(GRUSSE_UTF8) + 3  # 'ü', a byte column
    assert column == 56
    assert user_error(err) == (f"{path}:2: byte 0xfc at column {column} is not UTF-8; save the file as UTF-8 "
                               "(e.g. `iconv -f latin1 -t utf-8 old.jsonl > new.jsonl`)")


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_questions_empty_file_is_refused(tmp_path, content):
    path = tmp_path / "q.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_questions(str(path))
    assert user_error(err) == (f"{path} has no questions; pass a JSONL file with one "
                               '{"question_id": ..., "category": ..., "turns": [...]} object per line')


def test_questions_deeply_nested_line_is_one_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(QUESTION + b"\n" + b'{"question_id": 2, "turns": ' + DEEP.encode() + b"}\n")
    with pytest.raises(ValueError) as err:
        load_questions(str(path))
    assert user_error(err) == f"{path}:2: JSON nested too deeply to parse; fix or remove that line"
