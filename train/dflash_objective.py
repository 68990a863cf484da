"""DFlash's training objective (drafters/dflash.py), the paper's recipe as SpecForge and speculators train it.

Per sequence, up to `num_anchors` anchors a are drawn at random among the positions whose next token is supervised.
Each anchor makes a block [x_a, mask, ..., mask] at positions a..a+B-1 that attends to the target's context
features at positions < a (what decoding has when x_a is the root) and, both ways, to its own slots only; all
blocks of a batch go through the drafter in one forward. Slot k >= 1 is trained towards the target's own
next-token distribution after x_{a+k-1} (soft-label cross-entropy, as speculators does; its argmax is the token
greedy decoding would accept), where x_{a+k} is a supervised token, with weight exp(-(k - 1) / gamma) (the
paper's decay: early slots matter most, a miss there ends the accepted run); loss = sum(w CE) / sum(w).
"""
from __future__ import annotations

import torch
from torch import nn

from drafters.dflash import DFlashModel
from inference.tree import additive_mask
from target.model import softcap, target_forward
from train.eagle_objective import rank_hits, soft_ce
from train.objectives import LM_HEAD_CHUNK, next_token_supervised


class DFlashObjective(nn.Module):
    """stats: one row per block slot 1..B-1 (CE sum, top-1 hits, count), a hit when the drafter's argmax is the
    target's greedy token; with `topk` > 0 the last call also counts `rank_hits` [B - 1, topk]. Anchors come from
    torch's random stream in training (restored on resume) and from a fixed seed in eval mode (held-out
    measurements compare like with like)."""

    def __init__(self, drafter: DFlashModel, target: nn.Module, num_anchors: int = 64, gamma: float = 7.0):
        super().__init__()
        self.drafter = drafter
        self._target = [target]
        self.num_anchors, self.gamma = num_anchors, gamma
        self.topk, self.rank_hits = 0, None

    def anchors(self, eligible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eligible [B, T] bool -> anchors [B, A] (sorted; 0 where unused) and used [B, A] bool."""
        generator = None if self.training else torch.Generator().manual_seed(0)
        rows = []
        for row in eligible.cpu():
            where = row.nonzero().squeeze(1)
            pick = torch.randperm(len(where), generator=generator)[:self.num_anchors]
            rows.append(where[pick].sort().values)
        A = max(1, max(len(r) for r in rows))
        anchors = torch.zeros(len(rows), A, dtype=torch.long)
        used = torch.zeros(len(rows), A, dtype=torch.bool)
        for b, r in enumerate(rows):
            anchors[b, :len(r)], used[b, :len(r)] = r, True
        return anchors.to(eligible.device), used.to(eligible.device)

    def block_mask(self, anchors: torch.Tensor, used: torch.Tensor, attention_mask: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, A*Bk, T + A*Bk] additive: a block's queries see context positions < its anchor and every slot
        of their own block (an unused block sees only itself, so its rows stay finite)."""
        B, T = attention_mask.shape
        A, Bk = anchors.shape[1], self.drafter.config.block_size
        block = torch.arange(A, device=anchors.device).repeat_interleave(Bk)                # [A*Bk]
        anchor = anchors[:, block]                                                          # [B, A*Bk]
        ctx = (torch.arange(T, device=anchors.device)[None, None] < anchor[..., None])     # [B, A*Bk, T]
        ctx &= attention_mask.bool()[:, None] & used[:, block, None]
        own = (block[:, None] == block[None, :]).expand(B, -1, -1)                          # [B, A*Bk, A*Bk]
        return additive_mask(torch.cat([ctx, own], dim=-1), dtype)[0].transpose(0, 1)      # [B, 1, A*Bk, T + A*Bk]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                features: torch.Tensor | None = None, hidden: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, T, F] / hidden [B, T, H]: from a feature cache (offline mode), else the target runs."""
        target, d = self._target[0], self.drafter
        Bk, dev = d.config.block_size, input_ids.device
        if features is None or hidden is None:
            with torch.no_grad():
                out = target_forward(target, input_ids, attention_mask, logits_at=0, use_cache=False,
                                     feature_layers=d.config.feature_layers)
            features, hidden = out.features, out.hidden_states
        B, T = input_ids.shape
        needed = next_token_supervised(loss_mask, attention_mask)                           # [B, T]: x_{t+1} supervised
        anchors, used = self.anchors(needed)                                                # [B, A]
        A = anchors.shape[1]
        pos = anchors[..., None] + torch.arange(Bk, device=dev)                            # [B, A, Bk]
        tokens = torch.full_like(pos, d.config.mask_token_id)
        tokens[..., 0] = input_ids.gather(1, anchors)
        context = d.context(features, torch.arange(T, device=dev)[None].expand(B, T))
        mask = self.block_mask(anchors, used, attention_mask, d.fc.weight.dtype)
        out = d(tokens.view(B, A * Bk), pos.view(B, A * Bk), context, mask).view(B, A, Bk, -1)
        # slot k >= 1 predicts x_{a+k} from the target's distribution after x_{a+k-1}
        prev = pos[..., 1:] - 1                                                             # [B, A, Bk-1]
        inside = pos[..., 1:] < T
        supervised = inside & needed.gather(1, prev.clamp(max=T - 1).view(B, -1)).view_as(prev) & used[..., None]
        slot = torch.arange(1, Bk, device=dev).expand_as(prev)                              # [B, A, Bk-1]
        at = prev.clamp(max=T - 1).view(B, -1, 1).expand(-1, -1, hidden.shape[-1])
        before = hidden.gather(1, at).view(*prev.shape, -1)                                # [B, A, Bk-1, H]
        return self._loss(out[..., 1:, :][supervised], before[supervised], slot[supervised])

    def _loss(self, out: torch.Tensor, teacher_hidden: torch.Tensor, slot: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """out [M, H] the supervised slots' outputs, teacher_hidden [M, H] the target's hidden state before each
        slot's token, slot [M] in 1..B-1."""
        target, d = self._target[0], self.drafter
        Bk = d.config.block_size
        stats = torch.zeros(Bk - 1, 3, dtype=torch.float64)
        self.rank_hits = torch.zeros(Bk - 1, self.topk, dtype=torch.float64)
        if out.shape[0] == 0:  # nothing supervised: a zero loss that still touches every parameter
            return sum(p.sum() * 0 for p in d.parameters()), stats
        head = target.get_output_embeddings().weight
        weights = torch.exp(-(slot - 1).float() / self.gamma) if self.gamma > 0 else torch.ones_like(slot).float()
        total = 0
        for o, h, s, w in zip(*(x.split(LM_HEAD_CHUNK) for x in (out, teacher_hidden, slot, weights))):
            with torch.no_grad():
                teacher = softcap(target.config, nn.functional.linear(h.to(head.dtype), head)).float()  # [m, V]
                probs, greedy = torch.softmax(teacher, -1), teacher.argmax(-1)
            logits = softcap(target.config, d.logits(o))                                     # [m, V]
            ce = soft_ce(logits, probs)                                                      # [m]
            total = total + (w * ce).sum()
            hit = (logits.argmax(-1) == greedy).double().cpu()
            k = (s - 1).cpu()
            stats[:, 0].index_add_(0, k, ce.detach().double().cpu())
            stats[:, 1].index_add_(0, k, hit)
            stats[:, 2].index_add_(0, k, torch.ones_like(hit))
            if self.topk:
                for depth in k.unique().tolist():
                    rows = k == depth
                    self.rank_hits[depth] += rank_hits(logits[rows.to(logits.device)], greedy[rows.to(greedy.device)],
                                                       self.topk)
        return total / weights.sum(), stats
