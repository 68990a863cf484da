"""A bad-input corpus: malformed files of every format draftsmith reads, written here and run through every loader.

Each case asserts what is kept, what is skipped and the exact message: a bad record costs that record alone and is
named by file and line (or index), and a file that cannot be used at all is one line that names it and says what
to do (a ValueError raised by draftsmith's own code, which the CLIs print as one line).
"""
import json

import pytest

from data.tokenize import build_token_dataset
from tiny_assets import tiny_tokenizer


def openai(i: int) -> dict:
    return {"id": f"o{i}", "messages": [{"role": "user", "content": f"Grüße {i}"},
                                        {"role": "assistant", "content": f"ok {i} ✓"}]}


def sharegpt(i: int) -> dict:
    return {"id": f"s{i}", "conversations": [{"from": "human", "value": f"Grüße {i}"},
                                             {"from": "gpt", "value": f"¿sí {i}?"}]}


def good(i: int) -> dict:
    """Both turn styles, alternating; 13 lines each in an indent-2 array."""
    return openai(i) if i % 2 else sharegpt(i)


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
