"""Engine layouts of Medusa heads and EAGLE-1 drafters (train/export.py writes them; docs/export.md names the
loader code each follows).

Medusa -> vLLM's MedusaModel (vllm/model_executor/models/medusa.py, configs/medusa.py): head k's residual blocks
    blocks.k.j.linear.* become blocks.k.layers.j.* (medusa_fc_bias: true), its LM head lm_heads.k.weight; heads
    that borrow the target's LM head get it written once as lm_heads.0.weight with original_lm_head: true.
EAGLE-1 -> SGLang's LlamaForCausalLMEagle (srt/models/llama_eagle.py) and vLLM's EagleLlamaForCausalLM
    (model_executor/models/llama_eagle.py; vLLM prefixes "Eagle" to the LlamaForCausalLM architecture): fc.* and
    the layer as layers.0.* (no input_layernorm: EAGLE-1 drops it). Both engines take the target's embedding and
    LM head. vLLM's fc has no bias: a zero fc.bias is left out (exact), any other is refused.
"""
from __future__ import annotations

import torch

from train.export import (ATTN_BIASES, LLAMA_LIKE_FAMILIES, MLP_BIASES, Drafter, ExportRefused, Layout,
                          check_biases, expected_shapes, llama_fields, missing_target_keys)


def head_layout(d: Drafter, fmt: str, target_source: str | None) -> Layout:
    """The `fmt` layout of a Medusa or EAGLE-1 drafter, or ExportRefused."""
    if d.config.get("model_type") == "draftsmith_medusa":
        return medusa_vllm(d, fmt, target_source)
    return eagle1_layout(d, fmt)


def check_tensors(d: Drafter, want: dict[str, tuple[int, ...]], optional: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor present with its shape; none the layout has no place for."""
    have = {n: tuple(t.shape) for n, t in d.tensors.items()}
    problems = [f"{n} missing" for n in want if n not in have]
    problems += [f"{n} {list(have[n])}, expected {list(s)}" for n, s in {**want, **optional}.items()
                 if n in have and have[n] != s]
    problems += [f"{n} has no place in the layout" for n in sorted(set(have) - set(want) - set(optional))]
    if problems:
        raise ExportRefused(f"{d.folder}: the weights do not match config.json: {'; '.join(problems)}. Export a "
                            f"drafter saved by draftsmith with the config it was trained with")


# --- Medusa -------------------------------------------------------------------------------------------------------


def medusa_name(name: str) -> str:
    """draftsmith's blocks.{head}.{block}.linear.{weight,bias} -> vLLM's blocks.{head}.layers.{block}.{...}."""
    _, head, block, _, param = name.split(".")
    return f"blocks.{head}.layers.{block}.{param}"


def medusa_vllm(d: Drafter, fmt: str, target_source: str | None) -> Layout:
    from train.export import target_weight

    c, where = d.config, d.folder / "config.json"
    if fmt != "vllm":
        raise ExportRefused(f"{where}: Medusa heads have no {fmt} layout (SGLang serves no Medusa heads): export with "
                            f"--format vllm")
    H, V, K, L = c["hidden_size"], c["vocab_size"], c["num_heads"], c["num_layers"]
    blocks = {f"blocks.{k}.{j}.linear.{p}": (H, H) if p == "weight" else (H,)
              for k in range(K) for j in range(L) for p in ("weight", "bias")}
    heads = {} if c.get("share_lm_head") else {f"lm_heads.{k}.weight": (V, H) for k in range(K)}
    check_tensors(d, {**blocks, **heads}, {})
    tensors = {medusa_name(name): (name, d.tensors[name], "") for name in blocks}
    tensors |= {name: (name, d.tensors[name], "") for name in heads}
    if c.get("share_lm_head"):  # vLLM reads one shared head from the checkpoint (original_lm_head)
        tensors["lm_heads.0.weight"] = ("(target) lm_head", target_weight(d, target_source, (V, H), output=True),
                                        "the target's, read once for every head")
    config = {"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": H, "vocab_size": V,
              "num_heads": K, "num_hidden_layers": L, "truncated_vocab_size": V, "medusa_fc_bias": True,
              "original_lm_head": bool(c.get("share_lm_head")), "max_paths": 64, "topk": 10}
    return Layout("vllm", tensors, config, ["vLLM's Medusa proposes each head's top-1 token (no tree)"])


# --- EAGLE-1 ------------------------------------------------------------------------------------------------------


def eagle1_shapes(target: dict) -> dict[str, tuple[int, ...]]:
    """draftsmith's EAGLE-1 tensors: fc 2H -> H with bias, one decoder layer without input_layernorm."""
    H = target["hidden_size"]
    layer = {n: s for n, s in expected_shapes(target, 1, 1).items()
             if n.startswith("midlayer.") and not n.endswith(("input_layernorm.weight", "hidden_norm.weight"))}
    layer |= {n: (s[0], H) for n, s in layer.items() if n.split(".")[-2] in ("q_proj", "k_proj", "v_proj")}
    return {"fc.weight": (H, 2 * H), "fc.bias": (H,), **layer}


def eagle1_layout(d: Drafter, fmt: str) -> Layout:
    where, t = d.folder / "config.json", d.config.get("target_config") or {}
    missing = missing_target_keys(t)
    if missing:
        raise ExportRefused(f"{where}: {missing} missing; the file is incomplete: save the drafter again")
    act = t.get("hidden_act", t.get("hidden_activation"))
    if t["model_type"] not in LLAMA_LIKE_FAMILIES or act != "silu":
        raise ExportRefused(f"{where}: the drafter's layer is a {t['model_type']!r} layer with {act}; "
                            f"{fmt}'s EAGLE-1 layer is a Llama layer (silu), known to match for "
                            f"{LLAMA_LIKE_FAMILIES}. Train for a Llama-family target")
    shapes = eagle1_shapes(t)
    optional = {n: shapes[n.replace(".bias", ".weight")][:1] for n in ATTN_BIASES + MLP_BIASES}
    check_tensors(d, shapes, optional)
    check_biases(d, fmt)
    tensors = {n.replace("midlayer.", "layers.0."): (n, w, "") for n, w in d.tensors.items()}
    notes = []
    if fmt == "vllm":
        bias = d.tensors["fc.bias"]
        if bool(bias.any()):
            raise ExportRefused(f"{d.folder}: fc.bias is not zero (max |b| {bias.abs().max().item():.3g}); vLLM's "
                                f"EAGLE-1 fc has no bias (llama_eagle.py) and would drop it. Export with --format "
                                f"sglang, whose fc has one")
        del tensors["fc.bias"]
        notes.append("fc.bias is zero: left out (vLLM's EAGLE-1 fc has none)")
    vocab = (d.config.get("draftsmith") or {}).get("draft_vocab")
    if vocab:
        notes.append(f"the drafter was evaluated over a {len(vocab):,}-token draft vocabulary; the engines draft "
                     f"over the whole vocabulary (lossless either way)")
    arch = "LlamaForCausalLMEagle" if fmt == "sglang" else "LlamaForCausalLM"
    # "bias": whether fc has one, as SafeAILab's EaModel reads it (default true); the engines ignore the key
    return Layout(fmt, tensors, {"architectures": [arch], **llama_fields(d), "bias": "fc.bias" in tensors}, notes)
