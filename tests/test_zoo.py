"""Zoo folders: only the tensors training changed are stored (bf16), the rest comes back from the target, the
round trip gives the drafter's outputs, and another target is refused."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_target
from drafters import EagleModel, MedusaModel, load_drafter
from drafters.draft_lm import build_draft_lm
from drafters.zoo import MANIFEST, WEIGHTS, save_zoo_drafter, target_digest
from train.zoo_card import record_card


def perturb(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def trained(kind: str, target):
    """A drafter of `kind` for `target` whose trainable parts moved away from their initialisation, as training
    leaves them; returns (drafter, names of the tensors that should be stored)."""
    if kind == "medusa_own_heads":  # heads whose LM heads kept the target's: only the blocks trained
        drafter = MedusaModel.from_target(target, num_heads=2, share_lm_head=False)
        perturb(drafter.blocks)
        return drafter, {k for k in drafter.state_dict() if k.startswith("blocks.")}
    if kind == "eagle1":
        drafter = EagleModel.from_target(target, version=1)
    elif kind == "eagle3":
        drafter = EagleModel.from_target(target, version=3, feature_layers=[0, 1], draft_vocab=list(range(3, 90)))
    else:  # a draft LM whose embeddings and LM head stayed frozen, as in the recipes
        drafter = build_draft_lm(target, num_layers=1, init_layers=[1])
        perturb(drafter.model.layers)
        perturb(drafter.model.norm)
        return drafter.eval(), {k for k in drafter.state_dict() if not k.startswith(("model.embed", "lm_head"))}
    perturb(drafter)
    return drafter.eval(), set(drafter.state_dict())


def outputs(drafter, target, kind: str) -> torch.Tensor:
    """The drafter's logits on a fixed input: a draft LM's next-token logits, Medusa's heads on the target's last
    hidden state, one EAGLE draft step from the target's features."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (1, 12), generator=gen)
    if kind == "draft_lm":
        return drafter(ids).logits
    out = target(ids, output_hidden_states=True)
    if kind.startswith("medusa"):
        return drafter(out.hidden_states[-1])
    layers = drafter.config.feature_layers
    features = torch.cat([out.hidden_states[i + 1] for i in layers], -1) if layers else out.hidden_states[-1]
    mask = torch.full((12, 12), float("-inf")).triu(1)[None, None]
    step = drafter(ids, drafter.fuse(features), torch.arange(12)[None], mask)
    return drafter.logits(step)


KINDS = ["medusa_own_heads", "eagle1", "eagle3", "draft_lm"]


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_stores_only_trained_tensors_and_gives_the_same_outputs(kind, tmp_path):
    target = make_tiny_target()
    drafter, trained_names = trained(kind, target)
    manifest = save_zoo_drafter(drafter, target, tmp_path, kind, "tiny")
    stored = load_file(str(tmp_path / WEIGHTS))
    assert set(stored) == trained_names
    assert set(manifest["from_target"]) == set(drafter.state_dict()) - trained_names
    assert all(v.dtype == torch.bfloat16 for v in stored.values() if v.is_floating_point())
    loaded = load_drafter(str(tmp_path), target)
    assert type(loaded) is type(drafter)
    original = drafter.state_dict()
    for name, tensor in loaded.state_dict().items():  # stored: rounded to bf16; shared: the target's, exactly
        expected = target.state_dict()[manifest["from_target"][name]] if name in manifest["from_target"] \
            else original[name].to(torch.bfloat16).to(original[name].dtype)
        assert torch.equal(tensor, expected), name
    with torch.no_grad():
        torch.testing.assert_close(outputs(loaded, target, kind), outputs(drafter, target, kind), rtol=0.02, atol=0.05)


def test_another_target_is_refused_and_the_target_is_required(tmp_path):
    target = make_tiny_target()
    drafter, _ = trained("eagle3", target)
    save_zoo_drafter(drafter, target, tmp_path, "eagle3", "tiny")
    with pytest.raises(ValueError, match="was trained for target 'tiny'.*load the target it was trained on"):
        load_drafter(str(tmp_path), make_tiny_target(seed=1))
    with pytest.raises(ValueError, match="load it together with that target"):
        load_drafter(str(tmp_path))


def test_digest_ignores_dtype_and_sees_one_changed_weight():
    target = make_tiny_target()
    digest = target_digest(target)
    assert target_digest(make_tiny_target().to(torch.bfloat16)) == digest
    with torch.no_grad():
        target.model.layers[1].mlp.down_proj.weight[3, 5] += 0.5
    assert target_digest(target) != digest


def test_card_renders_the_measurements(tmp_path):
    target = make_tiny_target()
    drafter, _ = trained("eagle1", target)
    save_zoo_drafter(drafter, target, tmp_path, "eagle1", "tiny")
    regression = {"eval": {"questions": "mt-bench", "limit": 2, "max_new_tokens": 64}, "tau": 2.5, "tau_floor": 2.12,
                  "mismatches": 0}
    record_card(tmp_path, {"regression": regression, "hardware": "cuda: NVIDIA H200"})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["card"]["regression"] == regression
    card = (tmp_path / "README.md").read_text()
    assert "| regression floor | tau >= 2.12 (measured 2.50) on mt-bench, limit 2, 64 new tokens" in card
    assert "| hardware | cuda: NVIDIA H200 |" in card and manifest["target_sha256"] in card
