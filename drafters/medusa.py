"""Medusa-1 decoding heads (Cai et al., 2024, "Medusa: Simple LLM Inference Acceleration Framework with
Multiple Decoding Heads").

Head k reads the target's last hidden state h_t (after the final norm, the input of the target's LM head) and
predicts the token k + 2 positions ahead: head 0 -> x_{t+2}, head 1 -> x_{t+3}, ... (the target's own LM head
already gives x_{t+1}). Each head is L residual blocks x + SiLU(W x + b) followed by an LM head. W and b start
at zero, so a fresh head is the identity on h_t and its LM head (copied from the target's) predicts x_{t+1}:
training starts from the target's next-token head, as in the paper.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class MedusaConfig(PretrainedConfig):
    model_type = "draftsmith_medusa"

    def __init__(
        self,
        hidden_size: int = 576,
        vocab_size: int = 49152,
        num_heads: int = 4,
        num_layers: int = 1,
        share_lm_head: bool = False,
        target_name_or_path: str | None = None,
        target_revision: str | None = None,
        target_model_type: str | None = None,
        head_topk_accuracy: list[list[float]] | None = None,
        **kwargs,
    ):
        """head_topk_accuracy[k][i]: measured probability that head k's rank-i token is the right one (written by
        training, read by the tree builder)."""
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.share_lm_head = share_lm_head
        self.target_name_or_path = target_name_or_path
        self.target_revision = target_revision
        self.target_model_type = target_model_type
        self.head_topk_accuracy = head_topk_accuracy
        super().__init__(**kwargs)


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.act = nn.SiLU()
        nn.init.zeros_(self.linear.weight)  # identity at init: a fresh head is the target's next-token head
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


class MedusaModel(PreTrainedModel):
    config_class = MedusaConfig
    base_model_prefix = "medusa"
    main_input_name = "hidden_states"
    _no_split_modules = ["ResBlock"]

    def __init__(self, config: MedusaConfig):
        super().__init__(config)
        H, V = config.hidden_size, config.vocab_size
        # A fresh ResBlock per layer and head: `[ResBlock()] * n` would silently share one module's weights.
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(H) for _ in range(config.num_layers)]) for _ in range(config.num_heads)
        )
        self.lm_heads = None if config.share_lm_head else nn.ModuleList(
            nn.Linear(H, V, bias=False) for _ in range(config.num_heads)
        )
        self._target_lm_head: list[nn.Module] = []  # a plain list: the frozen target head is neither trained nor saved
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # ResBlocks zero themselves; LM heads are copied from the target in from_target

    @classmethod
    def from_target(cls, target: PreTrainedModel, num_heads: int = 4, num_layers: int = 1,
                    share_lm_head: bool = False, target_name_or_path: str | None = None) -> "MedusaModel":
        """Fresh heads sized for `target`, LM heads initialised from (or sharing) the target's."""
        tc = target.config.get_text_config()
        config = MedusaConfig(
            hidden_size=tc.hidden_size, vocab_size=tc.vocab_size, num_heads=num_heads, num_layers=num_layers,
            share_lm_head=share_lm_head, target_name_or_path=target_name_or_path or tc._name_or_path or None,
            target_revision=getattr(tc, "_commit_hash", None), target_model_type=tc.model_type,
        )
        model = cls(config)
        target_head = target.get_output_embeddings()
        if getattr(target_head, "bias", None) is not None:
            raise ValueError("the target's LM head has a bias; Medusa heads support bias-free LM heads only")
        if share_lm_head:
            model.attach_target(target)
        else:
            with torch.no_grad():
                for head in model.lm_heads:
                    head.weight.copy_(target_head.weight)
        return model.to(device=target_head.weight.device, dtype=target_head.weight.dtype)

    def check_target(self, target_config: PretrainedConfig) -> None:
        """Refuse a target whose hidden size or vocabulary differs from the one these heads were trained on."""
        tc = target_config.get_text_config()
        c = self.config
        problems = [f"{name}: drafter {mine}, target {theirs}" for name, mine, theirs in (
            ("hidden_size", c.hidden_size, tc.hidden_size), ("vocab_size", c.vocab_size, tc.vocab_size)
        ) if mine != theirs]
        if problems:
            raise ValueError(
                f"Medusa drafter (trained for target {c.target_name_or_path!r}) does not fit target "
                f"{tc._name_or_path!r}: {'; '.join(problems)}. Load the target the drafter was trained on."
            )

    def attach_target(self, target: PreTrainedModel) -> None:
        """Check compatibility and, for share_lm_head drafters, borrow the target's frozen LM head."""
        self.check_target(target.config)
        if self.config.share_lm_head:
            self._target_lm_head[:] = [target.get_output_embeddings()]

    def head_states(self, hidden_states: torch.Tensor, heads: int | None = None) -> list[torch.Tensor]:
        """hidden_states [..., H] -> tensors [..., H] of the first `heads` heads (default: all K), the inputs of
        their LM heads."""
        return [blocks(hidden_states) for blocks in self.blocks[:heads]]

    def head_logits(self, k: int, state: torch.Tensor) -> torch.Tensor:
        """state [..., H] -> logits [..., V] of head k."""
        if self.lm_heads is not None:
            return self.lm_heads[k](state)
        if not self._target_lm_head:
            raise RuntimeError("this drafter shares the target's LM head: call attach_target(target) first")
        return self._target_lm_head[0](state)

    def head_weight(self, k: int) -> torch.Tensor:
        """The [V, H] LM-head matrix head k projects with (its own, or the borrowed target head's)."""
        if self.lm_heads is not None:
            return self.lm_heads[k].weight
        if not self._target_lm_head:
            raise RuntimeError("this drafter shares the target's LM head: call attach_target(target) first")
        return self._target_lm_head[0].weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, T, H] -> logits [K, B, T, V]; logits[k, :, t] predicts x_{t+k+2}."""
        return torch.stack([self.head_logits(k, s) for k, s in enumerate(self.head_states(hidden_states))])
