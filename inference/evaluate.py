"""Acceptance and speedup of a drafter on Spec-Bench-format questions.

    python -m inference.evaluate --target smollm2-135m-instruct --drafter runs/medusa/drafter \
        --questions mt-bench --output eval.json [--per-category 2] [--check-lossless]

Each question is answered turn by turn (the second turn follows the model's own first answer) twice, with plain
target decoding and with speculative decoding, alternating so that both see the same machine state. The report
pools tokens and target forwards per category and overall (Spec-Bench's tau), and the speedup is the ratio of
tokens per second measured in the same run on the same prompts.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from collections import defaultdict

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from data.questions import load_questions
from drafters import MedusaModel, load_drafter

from .calibrate import NODE_COUNTS, choose_tree, proposer_seconds, verify_latency
from .metrics import Tally
from .proposers import MedusaProposer
from .speculative import Acceptance, GenerationResult, plain_generate, speculative_generate
from .target import load_target, stop_tokens

# Used when a drafter carries no measured per-head accuracy (e.g. untrained heads): a deliberately modest guess.
PRIOR_ACCURACY = [[0.5 * 0.7 ** k * 0.3 ** i for i in range(4)] for k in range(8)]


def medusa_proposer(drafter: MedusaModel, target: PreTrainedModel, tree: str, max_nodes: int):
    """tree: 'auto' (calibrated on this device), 'chain' (top-1 of every head) or a JSON list of rank paths."""
    if tree == "chain":
        return MedusaProposer(drafter, [(0,) * d for d in range(1, drafter.config.num_heads + 1)]), None
    if tree != "auto":
        return MedusaProposer(drafter, [tuple(p) for p in json.loads(tree)]), None
    accuracy = drafter.config.head_topk_accuracy
    if not accuracy:
        print("warning: the drafter records no per-head accuracy; sizing the tree with a prior guess",
              file=sys.stderr)
        accuracy = PRIOR_ACCURACY[:drafter.config.num_heads]
    latency = verify_latency(target, [n for n in NODE_COUNTS if n <= max_nodes])
    dtype = target.get_output_embeddings().weight.dtype
    draft = proposer_seconds(lambda paths: MedusaProposer(drafter, paths), drafter.config.hidden_size, dtype,
                             target.device)
    choice = choose_tree(accuracy, latency, draft)
    calibration = {"verify_seconds": {str(n): s for n, s in latency.items()}, "candidates": choice.table,
                   "nodes": len(choice.paths) + 1, "paths": [list(p) for p in choice.paths],
                   "expected_tau": choice.expected_tau, "predicted_speedup": choice.predicted_speedup}
    return MedusaProposer(drafter, choice.paths), calibration


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
                     max_tree_nodes: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Run the evaluation and return the report (see the module docstring)."""
    if check_lossless and temperature != 0:
        raise ValueError("--check-lossless compares against greedy decoding: use --temperature 0")
    drafter.attach_target(target)
    qs = load_questions(questions, per_category=per_category, limit=limit)
    proposer, calibration = medusa_proposer(drafter, target, tree, max_tree_nodes)
    eos, acceptance = stop_tokens(target, tokenizer), Acceptance(temperature=temperature)
    gen = torch.Generator().manual_seed(seed)
    plain = lambda ids, n: plain_generate(target, ids, n, eos, acceptance, gen)  # noqa: E731
    spec = lambda ids, n: speculative_generate(target, proposer, ids, n, eos, acceptance, gen)  # noqa: E731
    for generate in (plain, spec):  # warm-up, not counted
        answer(generate, tokenizer, ["Hello!"], 8, target.device)
    tallies, checked, mismatches = defaultdict(Tally), 0, 0
    for i, q in enumerate(qs):
        base_results = answer(plain, tokenizer, q.turns, max_new_tokens, target.device)
        spec_results = answer(spec, tokenizer, q.turns, max_new_tokens, target.device)
        for s, b in zip(spec_results, base_results):
            tallies[q.category].add(s, b)
            checked += 1
            mismatches += s.tokens != b.tokens
        if progress:
            print(f"[{i + 1}/{len(qs)}] {q.category}: tau so far {tallies[q.category].summary()['tau']:.2f}",
                  file=sys.stderr)
    overall = Tally()
    for t in tallies.values():
        overall.merge(t)
    report = {
        "overall": overall.summary(),
        "per_category": {c: t.summary() for c, t in sorted(tallies.items())},
        "setup": {
            "target": target.config._name_or_path, "drafter_kind": drafter.config.model_type,
            "drafter_target": drafter.config.target_name_or_path, "questions": questions, "num_questions": len(qs),
            "max_new_tokens": max_new_tokens, "temperature": temperature,
            "acceptance": "greedy (lossless)" if temperature == 0 else "typical acceptance (LOSSY)",
            "dtype": str(target.get_output_embeddings().weight.dtype).removeprefix("torch."),
            "device": str(target.device), "torch_threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "tree": calibration or {"paths": proposer.paths},
        },
    }
    if check_lossless:
        report["lossless"] = {"checked": checked, "mismatches": mismatches}
    return report


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
    if "lossless" in report:
        lines.append(f"lossless check: {report['lossless']['mismatches']} mismatching answers of "
                     f"{report['lossless']['checked']}")
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
    p.add_argument("--temperature", type=float, default=0.0, help="> 0 uses typical acceptance (lossy)")
    p.add_argument("--per-category", type=int, help="first N questions of each category")
    p.add_argument("--limit", type=int, help="at most N questions in all")
    p.add_argument("--check-lossless", action="store_true", help="count answers that differ from plain greedy")
    p.add_argument("--tree", default="auto", help="'auto' (calibrated), 'chain', or JSON rank paths")
    p.add_argument("--max-tree-nodes", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.check_lossless and args.temperature != 0:
        p.error("--check-lossless compares against greedy decoding: use --temperature 0")
    target, tokenizer = load_target(args.target, dtype=args.dtype)
    drafter = load_drafter(args.drafter, target).to(target.dtype)
    report = evaluate_drafter(target, tokenizer, drafter, args.questions, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, per_category=args.per_category, limit=args.limit,
                              check_lossless=args.check_lossless, tree=args.tree,
                              max_tree_nodes=args.max_tree_nodes, seed=args.seed)
    print(format_table(report))
    if args.output:
        write_report(report, args.output)


if __name__ == "__main__":
    main()
