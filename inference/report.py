"""The evaluation report: per-category and overall summaries, the target's own answers, and the terminal table."""
from __future__ import annotations

import json
from pathlib import Path

from drafters.provenance import provenance

from .metrics import Tally, repeated_ngrams
from .speculative import GenerationResult


def summaries(tallies: dict[str, Tally]) -> tuple[dict, dict]:
    overall = Tally()
    for t in tallies.values():
        overall.merge(t)
    return overall.summary(), {c: t.summary() for c, t in sorted(tallies.items())}


def answer_record(q, turns: list[GenerationResult], tokenizer, eos: set[int]) -> dict:
    """The target's own answer (plain decoding) to each turn of a question, kept in the report: what the speedups
    were measured on (e.g. whether answers ran to max_new_tokens, where long greedy answers often repeat).
    repeated: per turn, the new tokens that end an n-gram already in that answer (metrics.repeated_ngrams)."""
    return {"question_id": q.question_id, "category": q.category,
            "turns": [tokenizer.decode(r.tokens, skip_special_tokens=True) for r in turns],
            "new_tokens": [len(r.tokens) for r in turns],
            "stopped": [bool(r.tokens) and r.tokens[-1] in eos for r in turns],
            "repeated": [repeated_ngrams(r.tokens) for r in turns]}


def acceptance_name(temperature: float, typical: bool) -> str:
    if temperature == 0:
        return "greedy (lossless)"
    return "typical acceptance (LOSSY)" if typical else "speculative sampling (lossless in distribution)"


def drafter_target(drafter) -> str | None:
    """The target a drafter was trained for, as recorded in its config."""
    return provenance(drafter.config)["target_name_or_path"]


def prediction(setup: dict, overall: dict, lookup: bool) -> dict:
    """The cost model's prediction (inference.calibrate: tau from held-out accuracy, step costs from timed loop
    steps; setup: the proposer's) beside what the run measured on the questions: speedup, tau, ms per verify
    step and per plain-decoding token. With prompt lookup the measurement includes the copies, the prediction
    does not."""
    calibration = setup["calibration"]
    step = calibration["plain" if setup.get("decoding") == "plain" else "best"]["step_ms"]
    plain_tokens_per_s = overall["baseline_tokens_per_s"]
    return {"predicted_speedup": calibration["predicted_speedup"], "measured_speedup": overall["speedup"],
            "predicted_tau": calibration["expected_tau"], "measured_tau": overall["tau"],
            "predicted_step_ms": step, "measured_step_ms": _ms(overall["seconds"], overall["target_forwards"]),
            "predicted_plain_ms": calibration["plain"]["step_ms"],
            "measured_plain_ms": 1e3 / plain_tokens_per_s if plain_tokens_per_s else 0.0,
            "with_prompt_lookup": lookup}


def _ms(seconds: float, count: int) -> float:
    return 1e3 * seconds / count if count else 0.0


def cost_model_lines(setup: dict, prediction: dict | None) -> list[str]:
    """One line when the calibration chose plain decoding; one line of predicted against measured."""
    lines = []
    calibration = setup.get("calibration", {})
    if setup.get("decoding") == "plain":
        best = calibration["best"]
        lines.append(f"no tree pays on this machine for this drafter: decoded plainly (best candidate {best['nodes']} "
                     f"nodes, predicted {best['predicted_speedup']:.2f}x < {calibration['min_speedup']:.2f}x)")
    if prediction:
        p = prediction
        lines.append(f"cost model: predicted {p['predicted_speedup']:.2f}x (tau {p['predicted_tau']:.2f}, "
                     f"{p['predicted_step_ms']:.1f} ms/step, plain {p['predicted_plain_ms']:.1f} ms/token), measured "
                     f"{p['measured_speedup']:.2f}x (tau {p['measured_tau']:.2f}, {p['measured_step_ms']:.1f} ms/step, "
                     f"plain {p['measured_plain_ms']:.1f} ms/token)" + (", prompt lookup on" if p["with_prompt_lookup"]
                                                                         else ""))
    return lines


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
    lines += cost_model_lines(proposer, report.get("prediction"))
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
    """Write the JSON report whole or not at all (a kill mid-write keeps the one before)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


