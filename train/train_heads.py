"""Train Medusa heads, an EAGLE drafter or a DFlash drafter (drafter.kind: medusa | eagle | dflash) on a frozen
target.

    deepspeed train/train_heads.py --config configs/medusa_smollm2.yaml [key=value ...]
    deepspeed train/train_heads.py --config configs/eagle3_smollm2.yaml
    deepspeed train/train_heads.py --config configs/dflash_smollm2.yaml
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

import torch

if __package__ in (None, ""):  # run as a script: import the repository's packages, not train/'s modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from cli.errors import run_main  # noqa: E402
from train import recipe  # noqa: E402  (first: it sets DS_ACCELERATOR before anything imports deepspeed)
from drafters import DFlashModel, EagleModel, MedusaModel  # noqa: E402
from train import kinds  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.dflash_objective import DFlashObjective  # noqa: E402
from train.eagle_objective import Eagle1Objective, Eagle3Objective  # noqa: E402
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

    def inference_drafter(self, state: dict, measure: bool = True) -> MedusaModel:
        """The trained heads in the target's dtype, with per-head top-k accuracy on the held-out conversations
        recorded in their config (it sizes the evaluation's tree)."""
        drafter = MedusaModel(copy.deepcopy(self.engine.module.drafter.config))
        drafter.load_state_dict(state)
        drafter = drafter.to(device=self.d.device, dtype=self.target.dtype).eval()
        drafter.attach_target(self.target)
        if self.cfg.drafter.draft_vocab:
            self.record_draft_vocab(drafter.config, self.cfg.drafter.draft_vocab, say=measure)
        if self.holdout and measure:
            drafter.config.head_topk_accuracy = head_topk_accuracy(drafter, self.target, self.holdout_batches(), TOPK)
            top1 = ", ".join(f"{row[0]:.3f}" for row in drafter.config.head_topk_accuracy)
            self._print(f"held-out top-1 accuracy per head ({len(self.holdout)} conversations): {top1}")
        return drafter

    def save_drafter(self, drafter: MedusaModel, path: Path) -> None:
        drafter.save_pretrained(path)


class EagleRecipe(recipe.Recipe):
    """Online (the target runs inside every step), or offline with drafter.features: a feature cache written by
    `python -m train.features` for this config (checked against it) replaces the target's forward."""

    def _setup_data(self) -> None:
        super()._setup_data()
        self.features = None
        dc, c = self.cfg.drafter, self.cfg.data
        if dc.features:
            from data.embedded import resolve_data
            from data.features import FeatureCache, manifest_for
            from train.features import feature_layers_of

            expected = manifest_for(self.target, self.tokenizer, resolve_data(c.train), c.max_length, c.limit,
                                    feature_layers_of(self.cfg, self.target), "any", len(self.ds), 0)
            self.features = FeatureCache(dc.features, expected)
            self._print(f"offline mode: target features from {dc.features} "
                        f"({self.features.manifest['bytes_per_token']:,.0f} bytes per token)")

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The token batch, plus the cached features padded to its length in offline mode."""
        out = super().batch(indices)
        if self.features is None:
            return out
        B, T = out["input_ids"].shape
        rows = [self.features.get(i) for i in indices]
        hidden = torch.zeros(B, T, rows[0][1].shape[-1], dtype=rows[0][1].dtype)
        for b, (_, h) in enumerate(rows):
            hidden[b, :len(h)] = h
        out["hidden"] = hidden.to(self.d.device)
        if rows[0][0] is not None:
            feats = torch.zeros(B, T, rows[0][0].shape[-1], dtype=rows[0][0].dtype)
            for b, (f, _) in enumerate(rows):
                feats[b, :len(f)] = f
            out["features"] = feats.to(self.d.device)
        return out

    @property
    def num_stats(self) -> int:
        dc = self.cfg.drafter
        return dc.ttt_steps if dc.version == 3 else 1

    def build_objective(self) -> Eagle1Objective | Eagle3Objective:
        dc = self.cfg.drafter
        vocab = None
        if dc.version == 3 and dc.draft_vocab:
            vocab = self.draft_vocab(dc.draft_vocab)["draft_vocab"]
        parallel = dc.ttt_steps if dc.parallel else None
        return self.objective_for(EagleModel.from_target(self.target, dc.version, dc.feature_layers, vocab,
                                                         parallel_drafts=parallel).float())

    def objective_for(self, drafter: EagleModel) -> Eagle1Objective | Eagle3Objective:
        dc = self.cfg.drafter
        if dc.version == 1:
            return Eagle1Objective(drafter, self.target, dc.cls_weight, dc.reg_weight, dc.feature_noise)
        return Eagle3Objective(drafter, self.target, dc.ttt_steps, dc.step_decay, dc.cod_ratio, dc.cod_min)

    def inference_drafter(self, state: dict, measure: bool = True) -> EagleModel:
        """The trained drafter in the target's dtype, with held-out top-1 accuracy per draft step recorded."""
        dc = self.cfg.drafter
        drafter = EagleModel(copy.deepcopy(self.engine.module.drafter.config))
        drafter.load_state_dict(state)
        drafter = drafter.to(device=self.d.device, dtype=self.target.dtype).eval()
        drafter.attach_target(self.target)
        if dc.version == 1 and dc.draft_vocab:
            self.record_draft_vocab(drafter.config, dc.draft_vocab, say=measure)
        elif dc.version == 3 and dc.draft_vocab:
            coverage = self.draft_vocab(dc.draft_vocab)["draft_vocab_heldout_coverage"]
            drafter.config.draftsmith = {"draft_vocab_heldout_coverage": coverage}
        if self.holdout and measure:
            drafter.config.step_accuracy, drafter.config.step_topk_accuracy = self.heldout_accuracy(drafter)
            self._print(f"held-out top-1 accuracy per draft step ({len(self.holdout)} conversations): "
                        + ", ".join(f"{a:.3f}" for a in drafter.config.step_accuracy))
        return drafter

    @torch.no_grad()
    def heldout_accuracy(self, drafter: EagleModel) -> tuple[list[float], list[list[float]]]:
        """Agreement with the target's greedy token per draft step (EAGLE-3: the training-time-test steps, the
        drafter reading its own outputs; EAGLE-1: the first step) on the held-out conversations: top-1 per step,
        and acc[d][i] the share where the rank-i token of step d is right (i < TOPK). EAGLE-3 positions whose
        target token lies outside the draft vocabulary count as misses."""
        objective = self.objective_for(drafter).eval()
        objective.topk = TOPK
        hits = torch.zeros(self.num_stats, 3, dtype=torch.float64)
        ranks = torch.zeros(self.num_stats, TOPK, dtype=torch.float64)
        for batch in self.holdout_batches():
            hits += objective(**batch)[1]
            hits[:, 2] += getattr(objective, "outside", 0)
            ranks += objective.rank_hits
        count = hits[:, 2].clamp(min=1)
        return (hits[:, 1] / count).tolist(), (ranks / count[:, None]).tolist()

    def save_drafter(self, drafter: EagleModel, path: Path) -> None:
        drafter.save_pretrained(path)


class DFlashRecipe(EagleRecipe):
    """A DFlash block drafter: the target's features online, or from an offline feature cache as for EAGLE-3."""

    @property
    def num_stats(self) -> int:
        return self.cfg.drafter.block_size - 1

    def build_objective(self) -> DFlashObjective:
        dc = self.cfg.drafter
        drafter = DFlashModel.from_target(self.target, dc.num_layers, dc.block_size, dc.feature_layers,
                                          dc.mask_token_id, dc.layer_family)
        return self.objective_for(drafter.float())

    def objective_for(self, drafter: DFlashModel) -> DFlashObjective:
        return DFlashObjective(drafter, self.target, self.cfg.drafter.num_anchors, self.cfg.drafter.loss_decay_gamma)

    def inference_drafter(self, state: dict, measure: bool = True) -> DFlashModel:
        """The trained drafter in the target's dtype, with held-out accuracy per block slot (and rank) recorded."""
        dc = self.cfg.drafter
        drafter = DFlashModel(copy.deepcopy(self.engine.module.drafter.config))
        drafter.load_state_dict(state)
        drafter = drafter.to(device=self.d.device, dtype=self.target.dtype).eval()
        drafter.attach_target(self.target)
        if dc.draft_vocab:
            self.record_draft_vocab(drafter.config, dc.draft_vocab, say=measure)
        if self.holdout and measure:
            drafter.config.step_accuracy, drafter.config.step_topk_accuracy = self.heldout_accuracy(drafter)
            self._print(f"held-out top-1 accuracy per block slot ({len(self.holdout)} conversations): "
                        + ", ".join(f"{a:.3f}" for a in drafter.config.step_accuracy))
        return drafter


def run(cfg: TrainConfig, local_rank: int | None = None) -> recipe.TrainResult:
    """Train (or resume) as configured; every rank calls this."""
    return recipe.run(kinds.recipe_class(cfg.drafter.kind), cfg, local_rank)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, int | None]:
    return recipe.parse_args(argv, __doc__)


def main(argv: list[str] | None = None) -> None:
    recipe.main(kinds.recipes_of("train/train_heads.py"), argv, __doc__)


if __name__ == "__main__":
    run_main(main)
