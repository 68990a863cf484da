"""Side by side with the official EAGLE loop: one EAGLE-3 drafter, decoded greedily by SafeAILab's
EaModel.eagenerate on its native export (ref_eagle_speed.py, in the eagle environment of tests/interop/setup.sh)
and by draftsmith's loop with the same EAGLE-2 dynamic tree, on the same chat prompts, threads and CPU. Passes run
ABBA (reference, draftsmith, draftsmith, reference; the second pair in reverse prompt order) against drift.

    DRAFTSMITH_INTEROP=/work/interop DRAFTSMITH_EAGLE_REPO=/work/EAGLE python tests/interop/eagle_loop_speed.py \
        --drafter runs/eagle3_smollm2/drafter --questions mt-bench --limit 8 --max-new-tokens 128 --output out.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: draftsmith's packages are not installed

from data.questions import load_questions  # noqa: E402
from drafters import load_drafter  # noqa: E402
from inference.eval_config import EvalConfig  # noqa: E402
from inference.evaluate import inference_setup  # noqa: E402
from inference.proposer_setup import make_proposer  # noqa: E402
from inference.speculative import plain_generate, speculative_generate  # noqa: E402
from target.model import load_target, stop_tokens  # noqa: E402
from train.export import export  # noqa: E402

TARGET = "smollm2-135m-instruct"
WARMUP_TOKENS = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafter", required=True, help="an EAGLE-3 drafter folder saved by draftsmith")
    p.add_argument("--questions", default="mt-bench", help="embedded name or Spec-Bench JSONL (first turns)")
    p.add_argument("--limit", type=int, default=8, help="first N questions")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--total-tokens", type=int, default=16, help="EaModel total_token: tree nodes, root included")
    p.add_argument("--depth", type=int, default=4, help="EaModel depth: draft steps after the first")
    p.add_argument("--top-k", type=int, default=4, help="EaModel top_k: nodes expanded per depth, children each")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    p.add_argument("--no-pack", action="store_true", help="draftsmith without its CPU packing (EvalConfig.pack)")
    p.add_argument("--eagle-python", default=os.path.join(os.environ.get("DRAFTSMITH_INTEROP", ""), "eagle/bin/python"))
    p.add_argument("--output", help="write the JSON report here")
    return p.parse_args(argv)


def eval_config(args) -> EvalConfig:
    """draftsmith's options for EaModel's tree. EaModel drafts one level from the root's output and then `depth`
    more (cnets.Model.topK_genrate), so its trees are depth + 1 deep; both keep total_token - 1 drafted nodes."""
    return EvalConfig(tree="dynamic", max_tree_nodes=args.total_tokens, tree_depth=args.depth + 1,
                      tree_topk=args.top_k, pack=not args.no_pack)


def chat_prompts(tokenizer, questions: str, limit: int) -> list[list[int]]:
    """The first turn of each question under the target's chat template, as inference.evaluate builds it."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": q.turns[0]}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            for q in load_questions(questions, limit=limit)]


def save_target_folder(target, tokenizer, folder: Path) -> None:
    """The target as EaModel reads it: sharded safetensors with an index (its drafter takes embed_tokens from
    there) and config and tokenizer in terms transformers 4 understands (see for_transformers4)."""
    target.save_pretrained(folder, max_shard_size="100MB")
    tokenizer.save_pretrained(folder)
    for_transformers4(folder)


def for_transformers4(folder: Path) -> None:
    """transformers 5 writes RoPE's base under rope_parameters, which transformers 4 ignores (it would rotate
    with its default base 10000: SmolLM2 uses 100000), and a tokenizer class transformers 4 lacks."""
    edits = {"config.json": lambda c: {**c, "rope_theta": c.get("rope_parameters", {}).get("rope_theta", 10000.0)},
             "tokenizer_config.json": lambda c: {**c, "tokenizer_class": "PreTrainedTokenizerFast"}}
    for name, edit in edits.items():
        path = folder / name
        path.write_text(json.dumps(edit(json.loads(path.read_text())), indent=1))


def eagle_feature_layers(num_layers: int) -> list[int]:
    """The decoder layers whose outputs EaModel fuses for EAGLE-3, whatever the export's config says: its Llama
    keeps the inputs of layers 2, L // 2 and L - 3 (modeling_llama_kv.py)."""
    return [1, num_layers // 2 - 1, num_layers - 4]


def run_reference(args, work: Path, prompts: list[list[int]], order: list[int]) -> tuple[list[dict], dict]:
    """One pass of eagenerate over prompts[order] in a fresh process; results back in prompt order."""
    job = {"prompts": [prompts[i] for i in order], "max_new_tokens": args.max_new_tokens, "threads": args.threads,
           "total_token": args.total_tokens, "depth": args.depth, "top_k": args.top_k}
    (work / "job.json").write_text(json.dumps(job))
    done = subprocess.run([args.eagle_python, str(Path(__file__).parent / "ref_eagle_speed.py"), str(work / "export"),
                           str(work / "target"), str(work / "job.json"), str(work / "out.json")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "default"})
    if done.returncode:
        sys.exit(f"ref_eagle_speed.py failed:\n{done.stderr[-4000:]}")
    out = json.loads((work / "out.json").read_text())
    results = [None] * len(prompts)
    for i, result in zip(order, out["results"]):
        results[i] = result
    return results, {**out, "results": None, "stderr": list(dict.fromkeys(done.stderr.splitlines()))}


def run_draftsmith(target, proposer, prompts, order, max_new_tokens: int, eos: set[int]) -> list[dict]:
    """One pass of draftsmith's loop over prompts[order], timed as the reference times eagenerate."""
    results = [None] * len(prompts)
    for i in order:
        start = time.perf_counter()
        r = speculative_generate(target, proposer, torch.tensor(prompts[i]), max_new_tokens, eos)
        results[i] = {"tokens": r.tokens, "forwards": r.forwards, "seconds": time.perf_counter() - start}
    return results


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """eagenerate stops after the step that emitted eos, keeping what that step accepted beyond it: drop it."""
    cut = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:cut]


def summary(passes: list[list[dict]], eos: set[int]) -> dict:
    """τ (new tokens per target forward, prefill included) and tokens/s pooled over passes and prompts."""
    runs = [r for p in passes for r in p]
    tokens = sum(len(until_eos(r["tokens"], eos)) for r in runs)
    forwards, seconds = sum(r["forwards"] for r in runs), sum(r["seconds"] for r in runs)
    return {"tau": tokens / forwards, "tokens_per_s": tokens / seconds, "new_tokens": tokens,
            "target_forwards": forwards, "seconds": seconds,
            "per_pass_tokens_per_s": [sum(len(until_eos(r["tokens"], eos)) for r in p) / sum(r["seconds"] for r in p)
                                      for p in passes]}


def mismatches(passes: list[list[dict]], reference: list[list[int]], eos: set[int]) -> dict[int, int]:
    """prompt -> the first position where some pass's output leaves `reference` (eagenerate may run past
    max_new_tokens: compare the length of the reference)."""
    out = {}
    for p in passes:
        for i, r in enumerate(p):
            got, want = until_eos(r["tokens"], eos)[:len(reference[i])], reference[i]
            if got != want:
                first = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                out[i] = min(first, out.get(i, first))
    return out


def measure(args, target, tokenizer, drafter, prompts, work: Path) -> dict:
    """Plain greedy (the lossless reference) and the four ABBA passes; the draftsmith side as evaluate runs it."""
    eos, forward, backward = stop_tokens(target, tokenizer), list(range(len(prompts))), list(range(len(prompts)))[::-1]
    config = eval_config(args)
    with inference_setup(target, drafter, config) as (drafter, setup):
        proposer, proposer_setup = make_proposer(drafter, target, **config.proposer_options())
        greedy = [plain_generate(target, torch.tensor(p), args.max_new_tokens, eos) for p in prompts]
        speculative_generate(target, proposer, torch.tensor(prompts[0]), WARMUP_TOKENS, eos)  # warm-up
        ref_a, ref_meta = run_reference(args, work, prompts, forward)
        ds = [run_draftsmith(target, proposer, prompts, order, args.max_new_tokens, eos)
              for order in (forward, backward)]
        ref_b, _ = run_reference(args, work, prompts, backward)
    plain_seconds = sum(g.seconds for g in greedy)
    return {"reference": [ref_a, ref_b], "draftsmith": ds, "greedy": [g.tokens for g in greedy], "eos": eos,
            "layers": target.config.num_hidden_layers,
            "ref_meta": ref_meta, "setup": {**setup, "proposer": proposer_setup},
            "plain_tokens_per_s": sum(len(g.tokens) for g in greedy) / plain_seconds}


def report(args, m: dict, drafter) -> dict:
    """The JSON record: both sides' figures, their ratio, lossless checks and the settings both ran with."""
    ref, ds = summary(m["reference"], m["eos"]), summary(m["draftsmith"], m["eos"])
    layers = {"drafter": drafter.config.feature_layers, "eagenerate": eagle_feature_layers(m["layers"])}
    meta = m["ref_meta"]
    return {
        "reference": ref, "draftsmith": ds, "plain_tokens_per_s": m["plain_tokens_per_s"],
        "ratio_tokens_per_s": ds["tokens_per_s"] / ref["tokens_per_s"], "ratio_tau": ds["tau"] / ref["tau"],
        "mismatches_vs_greedy": {"reference": mismatches(m["reference"], m["greedy"], m["eos"]),
                                 "draftsmith": mismatches(m["draftsmith"], m["greedy"], m["eos"])},
        "mismatches_reference_vs_draftsmith": mismatches(
            m["reference"], [until_eos(r["tokens"], m["eos"]) for r in m["draftsmith"][0]], m["eos"]),
        "settings": {"questions": args.questions, "prompts": len(m["greedy"]), "max_new_tokens": args.max_new_tokens,
                     "eagenerate": {"total_token": args.total_tokens, "depth": args.depth, "top_k": args.top_k},
                     "draftsmith": m["setup"], "threads": args.threads, "passes": "ABBA: reference, draftsmith "
                     "(prompts in order), draftsmith, reference (reversed)", "feature_layers": layers,
                     "eagle_commit": eagle_commit(),
                     "versions": {"reference": meta["versions"], "draftsmith": {
                         "torch": torch.__version__, "transformers": transformers.__version__}}},
        "answers": {"greedy": m["greedy"], "reference": [r["tokens"] for r in m["reference"][0]],
                    "draftsmith": [r["tokens"] for r in m["draftsmith"][0]]},
        "reference_load": {"keys": meta["keys"], "threads": meta["threads"], "stderr": meta["stderr"][-40:]},
    }


def eagle_commit() -> str | None:
    repo = os.environ.get("DRAFTSMITH_EAGLE_REPO")
    done = subprocess.run(["git", "-C", repo or ".", "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if repo and not done.returncode else None


def print_summary(r: dict) -> None:
    ref, ds, bad = r["reference"], r["draftsmith"], r["mismatches_vs_greedy"]
    print(f"eagenerate (EAGLE reference): tau {ref['tau']:.3f}, {ref['tokens_per_s']:.2f} tokens/s "
          f"({ref['new_tokens']} tokens in {ref['seconds']:.1f} s)")
    print(f"draftsmith loop:              tau {ds['tau']:.3f}, {ds['tokens_per_s']:.2f} tokens/s "
          f"({ds['new_tokens']} tokens in {ds['seconds']:.1f} s)")
    print(f"ratio draftsmith/reference: {r['ratio_tokens_per_s']:.3f}x tokens/s at tau ratio {r['ratio_tau']:.3f}; "
          f"prompts differing from greedy: reference {bad['reference']}, draftsmith {bad['draftsmith']}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if not os.environ.get("DRAFTSMITH_EAGLE_REPO") or not Path(args.eagle_python).is_file():
        sys.exit("set DRAFTSMITH_EAGLE_REPO (an EAGLE checkout) and DRAFTSMITH_INTEROP or --eagle-python")
    torch.set_num_threads(args.threads)
    target, tokenizer = load_target(TARGET)
    drafter = load_drafter(args.drafter, target).to(target.dtype)
    prompts = chat_prompts(tokenizer, args.questions, args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_target_folder(target, tokenizer, work / "target")
        export(args.drafter, "sglang", work / "export")  # native EAGLE-3 layout
        r = report(args, measure(args, target, tokenizer, drafter, prompts, work), drafter)
    print_summary(r)
    if args.output:
        Path(args.output).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
