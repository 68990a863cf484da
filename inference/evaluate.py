"""Acceptance and speedup of a drafter on Spec-Bench-format questions.

    python -m inference.evaluate --target smollm2-135m-instruct --drafter runs/medusa/drafter \
        --questions mt-bench --output eval.json [--per-category 2] [--check-lossless]

    python -m inference.evaluate --target smollm2-135m-instruct --drafter runs/draft_lm/drafter \
        --questions spec_bench_dev.jsonl --compare-hf

Each question is answered turn by turn (the second turn follows the model's own first answer) with plain target
decoding, then with speculative decoding (and, with --compare-hf, with transformers' assisted generation using the
same draft LM, and with --prompt-lookup also its prompt lookup), one after the other so that all see the same
machine state. The report pools tokens and target forwards per category and overall (Spec-Bench's tau), and each
speedup is the ratio of tokens per second measured in the same run on the same prompts. It also keeps the
target's own answers (plain decoding): what the figures were measured on. Every flag is a field of
inference.eval_config.EvalConfig, the options training's `eval:` section takes too.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import platform
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cli.errors import ArgumentParser, run_main
from data.questions import load_questions
from drafters import load_drafter
from drafters.draft_lm import check_draft_vocab
from drafters.kinds import get_kind, kind_of, kind_of_model_type
from target.model import load_target, stop_tokens, to_torch_dtype
from target.packing import grouped_query_attention, packed_linears

from .eval_config import ConfigError, EvalConfig
from .hf_baselines import ForwardCounter, hf_assisted_generate, hf_assistant_settings
from .lookup import LookupProposer
from .metrics import Tally, answer_repetition
from .proposer_setup import make_proposer
from .report import (acceptance_name, answer_record, drafter_target, format_table, prediction, summaries,
                     write_report)
from .speculative import Acceptance, GenerationResult, plain_generate, speculative_generate


def answer(generate, tokenizer, turns: list[str], max_new_tokens: int, device=None) -> list[GenerationResult]:
    """Answer every turn of one question; later turns see the model's own earlier answers."""
    messages, results = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        result = generate(torch.tensor(prompt, device=device), max_new_tokens)
        results.append(result)
        messages.append({"role": "assistant", "content": tokenizer.decode(result.tokens, skip_special_tokens=True)})
    return results


def evaluate_drafter(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, drafter, config: EvalConfig,
                     progress: bool = True, questions: list | None = None,
                     on_question: Callable[[dict], None] | None = None) -> dict:
    """Run the evaluation and return the report (see the module docstring), with target and drafter set up as
    `inference_setup` does. questions: config.questions loaded already (None: load them here);
    on_question(report): after each question but the last, the report so far (marked "partial")."""
    qs = questions if questions is not None else evaluation_questions(config)
    with inference_setup(target, drafter, config) as (drafter, setup):
        def with_setup(report: dict) -> dict:
            report["setup"].update(questions=config.questions, **setup)
            return report

        partial = None if on_question is None else (lambda report: on_question(with_setup(report)))
        report = with_setup(_evaluate(target, tokenizer, drafter, qs, config, progress, partial))
    return report


def evaluation_questions(config: EvalConfig) -> list:
    """config.questions as the evaluation runs them; refused when the selection leaves none."""
    qs = load_questions(config.questions, per_category=config.per_category, limit=config.limit)
    if not qs:
        raise ValueError(f"--questions {config.questions}: no questions to evaluate on; give a Spec-Bench-format "
                         f"JSONL with at least one question")
    return qs


@contextmanager
def inference_setup(target: PreTrainedModel, drafter, config: EvalConfig):
    """Yields (the drafter to decode with, a record of the setup). config.pack: on CPU, run target and drafter
    with oneDNN-prepacked linear layers and the target with grouped-query attention that does not copy its KV
    cache (target.packing), both for plain and speculative decoding. config.draft_dtype (draft LMs): a copy of the
    draft in this dtype; verification stays in the target's dtype, so decoding stays lossless."""
    kind = kind_of(drafter)
    config.check_kind(kind)
    drafter = prepare_drafter(drafter, target, config)
    reads_features = get_kind(kind).reads_target_features
    try:
        with packed_linears(target, enabled=config.pack) as packed, \
                packed_linears(drafter, enabled=config.pack) as packed_drafter, \
                grouped_query_attention(target, enabled=config.pack) as grouped:
            if reads_features:
                drafter.attach_target(target)  # a drafter borrowing the target's LM head gets the packed one here
            yield drafter, {"packed_linear_layers": packed + packed_drafter, "grouped_query_attention": grouped,
                            "draft_dtype": str(next(drafter.parameters()).dtype).removeprefix("torch.")}
    finally:
        if reads_features:
            drafter.attach_target(target)  # ... and the plain one again after


def prepare_drafter(drafter, target: PreTrainedModel, config: EvalConfig):
    """The drafter as evaluation runs it: a LoRA draft LM merged (same outputs, no adapter overhead), its vocabulary
    checked against the target's, and with config.draft_dtype a copy in that dtype (the caller's drafter is left
    as it is)."""
    if kind_of(drafter) != "draft_lm":
        return drafter
    if isinstance(drafter, PeftModel):
        drafter = copy.deepcopy(drafter).merge_and_unload()
    check_draft_vocab(drafter.config, target.config)
    if config.draft_dtype is not None:
        drafter = copy.deepcopy(drafter).to(to_torch_dtype(config.draft_dtype))
    return drafter


def _methods(target, drafter, proposer, config: EvalConfig, eos: set[int], gen: torch.Generator, counter):
    """name -> generate(input_ids, max_new_tokens): plain decoding first, then draftsmith's loop, then (with
    compare_hf) transformers' assisted generation with the same draft and, with prompt_lookup, its prompt lookup
    (their target forwards counted by `counter`)."""
    acceptance = Acceptance(temperature=config.temperature, typical=config.typical_acceptance)
    methods = {
        "plain": lambda ids, n: plain_generate(target, ids, n, eos, acceptance, gen),
        "draftsmith": lambda ids, n: speculative_generate(target, proposer, ids, n, eos, acceptance, gen),
    }
    if config.compare_hf:
        methods["hf_assisted"] = lambda ids, n: hf_assisted_generate(target, ids, n, eos, config.temperature,
                                                                     counter, assistant_model=drafter)
        if config.prompt_lookup:
            methods["hf_prompt_lookup"] = lambda ids, n: hf_assisted_generate(
                target, ids, n, eos, config.temperature, counter, **hf_lookup_settings(config))
    return methods


HF_LOOKUP_NGRAM = 3  # transformers' prompt lookup as a benchmark baseline, when draftsmith's own lookup is off


def hf_lookup_settings(config: EvalConfig) -> dict:
    """transformers' prompt lookup with the same n-gram size and copied tokens as draftsmith's (with draftsmith's
    lookup off: HF_LOOKUP_NGRAM and config.prompt_lookup_tokens)."""
    return dict(prompt_lookup_num_tokens=config.prompt_lookup_tokens,
                max_matching_ngram_size=config.prompt_lookup or HF_LOOKUP_NGRAM)


def _evaluate(target, tokenizer, drafter, qs, config: EvalConfig, progress: bool,
              on_question: Callable[[dict], None] | None = None) -> dict:
    torch.manual_seed(config.seed)  # transformers' sampling draws from the global generator
    gen = torch.Generator().manual_seed(config.seed)
    proposer, proposer_setup = make_proposer(drafter, target, temperature=config.temperature, generator=gen,
                                             **config.proposer_options())
    eos = stop_tokens(target, tokenizer)
    counter = ForwardCounter(target) if config.compare_hf else None
    methods = _methods(target, drafter, proposer, config, eos, gen, counter)
    max_new_tokens = config.max_new_tokens
    for generate in methods.values():  # warm-up, not counted
        answer(generate, tokenizer, ["Hello!"], 8, target.device)
    if isinstance(proposer, LookupProposer):  # draftsmith's prompt lookup: count its steps from here
        proposer.steps = proposer.accepted = 0
    done = _Done({name: defaultdict(Tally) for name in methods if name != "plain"})
    for i, q in enumerate(qs):
        results = {name: answer(generate, tokenizer, q.turns, max_new_tokens, target.device)
                   for name, generate in methods.items()}  # plain first, then each method, on the same machine
        done.add(q, results, tokenizer, eos)
        if progress:
            print(f"[{i + 1}/{len(qs)}] {q.category}: tau so far "
                  f"{done.tallies['draftsmith'][q.category].summary()['tau']:.2f}", file=sys.stderr)
        if on_question is not None and i + 1 < len(qs):
            on_question(_report(target, drafter, proposer, proposer_setup, config, done, len(qs)))
    if counter is not None:
        counter.handle.remove()
    return _report(target, drafter, proposer, proposer_setup, config, done, len(qs))


@dataclass
class _Done:
    """What the questions answered so far measured: per method and category tallies, lossless checks, answers."""
    tallies: dict
    questions: int = 0
    checked: int = 0
    mismatches: dict = field(default_factory=lambda: defaultdict(int))
    answers: list = field(default_factory=list)

    def add(self, q, results: dict, tokenizer, eos: set[int]) -> None:
        self.questions += 1
        self.answers.append(answer_record(q, results["plain"], tokenizer, eos))
        for turn, base in enumerate(results["plain"]):
            self.checked += 1
            for name in self.tallies:
                self.tallies[name][q.category].add(results[name][turn], base)
                self.mismatches[name] += results[name][turn].tokens != base.tokens


def _report(target, drafter, proposer, proposer_setup: dict, config: EvalConfig, done: _Done, num_questions: int):
    """The report of the questions done; with "partial" while some of the num_questions are still to run."""
    overall, per_category = summaries(done.tallies["draftsmith"])
    report = {
        "overall": overall,
        "per_category": per_category,
        "setup": {
            "target": target.config._name_or_path, "drafter_kind": kind_of(drafter),
            "drafter_target": drafter_target(drafter), "num_questions": done.questions,
            "max_new_tokens": config.max_new_tokens, "temperature": config.temperature,
            "acceptance": acceptance_name(config.temperature, config.typical_acceptance),
            "dtype": str(target.get_output_embeddings().weight.dtype).removeprefix("torch."),
            "device": str(target.device), "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "proposer": dict(proposer_setup),
        },
    }
    if done.questions < num_questions:
        report["partial"] = {"questions_done": done.questions, "of": num_questions}
    copies = isinstance(proposer, LookupProposer)
    if copies:
        report["setup"]["proposer"].update(lookup_steps=proposer.steps, lookup_accepted=proposer.accepted)
    if "calibration" in proposer_setup:  # --tree auto: the cost model's prediction against this measurement
        report["prediction"] = prediction(proposer_setup, overall, copies)
    if config.check_lossless:
        report["lossless"] = {"checked": done.checked, "mismatches": done.mismatches["draftsmith"]}
    report["answers"], report["answer_repetition"] = done.answers, answer_repetition(done.answers)
    for name in [n for n in done.tallies if n != "draftsmith"]:  # transformers' loops
        hf_overall, hf_per_category = summaries(done.tallies[name])
        settings = hf_assistant_settings(drafter) if name == "hf_assisted" else hf_lookup_settings(config)
        report[name] = {"overall": hf_overall, "per_category": hf_per_category, "settings": settings}
        if config.check_lossless:
            report[name]["lossless"] = {"checked": done.checked, "mismatches": done.mismatches[name]}
    return report


def build_parser() -> argparse.ArgumentParser:
    """The CLI: --target, --drafter, --output, --dtype, and one flag per EvalConfig field (its help and default)."""
    p = ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True, help="embedded name (smollm2-135m-instruct), path or Hub id")
    p.add_argument("--drafter", required=True, help="a drafter folder saved by draftsmith (or a Hub id)")
    p.add_argument("--output", help="write the JSON report here")
    p.add_argument("--dtype", default="float32", help="the target's dtype (float32, bfloat16, float16)")
    p.add_argument("--device", default="cpu", help="where target and drafter run (cpu, cuda, cuda:1, ...)")
    add_config_flags(p)
    return p


def add_config_flags(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """One flag per EvalConfig field except `exclude` (its help and default; --questions required)."""
    for f in dataclasses.fields(EvalConfig):
        if f.name in exclude:
            continue
        meta, flag = f.metadata, f.metadata["flag"] or "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action="store_false" if meta["invert"] else "store_true",
                           help=meta["help"])
        else:
            p.add_argument(flag, dest=f.name, default=f.default, type=_arg_type(f.type), help=meta["help"],
                           required=f.name == "questions")


def _arg_type(annotation: str):
    for name, kind in (("int", int), ("float", float)):
        if annotation.startswith(name):
            return kind
    return str


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig of parsed flags (fields without a flag keep their defaults)."""
    return EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig) if hasattr(args, f.name)})


def flag_message(err: Exception) -> str:
    """A config error in terms of CLI flags: eval.max_new_tokens -> --max-new-tokens."""
    return re.sub(r"eval\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(err))


def eval_argv(config: EvalConfig) -> list[str]:
    """The flags of build_parser that give `config` back (options at their defaults are left out)."""
    argv = []
    for f in dataclasses.fields(EvalConfig):
        value, meta = getattr(config, f.name), f.metadata
        if value == f.default and f.name != "questions":
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        argv += [flag] if isinstance(value, bool) else [flag, str(value)]
    return argv


def saved_kind(drafter: str) -> str | None:
    """The kind of a local drafter folder from its config.json, before any weights load (None: not known yet)."""
    config = Path(drafter) / "config.json"
    if (Path(drafter) / "adapter_config.json").is_file():
        return "draft_lm"
    if not config.is_file():
        return None
    return kind_of_model_type(json.loads(config.read_text()).get("model_type"))


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        config = config_from_args(args)
        to_torch_dtype(args.dtype)
        kind = saved_kind(args.drafter)
        if kind is not None:
            config.check_kind(kind)
        questions = evaluation_questions(config)
    except (ConfigError, ValueError) as err:
        p.error(flag_message(err))
    save = None
    if args.output:  # its folder made (or refused) before anything runs; the report rewritten after each question
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        save = functools.partial(write_report, path=args.output)
        save({"partial": {"questions_done": 0, "of": len(questions)}})
    target, tokenizer = load_target(args.target, dtype=args.dtype, device=args.device)
    drafter = load_drafter(args.drafter, target).to(target.dtype)
    report = evaluate_drafter(target, tokenizer, drafter, config, questions=questions, on_question=save)
    print(format_table(report))
    if save is not None:
        save(report)


if __name__ == "__main__":
    run_main(main)
