"""Read chat conversations from JSONL / ShareGPT JSON / Hugging Face datasets into one normalised form.

Every source ends up as `Conversation(id, messages)` with messages `{"role": "system"|"user"|"assistant",
"content": str}`: optional leading system turn(s), then a user turn, alternating roles, ending with an
assistant turn. Whatever had to be skipped or repaired on the way is counted in a `LoadReport`, so a
caller can print one line and nobody wonders where 6,000 conversations went.
"""
from __future__ import annotations

import codecs
import collections
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

# ShareGPT's `from` names and OpenAI's `role` names -> our three roles. Anything else is skipped, counted.
ROLE_MAP = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "assistant": "assistant", "model": "assistant",
}
# End-of-text strings that text corpora leave at the end of answers (T0's targets end in GPT-2's '<|endoftext|>').
# The chat template writes the target's own end-of-turn token, so a trailing one is stripped (and counted).
TRAILING_END_MARKERS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<|eot_id|>", "<eos>")
MERGE_SEPARATOR = "\n\n"  # joins consecutive same-role turns (ShareGPT splits long answers into several gpt turns)
MAX_EXAMPLES_PER_REASON = 3  # how many locations the report keeps per skip reason
_READ_CHUNK_CHARS = 1 << 24  # 16 Mi chars per read when walking a JSON array
TOO_DEEP = "JSON nested too deeply to parse"  # a RecursionError of Python's JSON parser, in a user's words


@dataclass
class Conversation:
    id: str
    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]
    where: str = field(default="", compare=False)  # 'file.jsonl:12' or 'file.json[3]': later skips name it

    def location(self) -> str:
        """Where the record is in its source, for messages: 'file.jsonl:12 (id 'x')'."""
        return located(self.where, self.id)


def located(where: str, record_id: str) -> str:
    """'file.jsonl:12 (id 'x')', or just 'file.jsonl:12' for a record whose id is its location."""
    if not where:  # a Conversation built in code, not read from a file
        return f"id {record_id!r}"
    return where if record_id == where else f"{where} (id {record_id!r})"


@dataclass
class LoadReport:
    """What happened while reading (and tokenizing) a source. Never silent: every dropped record is counted."""
    source: str
    records: int = 0  # records read from the source
    kept: int = 0  # conversations returned (after tokenizing: rows in the dataset)
    skipped: collections.Counter = field(default_factory=collections.Counter)  # reason -> count
    repaired: collections.Counter = field(default_factory=collections.Counter)  # repair -> count (kept records)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few "file:line (id ...)"
    notes: list[str] = field(default_factory=list)
    tokenized: int = 0  # conversations tokenized by this call (0 when a token cache was used)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < MAX_EXAMPLES_PER_REASON:
            seen.append(where)

    def summary(self) -> str:
        """One human line, e.g. `train.jsonl: kept 9 of 12 records; skipped 3 (no assistant turn: 3 [e.g. ...])`."""
        parts = [f"{self.source}: kept {self.kept:,} of {self.records:,} records"]
        if self.skipped:
            reasons = "; ".join(
                f"{reason}: {count:,} [e.g. {', '.join(self.examples.get(reason, []))}]"
                for reason, count in self.skipped.most_common()
            )
            parts.append(f"skipped {sum(self.skipped.values()):,} ({reasons})")
        if self.repaired:
            parts.append("repaired " + ", ".join(f"{r}: {c:,}" for r, c in self.repaired.most_common()))
        parts.extend(self.notes)
        return "; ".join(parts)

    def to_json(self) -> dict:
        return {"source": self.source, "records": self.records, "kept": self.kept, "skipped": dict(self.skipped),
                "repaired": dict(self.repaired), "examples": self.examples, "notes": self.notes}

    @classmethod
    def from_json(cls, d: dict) -> "LoadReport":
        return cls(source=d["source"], records=d["records"], kept=d["kept"],
                   skipped=collections.Counter(d["skipped"]), repaired=collections.Counter(d["repaired"]),
                   examples=d["examples"], notes=list(d["notes"]))


class SkipRecord(Exception):
    """Internal: this record cannot be used; `reason` is the counter key, `detail` what exactly was wrong."""
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------------------------
# Normalising one record
# ----------------------------------------------------------------------------------------------------------

def _turn_text(content: Any) -> str:
    """A turn's text: a string, or OpenAI-style content parts that are all `{"type": "text", "text": ...}`."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise SkipRecord("non-text content")


def _read_turns(turns: Any) -> list[dict]:
    """Validate roles and text of every turn; map ShareGPT/OpenAI role names to ours."""
    if not isinstance(turns, list):
        raise SkipRecord("messages is not a list")
    if not turns:
        raise SkipRecord("empty conversation")
    out = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise SkipRecord("turn is not an object")
        raw_role = _either(turn, "role", "from")
        role = ROLE_MAP.get(raw_role.strip().lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise SkipRecord(f"unknown role {raw_role!r}")
        out.append({"role": role, "content": _turn_text(_either(turn, "content", "value"))})
    return out


def _either(turn: dict, key: str, other: str) -> Any:
    """turn[key], else turn[other]. A `datasets` folder mixing OpenAI and ShareGPT turns gives every turn all four
    keys, the missing ones None, so a present-but-None key must not win."""
    value = turn.get(key)
    return turn.get(other) if value is None else value


def _strip_end_markers(turns: list[dict], repairs: list[str]) -> list[dict]:
    """'The answer.<|endoftext|>' -> 'The answer.' for assistant turns; an answer that was only a marker is
    then empty text."""
    out = []
    for t in turns:
        text = t["content"]
        while t["role"] == "assistant" and text.endswith(TRAILING_END_MARKERS):
            text = text[:-len(next(m for m in TRAILING_END_MARKERS if text.endswith(m)))]
        if text != t["content"]:
            repairs.append("stripped end-of-text marker ending an answer")
        out.append({"role": t["role"], "content": text})
    return out


def _drop_empty_system(turns: list[dict], repairs: list[str]) -> list[dict]:
    """Empty system prompts are common filler; empty user/assistant text makes the whole record unusable."""
    kept = []
    for t in turns:
        if t["content"].strip():
            kept.append(t)
        elif t["role"] == "system":
            repairs.append("dropped empty system turn")
        else:
            raise SkipRecord("empty text")
    return kept


def _merge_same_role(turns: list[dict], repairs: list[str]) -> list[dict]:
    """Consecutive turns of one role become one turn, texts joined by a blank line."""
    merged: list[dict] = []
    for t in turns:
        if merged and merged[-1]["role"] == t["role"]:
            merged[-1] = {"role": t["role"], "content": merged[-1]["content"] + MERGE_SEPARATOR + t["content"]}
            repairs.append("merged consecutive same-role turns")
        else:
            merged.append(dict(t))
    return merged


def _trim_ends(turns: list[dict], repairs: list[str]) -> list[dict]:
    """Keep leading system turn(s); drop non-user turns before the first user turn and turns after the last
    assistant turn (they train nothing)."""
    n_system = 0
    while n_system < len(turns) and turns[n_system]["role"] == "system":
        n_system += 1
    first_user = next((i for i in range(n_system, len(turns)) if turns[i]["role"] == "user"), None)
    if first_user is None:
        raise SkipRecord("no user turn")
    if first_user > n_system:
        repairs.append("dropped leading non-user turns")
    body = turns[first_user:]
    last_assistant = max((i for i, t in enumerate(body) if t["role"] == "assistant"), default=None)
    if last_assistant is None:
        raise SkipRecord("no assistant turn")
    if last_assistant < len(body) - 1:
        repairs.append("dropped trailing non-assistant turns")
    return turns[:n_system] + body[:last_assistant + 1]


def normalise_record(record: Any) -> tuple[list[dict], list[str]]:
    """One raw record (OpenAI `messages` or ShareGPT `conversations`) -> (messages, repairs made).

    Raises `SkipRecord` when the record cannot be used.
    """
    if not isinstance(record, dict):
        raise SkipRecord("record is not a JSON object")
    turns = record.get("messages")
    if turns is None:
        turns = record.get("conversations")
    if turns is None:
        raise SkipRecord("no 'messages' or 'conversations' field")
    repairs: list[str] = []
    messages = _drop_empty_system(_strip_end_markers(_read_turns(turns), repairs), repairs)
    messages = _merge_same_role(messages, repairs)
    # Merge again after trimming is unnecessary: trimming only removes turns at the ends.
    return _trim_ends(messages, repairs), repairs


# ----------------------------------------------------------------------------------------------------------
# Readers: each yields (record, where it is: 'file.jsonl:12' or 'file.json[3]')
# ----------------------------------------------------------------------------------------------------------

def _first_json_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")  # skip a UTF-8 BOM and whitespace
    return head[:1]


def not_utf8(raw: bytes, err: UnicodeDecodeError) -> str:
    """'byte 0xff at column 41 is not UTF-8', for a line `raw` whose decoding failed with `err`."""
    return f"byte 0x{raw[err.start]:02x} at column {err.start + 1} is not UTF-8"


def _json_line(line: bytes) -> Any:
    """The JSON value of one JSONL line; SkipRecord(reason, detail) when it cannot be read."""
    try:
        return json.loads(line.decode("utf-8").removeprefix("\ufeff"))  # a BOM may start the file
    except UnicodeDecodeError as e:
        raise SkipRecord("not UTF-8", not_utf8(line, e)) from e
    except json.JSONDecodeError as e:
        raise SkipRecord("malformed JSON", f"JSONDecodeError: {e}") from e
    except RecursionError as e:  # Python's parser recurses once per level: a deep line would end the whole load
        raise SkipRecord("nested too deeply", TOO_DEEP) from e


def _iter_jsonl(path: str, report: LoadReport) -> Iterator[tuple[Any, str]]:
    """One JSON record per line; a line that cannot be read is a counted skip naming file:line."""
    name = os.path.basename(path)
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = _json_line(line)
            except SkipRecord as s:
                report.records += 1
                report.skip(s.reason, f"{name}:{line_no} ({s.detail})")
                continue
            yield record, f"{name}:{line_no}"


@dataclass
class _BadElement:
    """An element of a JSON array that cannot be read: a counted skip; the walk goes on after it."""
    reason: str  # the skip counter's key, as for JSONL lines
    byte: int  # 0-based offset of the problem in the file
    line: int  # 1-based line of the problem
    detail: str


class _NeedMore(Exception):
    """Internal: the buffer ends inside the element being read; `error` is why decoding stopped (None: it did not)."""
    def __init__(self, error: json.JSONDecodeError | None):
        super().__init__(error)
        self.error = error


class _ArrayWalker:
    """Stream the elements of a top-level JSON array with `raw_decode`, reading 16 Mi chars at a time.

    An element that does not decode comes out as a _BadElement, and the walk goes on at the `,` or `]` that ends
    it (found by counting brackets outside strings), so one bad record costs one record. Stops where an element
    runs into the end of the file (a truncated file ends mid-element) and remembers where.
    """
    _SEPARATOR = re.compile(r"\s*,?\s*")  # whitespace, at most one comma, whitespace
    # What decides where an element ends: strings (to their closing quote, or to a newline, which no JSON string
    # holds: a string with a lost quote ends there rather than swallowing the file), brackets and commas.
    _TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*(")?|[\[\]{},]')
    _NOT_UTF8 = re.compile("[\udc80-\udcff]")
    _NOT_BLANK = re.compile(r"\S")  # bytes that are not UTF-8, as 'surrogateescape' decodes them

    def __init__(self, path: str):
        self.path = path
        self.decoder = json.JSONDecoder()
        # Bad bytes decode to lone surrogates instead of failing the whole file; their element is then skipped.
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.buf, self.pos, self.eof = "", 0, False
        self.done_bytes, self.done_lines = 0, 0  # bytes / newlines before buf[0]
        self.mark = (0, 0, 0)  # (index in buf, bytes, newlines before it): where location() counts on from
        self.stop_error: json.JSONDecodeError | None = None
        self.closed = False  # saw the closing `]`
        self.after_close: tuple[int, int] | None = None  # (byte, line) of text after that `]`: None if only blanks

    def _refill(self, f) -> None:
        """Drop the consumed part of the buffer and append the next chunk (keeps memory at ~one chunk)."""
        consumed = self.buf[:self.pos]
        self.done_bytes += _utf8_len(consumed)
        self.done_lines += consumed.count("\n")
        chunk = f.read(_READ_CHUNK_CHARS)
        self.eof = not chunk
        self.buf, self.pos = self.buf[self.pos:] + self.utf8.decode(chunk, final=False), 0
        self.mark = (0, self.done_bytes, self.done_lines)

    def location(self, index: int | None = None) -> tuple[int, int]:
        """(byte offset, 1-based line) of buf[index] (default: self.pos). Counts on from the index asked last
        (they only grow), so a file full of bad elements is still counted through once."""
        index = self.pos if index is None else index
        at, n_bytes, n_lines = self.mark
        if index < at:
            at, n_bytes, n_lines = 0, self.done_bytes, self.done_lines
        piece = self.buf[at:index]
        self.mark = (index, n_bytes + _utf8_len(piece), n_lines + piece.count("\n"))
        return self.mark[1], self.mark[2] + 1

    def __iter__(self) -> Iterator[Any]:
        """Every element: its value, or a _BadElement."""
        with open(self.path, "rb") as f:
            self._refill(f)
            self.pos = self.buf.index("[") + 1  # caller checked the first byte is `[`
            while True:
                self.pos = self._SEPARATOR.match(self.buf, self.pos).end()
                if self.buf.startswith("]", self.pos):
                    self.closed = True
                    self.pos += 1
                    self.after_close = self._text_after(f)
                    return
                try:
                    element = self._next_element()
                except _NeedMore as more:
                    if self.eof:
                        self.stop_error = more.error
                        return
                    self._refill(f)  # the element may continue in the next chunk
                    continue
                yield element

    def _text_after(self, f) -> tuple[int, int] | None:
        """(byte, line) of the first non-blank text from self.pos on, reading to the end (None: there is none).
        A stray `]` closes the array early, and every record after it would be lost without a word."""
        while True:
            text = self._NOT_BLANK.search(self.buf, self.pos)
            if text:
                return self.location(text.start())
            if self.eof:
                return None
            self.pos = len(self.buf)
            self._refill(f)

    def _next_element(self) -> Any:
        """The element at self.pos, or a _BadElement; moves self.pos past it. _NeedMore: the buffer ends inside it."""
        start = self.pos
        try:
            value, end = self.decoder.raw_decode(self.buf, start)
            error = None
        except RecursionError:  # Python's parser recurses once per level
            value, end, error = None, self._element_end(), json.JSONDecodeError(TOO_DEEP, self.buf, start)
        except json.JSONDecodeError as e:
            value, end, error = None, self._element_end(), e
        if end is None or (end == len(self.buf) and not self.eof):
            raise _NeedMore(error)  # also a bare number cut by the chunk ("12|3"): it decodes early; read on, redo
        self.pos = end
        bad_byte = self._NOT_UTF8.search(self.buf, start, end)
        if bad_byte:  # checked first: a bad byte is often why an element does not decode
            return self._bad("not UTF-8", bad_byte.start(), f"0x{ord(bad_byte.group()) - 0xdc00:02x} is not UTF-8")
        if error is None:
            return value
        if error.msg == TOO_DEEP:
            return self._bad("nested too deeply", start, TOO_DEEP)
        return self._bad("malformed JSON", min(error.pos, end), error.msg)

    def _bad(self, reason: str, index: int, detail: str) -> _BadElement:
        byte, line = self.location(index)
        return _BadElement(reason, byte, line, detail)

    def _element_end(self) -> int | None:
        """Index of the `,` or `]` that ends the element at self.pos; None when the buffer ends first.
        A closer of the wrong kind closes everything opened after the opener it matches (`{"b": [}` ends at its
        `}`: the `[` lost its `]`); one that matches no open bracket is passed over. Counting any closer as the
        innermost one's instead left `{"b": [}` open, and the walk ran to the end of the file, losing the rest."""
        open_brackets: list[str] = []
        for token in self._TOKEN.finditer(self.buf, self.pos):
            kind = token.group()[0]
            if kind == '"':
                if token.group(1) is None and token.end() >= len(self.buf) - 1:
                    return None  # a string open at the buffer's end may close in the next chunk
            elif kind in "[{":
                open_brackets.append(kind)
            elif open_brackets and kind in "]}":
                opener = "[" if kind == "]" else "{"
                if opener in open_brackets:
                    del open_brackets[len(open_brackets) - 1 - open_brackets[::-1].index(opener):]
            elif not open_brackets and kind in ",]":  # (a stray `}` outside the element's brackets is passed over)
                return token.start()
        return None


def _utf8_len(text: str) -> int:
    """Bytes `text` was read from (bad bytes were decoded with 'surrogateescape')."""
    return len(text.encode("utf-8", "surrogateescape"))


def _iter_json_array(path: str, report: LoadReport) -> Iterator[tuple[Any, str]]:
    """Elements of a JSON array file. An element that cannot be read is a counted skip naming its index, line and
    byte; a truncated array yields its complete elements and says so in a note, as does text after the closing `]`."""
    walker, name, recovered = _ArrayWalker(path), os.path.basename(path), 0
    for index, element in enumerate(walker):
        if isinstance(element, _BadElement):
            report.records += 1
            report.skip(element.reason,
                        f"{name}[{index}] at line {element.line:,}, byte {element.byte:,} ({element.detail})")
            continue
        recovered += 1
        yield element, f"{name}[{index}]"
    if walker.closed:
        if walker.after_close is not None:
            byte, line = walker.after_close
            report.notes.append(
                f"{path}: text follows the JSON array's closing `]` from byte {byte:,} (line {line:,}) of "
                f"{os.path.getsize(path):,} bytes and was not read; if records follow, remove the `]` that closed "
                "the array early")
        return
    stop_byte, stop_line = walker.location()
    what = "truncated JSON array" if _looks_truncated(walker) else "malformed JSON array"
    report.notes.append(
        f"{what}: recovered {recovered:,} complete records from {path}, stopped at byte {stop_byte:,} "
        f"(line {stop_line:,}) of {os.path.getsize(path):,} bytes ({walker.stop_error.msg})"
    )


def _looks_truncated(walker: _ArrayWalker) -> bool:
    """A file cut short fails on an unterminated string or at its very end; anything else is malformed."""
    e = walker.stop_error
    return e.msg.startswith("Unterminated string") or not walker.buf[e.pos:].strip()


def _iter_hf_dataset(source: str, report: LoadReport) -> Iterator[tuple[Any, str]]:
    """Rows of a `save_to_disk` directory or a `load_dataset` name (train split)."""
    dataset = _open_hf_dataset(source)
    columns = set(dataset.column_names)
    if not columns & {"messages", "conversations"}:
        raise ValueError(
            f"dataset {source!r} has columns {sorted(columns)} but no 'messages' or 'conversations' column; "
            "draftsmith reads OpenAI-style `messages` or ShareGPT-style `conversations` — rename the column "
            "(`dataset.rename_column(old, 'messages')`) and save it with `save_to_disk`."
        )
    name = os.path.basename(os.path.normpath(source))
    for index, row in enumerate(dataset):
        yield row, f"{name}[{index}]"


def _open_hf_dataset(source: str):
    import datasets  # imported lazily: plain JSON sources do not need it

    if os.path.isdir(source) and (
        os.path.exists(os.path.join(source, "dataset_dict.json")) or os.path.exists(os.path.join(source, "state.json"))
    ):
        loaded = _load_from_disk(source)
    else:
        try:
            loaded = datasets.load_dataset(source, split="train")
        except (FileNotFoundError, ConnectionError) as e:
            raise ValueError(
                f"conversation source {source!r} is not a .jsonl/.json file, not a `save_to_disk` directory, and "
                f"`datasets.load_dataset` could not open it ({type(e).__name__}: {e}). Pass a path to a file or "
                "directory, or a dataset name that is in the local Hugging Face cache."
            ) from e
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"dataset {source!r} has splits {list(loaded)} but no 'train' split; "
                             "save the split you want with `dataset_dict[split].save_to_disk(path)`.")
        loaded = loaded["train"]
    return loaded


def _load_from_disk(source: str):
    import datasets
    import pyarrow

    try:
        return datasets.load_from_disk(source)
    except (ValueError, pyarrow.ArrowException) as e:  # a damaged Arrow file or state.json (ArrowInvalid is both)
        raise ValueError(f"dataset folder {source} cannot be read ({type(e).__name__}: {e}); it is damaged: write "
                         "it again with `dataset.save_to_disk(path)`.") from e


def _iter_records(source: str, report: LoadReport) -> Iterator[tuple[Any, str]]:
    """Pick a reader by what `source` is."""
    if os.path.isfile(source):
        first = _first_json_byte(source)
        if not first:
            raise ValueError(f"{source} is empty; pass a file with conversations in it.")
        if first == b"[":
            return _iter_json_array(source, report)
        if first == b"{":
            return _iter_jsonl(source, report)
        raise ValueError(
            f"{source} is not JSON Lines or a JSON array (first non-blank byte is {first!r}); "
            "pass a .jsonl file with one {\"messages\": [...]} or {\"conversations\": [...]} object per line, "
            "a ShareGPT .json array, or a Hugging Face dataset directory."
        )
    looks_like_a_path = source.endswith((".json", ".jsonl")) or source.startswith(("/", "./", "../"))
    if looks_like_a_path and not os.path.exists(source):
        raise FileNotFoundError(f"conversation source {source} does not exist; pass an existing .jsonl/.json file, "
                                "a `save_to_disk` directory, or a Hugging Face dataset name.")
    return _iter_hf_dataset(source, report)


def load_conversations(source: str, limit: int | None = None) -> tuple[list[Conversation], LoadReport]:
    """Read conversations from `source` (see module docstring); stop after `limit` kept conversations.

    Returns the conversations and a report of everything skipped or repaired. Raises `ValueError` when the
    source cannot be read at all or yields no usable conversation.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be None or >= 1, got {limit}")
    report = LoadReport(source=source)
    conversations: list[Conversation] = []
    for record, where in _iter_records(source, report):
        if limit is not None and len(conversations) >= limit:
            report.notes.append(f"stopped after limit={limit:,} conversations")
            break
        report.records += 1
        record_id = record.get("id") if isinstance(record, dict) else None
        record_id = str(record_id) if record_id not in (None, "") else where
        try:
            messages, repairs = normalise_record(record)
        except SkipRecord as s:
            report.skip(s.reason, located(where, record_id))
            continue
        report.repaired.update(repairs)
        conversations.append(Conversation(id=record_id, messages=messages, where=where))
    report.kept = len(conversations)
    if not conversations:
        raise ValueError(f"no usable conversation in {source}: {report.summary()}")
    return conversations, report
