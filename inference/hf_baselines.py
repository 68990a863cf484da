"""transformers' own assisted generation and prompt lookup, timed beside draftsmith's loop on the same prompts:
the comparison points for its speed."""
from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel

from .speculative import GenerationResult


class ForwardCounter:
    """Counts calls of a model's forward (transformers' assisted generation does not report them)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1


@torch.no_grad()
def hf_assisted_generate(target: PreTrainedModel, input_ids: torch.Tensor, max_new_tokens: int, eos: set[int],
                         temperature: float, counter: ForwardCounter, **assist) -> GenerationResult:
    """transformers' own assisted generation as a user would call it, the comparison point for draftsmith's loop:
    assist is assistant_model=draft (its default draft-length schedule), or prompt_lookup_num_tokens and
    max_matching_ngram_size (its prompt lookup, without a draft)."""
    start, calls = time.perf_counter(), counter.calls
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    out = target.generate(input_ids[None], attention_mask=torch.ones_like(input_ids)[None], **assist,
                          max_new_tokens=max_new_tokens, eos_token_id=sorted(eos),
                          pad_token_id=sorted(eos)[0], **sampling)
    tokens = out[0, len(input_ids):].tolist()
    return GenerationResult(tokens, forwards=counter.calls - calls, seconds=time.perf_counter() - start)


def hf_assistant_settings(draft: PreTrainedModel) -> dict:
    """The assisted-generation settings transformers used: the draft's generation config, else its defaults."""
    config = draft.generation_config
    defaults = getattr(config, "_get_default_generation_params", dict)()
    names = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    return {n: getattr(config, n, None) if getattr(config, n, None) is not None else defaults.get(n) for n in names}


