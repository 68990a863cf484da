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

from drafters import DFlashModel, EagleModel
from inference.dflash_proposer import DFlashProposer
from inference.eagle_proposer import ParallelEagleProposer
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


# --- parallel drafters: DFlash and P-EAGLE ----------------------------------------------------------------------

BLOCK = 4     # DFlash block: the root and 3 mask slots
DEPTHS = 3    # P-EAGLE: the root's pair and 2 placeholders


@pytest.fixture(scope="module")
def dflash(target, tmp_path_factory):
    """A DFlash drafter of 2 Qwen3 layers (the engines' layer) reading layers 1 and 4 (not the target's last, which
    speculators reads apart), every weight perturbed, saved by draftsmith."""
    torch.manual_seed(6)
    drafter = perturbed(DFlashModel.from_target(target, num_layers=2, block_size=BLOCK, feature_layers=[1, 4],
                                                layer_family="qwen3"))
    folder = tmp_path_factory.mktemp("dflash") / "drafter"
    drafter.save_pretrained(folder)
    return drafter.eval(), folder


@pytest.fixture(scope="module")
def peagle(target, tmp_path_factory):
    """A P-EAGLE drafter (3 depths per forward, half the vocabulary), every weight perturbed: mask_embedding and
    mask_hidden too, so that a placeholder exported to the wrong row, block order or place changes the logits."""
    torch.manual_seed(7)
    drafter = perturbed(EagleModel.from_target(target, version=3, draft_vocab=list(range(0, VOCAB, 2)),
                                               parallel_drafts=DEPTHS))
    folder = tmp_path_factory.mktemp("peagle") / "drafter"
    drafter.save_pretrained(folder)
    return drafter.eval(), folder


def prompt_and_root(target, feature_layers: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A verified prefix: ids [1, T], the target's features of it [1, T, F], and its greedy next token (the root)."""
    ids = prompt_ids()
    out = target_forward(target, ids, feature_layers=feature_layers)
    return ids, out.features, int(out.logits[0, -1].argmax())


def proposal_forward(proposer, ids: torch.Tensor, features: torch.Tensor, root: int) -> tuple[tuple, torch.Tensor]:
    """The drafter forward of the proposer's first proposal after the prefix (captured by a hook): its positional
    arguments and its output, exactly what decoding computes."""
    calls = []
    hook = proposer.drafter.register_forward_hook(lambda module, args, out: calls.append((args, out)))
    try:
        proposer.begin(ids[0], features[0])
        proposer.propose(root)
    finally:
        hook.remove()
    assert len(calls) == 1, f"one drafter forward per proposal, got {len(calls)}"
    return calls[0]


@torch.no_grad()
def dflash_block(drafter: DFlashModel, target) -> dict[str, torch.Tensor | dict]:
    """draftsmith's first block after the prompt, as DFlashProposer drafts it (context of positions 0..a-1, block
    [root, mask, ...] at a..a+B-1): logits [B, V], positions [B], the logits of the same block one position later
    [B, V], and the reference's inputs (context features [1, a, F], root [1])."""
    ids, features, root = prompt_and_root(target, drafter.config.feature_layers)
    chain = [(0,) * d for d in range(1, BLOCK)]
    (tokens, positions, context), out = proposal_forward(DFlashProposer(drafter, chain), ids, features, root)
    assert tokens[0].tolist() == [root] + [drafter.config.mask_token_id] * (BLOCK - 1)
    return {"logits": drafter.logits(out[0]), "positions": positions[0],
            "shifted": drafter.logits(drafter(tokens, positions + 1, context)[0]),
            "inputs": {"features": features.contiguous(), "root": torch.tensor([root])}}


def check_dflash_reference(block: dict, out_path: Path, label: str) -> None:
    """The reference's block equals draftsmith's: the same positions (the root's first), the same logits; and the
    comparison sees positions (the block one position later is off by far more than the tolerance)."""
    assert json.loads(reference_meta(out_path)["keys"]) == {
        "missing": ["embed_tokens.weight", "lm_head.weight", "verifier_lm_head.weight", "verifier_norm.weight"],
        "unexpected": []}  # all four filled from the verifier
    got = load_file(out_path)
    assert got["positions"].tolist() == block["positions"].tolist(), "block positions differ"
    delta = (got["logits"] - block["logits"]).abs().max().item()
    off = (got["logits"] - block["shifted"]).abs().max().item()
    print(f"speculators, DFlash {label}: block positions {got['positions'].tolist()}, max |delta logit| "
          f"{delta:.1e} (block shifted by one position: {off:.1e})")
    assert delta <= TOLERANCE, f"max |delta logit| {delta:.2e}"
    assert off > 100 * TOLERANCE, "the block's logits do not depend on its positions: the check is blind"


def test_speculators_loads_the_dflash_vllm_layout_and_matches(dflash, target, target_dir, tmp_path):
    """speculators 0.9.0's DFlashDraftModel on the vllm export (embed_tokens and lm_head from the verifier the
    export names): nothing missing but what the verifier fills, and one decoding block [root, mask, mask, mask]
    after the prompt's context, run through its own anchored-block training forward, gives draftsmith's logits at
    draftsmith's positions."""
    drafter, folder = dflash
    export(folder, "vllm", tmp_path / "export", verifier=str(target_dir))
    block = dflash_block(drafter, target)
    save_file(block["inputs"], tmp_path / "inputs.safetensors")
    run_reference("speculators", "ref_dflash.py", tmp_path / "export", tmp_path / "inputs.safetensors",
                  tmp_path / "out.safetensors")
    check_dflash_reference(block, tmp_path / "out.safetensors", "vllm layout")


def test_speculators_converts_the_dflash_reference_layout_and_matches(dflash, target, target_dir, tmp_path):
    """The sglang export (z-lab's layout) is what speculators' own DFlashConverter expects: it converts and
    validates against the target, maps the layers as draftsmith's vllm export does, and the converted model drafts
    the same block as draftsmith."""
    drafter, folder = dflash
    export(folder, "sglang", tmp_path / "zlab")
    block = dflash_block(drafter, target)
    save_file(block["inputs"], tmp_path / "inputs.safetensors")
    run_reference("speculators", "ref_dflash.py", tmp_path / "converted", tmp_path / "inputs.safetensors",
                  tmp_path / "out.safetensors", tmp_path / "zlab", target_dir)
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config["aux_hidden_state_layer_ids"] == [i + 1 for i in drafter.config.feature_layers]
    assert (config["mask_token_id"], config["block_size"]) == (drafter.config.mask_token_id, BLOCK)
    check_dflash_reference(block, tmp_path / "out.safetensors", "reference layout, converted")


def test_speculators_loads_the_peagle_vllm_layout_and_matches(peagle, target, target_dir, tmp_path):
    """speculators 0.9.0's PEagleDraftModel on the vllm export: nothing missing but the verifier's norm and LM
    head (only its loss reads them), and ParallelEagleProposer's one forward after the prompt (the verified pairs,
    the root's pair, 2 placeholders) gives the same logits at every depth as the reference's training forward on
    those inputs. Its random COD sampling of (anchor, depth) elements is replaced by that one draw (ref_peagle.py):
    every depth-0 pair and depths 1-2 at the root's pair."""
    drafter, folder = peagle
    export(folder, "vllm", tmp_path / "export", verifier=str(target_dir))
    ids, features, root = prompt_and_root(target, drafter.config.feature_layers)
    (tokens, *_), out = proposal_forward(ParallelEagleProposer(drafter, [(0,) * d for d in range(1, DEPTHS + 1)]),
                                         ids, features, root)
    n = ids.shape[1]                                                     # pairs: features 0..n-1, tokens 1..n
    assert tokens[0, n - 1:].tolist() == [root] + [-1] * (DEPTHS - 1)
    mask_token = json.loads((tmp_path / "export" / "config.json").read_text())["mask_token_id"]
    assert mask_token not in tokens[0, :n].tolist(), "the engine reads mask_embedding wherever the mask token is"
    expected = drafter.logits(out[0, n - 1:])                            # [DEPTHS, N]
    save_file({"features": features.contiguous(), "tokens": tokens[:, :n].contiguous(),
               "depths": torch.tensor([DEPTHS])}, tmp_path / "inputs.safetensors")
    run_reference("speculators", "ref_peagle.py", tmp_path / "export", tmp_path / "inputs.safetensors",
                  tmp_path / "out.safetensors")
    keys = json.loads(reference_meta(tmp_path / "out.safetensors")["keys"])
    assert keys == {"missing": ["verifier_lm_head.weight", "verifier_norm.weight"], "unexpected": []}
    got = load_file(tmp_path / "out.safetensors")["logits"]
    assert got.shape == expected.shape
    deltas = [(got[k] - expected[k]).abs().max().item() for k in range(DEPTHS)]
    print(f"speculators, P-EAGLE vllm layout: max |delta logit| per depth {deltas}")
    assert max(deltas) <= TOLERANCE, f"max |delta logit| per depth: {deltas}"
