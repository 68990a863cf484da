"""Shared fixtures: tiny random targets built in-process (hidden 64, 2 layers), no network."""
import pytest
import torch

VOCAB = 256

# Tiny models gain nothing from intra-op threads, and their many small ops slow down badly when the threads compete
# with another process for the cores (measured: 7 ms vs 0.4 ms per speculative-sampling call on 2 busy cores).
torch.set_num_threads(1)


# Tiny random targets of the families a user of this field would pick: name -> (model_type, config overrides).
# Sliding windows of 8 positions, so that decoding runs far beyond them.
WINDOW = 8
FAMILIES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "mistral": ("mistral", dict(sliding_window=WINDOW)),
    "gemma2": ("gemma2", dict(sliding_window=WINDOW, head_dim=16, query_pre_attn_scalar=16,
                              final_logit_softcapping=30.0, attn_logit_softcapping=50.0)),
    "gemma3": ("gemma3_text", dict(sliding_window=WINDOW, head_dim=16, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("phi3", dict(sliding_window=WINDOW)),
    "qwen3": ("qwen3", dict(head_dim=16)),
    "olmo2": ("olmo2", {}),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                    shared_expert_intermediate_size=64)),
    "qwen3-moe": ("qwen3_moe", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)),
}


def make_tiny_target(arch: str = "llama", seed: int = 0, vocab_size: int = VOCAB, hidden_size: int = 64):
    """A frozen fp32 tiny causal LM of family `arch` (FAMILIES) with fixed random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in FAMILIES:
        raise ValueError(f"unknown tiny arch {arch!r}; one of {sorted(FAMILIES)}")
    model_type, extra = FAMILIES[arch]
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **common, **extra))
    # Sharpen the random logits so greedy decoding has clear winners (random init is nearly uniform).
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    # sdpa where the family has it; Gemma 2's attention-logit soft-capping runs in the eager form only
    model.config._attn_implementation = "eager" if extra.get("attn_logit_softcapping") else "sdpa"
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
