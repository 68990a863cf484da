"""Draft LMs: small causal LMs that share the target's tokenizer, distilled from the target (DistillSpec, Zhou et
al., 2024; the "draft model" of Leviathan et al., 2023 and Chen et al., 2023).

A draft LM is an ordinary transformers causal LM, so no new model class is needed: `build_draft_lm` makes a
shallow model of the target's own family (its config with fewer layers), copies the target's embeddings, LM head
and final norm, and optionally some of its decoder layers (e.g. the first and the last, a common layer-skipping
initialisation). Any other causal LM with the target's vocabulary (e.g. a smaller sibling checkpoint) works too.
Training may update every weight or only LoRA adapters (peft); `save_draft` writes adapters or merged weights and
`load_draft_lm` reads either back.

Provenance lives in the config as `config.draftsmith = {"kind": "draft_lm", "target_name_or_path": ...,
"target_vocab_size": ..., "init_layers": ...}` and survives save_pretrained / from_pretrained.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

DRAFT_LM_KIND = "draft_lm"
ADAPTER_BASE_DIR = "base"  # where save_draft puts a base model that has no checkpoint of its own


# ---------------------------------------------------------------------------------------------------------------
# Building a draft LM from the target
# ---------------------------------------------------------------------------------------------------------------

def decoder_layers(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """(state-dict prefix, ModuleList) of the model's decoder layers: the base model's ModuleList with
    `num_hidden_layers` entries (`model.layers` in Llama/Qwen/Mistral/Gemma, `transformer.h` in GPT-2)."""
    base_name = model.base_model_prefix
    base = getattr(model, base_name, model)
    num_layers = model.config.get_text_config().num_hidden_layers
    found = [(name, child) for name, child in base.named_children()
             if isinstance(child, nn.ModuleList) and len(child) == num_layers]
    if len(found) != 1:
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__}: expected one ModuleList of "
            f"num_hidden_layers={num_layers} modules under `{base_name}`, found {[n for n, _ in found]}; "
            "this architecture is not supported by build_draft_lm (use an existing small checkpoint as the draft)"
        )
    name, layers = found[0]
    prefix = f"{base_name}.{name}." if base is not model else f"{name}."
    return prefix, layers


def _source_layers(num_layers: int, init_layers: list[int], target_layers: int) -> list[int]:
    """Target layer each draft layer takes its per-layer settings from: copied layers their source, fresh layers
    the target layer at the same index (wrapping around)."""
    return [init_layers[j] if j < len(init_layers) else j % target_layers for j in range(num_layers)]


def _draft_config(target: PreTrainedModel, num_layers: int, init_layers: list[int],
                  target_name_or_path: str | None) -> PretrainedConfig:
    """The target's config with `num_layers` layers. Per-layer lists (layer_types, mlp_layer_types,
    layer_rope_theta, ...: any list with one entry per target layer, token ids and architectures aside) are
    re-indexed by the draft's source layers."""
    tc = target.config
    if tc.get_text_config() is not tc:
        raise ValueError(f"target {type(target).__name__} has a composite (multimodal) config; build_draft_lm "
                         "supports text-only causal LMs")
    target_layers = tc.num_hidden_layers
    sources = _source_layers(num_layers, init_layers, target_layers)
    values = tc.to_dict()
    for key, value in values.items():
        per_layer = not (key == "architectures" or key.endswith(("token_id", "token_ids")))
        if per_layer and isinstance(value, list) and len(value) == target_layers:
            values[key] = [value[s] for s in sources]
    values["num_hidden_layers"] = num_layers
    values["draftsmith"] = {
        "kind": DRAFT_LM_KIND,
        "target_name_or_path": target_name_or_path or tc._name_or_path or None,
        "target_vocab_size": tc.vocab_size,
        "init_layers": list(init_layers),
    }
    config = type(tc).from_dict(values)
    config._name_or_path = ""  # the draft has no checkpoint yet (not the target's)
    config._attn_implementation = tc._attn_implementation
    return config


def _check_init_layers(init_layers: list[int], num_layers: int, target_layers: int) -> None:
    if num_layers < 1:
        raise ValueError(f"a draft LM needs num_layers >= 1, got {num_layers}")
    if len(init_layers) > num_layers:
        raise ValueError(f"init_layers={init_layers} copies {len(init_layers)} layers into a "
                         f"{num_layers}-layer draft; give at most num_layers indices")
    bad = [i for i in init_layers if not 0 <= i < target_layers]
    if bad:
        raise ValueError(f"init_layers {bad} are not layers of the target (it has {target_layers}: "
                         f"0..{target_layers - 1})")


@torch.no_grad()
def build_draft_lm(target: PreTrainedModel, num_layers: int, init_layers: list[int] | None = None,
                   target_name_or_path: str | None = None) -> PreTrainedModel:
    """A `num_layers`-layer causal LM of the target's own class. Every weight outside the decoder layers
    (embeddings, final norm, LM head; tied if the target ties them) is copied from the target; draft layer j is a
    copy of target layer `init_layers[j]` for j < len(init_layers), freshly initialised otherwise.
    Returns the draft in training mode, in the target's dtype, on the target's device."""
    init_layers = list(init_layers or [])
    _check_init_layers(init_layers, num_layers, target.config.num_hidden_layers)
    config = _draft_config(target, num_layers, init_layers, target_name_or_path)
    weight = target.get_input_embeddings().weight
    draft = type(target)(config).to(device=weight.device, dtype=weight.dtype)

    prefix, layers = decoder_layers(draft)
    target_state = target.state_dict()
    outside = {k: target_state[k] for k in draft.state_dict() if not k.startswith(prefix)}
    result = draft.load_state_dict(outside, strict=False)  # the decoder layers are not in `outside`
    if result.unexpected_keys or any(not k.startswith(prefix) for k in result.missing_keys):
        raise RuntimeError(f"copying {type(target).__name__} weights into the draft failed: unexpected "
                           f"{result.unexpected_keys}, missing {result.missing_keys}")
    _, target_layers = decoder_layers(target)
    for j, i in enumerate(init_layers):
        layers[j].load_state_dict(target_layers[i].state_dict())
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft.train().requires_grad_(True)


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary check
# ---------------------------------------------------------------------------------------------------------------

def check_draft_vocab(draft_config: PretrainedConfig, target_config: PretrainedConfig,
                      draft_tokenizer=None, target_tokenizer=None) -> None:
    """Refuse a draft whose vocabulary differs from the target's: a drafted token id must mean the same token to
    the target. Compares vocab_size, and token -> id maps when both tokenizers are given."""
    dc, tc = draft_config.get_text_config(), target_config.get_text_config()
    names = f"draft {dc._name_or_path or '(in memory)'!r} and target {tc._name_or_path or '(in memory)'!r}"
    if dc.vocab_size != tc.vocab_size:
        raise ValueError(
            f"vocabulary mismatch between {names}: vocab_size {dc.vocab_size} != {tc.vocab_size}. A draft LM must "
            "share the target's tokenizer; build one with build_draft_lm(target, ...) or pick a checkpoint of the "
            "target's model family"
        )
    if draft_tokenizer is not None and target_tokenizer is not None:
        dv, tv = draft_tokenizer.get_vocab(), target_tokenizer.get_vocab()
        if dv != tv:
            differ = sorted(set(dv.items()) ^ set(tv.items()), key=lambda kv: kv[1])[:5]
            raise ValueError(
                f"vocabulary mismatch between {names}: same size but different tokens, e.g. (token, id) "
                f"{differ}. A draft LM must share the target's tokenizer exactly"
            )


# ---------------------------------------------------------------------------------------------------------------
# LoRA, saving and loading
# ---------------------------------------------------------------------------------------------------------------

def default_lora_modules(model: PreTrainedModel) -> list[str]:
    """Names of the nn.Linear modules inside the decoder layers (attention and MLP projections: q_proj, k_proj,
    v_proj, o_proj, gate_proj, up_proj, down_proj in Llama/Qwen), so embeddings and the LM head stay frozen."""
    _, layers = decoder_layers(model)
    names = sorted({name.rsplit(".", 1)[-1] for name, m in layers.named_modules() if isinstance(m, nn.Linear)})
    if not names:
        raise ValueError(f"no nn.Linear modules in the decoder layers of {type(model).__name__}; "
                         "pass target_modules=[...] naming the projections to adapt")
    return names


def add_lora(model: PreTrainedModel, r: int = 8, alpha: int = 16, dropout: float = 0.0,
             target_modules: list[str] | None = None) -> PeftModel:
    """Wrap `model` with LoRA adapters (Hu et al., 2021): W x + (alpha / r) B A x, B = 0 at init. Only the adapters
    are trainable. target_modules: module names to adapt; default: every linear projection in the decoder layers."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=target_modules or default_lora_modules(model))
    return get_peft_model(model, config)


def save_draft(model: PreTrainedModel | PeftModel, path: str | Path, merged: bool) -> None:
    """Save a draft LM. merged=True: full weights, adapters (if any) merged in, loadable without peft.
    merged=False: LoRA adapters only; when the base model has no checkpoint of its own (e.g. it came from
    build_draft_lm), it is saved under `path/base/` and the adapter config points there.
    The model passed in is left untouched (merging works on a copy)."""
    path = Path(path)
    if merged:
        plain = copy.deepcopy(model).merge_and_unload() if isinstance(model, PeftModel) else model
        plain.save_pretrained(path)
        return
    if not isinstance(model, PeftModel):
        raise ValueError(f"save_draft(merged=False) saves LoRA adapters, but this {type(model).__name__} has none; "
                         "use merged=True to save its full weights")
    peft_config = model.peft_config[model.active_adapter]
    base_id = peft_config.base_model_name_or_path
    if not base_id:
        copy.deepcopy(model).unload().save_pretrained(path / ADAPTER_BASE_DIR)  # base weights, LoRA layers removed
        peft_config.base_model_name_or_path = ADAPTER_BASE_DIR  # relative: resolved against `path` when loading
    try:
        # save_embedding_layers=False: the vocabulary is never resized (it must stay the target's), and peft's
        # "auto" check would look the relative base path up on the Hub.
        model.save_pretrained(path, save_embedding_layers=False)
    finally:
        peft_config.base_model_name_or_path = base_id


def check_complete(loading_info: dict, path) -> None:
    """Refuse weights that from_pretrained did not find in the folder: they would be random."""
    missing = sorted(loading_info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ValueError(f"{path} lacks weights for {shown}; they would be random")


def _adapter_base(path: Path) -> str:
    """The base model an adapter folder names: `base/` inside it, or a checkpoint path / Hub id."""
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path / 'adapter_config.json'} names no base model (base_model_name_or_path); "
                         "re-save the draft with draftsmith's save_draft")
    return str(path / base) if (path / base).is_dir() else base


def load_draft_lm(path: str | Path, target: PreTrainedModel | None = None, trainable: bool = False,
                  **kwargs) -> PreTrainedModel | PeftModel:
    """Load a draft LM saved by save_draft: full weights, or an adapter folder (its base model loaded first).
    With `target`, refuse a vocabulary mismatch. Returns a PeftModel for adapters (trainable if asked), else the
    causal LM; in eval mode unless trainable. kwargs go to from_pretrained (e.g. dtype)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        base = AutoModelForCausalLM.from_pretrained(_adapter_base(path), **kwargs)
        model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
        config = base.config
    else:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
        check_complete(info, path)
        config = model.config
    if target is not None:
        check_draft_vocab(config, target.config)
    return model.train() if trainable else model.eval()
