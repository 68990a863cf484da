"""Shared fixtures: tiny random targets built in-process (hidden 64, 2 layers), no network."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 256

# Tiny models gain nothing from intra-op threads, and their many small ops slow down badly when the threads compete
# with another process for the cores (measured: 7 ms vs 0.4 ms per speculative-sampling call on 2 busy cores).
torch.set_num_threads(1)


def make_tiny_target(arch: str = "llama", seed: int = 0, vocab_size: int = VOCAB, hidden_size: int = 64):
    """A frozen fp32 tiny causal LM with fixed random weights."""
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    # Sharpen the random logits so greedy decoding has clear winners (random init is nearly uniform).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.config._attn_implementation = "sdpa"
    return model.eval().requires_grad_(False)


@pytest.fixture(params=["llama", "qwen2"])
def tiny_target(request):
    return make_tiny_target(request.param)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny saved target, conversations and questions; the config overrides that point at them."""
    from tiny_assets import write_tiny_assets

    return write_tiny_assets(tmp_path_factory.mktemp("assets"))


def perturbed_medusa(target, num_heads: int = 3, seed: int = 0):
    """Medusa heads whose residual blocks are moved off the identity initialisation, so that they draft something
    other than the target's own next token (fixed seed), attached to `target`."""
    from drafters import MedusaModel

    drafter = MedusaModel.from_target(target, num_heads=num_heads, num_layers=1)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in drafter.blocks.parameters():
            p.normal_(0, 0.05)
    drafter.attach_target(target)
    return drafter.eval()


def assert_target_unchanged(target, target_dir: str) -> None:
    """After training: every target parameter is frozen and equal to the checkpoint in `target_dir`."""
    from target.model import load_target

    pristine, _ = load_target(target_dir)
    for (name, p), q in zip(target.named_parameters(), pristine.parameters()):
        assert not p.requires_grad and torch.equal(p.cpu(), q), f"target parameter {name} changed"
