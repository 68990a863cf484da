"""Training's table of the registered drafter kinds (drafters/kinds.py): the entry script that trains each and its
recipe class, imported when asked for (entry scripts import train.recipe, which reads this table)."""
from __future__ import annotations

import importlib

from drafters.kinds import check_table, get_kind

# drafter.kind -> (entry script, "module:Recipe class")
TRAINING: dict[str, tuple[str, str]] = {
    "medusa": ("train/train_heads.py", "train.train_heads:MedusaRecipe"),
    "eagle": ("train/train_heads.py", "train.train_heads:EagleRecipe"),
    "dflash": ("train/train_heads.py", "train.train_heads:DFlashRecipe"),
    "draft_lm": ("train/train_draft_lm.py", "train.train_draft_lm:DraftLMRecipe"),
}
check_table(TRAINING, "train/kinds.py TRAINING")


def script(kind: str) -> str:
    return TRAINING[get_kind(kind).name][0]


def recipe_class(kind: str) -> type:
    module, name = TRAINING[get_kind(kind).name][1].split(":")
    return getattr(importlib.import_module(module), name)


def recipes_of(script_path: str) -> dict[str, type]:
    """kind -> recipe class for the kinds one entry script trains."""
    return {kind: recipe_class(kind) for kind, (path, _) in TRAINING.items() if path == script_path}
