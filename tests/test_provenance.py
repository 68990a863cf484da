"""One provenance record for every drafter kind (drafters/provenance.py), written at save and read alike."""
from transformers import PretrainedConfig

from conftest import make_tiny_target
from drafters import EagleModel, MedusaModel
from drafters.draft_lm import build_draft_lm
from drafters.provenance import provenance, record_provenance


def test_every_kind_records_and_reads_the_same_keys():
    target = make_tiny_target("qwen2")
    drafters = {"medusa": MedusaModel.from_target(target, 2), "eagle": EagleModel.from_target(target, 3),
                "draft_lm": build_draft_lm(target, 1, [0])}
    for kind, drafter in drafters.items():
        record_provenance(drafter.config, kind, target.config, "my-target")
        saved = type(drafter.config).from_dict(drafter.config.to_dict())  # as config.json round-trips it
        assert provenance(saved) == {"kind": kind, "target_name_or_path": "my-target", "target_revision": None,
                                     "target_model_type": "qwen2", "target_vocab_size": 256, "draft_vocab": None}


def test_old_head_configs_are_read_from_their_own_fields():
    old = PretrainedConfig(target_name_or_path="old-target", target_model_type="llama")
    assert provenance(old)["target_name_or_path"] == "old-target"
    assert provenance(old)["target_model_type"] == "llama" and provenance(old)["kind"] is None
