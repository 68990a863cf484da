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
