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
target's own answers (plain decoding): what the figures were measured on.

Medusa drafters verify a token tree sized by calibration on this machine; EAGLE drafters draft EAGLE-2 dynamic trees
(or a chain / static tree, --tree); draft LMs draft a chain of k tokens (adaptive by default), or with
--prompt-lookup N copy where the last N..2 tokens occurred before. The drafter kind is read from the saved folder.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections import defaultdict

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data.questions import Question, load_questions
from drafters import EagleModel, MedusaModel, load_drafter
from drafters.draft_lm import check_draft_vocab
from drafters.vocab import draftsmith_meta, get_draft_vocab

from .calibrate import NODE_COUNTS, choose_tree, draft_cost_ratio, proposer_seconds, verify_latency
from .draft_lm_proposer import DraftLMProposer
from .eagle_proposer import EagleProposer
from .lookup import PromptLookup
from .metrics import Tally, answer_repetition, repeated_ngrams
from target.packing import grouped_query_attention, packed_linears
from .proposers import MedusaProposer
from .speculative import Acceptance, GenerationResult, plain_generate, speculative_generate
from target.model import load_target, stop_tokens, to_torch_dtype

# Used when a drafter carries no measured per-head accuracy (e.g. untrained heads): a deliberately modest guess.
PRIOR_ACCURACY = [[0.5 * 0.7 ** k * 0.3 ** i for i in range(4)] for k in range(8)]


def medusa_proposer(drafter: MedusaModel, target: PreTrainedModel, tree: str, max_nodes: int,
                    draft_vocab: list[int] | None = None):
    """tree: 'auto' (calibrated on this device), 'chain' (top-1 of every head) or a JSON list of rank paths."""
    make = lambda paths: MedusaProposer(drafter, paths, draft_vocab)  # noqa: E731
    if tree != "auto":
        proposer = make(fixed_paths(tree, drafter.config.num_heads))
        return proposer, {"nodes": len(proposer.paths) + 1, "paths": [list(p) for p in proposer.paths]}
    accuracy = drafter.config.head_topk_accuracy
    if not accuracy:
        print("warning: the drafter records no per-head accuracy; sizing the tree with a prior guess",
              file=sys.stderr)
        accuracy = PRIOR_ACCURACY[:drafter.config.num_heads]
    return calibrated_tree(accuracy, target, make, drafter.config.hidden_size, max_nodes)


def fixed_paths(tree: str, depth: int) -> list[tuple[int, ...]]:
    """The rank paths of a tree given by name: 'chain' (top-1 at each of `depth` depths) or a JSON list."""
    return [(0,) * d for d in range(1, depth + 1)] if tree == "chain" else [tuple(p) for p in json.loads(tree)]


def calibrated_tree(accuracy: list[list[float]], target: PreTrainedModel, make_proposer, feature_width: int,
                    max_nodes: int):
    """The static tree of rank paths that maximises predicted tokens per second on this device (choose_tree):
    accuracy[d][i] = P(rank-i candidate at depth d is right), the target's verify forward timed for each node
    count <= max_nodes, and the proposer's own drafting of each candidate tree timed (make_proposer(paths); its
    begin/update take features of feature_width). Returns (proposer, calibration record for the report)."""
    latency = verify_latency(target, [n for n in NODE_COUNTS if n <= max_nodes])
    dtype = target.get_output_embeddings().weight.dtype
    choice = choose_tree(accuracy, latency, proposer_seconds(make_proposer, feature_width, dtype, target.device))
    calibration = {"verify_seconds": {str(n): s for n, s in latency.items()}, "candidates": choice.table,
                   "nodes": len(choice.paths) + 1, "paths": [list(p) for p in choice.paths],
                   "expected_tau": choice.expected_tau, "predicted_speedup": choice.predicted_speedup}
    return make_proposer(choice.paths), calibration


def eagle_proposer(drafter: EagleModel, target: PreTrainedModel, tree: str, max_nodes: int, depth: int, topk: int,
                   draft_vocab: list[int] | None = None):
    """tree: 'auto' (a static tree calibrated on this device from the drafter's held-out accuracy per depth and
    rank, at most `depth` deep, see calibrated_tree), 'dynamic' (EAGLE-2, max_nodes nodes), 'chain' (depth
    tokens) or JSON rank paths (a static tree)."""
    setup = {"tree": tree, "depth": depth, "topk": topk}
    if tree == "dynamic":
        proposer = EagleProposer(drafter, "dynamic", depth=depth, topk=topk, nodes=max_nodes, draft_vocab=draft_vocab)
        return proposer, {**setup, "nodes": max_nodes}
    make = lambda paths: EagleProposer(drafter, "static", paths=paths, draft_vocab=draft_vocab)  # noqa: E731
    if tree == "auto":
        proposer, setup["calibration"] = calibrated_tree(eagle_accuracy(drafter)[:depth], target, make,
                                                         drafter.config.feature_width, max_nodes)
    else:
        proposer = make(fixed_paths(tree, depth))
    return proposer, {**setup, "nodes": len(proposer.paths) + 1, "paths": [list(p) for p in proposer.paths]}


def eagle_accuracy(drafter: EagleModel) -> list[list[float]]:
    """acc[d][i] for calibrated_tree: the held-out per-depth, per-rank accuracy recorded at training; a drafter
    that records top-1 only gets chains; one that records nothing, the prior guess (with a warning)."""
    config = drafter.config
    if config.step_topk_accuracy:
        return config.step_topk_accuracy
    if config.step_accuracy:
        return [[a] for a in config.step_accuracy]
    print("warning: the EAGLE drafter records no held-out accuracy; sizing the tree with a prior guess",
          file=sys.stderr)
    return PRIOR_ACCURACY


def drafter_kind(drafter) -> str:
    """'medusa' for Medusa heads, 'eagle' for EAGLE drafters, 'draft_lm' for a causal LM (or LoRA-wrapped one)
    drafting for the target."""
    if isinstance(drafter, MedusaModel):
        return "medusa"
    if isinstance(drafter, EagleModel):
        return "eagle"
    if isinstance(drafter, PeftModel) or hasattr(drafter, "generate"):
        return "draft_lm"
    raise TypeError(f"{type(drafter).__name__} is not a drafter draftsmith can evaluate (Medusa heads or a draft LM)")


def make_proposer(drafter, target: PreTrainedModel, *, tree: str = "auto", max_tree_nodes: int = 64, draft_k: int = 4,
                  adaptive_k: bool = True, full_draft_vocab: bool = False, temperature: float = 0.0,
                  generator: torch.Generator | None = None, tree_depth: int = 5, tree_topk: int = 4,
                  draft_siblings: int = 0, draft_confidence: float = 0.0, prompt_lookup: int = 0,
                  prompt_lookup_tokens: int = 8, sibling_depth: int = 1):
    """The drafter's proposer and a description of its setup (the calibrated tree for Medusa; k and the draft
    vocabulary for draft LMs: the frequent-token set recorded at training, unless full_draft_vocab).
    prompt_lookup (draft LMs): the longest n-gram matched by prompt lookup (n down to 2; 0: off), which proposes
    prompt_lookup_tokens copied tokens where it matches and the draft elsewhere."""
    vocab = None if full_draft_vocab else get_draft_vocab(drafter.config)
    if drafter_kind(drafter) == "medusa":
        proposer, setup = medusa_proposer(drafter, target, tree, max_tree_nodes, vocab)
        return proposer, {**setup, "draft_vocab": len(vocab) if vocab else "full"}
    if drafter_kind(drafter) == "eagle":
        proposer, setup = eagle_proposer(drafter, target, tree, max_tree_nodes, tree_depth, tree_topk, vocab)
        return proposer, {**setup, "eagle_version": drafter.config.eagle_version, "draft_vocab": len(proposer.ids)}
    lookup = PromptLookup(prompt_lookup, 2, prompt_lookup_tokens) if prompt_lookup else None
    proposer = DraftLMProposer(drafter, k=draft_k, adaptive=adaptive_k, k_max=max(8, draft_k),
                               temperature=temperature, generator=generator, draft_vocab=vocab,
                               siblings=draft_siblings, confidence=draft_confidence, lookup=lookup,
                               sibling_depth=sibling_depth)
    cost = draft_cost_ratio(target, proposer)
    return proposer, {"k": draft_k, "adaptive": adaptive_k, "k_max": proposer.k_max, "siblings": draft_siblings,
                      "sibling_depth": sibling_depth,
                      "confidence": draft_confidence, "draft_vocab": len(vocab) if vocab else "full",
                      "prompt_lookup": lookup and {"max_ngram": lookup.max_ngram, "min_ngram": lookup.min_ngram,
                                                   "tokens": lookup.num_tokens}, **cost}


class ForwardCounter:
    """Counts calls of a model's forward (transformers' assisted generation does not report them)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1


@torch.no_grad()
def hf_assisted_generate(target: PreTrainedModel, input_ids: torch.Tensor, max_new_tokens: int, eos: set[int],
                         temperature: float, counter: ForwardCounter, **assist) -> GenerationResult:
    """transformers' own assisted generation as a user would call it, the comparison point for draftsmith's loop:
    assist is assistant_model=draft (its default draft-length schedule), or prompt_lookup_num_tokens and
    max_matching_ngram_size (its prompt lookup, without a draft)."""
    start, calls = time.perf_counter(), counter.calls
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    out = target.generate(input_ids[None], attention_mask=torch.ones_like(input_ids)[None], **assist,
                          max_new_tokens=max_new_tokens, eos_token_id=sorted(eos),
                          pad_token_id=sorted(eos)[0], **sampling)
    tokens = out[0, len(input_ids):].tolist()
    return GenerationResult(tokens, forwards=counter.calls - calls, seconds=time.perf_counter() - start)


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


def evaluate_drafter(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, drafter, questions: str, *,
                     max_new_tokens: int = 128, temperature: float = 0.0, per_category: int | None = None,
                     limit: int | None = None, check_lossless: bool = False, tree: str = "auto",
                     max_tree_nodes: int = 64, draft_k: int = 4, adaptive_k: bool = True,
                     full_draft_vocab: bool = False, compare_hf: bool = False, seed: int = 0, progress: bool = True,
                     pack: bool = True, tree_depth: int = 5, tree_topk: int = 4, typical: bool = False,
                     draft_siblings: int = 0, draft_confidence: float = 0.0, draft_dtype: str | None = None,
                     prompt_lookup: int = 0, prompt_lookup_tokens: int = 8, sibling_depth: int = 1) -> dict:
    """Run the evaluation and return the report (see the module docstring). pack: on CPU, run target and
    drafter with oneDNN-prepacked linear layers and the target with grouped-query attention that does not copy its
    KV cache (target.packing), both for plain and speculative decoding.
    compare_hf (draft LMs): also time transformers' assisted generation with the same draft, and, with
    prompt_lookup, transformers' own prompt lookup (no draft; n-grams of prompt_lookup down to 1 token).
    draft_dtype (draft LMs): run a copy of the draft in this dtype (e.g. bfloat16 beside a float32 target), in
    draftsmith's loop and transformers' alike; verification stays in the target's dtype, so decoding stays lossless.
    prompt_lookup (draft LMs): see make_proposer. transformers cannot combine its prompt lookup with a draft model,
    so compare_hf times both of its loops beside ours: assisted generation with the draft, prompt lookup without."""
    if check_lossless and temperature != 0:
        raise ValueError("--check-lossless compares against greedy decoding: use --temperature 0")
    kind = drafter_kind(drafter)
    if compare_hf and kind != "draft_lm":
        raise ValueError(f"--compare-hf runs transformers' assisted generation, which needs a draft LM; "
                         f"this drafter is {kind}")
    if kind == "draft_lm":
        if isinstance(drafter, PeftModel):  # evaluate merged weights: same outputs, no adapter overhead
            drafter = copy.deepcopy(drafter).merge_and_unload()
        check_draft_vocab(drafter.config, target.config)
        if draft_dtype is not None:
            drafter = copy.deepcopy(drafter).to(to_torch_dtype(draft_dtype))
    elif prompt_lookup:
        raise ValueError(f"prompt_lookup={prompt_lookup} is for draft LMs (a step either copies or drafts); this "
                         f"drafter is {kind}")
    elif draft_dtype is not None and to_torch_dtype(draft_dtype) != target.dtype:
        raise ValueError(f"draft_dtype={draft_dtype!r} is for draft LMs, which run their own forward; {kind} "
                         f"drafters read the target's hidden states and run in its dtype ({target.dtype})")
    qs = load_questions(questions, per_category=per_category, limit=limit)
    options = dict(tree=tree, max_tree_nodes=max_tree_nodes, draft_k=draft_k, adaptive_k=adaptive_k,
                   full_draft_vocab=full_draft_vocab, tree_depth=tree_depth, tree_topk=tree_topk,
                   draft_siblings=draft_siblings, draft_confidence=draft_confidence, prompt_lookup=prompt_lookup,
                   prompt_lookup_tokens=prompt_lookup_tokens, sibling_depth=sibling_depth)
    with packed_linears(target, enabled=pack) as packed, packed_linears(drafter, enabled=pack) as packed_drafter, \
            grouped_query_attention(target, enabled=pack) as grouped:
        if kind in ("medusa", "eagle"):
            drafter.attach_target(target)  # a drafter borrowing the target's LM head gets the packed one here ...
        report = _evaluate(target, tokenizer, drafter, qs, max_new_tokens, temperature, check_lossless, options,
                           compare_hf, seed, progress, typical)
    if kind in ("medusa", "eagle"):
        drafter.attach_target(target)  # ... and the plain one again after
    report["setup"].update(questions=questions, packed_linear_layers=packed + packed_drafter,
                           grouped_query_attention=grouped,
                           draft_dtype=str(next(drafter.parameters()).dtype).removeprefix("torch."))
    return report


def _summaries(tallies: dict[str, Tally]) -> tuple[dict, dict]:
    overall = Tally()
    for t in tallies.values():
        overall.merge(t)
    return overall.summary(), {c: t.summary() for c, t in sorted(tallies.items())}


def _evaluate(target, tokenizer, drafter, qs, max_new_tokens, temperature, check_lossless, options, compare_hf,
              seed, progress, typical) -> dict:
    torch.manual_seed(seed)  # transformers' sampling draws from the global generator
    gen = torch.Generator().manual_seed(seed)
    proposer, proposer_setup = make_proposer(drafter, target, temperature=temperature, generator=gen, **options)
    eos, acceptance = stop_tokens(target, tokenizer), Acceptance(temperature=temperature, typical=typical)
    methods = {
        "plain": lambda ids, n: plain_generate(target, ids, n, eos, acceptance, gen),
        "draftsmith": lambda ids, n: speculative_generate(target, proposer, ids, n, eos, acceptance, gen),
    }
    if compare_hf:
        counter = ForwardCounter(target)
        methods["hf_assisted"] = lambda ids, n: hf_assisted_generate(target, ids, n, eos, temperature, counter,
                                                                     assistant_model=drafter)
    if compare_hf and options["prompt_lookup"]:
        hf_lookup = dict(prompt_lookup_num_tokens=options["prompt_lookup_tokens"],
                         max_matching_ngram_size=options["prompt_lookup"])
        methods["hf_prompt_lookup"] = lambda ids, n: hf_assisted_generate(target, ids, n, eos, temperature, counter,
                                                                          **hf_lookup)
    for generate in methods.values():  # warm-up, not counted
        answer(generate, tokenizer, ["Hello!"], 8, target.device)
    copies = getattr(proposer, "lookup", None) is not None  # draftsmith's prompt lookup: count its steps from here
    if copies:
        proposer.lookup_steps = proposer.lookup_accepted = 0
    tallies = {name: defaultdict(Tally) for name in methods if name != "plain"}
    checked, mismatches, answers = 0, defaultdict(int), []
    for i, q in enumerate(qs):
        results = {name: answer(generate, tokenizer, q.turns, max_new_tokens, target.device)
                   for name, generate in methods.items()}  # plain first, then each method, on the same machine
        answers.append(_answer_record(q, results["plain"], tokenizer, eos))
        for turn, base in enumerate(results["plain"]):
            checked += 1
            for name in tallies:
                tallies[name][q.category].add(results[name][turn], base)
                mismatches[name] += results[name][turn].tokens != base.tokens
        if progress:
            print(f"[{i + 1}/{len(qs)}] {q.category}: tau so far "
                  f"{tallies['draftsmith'][q.category].summary()['tau']:.2f}", file=sys.stderr)
    if compare_hf:
        counter.handle.remove()
    overall, per_category = _summaries(tallies["draftsmith"])
    report = {
        "overall": overall,
        "per_category": per_category,
        "setup": {
            "target": target.config._name_or_path, "drafter_kind": drafter_kind(drafter),
            "drafter_target": _drafter_target(drafter), "num_questions": len(qs),
            "max_new_tokens": max_new_tokens, "temperature": temperature,
            "acceptance": _acceptance_name(temperature, typical),
            "dtype": str(target.get_output_embeddings().weight.dtype).removeprefix("torch."),
            "device": str(target.device), "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "proposer": proposer_setup,
        },
    }
    if copies:
        report["setup"]["proposer"].update(lookup_steps=proposer.lookup_steps,
                                           lookup_accepted=proposer.lookup_accepted)
    if check_lossless:
        report["lossless"] = {"checked": checked, "mismatches": mismatches["draftsmith"]}
    report["answers"], report["answer_repetition"] = answers, answer_repetition(answers)
    for name in [n for n in tallies if n != "draftsmith"]:  # transformers' loops
        hf_overall, hf_per_category = _summaries(tallies[name])
        settings = _hf_assistant_settings(drafter) if name == "hf_assisted" else hf_lookup
        report[name] = {"overall": hf_overall, "per_category": hf_per_category, "settings": settings}
        if check_lossless:
            report[name]["lossless"] = {"checked": checked, "mismatches": mismatches[name]}
    return report


def _answer_record(q: Question, turns: list[GenerationResult], tokenizer, eos: set[int]) -> dict:
    """The target's own answer (plain decoding) to each turn of a question, kept in the report: what the speedups
    were measured on (e.g. whether answers ran to max_new_tokens, where long greedy answers often repeat).
    repeated: per turn, the new tokens that end an n-gram already in that answer (metrics.repeated_ngrams)."""
    return {"question_id": q.question_id, "category": q.category,
            "turns": [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in turns],
            "new_tokens": [len(r.tokens) for r in turns],
            "stopped": [bool(r.tokens) and r.tokens[-1] in eos for r in turns],
            "repeated": [repeated_ngrams(r.tokens) for r in turns]}


def _hf_assistant_settings(draft: PreTrainedModel) -> dict:
    """The assisted-generation settings transformers used: the draft's generation config, else its defaults."""
    config = draft.generation_config
    defaults = getattr(config, "_get_default_generation_params", dict)()
    names = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    return {n: getattr(config, n, None) if getattr(config, n, None) is not None else defaults.get(n) for n in names}


def _acceptance_name(temperature: float, typical: bool) -> str:
    if temperature == 0:
        return "greedy (lossless)"
    return "typical acceptance (LOSSY)" if typical else "speculative sampling (lossless in distribution)"


def _drafter_target(drafter) -> str | None:
    """The target a drafter was trained for, as recorded in its config."""
    if drafter_kind(drafter) in ("medusa", "eagle"):
        return drafter.config.target_name_or_path
    return draftsmith_meta(drafter.config).get("target_name_or_path")


def format_table(report: dict) -> str:
    """The per-category table printed on the terminal."""
    rows = [*report["per_category"].items(), ("overall", report["overall"])]
    depth = max(len(r["alpha"]) for _, r in rows)
    head = f"{'category':<20}{'tau':>6}{'speedup':>9}{'tok/s':>8}{'base':>8}" + "".join(
        f"{'a' + str(k + 1):>6}" for k in range(depth))
    lines = [head, "-" * len(head)]
    for name, r in rows:
        alphas = "".join(f"{a:>6.2f}" for a in r["alpha"]) + " " * 6 * (depth - len(r["alpha"]))
        lines.append(f"{name:<20}{r['tau']:>6.2f}{r['speedup']:>8.2f}x{r['tokens_per_s']:>8.1f}"
                     f"{r['baseline_tokens_per_s']:>8.1f}{alphas}")
    proposer = report["setup"]["proposer"]
    if "lookup_steps" in proposer:
        lines.append(f"prompt lookup: {proposer['lookup_steps']} of {report['overall']['verify_steps']} steps, "
                     f"accepting {proposer['lookup_accepted']} copied tokens")
    if "answer_repetition" in report:
        rep = report["answer_repetition"]
        lines.append(f"target's answers: {rep['turns_at_budget']} of {rep['turns']} ran to max_new_tokens; "
                     f"{rep['repeated_share']:.0%} of their tokens repeat an earlier {rep['ngram']}-gram of the answer")
    if "lossless" in report:
        lines.append(f"lossless check: {report['lossless']['mismatches']} mismatching answers of "
                     f"{report['lossless']['checked']}")
    ours = {**report["per_category"], "overall": report["overall"]}
    for key, title in (("hf_assisted", "transformers assisted generation, same draft, same prompts:"),
                       ("hf_prompt_lookup", "transformers prompt lookup (no draft), same prompts:")):
        hf = report.get(key)
        if not hf:
            continue
        lines += ["", title, f"{'category':<20}{'tau':>6}{'speedup':>9}{'tok/s':>8}{'base':>8}{'ours/hf':>9}",
                  "-" * 60]
        for name, r in [*hf["per_category"].items(), ("overall", hf["overall"])]:
            ratio = ours[name]["tokens_per_s"] / r["tokens_per_s"] if r["tokens_per_s"] else 0.0
            lines.append(f"{name:<20}{r['tau']:>6.2f}{r['speedup']:>8.2f}x{r['tokens_per_s']:>8.1f}"
                         f"{r['baseline_tokens_per_s']:>8.1f}{ratio:>8.2f}x")
        if "lossless" in hf:
            lines.append(f"lossless check (hf): {hf['lossless']['mismatches']} mismatching answers of "
                         f"{hf['lossless']['checked']}")
    return "\n".join(lines)


def write_report(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="embedded name (smollm2-135m-instruct), path or Hub id")
    p.add_argument("--drafter", required=True, help="a drafter folder saved by draftsmith")
    p.add_argument("--questions", required=True, help="Spec-Bench-format JSONL path, or 'mt-bench'")
    p.add_argument("--output", help="write the JSON report here")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="> 0: speculative sampling (lossless in "
                   "distribution)")
    p.add_argument("--typical-acceptance", action="store_true", help="with --temperature > 0: Medusa's typical "
                   "acceptance instead (LOSSY: the output distribution is not the target's)")
    p.add_argument("--per-category", type=int, help="first N questions of each category")
    p.add_argument("--limit", type=int, help="at most N questions in all")
    p.add_argument("--check-lossless", action="store_true", help="count answers that differ from plain greedy")
    p.add_argument("--tree", default="auto", help="'auto' (calibrated), 'chain', JSON rank paths, or for EAGLE "
                   "'dynamic' (EAGLE-2 trees of --max-tree-nodes nodes)")
    p.add_argument("--max-tree-nodes", type=int, default=64)
    p.add_argument("--tree-depth", type=int, default=5, help="EAGLE: draft steps per proposal")
    p.add_argument("--tree-topk", type=int, default=4, help="EAGLE dynamic trees: nodes expanded per depth and "
                   "children per node")
    p.add_argument("--draft-k", type=int, default=4, help="draft LMs: tokens drafted per step (the start value "
                   "when adaptive)")
    p.add_argument("--fixed-k", action="store_true", help="draft LMs: keep k fixed (default: adaptive k)")
    p.add_argument("--draft-siblings", type=int, default=0, help="draft LMs, greedy: also verify the draft's next "
                   "N ranked first tokens (a tree: the chain plus N alternatives at depth 1)")
    p.add_argument("--sibling-depth", type=int, default=1, help="draft LMs, with --draft-siblings: give the "
                   "chain's tokens at depths 1..D their N runners-up (no extra draft forward; more tree nodes)")
    p.add_argument("--draft-confidence", type=float, default=0.0, help="draft LMs: stop a step's chain once the "
                   "draft's probability of its token is below this (0: off; transformers' assisted generation uses "
                   "0.4); --draft-k is then the longest chain")
    p.add_argument("--full-draft-vocab", action="store_true", help="draft LMs: draft over the whole vocabulary "
                   "even when the draft records a frequent-token set (drafter.draft_vocab at training)")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N", help="draft LMs: where the last N (down "
                   "to 2) tokens occurred before, propose the tokens that followed them instead of drafting (prompt "
                   "lookup; no draft forward); 0: off")
    p.add_argument("--prompt-lookup-tokens", type=int, default=8, help="tokens copied per prompt-lookup proposal")
    p.add_argument("--compare-hf", action="store_true", help="draft LMs: also time transformers' assisted "
                   "generation with the same draft, prompts, budget and temperature (with --prompt-lookup, also "
                   "transformers' own prompt lookup, without a draft)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--draft-dtype", help="draft LMs: run the draft in this dtype (default: --dtype), e.g. bfloat16 "
                   "beside a float32 target: a cheaper draft step, the same verification")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pack", action="store_true", help="CPU: keep torch's default linear layers (no oneDNN "
                   "prepacking) and transformers' SDPA attention for target and drafter")
    args = p.parse_args(argv)
    if args.check_lossless and args.temperature != 0:
        p.error("--check-lossless compares against greedy decoding: use --temperature 0")
    if args.draft_siblings and args.temperature != 0:
        p.error("--draft-siblings adds greedy alternatives: use it with --temperature 0")
    if args.sibling_depth < 1:
        p.error(f"--sibling-depth {args.sibling_depth} must be >= 1 (the chain depths given siblings)")
    if args.sibling_depth > 1 and not args.draft_siblings:
        p.error(f"--sibling-depth {args.sibling_depth} gives chain tokens runners-up: use it with --draft-siblings N")
    if not 0 <= args.draft_confidence < 1:
        p.error(f"--draft-confidence {args.draft_confidence} must be in [0, 1) (0: off)")
    if args.prompt_lookup != 0 and args.prompt_lookup < 2:
        p.error(f"--prompt-lookup {args.prompt_lookup}: the longest n-gram matched, >= 2 (0: off)")
    if args.prompt_lookup_tokens < 1:
        p.error(f"--prompt-lookup-tokens {args.prompt_lookup_tokens} must be >= 1")
    if args.typical_acceptance and args.temperature == 0:
        p.error("--typical-acceptance applies to sampling: give --temperature > 0")
    for flag, dtype in (("--dtype", args.dtype), ("--draft-dtype", args.draft_dtype)):
        try:
            dtype is None or to_torch_dtype(dtype)
        except ValueError as err:
            p.error(f"{flag}: {err}")
    target, tokenizer = load_target(args.target, dtype=args.dtype)
    drafter = load_drafter(args.drafter, target).to(target.dtype)
    if args.compare_hf and drafter_kind(drafter) != "draft_lm":
        p.error(f"--compare-hf needs a draft LM; {args.drafter} holds {drafter_kind(drafter)} heads")
    if args.draft_dtype and drafter_kind(drafter) != "draft_lm" and to_torch_dtype(args.draft_dtype) != target.dtype:
        p.error(f"--draft-dtype is for draft LMs; {args.drafter} holds {drafter_kind(drafter)} heads, which read the "
                f"target's hidden states and run in --dtype")
    if args.prompt_lookup and drafter_kind(drafter) != "draft_lm":
        p.error(f"--prompt-lookup is for draft LMs; {args.drafter} holds {drafter_kind(drafter)} heads")
    report = evaluate_drafter(target, tokenizer, drafter, args.questions, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, per_category=args.per_category, limit=args.limit,
                              check_lossless=args.check_lossless, tree=args.tree,
                              max_tree_nodes=args.max_tree_nodes, draft_k=args.draft_k,
                              adaptive_k=not args.fixed_k, full_draft_vocab=args.full_draft_vocab,
                              compare_hf=args.compare_hf, seed=args.seed,
                              pack=not args.no_pack, tree_depth=args.tree_depth, tree_topk=args.tree_topk,
                              typical=args.typical_acceptance, draft_siblings=args.draft_siblings,
                              draft_confidence=args.draft_confidence, draft_dtype=args.draft_dtype,
                              prompt_lookup=args.prompt_lookup, prompt_lookup_tokens=args.prompt_lookup_tokens,
                              sibling_depth=args.sibling_depth)
    print(format_table(report))
    if args.output:
        write_report(report, args.output)


if __name__ == "__main__":
    main()
