"""Every method on the same prompts, in one process, interleaved per question: plain decoding, each drafter in
draftsmith's verification loop, then transformers' own loops (prompt lookup; assisted generation with each draft LM
given), so that every speedup is a ratio of tokens per second measured side by side on the same machine state.

    python -m inference.benchmark --target smollm2-135m-instruct \
        --drafters runs/medusa_smollm2/drafter runs/eagle3_smollm2/drafter runs/draft_lm_smollm2_gpu/drafter \
        --baselines plain hf-lookup hf-assisted --questions mt-bench --max-new-tokens 128 --output bench

writes bench/results.json (every figure; the machine, library versions and command line), bench/results.md (the
tables) and PNG plots (tau and speedup per category; acceptance per draft depth; accepted-length histogram).
Each question is appended to bench/answers.jsonl as it finishes: the same command run again skips the questions
already there (and refuses if its arguments differ), so an interrupted benchmark keeps what it measured.

Drafters are `[NAME=]DRAFTER[@key=value...]`: a folder saved by draftsmith, a Hub id or a zoo name, its rows'
name, and options of its own (inference.bench_drafters). The run's options are inference.evaluate's (EvalConfig's
fields); each applies to the drafter kinds that take it (e.g. --draft-k to draft LMs), and one that no drafter
given takes is refused. hf-assisted runs once per draft-LM drafter; hf-lookup copies like draftsmith's
--prompt-lookup (n-grams of --prompt-lookup tokens, else 3; --prompt-lookup-tokens tokens).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cli.errors import ArgumentParser, run_main
from data.questions import load_questions
from drafters import load_drafter
from drafters.kinds import get_kind, kind_of
from target.model import load_target, stop_tokens, to_torch_dtype
from target.packing import grouped_query_attention, packed_linears

from .bench_drafters import DrafterSpec, check_options, parse_drafters
from .bench_log import RawLog, turn_record
from .bench_report import build_results, machine, markdown, versions
from .eval_config import ConfigError, EvalConfig
from .evaluate import (add_config_flags, answer, config_from_args, flag_message, hf_lookup_settings, prepare_drafter,
                       saved_kind)
from .hf_baselines import ForwardCounter, hf_assisted_generate, hf_assistant_settings
from .plots import write_plots
from .proposer_setup import make_proposer
from .report import acceptance_name, drafter_target
from .speculative import Acceptance, plain_generate, speculative_generate

BASELINES = ("plain", "hf-lookup", "hf-assisted")
RAW_LOG = "answers.jsonl"
NOT_FLAGS = ("compare_hf", "check_lossless")  # the baselines replace the one; plain decoding always runs (the other)


@dataclass
class Method:
    name: str          # plain, a drafter's name, hf-lookup, hf-assisted(<drafter's name>)
    setup: dict        # loop (plain, draftsmith, hf-lookup, hf-assisted) and what shaped it, for the report
    generate: Callable  # (input_ids [T], max_new_tokens) -> GenerationResult
    proposer: object = None


@dataclass
class Drafter:
    spec: DrafterSpec
    model: object
    config: EvalConfig  # the options it runs with (DrafterSpec.config)


def build_methods(target, drafters: list[Drafter], baselines: list[str], config: EvalConfig, eos: set[int],
                  gen: torch.Generator, counter: ForwardCounter, recorded: dict) -> tuple[list[Method], list[str]]:
    """plain, each drafter's loop, then the baselines; `recorded` (a resumed run's setups) pins the calibrated
    trees, so that every question of a benchmark is answered with the same tree."""
    acceptance = Acceptance(temperature=config.temperature, typical=config.typical_acceptance)
    methods = [Method("plain", {"loop": "plain"}, lambda ids, n: plain_generate(target, ids, n, eos, acceptance, gen))]
    for d in drafters:
        options = d.config.proposer_options()
        pinned = recorded.get(d.spec.name, {}).get("proposer", {}).get("paths")
        if options.get("tree") == "auto" and pinned:
            options["tree"] = json.dumps(pinned)
        proposer, setup = make_proposer(d.model, target, temperature=config.temperature, generator=gen, **options)
        setup = {"loop": "draftsmith", "drafter": d.spec.path, "options": d.spec.options,
                 "drafter_kind": kind_of(d.model), "drafter_target": drafter_target(d.model), "proposer": setup}
        methods.append(Method(d.spec.name, recorded.get(d.spec.name, setup), proposer=proposer,
                              generate=lambda ids, n, p=proposer: speculative_generate(target, p, ids, n, eos,
                                                                                       acceptance, gen)))
    notes = []
    if "hf-lookup" in baselines:
        settings = hf_lookup_settings(config)
        methods.append(Method("hf-lookup", {"loop": "hf-lookup", "settings": settings}, lambda ids, n:
                              hf_assisted_generate(target, ids, n, eos, config.temperature, counter, **settings)))
    if "hf-assisted" in baselines:
        methods += _assisted(target, drafters, config, eos, counter)
        if not any(kind_of(d.model) == "draft_lm" for d in drafters):
            notes.append("hf-assisted skipped: transformers' assisted generation needs a draft-LM drafter, and none "
                         "was given")
    return methods, notes


def _assisted(target, drafters: list[Drafter], config: EvalConfig, eos: set[int], counter) -> list[Method]:
    """transformers' assisted generation with each draft LM given (once per folder and draft dtype)."""
    methods, seen = [], set()
    for d in drafters:
        key = (d.spec.path, d.config.draft_dtype)
        if kind_of(d.model) != "draft_lm" or key in seen:
            continue
        seen.add(key)
        setup = {"loop": "hf-assisted", "drafter": d.spec.path, "settings": hf_assistant_settings(d.model)}
        methods.append(Method(f"hf-assisted({d.spec.name})", setup, lambda ids, n, m=d.model: hf_assisted_generate(
            target, ids, n, eos, config.temperature, counter, assistant_model=m)))
    return methods


def run_questions(methods: list[Method], questions, tokenizer, config: EvalConfig, log: RawLog, device,
                  gen: torch.Generator, progress: bool, on_answer: Callable | None) -> None:
    """Each question not in the log yet: every method in turn (sampling reseeded per question and method, so a
    resumed run answers as a straight one), then one log line."""
    done = log.done()
    todo = [(i, q) for i, q in enumerate(questions) if q.question_id not in done]
    if todo:
        for m in methods:  # warm-up, not counted
            answer(m.generate, tokenizer, ["Hello!"], 8, device)
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), unit="question", disable=not progress)
    for i, q in todo:
        record = {"question_id": q.question_id, "category": q.category, "methods": {}, "lookup": {}}
        for m in methods:
            bar.set_postfix_str(f"{q.category}: {m.name}")
            torch.manual_seed(config.seed + i)  # transformers' sampling draws from the global generator
            gen.manual_seed(config.seed + i)
            before = _lookup_counts(m.proposer)
            turns = answer(m.generate, tokenizer, q.turns, config.max_new_tokens, device)
            record["methods"][m.name] = [turn_record(t) for t in turns]
            if before is not None:
                after = _lookup_counts(m.proposer)
                record["lookup"][m.name] = {k: after[k] - before[k] for k in after}
            if on_answer is not None:
                on_answer(i, q, m.name)
        log.append(record)
        bar.update()
    bar.close()


def _lookup_counts(proposer) -> dict | None:
    if getattr(proposer, "lookup", None) is None:
        return None
    return {"lookup_steps": proposer.steps, "lookup_accepted": proposer.accepted}


def run_benchmark(target, tokenizer, drafters: list[Drafter], baselines: list[str], config: EvalConfig, questions,
                  log: RawLog, progress: bool = True, on_answer: Callable | None = None) -> dict:
    """Run what the log lacks and return the results of all of it.
    On CPU, target and drafters run with prepacked linear layers and grouped-query attention (config.pack), every
    method alike."""
    eos = stop_tokens(target, tokenizer)
    gen = torch.Generator().manual_seed(config.seed)
    counter = ForwardCounter(target)
    feature_drafters = [d.model for d in drafters if get_kind(kind_of(d.model)).reads_target_features]
    try:
        with contextlib.ExitStack() as stack:
            packed = stack.enter_context(packed_linears(target, enabled=config.pack))
            for d in drafters:
                packed += stack.enter_context(packed_linears(d.model, enabled=config.pack))
            grouped = stack.enter_context(grouped_query_attention(target, enabled=config.pack))
            for drafter in feature_drafters:
                drafter.attach_target(target)  # a drafter borrowing the target's LM head gets the packed one
            methods, notes = build_methods(target, drafters, baselines, config, eos, gen, counter,
                                           log.recorded_setups())
            log.start({m.name: m.setup for m in methods})
            run_questions(methods, questions, tokenizer, config, log, target.device, gen, progress, on_answer)
    finally:
        counter.handle.remove()
        for drafter in feature_drafters:
            drafter.attach_target(target)  # ... and the plain one again
    results = build_results({m.name: m.setup for m in methods}, log.records, questions, tokenizer, eos,
                            config.temperature)
    results["setup"] = {
        "target": target.config._name_or_path, "questions": config.questions, "num_questions": len(log.records),
        "num_answers": sum(len(r["methods"]["plain"]) for r in log.records), "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature, "acceptance": acceptance_name(config.temperature, config.typical_acceptance),
        "dtype": str(target.get_output_embeddings().weight.dtype).removeprefix("torch."),
        "packed_linear_layers": packed, "grouped_query_attention": grouped,
        "order": "per question: " + ", ".join(m.name for m in methods)}
    results["notes"] = notes + _notes(config)
    results["machine"], results["versions"] = machine(target.device), versions()
    return results


def _notes(config: EvalConfig) -> list[str]:
    if config.typical_acceptance:
        return ["typical acceptance is LOSSY: the drafters' outputs are not distributed as the target's"]
    if config.temperature > 0:
        return ["sampled answers: losslessness holds in distribution and is not checked token for token"]
    return []


REPORT_ORDER = ("command", "arguments", "machine", "versions", "setup", "methods", "notes", "plots",
                "answer_repetition", "answers")


def write_outputs(results: dict, folder: Path) -> None:
    results["plots"] = write_plots(results, folder)
    ordered = {key: results[key] for key in REPORT_ORDER}
    (folder / "results.json").write_text(json.dumps(ordered, indent=2) + "\n")
    (folder / "results.md").write_text(markdown(results))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True, help="embedded name (smollm2-135m-instruct), path or Hub id")
    p.add_argument("--drafters", nargs="+", default=[], metavar="[NAME=]DRAFTER[@key=value]",
                   help="drafter folders, Hub ids or zoo names, each in draftsmith's loop, optionally named and with "
                        "drafter options of its own (e.g. lookup=runs/d/drafter@prompt_lookup=3)")
    p.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=BASELINES,
                   help="plain decoding (always run: every speedup is against it), transformers' prompt lookup, "
                        "transformers' assisted generation with each draft-LM drafter")
    p.add_argument("--output", required=True, help="folder for results.json, results.md, the plots and answers.jsonl")
    p.add_argument("--dtype", default="float32", help="the target's dtype (float32, bfloat16, float16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (target and drafters)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_config_flags(p, exclude=NOT_FLAGS)
    return p


def check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device; give cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}); use cpu")


def arguments_record(args: argparse.Namespace, drafters: list[DrafterSpec], config: EvalConfig, questions) -> dict:
    """What a resumed run must share with the run it continues: the arguments, the questions (by content), and the
    machine and libraries its timings depend on."""
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(q) for q in questions]).encode()).hexdigest()
    libraries = {k: v for k, v in versions().items() if k != "draftsmith"}
    return {"target": args.target, "drafters": {d.name: {"path": d.path, "options": d.options} for d in drafters},
            "baselines": sorted(set(args.baselines)),
            "dtype": args.dtype, "device": args.device, "questions_sha256": digest,
            **{k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_FLAGS},
            "machine": machine(torch.device(args.device)), "libraries": libraries}


def main(argv: list[str] | None = None, on_answer: Callable | None = None) -> dict:
    """on_answer(index, question, method name): called after each method answered a question (tests use it)."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        config = config_from_args(args)
        to_torch_dtype(args.dtype)
        check_device(args.device)
        drafters = parse_drafters(args.drafters, args.target)
        kinds = [saved_kind(d.path) for d in drafters]
        if None not in kinds:  # every kind known before loading: check the options now
            check_options(config, list(zip(drafters, kinds)), args.baselines)
        questions = load_questions(config.questions, per_category=config.per_category, limit=config.limit)
        output = Path(args.output)
        output.mkdir(parents=True, exist_ok=True)
        log = RawLog(output / RAW_LOG, arguments_record(args, drafters, config, questions))
    except (ConfigError, ValueError, OSError) as err:
        p.error(flag_message(err))
    target, tokenizer = load_target(args.target, dtype=args.dtype, device=args.device)
    models = [load_drafter(d.path, target).to(device=target.device, dtype=target.dtype) for d in drafters]
    try:
        check_options(config, [(d, kind_of(m)) for d, m in zip(drafters, models)], args.baselines)
    except ConfigError as err:
        p.error(flag_message(err))
    loaded = []
    for spec, model in zip(drafters, models):
        own = spec.config(config, kind_of(model))
        loaded.append(Drafter(spec, prepare_drafter(model, target, own), own))
    results = run_benchmark(target, tokenizer, loaded, args.baselines, config, questions, log, args.progress,
                            on_answer)
    results["command"] = shlex.join(["python", "-m", "inference.benchmark", *(sys.argv[1:] if argv is None else argv)])
    results["arguments"] = log.arguments
    write_outputs(results, output)
    print((output / "results.md").read_text())
    return results


if __name__ == "__main__":
    run_main(main)
