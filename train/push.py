"""Publish a trained drafter on the Hugging Face Hub, with a model card built from its config and eval report.

    python -m train.push --drafter RUN_DIR/drafter --repo-id USER/NAME [--private] [--eval RUN_DIR/eval.json]
    python -m train.push --drafter RUN_DIR/drafter --repo-id USER/NAME --eval RUN_DIR/eval.json --dry-run OUT
    python -m train.push --drafter RUN_DIR/drafter --repo-id USER/NAME --benchmark BENCH_DIR      # + its plots

The card (README.md) and a copy of the eval report (eval.json) are written into the drafter folder, which is then
uploaded as one commit. --dry-run copies that exact folder to OUT instead of uploading it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from transformers import AutoConfig

import drafters  # noqa: F401  (registers the drafter configs with AutoConfig)
from cli.errors import ArgumentParser, run_main
from drafters.provenance import provenance
from target.embedded import EMBEDDED_TARGET_SOURCES

CARD = "README.md"
REPORT = "eval.json"
BENCHMARK = "benchmark"  # the benchmark's plots in the uploaded folder


def base_model_id(target: str | None) -> str | None:
    """The Hub id to name as base_model: an embedded target's source model, a Hub id as is; None for a local
    checkpoint path (which must not leak into a public card)."""
    if not target:
        return None
    if target in EMBEDDED_TARGET_SOURCES:
        return EMBEDDED_TARGET_SOURCES[target]
    looks_local = target.startswith(("/", ".", "~")) or Path(target).expanduser().exists() or target.count("/") > 1
    return None if looks_local else target


def public_name(source: str | None) -> str | None:
    """A data set's name for a public card: an embedded name or Hub id as is, a local file by its name only (never
    a machine-local path)."""
    if source and base_model_id(source) is None:
        return Path(source).name
    return source


def model_card(drafter_dir: str, repo_id: str, report: dict | None, benchmark: dict | None = None) -> str:
    """README.md text: YAML front matter, what the drafter is, how to use it, its measured acceptance, and with
    `benchmark` (inference.benchmark's results.json) that run's table and plots."""
    config = AutoConfig.from_pretrained(drafter_dir)
    kind = config.model_type.removeprefix("draftsmith_")
    target = provenance(config)["target_name_or_path"]
    base = base_model_id(target)
    meta = {"library_name": "draftsmith", "tags": ["speculative-decoding", kind, "draftsmith"]}
    if base:
        meta = {"base_model": base, **meta}
    # The usage snippet loads exactly the target the heads were trained on (for an embedded one, its name).
    target_ref = target if target in EMBEDDED_TARGET_SOURCES else base or "<the target it was trained on>"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {repo_id}", ""]
    lines += [
        f"{kind.capitalize()} drafter for speculative decoding with **{base or 'a locally stored target'}** as the "
        f"frozen target model, trained with draftsmith. It proposes tokens that the target verifies; greedy "
        f"verification keeps the target's output unchanged, the drafter only changes how fast it comes.",
        "",
    ]
    if kind == "medusa":
        lines += [f"{config.num_heads} Medusa heads ({config.num_layers} residual block(s) each, "
                  f"{'sharing the target LM head' if config.share_lm_head else 'own LM heads'}); head k predicts "
                  f"the token k + 2 positions ahead from the target's last hidden state.", ""]
    if kind == "eagle":
        lines += [_eagle_description(config), ""]
    if kind == "dflash":
        lines += [f"A DFlash block drafter: {config.num_layers} decoder layer(s) reading the target's layers "
                  f"{config.feature_layers}, drafting {config.block_size - 1} tokens per forward.", ""]
    if target and target in EMBEDDED_TARGET_SOURCES:
        lines += [f"Trained against draftsmith's embedded target `{target}` (a GGUF build of {base}, dequantized "
                  f"to float32); with the original {base} checkpoint the heads' accuracy may differ slightly.", ""]
    lines += [
        "## Use", "",
        "```python",
        "from drafters import load_drafter",
        "from target.model import load_target",
        "",
        f"target, tokenizer = load_target({target_ref!r})",
        f"drafter = load_drafter({repo_id!r}, target)",
        "```", "",
        "Measure it on your own machine:", "",
        "```bash",
        f"python -m inference.evaluate --target {target_ref} --drafter {repo_id} --questions mt-bench",
        "```", "",
    ]
    if getattr(config, "step_accuracy", None):
        top1 = ", ".join(f"{a:.3f}" for a in config.step_accuracy)
        lines += [f"Held-out top-1 accuracy per draft step (against the target's greedy tokens): {top1}.", ""]
    if getattr(config, "head_topk_accuracy", None):
        top1 = ", ".join(f"{row[0]:.3f}" for row in config.head_topk_accuracy)
        lines += [f"Held-out top-1 accuracy per head (against the target's greedy tokens): {top1}.", ""]
    held = getattr(config, "heldout_acceptance", None)
    if held and held.get("heldout_tau") is not None:
        lines += [f"Saved from training step {held['step']}: held-out τ {held['heldout_tau']:.3f} (greedy chain "
                  "drafting on the first turns of held-out conversations, measured while training).", ""]
    lines += _results(report) if report else ["No evaluation report was given for this upload.", ""]
    lines += _benchmark(benchmark) if benchmark else []
    return "\n".join(lines)


def _benchmark(results: dict) -> list[str]:
    """The benchmark's methods table and its plots (copied into the folder's benchmark/ by prepare_folder)."""
    from inference.bench_report import method_table

    s, m = results["setup"], results["machine"]
    questions = public_name(s["questions"])
    lines = ["## Benchmark", "",
             f"`inference.benchmark`: this drafter beside plain decoding and transformers' own loops, in one process "
             f"on the same prompts ({s['num_questions']} questions of `{questions}`, up to {s['max_new_tokens']} new "
             f"tokens, {s['acceptance']}; {m['cpu']}, {m['torch_threads']} torch threads, {m['device']}"
             + (f", {m['gpu']}" if "gpu" in m else "") + ").", "", *method_table(results), ""]
    return lines + [f"![{title}]({BENCHMARK}/{name})" for name, title in results["plots"].items()] + [""]


def _eagle_description(config) -> str:
    """What an EAGLE drafter is, and how serving engines take it (train/export.py)."""
    if config.eagle_version == 1:
        return ("EAGLE-1 feature drafter: one decoder layer of the target's architecture reads the target's last "
                "hidden state and the next token's embedding and predicts the next feature; the target's LM head "
                "turns it into tokens.")
    inputs = [i + 1 for i in config.feature_layers]  # output of layer i = transformers' hidden_states[i + 1]
    return (f"EAGLE-3 drafter: the outputs of target layers {config.feature_layers} (hidden_states{inputs}) fused "
            f"into one decoder layer, trained with the training-time test; its own LM head covers "
            f"{config.draft_vocab_size:,} frequent tokens (`d2t` / `t2d` maps). `python -m train.export --drafter DIR "
            f"--format sglang|vllm` writes the layouts SGLang and vLLM load.")


def _results(report: dict) -> list[str]:
    setup = report.get("setup", {})
    lines = ["## Acceptance and speed", ""]
    questions = public_name(setup.get("questions"))
    what = [f"{setup['num_questions']} questions of `{questions}`" if questions else None,
            f"up to {setup['max_new_tokens']} new tokens per turn" if "max_new_tokens" in setup else None,
            setup.get("acceptance")]
    lines += ["Measured by `inference.evaluate`" + "".join(f"; {w}" for w in what if w) + ".", ""]
    lines += ["| category | τ (tokens per target forward) | speedup | tokens/s | baseline tokens/s |",
              "| --- | --- | --- | --- | --- |"]
    rows = [*report.get("per_category", {}).items(), ("**overall**", report["overall"])]
    for name, r in rows:
        lines.append(f"| {name} | {r['tau']:.2f} | {r['speedup']:.2f}x | {r['tokens_per_s']:.1f} | "
                     f"{r['baseline_tokens_per_s']:.1f} |")
    lines.append("")
    if "lossless" in report:
        lossless = report["lossless"]
        lines += [f"Lossless check: {lossless['mismatches']} of {lossless['checked']} answers differ from plain "
                  f"greedy decoding of the target.", ""]
    hardware = [f"device {setup['device']}" if "device" in setup else None,
                f"{setup['machine']}" if setup.get("machine") else None,
                f"{setup['torch_threads']} torch threads" if "torch_threads" in setup else None,
                f"target dtype {setup['dtype']}" if "dtype" in setup else None]
    if any(hardware):
        lines += ["Hardware: " + ", ".join(h for h in hardware if h) + ". Speedups depend on the machine; τ does "
                  "not.", ""]
    return lines


def prepare_folder(drafter_dir: str, repo_id: str, eval_path: str | None = None,
                   benchmark_dir: str | None = None) -> Path:
    """Write README.md (and eval.json, when given; the benchmark's plots into benchmark/, when given) into
    `drafter_dir`: the folder as it will be uploaded."""
    folder = Path(drafter_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: give the drafter folder a training run saved "
                                f"(<output_dir>/drafter)")
    report = None
    if eval_path is not None:
        report = json.loads(Path(eval_path).read_text())
        if Path(eval_path).resolve() != (folder / REPORT).resolve():
            shutil.copyfile(eval_path, folder / REPORT)
    benchmark = None
    if benchmark_dir is not None:
        benchmark = json.loads((Path(benchmark_dir) / "results.json").read_text())
        (folder / BENCHMARK).mkdir(exist_ok=True)
        for name in benchmark["plots"]:
            shutil.copyfile(Path(benchmark_dir) / name, folder / BENCHMARK / name)
    (folder / CARD).write_text(model_card(str(folder), repo_id, report, benchmark))
    return folder


def push_drafter(drafter_dir: str, repo_id: str, private: bool = False, eval_path: str | None = None,
                 dry_run_dir: str | None = None, benchmark_dir: str | None = None) -> str:
    """Card + upload. Returns the commit URL, or with `dry_run_dir` the folder that would have been uploaded.

    Two Hub calls: create_repo(exist_ok=True) makes no commit and is a no-op when the repo exists (upload_folder
    cannot create one), then upload_folder sends every file in one commit.
    """
    folder = prepare_folder(drafter_dir, repo_id, eval_path, benchmark_dir)
    if dry_run_dir is not None:
        shutil.copytree(folder, dry_run_dir, dirs_exist_ok=True)
        print(f"dry run: the folder that would be uploaded to {repo_id} is in {dry_run_dir}")
        return dry_run_dir
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", create_pr=False,
                               commit_message="Upload draftsmith drafter")
    url = getattr(commit, "commit_url", None) or str(commit)
    print(f"uploaded {folder} to {repo_id}: {url}")
    return url


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--drafter", required=True, help="the drafter folder of a run (<output_dir>/drafter)")
    p.add_argument("--repo-id", required=True, help="USER/NAME on the Hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--eval", help="eval.json of the run: its table goes into the card")
    p.add_argument("--dry-run", metavar="DIR", help="copy the folder to DIR instead of uploading")
    p.add_argument("--benchmark", metavar="DIR", help="an inference.benchmark output folder: its table and plots go "
                                                      "into the card")
    args = p.parse_args(argv)
    if args.benchmark and not (Path(args.benchmark) / "results.json").is_file():
        p.error(f"--benchmark {args.benchmark}: no results.json there; give the --output folder of "
                f"python -m inference.benchmark")
    push_drafter(args.drafter, args.repo_id, args.private, args.eval, args.dry_run, args.benchmark)


if __name__ == "__main__":
    run_main(main)
