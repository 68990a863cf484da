"""Offline target features for EAGLE training: run the frozen target once over the training conversations and store
what the drafter's loss needs, so that training epochs (and other drafter runs) skip the target.

    python -m train.features --config configs/eagle3_smollm2.yaml --output runs/features_e3 [--dtype bfloat16]
    python train/train_heads.py --config configs/eagle3_smollm2.yaml drafter.features=runs/features_e3

Per token, only the layers the drafter reads: EAGLE-3 the outputs of its feature layers and the last hidden state
(the target's logits are recomputed from it with the frozen LM head), EAGLE-1 the last hidden state. Shards of
`shard_size` conversations are safetensors files (`features` [sum T, F], `hidden` [sum T, H], `offsets`),
written atomically: an interrupted dump resumes at the first missing shard. `manifest.json`, written before the
first shard, records what the features depend on (target and revision, layers, dtype, chat template and
tokenizer hash, max length, data file hash, limit, the token dataset's key); training refuses a cache whose
manifest differs from its config, naming the fields.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from data.tokenize import _source_fingerprint, cache_key
from target.model import target_forward, to_torch_dtype

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class FeatureCacheMismatch(ValueError):
    """A feature cache was written for another target, data, layer set or dtype than the config asks for."""


def manifest_for(target, tokenizer, source: str, max_length: int, limit: int | None, feature_layers: list[int] | None,
                 dtype: str, num_conversations: int, shard_size: int) -> dict:
    """What a dump depends on (the keys `check_manifest` compares) and how it is laid out."""
    tc = target.config.get_text_config()
    fingerprint = _source_fingerprint(source)  # reads the whole data file: once
    return {
        "format_version": FORMAT_VERSION,
        "target": tc._name_or_path, "target_revision": getattr(tc, "_commit_hash", None),
        "feature_layers": feature_layers, "dtype": dtype,
        "chat_template_sha256": hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest(),
        "max_length": max_length, "data": source, "data_sha256": fingerprint, "limit": limit,
        "token_dataset_key": cache_key(source, tokenizer, max_length, limit, fingerprint),
        "num_conversations": num_conversations, "shard_size": shard_size,
    }


COMPARED = ("format_version", "target", "target_revision", "feature_layers", "chat_template_sha256", "max_length",
            "data_sha256", "limit", "token_dataset_key", "num_conversations")


def check_manifest(found: dict, expected: dict, where: str) -> None:
    """Refuse a cache whose recorded dependencies differ from the expected ones (dtype may differ on purpose)."""
    wrong = [f"{k}: cache {found.get(k)!r}, config {expected.get(k)!r}"
             for k in COMPARED if found.get(k) != expected.get(k)]
    if wrong:
        raise FeatureCacheMismatch(f"feature cache {where} does not match this run ({'; '.join(wrong)}). Dump "
                                   f"features for this config with `python -m train.features`, or point "
                                   f"drafter.features elsewhere.")


def _shard_path(out: Path, i: int) -> Path:
    return out / f"shard_{i:05d}.safetensors"


@torch.no_grad()
def dump_features(target, ds, out_dir: str, manifest: dict, stop_after_shards: int | None = None) -> dict:
    """Write the features of every conversation of token dataset `ds` under out_dir (see the module docstring).
    Existing complete shards are kept (resume); a manifest that differs is refused. stop_after_shards: write at
    most that many new shards and return (an interruption, for tests). Returns a report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    if path.is_file():
        check_manifest(json.loads(path.read_text()), manifest, str(out))
    else:
        _write_json(path, {**manifest, "complete": False})
    size, n = manifest["shard_size"], manifest["num_conversations"]
    dtype, layers = to_torch_dtype(manifest["dtype"]), manifest["feature_layers"]
    device = target.get_input_embeddings().weight.device
    written = 0
    for i in range((n + size - 1) // size):
        if _shard_path(out, i).is_file():
            continue
        if stop_after_shards is not None and written == stop_after_shards:
            return {"complete": False, "shards_written": written}
        tensors = {"features": [], "hidden": [], "lengths": []}
        for ids in ds.select(range(i * size, min(n, (i + 1) * size)))["input_ids"]:
            o = target_forward(target, torch.tensor([ids], device=device), logits_at=0, use_cache=False,
                               feature_layers=layers)
            tensors["hidden"].append(o.hidden_states[0].to(dtype).cpu())
            if layers:
                tensors["features"].append(o.features[0].to(dtype).cpu())
            tensors["lengths"].append(len(ids))
        shard = {"hidden": torch.cat(tensors["hidden"]), "lengths": torch.tensor(tensors["lengths"])}
        if layers:
            shard["features"] = torch.cat(tensors["features"])
        tmp = out / f".shard_{i:05d}.tmp"
        save_file(shard, str(tmp))
        os.replace(tmp, _shard_path(out, i))
        written += 1
    tokens = sum(ds["length"][:n])
    total = sum(_shard_path(out, i).stat().st_size for i in range((n + size - 1) // size))
    report = {"complete": True, "tokens": tokens, "bytes": total, "bytes_per_token": total / max(tokens, 1)}
    _write_json(path, {**manifest, **report})
    return {**report, "shards_written": written}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class FeatureCache:
    """Read access to a complete dump: `get(i)` -> (features [T, F] or None, hidden [T, H]) of conversation i."""

    def __init__(self, out_dir: str, expected: dict):
        self.dir = Path(out_dir)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.dir} has no {MANIFEST}: not a feature cache. Write one with "
                                    f"`python -m train.features --config ... --output {self.dir}`")
        self.manifest = json.loads(path.read_text())
        check_manifest(self.manifest, expected, str(self.dir))
        if not self.manifest.get("complete"):
            raise ValueError(f"feature cache {self.dir} is incomplete (an interrupted dump): run the same "
                             f"`python -m train.features` command again to finish it")
        self.size = self.manifest["shard_size"]
        self._open: dict[int, tuple] = {}

    def _shard(self, s: int) -> tuple:
        if s not in self._open:
            f = safe_open(str(_shard_path(self.dir, s)), framework="pt")
            starts = [0] + f.get_tensor("lengths").cumsum(0).tolist()
            self._open = {s: (f, starts)}  # one open shard at a time: batches are mostly shard-local
        return self._open[s]

    def get(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        f, starts = self._shard(i // self.size)
        j = i % self.size
        hidden = f.get_slice("hidden")[starts[j]:starts[j + 1]]
        feats = f.get_slice("features")[starts[j]:starts[j + 1]] if "features" in f.keys() else None
        return feats, hidden
