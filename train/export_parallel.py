"""Engine layouts of parallel drafters (train/export.py writes them; docs/export.md names the loader code each
follows).

DFlash -> the reference layout (z-lab/dflash, read by SGLang's DFLASH: srt/models/dflash.py and
    srt/speculative/dflash_utils.py; by transformers with z-lab's remote code): fc, hidden_norm, layers.*, norm
    under their own names (fc's column blocks in layer order, as for EAGLE-3: the ids are written sorted, which
    list order and layer order then agree on), config.json a Qwen3 config with block_size and dflash_config
    {mask_token_id, target_layer_ids (layer outputs, as draftsmith's)}. --format vllm writes speculators' "dflash" layout (what
    its converter makes of the reference one: speculators/convert/dflash/converter.py), whose
    aux_hidden_state_layer_ids are hidden_states indices (i + 1). Both engines run Qwen3 layers: a drafter trained
    with other layers is refused. Neither checkpoint holds the embedding or LM head: the engines take the target's.
P-EAGLE -> speculators' "peagle" layout (PEagleSpeculator, read by vLLM): the EAGLE-3 vllm layout with mask_hidden
    [1, 1, F] and the mask token in the drafter's own embed_tokens. draftsmith's placeholder token is a vector of
    its own (mask_embedding), so it is written into embed_tokens at mask_token_id (default: the target's pad, else
    eos token); that row is the drafter's input wherever the token appears, which only changes what it drafts.
"""
from __future__ import annotations

import torch

from train.export import (Drafter, ExportRefused, Layout, engine_fc, llama_fields, missing_target_keys,
                          resolve_verifier)


def qwen3_fields(d: Drafter) -> dict:
    """The draft layers' Qwen3 config (the target's sizes, num_layers layers, all full attention)."""
    n = d.config["num_layers"]
    fields = {**llama_fields(d), "model_type": "qwen3", "num_hidden_layers": n, "layer_types": ["full_attention"] * n}
    return {k: v for k, v in fields.items() if k != "mlp_bias"}


def check_dflash(d: Drafter) -> None:
    where = d.folder / "config.json"
    missing = missing_target_keys(d.config.get("target_config") or {})
    missing += [k for k in ("feature_layers", "block_size", "num_layers", "mask_token_id") if d.config.get(k) is None]
    if missing:
        raise ExportRefused(f"{where}: {missing} missing; the file is incomplete: save the drafter again")
    family = d.config.get("layer_family") or d.target["model_type"]
    if family != "qwen3":
        raise ExportRefused(f"{where}: the drafter's layers are {family!r} layers; SGLang's DFLASH and speculators "
                            f"run Qwen3 layers (per-head q/k norms): train it with drafter.layer_family=qwen3")
    H, n = d.target["hidden_size"], d.config["num_layers"]
    want = {"fc.weight": (H, H * len(d.feature_layers)), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    have = {name: tuple(t.shape) for name, t in d.tensors.items()}
    wrong = [f"{k} {list(have.get(k, ()))}, expected {list(s)}" for k, s in want.items() if have.get(k) != s]
    stray = sorted(k for k in have if k not in want and not (k.startswith("layers.") and int(k.split(".")[1]) < n))
    if wrong or stray:
        raise ExportRefused(f"{d.folder}: the weights do not match config.json: {'; '.join(wrong + stray)}. Export "
                            f"a drafter saved by draftsmith with the config it was trained with")


def dflash_layout(d: Drafter, fmt: str, verifier: str | None) -> Layout:
    check_dflash(d)
    reordered = d.feature_layers != d.engine_layers
    note = f"column blocks reordered from layers {d.feature_layers} to {d.engine_layers}" if reordered else ""
    tensors = {name: (name, t, "") for name, t in {**d.tensors, "fc.weight": engine_fc(d)}.items()}
    tensors["fc.weight"] = ("fc.weight", tensors["fc.weight"][1], note)
    ids, L = d.engine_layers, d.target["num_hidden_layers"]
    if fmt == "sglang":
        config = {"architectures": ["DFlashDraftModel"], **qwen3_fields(d), "block_size": d.config["block_size"],
                  "num_target_layers": L,
                  "dflash_config": {"mask_token_id": d.config["mask_token_id"], "target_layer_ids": ids}}
        layout = Layout(fmt, tensors, config, layer_ids={"dflash_config.target_layer_ids (layer outputs)": ids})
        layout.notes.append("transformers loads this layout with z-lab's dflash.py (remote code, not included); "
                            "SGLang's DFLASH reads it natively")
        return layout
    if L - 1 in ids:
        raise ExportRefused(f"{d.folder / 'config.json'}: feature_layers {ids} include the target's last layer, which "
                            f"speculators reads apart (as the verifier's last hidden state): export --format sglang")
    greedy = {"proposal_type": "greedy", "speculative_tokens": d.config["block_size"] - 1, "verifier_accept_k": 1,
              "accept_tolerance": 0.0}
    config = {
        "architectures": ["DFlashSpeculator"], "speculators_model_type": "dflash",
        "transformer_layer_config": qwen3_fields(d), "draft_vocab_size": d.target["vocab_size"],
        "block_size": d.config["block_size"], "aux_hidden_state_layer_ids": [i + 1 for i in ids],
        "mask_token_id": d.config["mask_token_id"],
        "speculators_config": {
            "algorithm": "dflash", "proposal_methods": [greedy], "default_proposal_method": "greedy",
            "verifier": {"name_or_path": resolve_verifier(d, verifier),
                         "architectures": list(d.target.get("architectures") or [])},
        },
    }
    return Layout(fmt, tensors, config,
                  layer_ids={"aux_hidden_state_layer_ids (speculators: hidden_states indices)": [i + 1 for i in ids]})


def peagle_parts(d: Drafter, fmt: str) -> tuple[Drafter, dict[str, torch.Tensor]]:
    """The drafter without its placeholders (an EAGLE-3 drafter for eagle3_layout's checks) and the placeholders."""
    if fmt != "vllm":
        raise ExportRefused(f"{d.folder / 'config.json'}: a P-EAGLE drafter (parallel_drafts "
                            f"{d.config['parallel_drafts']}) has no {fmt} layout: export --format vllm (speculators' "
                            f"PEagleSpeculator)")
    placeholders = {k: d.tensors[k] for k in ("mask_embedding", "mask_hidden") if k in d.tensors}
    if len(placeholders) != 2:
        raise ExportRefused(f"{d.folder}: mask_embedding or mask_hidden missing: save the drafter again")
    rest = {k: v for k, v in d.tensors.items() if k not in placeholders}
    return Drafter(d.folder, d.config, rest), placeholders


def add_peagle(layout: Layout, d: Drafter, placeholders: dict[str, torch.Tensor], mask_token_id: int | None) -> None:
    """Turn an EAGLE-3 vllm layout (with embed_tokens) into speculators' peagle layout."""
    if "embed_tokens.weight" not in layout.tensors:
        raise ExportRefused("a P-EAGLE export writes its mask token into the drafter's embed_tokens: drop "
                            "--no-embedding")
    t = d.target
    if mask_token_id is None:
        eos = t.get("eos_token_id")
        mask_token_id = t.get("pad_token_id") if t.get("pad_token_id") is not None else (
            eos[0] if isinstance(eos, list) else eos)
    if mask_token_id is None or not 0 <= mask_token_id < t["vocab_size"]:
        raise ExportRefused(f"mask token id {mask_token_id} is not a token of the target (vocabulary "
                            f"{t['vocab_size']}): give --mask-token-id")
    embed = layout.tensors["embed_tokens.weight"][1].clone()
    embed[mask_token_id] = placeholders["mask_embedding"].to(embed.dtype)
    layout.tensors["embed_tokens.weight"] = ("(target) embed_tokens + mask_embedding", embed,
                                             f"the target's, row {mask_token_id} = mask_embedding")
    # fc's column blocks follow the engine's layer order (engine_fc): permute mask_hidden's blocks the same way
    order = engine_fc(Drafter(d.folder, d.config, {"fc.weight": torch.eye(placeholders["mask_hidden"].numel())}))
    layout.tensors["mask_hidden"] = ("mask_hidden", (placeholders["mask_hidden"] @ order)[None, None], "[1, 1, F]")
    layout.config.update({"architectures": ["PEagleSpeculator"], "speculators_model_type": "peagle",
                          "mask_token_id": mask_token_id})
    layout.config["speculators_config"]["algorithm"] = "peagle"
    layout.config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] = d.config["parallel_drafts"]
