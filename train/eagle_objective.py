"""EAGLE training objectives (drafters/eagle.py). Pair j = (the target's feature at position j, token x_{j+1})
sits at position id j; the drafter's output there predicts x_{j+2}. A pair is supervised when x_{j+2} is a real
assistant token (loss_mask = 1).

EAGLE-1 (Li et al., 2024): loss = w_reg * SmoothL1(f^_{j+1}, f_{j+1}) + w_cls * CE(p_{j+2}, q_{j+2}), where f is
the target's last hidden state, p = softmax(LM head(f_{j+1})) the target's next-token distribution and
q = softmax(LM head(f^_{j+1})) the drafter's (soft-label cross-entropy = KL(p || q) + H(p)). Optional uniform
noise U(-a, a) on the input features (the paper's robustness trick).

EAGLE-3 (Li et al., 2025), training-time test: the drafter is unrolled `steps` times over the whole sequence.
Step 0 reads the fused target features; step i >= 1 reads the drafter's own step i-1 output at the same anchor j,
with token x_{j+1+i}, at position j + i, and predicts x_{j+2+i}. Step i's query at anchor j attends to step 0's
keys at anchors <= j and to the keys of steps 1..i at anchor j only -- exactly what it sees when drafting i
tokens past a verified prefix ending at j (drafters.eagle.ttt_attention).
P-EAGLE (drafter.config.parallel_drafts = K): the same unrolling with `steps` = K, but step i >= 1 reads
placeholders (token id -1: the drafter's mask_embedding and mask_hidden) instead of x_{j+1+i} and its own step i-1
output: exactly what one drafting forward sees at depth i + 1, where neither is known yet.
COD (the P-EAGLE paper's down-sampling, as speculators trains it; `cod_ratio` r): in training, step i >= 1 runs only
ceil(n max(r^i, cod_min)) of the n anchors, the first of one random order (supervised anchors first, the same for
every row), so each is among the previous step's and its chain of steps stays whole (ttt_attention's `sizes`):
deep steps cost less. Held-out measurements run all.
Loss of step i: soft-label CE to the target's distribution over the draft vocabulary (the target's logits at the
draft ids, renormalised), weighted decay**i. A position whose target
greedy token has no draft id cannot be drafted right; it is left out of loss and accuracy and counted apart.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from drafters.eagle import EagleModel
from target.model import softcap, target_forward
from inference.tree import additive_mask
from train.objectives import LM_HEAD_CHUNK, next_token_supervised


def causal_mask(T: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[1, 1, T, T] additive: position t attends to positions <= t."""
    return additive_mask(torch.ones(T, T, dtype=torch.bool, device=device).tril(), dtype)


def supervised_pairs(loss_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool over anchors j: x_{j+2} is a real assistant token (pair j's first prediction is supervised)."""
    needed = next_token_supervised(loss_mask, attention_mask)  # [B, T]: x_{t+1} supervised
    valid = torch.zeros_like(needed)
    valid[:, :-1] = needed[:, 1:]
    return valid


def rank_hits(logits: torch.Tensor, labels: torch.Tensor, topk: int) -> torch.Tensor:
    """[topk] float64 on the CPU: rows of logits [M, N] whose rank-i entry is the row's label [M], per rank i."""
    ranks = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices                # [M, k]
    hits = torch.zeros(topk, dtype=torch.float64)
    hits[:ranks.shape[1]] = (ranks == labels[:, None]).sum(0).double().cpu()
    return hits


def soft_ce(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """-sum p log q per row: [M, N] each -> [M]."""
    return -(teacher_probs * F.log_softmax(student_logits.float(), dim=-1)).sum(-1)


class Eagle1Objective(nn.Module):
    """EAGLE-1 feature regression + classification (module docstring). stats: one row (CE sum, top-1 hits, count),
    a hit when the drafter's argmax is the target's greedy token."""

    def __init__(self, drafter: EagleModel, target: nn.Module, cls_weight: float = 0.1, reg_weight: float = 1.0,
                 feature_noise: float = 0.0):
        super().__init__()
        self.drafter = drafter
        self._target = [target]
        self.cls_weight, self.reg_weight, self.feature_noise = cls_weight, reg_weight, feature_noise
        self.topk, self.rank_hits = 0, None  # see Eagle3Objective

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, H]: the target's last hidden states from a feature cache (offline mode), else computed."""
        target, d = self._target[0], self.drafter
        dtype = d.fc.weight.dtype
        self.rank_hits = torch.zeros(1, self.topk, dtype=torch.float64)
        if hidden is None:
            with torch.no_grad():
                hidden = target_forward(target, input_ids, attention_mask, logits_at=0, use_cache=False).hidden_states
        f = hidden.to(dtype)                                                            # [B, T, H]
        valid = supervised_pairs(loss_mask, attention_mask)[:, :-1]                     # [B, T-1]
        x = f[:, :-1]
        if self.training and self.feature_noise > 0:
            x = x + (torch.rand_like(x) * 2 - 1) * self.feature_noise
        T = x.shape[1]
        pos = torch.arange(T, device=x.device)[None].expand(x.shape[0], T)
        pred = d(input_ids[:, 1:], x, pos, causal_mask(T, dtype, x.device))[valid]      # [M, H] f^_{j+1}
        true = f[:, 1:][valid]                                                          # [M, H] f_{j+1}
        m = true.shape[0]
        if m == 0:  # nothing supervised in this micro-batch: a zero loss that still touches every parameter
            return sum(p.sum() * 0 for p in d.parameters()), torch.zeros(1, 3, dtype=torch.float64)
        reg = F.smooth_l1_loss(pred.float(), true.float())
        ce_sum = hits = 0
        for p_chunk, t_chunk in zip(pred.split(LM_HEAD_CHUNK), true.split(LM_HEAD_CHUNK)):
            with torch.no_grad():
                teacher = torch.softmax(d.logits(t_chunk).float(), dim=-1)              # [m, V]
            student = d.logits(p_chunk)                                                 # [m, V]
            ce_sum = ce_sum + soft_ce(student, teacher).sum()
            labels = teacher.argmax(-1)                                                 # [m] the target's token
            hits += int((student.argmax(-1) == labels).sum())
            if self.topk:
                self.rank_hits[0] += rank_hits(student, labels, self.topk)
        loss = self.reg_weight * reg + self.cls_weight * ce_sum / m
        return loss, torch.tensor([[ce_sum.item(), hits, m]], dtype=torch.float64)


class Eagle3Objective(nn.Module):
    """EAGLE-3 training-time test (module docstring). stats: one row per step (CE sum, top-1 hits, count); the
    positions each step left out (supervised, but the target's token has no draft id: a certain miss) are counted
    in `self.outside` [steps] by the last call. With `topk` > 0 (held-out measurement) the last call also counts
    in `rank_hits` [steps, topk] the positions where the drafter's rank-i token is the target's (both objectives)."""

    def __init__(self, drafter: EagleModel, target: nn.Module, steps: int = 7, step_decay: float = 0.8,
                 cod_ratio: float | None = None, cod_min: float = 0.2):
        """cod_ratio r (training only): step i keeps max(r^i, cod_min) of the anchors (module docstring)."""
        super().__init__()
        self.drafter = drafter
        self._target = [target]
        self.steps, self.step_decay = steps, step_decay
        self.cod_ratio, self.cod_min = cod_ratio, cod_min
        self.outside = torch.zeros(steps, dtype=torch.float64)
        self.topk, self.rank_hits = 0, None

    def cod_anchors(self, n: int, supervised: torch.Tensor) -> tuple[torch.Tensor | None, list[int]]:
        """COD (P-EAGLE's down-sampling): one random order of the n anchors [n], those `supervised` [n] at step 1
        (in some row) first, and the anchors of every step [n, n_1, ..., n_{K-1}], n_i = ceil(n max(r^i, cod_min));
        step i runs the first n_i of the order, so each step's anchors are among the previous step's. Without COD
        or in eval mode (held-out measurements see every anchor): no order, and all n at every step."""
        if self.cod_ratio is None or not self.training:
            return None, [n] * self.steps
        sizes = [n] + [max(1, math.ceil(n * max(self.cod_ratio ** i, self.cod_min))) for i in range(1, self.steps)]
        key = torch.rand(n).to(supervised.device) - supervised.float()                 # supervised ones sort first
        return key.argsort(), sizes

    @torch.no_grad()
    def teacher(self, input_ids, attention_mask, loss_mask, features=None, hidden=None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The target's side: fused-layer features [B, T, F]; `row` [B, T] indexing `probs` [M, N] (the target's
        next-token distribution over the draft vocabulary at every position whose next token is supervised and
        whose greedy token has a draft id; -2 where it has none; -1 elsewhere) and `greedy` [M] (that token's draft
        id). `features`
        and `hidden` (the last hidden states [B, T, H]) come from a feature cache in offline mode."""
        target, d = self._target[0], self.drafter
        if features is None or hidden is None:
            out = target_forward(target, input_ids, attention_mask, logits_at=0, use_cache=False,
                                 feature_layers=d.config.feature_layers)
            features, hidden = out.features, out.hidden_states
        needed = next_token_supervised(loss_mask, attention_mask)                       # [B, T]
        head, ids = target.get_output_embeddings().weight, d.draft_ids()                # [V, H], [N]
        top, probs = [], []
        for chunk in hidden[needed].to(head.dtype).split(LM_HEAD_CHUNK):                # [m, H]
            logits = softcap(target.config, F.linear(chunk, head))                      # [m, V]
            top.append(logits.argmax(-1))
            probs.append(torch.softmax(logits[:, ids].float(), dim=-1))                 # [m, N]
        top = torch.cat(top) if top else ids.new_zeros(0)                               # [M0] target ids
        keep = d.t2d[top]                                                               # [M0]
        kept = needed.clone()
        kept[needed] = keep
        row = torch.full(needed.shape, -1, dtype=torch.long, device=needed.device)
        row[needed & ~kept] = -2
        row[kept] = torch.arange(int(keep.sum()), device=row.device)
        draft_of = torch.full((len(d.t2d),), -1, dtype=torch.long, device=ids.device)  # target id -> draft id
        draft_of[ids] = torch.arange(len(ids), device=ids.device)
        probs = torch.cat(probs)[keep] if probs else hidden.new_zeros(0, len(ids)).float()
        return features, row, probs, draft_of[top[keep]]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                features: torch.Tensor | None = None, hidden: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, T, F] / hidden [B, T, H]: from a feature cache (offline mode), else the target runs."""
        d = self.drafter
        features, row, probs, greedy = self.teacher(input_ids, attention_mask, loss_mask, features, hidden)
        B, T = input_ids.shape
        n = T - 1                                                                       # anchors j = 0..T-2
        dtype, device = d.fc.weight.dtype, input_ids.device
        h = d.fuse(features[:, :n])                                                     # [B, n, H]
        pad = input_ids.new_zeros(B, self.steps)
        tokens = torch.cat([input_ids, pad], dim=1)                                     # x_{j+1+i} for every i
        rows = torch.cat([row, row.new_full((B, self.steps), -1)], dim=1)
        cache, causal = DynamicCache(), causal_mask(n, dtype, device)
        loss = 0.0
        stats = torch.zeros(self.steps, 3, dtype=torch.float64)
        self.rank_hits = torch.zeros(self.steps, self.topk, dtype=torch.float64)
        parallel = bool(d.config.parallel_drafts)
        anchors, sizes = self.cod_anchors(n, (rows[:, 2:2 + n] >= 0).any(0))
        cod = anchors is not None
        for i in range(self.steps):
            # 1. step i's inputs at anchor j: token x_{j+1+i}, hidden = step i-1's output (step 0: fused features);
            # P-EAGLE's steps i >= 1: placeholders. COD: step i >= 1 runs the first sizes[i] anchors of one order
            at = anchors[:sizes[i]] if cod and i else torch.arange(n, device=device)    # [m]
            m_i = sizes[i]
            if cod and i:  # step 0 ran every anchor in order, step i - 1 the first sizes[i - 1] of `anchors`
                h = h[:, at] if i == 1 and not parallel else h[:, :m_i]
            pos = (at + i)[None].expand(B, m_i)
            step_tokens = tokens[:, 1 + i + at] if not (parallel and i) else tokens.new_full((B, m_i), -1)
            mask = causal[:, :, at] if cod and i else causal                            # [1, 1, m, n]
            out = d(step_tokens, h, pos, mask, cache, ttt=sizes[1:i + 1] if cod else True)  # [B, m, H]
            # 2. supervised where the target's next-token distribution at position j+1+i was kept
            r = rows[:, 1 + i + at]                                                     # [B, m]
            valid = r >= 0
            self.outside[i] = float((r == -2).sum())
            m = int(valid.sum())
            if m:
                logits, rows_i = d.logits(out[valid]), r[valid]                        # [m, N], [m]
                ce = soft_ce(logits, probs[rows_i])
                loss = loss + self.step_decay ** i * ce.mean()
                stats[i] = torch.tensor([ce.sum().item(), int((logits.argmax(-1) == greedy[rows_i]).sum()), m])
                if self.topk:
                    self.rank_hits[i] += rank_hits(logits, greedy[rows_i], self.topk)
            # 3. the training-time test: the next step reads this step's own output (P-EAGLE: the placeholder's)
            h = d.placeholder_hidden().expand(B, m_i, -1) if parallel else out
        if not isinstance(loss, torch.Tensor):  # nothing supervised: zero loss touching every parameter
            loss = sum(p.sum() * 0 for p in d.parameters())
        return loss, stats
