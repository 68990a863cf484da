"""Where one decoding step's time goes, for plain decoding and for a drafter's proposer, on this machine:

    python -m inference.profile_step --target smollm2-135m-instruct --drafter runs/medusa_smollm2/drafter \
        [--tree auto|chain|dynamic|JSON] [--max-tree-nodes 64] [--context-len 256] [--steps 20] [--no-pack]

Real steps of the verification loop (inference.speculative.verify_step) on a context of random tokens, timed
part by part (StepClock: draft, tree, verify, accept, cache, other), median ms per step, with the target and
drafter set up as the evaluation sets them up. The tree options are the evaluation's (with --tree auto the calibration chooses the tree first; when no tree pays, the drafter row is
plain decoding too).
"""
from __future__ import annotations


import torch

from cli.errors import ArgumentParser, run_main
from drafters import load_drafter
from target.model import load_target

from .calibrate import LoopTimer
from .eval_config import EvalConfig
from .evaluate import inference_setup
from .proposer_setup import make_proposer
from .speculative import NoDraft, StepClock


def profile(target, proposers: dict, context_len: int, steps: int) -> dict[str, dict[str, float]]:
    """name -> proposer  ->  name -> median ms of each loop part and of the whole step."""
    feature_layers = next((p.feature_layers for p in proposers.values() if getattr(p, "feature_layers", None)), None)
    timer = LoopTimer(target, feature_layers, context_len, steps=steps, warmup=3)
    return {name: {part: 1e3 * s for part, s in timer(proposer).items()} for name, proposer in proposers.items()}


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
    p.add_argument("--drafter", required=True, help="a drafter folder saved by draftsmith")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tree", default=EvalConfig.tree, help="as in inference.evaluate")
    p.add_argument("--max-tree-nodes", type=int, default=EvalConfig.max_tree_nodes)
    p.add_argument("--context-len", type=int, default=256, help="tokens in the KV cache before the timed steps")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row (after 3 untimed ones)")
    p.add_argument("--no-pack", dest="pack", action="store_false", help="as in inference.evaluate")
    args = p.parse_args(argv)
    target, _ = load_target(args.target, dtype=args.dtype)
    drafter = load_drafter(args.drafter, target).to(target.dtype)
    config = EvalConfig(pack=args.pack, tree=args.tree, max_tree_nodes=args.max_tree_nodes)
    with torch.no_grad(), inference_setup(target, drafter, config) as (drafter, setup):
        proposer, record = make_proposer(drafter, target, **config.proposer_options())
        costs = profile(target, {"plain": NoDraft(), "drafter": proposer}, args.context_len, args.steps)
    shape = "plain decoding (no tree pays)" if record.get("decoding") == "plain" else f"{record.get('nodes')} nodes"
    print(f"drafter: {record.get('tree', 'chain')} tree, {shape}; {args.context_len}-token context, "
          f"{torch.get_num_threads()} threads, {target.device}, {setup}")
    print(format_profile(costs))

if __name__ == "__main__":
    run_main(main)
