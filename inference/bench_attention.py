"""A/B of the target's attention during tree verification: transformers' SDPA (key/value heads repeated for every
query head) against `target.packing.grouped_sdpa` (heads shared by the kernel), in one process, interleaved.

    python -m inference.bench_attention --target smollm2-135m-instruct [--drafter DIR --questions FILE --limit 8]

1. One verify forward of an n-node tree on a context-token cache, the two attentions alternating for --rounds
   rounds (medians, ms).
2. With --drafter: decoding, alternating per question between plain decoding and speculative decoding with each
   attention (same proposer, same tree); the tokens must be identical. Both use oneDNN-packed linear layers.
"""
from __future__ import annotations

import json
import statistics
import time

import torch

from cli.errors import ArgumentParser, run_main
from data.questions import load_questions
from drafters import load_drafter

from .calibrate import star_verify_steps
from .evaluate import answer
from .proposer_setup import make_proposer
from target.packing import grouped_query_attention, packed_linears
from .speculative import plain_generate, speculative_generate
from target.model import load_target, stop_tokens


@torch.no_grad()
def verify_forward_ms(target, nodes: int, context_len: int, rounds: int) -> dict[str, float]:
    """Median ms of one verify forward (logits at every node) of a star tree, per attention."""
    step = star_verify_steps(target, [nodes], context_len)[nodes]
    times: dict[str, list[float]] = {"sdpa": [], "grouped": []}
    for _ in range(rounds + 1):  # the first round warms up
        for name in times:
            with grouped_query_attention(target, enabled=name == "grouped"):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}


def decode_ab(target, tokenizer, drafter, questions: str, limit: int, max_new_tokens: int, tree: str) -> dict:
    """Seconds, tokens and target forwards of plain decoding and of speculative decoding per attention."""
    proposer, setup = make_proposer(drafter, target, tree=tree)
    eos = stop_tokens(target, tokenizer)
    spec = lambda ids, n: speculative_generate(target, proposer, ids, n, eos)  # noqa: E731

    def spec_grouped(ids, n):
        with grouped_query_attention(target):
            return spec(ids, n)

    methods = {"plain": lambda ids, n: plain_generate(target, ids, n, eos), "sdpa": spec, "grouped": spec_grouped}
    totals = {name: {"seconds": 0.0, "tokens": 0, "forwards": 0} for name in methods}
    for i, q in enumerate(load_questions(questions, limit=limit)):
        order = list(methods) if i % 2 == 0 else list(methods)[::-1]
        results = {name: answer(methods[name], tokenizer, q.turns[:1], max_new_tokens)[0] for name in order}
        if not results["plain"].tokens == results["sdpa"].tokens == results["grouped"].tokens:
            raise AssertionError(f"question {q.question_id}: the decodings differ; verification is not lossless")
        for name, r in results.items():
            totals[name]["seconds"] += r.seconds
            totals[name]["tokens"] += len(r.tokens)
            totals[name]["forwards"] += r.forwards
    base = totals["plain"]["tokens"] / totals["plain"]["seconds"]
    for t in totals.values():
        t["speedup"] = t["tokens"] / t["seconds"] / base
    return {"tree": setup.get("paths"), **totals}


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="embedded name (smollm2-135m-instruct), path or Hub id")
    p.add_argument("--nodes", type=int, default=6)
    p.add_argument("--context-len", type=int, default=300)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--drafter", help="a Medusa drafter folder: also A/B decoding")
    p.add_argument("--questions", help="Spec-Bench-format questions (with --drafter)")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--tree", default="auto", help="as in inference.evaluate")
    args = p.parse_args(argv)
    if args.drafter and not args.questions:
        p.error("--drafter needs --questions")
    target, tokenizer = load_target(args.target)
    drafter = load_drafter(args.drafter, target) if args.drafter else None
    with packed_linears(target), packed_linears(drafter, enabled=drafter is not None):
        if drafter is not None and hasattr(drafter, "attach_target"):
            drafter.attach_target(target)  # a drafter sharing the target's LM head uses the packed one
        ms = verify_forward_ms(target, args.nodes, args.context_len, args.rounds)
        print(f"verify forward, {args.nodes} nodes on a {args.context_len}-token cache, median of {args.rounds}: "
              f"sdpa {ms['sdpa']:.1f} ms, grouped {ms['grouped']:.1f} ms")
        if drafter is not None:
            ab = decode_ab(target, tokenizer, drafter, args.questions, args.limit, args.max_new_tokens, args.tree)
            print(f"tree (rank paths): {json.dumps(ab.pop('tree'))}")
            for name, t in ab.items():
                print(f"{name:8s} {t['tokens']} tokens, {t['forwards']} target forwards, {t['seconds']:.1f} s, "
                      f"speedup {t['speedup']:.3f}x")


if __name__ == "__main__":
    run_main(main)
