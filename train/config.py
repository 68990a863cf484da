"""Typed training configuration: YAML file + dotted `key=value` overrides -> nested dataclasses.

    cfg = load_config("configs/medusa_tiny.yaml", ["training.lr=3e-4", "output_dir=/tmp/run"])

Every key must be a field of its section (unknown keys are errors that list the valid ones), and values are
coerced to the field's annotated type: command-line values are parsed from text (`true`, `3e-4`, `null`,
`[1, 2]`), YAML values must already have the right type (numbers written as `3e-4`, which PyYAML reads as
text, are accepted for float fields). The `drafter` section's fields depend on `drafter.kind`, looked up in
DRAFTER_SECTIONS.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from drafters.kinds import check_table
from inference.eval_config import ConfigError, EvalConfig, check as _check, check_tree


# --- sections --------------------------------------------------------------------------------------------------


@dataclass
class MedusaDrafter:
    kind: Literal["medusa"] = "medusa"
    num_heads: int = 4
    num_layers: int = 1  # residual blocks per head
    share_lm_head: bool = False  # True: every head reuses the target's frozen LM head (only the blocks train)
    draft_vocab: int | None = None  # record the N most frequent training tokens: drafting over them (FR-Spec)

    def __post_init__(self):
        _check(self.num_heads >= 1, "drafter.num_heads", self.num_heads, "must be >= 1")
        _check(self.num_layers >= 1, "drafter.num_layers", self.num_layers, "must be >= 1")
        _check(self.draft_vocab is None or self.draft_vocab >= 1, "drafter.draft_vocab", self.draft_vocab,
               "must be >= 1 or null (the full vocabulary)")


@dataclass
class DraftLMDrafter:
    kind: Literal["draft_lm"] = "draft_lm"
    from_pretrained: str | None = None  # an existing small causal LM with the target's vocabulary; null: build one
    num_layers: int = 2  # built drafts: decoder layers (the target's own architecture, fewer layers)
    init_layers: list[int] = field(default_factory=list)  # target layers copied into the first draft layers
    train_embeddings: bool = False  # False: the target's embeddings / LM head / final norm stay frozen
    lora: bool = False  # train LoRA adapters on the decoder layers' projections only (peft)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # null: every linear projection of the decoder layers
    save_merged: bool = True  # LoRA: save merged full weights (true) or the adapters only (false)
    draft_vocab: int | None = None  # record the N most frequent training tokens: drafting over them (FR-Spec)
    losses: dict[str, float] = field(default_factory=lambda: {"forward_kl": 1.0})  # name -> weight
    temperature: float = 1.0  # of teacher and student in the divergences
    jsd_beta: float = 0.5  # the teacher's weight in JSD(beta)
    positions: Literal["assistant", "all"] = "assistant"  # where the draft is distilled (next token's kind)
    loss_vocab: Literal["full", "draft"] = "full"  # draft: losses over the draft_vocab tokens only, as it drafts

    def __post_init__(self):
        from train.losses import LOSS_NAMES

        _check(self.num_layers >= 1, "drafter.num_layers", self.num_layers, "must be >= 1")
        _check(len(self.init_layers) <= self.num_layers, "drafter.init_layers", self.init_layers,
               f"copies more layers than drafter.num_layers={self.num_layers}")
        _check(self.lora_r >= 1, "drafter.lora_r", self.lora_r, "must be >= 1")
        _check(0 <= self.lora_dropout < 1, "drafter.lora_dropout", self.lora_dropout, "must be in [0, 1)")
        _check(bool(self.losses), "drafter.losses", self.losses, f"must weigh at least one of {', '.join(LOSS_NAMES)}")
        unknown = sorted(set(self.losses) - set(LOSS_NAMES))
        _check(not unknown, "drafter.losses", self.losses, f"names unknown losses {unknown}; known: "
               f"{', '.join(LOSS_NAMES)}")
        _check(all(w >= 0 for w in self.losses.values()) and any(w > 0 for w in self.losses.values()),
               "drafter.losses", self.losses, "weights must be >= 0, at least one > 0")
        _check(self.temperature > 0, "drafter.temperature", self.temperature, "must be > 0")
        _check(self.draft_vocab is None or self.draft_vocab >= 1, "drafter.draft_vocab", self.draft_vocab,
               "must be >= 1 or null (the full vocabulary)")
        _check(0 < self.jsd_beta < 1, "drafter.jsd_beta", self.jsd_beta, "must be strictly between 0 and 1")
        _check(self.loss_vocab == "full" or self.draft_vocab is not None, "drafter.loss_vocab", self.loss_vocab,
               "needs drafter.draft_vocab (the number of frequent tokens to draft over); set it or use 'full'")


@dataclass
class EagleDrafter:
    kind: Literal["eagle"] = "eagle"
    version: Literal[1, 3] = 3
    feature_layers: list[int] | None = None  # EAGLE-3: target layers whose OUTPUTS are fused; null: EAGLE-3 default
    draft_vocab: int | None = None  # EAGLE-3: its LM head covers the N most frequent training tokens (null: all);
    # EAGLE-1: the N most frequent tokens are recorded and drafted over with those rows of the target's head (FR-Spec)
    ttt_steps: int = 7  # EAGLE-3: training-time-test steps unrolled per position
    parallel: bool = False  # P-EAGLE: draft the ttt_steps depths in one forward (placeholders after the first)
    step_decay: float = 0.8  # EAGLE-3: step i's loss weighs step_decay**i
    cod_ratio: float | None = None  # EAGLE-3/P-EAGLE COD: step i trains on max(r^i, cod_min) of the anchors; null: all
    cod_min: float = 0.2  # COD's floor (speculators' P-EAGLE: ratio 0.7, floor 0.2)
    cls_weight: float = 0.1  # EAGLE-1: weight of the token (classification) loss
    reg_weight: float = 1.0  # EAGLE-1: weight of the feature regression (SmoothL1) loss
    feature_noise: float = 0.0  # EAGLE-1: uniform noise U(-a, a) on the input features during training
    features: str | None = None  # offline mode: a feature cache written by `python -m train.features`

    def __post_init__(self):
        _check(self.feature_layers is None or len(self.feature_layers) >= 1, "drafter.feature_layers",
               self.feature_layers, "must list at least one target layer, or be null (EAGLE-3's default)")
        _check(self.version == 3 or self.feature_layers is None, "drafter.feature_layers", self.feature_layers,
               "is for EAGLE-3 (drafter.version=3); EAGLE-1 reads the target's last hidden state")
        _check(self.draft_vocab is None or self.draft_vocab >= 1, "drafter.draft_vocab", self.draft_vocab,
               "must be >= 1 or null (the full vocabulary)")
        _check(self.ttt_steps >= 1, "drafter.ttt_steps", self.ttt_steps, "must be >= 1")
        _check(not self.parallel or (self.version == 3 and self.ttt_steps >= 2), "drafter.parallel", self.parallel,
               "is P-EAGLE, built on EAGLE-3 (drafter.version=3) with drafter.ttt_steps >= 2 depths")
        _check(self.step_decay > 0, "drafter.step_decay", self.step_decay, "must be > 0")
        _check(self.cod_ratio is None or (self.version == 3 and 0 < self.cod_ratio <= 1), "drafter.cod_ratio",
               self.cod_ratio, "is EAGLE-3's (drafter.version=3) and must be in (0, 1], or null (every anchor)")
        _check(0 < self.cod_min <= 1, "drafter.cod_min", self.cod_min, "must be in (0, 1]")
        _check(self.cls_weight >= 0 and self.reg_weight >= 0 and self.cls_weight + self.reg_weight > 0,
               "drafter.cls_weight/reg_weight", (self.cls_weight, self.reg_weight), "must be >= 0, not both 0")
        _check(self.feature_noise >= 0, "drafter.feature_noise", self.feature_noise, "must be >= 0")


@dataclass
class DFlashDrafter:
    kind: Literal["dflash"] = "dflash"
    num_layers: int = 1  # decoder layers of the target's family (the paper's 5 on 8B targets)
    block_size: int = 8  # slots per block: the root and block_size - 1 drafted tokens (the paper's 16)
    feature_layers: list[int] | None = None  # target layers whose OUTPUTS are fused; null: the reference's choice
    mask_token_id: int | None = None  # the target token that fills masked slots; null: its pad, else eos token
    layer_family: Literal["llama", "qwen3"] | None = None  # null: the target's layer; qwen3: the reference's (SGLang)
    num_anchors: int = 64  # blocks drawn per sequence and step (the reference's 512 at GPU scale)
    loss_decay_gamma: float = 7.0  # slot k's loss weighs exp(-(k - 1) / gamma); 0: equal weights
    draft_vocab: int | None = None  # FR-Spec: record the N most frequent tokens; drafts rank among them
    features: str | None = None  # offline mode: a feature cache written by `python -m train.features`

    def __post_init__(self):
        _check(self.num_layers >= 1, "drafter.num_layers", self.num_layers, "must be >= 1")
        _check(self.block_size >= 2, "drafter.block_size", self.block_size, "must be >= 2 (the root and a draft)")
        _check(self.feature_layers is None or len(self.feature_layers) >= 1, "drafter.feature_layers",
               self.feature_layers, "must list at least one target layer, or be null (the reference's choice)")
        _check(self.mask_token_id is None or self.mask_token_id >= 0, "drafter.mask_token_id", self.mask_token_id,
               "must be a token id >= 0, or null")
        _check(self.num_anchors >= 1, "drafter.num_anchors", self.num_anchors, "must be >= 1")
        _check(math.isfinite(self.loss_decay_gamma) and self.loss_decay_gamma >= 0, "drafter.loss_decay_gamma",
               self.loss_decay_gamma, "must be a finite number >= 0")
        _check(self.draft_vocab is None or self.draft_vocab >= 1, "drafter.draft_vocab", self.draft_vocab,
               "must be >= 1 or null (the full vocabulary)")


# drafter.kind -> the dataclass of that kind's `drafter` section.
DRAFTER_SECTIONS: dict[str, type] = {"medusa": MedusaDrafter, "draft_lm": DraftLMDrafter, "eagle": EagleDrafter,
                                     "dflash": DFlashDrafter}
check_table(DRAFTER_SECTIONS, "train/config.py DRAFTER_SECTIONS")


@dataclass
class DataConfig:
    train: str = "sharegpt"  # embedded name (sharegpt) or a conversations file
    max_length: int = 1024  # tokens per conversation (longer ones are truncated by the tokenizer step)
    limit: int | None = None  # use the first N conversations of the source
    max_tokens: int = 4096  # token budget (padding included) of one micro-batch on one rank
    max_batch_size: int | None = None  # cap on conversations per micro-batch
    cache_dir: str | None = None  # tokenized-dataset cache (None: tokenize every run)
    holdout_fraction: float = 0.02  # the last share of conversations, kept out of training ...
    holdout_max: int = 64  # ... at most this many: per-head top-k accuracy is measured on them

    def __post_init__(self):
        _check(self.max_length >= 2, "data.max_length", self.max_length, "must be >= 2")
        _check(self.limit is None or self.limit >= 1, "data.limit", self.limit, "must be >= 1 or null")
        _check(self.max_tokens >= self.max_length, "data.max_tokens", self.max_tokens,
               f"must be >= data.max_length ({self.max_length}) so that every conversation fits a micro-batch")
        _check(self.max_batch_size is None or self.max_batch_size >= 1, "data.max_batch_size",
               self.max_batch_size, "must be >= 1 or null")
        _check(0 <= self.holdout_fraction < 1, "data.holdout_fraction", self.holdout_fraction, "must be in [0, 1)")
        _check(self.holdout_max >= 0, "data.holdout_max", self.holdout_max, "must be >= 0")


@dataclass
class TrainingConfig:
    epochs: int = 1  # passes over the training conversations (ignored when max_steps is set)
    max_steps: int | None = None  # optimizer steps in all; cycles through the data as often as needed
    stop_after: int | None = None  # leave after this step with a checkpoint, as if interrupted (resume later)
    max_minutes: float | None = None  # wall-clock guard: after this long, checkpoint and save the drafter as it is
    lr: float = 1e-3
    warmup_steps: int = 0  # linear warm-up from 0, then cosine decay to lr * min_lr_ratio at the last step
    min_lr_ratio: float = 0.1  # 1.0 = constant learning rate after warm-up
    weight_decay: float = 0.0  # AdamW, on weight matrices only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_accum: int = 1  # micro-batches per optimizer step (DeepSpeed gradient_accumulation_steps)
    grad_clip: float = 1.0  # global grad-norm clip (DeepSpeed gradient_clipping); 0 = off
    head_decay: float = 0.8  # loss = sum_k head_decay**k * CE_k (Medusa paper: 0.8)
    labels: Literal["target", "data"] = "target"  # target: the target's greedy tokens (self-distillation)
    seed: int = 0
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16"] = "fp32"  # drafter weights/compute in the DeepSpeed engine
    target_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    timeout_minutes: float = 30.0  # a collective between ranks that waits longer (a frozen or dead peer) ends the run
    acceptance_every: int | None = None  # steps between held-out τ measurements (train/acceptance.py); null: off
    acceptance_prompts: int = 4  # held-out conversations whose first turn the target answers (greedy), once
    acceptance_tokens: int = 32  # new tokens per answer
    acceptance_loop: bool = False  # also run the verification loop itself on those prompts (heldout_loop_tau; slower)
    acceptance_depth: int = 4  # draft tokens per chain
    # also the τ of this tree (dynamic or JSON rank paths; not draft LMs), which then picks the best drafter
    acceptance_tree: str | None = None
    early_stop_patience: int | None = None  # stop after this many held-out τ measurements without a new best

    def __post_init__(self):
        _check(self.timeout_minutes > 0, "training.timeout_minutes", self.timeout_minutes, "must be > 0")
        _check(self.epochs >= 1, "training.epochs", self.epochs, "must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, "training.max_steps", self.max_steps,
               "must be >= 1 or null")
        _check(self.stop_after is None or self.stop_after >= 1, "training.stop_after", self.stop_after,
               "must be >= 1 or null")
        _check(self.max_minutes is None or self.max_minutes > 0, "training.max_minutes", self.max_minutes,
               "must be > 0 or null")
        _check(self.lr > 0, "training.lr", self.lr, "must be > 0")
        _check(self.warmup_steps >= 0, "training.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "training.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(self.weight_decay >= 0, "training.weight_decay", self.weight_decay, "must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "training.betas", self.betas,
               "must be two numbers in [0, 1)")
        _check(self.grad_accum >= 1, "training.grad_accum", self.grad_accum, "must be >= 1")
        _check(self.grad_clip >= 0, "training.grad_clip", self.grad_clip, "must be >= 0 (0 = no clipping)")
        _check(self.head_decay > 0, "training.head_decay", self.head_decay, "must be > 0")
        _check(self.acceptance_every is None or self.acceptance_every >= 1, "training.acceptance_every",
               self.acceptance_every, "must be >= 1 or null (off)")
        for key in ("acceptance_prompts", "acceptance_tokens", "acceptance_depth"):
            _check(getattr(self, key) >= 1, f"training.{key}", getattr(self, key), "must be >= 1")
        if self.acceptance_tree is not None:
            _check(self.acceptance_tree not in ("auto", "chain"), "training.acceptance_tree", self.acceptance_tree,
                   "must be dynamic or JSON rank paths (auto is sized after training; the chain is always measured)")
            check_tree(self.acceptance_tree, "training.acceptance_tree")
        _check(self.early_stop_patience is None or (self.early_stop_patience >= 1 and self.acceptance_every),
               "training.early_stop_patience", self.early_stop_patience,
               "must be >= 1 or null, and needs training.acceptance_every (it counts held-out τ measurements)")


@dataclass
class LoggingConfig:
    log_every: int = 10  # optimizer steps between metrics.jsonl / wandb rows
    wandb: bool = False  # WANDB_MODE=offline in the environment keeps runs local
    wandb_project: str = "draftsmith"
    wandb_run_name: str | None = None
    progress_bar: bool = True  # rank-0 tqdm bar

    def __post_init__(self):
        _check(self.log_every >= 1, "logging.log_every", self.log_every, "must be >= 1")


@dataclass
class CheckpointConfig:
    every_steps: int | None = 500  # null: no periodic checkpoints
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    resume: str = "auto"  # auto: newest complete checkpoint in output_dir, if any | none | <checkpoint dir>
    select: Literal["acceptance", "last"] = "acceptance"  # drafter/: the best held-out τ (training.acceptance_every) or the last step

    def __post_init__(self):
        _check(self.every_steps is None or self.every_steps >= 1, "checkpoint.every_steps", self.every_steps,
               "must be >= 1 or null")
        _check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "must be >= 1")
        _check(self.select in ("acceptance", "last"), "checkpoint.select", self.select, "must be acceptance or last")


@dataclass
class PushConfig:
    repo_id: str | None = None  # USER/NAME: upload the drafter (with its model card) at the end of training
    private: bool = False


@dataclass
class TrainConfig:
    target: str  # embedded name (smollm2-135m-instruct), checkpoint directory or Hub id
    output_dir: str  # drafter/, eval.json, metrics.jsonl, checkpoints/ end up here
    drafter: MedusaDrafter | DraftLMDrafter | EagleDrafter = field(default_factory=MedusaDrafter)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    push: PushConfig = field(default_factory=PushConfig)

    def __post_init__(self):
        dtype = {"fp32": "float32", "bf16": "bfloat16"}[self.training.precision]
        _check(not getattr(self.drafter, "share_lm_head", False) or self.training.target_dtype == dtype,
               "training.target_dtype", self.training.target_dtype,
               f"must be {dtype} with drafter.share_lm_head=true and training.precision={self.training.precision}: "
               "the heads feed the target's own LM head, so both must use one dtype")
        self.eval.check_kind(self.drafter.kind)
        _check(self.training.acceptance_tree is None or self.drafter.kind != "draft_lm", "training.acceptance_tree",
               self.training.acceptance_tree, "must be null for a draft LM, which drafts chains")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- loading ---------------------------------------------------------------------------------------------------


class _Override(str):
    """A value typed on the command line: parsed from text by the field's type."""


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """The config in YAML file `path` (None: defaults only) with `key=value` overrides applied in order."""
    return load_dataclass(TrainConfig, path, overrides)


def load_dataclass(cls: type, path: str | None, overrides: list[str] = ()):
    """Any config dataclass `cls` from YAML file `path` and `key=value` overrides, by load_config's rules."""
    raw: dict = {}
    if path is not None:
        with open(path) as f:
            loaded = yaml.safe_load(f)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        raw = loaded or {}
    keys = [_apply_override(raw, item) for item in overrides]
    return build_dataclass(cls, raw, source=path or "<defaults>", overridden=keys)


def build_config(raw: dict, source: str = "<dict>", overridden: list[str] = ()) -> TrainConfig:
    """TrainConfig from a nested dict (as read from YAML); `source` names it in error messages, `overridden`
    the dotted keys that came from the command line."""
    return build_dataclass(TrainConfig, raw, source, overridden)


def build_dataclass(cls: type, raw: dict, source: str = "<dict>", overridden: list[str] = ()):
    try:
        return _build(cls, raw, "", overridden)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _apply_override(raw: dict, item: str) -> str:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. training.lr=3e-4)")
    *sections, leaf = key.split(".")
    node = raw
    for i, name in enumerate(sections):
        child = node.get(name)
        if child is None:  # absent, or an empty section in the YAML file
            child = node[name] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(sections[:i + 1])} is a value, not a section")
        node = child
    node[leaf] = _Override(value)
    return key


def _build(cls: type, raw: Any, prefix: str, overridden: list[str]):
    """Instantiate dataclass `cls` from mapping `raw`; `prefix` is the dotted path of this section."""
    raw = {} if raw is None else raw  # `push:` with every key commented out
    if isinstance(raw, _Override) or not isinstance(raw, dict):
        raise ConfigError(f"{prefix[:-1] or 'the config'} is a section: set its keys "
                          f"({', '.join(f.name for f in dataclasses.fields(cls))}), e.g. {prefix}<key>=value")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = prefix[:-1] or "the top level"
        key = f"{prefix}{unknown[0]}"
        origin = " (a command-line override)" if any(o == key or o.startswith(key + ".") for o in overridden) else ""
        raise ConfigError(f"unknown key {key}{origin} in {where}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if cls is TrainConfig and name == "drafter" and isinstance(value, (dict, type(None))):
            hint = _drafter_class((value or {}).get("kind", "medusa"))  # the section's fields depend on its kind
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.", overridden)
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key {prefix}{missing[0]}: set it in the YAML file or as {prefix}"
                          f"{missing[0]}=...")
    return cls(**kwargs)


def _drafter_class(kind: Any) -> type:
    if kind not in DRAFTER_SECTIONS:
        raise ConfigError(f"drafter.kind {kind!r} is not a known drafter kind; known kinds: {', '.join(DRAFTER_SECTIONS)}")
    return DRAFTER_SECTIONS[kind]


_NULLS = ("null", "none", "~", "")
_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint` (int, float, bool, str, X | None, Literal[...], list[X])."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    is_text = isinstance(value, _Override)
    if dataclasses.is_dataclass(hint):  # a section inside a list or mapping (e.g. one entry of a pipeline's stages)
        return _build(hint, value, f"{key}.", [])
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (is_text and value.strip().lower() in _NULLS):
            return None
        return _coerce(value, inner[0], key)
    if origin is Literal:
        allowed = ", ".join(repr(a) for a in args)
        kind = type(args[0])
        parsed = _coerce(value, kind, key) if (is_text or kind is not str) else value
        if parsed not in args:
            raise ConfigError(f"{key}={value!r} is not allowed; use one of {allowed}")
        return parsed
    if origin is dict:
        try:
            items = yaml.safe_load(value) if is_text else value
        except yaml.YAMLError:
            items = None
        if not isinstance(items, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping, e.g. {key}={{forward_kl: 1.0}}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in items.items()}
    if origin is list:
        try:
            items = yaml.safe_load(value) if is_text else value
        except yaml.YAMLError:
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[1, 2]") from None
        if not isinstance(items, list):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[1, 2]")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items)]
    if value is None:
        raise ConfigError(f"{key} cannot be null; give a {hint.__name__}")
    try:
        parsed = _scalar(value, hint, is_text)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {hint.__name__}") from None
    _check_scalar(parsed, key, value)
    return parsed


def _check_scalar(parsed: Any, key: str, value: Any) -> None:
    """Rules for every field of a type: an inf/nan number trains into a NaN drafter that is saved with exit 0, and an
    empty text (`output_dir=`) silently means the current directory."""
    if isinstance(parsed, float) and not math.isfinite(parsed):
        raise ConfigError(f"{key}={value!r} is not a finite number; give a finite value")
    if isinstance(parsed, str) and not parsed.strip():
        raise ConfigError(f"{key} is empty; give it a value")


def _scalar(value: Any, hint: type, is_text: bool) -> Any:
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return str(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if is_text and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        raise TypeError(value)
    if isinstance(value, bool):
        raise TypeError(value)  # True is an int in Python, never a number in a config
    if hint is int:
        if isinstance(value, int):
            return value
        if is_text:
            return int(value)
        raise TypeError(value)
    if hint is float:
        # PyYAML reads `3e-4` (no dot) as text: accept numeric text for floats wherever it comes from.
        return float(value)
    raise TypeError(f"unsupported field type {hint}")


def dump_config(cfg: TrainConfig, path: str) -> None:
    """Write the resolved config as YAML (loadable with load_config), whole or not at all: a kill mid-write keeps
    the record there was."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)
