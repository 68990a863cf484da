"""Training objectives: what a drafter is asked to predict, and the loss. The DeepSpeed engine wraps the objective
module (which holds the drafter as its only submodule); the frozen target is kept outside it, in a plain list.
Every objective maps input_ids, attention_mask, loss_mask [B, T] to (loss, stats [rows, 3]), stats holding
(loss sum, top-1 hits, count) per row (per head for Medusa, one row for a draft LM).

Medusa (Cai et al., 2024): head k (0-based) reads the target's last hidden state h_t and predicts token x_{t+k+2}.
With `labels="target"` its label is the target's own greedy token at position t+k+1, argmax p(. | x_{<=t+k+1}),
i.e. what greedy verification would accept there (self-distillation on the data's prefixes); with
`labels="data"` it is the data token x_{t+k+2}. A (k, t) pair counts only if x_{t+k+2} is a real assistant
token (loss_mask = 1). loss = sum_k decay**k * CE_k, CE_k the mean over head k's positions.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from drafters import MedusaModel
from drafters.vocab import draft_ids, vocab_head
from target.model import lm_logits, softcap, target_forward
from train.losses import distill_loss

IGNORE = -100  # label of a (head, position) pair that is not supervised
LM_HEAD_CHUNK = 1024  # rows per target LM-head call when computing greedy labels: bounds the [rows, V] logits


def supervised_mask(loss_mask: torch.Tensor, attention_mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T] masks -> valid [K, B, T]: head k at position t predicts x_{t+k+2}, a real assistant token."""
    B, T = loss_mask.shape
    wanted = loss_mask.bool() & attention_mask.bool()  # [B, T]
    real = attention_mask.bool()
    valid = torch.zeros(num_heads, B, T, dtype=torch.bool, device=loss_mask.device)
    for k in range(num_heads):
        if T > k + 2:
            valid[k, :, : T - k - 2] = wanted[:, k + 2:] & real[:, : T - k - 2]
    return valid


def next_token_supervised(loss_mask: torch.Tensor, attention_mask: torch.Tensor, all_positions: bool = False
                          ) -> torch.Tensor:
    """[B, T] bool: positions t whose next token x_{t+1} is supervised (an assistant token, or with all_positions
    any real token)."""
    wanted = attention_mask[:, 1:].bool() if all_positions else loss_mask[:, 1:].bool()
    needed = torch.zeros_like(loss_mask, dtype=torch.bool)
    needed[:, :-1] = wanted & attention_mask[:, 1:].bool()
    return needed


@torch.no_grad()
def greedy_next_tokens(target: nn.Module, hidden: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
    """The target's greedy next token where `needed` [B, T] is set, IGNORE elsewhere -> [B, T].

    hidden [B, T, H] is the target's last hidden state (the LM head's input); logits are computed only at the
    needed positions, LM_HEAD_CHUNK rows at a time, never as a [B, T, V] tensor.
    """
    lm_head = target.get_output_embeddings()
    out = torch.full(needed.shape, IGNORE, dtype=torch.long, device=hidden.device)
    rows = hidden[needed]  # [M, H]
    tokens = [lm_head(chunk).argmax(-1) for chunk in rows.split(LM_HEAD_CHUNK)]
    out[needed] = torch.cat(tokens) if tokens else out.new_empty(0)
    return out


@torch.no_grad()
def medusa_labels(target: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                  attention_mask: torch.Tensor, num_heads: int, labels: str) -> torch.Tensor:
    """Labels [K, B, T] of every head at every position (IGNORE where not supervised). See the module docstring."""
    valid = supervised_mask(loss_mask, attention_mask, num_heads)  # [K, B, T]
    out = torch.full(valid.shape, IGNORE, dtype=torch.long, device=input_ids.device)
    T = input_ids.shape[1]
    if labels == "data":
        source, shift = input_ids, 2  # x_{t+k+2}
    elif labels == "target":
        # greedy tokens at t+k+1 for every supervised (k, t) = the positions whose next token is supervised
        source, shift = greedy_next_tokens(target, hidden, next_token_supervised(loss_mask, attention_mask)), 1
    else:
        raise ValueError(f"labels={labels!r}: use 'target' (the target's greedy tokens) or 'data'")
    for k in range(num_heads):
        n = T - k - shift  # positions t whose label index t + k + shift is inside the sequence
        if n > 0:
            out[k, :, :n] = torch.where(valid[k, :, :n], source[:, k + shift:], IGNORE)
    return out


def head_logits_at_labels(drafter: MedusaModel, hidden: torch.Tensor, labels: torch.Tensor
                          ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (k, logits [N_k, V], labels [N_k]) for every head, at its supervised positions only.

    The positions any head needs are gathered first (hidden [B, T, H] -> [N, H]), so the heads' blocks and LM
    heads never run on padding or unsupervised positions and no [K, B, T, V] tensor exists.
    """
    dtype = next(drafter.parameters()).dtype
    used = (labels != IGNORE).any(0)  # [B, T]
    states = drafter.head_states(hidden[used].to(dtype))  # K x [N, H]
    for k, state in enumerate(states):
        y = labels[k][used]  # [N]
        keep = y != IGNORE
        yield k, drafter.head_logits(k, state[keep]), y[keep]


def medusa_loss(drafter: MedusaModel, hidden: torch.Tensor, labels: torch.Tensor, head_decay: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """loss = sum_k head_decay**k * mean CE of head k, and stats [K, 3] = (CE sum, top-1 correct, count) per head.

    A head with no supervised position adds 0 (with a zero gradient) rather than NaN.
    """
    loss = 0.0
    stats = torch.zeros(labels.shape[0], 3, dtype=torch.float64, device=hidden.device)
    for k, logits, y in head_logits_at_labels(drafter, hidden, labels):
        ce_sum = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y, reduction="sum")
        n = y.numel()
        loss = loss + head_decay ** k * ce_sum / max(n, 1)
        stats[k, 0], stats[k, 1], stats[k, 2] = ce_sum.detach(), (logits.argmax(-1) == y).sum(), n
    return loss, stats


class MedusaObjective(nn.Module):
    """The module DeepSpeed trains: the drafter (its only submodule) plus the frozen target it reads."""

    def __init__(self, drafter: MedusaModel, target: nn.Module, head_decay: float = 0.8, labels: str = "target"):
        super().__init__()
        if labels not in ("target", "data"):
            raise ValueError(f"labels={labels!r}: use 'target' (the target's greedy tokens) or 'data'")
        self.drafter = drafter
        self._target = [target]  # a plain list: the target is neither trained, saved nor wrapped by DeepSpeed
        self.head_decay = head_decay
        self.labels = labels

    @property
    def target(self) -> nn.Module:
        return self._target[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask, loss_mask [B, T] -> (loss [], stats [K, 3]) (see medusa_loss)."""
        with torch.no_grad():
            hidden = target_forward(self.target, input_ids, attention_mask, logits_at=0, use_cache=False
                                    ).hidden_states  # [B, T, H]
            labels = medusa_labels(self.target, hidden, input_ids, loss_mask, attention_mask,
                                   self.drafter.config.num_heads, self.labels)  # [K, B, T]
        return medusa_loss(self.drafter, hidden, labels, self.head_decay)


@torch.no_grad()
def head_topk_accuracy(drafter: MedusaModel, target: nn.Module, batches: Iterable[dict], topk: int = 10
                       ) -> list[list[float]]:
    """acc[k][i]: share of head k's supervised positions where its rank-i token is the target's greedy token
    (not cumulative; rows sum to top-k accuracy). `batches` yield input_ids/attention_mask/loss_mask [B, T]."""
    K = drafter.config.num_heads
    topk = min(topk, drafter.config.vocab_size)
    hits = torch.zeros(K, topk, dtype=torch.float64)
    count = torch.zeros(K, dtype=torch.float64)
    for batch in batches:
        hidden = target_forward(target, batch["input_ids"], batch["attention_mask"], logits_at=0,
                                use_cache=False).hidden_states
        labels = medusa_labels(target, hidden, batch["input_ids"], batch["loss_mask"], batch["attention_mask"],
                               K, "target")
        for k, logits, y in head_logits_at_labels(drafter, hidden, labels):
            ranks = logits.topk(topk, dim=-1).indices  # [N_k, topk]
            hits[k] += (ranks == y[:, None]).sum(0).double().cpu()
            count[k] += y.numel()
    return (hits / count.clamp(min=1)[:, None]).tolist()


class DraftLMObjective(nn.Module):
    """Distillation of a draft LM from the target (DistillSpec, Zhou et al., 2024): at every position t whose next
    token x_{t+1} is a supervised assistant token (positions="assistant"), or any real token (positions="all": the
    teacher's distribution is a valid target after prompt tokens too, 4x the signal on chat data), the draft's
    next-token distribution q(. | x_{<=t}) is pulled towards the target's p(. | x_{<=t}) by the configured mix of
    divergences (train/losses.py); 'ce' uses the data token x_{t+1} as label (on self-distilled data: the target's
    own text). Logits exist only at those positions.

    With 'ce' alone the target never runs (its distribution is not needed): on self-distilled data a step then
    costs the draft's forward and backward only, and top-1 hits are counted against the data token.
    vocab (FR-Spec, as the draft LM drafts at inference): the draft's logits cover those token ids only (its LM
    head's rows), the teacher's are restricted to the same ids (softmax renormalised over them, as EAGLE-3 does),
    and positions whose next token lies outside are left out, counted in `self.outside` (cumulative).
    stats: one row, (loss sum, positions where the draft's argmax is the target's (teacher-free: the data
    token), positions)."""

    def __init__(self, drafter: nn.Module, target: nn.Module, weights: dict[str, float], temperature: float = 1.0,
                 jsd_beta: float = 0.5, positions: str = "assistant", vocab: list[int] | None = None):
        super().__init__()
        if positions not in ("assistant", "all"):
            raise ValueError(f"positions={positions!r}: use 'assistant' (next token is an assistant token) or 'all'")
        self.drafter = drafter  # a causal LM, or a peft model around one
        self._target = [target]
        self.weights = {name: w for name, w in weights.items() if w != 0}  # a 0-weighted loss adds nothing
        self.temperature, self.jsd_beta, self.positions = temperature, jsd_beta, positions
        self.teacher_free = set(self.weights) == {"ce"}
        vocab_size = unwrap(drafter).get_output_embeddings().weight.shape[0]
        self.vocab = self.draft_id = None
        if vocab is not None:
            self.vocab = draft_ids(vocab, vocab_size)                                     # [N] target ids
            self.draft_id = torch.full((vocab_size,), -1, dtype=torch.long)              # [V] target id -> draft id
            self.draft_id[self.vocab] = torch.arange(len(self.vocab))
        self.outside = 0

    @property
    def target(self) -> nn.Module:
        return self._target[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        needed = next_token_supervised(loss_mask, attention_mask, self.positions == "all")  # [B, T]
        labels = input_ids[:, 1:][needed[:, :-1]]                                          # [M] next tokens
        rows = None
        if self.vocab is not None:  # keep positions whose next token has a draft id; labels -> draft ids
            mapped = self.draft_id.to(labels.device)[labels]                              # [M]
            inside = mapped >= 0
            self.outside += int((~inside).sum())
            needed = needed.clone()
            needed[needed.clone()] = inside
            labels, rows = mapped[inside], self.vocab.to(labels.device)
        teacher = None
        if not self.teacher_free:
            with torch.no_grad():
                hidden = target_forward(self.target, input_ids, attention_mask, logits_at=0, use_cache=False
                                        ).hidden_states                                  # [B, T, H]
                teacher = _logits(self.target, hidden[needed], rows)                     # [M, V or N]
        draft = unwrap(self.drafter)
        draft_hidden = target_forward(draft, input_ids, attention_mask, logits_at=0, use_cache=False).hidden_states
        student = _logits(draft, draft_hidden[needed], rows)                               # [M, V or N]
        loss, _ = distill_loss(student, teacher, None, self.weights, self.temperature, labels, self.jsd_beta)
        m = labels.numel()
        hits = int((student.argmax(-1) == (labels if teacher is None else teacher.argmax(-1))).sum())
        return loss, torch.tensor([[loss.item() * m, hits, m]], dtype=torch.float64)


def _logits(model: nn.Module, hidden: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The model's logits for hidden [M, H]: over the whole vocabulary [M, V], or only the token ids `rows` [M, N]
    (those rows of its LM head)."""
    if rows is None:
        return lm_logits(model, hidden)
    return softcap(model.config, F.linear(hidden, *vocab_head(model, rows)))


def unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside a peft model (its LoRA layers are injected in place), or the model itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


@torch.no_grad()
def draft_agreement(draft: nn.Module, target: nn.Module, batches: Iterable[dict], vocab: list[int] | None = None
                    ) -> float:
    """Share of supervised positions where the draft's greedy next token is the target's (greedy acceptance of
    the first drafted token, measured on held-out text). vocab: the draft's argmax is taken over those token ids
    only, as it drafts at inference (FR-Spec)."""
    draft = unwrap(draft)
    head = draft.get_output_embeddings().weight
    rows = None if vocab is None else draft_ids(vocab, head.shape[0], head.device)     # [N]
    hits = count = 0
    for batch in batches:
        ids, am, lm = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        needed = next_token_supervised(lm, am)
        t = lm_logits(target, target_forward(target, ids, am, logits_at=0, use_cache=False).hidden_states[needed])
        h = target_forward(draft, ids, am, logits_at=0, use_cache=False).hidden_states[needed]
        d = _logits(draft, h, rows).argmax(-1)                                            # [M] ids or rows' indices
        d = d if rows is None else rows[d]
        hits += int((t.argmax(-1) == d).sum())
        count += int(needed.sum())
    return hits / max(count, 1)
