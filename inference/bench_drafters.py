"""The benchmark's drafters as given on its command line: `[NAME=]DRAFTER[@key=value...]`.

DRAFTER is a drafter folder, a Hub id, or a zoo name (zoo/<target>/<name> in this repository); NAME names its
rows (default: the folder's name, its parent's for <output_dir>/drafter); each `@key=value` sets one of the
drafter options of inference.eval_config.EvalConfig for this drafter alone, e.g.
`lookup=runs/d/drafter@prompt_lookup=3@draft_siblings=3` beside the same draft without lookup.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .eval_config import PROPOSER_FIELDS, ConfigError, EvalConfig, check_tree

ZOO = Path(__file__).resolve().parents[1] / "zoo"
RESERVED = ("plain", "hf-lookup", "hf-assisted")  # the baselines' method names
PER_DRAFTER = (*PROPOSER_FIELDS, "draft_dtype")  # options a drafter may set for itself; the rest are the run's
LOOKUP_OPTIONS = ("prompt_lookup", "prompt_lookup_tokens")  # also shape the hf-lookup baseline


@dataclass
class DrafterSpec:
    name: str
    path: str
    options: dict[str, Any]  # this drafter's own EvalConfig fields

    def config(self, shared: EvalConfig, kind: str) -> EvalConfig:
        """The options this drafter runs with: the shared ones its kind takes, then its own (checked for its kind)."""
        config = dataclasses.replace(shared.for_kind(kind), **self.options)
        config.check_kind(kind)
        return config


def resolve_drafter(name: str, target: str) -> str:
    """A drafter folder or Hub id as given, or a zoo name: zoo/<target>/<name> (e.g. eagle3 beside the embedded
    target smollm2-135m-instruct)."""
    if Path(name).exists():
        return name
    zoo = ZOO / target if "/" not in target else None  # the zoo is kept per embedded target name
    if zoo is not None and (zoo / name).is_dir():
        return str(zoo / name)
    if "/" not in name:
        shipped = sorted(p.name for p in zoo.iterdir()) if zoo is not None and zoo.is_dir() else []
        raise ValueError(f"drafter {name!r} is neither a folder nor in the zoo for {target} "
                         f"({', '.join(shipped) or 'none shipped'}); give a drafter folder (<output_dir>/drafter)")
    return name  # a Hub id: load_drafter says what it tried if it is none


def parse_drafter(spec: str, target: str) -> DrafterSpec:
    label, sep, rest = spec.partition("=")
    if not sep or not re.fullmatch(r"[\w.+-]+", label):
        label, rest = "", spec
    drafter, *options = rest.split("@")
    path = resolve_drafter(drafter, target)
    folder = Path(path.rstrip("/"))
    label = label or (folder.parent.name if folder.name == "drafter" else folder.name)
    return DrafterSpec(label, path, dict(_option(spec, item) for item in options))


def parse_drafters(specs: list[str], target: str) -> list[DrafterSpec]:
    drafters = [parse_drafter(spec, target) for spec in specs]
    names = [d.name for d in drafters]
    for name in names:
        if names.count(name) > 1 or name in RESERVED or name.startswith("hf-"):
            raise ValueError(f"--drafters: two methods would be named {name!r}; name them: --drafters NAME=DRAFTER")
    return drafters


def _option(spec: str, item: str) -> tuple[str, Any]:
    """'key=value' -> (EvalConfig field, typed value)."""
    key, sep, value = item.partition("=")
    key = key.replace("-", "_")
    if not sep or key not in PER_DRAFTER:
        raise ValueError(f"--drafters {spec}: {item!r} is not a drafter option key=value; a drafter may set "
                         f"{', '.join(PER_DRAFTER)} (the other options are the whole run's flags)")
    field = {f.name: f for f in dataclasses.fields(EvalConfig)}[key]
    try:
        typed = _typed(value, field.type)
    except ValueError:
        raise ValueError(f"--drafters {spec}: {key}={value!r} is not a {field.type}") from None
    if key == "tree":  # checked now, as --tree is: the other options' rules involve the run's flags too
        check_tree(typed, f"--drafters {spec}: tree")
    return key, typed


def _typed(value: str, annotation: str) -> Any:
    if annotation in ("bool", bool):
        if value.lower() not in ("true", "false"):
            raise ValueError(value)
        return value.lower() == "true"
    if value.lower() in ("null", "none") and "None" in str(annotation):
        return None
    for name, kind in (("int", int), ("float", float)):
        if str(annotation).startswith(name):
            return kind(value)
    return value


def check_options(config: EvalConfig, drafters: list[tuple[DrafterSpec, str]], baselines: list[str]) -> None:
    """Each kind-specific option set for the whole run must apply to some drafter given (or, for the lookup
    options, to hf-lookup); each drafter's own options must apply to its kind. drafters: (spec, kind) pairs."""
    kinds = {kind for _, kind in drafters}
    for name in config.unused_options(kinds):
        if name in LOOKUP_OPTIONS and "hf-lookup" in baselines:
            continue
        takes = {f.name: f.metadata["kinds"] for f in dataclasses.fields(EvalConfig)}[name]
        raise ConfigError(f"eval.{name}={getattr(config, name)!r} is for {' and '.join(takes)} drafters, and no "
                          f"drafter given is one")
    for spec, kind in drafters:
        try:
            spec.config(config, kind)
        except ConfigError as err:
            raise ConfigError(f"drafter {spec.name}: {err}") from None
