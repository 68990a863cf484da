"""Write a trained drafter as a zoo folder: only what training changed, in bf16 (drafters/zoo.py).

    python -m train.zoo_export --target smollm2-135m-instruct --drafter runs/eagle3/drafter \
        --output zoo/smollm2-135m-instruct/eagle3

The folder loads wherever a drafter path is accepted, given the same target (`--drafter zoo/...`). Its card
(README.md) is written by the GPU pipeline from its measurements (train/pipeline.py); a folder exported by hand
gets a card that says what is known: the kind, the target and what is stored.
"""
from __future__ import annotations

import sys
from pathlib import Path

from cli.errors import ArgumentParser, run_main
from drafters import load_drafter
from drafters.zoo import WEIGHTS, save_zoo_drafter
from target.model import load_target
from train.zoo_card import write_card


def export(drafter_dir: str, target, target_name: str, output: str, name: str | None = None) -> dict:
    """Load the drafter saved by training and write it to `output` as a zoo folder; returns the manifest."""
    drafter = load_drafter(drafter_dir, target)
    if hasattr(drafter, "merge_and_unload"):
        drafter = drafter.merge_and_unload()  # LoRA adapters: the zoo stores the merged layers
    manifest = save_zoo_drafter(drafter, target, output, name or Path(output).name, target_name)
    write_card(output, manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--target", required=True, help="the target the drafter was trained for (embedded name or path)")
    p.add_argument("--drafter", required=True, help="a drafter folder saved by training (<output_dir>/drafter)")
    p.add_argument("--output", required=True, help="the zoo folder to write, e.g. zoo/<target>/<name>")
    p.add_argument("--name", help="the drafter's name in the zoo (default: the output folder's name)")
    args = p.parse_args(argv)
    if not Path(args.drafter).is_dir():
        sys.exit(f"error: --drafter {args.drafter} is not a folder; give <output_dir>/drafter of a training run")
    target, _ = load_target(args.target)
    manifest = export(args.drafter, target, args.target, args.output, args.name)
    size = (Path(args.output) / WEIGHTS).stat().st_size
    print(f"wrote {args.output}: {manifest['kind']} drafter, {manifest['stored_parameters']:,} parameters stored in "
          f"{manifest['stored_dtype']} ({size / 2**20:.1f} MiB); rebuilt from the target at load: "
          f"{', '.join(manifest['from_target']) or 'nothing'}")


if __name__ == "__main__":
    run_main(main)
