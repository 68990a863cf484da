"""Question files in the Spec-Bench / MT-bench JSONL format."""
import json
from collections import Counter
from pathlib import Path

import pytest

from data.questions import Question, load_questions

SPEC_BENCH_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench_dev.jsonl"

RECORDS = [
    {"question_id": 1, "category": "writing", "turns": ["w1 turn 1", "w1 turn 2"]},
    {"question_id": 2, "category": "math", "turns": ["m1"], "reference": ["42"]},
    {"question_id": 3, "category": "writing", "turns": ["w2"]},
    {"question_id": "q4", "category": "math", "turns": ["m2"]},
    {"question_id": 5, "category": "writing", "turns": ["w3"]},
]


def write_jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def qfile(tmp_path):
    return write_jsonl(tmp_path / "q.jsonl", [json.dumps(r) for r in RECORDS])


def test_load_all_in_file_order(qfile):
    questions = load_questions(qfile)
    assert questions[0] == Question(question_id=1, category="writing", turns=["w1 turn 1", "w1 turn 2"])
    assert [q.question_id for q in questions] == [1, 2, 3, "q4", 5]


def test_per_category_keeps_first_n_in_file_order(qfile):
    assert [q.question_id for q in load_questions(qfile, per_category=2)] == [1, 2, 3, "q4"]
    assert [q.question_id for q in load_questions(qfile, per_category=1)] == [1, 2]


def test_limit_applies_after_per_category(qfile):
    assert [q.question_id for q in load_questions(qfile, per_category=1, limit=1)] == [1]
    assert [q.question_id for q in load_questions(qfile, limit=3)] == [1, 2, 3]


def test_categories_filter(qfile):
    assert [q.question_id for q in load_questions(qfile, categories=["math"])] == [2, "q4"]
    assert [q.question_id for q in load_questions(qfile, categories="math")] == [2, "q4"]
    with pytest.raises(ValueError, match=r"categories \['poetry'\] are not in .*it has: math, writing"):
        load_questions(qfile, categories=["poetry"])


def test_blank_lines_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [json.dumps(RECORDS[0]), "", "  ", json.dumps(RECORDS[1])])
    assert len(load_questions(path)) == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question_id": 9, "category": "x", "turns": ["a"]', "malformed JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ('{"category": "x", "turns": ["a"]}', "missing field 'question_id'"),
        ('{"question_id": 9, "turns": ["a"]}', "missing field 'category'"),
        ('{"question_id": 9, "category": "x"}', "missing field 'turns'"),
        ('{"question_id": 9, "category": "x", "turns": []}', "field 'turns' must be a non-empty list"),
        ('{"question_id": 9, "category": "x", "turns": "a"}', "field 'turns' must be a non-empty list"),
        ('{"question_id": 9, "category": "x", "turns": ["a", 3]}', r"field 'turns'\[1\] must be a string"),
        ('{"question_id": 9, "category": "", "turns": ["a"]}', "field 'category'"),
        ('{"question_id": null, "category": "x", "turns": ["a"]}', "field 'question_id'"),
        ('{"question_id": 1, "category": "x", "turns": ["a"]}', "'question_id' 1 repeats line 1"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(RECORDS[0]), "", line])
    with pytest.raises(ValueError, match=message) as err:
        load_questions(path)
    assert f"{path}:3:" in str(err.value)


def test_bad_counts(qfile):
    with pytest.raises(ValueError, match="per_category must be a non-negative integer"):
        load_questions(qfile, per_category=-1)
    with pytest.raises(ValueError, match="limit must be a non-negative integer"):
        load_questions(qfile, limit=2.5)


@pytest.mark.skipif(not SPEC_BENCH_DEV.is_file(), reason=f"{SPEC_BENCH_DEV} not present")
def test_shared_spec_bench_dev():
    questions = load_questions(str(SPEC_BENCH_DEV))
    counts = Counter(q.category for q in questions)
    assert len(questions) == 240
    assert len(counts) == 13
    sampled = load_questions(str(SPEC_BENCH_DEV), per_category=2)
    assert len(sampled) == 26 and Counter(q.category for q in sampled) == {c: 2 for c in counts}
