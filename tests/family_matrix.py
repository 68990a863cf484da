"""The family matrix: a tiny random target of each family (conftest.FAMILIES) through each drafter kind: train two
steps with the kind's tiny config, decode the evaluation questions greedily against plain decoding (lossless),
export to each engine layout. tests/test_families.py runs the cells;

    python tests/family_matrix.py [--output docs/families.md]

runs every cell and writes the table from what they returned."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest, tiny_assets when run as a script

from conftest import FAMILIES, make_tiny_target  # noqa: E402
from tiny_assets import VOCAB, tiny_overrides, tiny_tokenizer, write_conversations, write_questions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KINDS = ("medusa", "eagle1", "eagle3", "draft_lm")  # the tiny configs configs/<kind>_tiny.yaml
REFUSED = {  # families verification cannot roll back: refused when the target loads, before training
    "qwen3-next (hybrid)": ("qwen3_next", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                               linear_num_value_heads=4, linear_num_key_heads=2,
                                               linear_key_head_dim=16, linear_value_head_dim=16,
                                               layer_types=["linear_attention", "full_attention"])),
}


def write_target(family: str, directory: Path) -> str:
    """A tiny target of `family` (FAMILIES or REFUSED) + the tiny tokenizer, saved like a Hub checkpoint."""
    if family in REFUSED:
        from transformers import AutoConfig, AutoModelForCausalLM
        model_type, extra = REFUSED[family]
        config = AutoConfig.for_model(model_type, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = make_tiny_target(family, vocab_size=VOCAB)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 0
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


def run_cell(family: str, kind: str, root: Path) -> dict[str, str]:
    """Train `kind` on a tiny `family` target and evaluate it; {train, lossless, export} as the table shows them.
    Raises where a cell fails unexpectedly (the tests want the traceback)."""
    from train.config import load_config
    from train.kinds import recipe_class

    assets = {"target": write_target(family, root / "target"),
              "data.train": write_conversations(root / "conversations.jsonl")}
    questions = write_questions(root / "questions.jsonl")
    overrides = tiny_overrides(assets, root / "run", "training.max_steps=2", f"eval.questions={questions}",
                               "eval.check_lossless=true", "eval.max_new_tokens=24", "eval.limit=null")
    cfg = load_config(str(REPO / "configs" / f"{kind}_tiny.yaml"), overrides)
    if family in REFUSED:
        from target.model import load_target
        try:
            load_target(assets["target"])
        except ValueError as err:
            return {"train": "refused at startup", "lossless": "-", "export": "-", "note": str(err)}
        raise AssertionError(f"{family}: the target loaded; it should be refused")
    from train.recipe import run
    result = run(recipe_class(cfg.drafter.kind), cfg)
    assert result.finished, f"{family} {kind}: training did not finish"
    lossless = json.loads((root / "run" / "eval.json").read_text())["lossless"]
    cell = {"train": "ok", "lossless": f"{lossless['checked'] - lossless['mismatches']}/{lossless['checked']}"}
    cell["export"] = _exports(kind, root)
    return cell


def _exports(kind: str, root: Path) -> str:
    """Each engine layout the kind has: ok, or the refusal's reason."""
    if kind == "draft_lm":
        return "a transformers checkpoint"
    from train.export import FORMATS, ExportRefused, export
    out = []
    for fmt in FORMATS:
        try:
            export(root / "run" / "drafter", fmt, root / f"export-{fmt}")
            out.append(f"{fmt}: ok")
        except ExportRefused as err:
            out.append(f"{fmt}: refused ({_reason(str(err))})")
    return "; ".join(out)


def _reason(message: str) -> str:
    return message.split(": ", 1)[-1].split(";")[0].strip()[:90]


def table(cells: dict[tuple[str, str], dict[str, str]]) -> str:
    families = list(dict.fromkeys(f for f, _ in cells))
    lines = ["| family | drafter | train | lossless (answers equal to plain decoding) | export |",
             "| --- | --- | --- | --- | --- |"]
    for family in families:
        for kind in KINDS:
            c = cells.get((family, kind))
            if c is not None:
                lines.append(f"| {family} | {kind} | {c['train']} | {c['lossless']} | {c['export']} |")
    notes = {c["note"] for c in cells.values() if c.get("note")}
    return "\n".join(lines) + "".join(f"\n\nRefused: {n}" for n in sorted(notes)) + "\n"


HEADER = """# Target families

Which target families draftsmith trains drafters for and verifies losslessly, as tiny random models (hidden 64, two
layers, sliding windows of 8 positions so that decoding runs past them). Each row trained the drafter kind's tiny
config for two steps on that target, then decoded the evaluation questions (24 new tokens each, greedy) with
speculative decoding and with plain decoding; `lossless` counts the answers that came out equal. Export tries
each engine layout; a refusal names what the engine's loader cannot express. Written by
`python tests/family_matrix.py` from the cells it ran (tests/test_families.py runs the same cells).

Sliding-window layers keep every position in the verification cache and apply the window in the attention
mask, so rejected drafts are dropped the same way in every layer; layers that keep a recurrent state (linear
attention, Mamba) cannot drop a rejected draft and are refused when the target loads.

"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(REPO / "docs" / "families.md"))
    p.add_argument("--families", nargs="*", default=[*FAMILIES, *REFUSED])
    args = p.parse_args(argv)
    cells = {}
    for family in args.families:
        for kind in KINDS if family not in REFUSED else KINDS[:1]:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    cells[family, kind] = run_cell(family, kind, Path(tmp))
                except Exception as err:  # a red cell: shown, not hidden
                    traceback.print_exc()
                    cells[family, kind] = {"train": f"FAILED: {type(err).__name__}", "lossless": "-", "export": "-"}
            print(family, kind, cells[family, kind], flush=True)
    Path(args.output).write_text(HEADER + table(cells))


if __name__ == "__main__":
    main()
