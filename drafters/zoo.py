"""Zoo folders: trained drafters stored small, for a named target (`zoo/<target>/<name>/`).

A zoo folder holds only what training changed, in bf16:

    config.json         the drafter's config (its kind follows from model_type, as for any saved drafter)
    model.safetensors   the drafter's own tensors, floating point ones rounded to bf16 (integer buffers as they are)
    zoo.json            the manifest: kind, target, the sha256 of the target's weights, which drafter tensors are
                        the target's own (rebuilt from it at load), and the card's measurements (see train/zoo_card.py)
    README.md           the card, rendered from zoo.json

Tensors that equal one of the target's at bf16 precision (a draft LM's embeddings and tied LM head, Medusa heads that
kept the target's LM head) are not stored: `load_zoo_drafter` copies them from the target, at the target's own
precision. The target is checked first: the digest of all its weights must equal the one recorded at export, since
a drafter reads the target's features or imitates its distribution, and a drafter rebuilt from another target's
tensors would be wrong without a word.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from .kinds import get_kind, kind_of

MANIFEST = "zoo.json"
WEIGHTS = "model.safetensors"
FORMAT = "draftsmith-zoo/1"
STORED_DTYPE = torch.bfloat16


def is_zoo_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def target_digest(target: PreTrainedModel) -> str:
    """sha256 over every tensor of the target's state dict (sorted by name: name, shape, values rounded to bf16).
    bf16 rounding makes the digest the same for a target loaded in float32 or bfloat16, on any device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(target.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        values = tensor.detach().reshape(-1).to(dtype=torch.bfloat16).cpu().contiguous()
        digest.update(values.view(torch.int16).numpy())
    return digest.hexdigest()


def shared_with_target(drafter_state: dict[str, torch.Tensor], target: PreTrainedModel) -> dict[str, str]:
    """drafter tensor name -> target tensor name, for the floating point drafter tensors equal to a target tensor at
    bf16 precision (the same name preferred: a tied LM head maps to itself, not to the embedding)."""
    by_shape: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in target.state_dict().items():
        by_shape.setdefault(tuple(tensor.shape), []).append((name, tensor))
    shared = {}
    for name, tensor in drafter_state.items():
        if not tensor.is_floating_point():
            continue
        candidates = sorted(by_shape.get(tuple(tensor.shape), []), key=lambda c: c[0] != name)
        rounded = tensor.detach().to(STORED_DTYPE).cpu()
        for target_name, target_tensor in candidates:
            if torch.equal(rounded, target_tensor.detach().to(STORED_DTYPE).cpu()):
                shared[name] = target_name
                break
    return shared


def save_zoo_drafter(drafter: PreTrainedModel, target: PreTrainedModel, folder: str | Path, name: str,
                     target_name: str) -> dict:
    """Write `drafter` (trained for `target`) as a zoo folder; returns the manifest. `name` says which drafter of the
    kind it is (e.g. eagle3), `target_name` the target as a user names it (e.g. smollm2-135m-instruct)."""
    kind = kind_of(drafter)
    if hasattr(drafter, "merge_and_unload"):
        raise ValueError("a zoo drafter is stored with merged weights: save LoRA drafts with save_merged: true")
    state = drafter.state_dict()
    shared = shared_with_target(state, target)
    stored = {k: (v.to(STORED_DTYPE) if v.is_floating_point() else v).detach().cpu().contiguous()
              for k, v in state.items() if k not in shared}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    drafter.config.save_pretrained(folder)
    save_file(stored, str(folder / WEIGHTS), metadata={"format": "pt"})
    manifest = {
        "format": FORMAT, "name": name, "kind": kind, "target": target_name, "target_sha256": target_digest(target),
        "stored_dtype": str(STORED_DTYPE).removeprefix("torch."),
        "stored_parameters": sum(v.numel() for v in stored.values()),
        "from_target": dict(sorted(shared.items())),
    }
    write_manifest(folder, manifest)
    return manifest


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, this draftsmith reads {FORMAT!r}: "
                         "re-export the drafter (python -m train.zoo_export) or update draftsmith")
    return manifest


def write_manifest(folder: str | Path, manifest: dict) -> None:
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(path)


def load_zoo_drafter(folder: str | Path, target: PreTrainedModel | None) -> PreTrainedModel:
    """The drafter of a zoo folder, its shared tensors copied from `target` (required, and checked by digest), in
    float32 (the caller moves it to the target's dtype), in eval mode, attached to the target when it reads it."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if target is None:
        raise ValueError(f"{folder} is a zoo drafter stored without the tensors it shares with its target "
                         f"{manifest['target']!r}: load it together with that target (load_drafter(path, target))")
    digest = target_digest(target)
    if digest != manifest["target_sha256"]:
        raise ValueError(f"{folder} was trained for target {manifest['target']!r} (weights sha256 "
                         f"{manifest['target_sha256'][:16]}...), but this target's weights hash to {digest[:16]}...: "
                         f"load the target it was trained on")
    config = AutoConfig.from_pretrained(folder)
    auto = AutoModelForCausalLM if manifest["kind"] == "draft_lm" else AutoModel
    drafter = auto.from_config(config, dtype=torch.float32)
    state = load_file(str(folder / WEIGHTS))
    target_state = target.state_dict()
    state.update({name: target_state[source] for name, source in manifest["from_target"].items()})
    drafter.load_state_dict(state, strict=True)
    drafter = drafter.to(target.get_input_embeddings().weight.device).eval()
    if get_kind(manifest["kind"]).reads_target_features:
        drafter.attach_target(target)
    return drafter
