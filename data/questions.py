"""Evaluation questions in the Spec-Bench / MT-bench JSONL format.

One JSON object a line: `question_id` (str or int), `category` (str), `turns` (non-empty list of user turns, str),
optional `reference` (ignored here). Blank lines are skipped.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from data.conversations import TOO_DEEP, not_utf8
from data.embedded import resolve_data


@dataclass
class Question:
    question_id: str | int
    category: str
    turns: list[str]


def load_questions(
    source: str,
    categories: Iterable[str] | None = None,
    per_category: int | None = None,
    limit: int | None = None,
) -> list[Question]:
    """Questions from `source` (an embedded name such as 'mt-bench', or a JSONL path), in file order.

    categories: keep only these (an unknown category is an error); per_category: the first N of each category;
    limit: at most this many in total, applied last.
    """
    path = resolve_data(source)
    questions = _read_jsonl(path)
    if not questions:  # an evaluation of nothing would report a speed-up of 0.00x and succeed
        raise ValueError(f"{path} has no questions; pass a JSONL file with one "
                         '{"question_id": ..., "category": ..., "turns": [...]} object per line')
    if categories is not None:
        questions = _filter_categories(questions, categories, path)
    if per_category is not None:
        _check_count("per_category", per_category)
        seen: Counter[str] = Counter()
        kept = []
        for question in questions:
            seen[question.category] += 1
            if seen[question.category] <= per_category:
                kept.append(question)
        questions = kept
    if limit is not None:
        _check_count("limit", limit)
        questions = questions[:limit]
    return questions


def _read_jsonl(path: str) -> list[Question]:
    """Every question of the file; a repeated question_id is an error (results are keyed by it)."""
    questions, first_line = [], {}
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is then named by its number
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            question = _parse_line(_decode(raw, f"{path}:{lineno}"), f"{path}:{lineno}")
            if question.question_id in first_line:
                raise ValueError(
                    f"{path}:{lineno}: field 'question_id' {question.question_id!r} repeats line "
                    f"{first_line[question.question_id]}; question ids must be unique"
                )
            first_line[question.question_id] = lineno
            questions.append(question)
    return questions


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")  # a BOM may start the file
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: {not_utf8(raw, err)}; save the file as UTF-8 "
                         "(e.g. `iconv -f latin1 -t utf-8 old.jsonl > new.jsonl`)") from err


def _parse_line(line: str, where: str) -> Question:
    """One JSONL line -> Question; ValueError naming `where` (file:line) and the bad field."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from err
    except RecursionError as err:
        raise ValueError(f"{where}: {TOO_DEEP}; fix or remove that line") from err
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("question_id", "category", "turns"):
        if field not in record:
            raise ValueError(f"{where}: missing field {field!r}")
    qid, category, turns = record["question_id"], record["category"], record["turns"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise ValueError(f"{where}: field 'question_id' must be a string or an integer, got {qid!r}")
    if not isinstance(category, str) or not category:
        raise ValueError(f"{where}: field 'category' must be a non-empty string, got {category!r}")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: field 'turns' must be a non-empty list of strings, got {turns!r}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, str):
            raise ValueError(f"{where}: field 'turns'[{i}] must be a string, got {type(turn).__name__}")
    return Question(question_id=qid, category=category, turns=list(turns))


def _filter_categories(questions: list[Question], categories: Iterable[str], path: str) -> list[Question]:
    wanted = [categories] if isinstance(categories, str) else list(categories)
    present = {q.category for q in questions}
    unknown = [c for c in wanted if c not in present]
    if unknown:
        raise ValueError(f"categories {unknown} are not in {path}; it has: {', '.join(sorted(present))}")
    keep = set(wanted)
    return [q for q in questions if q.category in keep]


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
