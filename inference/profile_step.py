"""Where one decoding step's time goes, for plain decoding and for drafters' proposers, on this machine:

    python -m inference.profile_step --target smollm2-135m-instruct --drafter runs/medusa_smollm2/drafter \
        [--drafter NAME=FOLDER@tree_depth=7 ...] [--tree auto|chain|dynamic|JSON] [--tree-depth 5] \
        [--max-tree-nodes 64] [--context-len 256] [--steps 20] [--rounds 1] [--no-pack]

Real steps of the verification loop (inference.speculative.verify_step) on a context of random tokens, timed
part by part (StepClock: draft, tree, verify, accept, cache, other), median ms per step, with the target and
drafters set up as the evaluation sets them up. The tree options are the evaluation's, for every drafter of a
kind that takes them; a drafter's own `@key=value` options override them (with --tree auto each calibration
chooses its tree first; when no tree pays, that drafter's row is plain decoding too). Several drafters are timed
side by side: every round times each row in turn (plain first), and a part's figure is its median over the
rounds, so a drift of the machine's speed reaches every row alike.
"""
from __future__ import annotations


import statistics
from contextlib import ExitStack

import torch

from cli.errors import ArgumentParser, run_main
from drafters import load_drafter
from drafters.kinds import kind_of
from target.model import load_target

from .bench_drafters import parse_drafters
from .calibrate import LoopTimer
from .eval_config import EvalConfig
from .evaluate import inference_setup
from .proposer_setup import make_proposer
from .speculative import NoDraft, StepClock


def profile(target, proposers: dict, context_len: int, steps: int, rounds: int = 1) -> dict[str, dict[str, float]]:
    """name -> proposer  ->  name -> median ms of each loop part and of the whole step, over `rounds` rounds that
    each time every proposer in turn (one context per set of feature layers the proposers read)."""
    timers: dict[tuple, LoopTimer] = {}
    timer_of: dict[str, LoopTimer] = {}
    for name, proposer in proposers.items():
        layers = tuple(getattr(proposer, "feature_layers", None) or ())
        if layers not in timers:
            timers[layers] = LoopTimer(target, list(layers) or None, context_len, steps=steps, warmup=3)
        timer_of[name] = timers[layers]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in proposers}
    for _ in range(rounds):
        for name, proposer in proposers.items():
            runs[name].append(timer_of[name](proposer))
    return {name: {part: 1e3 * statistics.median(r[part] for r in rs) for part in rs[0]} for name, rs in runs.items()}


def format_profile(costs: dict[str, dict[str, float]]) -> str:
    names = list(costs)
    lines = [f"{'part (ms/step)':<16}" + "".join(f"{n:>14}{'share':>7}" for n in names), "-" * (16 + 21 * len(names))]
    for part in (*StepClock.PARTS, "step"):
        lines.append(f"{part:<16}" + "".join(f"{costs[n][part]:>14.2f}{costs[n][part] / costs[n]['step']:>7.0%}"
                                             for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True, help="embedded name (smollm2-135m-instruct), path or Hub id")
    p.add_argument("--drafter", required=True, action="append",
                   help="[NAME=]DRAFTER[@key=value...] as in inference.benchmark's --drafters (a folder or a zoo "
                        "name, with its own tree options); repeat to time several side by side")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tree", default=EvalConfig.tree, help="as in inference.evaluate")
    p.add_argument("--tree-depth", type=int, default=EvalConfig.tree_depth, help="as in inference.evaluate")
    p.add_argument("--max-tree-nodes", type=int, default=EvalConfig.max_tree_nodes)
    p.add_argument("--context-len", type=int, default=256, help="tokens in the KV cache before the timed steps")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row and round (after 3 untimed ones)")
    p.add_argument("--rounds", type=int, default=1, help="rounds, each timing every row in turn")
    p.add_argument("--no-pack", dest="pack", action="store_false", help="as in inference.evaluate")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        p.error(f"--rounds {args.rounds} and --steps {args.steps} must be >= 1")
    specs = parse_drafters(args.drafter, args.target)
    target, _ = load_target(args.target, dtype=args.dtype)
    shared = EvalConfig(pack=args.pack, tree=args.tree, max_tree_nodes=args.max_tree_nodes, tree_depth=args.tree_depth)
    proposers, shapes, setups = {"plain": NoDraft()}, [], []
    with torch.no_grad(), ExitStack() as stack:
        for spec in specs:
            drafter = load_drafter(spec.path, target).to(target.dtype)
            config = spec.config(shared, kind_of(drafter))
            drafter, setup = stack.enter_context(inference_setup(target, drafter, config))
            setups.append(setup)
            proposers[spec.name], record = make_proposer(drafter, target, **config.proposer_options())
            plain = record.get("decoding") == "plain"
            shape = "plain decoding (no tree pays)" if plain else f"{record.get('nodes')} nodes"
            shapes.append(f"{spec.name}: {record.get('tree', 'chain')} tree, {shape}")
        costs = profile(target, proposers, args.context_len, args.steps, args.rounds)
    print(f"{'; '.join(shapes)}; {args.context_len}-token context, {args.rounds} round(s) of {args.steps} steps, "
          f"{torch.get_num_threads()} threads, {target.device}, setup (target and first drafter) {setups[0]}")
    print(format_profile(costs))


if __name__ == "__main__":
    run_main(main)
