"""EAGLE drafters: draft-vocabulary maps, the training-time test, lossless greedy decoding (chain, static tree,
dynamic tree; EAGLE-1 and EAGLE-3; two architectures), save/load and the refusal of a foreign target."""
import json

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from conftest import make_tiny_target
from drafters import EagleModel, load_drafter
from drafters.eagle import default_feature_layers, ttt_attention
from inference.eagle_proposer import EagleProposer
from inference.speculative import plain_generate, speculative_generate
from target.model import target_forward
from target.packing import PackedLinear, can_pack, packed_linears
from inference.tree import additive_mask
from train.eagle_objective import Eagle1Objective, Eagle3Objective, causal_mask

PROMPTS = [[5, 17, 33, 2, 99, 41], [7, 7, 120, 64], [200, 3, 18, 250, 11, 90, 4]]
TREES = {
    "chain": dict(tree="static", paths=[(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)]),
    "static": dict(tree="static", paths=[(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 0, 0)]),
    "dynamic": dict(tree="dynamic", depth=4, topk=3, nodes=10),
}


def greedy_text(target, n_rows=8, length=48, seed=0, prompts=()) -> torch.Tensor:
    """The target's own greedy continuations [n_rows, length] of `prompts` (their first 4 tokens), then of random
    4-token prompts: what a drafter learns."""
    gen = torch.Generator().manual_seed(seed)
    starts = [torch.tensor(p[:4]) for p in prompts][:n_rows]
    starts += [torch.randint(3, target.config.vocab_size, (4,), generator=gen) for _ in range(n_rows - len(starts))]
    return torch.stack([torch.cat([s, torch.tensor(plain_generate(target, s, length - 4, set()).tokens)])
                        for s in starts])


def trained_eagle(target, version: int, steps: int = 60, **kwargs) -> EagleModel:
    """A drafter trained on the target's greedy text, including that of the test prompts' beginnings: its drafts
    must be accepted, or the decoding tests would pass vacuously."""
    torch.manual_seed(0)
    drafter = EagleModel.from_target(target, version=version, **kwargs)
    objective = (Eagle1Objective(drafter, target, cls_weight=1.0) if version == 1 else
                 Eagle3Objective(drafter, target, steps=3))
    ids = greedy_text(target, prompts=PROMPTS)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    for _ in range(steps):
        loss, _ = objective(ids, mask, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return drafter.eval()


@pytest.fixture(scope="module", params=[("llama", 1), ("llama", 3), ("qwen2", 1), ("qwen2", 3)],
                ids=lambda p: f"{p[0]}-eagle{p[1]}")
def trained(request):
    arch, version = request.param
    target = make_tiny_target(arch)
    vocab = list(range(0, 256, 2)) + [1, 3, 5] if version == 3 else None  # EAGLE-3 drafts over a subset
    return target, trained_eagle(target, version, draft_vocab=vocab)


# --- the model -------------------------------------------------------------------------------------------------


def test_draft_vocab_maps_round_trip():
    target = make_tiny_target()
    ids = [0, 2, 3, 17, 100, 255]
    drafter = EagleModel.from_target(target, version=3, draft_vocab=[17, 3, 255, 0, 2, 100, 3])
    assert drafter.draft_ids().tolist() == ids                      # draft id i -> target id i + d2t[i]
    assert drafter.d2t.tolist() == [t - i for i, t in enumerate(ids)]
    assert drafter.t2d.nonzero().squeeze(-1).tolist() == ids        # t2d marks exactly those target ids
    assert torch.equal(drafter.lm_head.weight, target.lm_head.weight[ids])  # head starts from the target's rows
    with pytest.raises(ValueError, match="distinct target ids"):
        drafter.set_draft_vocab([0, 1, 2, 3, 4, 256])


def deep_llama(layers: int = 8):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False)).eval()


def hidden_states(target, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """transformers' output_hidden_states: [0] the embeddings, [i] the input of decoder layer i."""
    return target(ids, output_hidden_states=True).hidden_states


def test_default_feature_layers_are_eagle3s_layer_inputs():
    """EAGLE-3's reference code, SGLang and speculators fuse the inputs of layers (2, L//2, L-3) =
    hidden_states[2, L//2, L-3] when a checkpoint names no layers; draftsmith's feature_layers are layer outputs."""
    assert default_feature_layers(30) == [1, 14, 26]                # SmolLM2-135M: hidden_states[2, 15, 27]
    assert default_feature_layers(2) == [0, 1]                      # clipped into a 2-layer target, distinct
    target = deep_llama(8)
    drafter = EagleModel.from_target(target, version=3)
    ids = torch.tensor([PROMPTS[2]])
    features = target_forward(target, ids, feature_layers=drafter.config.feature_layers).features
    hs = hidden_states(target, ids)
    assert torch.equal(features, torch.cat([hs[2], hs[4], hs[5]], dim=-1))  # L = 8: (2, L//2, L-3)


def test_a_saved_drafter_keeps_the_layers_it_was_trained_on(tmp_path):
    """A drafter's config records its layers, so a later default never changes what an old drafter reads: one saved
    with the former default (outputs of layers 2, L/2, L-3) still reads hidden_states[3, 5, 6] after loading."""
    target = deep_llama(8)
    EagleModel.from_target(target, version=3).save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["feature_layers"] == [1, 3, 4]
    EagleModel.from_target(target, version=3, feature_layers=[2, 4, 5]).save_pretrained(tmp_path / "old")
    loaded = load_drafter(str(tmp_path / "old"), target)
    proposer = EagleProposer(loaded, **TREES["dynamic"])
    ids = torch.tensor([PROMPTS[2]])
    features = target_forward(target, ids, feature_layers=proposer.feature_layers).features
    hs = hidden_states(target, ids)
    assert torch.equal(features, torch.cat([hs[3], hs[5], hs[6]], dim=-1))


def test_feature_width_and_eagle1_refuses_feature_layers():
    target = make_tiny_target()  # hidden 64, 2 layers
    assert EagleModel.from_target(target, version=1).config.feature_width == 64
    assert EagleModel.from_target(target, version=3, feature_layers=[0, 1]).config.feature_width == 128
    with pytest.raises(ValueError, match="EAGLE-1 reads the target's last hidden state"):
        EagleModel.from_target(target, version=1, feature_layers=[0])


def test_save_load_round_trip_and_foreign_target_refused(tmp_path):
    target = make_tiny_target("llama")
    drafter = trained_eagle(target, 3, steps=2, draft_vocab=list(range(50)))
    drafter.save_pretrained(tmp_path)
    loaded = load_drafter(str(tmp_path), target)
    saved = {k: v for k, v in drafter.state_dict().items()}
    assert saved.keys() == loaded.state_dict().keys() and "embed_tokens" not in str(list(saved))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in saved.items())
    prompt = torch.tensor(PROMPTS[0])
    a = speculative_generate(target, EagleProposer(drafter, **TREES["dynamic"]), prompt, 20, set())
    b = speculative_generate(target, EagleProposer(loaded, **TREES["dynamic"]), prompt, 20, set())
    assert a.tokens == b.tokens and a.accept_lengths == b.accept_lengths
    with pytest.raises(ValueError, match="model_type"):
        load_drafter(str(tmp_path), make_tiny_target("qwen2"))
    with pytest.raises(ValueError, match="vocab_size"):
        load_drafter(str(tmp_path), make_tiny_target("llama", vocab_size=300))


# --- training-time test ----------------------------------------------------------------------------------------


def test_ttt_step_reads_previous_step_output():
    """Step i's hidden input is step i-1's output (never the target's feature); step 0 reads fc(features)."""
    target = make_tiny_target()
    drafter = EagleModel.from_target(target, version=3)
    objective = Eagle3Objective(drafter, target, steps=4)
    seen, produced = [], []

    def record(module, args, out):
        seen.append(args[1])
        produced.append(out)

    drafter.register_forward_hook(record)
    ids = greedy_text(target, n_rows=2, length=16)
    objective(ids, torch.ones_like(ids), torch.ones_like(ids))
    features = target_forward(target, ids, feature_layers=drafter.config.feature_layers).features
    assert len(seen) == 4
    assert torch.equal(seen[0], drafter.fuse(features[:, :-1]))
    for i in range(1, 4):
        assert seen[i] is produced[i - 1]
        assert not torch.allclose(seen[i], seen[0])


def ttt_mask(n: int, step: int) -> torch.Tensor:
    """[1, 1, n, (step + 1) n] additive: the training-time test's attention written as a mask -- causal over step
    0's keys, then the diagonal of every later step's keys."""
    causal, diagonal = torch.ones(n, n, dtype=torch.bool).tril(), torch.eye(n, dtype=torch.bool)
    return additive_mask(torch.cat([causal] + [diagonal] * step, dim=-1), torch.float32)


@pytest.mark.parametrize("steps,mask_rows", [(0, 1), (3, 1), (3, 2)])
def test_ttt_attention_fused_equals_unfused(steps, mask_rows):
    """The fused form (one SDPA over all keys, the CUDA default) and the unfused form (causal block + diagonal dot
    products) of ttt_attention agree in outputs and in gradients to query, key and value (GQA: 4 heads, 2 kv)."""
    g = torch.Generator().manual_seed(0)
    B, n, D = 2, 7, 8
    q = torch.randn(B, 4, n, D, generator=g, requires_grad=True)
    k = torch.randn(B, 2, (steps + 1) * n, D, generator=g, requires_grad=True)
    v = torch.randn(B, 2, (steps + 1) * n, D, generator=g, requires_grad=True)
    mask = causal_mask(n, torch.float32, "cpu").expand(mask_rows, 1, n, n).clone()
    if mask_rows == 2:
        mask[1, :, :, 0] = torch.finfo(torch.float32).min  # row 1 never sees anchor 0 of step 0 (a padded key)
    upstream = torch.randn(B, n, 4, D, generator=g)
    results = []
    for fused in (False, True):
        out = ttt_attention(q, k, v, mask, 0.3, fused=fused)
        results.append((out, *torch.autograd.grad((out * upstream).sum(), [q, k, v])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert results[0][0].shape == (B, n, 4, D)


@pytest.mark.parametrize("fused", [False, True])
def test_ttt_attention_with_cod_steps_equals_the_masked_attention(fused):
    """COD: a query at m of n anchors (one random order) after later steps of n_1 >= n_2 = m anchors, row r of each
    the query's anchor r. ttt_attention equals SDPA over all keys with the mask [those anchors' causal rows |
    eye(m, n_b) per later step], in outputs and gradients (GQA: 4 heads, 2 kv)."""
    g = torch.Generator().manual_seed(0)
    B, n, D, sizes = 2, 9, 8, [6, 4]
    m = sizes[-1]
    at = torch.randperm(n, generator=g)[:m]
    q = torch.randn(B, 4, m, D, generator=g, requires_grad=True)
    k = torch.randn(B, 2, n + sum(sizes), D, generator=g, requires_grad=True)
    v = torch.randn(B, 2, n + sum(sizes), D, generator=g, requires_grad=True)
    allowed = torch.cat([torch.ones(n, n, dtype=torch.bool).tril()[at]]
                        + [torch.eye(m, size, dtype=torch.bool) for size in sizes], dim=-1)      # [m, n + 6 + 4]
    upstream = torch.randn(B, m, 4, D, generator=g)

    def with_grads(out):
        return (out, *torch.autograd.grad((out * upstream).sum(), [q, k, v]))

    direct = with_grads(ttt_attention(q, k, v, causal_mask(n, torch.float32, "cpu")[:, :, at], 0.3, fused=fused,
                                      sizes=sizes))
    masked = with_grads(torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=allowed, scale=0.3).transpose(1, 2))
    for a, b in zip(direct, masked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert direct[0].shape == (B, m, 4, D)
    with pytest.raises(ValueError, match="step sizes"):
        ttt_attention(q, k, v, causal_mask(n, torch.float32, "cpu")[:, :, at], 0.3, sizes=[7, 3])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ttt_attention_equals_the_masked_attention(arch):
    """drafters.eagle.ttt_attention (one causal block + diagonal dot products) gives the outputs and gradients of
    SDPA over all steps' keys with the [n, (s + 1) n] mask, over 4 unrolled steps (GQA: 4 heads, 2 kv heads)."""
    target = make_tiny_target(arch)
    drafter = EagleModel.from_target(target, version=3)
    torch.manual_seed(0)
    B, n, steps = 2, 9, 4
    ids = torch.randint(3, target.config.vocab_size, (B, n + steps))
    h0 = torch.randn(B, n, drafter.config.hidden)

    def unroll(mode: str) -> torch.Tensor:
        """[steps, B, n, H]. 'direct': ttt_attention; 'masked': SDPA with ttt_mask; 'no_diagonal': every step
        attends to step 0's keys only (a wrong TTT, the control)."""
        cache, h, outs = DynamicCache(), h0, []
        for s in range(steps):
            mask = ttt_mask(n, s) if mode == "masked" else causal_mask(n, torch.float32, "cpu")
            step_cache = DynamicCache() if mode == "no_diagonal" else cache
            h = drafter(ids[:, s:s + n], h, (torch.arange(n) + s)[None].expand(B, n), mask, step_cache,
                        ttt=mode == "direct")
            outs.append(h)
        return torch.stack(outs)

    def grads(out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(out.sin().sum(), list(drafter.midlayer.parameters()))

    masked, direct = unroll("masked"), unroll("direct")
    torch.testing.assert_close(direct, masked, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(direct), grads(masked)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(direct[-1], unroll("no_diagonal")[-1], atol=1e-3)


def test_ttt_equals_drafting_after_a_verified_prefix():
    """Training-time test step i at anchor j computes what decoding computes when it drafts i tokens after the
    verified pairs 0..j (same attention, positions and inputs)."""
    target = make_tiny_target()
    drafter = EagleModel.from_target(target, version=3).eval()
    ids = greedy_text(target, n_rows=1, length=12)
    steps, T = 3, ids.shape[1]
    captured = []
    drafter.register_forward_hook(lambda m, args, out: captured.append(out[0]) and None)
    Eagle3Objective(drafter, target, steps=steps)(ids, torch.ones_like(ids), torch.ones_like(ids))
    ttt = captured[:]                                                     # steps x [T - 1, H]
    features = target_forward(target, ids, feature_layers=drafter.config.feature_layers).features
    min_ = torch.finfo(torch.float32).min
    for j in (0, 4, 7):
        cache = DynamicCache()
        n = j + 1                                                         # verified pairs 0..j
        out = drafter(ids[:, 1:n + 1], drafter.fuse(features[:, :n]), torch.arange(n)[None],
                      causal_mask(n, torch.float32, "cpu"), cache)[0, -1]
        assert torch.allclose(out, ttt[0][j], atol=1e-5)
        for i in range(1, steps):                                         # draft i tokens past anchor j
            mask = torch.zeros(1, 1, 1, n + i)
            out = drafter(ids[:, None, j + 1 + i], out[None, None], torch.tensor([[j + i]]), mask, cache)[0, -1]
            assert torch.allclose(out, ttt[i][j], atol=1e-5), (j, i)
        assert T > j + steps


# --- decoding --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(TREES))
def test_greedy_decoding_is_lossless_and_accepts_drafts(trained, shape):
    target, drafter = trained
    accepted = 0
    for prompt in PROMPTS:
        prompt = torch.tensor(prompt)
        reference = plain_generate(target, prompt, 40, set()).tokens
        result = speculative_generate(target, EagleProposer(drafter, **TREES[shape]), prompt, 40, set())
        assert result.tokens == reference
        assert result.forwards == 1 + len(result.accept_lengths)
        accepted += sum(result.accept_lengths)
    assert accepted >= 10  # the trained drafter's drafts are accepted (the tests would pass vacuously otherwise)


@pytest.mark.parametrize("trained", [("llama", 1)], indirect=True, ids=["llama-eagle1"])
def test_eagle1_draft_vocabulary_runs_packed_and_stays_lossless(trained):
    """EAGLE-1 ranks a draft vocabulary with those rows of the target's packed head, packed too (FR-Spec)."""
    target, drafter = trained
    vocab = list(range(0, target.config.vocab_size, 2))
    with torch.no_grad(), packed_linears(target):
        proposer = EagleProposer(drafter, draft_vocab=vocab, **TREES["static"])
        assert isinstance(proposer.head, PackedLinear) == can_pack()
        assert torch.equal(proposer.head.weight, target.lm_head.weight[vocab])
        for prompt in PROMPTS:
            prompt = torch.tensor(prompt)
            reference = plain_generate(target, prompt, 24, set()).tokens
            assert speculative_generate(target, proposer, prompt, 24, set()).tokens == reference
        out = target_forward(target, prompt[None])
        proposer.begin(prompt, out.hidden_states[0])
        drafts = proposer.propose(int(out.logits[0, -1].argmax())).tokens[1:]
        assert len(drafts) == len(TREES["static"]["paths"]) and all(t % 2 == 0 for t in drafts)


def test_dynamic_tree_shape(trained):
    target, drafter = trained
    proposer = EagleProposer(drafter, tree="dynamic", depth=4, topk=3, nodes=10)
    out = target_forward(target, torch.tensor([PROMPTS[0]]), feature_layers=proposer.feature_layers)
    proposer.begin(torch.tensor(PROMPTS[0]), (out.features if proposer.feature_layers else out.hidden_states)[0])
    tree = proposer.propose(int(out.logits[0, -1].argmax()))
    assert len(tree) == 10 and max(tree.depths()) <= 4
    children = [tree.parents.count(i) for i in range(len(tree))]
    assert max(children) <= 3
    assert proposer.cache.get_seq_length() == len(PROMPTS[0])  # draft nodes were dropped from the draft cache


def test_ttt_leaves_out_tokens_without_a_draft_id_and_counts_them():
    """Every supervised position of step 0 is either trained on (its target token has a draft id) or counted in
    `outside`; those trained on are exactly the ones whose target greedy token is in the draft vocabulary."""
    from train.objectives import next_token_supervised

    target = make_tiny_target()
    drafter = EagleModel.from_target(target, version=3, draft_vocab=list(range(0, 256, 2)))
    objective = Eagle3Objective(drafter, target, steps=2)
    ids = greedy_text(target, n_rows=2, length=16)
    mask = torch.ones_like(ids)
    _, stats = objective(ids, mask, mask)
    needed = next_token_supervised(mask, mask)
    greedy = target(ids).logits.argmax(-1)                           # the target's token after each position
    in_vocab = int((greedy[:, 1:][needed[:, 1:]] % 2 == 0).sum())
    assert stats[0, 2] == in_vocab and objective.outside[0] == int(needed[:, 1:].sum()) - in_vocab
    assert objective.outside[0] > 0 and stats[0, 2] > 0


def test_pruned_dynamic_tree_is_the_same_tree_with_fewer_drafter_forwards(trained):
    """Stopping once no deeper node can enter the best `nodes` changes nothing but the number of drafter calls."""
    target, drafter = trained
    calls = {True: 0, False: 0}
    for prune in (True, False):
        handle = drafter.register_forward_hook(lambda *a, p=prune: calls.__setitem__(p, calls[p] + 1) or None)
        trees = []
        for prompt in PROMPTS:
            proposer = EagleProposer(drafter, tree="dynamic", depth=5, topk=2, nodes=4, prune=prune)
            out = target_forward(target, torch.tensor([prompt]), feature_layers=proposer.feature_layers)
            proposer.begin(torch.tensor(prompt), (out.features if proposer.feature_layers else out.hidden_states)[0])
            tree = proposer.propose(int(out.logits[0, -1].argmax()))
            trees.append((tree.tokens.tolist(), tree.parents))
        handle.remove()
        if prune:
            pruned = trees
    assert pruned == trees
    assert calls[True] < calls[False]


def test_rank_hits_count_every_supervised_position_at_some_rank(trained):
    """With topk = the whole (draft) vocabulary, every supervised position's label has a rank: the rank counts
    of each step sum to its supervised count, and rank 0 is exactly the top-1 hits."""
    target, drafter = trained
    version = drafter.config.eagle_version
    objective = (Eagle1Objective(drafter, target) if version == 1 else Eagle3Objective(drafter, target, steps=3))
    objective.eval().topk = drafter.draft_ids().numel() if version == 3 else target.config.vocab_size
    ids = greedy_text(target, n_rows=3, length=24, seed=5)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        _, stats = objective(ids, mask, mask)
    assert objective.rank_hits.shape == (stats.shape[0], objective.topk)
    assert torch.equal(objective.rank_hits[:, 0], stats[:, 1])
    assert torch.equal(objective.rank_hits.sum(1), stats[:, 2])


def test_auto_tree_is_calibrated_from_per_rank_accuracy(trained, monkeypatch):
    """--tree auto for EAGLE: a static tree grown from the recorded per-depth, per-rank accuracy (depth-limited),
    sized by the timed verify and drafting costs, and decoding with it is lossless; a drafter recording top-1 only
    gets a chain."""
    from inference.proposer_setup import make_proposer
    from inference.tree import grow_tree

    target, drafter = trained
    accuracy = [[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.4, 0.1, 0.1], [0.3, 0.1, 0.1]]
    monkeypatch.setattr(drafter.config, "step_topk_accuracy", accuracy)
    proposer, setup = make_proposer(drafter, target, tree="auto", max_tree_nodes=8, tree_depth=3, min_speedup=0.01)
    paths = [tuple(p) for p in setup["paths"]]
    assert setup["calibration"]["best"]["nodes"] == len(paths) + 1 == setup["nodes"] <= 8
    assert sorted(paths) == sorted(grow_tree(accuracy[:3], len(paths)))
    assert {row["nodes"] for row in setup["calibration"]["candidates"]} == {2, 3, 4, 5, 6, 8}
    prompt = torch.tensor(PROMPTS[0])
    assert speculative_generate(target, proposer, prompt, 30, set()).tokens == \
        plain_generate(target, prompt, 30, set()).tokens

    monkeypatch.setattr(drafter.config, "step_topk_accuracy", None)
    monkeypatch.setattr(drafter.config, "step_accuracy", [0.6, 0.5, 0.4])
    _, setup = make_proposer(drafter, target, tree="auto", max_tree_nodes=8, tree_depth=5, min_speedup=0.01)
    assert all(set(p) == {0} for p in setup["paths"]) and len(setup["paths"]) <= 3
