"""Distil a small draft LM from a frozen target (DistillSpec-style losses; optionally LoRA).

    deepspeed train/train_draft_lm.py --config configs/draft_lm_smollm2.yaml [key=value ...]
    python train/train_draft_lm.py --config configs/draft_lm_tiny.yaml output_dir=/tmp/run      # one process

The draft is built from the target (its architecture with drafter.num_layers layers; embeddings, LM head and
final norm copied, drafter.init_layers copied too) or loaded from drafter.from_pretrained. Leaves
<output_dir>/drafter (a causal LM checkpoint with the target's tokenizer, or LoRA adapters), eval.json (when
eval.questions is set), metrics.jsonl, config.yaml and checkpoints/; re-running resumes (checkpoint.resume: auto).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the repository's packages, not train/'s modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from cli.errors import run_main  # noqa: E402
from train import recipe  # noqa: E402  (first: it sets DS_ACCELERATOR before anything imports deepspeed)
from drafters.draft_lm import DRAFT_LM_KIND, add_lora, build_draft_lm, load_draft_lm, save_draft  # noqa: E402
from drafters.vocab import get_draft_vocab  # noqa: E402
from train import kinds  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.objectives import DraftLMObjective, draft_agreement, unwrap  # noqa: E402


class DraftLMRecipe(recipe.Recipe):
    num_stats = 1

    def build_objective(self) -> DraftLMObjective:
        dc = self.cfg.drafter
        draft = self._new_draft()
        if dc.lora:
            draft = add_lora(draft, dc.lora_r, dc.lora_alpha, dc.lora_dropout, dc.lora_target_modules)
        elif not dc.train_embeddings:  # the target's embeddings / LM head (often tied) are already right
            for module in (draft.get_input_embeddings(), draft.get_output_embeddings()):
                module.requires_grad_(False)
        trainable = sum(p.numel() for p in draft.parameters() if p.requires_grad)
        total = sum(p.numel() for p in draft.parameters())
        self._print(f"draft LM: {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trained")
        vocab = None
        if dc.loss_vocab == "draft":  # FR-Spec in training too: the losses over the tokens it will draft
            vocab = self.draft_vocab(dc.draft_vocab)["draft_vocab"]
        return DraftLMObjective(draft, self.target, dc.losses, dc.temperature, dc.jsd_beta, dc.positions, vocab)

    def _new_draft(self):
        """The untrained draft in fp32: built from the target, or loaded (vocabulary checked) with provenance."""
        dc = self.cfg.drafter
        if dc.from_pretrained is None:
            return build_draft_lm(self.target, dc.num_layers, dc.init_layers, self.cfg.target).float()
        draft = load_draft_lm(dc.from_pretrained, self.target, trainable=True).float()
        draft.config.draftsmith = {"kind": DRAFT_LM_KIND, "target_name_or_path": self.cfg.target,
                                   "target_vocab_size": self.target.config.vocab_size,
                                   "from_pretrained": dc.from_pretrained}
        return draft.to(self.d.device)

    def inference_drafter(self, state: dict, measure: bool = True):
        """A fresh copy of the trained draft (same LoRA wrapping) loaded with the gathered weights, in the target's
        dtype; the held-out greedy agreement with the target is recorded in config.draftsmith."""
        dc, trained = self.cfg.drafter, self.engine.module.drafter
        if self.engine.module.outside and measure:
            self._print(f"{self.engine.module.outside:,} supervised positions (this process) were left out: their "
                        f"next token lies outside the {dc.draft_vocab:,}-token draft vocabulary")
        base = unwrap(trained)
        draft = type(base)(copy.deepcopy(base.config))
        if dc.lora:
            draft = add_lora(draft, dc.lora_r, dc.lora_alpha, dc.lora_dropout, dc.lora_target_modules)
        draft.load_state_dict(state)
        draft = draft.to(device=self.d.device, dtype=self.target.dtype).eval()
        if dc.draft_vocab:
            self.record_draft_vocab(unwrap(draft).config, dc.draft_vocab, say=measure)
        if self.holdout and measure:  # measured as it drafts: over the draft vocabulary when it has one
            vocab = get_draft_vocab(unwrap(draft).config)
            agreement = draft_agreement(draft, self.target, self.holdout_batches(), vocab)
            unwrap(draft).config.draftsmith = {**unwrap(draft).config.draftsmith, "heldout_agreement": agreement}
            self._print(f"held-out greedy agreement with the target ({len(self.holdout)} conversations): "
                        f"{agreement:.3f}")
        return draft

    def save_drafter(self, drafter, path: Path) -> None:
        dc = self.cfg.drafter
        save_draft(drafter, path, merged=dc.save_merged or not dc.lora)
        self.tokenizer.save_pretrained(path)  # the draft is usable on its own (vLLM, assisted generation)


def run(cfg: TrainConfig, local_rank: int | None = None) -> recipe.TrainResult:
    """Train (or resume) as configured; every rank calls this."""
    return recipe.run(DraftLMRecipe, cfg, local_rank)


def main(argv: list[str] | None = None) -> None:
    recipe.main(kinds.recipes_of("train/train_draft_lm.py"), argv, __doc__)


if __name__ == "__main__":
    run_main(main)
