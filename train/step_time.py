"""Online training cost: the time of one training step (target forward + drafter forward/backward + optimizer)
divided by the time of the target's forward pass alone on the same micro-batch.

    python -m train.step_time --config configs/eagle3_smollm2.yaml [--batches 3] [key=value ...]

Runs the config's recipe on its own data (no checkpoint, no evaluation), times `--batches` micro-batches after
one warm-up, and prints per-batch and total times. Each measurement is the best of `--repeats` runs (interference
from other processes only adds time).
"""
from __future__ import annotations

import tempfile

import torch

from cli.errors import ArgumentParser, run_main
from train import recipe  # first: it sets DS_ACCELERATOR before anything imports deepspeed
from inference.calibrate import run_seconds  # noqa: E402
from target.model import target_forward  # noqa: E402
from train.config import load_config  # noqa: E402
from train.kinds import recipe_class  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, [*args.overrides, f"output_dir={out}", "eval.questions=null",
                                        "checkpoint.every_steps=null", "logging.progress_bar=false"])
        r = recipe_class(cfg.drafter.kind)(cfg)
        r.setup()
        try:
            drafter = getattr(r.engine.module, "drafter", None)  # draft LMs train the module itself
            layers = getattr(getattr(drafter, "config", None), "feature_layers", None)
            batches = [r.batch(b) for b in r.epoch_batches(0)[:args.batches + 1]]

            def target_only(batch):
                with torch.no_grad():
                    target_forward(r.target, batch["input_ids"], batch["attention_mask"], logits_at=0,
                                   use_cache=False, feature_layers=layers)

            def train_step(batch):
                loss, _ = r.engine(**batch)
                r.engine.backward(loss)
                r.engine.step()

            train_step(batches[0])  # warm-up
            total_t = total_s = 0.0
            for b in batches[1:]:
                t = min(run_seconds(lambda: target_only(b), args.repeats, warmup=0))
                s = min(run_seconds(lambda: train_step(b), args.repeats, warmup=0))
                total_t, total_s = total_t + t, total_s + s
                print(f"batch {tuple(b['input_ids'].shape)}: target forward {t:.2f} s, training step {s:.2f} s, "
                      f"ratio {s / t:.2f}")
            print(f"{cfg.drafter.kind} ({args.config}): training step / target forward = {total_s / total_t:.2f} "
                  f"over {len(batches) - 1} micro-batches ({torch.get_num_threads()} threads)")
        finally:
            r.cleanup()


if __name__ == "__main__":
    run_main(main)
