"""Draft LMs: built from the target, LoRA training/saving/loading, and chain drafting that stays lossless."""
import pytest
import torch
from conftest import make_tiny_target
from peft import PeftModel

from drafters.draft_lm import (add_lora, build_draft_lm, check_draft_vocab, default_lora_modules, load_draft_lm,
                               save_draft)
from data.vocab import frequent_tokens, token_coverage
from inference.draft_lm_proposer import DraftLMProposer
from inference.lookup import LookupProposer, PromptLookup
from inference.speculative import speculative_generate

EOS = {2}
PROMPT = torch.tensor([1, 17, 33, 250, 9, 120, 7])
BATCH = torch.tensor([[1, 5, 9, 200, 31, 4, 77, 3], [1, 80, 81, 82, 12, 13, 14, 15]])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_build_copies_embeddings_head_norm_and_chosen_layers(arch):
    target = make_tiny_target(arch)
    draft = build_draft_lm(target, num_layers=3, init_layers=[0, 1], target_name_or_path="tiny/target")
    assert type(draft) is type(target) and draft.config.num_hidden_layers == 3
    assert len(draft.model.layers) == 3 and draft.config._name_or_path == ""
    assert torch.equal(draft.get_input_embeddings().weight, target.get_input_embeddings().weight)
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight)
    assert torch.equal(draft.model.norm.weight, target.model.norm.weight)
    for j, i in enumerate([0, 1]):
        for (name, a), (_, b) in zip(draft.model.layers[j].state_dict().items(),
                                     target.model.layers[i].state_dict().items()):
            assert torch.equal(a, b), name
    fresh = draft.model.layers[2].self_attn.q_proj.weight
    assert not any(torch.equal(fresh, layer.self_attn.q_proj.weight) for layer in target.model.layers)
    assert draft.config.draftsmith == {"kind": "draft_lm", "target_name_or_path": "tiny/target",
                                       "target_vocab_size": 256, "init_layers": [0, 1]}
    assert len(getattr(draft.config, "layer_types", None) or [None] * 3) == 3
    q_proj = draft.model.layers[0].self_attn.q_proj.weight
    assert q_proj.data_ptr() != target.model.layers[0].self_attn.q_proj.weight.data_ptr()  # copied, not shared


def test_per_layer_settings_follow_the_copied_layers():
    target = make_tiny_target("qwen2")
    target.config.layer_types = ["sliding_attention", "full_attention"]
    target.config.eos_token_id = [2, 3]  # a list of num_hidden_layers entries that is not per layer
    draft = build_draft_lm(target, 3, init_layers=[1, 0])
    assert draft.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert draft.config.eos_token_id == [2, 3]


def test_build_refuses_bad_layers():
    target = make_tiny_target("llama")
    with pytest.raises(ValueError, match=r"init_layers \[5\] are not layers of the target"):
        build_draft_lm(target, 2, [0, 5])
    with pytest.raises(ValueError, match="at most num_layers"):
        build_draft_lm(target, 1, [0, 1])


def test_provenance_survives_save_and_load(tmp_path):
    target = make_tiny_target("qwen2")
    draft = build_draft_lm(target, 1, [1], target_name_or_path="tiny/qwen2")
    save_draft(draft, tmp_path, merged=True)
    loaded = load_draft_lm(tmp_path, target=target)
    assert loaded.config.draftsmith == draft.config.draftsmith
    assert not loaded.training
    assert torch.equal(loaded(BATCH).logits, draft.eval()(BATCH).logits)


def test_vocab_mismatch_is_refused(tmp_path):
    target = make_tiny_target("llama")
    other = make_tiny_target("llama", vocab_size=300)
    with pytest.raises(ValueError, match=r"vocabulary mismatch .* vocab_size 300 != 256.*share the target's tokenizer"):
        check_draft_vocab(other.config, target.config)
    save_draft(build_draft_lm(other, 1), tmp_path, merged=True)
    with pytest.raises(ValueError, match="vocab_size 300 != 256"):
        load_draft_lm(tmp_path, target=target)


class _Vocab:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return self.vocab


def test_vocab_token_mismatch_is_refused():
    config = make_tiny_target("llama").config
    check_draft_vocab(config, config, _Vocab({"a": 0, "b": 1}), _Vocab({"a": 0, "b": 1}))
    with pytest.raises(ValueError, match="same size but different tokens"):
        check_draft_vocab(config, config, _Vocab({"a": 0, "b": 1}), _Vocab({"a": 1, "b": 0}))


def _lora_draft(seed=0, dtype=torch.float32):
    target = make_tiny_target("llama").to(dtype)
    torch.manual_seed(seed)
    return target, add_lora(build_draft_lm(target, 2, [0, 1]), r=4, alpha=8)


def _train_a_few_steps(model, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(BATCH, labels=BATCH).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_lora_trains_only_adapters():
    target, model = _lora_draft()
    assert default_lora_modules(target) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                            "v_proj"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    _train_a_few_steps(model)
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in trainable), f"{name}: changed={changed}, trainable={name in trainable}"


def test_saved_adapters_reload_to_identical_outputs(tmp_path):
    target, model = _lora_draft()
    _train_a_few_steps(model)
    model.eval()
    expected = model(BATCH).logits
    save_draft(model, tmp_path, merged=False)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "base" / "config.json").is_file()
    loaded = load_draft_lm(tmp_path, target=target)
    assert isinstance(loaded, PeftModel)
    assert torch.equal(loaded(BATCH).logits, expected)
    assert not model.peft_config["default"].base_model_name_or_path  # the live model's config is restored


def test_merged_save_reloads_to_identical_outputs(tmp_path):
    """float64, so that the check sees the merge (W + s B A) and not float32 rounding of W x + s B (A x)."""
    target, model = _lora_draft(dtype=torch.float64)
    _train_a_few_steps(model)
    model.eval()
    expected = model(BATCH).logits
    assert expected.dtype == torch.float64
    save_draft(model, tmp_path, merged=True)
    assert not (tmp_path / "adapter_config.json").exists()
    loaded = load_draft_lm(tmp_path, target=target, dtype=torch.float64)
    assert not isinstance(loaded, PeftModel)
    torch.testing.assert_close(loaded(BATCH).logits, expected, atol=1e-6, rtol=1e-6)
    assert isinstance(model, PeftModel) and torch.equal(model(BATCH).logits, expected)  # merged a copy


def test_adapters_only_needs_adapters():
    with pytest.raises(ValueError, match="merged=True"):
        save_draft(build_draft_lm(make_tiny_target("llama"), 1), "unused", merged=False)


# ---------------------------------------------------------------------------------------------------------------
# DraftLMProposer: greedy verification stays lossless
# ---------------------------------------------------------------------------------------------------------------

def hf_greedy(target, prompt, max_new_tokens):
    out = target.generate(prompt[None], max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_self_draft_accepts_everything(arch, adaptive):
    target = make_tiny_target(arch)
    reference = hf_greedy(target, PROMPT, 40)
    proposer = DraftLMProposer(target, k=3, adaptive=adaptive, k_min=1, k_max=5)
    result = speculative_generate(target, proposer, PROMPT, 40, EOS)
    assert result.tokens == reference
    expected = [min(3 + i, 5) if adaptive else 3 for i in range(len(result.accept_lengths))]
    assert result.accept_lengths[:-1] == expected[:-1]  # tau = k + 1 per step; the last step may be cut short
    assert proposer.k == (5 if adaptive else 3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_small_draft_is_lossless_with_rejections(arch, adaptive):
    target = make_tiny_target(arch)
    draft = build_draft_lm(target, 1, [0]).eval()
    accepts = []
    for prompt in (PROMPT, torch.tensor([1, 5]), torch.tensor([1, 200, 201, 202, 203, 3, 3, 90])):
        proposer = DraftLMProposer(draft, k=4, adaptive=adaptive)
        result = speculative_generate(target, proposer, prompt, 40, EOS)
        assert result.tokens == hf_greedy(target, prompt, 40)
        accepts += result.accept_lengths
    assert min(accepts) == 0 and max(accepts) >= 3  # rejections (cache rolled back) and deep acceptances


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_frequent_token_draft_vocab_is_lossless_and_drafts_inside_it(arch):
    """FR-Spec drafting: proposals come from the draft vocabulary only, equal the draft's argmax over it, and
    verification keeps the output the target's. The LM head's bias counts as in the full head."""
    target = make_tiny_target(arch)
    draft = build_draft_lm(target, 1, [0]).eval()
    draft.lm_head.bias = torch.nn.Parameter(10 * torch.randn(256, generator=torch.Generator().manual_seed(0)))
    vocab = list(range(0, 256, 2)) + [2]  # even ids and eos
    proposer = DraftLMProposer(draft, k=3, draft_vocab=vocab)
    result = speculative_generate(target, proposer, PROMPT, 40, EOS)
    assert result.tokens == hf_greedy(target, PROMPT, 40)
    proposer.begin(PROMPT, None)
    tree = proposer.propose(7)
    assert set(tree.tokens[1:].tolist()) <= set(vocab)
    logits = draft(torch.cat([PROMPT, torch.tensor([7])])[None]).logits[0, -1]
    sub = torch.tensor(sorted(vocab))
    assert tree.tokens[1].item() == int(sub[logits[sub].argmax()])
    with pytest.raises(ValueError, match="draft_vocab must be token ids in \\[0, 256\\)"):
        DraftLMProposer(draft, draft_vocab=[5, 300])


def test_frequent_tokens_and_coverage():
    rows = [torch.tensor([5, 5, 5, 7, 7, 9]), torch.tensor([7, 1])]
    assert frequent_tokens(rows, 16, 2) == [5, 7]
    assert token_coverage([5, 7], [torch.tensor([5, 9, 7, 7])]) == 0.75


def test_lora_draft_proposes_with_its_adapters():
    target, model = _lora_draft()
    _train_a_few_steps(model)
    proposer = DraftLMProposer(model.eval(), k=2)
    result = speculative_generate(target, proposer, PROMPT, 20, EOS)
    assert result.tokens == hf_greedy(target, PROMPT, 20)
    proposer.begin(PROMPT, None)
    tree = proposer.propose(7)
    expected = model(torch.cat([PROMPT, torch.tensor([7])])[None]).logits[0, -1].argmax().item()
    assert tree.tokens[1].item() == expected


def test_proposer_cache_tracks_accepted_sequence():
    """After each update the draft cache holds exactly the accepted tokens (or all but the pending ones)."""
    target = make_tiny_target("llama")
    proposer = DraftLMProposer(build_draft_lm(target, 1, [0]).eval(), k=3)
    proposer.begin(PROMPT, None)
    tree = proposer.propose(11)
    assert proposer.cache.get_seq_length() == len(PROMPT) + 3  # prompt + root + 2 fed drafts
    proposer.update(tree.tokens[:2], None)  # root + first draft accepted
    assert proposer.cache.get_seq_length() == len(PROMPT) + 2 and proposer.pending == []
    tree = proposer.propose(12)
    proposer.update(tree.tokens, None)  # all accepted: the last draft was never fed
    assert proposer.cache.get_seq_length() == len(PROMPT) + 2 + 3 and proposer.pending == [tree.tokens[-1].item()]
    with pytest.raises(ValueError, match="k_min"):
        DraftLMProposer(target, k=9, adaptive=True, k_max=8)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sibling_candidates_are_lossless_and_save_target_forwards(arch):
    """siblings=N: the tree is the k-token chain plus the draft's ranks 2..N+1 of its first token at depth 1;
    decoding stays the target's own greedy output and needs fewer target forwards than the chain alone."""
    target = make_tiny_target(arch)
    draft = build_draft_lm(target, 1, [0]).eval()
    forwards = {0: 0, 3: 0}
    for prompt in (PROMPT, torch.tensor([1, 5]), torch.tensor([1, 200, 201, 202, 203, 3, 3, 90])):
        reference = hf_greedy(target, prompt, 40)
        for siblings in forwards:
            result = speculative_generate(target, DraftLMProposer(draft, k=3, siblings=siblings), prompt, 40, EOS)
            assert result.tokens == reference
            forwards[siblings] += result.forwards
    assert forwards[3] < forwards[0]
    proposer = DraftLMProposer(draft, k=3, siblings=2)
    proposer.begin(PROMPT, None)
    tree = proposer.propose(7)
    assert tree.parents == [-1, 0, 1, 2, 0, 0]
    first = draft(torch.cat([PROMPT, torch.tensor([7])])[None]).logits[0, -1]
    assert tree.tokens[[1, 4, 5]].tolist() == first.topk(3).indices.tolist()
    with pytest.raises(ValueError, match="greedy drafting only"):
        DraftLMProposer(draft, temperature=1.0, siblings=1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_siblings_at_deeper_chain_depths_are_exact_and_lossless(arch):
    """sibling_depth=D: the chain's tokens at depths 1..D each get the runners-up of the logits they were drawn
    from, as children of the chain node before them; greedy decoding stays the target's own."""
    target = make_tiny_target(arch)
    draft = build_draft_lm(target, 1, [0]).eval()
    for prompt in (PROMPT, torch.tensor([1, 200, 201, 202, 203, 3, 3, 90])):
        reference = hf_greedy(target, prompt, 40)
        for depth in (2, 5):
            proposer = DraftLMProposer(draft, k=3, adaptive=True, siblings=2, sibling_depth=depth)
            assert speculative_generate(target, proposer, prompt, 40, EOS).tokens == reference
    proposer = DraftLMProposer(draft, k=3, siblings=2, sibling_depth=2)
    proposer.begin(PROMPT, None)
    tree = proposer.propose(7)
    assert tree.parents == [-1, 0, 1, 2, 0, 0, 1, 1]  # chain d1 d2 d3; runners-up of d1 (parent root), of d2 (d1)
    context = torch.cat([PROMPT, torch.tensor([7])])
    for node, rows in ((1, [1, 4, 5]), (2, [2, 6, 7])):
        logits = draft(context[None]).logits[0, -1]
        assert tree.tokens[rows].tolist() == logits.topk(3).indices.tolist()
        context = torch.cat([context, tree.tokens[node:node + 1]])
    with pytest.raises(ValueError, match="sibling_depth=0"):
        DraftLMProposer(draft, siblings=1, sibling_depth=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_confidence_stop_shortens_chains_and_stays_lossless(arch):
    """confidence: a step's chain ends after the first draft token whose own probability is below it; the
    draft cache still holds root + the fed drafts, and decoding stays the target's greedy output."""
    target = make_tiny_target(arch)
    draft = build_draft_lm(target, 1, [0]).eval()
    first = torch.softmax(draft(torch.cat([PROMPT, torch.tensor([7])])[None]).logits[0, -1], -1).max().item()
    lengths = {}
    for confidence in (0.0, first + 1e-6 if first < 1 else 0.999, first / 2):
        proposer = DraftLMProposer(draft, k=4, confidence=confidence)
        proposer.begin(PROMPT, None)
        tree = proposer.propose(7)
        lengths[confidence] = len(tree) - 1
        assert proposer.cache.get_seq_length() == len(PROMPT) + len(tree) - 1  # prompt + root + fed drafts
    assert list(lengths.values())[:2] == [4, 1] and list(lengths.values())[2] >= 2  # the first token passes
    for prompt in (PROMPT, torch.tensor([1, 5]), torch.tensor([1, 200, 201, 202, 203, 3, 3, 90])):
        for adaptive in (False, True):
            result = speculative_generate(target, DraftLMProposer(draft, k=4, adaptive=adaptive, confidence=0.5),
                                          prompt, 40, EOS)
            assert result.tokens == hf_greedy(target, prompt, 40)
    with pytest.raises(ValueError, match=r"confidence=1.0 must be in \[0, 1\)"):
        DraftLMProposer(draft, confidence=1.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prompt_lookup_steps_copy_without_drafting_and_stay_lossless(arch):
    """Prompt lookup beside a draft LM (inference.lookup.LookupProposer): copy steps run no draft forward; the
    draft cache catches up on the next drafted step, and decoding stays the target's greedy output, with fewer
    draft forwards than drafting every step."""
    target = make_tiny_target(arch)
    draft = build_draft_lm(target, 1, [0]).eval()
    calls = []
    handle = draft.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    looped = torch.tensor([1, 40, 41, 42, 43, 44, 40, 41, 42, 43, 44, 40, 41])
    for prompt in (PROMPT, looped, torch.tensor([1, 200, 201, 202, 203, 3, 3, 90])):
        reference = hf_greedy(target, prompt, 40)
        draft_forwards = {}
        for lookup in (None, PromptLookup(3, 2, 4)):
            calls.clear()
            proposer = DraftLMProposer(draft, k=3, adaptive=True)
            if lookup is not None:
                proposer = LookupProposer(proposer, lookup)
            result = speculative_generate(target, proposer, prompt, 40, EOS)
            assert result.tokens == reference
            draft_forwards[lookup is None] = len(calls)
        assert proposer.steps > 0 and draft_forwards[False] < draft_forwards[True]
    handle.remove()
    proposer = LookupProposer(DraftLMProposer(draft, k=3), PromptLookup(3, 2, 4))
    proposer.begin(looped, None)
    tree = proposer.propose(42)  # "... 40 41 42": copy "43 44 40 41"
    assert tree.tokens.tolist() == [42, 43, 44, 40, 41] and proposer.drafter.cache.get_seq_length() == 0
    proposer.update(tree.tokens[:3], None)  # 42 43 44 accepted: queued for the draft, in the lookup's sequence
    assert proposer.drafter.pending == looped.tolist() + [42, 43, 44] and proposer.accepted == 2
    tree = proposer.propose(7)  # "44 7" never occurred: the draft feeds everything queued, then drafts
    assert proposer.drafter.cache.get_seq_length() == len(looped) + 3 + 3 and proposer.drafter.pending == []
    assert proposer.lookup.tokens == looped.tolist() + [42, 43, 44, 7]
