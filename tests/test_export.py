"""Exporting an EAGLE-3 drafter to SGLang's native layout and vLLM's speculators layout.

The expected tensor names, shapes and config keys below are written from the engines' loader code
(sglang python/sglang/srt/models/llama_eagle3.py and model_runner.py; vllm model_executor/models/llama_eagle3.py
and transformers_utils/configs/speculators/{base,algos}.py), not derived from train/export.py.
"""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config

from drafters import EagleModel
from tiny_assets import tiny_tokenizer

from train.export import FORMATS, ExportRefused, export, main

H, HEADS, KV, HEAD_DIM, INTER, V, N, LAYERS = 64, 4, 2, 16, 128, 300, 50, 4
FEATURES = [0, 1, 2]  # outputs of target layers 0, 1, 2 (layer 3 is the last)

# What LlamaForCausalLMEagle3 (SGLang) loads: fc 3H -> H, the midlayer with 2H-wide q/k/v, the draft head, d2t.
SGLANG_TENSORS = {
    "fc.weight": (H, 3 * H),
    "midlayer.input_layernorm.weight": (H,),
    "midlayer.hidden_norm.weight": (H,),
    "midlayer.self_attn.q_proj.weight": (HEADS * HEAD_DIM, 2 * H),
    "midlayer.self_attn.k_proj.weight": (KV * HEAD_DIM, 2 * H),
    "midlayer.self_attn.v_proj.weight": (KV * HEAD_DIM, 2 * H),
    "midlayer.self_attn.o_proj.weight": (H, HEADS * HEAD_DIM),
    "midlayer.post_attention_layernorm.weight": (H,),
    "midlayer.mlp.gate_proj.weight": (INTER, H),
    "midlayer.mlp.up_proj.weight": (INTER, H),
    "midlayer.mlp.down_proj.weight": (H, INTER),
    "norm.weight": (H,),
    "lm_head.weight": (N, H),
    "d2t": (N,),
}
# What vLLM's Eagle3LlamaForCausalLM loads from a speculators checkpoint: the same with layers.0.* for the layer.
VLLM_TENSORS = {k.replace("midlayer.", "layers.0."): s for k, s in SGLANG_TENSORS.items()}
SKIPPED_BY_LOADERS = {"t2d": (V,)}  # both loaders `continue` on it; kept for complete EAGLE-3 files


def target_config(family: str = "llama") -> dict:
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    return cls(hidden_size=H, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=KV,
               head_dim=HEAD_DIM, num_hidden_layers=LAYERS, vocab_size=V, max_position_embeddings=256,
               rope_theta=50000.0).to_dict()


def draft_vocab(seed: int = 0) -> torch.Tensor:
    return torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:N].sort().values  # [N] target ids


def drafter_tensors(biases: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Random weights under draftsmith's names (as drafters/eagle.py saves them), with EAGLE-3 vocabulary maps."""
    g = torch.Generator().manual_seed(1)
    tensors = {name: torch.randn(shape, generator=g) for name, shape in SGLANG_TENSORS.items() if name != "d2t"}
    for name in biases:
        tensors[name] = torch.randn(SGLANG_TENSORS[name.replace(".bias", ".weight")][0], generator=g)
    vocab = draft_vocab()
    tensors["d2t"] = vocab - torch.arange(N)
    tensors["t2d"] = torch.zeros(V, dtype=torch.bool)
    tensors["t2d"][vocab] = True
    return tensors


def write_drafter(folder, config: dict | None = None, tensors: dict | None = None, **overrides):
    folder.mkdir(parents=True)
    config = config or {"model_type": "draftsmith_eagle", "eagle_version": 3, "target_config": target_config(),
                        "feature_layers": FEATURES, "draft_vocab_size": N, "target_name_or_path": "someone/tiny-llama",
                        "target_revision": None, "step_accuracy": None, "dtype": "float32"}
    (folder / "config.json").write_text(json.dumps({**config, **overrides}))
    save_file(tensors if tensors is not None else drafter_tensors(), folder / "model.safetensors")
    return folder


@pytest.fixture
def drafter(tmp_path):
    return write_drafter(tmp_path / "drafter")


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A saved target of the drafters' shape (tokenizer included, as a target checkpoint has one)."""
    folder = tmp_path_factory.mktemp("target")
    torch.manual_seed(3)
    config = LlamaConfig(**{k: v for k, v in target_config().items() if k in (
        "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "num_hidden_layers", "vocab_size", "max_position_embeddings")}, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def read(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((folder / "config.json").read_text()), load_file(folder / "model.safetensors")


def target_ids_as_loaded(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Both loaders: target id of draft id i = i + d2t[i] (sglang hot_token_id, vllm draft_id_to_target_id)."""
    return torch.arange(len(tensors["d2t"])) + tensors["d2t"]


# --- the two layouts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,expected", [("sglang", SGLANG_TENSORS), ("vllm", VLLM_TENSORS)])
def test_every_tensor_the_loader_expects_is_there_bit_identical(drafter, target_dir, tmp_path, fmt, expected):
    report = export(drafter, fmt, tmp_path / "out", target=str(target_dir))
    _, out = read(tmp_path / "out")
    embedding = {"embed_tokens.weight": (V, H)} if fmt == "vllm" else {}  # SGLang always takes the target's
    assert {n: tuple(t.shape) for n, t in out.items()} == {**expected, **SKIPPED_BY_LOADERS, **embedding}
    src = load_file(drafter / "model.safetensors")
    for name, t in src.items():
        got = out[name.replace("midlayer.", "layers.0.") if fmt == "vllm" else name]
        assert got.dtype == t.dtype and torch.equal(got, t), name
    assert out["d2t"].dtype == torch.int64 and out["t2d"].dtype == torch.bool
    assert [r.source for r in report.rows if "(target)" not in r.source] == list(src)  # all in the report


def test_vllm_layout_carries_the_targets_embedding_unless_told_not_to(drafter, target_dir, tmp_path):
    """speculators' from_pretrained leaves a missing embed_tokens at zero: the layout carries the target's."""
    export(drafter, "vllm", tmp_path / "out", target=str(target_dir), dtype="bfloat16")
    _, out = read(tmp_path / "out")
    embedding = load_file(target_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(out["embed_tokens.weight"], embedding.to(torch.bfloat16))
    report = export(drafter, "vllm", tmp_path / "bare", embedding=False)  # no target needed then
    assert "embed_tokens.weight" not in read(tmp_path / "bare")[1]
    assert any("no embed_tokens" in n for n in report.notes)


def test_refuses_an_embedding_of_another_shape(drafter, tmp_path):
    from tiny_assets import write_tiny_target

    other = write_tiny_target(tmp_path / "other")  # vocabulary 320, not the drafter's 300
    with pytest.raises(ExportRefused, match=r"embedding of shape \[320, 64\].*\[300, 64\]"):
        export(drafter, "vllm", tmp_path / "out", target=other)
    with pytest.raises(ExportRefused, match="--no-embedding"):  # a Hub id this machine cannot reach
        export(drafter, "vllm", tmp_path / "out", target="someone/not-here")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["sglang", "vllm"])
def test_d2t_and_t2d_describe_the_draft_vocabulary(drafter, tmp_path, fmt):
    export(drafter, fmt, tmp_path / "out", embedding=False)
    _, out = read(tmp_path / "out")
    ids = target_ids_as_loaded(out)
    assert torch.equal(ids, draft_vocab())
    assert torch.equal(out["t2d"].nonzero().squeeze(1), ids)


def test_sglang_config_has_the_keys_its_loader_reads(drafter, tmp_path):
    report = export(drafter, "sglang", tmp_path / "out")
    assert any("EaModel ignores these ids" in n for n in report.notes)  # [0, 1, 2] is not EAGLE-3's default
    config, _ = read(tmp_path / "out")
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["model_type"] == "llama"
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                   "head_dim", "num_hidden_layers", "vocab_size", "draft_vocab_size")} == {
        "hidden_size": H, "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV,
        "head_dim": HEAD_DIM, "num_hidden_layers": 1, "vocab_size": V, "draft_vocab_size": N}
    assert config["tie_word_embeddings"] is False  # true would make lm_head the [V, H] embedding
    assert config["hidden_act"] == "silu" and config["rms_norm_eps"] == target_config()["rms_norm_eps"]
    assert config["rope_theta"] == 50000.0 and config["rope_scaling"] is None
    assert config["max_position_embeddings"] == 256
    # SGLang: eagle_config ids are layer outputs (it adds 1); vLLM, loading the same folder, reads the top-level
    # key as layer inputs.
    assert config["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": FEATURES, "use_aux_hidden_state": True}
    assert config["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in FEATURES]
    assert config["norm_before_residual"] is False and config["torch_dtype"] == "float32"
    loaded = LlamaConfig.from_pretrained(tmp_path / "out")  # the config class both engines build it with
    assert loaded.draft_vocab_size == N and loaded.rope_parameters["rope_theta"] == 50000.0
    assert loaded.num_hidden_layers == 1 and loaded.vocab_size == V


def test_vllm_config_has_the_keys_speculators_and_vllm_read(drafter, tmp_path):
    export(drafter, "vllm", tmp_path / "out", speculative_tokens=4, embedding=False)
    config, _ = read(tmp_path / "out")
    assert config["speculators_model_type"] == "eagle3"
    spec = config["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0]["proposal_type"] == "greedy"
    assert spec["proposal_methods"][0]["speculative_tokens"] == 4
    assert spec["verifier"]["name_or_path"] == "someone/tiny-llama"
    assert spec["verifier"]["architectures"] == (target_config().get("architectures") or [])
    layer = config["transformer_layer_config"]
    assert {k: layer[k] for k in ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                                  "num_key_value_heads", "head_dim", "num_hidden_layers", "vocab_size",
                                  "hidden_act", "attention_bias", "mlp_bias")} == {
        "model_type": "llama", "hidden_size": H, "intermediate_size": INTER, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "head_dim": HEAD_DIM, "num_hidden_layers": 1, "vocab_size": V,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    assert layer["rope_theta"] == 50000.0
    assert config["draft_vocab_size"] == N
    assert config["norm_before_residual"] is False  # vLLM's update_eagle3 defaults it to True when absent
    assert config["eagle_aux_hidden_state_layer_ids"] == [i + 1 for i in FEATURES]  # vLLM: inputs of layer i
    assert LlamaConfig(**layer).vocab_size == V  # speculators validates it through AutoConfig.for_model


def test_dtype_cast_keeps_the_vocabulary_maps(drafter, tmp_path):
    export(drafter, "vllm", tmp_path / "out", dtype="bfloat16", embedding=False)
    config, out = read(tmp_path / "out")
    src = load_file(drafter / "model.safetensors")
    assert torch.equal(out["layers.0.mlp.up_proj.weight"], src["midlayer.mlp.up_proj.weight"].to(torch.bfloat16))
    assert all(t.dtype == torch.bfloat16 for n, t in out.items() if n not in ("d2t", "t2d"))
    assert out["d2t"].dtype == torch.int64 and out["t2d"].dtype == torch.bool
    assert config["torch_dtype"] == "bfloat16" and config["transformer_layer_config"]["torch_dtype"] == "bfloat16"


def test_full_attention_bias_goes_to_vllm_only(tmp_path):
    biases = tuple(f"midlayer.self_attn.{p}_proj.bias" for p in "qkvo")
    folder = write_drafter(tmp_path / "drafter", tensors=drafter_tensors(biases))
    export(folder, "vllm", tmp_path / "vllm", embedding=False)
    config, out = read(tmp_path / "vllm")
    assert config["transformer_layer_config"]["attention_bias"] is True
    assert out["layers.0.self_attn.o_proj.bias"].shape == (H,)
    with pytest.raises(ExportRefused, match="SGLang.*without bias"):
        export(folder, "sglang", tmp_path / "sglang")


def test_embedded_target_is_named_by_its_hub_id(tmp_path):
    folder = write_drafter(tmp_path / "drafter", target_name_or_path="smollm2-135m-instruct")
    export(folder, "vllm", tmp_path / "out", embedding=False)
    config, _ = read(tmp_path / "out")
    assert config["speculators_config"]["verifier"]["name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_cli_prints_the_mapping(drafter, tmp_path, capsys):
    main(["--drafter", str(drafter), "--format", "vllm", "--output", str(tmp_path / "out"), "--verifier", "x/y",
          "--no-embedding"])
    printed = capsys.readouterr().out
    assert re.search(r"midlayer\.self_attn\.q_proj\.weight +-> layers\.0\.self_attn\.q_proj\.weight", printed)
    assert "t2d" in printed and "verifier: x/y" in printed
    with pytest.raises(SystemExit):  # a refusal ends as a usage error, not a traceback
        main(["--drafter", str(drafter), "--format", "vllm", "--output", str(tmp_path / "out"), "--no-embedding"])


# --- refusals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,message", [("sglang", "SGLang.*without bias"), ("vllm", "not expressible")])
def test_refuses_qwen2_qkv_bias(tmp_path, fmt, message):
    biases = tuple(f"midlayer.self_attn.{p}_proj.bias" for p in "qkv")  # Qwen2's layer: q/k/v bias, o_proj none
    folder = write_drafter(tmp_path / "drafter", tensors=drafter_tensors(biases), target_config=target_config("qwen2"))
    with pytest.raises(ExportRefused, match=message):
        export(folder, fmt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_llama_family(tmp_path):
    folder = write_drafter(tmp_path / "drafter", target_config={**target_config(), "model_type": "gemma"})
    with pytest.raises(ExportRefused, match="'gemma' decoder layer"):
        export(folder, "vllm", tmp_path / "out")


def test_refuses_a_non_empty_output_unless_forced(drafter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportRefused, match="not empty"):
        export(drafter, "sglang", out)
    export(drafter, "sglang", out, force=True)
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "keep me"
    (out / "model-00001-of-00002.safetensors").write_bytes(b"")  # a stale shard the engine would load as well
    with pytest.raises(ExportRefused, match="other weight files"):
        export(drafter, "sglang", out, force=True)


def test_refuses_missing_weights_and_config(drafter, tmp_path):
    (drafter / "model.safetensors").unlink()
    with pytest.raises(ExportRefused, match="weights are missing"):
        export(drafter, "sglang", tmp_path / "out")
    with pytest.raises(ExportRefused, match="config.json does not exist"):
        export(tmp_path, "sglang", tmp_path / "out")


@pytest.mark.parametrize("layers", [[0, 1, LAYERS - 1], [1, 2, 2]])
def test_refuses_layers_the_engines_cannot_capture(tmp_path, layers):
    folder = write_drafter(tmp_path / "drafter", feature_layers=layers)  # the last layer; a repeated layer
    with pytest.raises(ExportRefused, match="no capture point"):
        export(folder, "vllm", tmp_path / "out")


@pytest.mark.parametrize("fmt", ["sglang", "vllm"])
def test_unsorted_feature_layers_are_written_in_engine_order(tmp_path, fmt):
    """The engines concatenate the captured layers in layer order; draftsmith in feature_layers order."""
    folder = write_drafter(tmp_path / "drafter", feature_layers=[2, 0, 1])
    export(folder, fmt, tmp_path / "out", embedding=False)
    config, out = read(tmp_path / "out")
    ids = config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] if fmt == "sglang" else None
    assert ids in (None, [0, 1, 2]) and config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    g = torch.Generator().manual_seed(2)
    f = {layer: torch.randn(7, H, generator=g, dtype=torch.float64) for layer in (0, 1, 2)}  # layer outputs [7, H]
    fc_in = load_file(folder / "model.safetensors")["fc.weight"].double()
    drafted = torch.cat([f[2], f[0], f[1]], dim=-1) @ fc_in.T  # what draftsmith computed
    served = torch.cat([f[0], f[1], f[2]], dim=-1) @ out["fc.weight"].double().T  # what the engine computes
    torch.testing.assert_close(served, drafted)


@pytest.mark.parametrize("change,message", [
    ({"draft_vocab_size": N + 10}, r"lm_head.weight \[50, 64\], expected \[60, 64\]"),
    ({"model_type": "llama"}, "expected 'draftsmith_eagle', 'draftsmith_dflash' or 'draftsmith_medusa'"),
])
def test_refuses_a_config_that_does_not_fit(tmp_path, change, message):
    folder = write_drafter(tmp_path / "drafter", **change)
    with pytest.raises(ExportRefused, match=message):
        export(folder, "sglang", tmp_path / "out")


@pytest.mark.parametrize("edit,message", [
    ("flip_t2d", "d2t and t2d disagree"),
    ("extra_tensor", r"q_norm.weight'\] have no place in vllm's Llama"),
])
def test_refuses_inconsistent_weights(tmp_path, edit, message):
    tensors = drafter_tensors()
    if edit == "flip_t2d":
        tensors["t2d"][int(draft_vocab()[0])] = False
    else:
        tensors["midlayer.self_attn.q_norm.weight"] = torch.ones(HEAD_DIM)  # a Qwen3-style layer
    folder = write_drafter(tmp_path / "drafter", tensors=tensors)
    with pytest.raises(ExportRefused, match=message):
        export(folder, "vllm", tmp_path / "out")


def test_refuses_vllm_without_a_verifier(tmp_path):
    folder = write_drafter(tmp_path / "drafter", target_name_or_path=None)
    with pytest.raises(ExportRefused, match="--verifier"):
        export(folder, "vllm", tmp_path / "out")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_drafter_saved_by_draftsmith_exports_completely(tmp_path, fmt):
    """A real EagleModel (8-layer tiny Llama target, default feature layers [1, 3, 4]) saved with save_pretrained:
    every saved tensor lands in the export, bit-identical, under its engine name."""
    torch.manual_seed(0)
    target = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    drafter = EagleModel.from_target(target, version=3, draft_vocab=list(range(0, 300, 3)),
                                     target_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert drafter.config.feature_layers == [1, 3, 4]
    drafter.save_pretrained(tmp_path / "drafter")
    target.save_pretrained(tmp_path / "target")
    tiny_tokenizer().save_pretrained(tmp_path / "target")
    report = export(tmp_path / "drafter", fmt, tmp_path / "out", target=str(tmp_path / "target"))
    assert not any("EaModel" in n for n in report.notes)  # the default layers: what EaModel hard-codes
    exported = load_file(str(tmp_path / "out" / "model.safetensors"))
    if fmt == "vllm":
        assert torch.equal(exported.pop("embed_tokens.weight"), target.get_input_embeddings().weight)
    prefix = "midlayer." if fmt == "sglang" else "layers.0."
    for name, tensor in drafter.state_dict().items():
        key = name.replace("midlayer.", prefix)
        assert torch.equal(exported[key], tensor), name
    assert len(exported) == len(drafter.state_dict())


# --- Medusa heads and EAGLE-1 drafters ---------------------------------------------------------------------------
# Names and config keys as vLLM's MedusaModel (model_executor/models/medusa.py, transformers_utils/configs/medusa.py),
# vLLM's EagleLlamaForCausalLM (models/llama_eagle.py) and SGLang's LlamaForCausalLMEagle (srt/models/llama_eagle.py)
# read them.

def saved(model, folder):
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_target():
    torch.manual_seed(4)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                        num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM,
                                        tie_word_embeddings=False, rope_theta=50000.0)).eval()


def test_medusa_heads_in_vllms_medusa_layout(llama_target, tmp_path):
    from drafters import MedusaModel

    heads = MedusaModel.from_target(llama_target, num_heads=3, num_layers=2, target_name_or_path="someone/tiny")
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
    export(saved(heads, tmp_path / "drafter"), "vllm", tmp_path / "out")
    config, out = read(tmp_path / "out")
    expected = {f"blocks.{k}.layers.{j}.{p}": (H, H) if p == "weight" else (H,)
                for k in range(3) for j in range(2) for p in ("weight", "bias")}
    expected |= {f"lm_heads.{k}.weight": (V, H) for k in range(3)}
    assert {n: tuple(t.shape) for n, t in out.items()} == expected
    assert torch.equal(out["blocks.2.layers.1.bias"], heads.blocks[2][1].linear.bias)
    assert torch.equal(out["lm_heads.1.weight"], heads.lm_heads[1].weight)
    assert {k: config[k] for k in ("architectures", "model_type", "hidden_size", "vocab_size", "num_heads",
                                   "num_hidden_layers", "truncated_vocab_size", "medusa_fc_bias",
                                   "original_lm_head")} == {
        "architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": H, "vocab_size": V, "num_heads": 3,
        "num_hidden_layers": 2, "truncated_vocab_size": V, "medusa_fc_bias": True, "original_lm_head": False}
    with pytest.raises(ExportRefused, match="no sglang layout"):
        export(tmp_path / "drafter", "sglang", tmp_path / "sglang")


def test_medusa_heads_sharing_the_targets_head_carry_it_once(llama_target, target_dir, tmp_path):
    from drafters import MedusaModel

    heads = MedusaModel.from_target(llama_target, num_heads=2, share_lm_head=True)
    export(saved(heads, tmp_path / "drafter"), "vllm", tmp_path / "out", target=str(target_dir))
    config, out = read(tmp_path / "out")
    head = load_file(target_dir / "model.safetensors")["lm_head.weight"]
    assert config["original_lm_head"] is True and torch.equal(out["lm_heads.0.weight"], head)
    assert not any(n.startswith("lm_heads.1") for n in out)  # vLLM loads one head for all (lm_heads.0.weight)


EAGLE1_LAYER = {  # SafeAILab's EAGLE-1 layer: q/k/v read H (fc already fused the pair), no input_layernorm
    "layers.0.self_attn.q_proj.weight": (HEADS * HEAD_DIM, H), "layers.0.self_attn.k_proj.weight": (KV * HEAD_DIM, H),
    "layers.0.self_attn.v_proj.weight": (KV * HEAD_DIM, H), "layers.0.self_attn.o_proj.weight": (H, HEADS * HEAD_DIM),
    "layers.0.post_attention_layernorm.weight": (H,), "layers.0.mlp.gate_proj.weight": (INTER, H),
    "layers.0.mlp.up_proj.weight": (INTER, H), "layers.0.mlp.down_proj.weight": (H, INTER),
    "fc.weight": (H, 2 * H),
}


@pytest.mark.parametrize("fmt,arch", [("sglang", "LlamaForCausalLMEagle"), ("vllm", "LlamaForCausalLM")])
def test_eagle1_in_the_engines_eagle_layouts(llama_target, tmp_path, fmt, arch):
    drafter = EagleModel.from_target(llama_target, version=1, target_name_or_path="someone/tiny")
    if fmt == "vllm":
        torch.nn.init.zeros_(drafter.fc.bias)  # vLLM's EAGLE-1 fc has no bias: only a zero one is expressible
    export(saved(drafter, tmp_path / "drafter"), fmt, tmp_path / "out")
    config, out = read(tmp_path / "out")
    expected = EAGLE1_LAYER | ({"fc.bias": (H,)} if fmt == "sglang" else {})
    assert {n: tuple(t.shape) for n, t in out.items()} == expected
    state = drafter.state_dict()
    for name, t in out.items():
        assert torch.equal(t, state[name.replace("layers.0.", "midlayer.")]), name
    assert config["architectures"] == [arch] and config["model_type"] == "llama"
    assert {k: config[k] for k in ("num_hidden_layers", "vocab_size", "hidden_size", "tie_word_embeddings")} == {
        "num_hidden_layers": 1, "vocab_size": V, "hidden_size": H, "tie_word_embeddings": False}
    assert config["rope_theta"] == 50000.0 and "draft_vocab_size" not in config
    assert config["bias"] is (fmt == "sglang")  # fc's bias, as SafeAILab's EaModel reads it (default true)


def test_eagle1_refusals(llama_target, tmp_path):
    drafter = EagleModel.from_target(llama_target, version=1)
    torch.nn.init.ones_(drafter.fc.bias)
    folder = saved(drafter, tmp_path / "drafter")
    with pytest.raises(ExportRefused, match="fc.bias is not zero.*--format sglang"):
        export(folder, "vllm", tmp_path / "out")
    tensors = load_file(folder / "model.safetensors")
    tensors["midlayer.input_layernorm.weight"] = torch.ones(H)  # a layer EAGLE-1 does not have
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ExportRefused, match="input_layernorm.weight has no place"):
        export(folder, "sglang", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- parallel drafters: DFlash (the reference layout, speculators' dflash) and P-EAGLE (speculators' peagle) ------


def eight_layer_target() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        pad_token_id=0)).eval()


@pytest.mark.parametrize("fmt", FORMATS)
def test_dflash_exports_every_tensor_with_the_ids_each_loader_reads(tmp_path, fmt):
    from drafters import DFlashModel

    drafter = DFlashModel.from_target(eight_layer_target(), num_layers=2, block_size=5, feature_layers=[5, 1, 3],
                                      layer_family="qwen3", target_name_or_path="someone/target")
    report = export(saved(drafter, tmp_path / "drafter"), fmt, tmp_path / "out")
    config, exported = read(tmp_path / "out")
    assert exported.keys() == drafter.state_dict().keys()
    assert all(torch.equal(exported[k], v) for k, v in drafter.state_dict().items() if k != "fc.weight")
    features = torch.randn(3, 64)  # the outputs of layers 5, 1, 3: the engines concatenate them in layer order
    assert torch.allclose(exported["fc.weight"] @ features[[1, 2, 0]].flatten(), drafter.fc.weight @ features.flatten(),
                          atol=1e-5)
    layers = config["transformer_layer_config"] if fmt == "vllm" else config
    assert (layers["model_type"], layers["num_hidden_layers"], layers["layer_types"]) == \
        ("qwen3", 2, ["full_attention"] * 2)
    if fmt == "sglang":  # z-lab reads hidden_states[id + 1]: draftsmith's layer outputs, sorted
        assert config["dflash_config"] == {"mask_token_id": 0, "target_layer_ids": [1, 3, 5]}
        assert (config["block_size"], config["num_target_layers"], config["architectures"]) == \
            (5, 8, ["DFlashDraftModel"])
    else:
        assert config["aux_hidden_state_layer_ids"] == [2, 4, 6] and config["mask_token_id"] == 0
        assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
        assert config["speculators_config"]["verifier"]["name_or_path"] == "someone/target"
    assert all(r.source == r.output for r in report.rows) and "reordered" in report.table()


def test_dflash_export_refuses_layers_the_engines_do_not_run(tmp_path):
    from drafters import DFlashModel

    target = eight_layer_target()
    own = saved(DFlashModel.from_target(target, feature_layers=[1, 3]), tmp_path / "llama_layers")
    with pytest.raises(ExportRefused, match="'llama' layers.*drafter.layer_family=qwen3"):
        export(own, "sglang", tmp_path / "a")
    last = saved(DFlashModel.from_target(target, feature_layers=[1, 7], layer_family="qwen3"), tmp_path / "last")
    with pytest.raises(ExportRefused, match="last layer.*--format sglang"):
        export(last, "vllm", tmp_path / "b", verifier="someone/target")
    export(last, "sglang", tmp_path / "c")


def test_peagle_exports_its_placeholders_to_speculators(tmp_path):
    target = eight_layer_target()
    target.save_pretrained(tmp_path / "target")
    tiny_tokenizer().save_pretrained(tmp_path / "target")
    drafter = EagleModel.from_target(target, version=3, feature_layers=[4, 1, 2], parallel_drafts=4)
    with torch.no_grad():
        drafter.mask_embedding.normal_()
    saved(drafter, tmp_path / "drafter")
    with pytest.raises(ExportRefused, match="no sglang layout.*--format vllm"):
        export(tmp_path / "drafter", "sglang", tmp_path / "a")
    export(tmp_path / "drafter", "vllm", tmp_path / "out", target=str(tmp_path / "target"), verifier="x/y",
           mask_token_id=7)
    config, exported = read(tmp_path / "out")
    assert (config["speculators_model_type"], config["architectures"], config["mask_token_id"]) == \
        ("peagle", ["PEagleSpeculator"], 7)
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    embed, want = exported["embed_tokens.weight"], target.get_input_embeddings().weight
    assert torch.equal(embed[7], drafter.mask_embedding.detach())
    assert torch.equal(torch.cat([embed[:7], embed[8:]]), torch.cat([want[:7], want[8:]]))
    # the engine fuses the placeholder feature with its reordered fc exactly as the drafter does
    engine = exported["fc.weight"] @ exported["mask_hidden"].flatten()
    assert exported["mask_hidden"].shape == (1, 1, 3 * 64)
    assert torch.allclose(engine, drafter.fc.weight @ drafter.mask_hidden, atol=1e-5)
    assert not torch.equal(exported["mask_hidden"].flatten(), drafter.mask_hidden.detach())  # it was reordered
