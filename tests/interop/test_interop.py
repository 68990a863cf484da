"""Interop tier: each export is loaded by the reference implementation itself, in its own virtual environment
(tests/interop/setup.sh), and must give draftsmith's outputs on the same inputs. Opt-in (-m interop; see
docs/export.md): skipped unless DRAFTSMITH_INTEROP names the folder setup.sh built.

Checked per export: the reference loader reports no missing or unexpected keys beyond what it fills from the
target, and its logits equal draftsmith's (max |delta| <= 1e-4 in float32)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, DynamicCache

from drafters import EagleModel
from target.model import target_forward
from tiny_assets import tiny_tokenizer, VOCAB
from train.eagle_objective import causal_mask
from train.export import export

pytestmark = pytest.mark.interop
HERE = Path(__file__).parent
TOLERANCE = 1e-4
STEPS = 3  # training-time-test steps compared


def reference_python(env: str) -> str:
    root = os.environ.get("DRAFTSMITH_INTEROP")
    if not root:
        pytest.skip("interop tier: set DRAFTSMITH_INTEROP to the folder tests/interop/setup.sh built")
    python = Path(root) / env / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"{python} does not exist: run tests/interop/setup.sh {root} {env}")
    return str(python)


def run_reference(env: str, script: str, *args, extra_env: dict | None = None) -> None:
    done = subprocess.run([reference_python(env), str(HERE / script), *map(str, args)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, **(extra_env or {})})
    if done.returncode:
        pytest.fail(f"{script} in the {env} environment failed:\n{done.stderr[-4000:]}")


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A tiny Llama target (8 layers, so that EAGLE-3's default layers are distinct and capturable), saved with
    its tokenizer like a Hub checkpoint."""
    folder = tmp_path_factory.mktemp("target")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, tie_word_embeddings=False,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(folder, max_shard_size="200KB")  # sharded, with an index: what EAGLE's loader reads
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def target(target_dir):
    return LlamaForCausalLM.from_pretrained(target_dir).eval().requires_grad_(False)


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every weight moved off its initial value (norms off 1, biases off 0), so a loader that drops or misplaces
    any tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def eagle3(target, tmp_path_factory):
    """An EAGLE-3 drafter (default feature layers, a draft vocabulary of every other token) saved by draftsmith."""
    torch.manual_seed(2)
    drafter = perturbed(EagleModel.from_target(target, version=3, draft_vocab=list(range(0, VOCAB, 2))))
    folder = tmp_path_factory.mktemp("eagle3") / "drafter"
    drafter.save_pretrained(folder)
    return drafter.eval(), folder


def prompt_ids(n: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))  # [1, T]


@torch.no_grad()
def eagle3_ttt_logits(drafter: EagleModel, features: torch.Tensor, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """draftsmith's logits [steps, n, N] of the training-time test on one sequence (train/eagle_objective.py's
    loop, without the loss): step i at anchor j reads token x_{j+1+i} at position j + i and step i-1's output."""
    n = ids.shape[1] - 1
    tokens = torch.cat([ids, ids.new_zeros(1, steps)], dim=1)
    h, cache, mask = drafter.fuse(features[:, :n]), DynamicCache(), causal_mask(n, torch.float32, ids.device)
    out = []
    for i in range(steps):
        h = drafter(tokens[:, 1 + i:1 + i + n], h, (torch.arange(n) + i)[None], mask, cache, ttt=True)
        out.append(drafter.logits(h)[0])
    return torch.stack(out)


def reference_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def eagle_repo() -> str:
    repo = os.environ.get("DRAFTSMITH_EAGLE_REPO")
    if not repo:
        pytest.skip("SafeAILab's EAGLE code is not on PyPI (eagle-llm stops at 1.2.1, before EAGLE-3): set "
                    "DRAFTSMITH_EAGLE_REPO to a checkout of github.com/SafeAILab/EAGLE")
    if not (Path(repo) / "eagle" / "model" / "cnets.py").is_file():
        pytest.fail(f"DRAFTSMITH_EAGLE_REPO={repo} has no eagle/model/cnets.py: point it at an EAGLE checkout")
    return repo


def test_speculators_loads_the_vllm_layout_and_matches(eagle3, target, target_dir, tmp_path):
    """speculators 0.9.0's Eagle3DraftModel on the vllm export: complete (nothing missing but the verifier's
    norm and LM head, which only its training loss reads), and the same logits at every training-time-test step."""
    drafter, folder = eagle3
    export(folder, "vllm", tmp_path / "export", verifier=str(target_dir))
    ids = prompt_ids()
    features = target_forward(target, ids, feature_layers=drafter.config.feature_layers).features  # [1, T, 3H]
    expected = eagle3_ttt_logits(drafter, features, ids, STEPS)
    n = ids.shape[1] - 1
    save_file({"features": features[:, :n].contiguous(), "tokens": ids[:, 1:].contiguous(),
               "steps": torch.tensor([STEPS])}, tmp_path / "inputs.safetensors")
    run_reference("speculators", "ref_speculators.py", tmp_path / "export", tmp_path / "inputs.safetensors",
                  tmp_path / "out.safetensors")
    keys = json.loads(reference_meta(tmp_path / "out.safetensors")["keys"])
    assert keys["unexpected"] == []
    assert keys["missing"] == ["verifier_lm_head.weight", "verifier_norm.weight"]
    got = load_file(tmp_path / "out.safetensors")["logits"]
    assert got.shape == expected.shape
    deltas = [(got[step] - expected[step]).abs().max().item() for step in range(STEPS)]
    print(f"speculators, vllm layout: max |delta logit| per training-time-test step {deltas}")
    assert max(deltas) <= TOLERANCE, f"max |delta logit| per training-time-test step: {deltas}"


def test_eagle_reference_loads_the_native_layout_matches_and_decodes_losslessly(eagle3, target, target_dir,
                                                                               tmp_path):
    """SafeAILab's EAGLE-3 code (cnets.Model, EaModel) on the sglang export: nothing missing but the embedding it
    reads from the target, nothing unexpected, the same first-step logits, and EaModel.eagenerate's greedy output
    equal to the target's own greedy decoding (its feature capture is hard-coded to EAGLE-3's default layers,
    which this drafter uses)."""
    from inference.speculative import plain_generate

    repo = eagle_repo()
    drafter, folder = eagle3
    export(folder, "sglang", tmp_path / "export")
    ids, new_tokens = prompt_ids(), 40
    features = target_forward(target, ids, feature_layers=drafter.config.feature_layers).features
    expected = eagle3_ttt_logits(drafter, features, ids, 1)[0]                                 # [n, N]
    n = ids.shape[1] - 1
    save_file({"ids": ids.clone(), "features": features[:, :n].contiguous(), "tokens": ids[:, 1:].contiguous(),
               "prompt": ids[:, :8].clone(),
               "new_tokens": torch.tensor([new_tokens])}, tmp_path / "inputs.safetensors")
    run_reference("eagle", "ref_eagle.py", 3, tmp_path / "export", target_dir, tmp_path / "inputs.safetensors",
                  tmp_path / "out.safetensors", extra_env={"DRAFTSMITH_EAGLE_REPO": repo})
    meta = reference_meta(tmp_path / "out.safetensors")
    assert json.loads(meta["keys"]) == {"missing": ["embed_tokens.weight"], "unexpected": []}
    out = load_file(tmp_path / "out.safetensors")
    feature_delta = (out["features"] - features[0]).abs().max().item()  # EaModel ignores the ids in config.json
    assert feature_delta <= TOLERANCE, f"EaModel fuses other layers than {drafter.config.feature_layers}"
    delta = (out["logits"] - expected).abs().max().item()
    print(f"EAGLE reference, native layout: max |delta feature| {feature_delta:.1e}, |delta logit| {delta:.1e}, "
          f"eagenerate tau {float(meta['tau']):.2f}")
    assert delta <= TOLERANCE, f"first draft step: max |delta logit| {delta:.2e}"
    greedy = plain_generate(target, ids[0, :8], new_tokens, set()).tokens
    generated = out["generated"].tolist()
    assert len(generated) >= new_tokens and generated[:new_tokens] == greedy, f"tau {meta['tau']}"


@pytest.fixture(scope="module")
def eagle1(target, tmp_path_factory):
    """An EAGLE-1 drafter saved by draftsmith; fc.bias zero, so that vLLM's layout (no fc bias) can express it."""
    torch.manual_seed(5)
    drafter = perturbed(EagleModel.from_target(target, version=1))
    torch.nn.init.zeros_(drafter.fc.bias)
    folder = tmp_path_factory.mktemp("eagle1") / "drafter"
    drafter.save_pretrained(folder)
    return drafter.eval(), folder


@pytest.mark.parametrize("fmt", ["sglang", "vllm"])
def test_eagle_reference_loads_eagle1_exports_matches_and_decodes_losslessly(eagle1, target, target_dir, tmp_path,
                                                                             fmt):
    """SafeAILab's EAGLE-1 code (cnets1.Model, EaModel with use_eagle3=False), whose layout both engines' EAGLE-1
    loaders follow: nothing missing but the embedding, the same logits through the target's head, lossless."""
    from inference.speculative import plain_generate

    repo = eagle_repo()
    drafter, folder = eagle1
    export(folder, fmt, tmp_path / "export")
    ids, new_tokens = prompt_ids(), 40
    hidden = target_forward(target, ids).hidden_states                                         # [1, T, H]
    n = ids.shape[1] - 1
    mask = causal_mask(n, torch.float32, ids.device)
    with torch.no_grad():
        expected = drafter.logits(drafter(ids[:, 1:], hidden[:, :n], torch.arange(n)[None], mask))[0]  # [n, V]
    save_file({"ids": ids.clone(), "features": hidden[:, :n].contiguous(), "tokens": ids[:, 1:].contiguous(),
               "prompt": ids[:, :8].clone(), "new_tokens": torch.tensor([new_tokens])}, tmp_path / "inputs.safetensors")
    run_reference("eagle", "ref_eagle.py", 1, tmp_path / "export", target_dir, tmp_path / "inputs.safetensors",
                  tmp_path / "out.safetensors", extra_env={"DRAFTSMITH_EAGLE_REPO": repo})
    meta = reference_meta(tmp_path / "out.safetensors")
    assert json.loads(meta["keys"]) == {"missing": ["embed_tokens.weight"], "unexpected": []}
    out = load_file(tmp_path / "out.safetensors")
    feature_delta = (out["features"] - hidden[0]).abs().max().item()
    delta = (out["logits"] - expected).abs().max().item()
    print(f"EAGLE reference, EAGLE-1 {fmt} layout: max |delta feature| {feature_delta:.1e}, |delta logit| "
          f"{delta:.1e}, eagenerate tau {float(meta['tau']):.2f}")
    assert feature_delta <= TOLERANCE and delta <= TOLERANCE, f"features {feature_delta:.2e}, logits {delta:.2e}"
    greedy = plain_generate(target, ids[0, :8], new_tokens, set()).tokens
    generated = out["generated"].tolist()
    assert len(generated) >= new_tokens and generated[:new_tokens] == greedy, f"tau {meta['tau']}"
