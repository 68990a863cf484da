"""The registry of drafter kinds: the names configs, saved folders and reports use, and each kind's model class.
Upper layers keep one table each, keyed by these names (the config section in train/config.py, the recipe in
train/recipes.py, the proposer in inference/proposer_setup.py), and check_table() makes a missing or unknown
entry fail at import with one line."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from .dflash import DFlashModel
from .eagle import EagleModel
from .medusa import MedusaModel


@dataclass(frozen=True)
class DrafterKind:
    name: str
    model: type[PreTrainedModel] | None  # None: any causal LM with the target's vocabulary (draft LMs)
    reads_target_features: bool  # drafts from the target's hidden states, so it runs in the target's dtype
    description: str


KINDS: dict[str, DrafterKind] = {k.name: k for k in (
    DrafterKind("medusa", MedusaModel, True, "Medusa heads on the target's last hidden state"),
    DrafterKind("eagle", EagleModel, True, "an EAGLE-1 / EAGLE-3 / P-EAGLE feature drafter"),
    DrafterKind("dflash", DFlashModel, True, "a DFlash block drafter"),
    DrafterKind("draft_lm", None, False, "a small causal LM distilled from the target"),
)}


def get_kind(name: str) -> DrafterKind:
    if name not in KINDS:
        raise ValueError(f"drafter kind {name!r} is not known; known kinds: {', '.join(KINDS)}")
    return KINDS[name]


def kind_of(drafter: PreTrainedModel) -> str:
    """The kind of a loaded drafter: a registered model class, else a causal LM (draft_lm, LoRA-wrapped or not)."""
    for kind in KINDS.values():
        if kind.model is not None and isinstance(drafter, kind.model):
            return kind.name
    if hasattr(drafter, "generate"):
        return "draft_lm"
    raise TypeError(f"{type(drafter).__name__} is not a drafter draftsmith knows ({', '.join(KINDS)})")


def kind_of_model_type(model_type: str | None) -> str:
    """The kind of a saved drafter from its config.json's model_type (read before any weights load)."""
    for kind in KINDS.values():
        if kind.model is not None and kind.model.config_class.model_type == model_type:
            return kind.name
    return "draft_lm"


def check_table(table: dict, what: str) -> None:
    """An upper layer's per-kind table must name exactly the registered kinds."""
    missing, unknown = sorted(set(KINDS) - set(table)), sorted(set(table) - set(KINDS))
    if missing or unknown:
        raise RuntimeError(f"{what} does not match drafters/kinds.py: missing {missing}, unknown {unknown}; "
                           f"register every kind in both")
