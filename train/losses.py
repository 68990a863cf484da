"""Distillation losses between the target (teacher, distribution p) and a draft LM (student, distribution q).

All take logits over the same positions, [..., V] each, and return a masked mean over positions. The divergences
follow DistillSpec (Zhou et al., 2024, "DistillSpec: Improving Speculative Decoding via Knowledge Distillation"),
whose point is that the divergence to minimise should match how the drafter is used: total variation distance
bounds the acceptance rate of speculative sampling directly (acceptance = 1 - TVD(p, q)).

  forward_kl   KL(p || q) = sum_v p log(p / q)          (mode-covering; classic KD)
  reverse_kl   KL(q || p) = sum_v q log(q / p)          (mode-seeking)
  tvd          1/2 sum_v |p - q|                        (in [0, 1])
  jsd          generalised JSD(beta) as in GKD (Agarwal et al., 2024) and TRL's generalized_jsd_loss:
               beta KL(p || m) + (1 - beta) KL(q || m), with m = beta p + (1 - beta) q
               (beta weighs the teacher; beta = 0.5 is the symmetric Jensen-Shannon divergence. At beta = 0 or 1
               the value is identically 0: use forward_kl / reverse_kl for those limits.)
  ce           cross-entropy of the student on given labels (hard targets, e.g. the target's own tokens)

Temperature T is applied to BOTH teacher and student (p = softmax(z_p / T), q = softmax(z_q / T)): the draft is
matched to the target's distribution at the temperature it will be sampled at, as DistillSpec does. There is no
T^2 rescaling. `ce` always uses the student's logits at T = 1. The teacher gets no gradient.

Memory: the log-probabilities are computed once per side ([M, V] each, M = masked-in positions) and shared by
every loss; with `normalizer`, chunks of positions can be passed separately and their losses summed to the
same value as one call over all positions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position: log_p, log_q [M, V] -> [M]."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(q || p) per position: [M, V] -> [M]."""
    return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)


def total_variation(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """TVD(p, q) = 1/2 sum_v |p - q| per position: [M, V] -> [M], in [0, 1]."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def generalized_jsd(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, per position: [M, V] -> [M]."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta={beta} must lie strictly between 0 and 1 (at 0 or 1 JSD(beta) is 0); "
                         "use the forward_kl or reverse_kl loss for those limits")
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))  # [M, V]
    return beta * forward_kl(log_p, log_m) + (1.0 - beta) * forward_kl(log_q, log_m)


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "tvd": total_variation, "jsd": generalized_jsd}
LOSS_NAMES = (*DIVERGENCES, "ce")


def _check_weights(weights: dict[str, float], labels: torch.Tensor | None) -> None:
    unknown = sorted(set(weights) - set(LOSS_NAMES))
    if unknown:
        raise ValueError(f"unknown distillation loss(es) {unknown}; known: {', '.join(LOSS_NAMES)}")
    if not weights:
        raise ValueError(f"distill_loss needs at least one weighted loss among {', '.join(LOSS_NAMES)}")
    bad = {name: w for name, w in weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise ValueError(f"distillation loss weights must be finite and >= 0, got {bad}")
    if "ce" in weights and labels is None:
        raise ValueError("the 'ce' loss needs labels [N] (the tokens to predict); pass labels=... or drop 'ce'")


def _rows(x: torch.Tensor | None, keep: torch.Tensor | None, width: int | None) -> torch.Tensor | None:
    """[..., (V)] -> [N, (V)] -> the masked-in rows [M, (V)] (no copy when every row is kept)."""
    if x is None:
        return None
    x = x.reshape(-1, width) if width is not None else x.reshape(-1)
    return x if keep is None else x[keep]


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, mask: torch.Tensor | None,
                 weights: dict[str, float], temperature: float = 1.0, labels: torch.Tensor | None = None,
                 jsd_beta: float = 0.5, normalizer: float | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = sum_name weights[name] * masked mean of loss `name`; names from LOSS_NAMES.

    student_logits, teacher_logits: [..., V] (e.g. [N, V] or [B, T, V]); teacher_logits may be None when only
    'ce' is weighted (no divergence reads it); mask: [...] bool/0-1, None = all;
    labels: [...] token ids, needed for 'ce'; jsd_beta: the teacher's weight in JSD(beta);
    normalizer: divide sums by this instead of the mask count (pass the total count when chunking).
    Returns (loss, {name: unweighted masked mean, detached}). With no masked-in position (and no normalizer)
    every part is 0 and the loss is a 0 that still has a (zero) gradient.
    """
    _check_weights(weights, labels)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0 (the number of masked-in positions over all chunks), "
                         f"got {normalizer}")
    if teacher_logits is None:
        if any(name != "ce" for name in weights):
            raise ValueError(f"losses {sorted(n for n in weights if n != 'ce')} compare with the teacher: pass "
                             "teacher_logits (only 'ce' works without them)")
    elif student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape [..., V]")
    V = student_logits.shape[-1]
    keep = None if mask is None else mask.reshape(-1).bool()
    if keep is not None and keep.numel() * V != student_logits.numel():
        raise ValueError(f"mask {tuple(mask.shape)} must cover the logits' positions "
                         f"{tuple(student_logits.shape[:-1])}")
    if keep is not None and bool(keep.all()):
        keep = None
    t = None if teacher_logits is None else _rows(teacher_logits.detach(), keep, V)
    s, y = _rows(student_logits, keep, V), _rows(labels, keep, None)
    count = normalizer if normalizer is not None else max(s.shape[0], 1)

    dtype = torch.promote_types(s.dtype, torch.float32)  # upcast bf16/fp16; keep float64 as is
    log_q = F.log_softmax(s.to(dtype) / temperature, dim=-1)  # [M, V]
    log_p = None if t is None else F.log_softmax(t.to(dtype) / temperature, dim=-1)  # [M, V]
    parts = {}
    for name in weights:
        if name == "ce":
            log_q1 = log_q if temperature == 1.0 else F.log_softmax(s.to(dtype), dim=-1)
            per_position = F.nll_loss(log_q1, y, reduction="none")
        elif name == "jsd":
            per_position = generalized_jsd(log_p, log_q, jsd_beta)
        else:
            per_position = DIVERGENCES[name](log_p, log_q)
        parts[name] = per_position.sum() / count  # [M] -> scalar
    loss = sum(weights[name] * value for name, value in parts.items())  # M = 0: a 0 still tied to the logits
    return loss, {name: value.detach() for name, value in parts.items()}
