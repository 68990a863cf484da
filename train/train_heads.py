"""Train Medusa heads on a frozen target.

    deepspeed train/train_heads.py --config configs/medusa_smollm2.yaml [key=value ...]
    torchrun --nproc_per_node 2 train/train_heads.py --config configs/medusa_tiny.yaml output_dir=/tmp/run
    python train/train_heads.py --config configs/medusa_tiny.yaml training.lr=3e-4      # one process

Leaves <output_dir>/drafter (save_pretrained, with measured per-head top-k accuracy), <output_dir>/eval.json
(when eval.questions is set), metrics.jsonl, config.yaml and checkpoints/. Re-running the same command resumes
from the newest complete checkpoint (checkpoint.resume: auto).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repository's packages, not train/'s modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from train import recipe  # noqa: E402  (first: it sets DS_ACCELERATOR before anything imports deepspeed)
from drafters import MedusaModel  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.objectives import MedusaObjective, head_topk_accuracy  # noqa: E402

TOPK = 10  # per-head accuracy is measured for ranks 0..TOPK-1


class MedusaRecipe(recipe.Recipe):
    @property
    def num_stats(self) -> int:
        return self.cfg.drafter.num_heads

    def build_objective(self) -> MedusaObjective:
        dc, tc = self.cfg.drafter, self.cfg.training
        drafter = MedusaModel.from_target(self.target, dc.num_heads, dc.num_layers, dc.share_lm_head).float()
        return MedusaObjective(drafter, self.target, tc.head_decay, tc.labels)

    def inference_drafter(self, state: dict) -> MedusaModel:
        """The trained heads in the target's dtype, with per-head top-k accuracy on the held-out conversations
        recorded in their config (it sizes the evaluation's tree)."""
        drafter = MedusaModel(copy.deepcopy(self.engine.module.drafter.config))
        drafter.load_state_dict(state)
        drafter = drafter.to(device=self.d.device, dtype=self.target.dtype).eval()
        drafter.attach_target(self.target)
        if self.cfg.drafter.draft_vocab:
            self.record_draft_vocab(drafter.config, self.cfg.drafter.draft_vocab)
        if self.holdout:
            drafter.config.head_topk_accuracy = head_topk_accuracy(drafter, self.target, self.holdout_batches(), TOPK)
            top1 = ", ".join(f"{row[0]:.3f}" for row in drafter.config.head_topk_accuracy)
            self._print(f"held-out top-1 accuracy per head ({len(self.holdout)} conversations): {top1}")
        return drafter

    def save_drafter(self, drafter: MedusaModel, path: Path) -> None:
        drafter.save_pretrained(path)


def run(cfg: TrainConfig, local_rank: int | None = None) -> recipe.TrainResult:
    """Train (or resume) as configured; every rank calls this."""
    return recipe.run(MedusaRecipe, cfg, local_rank)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, int | None]:
    return recipe.parse_args(argv, __doc__)


def main(argv: list[str] | None = None) -> None:
    recipe.main(MedusaRecipe, "medusa", argv, __doc__)


if __name__ == "__main__":
    main()
