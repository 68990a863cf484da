"""One record of where a drafter comes from, for every kind: `config.draftsmith` holds the target it was trained
against (name or path, revision, model type, vocabulary size), the drafter kind and, where one was counted, the
frequent-token draft vocabulary (drafters/vocab.py). Medusa and EAGLE configs saved before this record existed
kept the target in their own fields; provenance() reads both."""
from __future__ import annotations

from .vocab import draftsmith_meta

TARGET_KEYS = ("target_name_or_path", "target_revision", "target_model_type", "target_vocab_size")


def target_record(target_config, name_or_path: str | None = None) -> dict:
    """What a drafter records about its target (the config of the loaded target; name_or_path: as the user gave
    it, e.g. an embedded name, instead of the cached folder's path)."""
    text = target_config.get_text_config()
    return {"target_name_or_path": name_or_path or target_config._name_or_path or None,
            "target_revision": getattr(target_config, "_commit_hash", None),
            "target_model_type": text.model_type, "target_vocab_size": text.vocab_size}


def record_provenance(config, kind: str, target_config, name_or_path: str | None = None) -> None:
    """Write the record into a drafter's config (kept by save_pretrained in config.json)."""
    config.draftsmith = {**draftsmith_meta(config), "kind": kind, **target_record(target_config, name_or_path)}


def provenance(config) -> dict:
    """The record of a drafter's config, whatever its kind and age: kind, target keys, draft_vocab (or None)."""
    meta = draftsmith_meta(config)
    legacy = {key: getattr(config, key, None) for key in TARGET_KEYS}
    record = {key: meta.get(key, legacy[key]) for key in TARGET_KEYS}
    return {"kind": meta.get("kind"), **record, "draft_vocab": meta.get("draft_vocab")}
