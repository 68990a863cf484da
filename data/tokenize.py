"""Conversations -> token ids + loss masks, with the tokenizer's own chat template; cached datasets.

How the assistant tokens are found, for any template (no separators or offsets are hard-coded):
render the conversation prefix by prefix — messages[:i] with the generation prompt (P_i) and messages[:i+1]
without it (A_i), for every assistant turn i — and check each render is a text prefix of the next, ending at
the whole conversation F. Assistant turn i is then the tokens of F between where P_i and A_i end.
Where a render ends in F's tokens is found two ways, both token-exact:
  * fast (linear): tokenize the text between consecutive renders on its own; if the pieces' tokens concatenate
    to F's tokens, the piece boundaries are token boundaries of F.
  * exact (quadratic in turns), when a token spans a boundary (BPE merging the `\n` of `assistant\n` with an
    answer that starts with newlines) or the tokenizer treats text starts specially (SentencePiece's `▁`):
    tokenize every render on its own and take its common prefix with F's tokens. A merged boundary token is
    then a target at a span start (it holds assistant text) and not at a span end.
The span is cut after its last end-of-sequence token, so what a template writes after `<|im_end|>` or
`<|eot_id|>` (a newline) is not a target, while the end-of-turn token itself is.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import datasets
import jinja2

from cli.files import file_record, record_problem, reporting_full_disk
from data.conversations import LoadReport, load_conversations

CACHE_VERSION = 2  # bump when the tokenization rules or the cache layout change: old caches then stop matching
CACHE_FILES = "files.json"  # size and CRC-32 of every file of a token cache, checked before it is used
FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),  # [T]
    "loss_mask": datasets.List(datasets.Value("int8")),  # [T], 1 on assistant tokens
    "length": datasets.Value("int32"),  # T
})


class ChatTemplateError(ValueError):
    """The tokenizer's chat template is missing, or cannot be used to find assistant tokens."""


# ----------------------------------------------------------------------------------------------------------
# One conversation
# ----------------------------------------------------------------------------------------------------------

def _tokenizer_name(tokenizer) -> str:
    return f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '') or '?'!r})"


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"tokenizer {_tokenizer_name(tokenizer)} has no chat template; draftsmith renders conversations with "
            "the target's own template. Load the tokenizer of the instruct/chat model, or set "
            "`tokenizer.chat_template = '<jinja template>'` (e.g. copied from the model's chat_template.jinja)."
        )


@functools.lru_cache(maxsize=8)
def _control_token_pattern(tokens: tuple[str, ...]) -> re.Pattern | None:
    alternatives = sorted((t for t in tokens if t), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, alternatives))) if alternatives else None


def _mentions_control_token(tokenizer, messages: list[dict]) -> bool:
    """Does any message text contain a control token's string, e.g. a user pasting '<|im_end|>'? Control tokens:
    the special added tokens, and added tokens the chat template writes (as transformers defines them)."""
    template = str(tokenizer.chat_template)  # a str, or a dict of named templates
    pattern = _control_token_pattern(tuple(
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special or t.content in template))
    return pattern is not None and any(pattern.search(m["content"]) for m in messages)


def _render_plan(messages: list[dict]) -> list[tuple[int, bool]]:
    """(k, add_generation_prompt) for the renders P_1, A_1, P_2, A_2, ..., F, in text order."""
    plan = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            plan += [(i, True), (i + 1, False)]
    if not plan or plan[-1] != (len(messages), False):
        plan.append((len(messages), False))  # F, unless the last message is an assistant turn (then F = A_last)
    return plan


def _check_prefix_stable(tokenizer, plan, texts: list[str]) -> None:
    """Each render must be a text prefix of the next; otherwise spans cannot be found by diffing."""
    for (k0, g0), (k1, g1), t0, t1 in zip(plan, plan[1:], texts, texts[1:]):
        if t1.startswith(t0):
            continue
        at = next((j for j, (a, b) in enumerate(zip(t0, t1)) if a != b), min(len(t0), len(t1)))
        raise ChatTemplateError(
            f"chat template of {_tokenizer_name(tokenizer)} is not prefix-stable: rendering messages[:{k0}]"
            f"{' + generation prompt' if g0 else ''} is not a prefix of rendering messages[:{k1}]"
            f"{' + generation prompt' if g1 else ''} (they differ at char {at}: {t0[at:at + 40]!r} vs "
            f"{t1[at:at + 40]!r}). draftsmith finds assistant tokens by diffing such renders, so earlier turns must "
            "render the same whatever follows them; set `tokenizer.chat_template` to a template that does "
            "(templates that rewrite earlier assistant turns, e.g. by stripping reasoning, do not)."
        )


def _render_texts(tokenizer, messages: list[dict], plan) -> list[str]:
    texts = [tokenizer.apply_chat_template(messages[:k], add_generation_prompt=g, tokenize=False) for k, g in plan]
    _check_prefix_stable(tokenizer, plan, texts)
    return texts


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((j for j in range(n) if a[j] != b[j]), n)


def _bounds_by_segments(tokenizer, texts: list[str]) -> tuple[list[int], list[int]] | None:
    """Fast path, linear in length: tokenize the text between consecutive renders on its own.

    If the pieces' tokens concatenate to exactly the tokens of the whole conversation, every render ends on a
    token boundary of it: returns (ids [T], token count of each render). Otherwise (a token spans a turn
    boundary, or the tokenizer treats the start of a text specially) returns None.
    """
    pieces = [texts[0]] + [t1[len(t0):] for t0, t1 in zip(texts, texts[1:])]
    encoded = tokenizer([texts[-1]] + pieces, add_special_tokens=False)["input_ids"]
    ids, piece_ids = encoded[0], encoded[1:]
    if [t for p in piece_ids for t in p] != ids:
        return None
    bounds, total = [], 0
    for p in piece_ids:
        total += len(p)
        bounds.append(total)
    return ids, bounds


def _bounds_by_prefixes(encoded: list[list[int]]) -> tuple[list[int], list[int]]:
    """Exact path, quadratic in turns: each render tokenized on its own; its tokens that agree with the whole
    conversation's tokens (their common prefix) are where it ends."""
    ids = encoded[-1]
    return ids, [_common_prefix_len(e, ids) for e in encoded]


def _conversation_bounds(tokenizer, messages: list[dict], plan) -> tuple[list[int], list[int]]:
    """Tokens of the whole conversation [T] and, for each render in `plan`, where it ends in them."""
    texts = _render_texts(tokenizer, messages, plan)
    if _mentions_control_token(tokenizer, messages):
        # Rare: message text contains a control token's string, e.g. a user pasting '<|im_end|>'. Encode it as
        # plain text, as the template's own tokens only, not as a control token (it would end the turn early).
        return _bounds_by_prefixes([
            tokenizer.apply_chat_template(messages[:k], add_generation_prompt=g, tokenize=True, return_dict=False,
                                          sanitize_control_tokens=True) for k, g in plan])
    fast = _bounds_by_segments(tokenizer, texts)
    if fast is not None:
        return fast
    return _bounds_by_prefixes(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _cut_after_last_eos(ids: list[int], start: int, end: int, eos_id: int | None) -> int:
    """End of an assistant span: just after its last end-of-sequence token, if it has one."""
    for j in range(end - 1, start - 1, -1):
        if ids[j] == eos_id:
            return j + 1
    return end


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> dict:
    """Tokenize `messages` with `tokenizer`'s chat template; mark the assistant's tokens.

    Returns {"input_ids": list[int] [T], "loss_mask": list[int] [T]} with T <= max_length (the prefix is kept);
    loss_mask is 1 on each assistant turn's content and end-of-turn token, 0 on system/user turns and on
    template scaffolding (including the generation prompt). Raises `ChatTemplateError` when the tokenizer has
    no chat template or its template is not prefix-stable.
    """
    _require_chat_template(tokenizer)
    if not messages or messages[0]["role"] == "assistant":
        raise ValueError("messages must start with a system or user turn (got "
                         f"{messages[0]['role'] if messages else 'no messages'}); there is no prompt to render "
                         "before a leading assistant turn — drop it first (load_conversations does).")
    plan = _render_plan(messages)
    ids, bounds = _conversation_bounds(tokenizer, messages, plan)  # ids: [T_full]
    mask = [0] * len(ids)
    for start, end in zip(bounds[0:-1:2], bounds[1::2]):  # (end of P_i, end of A_i) for each assistant turn i
        if start >= max_length:
            break  # this and later turns are cut off anyway
        end = _cut_after_last_eos(ids, start, end, tokenizer.eos_token_id)
        mask[start:end] = [1] * (end - start)
    return {"input_ids": ids[:max_length], "loss_mask": mask[:max_length]}


# ----------------------------------------------------------------------------------------------------------
# A whole source, cached
# ----------------------------------------------------------------------------------------------------------

def _source_fingerprint(source: str) -> str:
    """Content hash of a file; (path, size, mtime) of every file of a directory; the name of a hub dataset."""
    h = hashlib.sha256()
    if os.path.isfile(source):
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        return "file:" + h.hexdigest()
    if os.path.isdir(source):
        for root, dirs, files in sorted(os.walk(source)):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(os.path.join(root, name))
                h.update(f"{os.path.relpath(os.path.join(root, name), source)}:{st.st_size}:{st.st_mtime_ns};".encode())
        return "dir:" + h.hexdigest()
    return "name:" + source  # a hub dataset: keyed by name (a newer upstream revision is not noticed)


def _tokenizer_fingerprint(tokenizer) -> str:
    """Chat template + full tokenizer definition (vocab, merges, normalizer, added tokens) + EOS."""
    h = hashlib.sha256()
    h.update(f"{type(tokenizer).__name__}|{tokenizer.chat_template}|{tokenizer.eos_token_id}|".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # Python (e.g. SentencePiece) tokenizers: the vocabulary and added tokens define them
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


def cache_key(source: str, tokenizer, max_length: int, limit: int | None, fingerprint: str | None = None) -> str:
    """fingerprint: `_source_fingerprint(source)` when the caller has it already (it reads the whole file)."""
    parts = [f"v{CACHE_VERSION}", fingerprint or _source_fingerprint(source), _tokenizer_fingerprint(tokenizer),
             f"max_length={max_length}", f"limit={limit}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _tokenize_all(source: str, tokenizer, max_length: int, limit: int | None) -> tuple[dict, LoadReport]:
    conversations, report = load_conversations(source, limit=limit)
    columns: dict[str, list] = {"input_ids": [], "loss_mask": [], "length": []}
    started, n_tokens, n_targets = time.perf_counter(), 0, 0
    for conv in conversations:
        try:
            example = tokenize_conversation(tokenizer, conv.messages, max_length)
        except (ChatTemplateError, jinja2.TemplateError) as e:
            raise ChatTemplateError(f"conversation {conv.id!r} of {source}: {e}") from e
        report.tokenized += 1
        targets = sum(example["loss_mask"])
        if targets == 0:
            report.skip(f"no assistant tokens within max_length={max_length}", conv.location())
            continue
        columns["input_ids"].append(example["input_ids"])
        columns["loss_mask"].append(example["loss_mask"])
        columns["length"].append(len(example["input_ids"]))
        n_tokens, n_targets = n_tokens + len(example["input_ids"]), n_targets + targets
    report.kept = len(columns["length"])
    report.notes.append(f"tokenized {report.tokenized:,} conversations in {time.perf_counter() - started:.1f} s: "
                        f"{n_tokens:,} tokens, {n_targets:,} assistant tokens "
                        f"({n_targets / max(n_tokens, 1):.1%})")
    if not report.kept:
        raise ValueError(f"no conversation of {source} has assistant tokens within max_length={max_length}: "
                         f"{report.summary()}")
    return columns, report


def _save_atomically(dataset: datasets.Dataset, report: LoadReport, final_dir: str) -> None:
    """Write into a temporary sibling directory, then rename: readers never see a half-written cache."""
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(final_dir)}.tmp-")
    try:
        with reporting_full_disk(parent, "the token cache"):
            dataset.save_to_disk(os.path.join(tmp, "dataset"))
            with open(os.path.join(tmp, "report.json"), "w") as f:
                json.dump(report.to_json(), f)
            files = file_record(Path(tmp))
            with open(os.path.join(tmp, CACHE_FILES), "w") as f:
                json.dump(files, f)
        os.rename(tmp, final_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(final_dir):  # not a lost race with another writer: a real failure
            raise


def _load_cached(final_dir: str) -> tuple[datasets.Dataset, LoadReport] | str:
    """The cached dataset and report, or what is wrong with the cache (a damaged file, or one written before
    caches recorded their files)."""
    try:
        with open(os.path.join(final_dir, CACHE_FILES)) as f:
            problem = record_problem(Path(final_dir), json.load(f))
        if problem is not None:
            return problem
        with open(os.path.join(final_dir, "report.json")) as f:
            report = LoadReport.from_json(json.load(f))
        dataset = datasets.load_from_disk(os.path.join(final_dir, "dataset"))
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{type(err).__name__}: {err}"
    report.notes.append(f"loaded from token cache {final_dir} (not re-tokenized)")
    return dataset, report


def _discard(final_dir: str) -> None:
    """Move a damaged cache out of the way (a rename: readers never see it half-deleted), then delete it."""
    doomed = tempfile.mkdtemp(dir=os.path.dirname(final_dir), prefix=f".{os.path.basename(final_dir)}.damaged-")
    os.rename(final_dir, os.path.join(doomed, "cache"))
    shutil.rmtree(doomed, ignore_errors=True)


def build_token_dataset(source: str, tokenizer, max_length: int, cache_dir: str | None = None,
                        limit: int | None = None) -> tuple[datasets.Dataset, LoadReport]:
    """Load `source` (see `load_conversations`), tokenize every conversation, return a `datasets.Dataset` with
    columns input_ids [T], loss_mask [T], length, plus the load report.

    With `cache_dir`, the result is stored under `cache_dir/<key>`, key = (source content, tokenizer and chat
    template, max_length, limit); a later call with the same key loads it (report.tokenized == 0).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    _require_chat_template(tokenizer)
    final_dir = os.path.join(cache_dir, cache_key(source, tokenizer, max_length, limit)) if cache_dir else None
    damaged = None
    if final_dir and os.path.isdir(final_dir):
        cached = _load_cached(final_dir)
        if not isinstance(cached, str):
            return cached
        damaged = cached
        _discard(final_dir)
    columns, report = _tokenize_all(source, tokenizer, max_length, limit)
    dataset = datasets.Dataset.from_dict(columns, features=FEATURES)
    if final_dir:
        _save_atomically(dataset, report, final_dir)
        report.notes.append(f"saved token cache {final_dir}")
    if damaged is not None:
        report.notes.append(f"the token cache there was damaged ({damaged}): tokenized again")
    return dataset, report
