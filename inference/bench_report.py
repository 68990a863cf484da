"""The benchmark's results from its raw log: per method and category tau, speedup over plain decoding measured on
the same prompts in the same run, tokens/s, acceptance per draft depth, accepted-length histogram and lossless
mismatches; the machine and library versions; and the markdown tables of results.md."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections import defaultdict
from pathlib import Path

import torch

from .bench_log import turn_result
from .metrics import Tally, answer_repetition
from .report import answer_record, summaries

LIBRARIES = ("torch", "transformers", "peft", "datasets", "deepspeed", "matplotlib")


def method_results(name: str, records: list[dict], temperature: float) -> dict:
    """One method's summaries, each turn's speed against plain decoding's on the same turn; at temperature 0 the
    answers that differ from plain decoding's (greedy verification must reproduce them token for token)."""
    tallies, checked, mismatches = defaultdict(Tally), 0, 0
    for record in records:
        for turn, base in zip(record["methods"][name], record["methods"]["plain"]):
            result, baseline = turn_result(turn), turn_result(base)
            tallies[record["category"]].add(result, baseline)
            checked += 1
            mismatches += result.tokens != baseline.tokens
    overall, per_category = summaries(tallies)
    lossless = {"checked": checked, "mismatches": mismatches} if temperature == 0 and name != "plain" else None
    return {"overall": overall, "per_category": per_category, "lossless": lossless}


def lookup_counts(name: str, records: list[dict]) -> dict | None:
    """Steps that draftsmith's prompt lookup answered, and the tokens accepted in them, summed over questions."""
    counts = [r["lookup"][name] for r in records if name in r.get("lookup", {})]
    if not counts:
        return None
    return {key: sum(c[key] for c in counts) for key in ("lookup_steps", "lookup_accepted")}


def target_answers(records: list[dict], questions, tokenizer, eos: set[int]) -> list[dict]:
    """The target's own answers (plain decoding), in question order: what every figure was measured on."""
    by_id = {r["question_id"]: r for r in records}
    return [answer_record(q, [turn_result(t) for t in by_id[q.question_id]["methods"]["plain"]], tokenizer, eos)
            for q in questions if q.question_id in by_id]


def build_results(setups: dict, records: list[dict], questions, tokenizer, eos: set[int], temperature: float) -> dict:
    """setups: method -> its setup record (loop, drafter, proposer or settings), in run order."""
    methods = {}
    for name, setup in setups.items():
        methods[name] = {**setup, **method_results(name, records, temperature)}
        counts = lookup_counts(name, records)
        if counts:
            methods[name]["proposer"] = {**methods[name]["proposer"], **counts}
    answers = target_answers(records, questions, tokenizer, eos)
    return {"methods": methods, "answers": answers, "answer_repetition": answer_repetition(answers)}


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict:
    found = {"python": platform.python_version(), "draftsmith": _commit()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _commit() -> str | None:
    """The draftsmith commit that ran (-dirty: with uncommitted changes); None outside its own git checkout (a copy
    of the files inside another repository must not report that repository's commit)."""
    root = Path(__file__).resolve().parents[1]
    try:
        top = _git(root, "rev-parse", "--show-toplevel")
        return _git(root, "describe", "--always", "--dirty", "--abbrev=12") if top and Path(top) == root else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd, timeout=10).stdout.strip()


def markdown(results: dict) -> str:
    """results.md: the setup, one row per method, tau and speedup per category, and the plots."""
    s, methods, m, v = results["setup"], results["methods"], results["machine"], results["versions"]
    lines = [f"# {s['target']} on {s['questions']}", "",
             f"{s['num_questions']} questions, {s['num_answers']} answers, at most {s['max_new_tokens']} new tokens, "
             f"{s['acceptance']}; every method on the same prompts in one process, interleaved per question.", "",
             f"Machine: {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads), {m['device']}"
             + (f", {m['gpu']}" if "gpu" in m else "") + f"; {s['dtype']}. torch {v['torch']}, transformers "
             f"{v['transformers']}, draftsmith {v['draftsmith']}.", "",
             f"Command: `{results['command']}`", "", *method_table(results)]
    for key, title, fmt in (("tau", "τ per category", "{:.2f}"), ("speedup", "Speedup per category", "{:.2f}x")):
        names = [n for n in methods if n != "plain"]
        lines += ["", f"## {title}", "", "| category | " + " | ".join(names) + " |",
                  "| --- |" + " ---: |" * len(names)]
        for cat in [*methods["plain"]["per_category"], "overall"]:
            cells = [fmt.format(_row(methods[n], cat)[key]) for n in names]
            lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    lines += [""] + [f"![{title}]({file})" for file, title in results["plots"].items()]
    lines += [""] + [f"Note: {note}" for note in results["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def method_table(results: dict) -> list[str]:
    """One row per method: tau, speedup, tokens/s and lossless mismatches (the README's headline table)."""
    lines = ["| method | loop | τ | speedup | tokens/s | lossless mismatches |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for name, r in results["methods"].items():
        o, loss = r["overall"], r["lossless"]
        lines.append(f"| {name} | {_loop(r)} | {o['tau']:.2f} | {o['speedup']:.2f}x | {o['tokens_per_s']:.1f} | "
                     + (f"{loss['mismatches']} of {loss['checked']}" if loss else "-") + " |")
    return lines


def _loop(r: dict) -> str:
    return f"draftsmith, {r['drafter_kind']}" if r["loop"] == "draftsmith" else r["loop"]


def _row(method: dict, category: str) -> dict:
    return method["overall"] if category == "overall" else method["per_category"][category]
