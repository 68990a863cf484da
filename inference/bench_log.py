"""The benchmark's raw results, one JSON line per finished question, appended as each question finishes, so that an
interrupted benchmark keeps what it measured and the same command resumes it.

    line 1:   {"arguments": {...}, "setups": {method: setup}}     what was run, and how each method was set up
    line 2..: {"question_id": .., "category": .., "methods": {method: [turn, ...]}, "lookup": {...}}
              turn: {"tokens": [...], "forwards": n, "accept_lengths": [...], "seconds": s}

A line cut short by a kill is dropped on resume; a run with other arguments is refused (one line naming them).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .speculative import GenerationResult


class BenchmarkError(ValueError):
    """The output folder holds a benchmark that this command cannot continue."""


class RawLog:
    def __init__(self, path: Path, arguments: dict):
        self.path = path
        self.arguments = json.loads(json.dumps(arguments))  # as read back: tuples become lists
        self.header: dict | None = None
        self.records: list[dict] = []
        if path.exists():
            self._read()

    def _read(self) -> None:
        lines = self.path.read_text().splitlines(keepends=True)
        rows = []
        for lineno, line in enumerate(lines, start=1):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if lineno < len(lines) or line.endswith("\n"):
                    raise BenchmarkError(f"{self.path}:{lineno} is not a JSON line; delete {self.path} to start over")
                lines.pop()  # the last line, cut by a kill mid-write
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        self.path.write_text("".join(lines))
        if not rows:
            return
        self.header, self.records = rows[0], rows[1:]
        recorded = self.header.get("arguments", {})
        differ = sorted(k for k in recorded.keys() | self.arguments.keys() if recorded.get(k) != self.arguments.get(k))
        if differ:
            raise BenchmarkError(f"{self.path} holds a benchmark run with other arguments ({', '.join(differ)} "
                                 f"differ); give another --output, or delete {self.path} to start over")

    def done(self) -> set:
        """The question ids already measured."""
        return {r["question_id"] for r in self.records}

    def recorded_setups(self) -> dict:
        return self.header["setups"] if self.header else {}

    def start(self, setups: dict) -> None:
        """Write the header line of a new log (a resumed log keeps its own)."""
        if self.header is None:
            self.header = {"arguments": self.arguments, "setups": setups}
            self._append(self.header)

    def append(self, record: dict) -> None:
        self.records.append(record)
        self._append(record)

    def _append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def turn_record(result: GenerationResult) -> dict:
    return dataclasses.asdict(result)


def turn_result(record: dict) -> GenerationResult:
    return GenerationResult(**record)
