"""Export a drafter saved by draftsmith into the checkpoint layouts serving engines load (docs/export.md says
which loader reads what, and why each refusal exists).

    python -m train.export --drafter RUN_DIR/drafter --format sglang --output OUT
    python -m train.export --drafter RUN_DIR/drafter --format vllm --output OUT [--verifier HUB_ID_OR_PATH]

EAGLE-3 here; Medusa and EAGLE-1 in train/export_heads.py, DFlash and P-EAGLE in train/export_parallel.py.

Each layout is one folder with config.json and model.safetensors. Every input tensor lands in the output under its
engine name (the vllm layout adds the target's embed_tokens); what a loader cannot express is refused
(ExportRefused), never dropped. draftsmith's feature_layers are layer OUTPUTS (hidden_states[i + 1]); SGLang's
eagle_config ids are too, vLLM's and speculators' top-level ids are hidden_states indices (i + 1).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cli.errors import ArgumentParser, run_main
from drafters.eagle import default_feature_layers
from target.embedded import EMBEDDED_TARGET_SOURCES

FORMATS = ("sglang", "vllm")
# Families whose decoder layer is a Llama layer up to biases. draftsmith builds the drafter's layer from the target's
# family, while both engines run a Llama layer; Qwen2's q/k/v biases are refused per engine below. Add a family only
# after checking its layer (norm formula, extra tensors such as Qwen3's q_norm/k_norm) matches Llama's.
LLAMA_LIKE_FAMILIES = ("llama", "mistral", "qwen2")
TARGET_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
               "vocab_size", "rms_norm_eps", "hidden_act")
ATTN_BIASES = tuple(f"midlayer.self_attn.{p}_proj.bias" for p in ("q", "k", "v", "o"))
MLP_BIASES = tuple(f"midlayer.mlp.{p}_proj.bias" for p in ("gate", "up", "down"))
IGNORED_BY_LOADERS = {"t2d": "kept; both loaders skip it by name and rebuild the draft->target map from d2t"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExportRefused(ValueError):
    """The drafter cannot be exported as asked; the message says what, where and what to do."""


@dataclass
class Drafter:
    """A saved draftsmith EAGLE drafter: its config.json as a dict and its tensors by name."""

    folder: Path
    config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def target(self) -> dict:
        return self.config["target_config"]

    @property
    def feature_layers(self) -> list[int]:
        return list(self.config["feature_layers"])

    @property
    def engine_layers(self) -> list[int]:
        """The fused layers in the order the engines concatenate them: the order the target runs them."""
        return sorted(self.feature_layers)

    @property
    def draft_vocab_size(self) -> int:
        return self.config.get("draft_vocab_size") or self.target["vocab_size"]  # as drafters/eagle.py builds it


@dataclass
class TensorRow:
    source: str
    output: str
    shape: tuple[int, ...]
    dtype: str
    note: str = ""


@dataclass
class ExportReport:
    """What was written where: one row per input tensor, and the layer ids each engine will capture."""

    format: str
    output: Path
    rows: list[TensorRow] = field(default_factory=list)
    layer_ids: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        width, out_width = max(len(r.source) for r in self.rows), max(len(r.output) for r in self.rows)
        lines = [f"{self.format} export -> {self.output}"]
        lines += [f"  {r.source:<{width}} -> {r.output:<{out_width}}  {list(r.shape)} {r.dtype}"
                  + (f"  ({r.note})" if r.note else "") for r in self.rows]
        lines += [f"  {key}: {ids}" for key, ids in self.layer_ids.items()]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


# --- reading and checking the drafter ----------------------------------------------------------------------------


def read_drafter(folder: str | Path) -> Drafter:
    """Load config.json and the weights (model.safetensors, or shards listed in model.safetensors.index.json)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportRefused(f"--drafter {folder} is not a folder: give a run's drafter folder (<output_dir>/drafter)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExportRefused(f"{config_path} does not exist: give a drafter folder saved by save_pretrained")
    return Drafter(folder, json.loads(config_path.read_text()), read_weights(folder))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise ExportRefused(f"{folder} has neither model.safetensors nor model.safetensors.index.json: the drafter's "
                            f"weights are missing; save it again with save_pretrained")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(load_file(folder / shard))
    return tensors


def missing_target_keys(target: dict) -> list[str]:
    """The keys of TARGET_KEYS a saved drafter's target_config lacks (Gemma names hidden_act hidden_activation)."""
    return [f"target_config.{k}" for k in TARGET_KEYS
            if k not in target and not (k == "hidden_act" and "hidden_activation" in target)]


def check_drafter(d: Drafter) -> None:
    """Refuse anything that is not a well-formed draftsmith EAGLE-3 drafter (independent of the engine)."""
    where = d.folder / "config.json"
    if d.config.get("model_type") != "draftsmith_eagle":
        raise ExportRefused(f"{where}: model_type {d.config.get('model_type')!r}, expected 'draftsmith_eagle', "
                            f"'draftsmith_dflash' or 'draftsmith_medusa'. A draft LM is a causal LM checkpoint already: give its folder to "
                            f"the engine as the draft model")
    if d.config.get("eagle_version") != 3:
        raise ExportRefused(f"{where}: eagle_version {d.config.get('eagle_version')!r}; draftsmith exports EAGLE-1 "
                            f"and EAGLE-3 drafters")
    missing = missing_target_keys(d.config.get("target_config") or {})
    missing += [] if d.config.get("feature_layers") else ["feature_layers"]
    if missing:
        raise ExportRefused(f"{where}: {missing} missing; the file is incomplete: save the drafter again")
    check_shapes(d)
    check_vocab_maps(d)


def expected_shapes(target: dict, num_features: int, draft_vocab: int) -> dict[str, tuple[int, ...]]:
    """draftsmith tensor name -> shape, from the target's config (bias tensors are optional, listed separately)."""
    H, I, V = target["hidden_size"], target["intermediate_size"], target["vocab_size"]
    heads = target["num_attention_heads"]
    kv = target.get("num_key_value_heads") or heads
    hd = target.get("head_dim") or H // heads
    q, k = heads * hd, kv * hd
    return {
        "fc.weight": (H, num_features * H),
        "midlayer.input_layernorm.weight": (H,), "midlayer.hidden_norm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (q, 2 * H), "midlayer.self_attn.k_proj.weight": (k, 2 * H),
        "midlayer.self_attn.v_proj.weight": (k, 2 * H), "midlayer.self_attn.o_proj.weight": (H, q),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.mlp.gate_proj.weight": (I, H), "midlayer.mlp.up_proj.weight": (I, H),
        "midlayer.mlp.down_proj.weight": (H, I),
        "norm.weight": (H,), "lm_head.weight": (draft_vocab, H), "d2t": (draft_vocab,), "t2d": (V,),
    }


def bias_shapes(target: dict) -> dict[str, tuple[int, ...]]:
    shapes = expected_shapes(target, 1, 1)
    return {name: shapes[name.replace(".bias", ".weight")][:1] for name in ATTN_BIASES + MLP_BIASES}


def check_shapes(d: Drafter) -> None:
    want = expected_shapes(d.target, len(d.feature_layers), d.draft_vocab_size)
    optional = bias_shapes(d.target)
    have = {name: tuple(t.shape) for name, t in d.tensors.items()}
    problems = [f"{n} missing" for n in want if n not in have]
    problems += [f"{n} {list(have[n])}, expected {list(s)}" for n, s in {**want, **optional}.items()
                 if n in have and have[n] != s]
    if problems:
        raise ExportRefused(f"{d.folder}: the weights do not match config.json (draft_vocab_size {d.draft_vocab_size}, "
                            f"target_config of {d.target['model_type']!r}): {'; '.join(problems)}. Export a drafter "
                            f"saved by draftsmith with the config it was trained with")


def check_vocab_maps(d: Drafter) -> None:
    """d2t int64 offsets and t2d bool mask must describe the same sorted set of N distinct target ids."""
    d2t, t2d = d.tensors["d2t"], d.tensors["t2d"]
    if d2t.dtype != torch.int64 or t2d.dtype != torch.bool:
        raise ExportRefused(f"{d.folder}: d2t is {d2t.dtype} and t2d {t2d.dtype}; EAGLE-3 stores int64 offsets and a "
                            f"bool mask (drafters/eagle.py set_draft_vocab): save the drafter again")
    ids = torch.arange(len(d2t)) + d2t  # [N] target id of each draft id
    in_range = bool(((ids >= 0) & (ids < len(t2d))).all())
    sorted_distinct = bool((ids[1:] > ids[:-1]).all())
    if not (in_range and sorted_distinct and int(t2d.sum()) == len(ids) and bool(t2d[ids].all())):
        raise ExportRefused(f"{d.folder}: d2t and t2d disagree (target ids draft_id + d2t in range: {in_range}, "
                            f"increasing: {sorted_distinct}; t2d marks {int(t2d.sum())} ids for {len(ids)} draft "
                            f"ids). Rebuild the draft vocabulary with EagleModel.set_draft_vocab and save again")


def check_engine(d: Drafter, fmt: str) -> None:
    """Refuse what the engine's Llama EAGLE-3 layer cannot express (or its loader would drop without a word)."""
    family, L, where = d.target["model_type"], d.target["num_hidden_layers"], d.folder / "config.json"
    if family not in LLAMA_LIKE_FAMILIES:
        raise ExportRefused(f"{where}: the drafter's layer is a {family!r} decoder layer (built from its target); "
                            f"{fmt}'s EAGLE-3 head is a Llama layer, known to match for {LLAMA_LIKE_FAMILIES}. Train "
                            f"an EAGLE-3 drafter for a Llama-family target, or check the layers and extend "
                            f"LLAMA_LIKE_FAMILIES in train/export.py")
    unknown = sorted(set(d.tensors) - set(expected_shapes(d.target, 3, 1)) - set(ATTN_BIASES + MLP_BIASES))
    if unknown:
        raise ExportRefused(f"{d.folder}: tensors {unknown} have no place in {fmt}'s Llama EAGLE-3 layer; export a "
                            f"drafter whose layer is a plain Llama layer")
    if d.target["hidden_act"] != "silu":
        raise ExportRefused(f"{where}: hidden_act {d.target['hidden_act']!r}; the engines' LlamaMLP supports silu only")
    layers = d.feature_layers
    if len(set(layers)) != 3 or len(layers) != 3 or max(layers) >= L - 1 or min(layers) < 0:
        raise ExportRefused(f"{where}: feature_layers {layers} for a target of {L} layers; the engines fuse exactly 3 "
                            f"distinct layer outputs in 0..{L - 2}: they capture each layer once, at the input of the "
                            f"next layer (so the last layer's output has no capture point). Retrain with such "
                            f"feature_layers (shallow targets get repeated defaults from default_feature_layers)")
    check_biases(d, fmt)


def check_biases(d: Drafter, fmt: str) -> None:
    attn = [n for n in ATTN_BIASES if n in d.tensors]
    mlp = [n for n in MLP_BIASES if n in d.tensors]
    if not attn and not mlp:
        return
    if fmt == "sglang":
        raise ExportRefused(f"{d.folder}: the drafter has biases {attn + mlp} (a {d.target['model_type']!r} layer); "
                            f"SGLang's EAGLE Llama layers build qkv_proj and the MLP without bias and would drop "
                            f"them silently. Export with --format vllm if all of q/k/v/o carry one, or train a "
                            f"bias-free drafter")
    for group, present in ((ATTN_BIASES, attn), (MLP_BIASES, mlp)):
        if present and len(present) != len(group):
            raise ExportRefused(f"{d.folder}: biases on {[n.split('.')[-2] for n in present]} only (a "
                                f"{d.target['model_type']!r} layer); vLLM's Llama layer switches the biases "
                                f"of {[n.split('.')[-2] for n in group]} together (attention_bias / mlp_bias), so "
                                f"this layer is not expressible. Train a bias-free drafter")


# --- the engine layouts ------------------------------------------------------------------------------------------


def output_name(name: str, fmt: str) -> str:
    """draftsmith/native tensor name -> the engine checkpoint's name (speculators uses layers.0.* for midlayer.*)."""
    return "layers.0." + name.removeprefix("midlayer.") if fmt == "vllm" and name.startswith("midlayer.") else name


def rope_fields(target: dict) -> dict:
    """rope_theta / rope_scaling (what SGLang's llama reads, transformers 4 style) and the equivalent
    rope_parameters (transformers 5 style; vLLM normalises to it), from either style in the target's config."""
    params = target.get("rope_parameters")
    if params:
        if "rope_theta" not in params:
            raise ExportRefused(f"target_config.rope_parameters {params} has no rope_theta (per-layer-type rope?): "
                                f"a single Llama layer cannot express it")
        theta, scaling = params["rope_theta"], {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta, scaling = target.get("rope_theta", 10000.0), dict(target.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    scaling = None if rope_type == "default" else {"rope_type": rope_type, **scaling}
    return {"rope_theta": theta, "rope_scaling": scaling,
            "rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **(scaling or {})}}


def llama_fields(d: Drafter) -> dict:
    """The Llama layer's config keys both loaders read (one draft layer; vocab_size = the target's vocabulary)."""
    t = d.target
    heads = t["num_attention_heads"]
    fields = {
        "model_type": "llama", "hidden_size": t["hidden_size"], "intermediate_size": t["intermediate_size"],
        "num_attention_heads": heads, "num_key_value_heads": t.get("num_key_value_heads") or heads,
        "head_dim": t.get("head_dim") or t["hidden_size"] // heads, "num_hidden_layers": 1,
        "hidden_act": t["hidden_act"], "rms_norm_eps": t["rms_norm_eps"],
        "max_position_embeddings": t.get("max_position_embeddings", 2048), "vocab_size": t["vocab_size"],
        "attention_bias": ATTN_BIASES[0] in d.tensors, "mlp_bias": MLP_BIASES[0] in d.tensors,
        "tie_word_embeddings": False, **rope_fields(t),
    }
    return fields | {k: t[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if t.get(k) is not None}


def sglang_config(d: Drafter) -> dict:
    return {
        "architectures": ["LlamaForCausalLMEagle3"], **llama_fields(d), "draft_vocab_size": d.draft_vocab_size,
        "norm_before_residual": False,  # vLLM reads it (default false here); SGLang's layer is always so
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": d.engine_layers, "use_aux_hidden_state": True},
        # vLLM loads this layout too but reads the top-level key, in its own (input of layer i) convention.
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in d.engine_layers],
    }


def vllm_config(d: Drafter, verifier: str, speculative_tokens: int) -> dict:
    greedy = {"proposal_type": "greedy", "speculative_tokens": speculative_tokens, "verifier_accept_k": 1,
              "accept_tolerance": 0.0}
    return {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
        "transformer_layer_config": llama_fields(d),
        "draft_vocab_size": d.draft_vocab_size,
        # drafters/eagle.py adds the residual before hidden_norm (as EAGLE-3 does); vLLM assumes true when absent
        "norm_before_residual": False,
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in d.engine_layers],
        "speculators_config": {
            "algorithm": "eagle3", "proposal_methods": [greedy], "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": list(d.target.get("architectures") or [])},
        },
    }


def engine_fc(d: Drafter) -> torch.Tensor:
    """fc.weight [H, 3H] with its column blocks in engine order. draftsmith concatenates the features in
    feature_layers order (target/model.py target_forward), the engines in layer order; permuting the blocks of
    fc (y = sum_k W_k f_k) gives the same output."""
    fc, layers = d.tensors["fc.weight"], d.feature_layers
    if layers == d.engine_layers:
        return fc
    blocks = fc.split(fc.shape[1] // len(layers), dim=1)  # one [H, H] block per feature
    return torch.cat([blocks[k] for k in sorted(range(len(layers)), key=layers.__getitem__)], dim=1)


def target_weight(d: Drafter, source: str | None, shape: tuple[int, int], output: bool = False) -> torch.Tensor:
    """The target's input embedding (or, output=True, its LM head) [V, H], read from `source` (default: the target
    the drafter was trained on): layouts whose loaders read from the checkpoint what the drafter borrows."""
    from target.model import load_target

    name, what = source or d.config.get("target_name_or_path"), "LM head" if output else "embedding"
    if not name:
        raise ExportRefused(f"{d.folder / 'config.json'} names no target: give --target PATH (the target's checkpoint "
                            f"folder, to read its {what} from)" + ("" if output else ", or --no-embedding"))
    try:
        model, _ = load_target(name)
    except (OSError, ValueError) as err:
        raise ExportRefused(f"cannot read the {what} of target {name!r} ({str(err).splitlines()[0]}): give --target "
                            f"with a local checkpoint folder" + ("" if output else ", or --no-embedding")) from err
    weight = (model.get_output_embeddings() if output else model.get_input_embeddings()).weight.detach()
    if tuple(weight.shape) != tuple(shape):
        raise ExportRefused(f"target {name!r} has an {what} of shape {list(weight.shape)}; the drafter was trained "
                            f"on one of {list(shape)}: give --target the target it was trained on")
    return weight.contiguous()


def resolve_verifier(d: Drafter, verifier: str | None) -> str:
    """--verifier, else the target the drafter was trained on (an embedded target by its source Hub id)."""
    name = verifier or d.config.get("target_name_or_path")
    if not name:
        raise ExportRefused(f"{d.folder / 'config.json'} names no target (target_name_or_path is null): give "
                            f"--verifier HUB_ID_OR_PATH, the model vLLM should load as the target")
    return EMBEDDED_TARGET_SOURCES.get(name, name)


# --- export --------------------------------------------------------------------------------------------------------


def prepare_output(output: Path, drafter_folder: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ExportRefused(f"--output {output} is a file: give a folder")
    if output.resolve() == drafter_folder.resolve():
        raise ExportRefused(f"--output {output} is the drafter folder itself: give another folder")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ExportRefused(f"--output {output} exists and is not empty: give a new folder, or --force to overwrite "
                            f"its config.json and model.safetensors")
    stale = sorted(p.name for p in output.glob("*.safetensors*") if p.name != "model.safetensors")
    if stale:  # loaders read every shard an index lists, or every *.safetensors file
        raise ExportRefused(f"--output {output} holds other weight files {stale} that the engines would load too: "
                            f"remove them or give a new folder")
    output.mkdir(parents=True, exist_ok=True)


def export(drafter_dir: str | Path, fmt: str, output: str | Path, verifier: str | None = None,
           dtype: str | None = None, force: bool = False, speculative_tokens: int = 3, embedding: bool = True,
           target: str | None = None, mask_token_id: int | None = None) -> ExportReport:
    """Write `output`/{config.json, model.safetensors} in the layout of `fmt` ('sglang' or 'vllm') and return the
    mapping. dtype ('float32', 'float16', 'bfloat16') casts floating tensors; d2t stays int64, t2d bool.
    embedding (vllm, EAGLE-3): write the target's embed_tokens, read from `target` (default: `verifier`, else the
    drafter's target); `target` also gives Medusa heads that share the target's LM head that head. mask_token_id
    (P-EAGLE): the token whose embed_tokens row carries the placeholder (train/export_parallel.py)."""
    if fmt not in FORMATS:
        raise ExportRefused(f"--format {fmt!r}: choose one of {FORMATS}")
    if dtype is not None and dtype not in DTYPES:
        raise ExportRefused(f"--dtype {dtype!r}: choose one of {tuple(DTYPES)}")
    if speculative_tokens < 1:
        raise ExportRefused(f"--speculative-tokens {speculative_tokens}: give at least 1")
    d = read_drafter(drafter_dir)
    if d.config.get("model_type") == "draftsmith_medusa" or d.config.get("eagle_version") == 1:
        from train.export_heads import head_layout  # Medusa and EAGLE-1: built on this module's helpers

        layout = head_layout(d, fmt, target or verifier)
    elif d.config.get("model_type") == "draftsmith_dflash":
        from train.export_parallel import dflash_layout

        layout = dflash_layout(d, fmt, verifier)
    elif d.config.get("parallel_drafts"):
        from train.export_parallel import add_peagle, peagle_parts

        eagle3, placeholders = peagle_parts(d, fmt)
        layout = eagle3_layout(eagle3, fmt, verifier, d.config["parallel_drafts"], embedding, target)
        add_peagle(layout, d, placeholders, mask_token_id)
    else:
        layout = eagle3_layout(d, fmt, verifier, speculative_tokens, embedding, target)
    return write_layout(layout, d, Path(output), dtype, force)


@dataclass
class Layout:
    """An engine layout of a drafter: output name -> (draftsmith name or origin, tensor, note), its config.json
    (the dtype keys are added on writing), what to tell the user."""

    format: str
    tensors: dict[str, tuple[str, torch.Tensor, str]]
    config: dict
    notes: list[str] = field(default_factory=list)
    layer_ids: dict[str, list[int]] = field(default_factory=dict)


def eagle3_layout(d: Drafter, fmt: str, verifier: str | None, speculative_tokens: int, embedding: bool,
                  target: str | None) -> Layout:
    check_drafter(d)
    check_engine(d, fmt)
    notes = dict(IGNORED_BY_LOADERS)
    if d.feature_layers != d.engine_layers:
        notes["fc.weight"] = f"column blocks reordered from layers {d.feature_layers} to {d.engine_layers}"
    tensors = {output_name(n, fmt): (n, t, notes.get(n, ""))
               for n, t in {**d.tensors, "fc.weight": engine_fc(d)}.items()}
    layout = Layout(fmt, tensors, {}, layer_ids={"draftsmith feature_layers (layer outputs)": d.feature_layers})
    if fmt == "sglang":
        layout.config = sglang_config(d)
        layout.layer_ids["eagle_config.eagle_aux_hidden_state_layer_ids (SGLang: layer outputs)"] = d.engine_layers
        if d.engine_layers != default_feature_layers(d.target["num_hidden_layers"]):
            layout.notes.append("SafeAILab's EaModel ignores these ids and fuses EAGLE-3's default layers: serve "
                                "this drafter with SGLang or vLLM, which read them")
        if verifier:
            layout.notes.append("--verifier is not recorded in this layout: SGLang takes the target from --model-path")
    else:
        layout.config = vllm_config(d, resolve_verifier(d, verifier), speculative_tokens)
        layout.notes.append(f"verifier: {layout.config['speculators_config']['verifier']['name_or_path']}")
        if embedding:
            shape = (d.target["vocab_size"], d.target["hidden_size"])
            tensors["embed_tokens.weight"] = ("(target) embed_tokens", target_weight(d, target or verifier, shape),
                                              "the target's, frozen")
    layout.layer_ids["eagle_aux_hidden_state_layer_ids (vLLM: layer inputs)"] = \
        layout.config["eagle_aux_hidden_state_layer_ids"]
    if "embed_tokens.weight" not in tensors:
        layout.notes.append("no embed_tokens: the engine must share the target's embedding with the drafter"
                            + (" (speculators leaves it zero)" if fmt == "vllm" else ""))
    return layout


def write_layout(layout: Layout, d: Drafter, out: Path, dtype: str | None, force: bool) -> ExportReport:
    """Cast (floating tensors only), write config.json and model.safetensors, and report the mapping."""
    cast = {n: t.to(DTYPES[dtype]) if dtype and t.is_floating_point() else t for n, (_, t, _) in layout.tensors.items()}
    weight_dtype = next(str(t.dtype).removeprefix("torch.") for t in cast.values() if t.is_floating_point())
    config = with_dtype(layout.config, weight_dtype)
    prepare_output(out, d.folder, force)
    save_file({n: t.contiguous() for n, t in cast.items()}, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    report = ExportReport(layout.format, out, notes=list(layout.notes), layer_ids=dict(layout.layer_ids))
    report.rows = [TensorRow(src, name, tuple(cast[name].shape), str(cast[name].dtype).removeprefix("torch."), note)
                   for name, (src, _, note) in layout.tensors.items()]
    return report


def with_dtype(config: dict, dtype: str) -> dict:
    """config.json with the weights' dtype (both spellings), also in speculators' transformer_layer_config."""
    config = {**config, "torch_dtype": dtype, "dtype": dtype}
    if "transformer_layer_config" in config:
        config["transformer_layer_config"] |= {"torch_dtype": dtype, "dtype": dtype}
    return config


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--drafter", required=True,
                   help="a drafter folder saved by draftsmith (EAGLE-3, P-EAGLE, EAGLE-1, DFlash, Medusa)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="sglang: EAGLE-3 native, EAGLE-1 LlamaForCausalLMEagle, DFlash reference (DFLASH); vllm: "
                        "EAGLE-3, P-EAGLE and DFlash in speculators' layouts, EAGLE-1, Medusa")
    p.add_argument("--output", required=True, help="a new (or empty) folder")
    p.add_argument("--verifier", help="vllm: the target's Hub id or path (default: the drafter's target)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="cast floating tensors (default: keep them as saved)")
    p.add_argument("--speculative-tokens", type=int, default=3,
                   help="vllm EAGLE-3: draft tokens per step (default 3; P-EAGLE and DFlash: the depths they draft)")
    p.add_argument("--mask-token-id", type=int,
                   help="vllm P-EAGLE: the token whose embed_tokens row carries the placeholder (default: the "
                        "target's pad, else eos token)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --output")
    p.add_argument("--no-embedding", dest="embedding", action="store_false",
                   help="vllm: leave the target's embed_tokens out (for an engine that shares the target's)")
    p.add_argument("--target", help="the target checkpoint (folder or embedded name) to read what the layout "
                                    "carries of it (vllm EAGLE-3: embed_tokens; Medusa heads sharing the target's "
                                    "LM head: that head) (default: --verifier, else the drafter's target)")
    args = p.parse_args(argv)
    try:
        report = export(args.drafter, args.format, args.output, args.verifier, args.dtype, args.force,
                        args.speculative_tokens, args.embedding, args.target, args.mask_token_id)
    except ExportRefused as err:
        p.error(str(err))
    print(report.table())


if __name__ == "__main__":
    run_main(main)
