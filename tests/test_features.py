"""Offline feature caches (data/features.py): training on a dump equals online training on the same batch; a
manifest that does not match the config is refused; an interrupted dump resumes without rewriting shards."""
import json

import pytest
import torch

from data.embedded import resolve_data
from data.features import FeatureCache, FeatureCacheMismatch, dump_features, manifest_for
from data.tokenize import build_token_dataset
from target.model import load_target
from tiny_assets import tiny_overrides
from train.config import load_config
from train.features import feature_layers_of, main
from train.train_heads import EagleRecipe

from test_train_eagle import REPO


def setup_recipe(assets, tmp_path, version, *extra):
    cfg = load_config(str(REPO / "configs" / f"eagle{version}_tiny.yaml"),
                      tiny_overrides(assets, tmp_path / "run", *extra))
    recipe = EagleRecipe(cfg)
    recipe.setup()
    return recipe


def dump(assets, tmp_path, version, out, dtype="float32", shard_size=16, **kwargs):
    cfg = load_config(str(REPO / "configs" / f"eagle{version}_tiny.yaml"), tiny_overrides(assets, tmp_path / "x"))
    target, tokenizer = load_target(cfg.target)
    source = resolve_data(cfg.data.train)
    ds, _ = build_token_dataset(source, tokenizer, cfg.data.max_length, None, cfg.data.limit)
    manifest = manifest_for(target, tokenizer, source, cfg.data.max_length, cfg.data.limit,
                            feature_layers_of(cfg, target), dtype, len(ds), shard_size)
    return dump_features(target, ds, str(out), manifest, **kwargs)


@pytest.mark.parametrize("version", [1, 3])
def test_offline_loss_equals_online_loss(assets, tmp_path, version):
    cache = tmp_path / "features"
    report = dump(assets, tmp_path, version, cache)
    assert report["complete"] and report["bytes_per_token"] > 0
    online = setup_recipe(assets, tmp_path / "on", version)
    offline = setup_recipe(assets, tmp_path / "off", version, f"drafter.features={cache}")
    try:
        indices = online.epoch_batches(0)[0]
        a, b = online.batch(indices), offline.batch(indices)
        assert set(b) - set(a) == ({"hidden", "features"} if version == 3 else {"hidden"})
        offline.engine.module.drafter.load_state_dict(online.engine.module.drafter.state_dict())
        loss_on, stats_on = online.engine.module(**a)
        loss_off, stats_off = offline.engine.module(**b)
        assert torch.allclose(loss_on, loss_off, rtol=1e-5, atol=1e-6)
        assert torch.equal(stats_on[:, 1:], stats_off[:, 1:])
    finally:
        online.cleanup()
        offline.cleanup()


def test_mismatched_manifest_is_refused(assets, tmp_path):
    cache = tmp_path / "features"
    dump(assets, tmp_path, 3, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    with pytest.raises(FeatureCacheMismatch, match="feature_layers"):
        FeatureCache(str(cache), {**manifest, "feature_layers": [0]})
    with pytest.raises(FeatureCacheMismatch, match="max_length"):  # the config's max_length differs
        setup_recipe(assets, tmp_path, 3, f"drafter.features={cache}", "data.max_length=64")
    with pytest.raises(FeatureCacheMismatch, match="feature_layers"):  # an EAGLE-1 cache for EAGLE-3
        dump(assets, tmp_path, 1, cache)


def test_interrupted_dump_resumes_without_rewriting_shards(assets, tmp_path):
    cache = tmp_path / "features"
    first = dump(assets, tmp_path, 3, cache, shard_size=8, stop_after_shards=2)
    assert not first["complete"] and first["shards_written"] == 2
    with pytest.raises(ValueError, match="incomplete"):
        FeatureCache(str(cache), json.loads((cache / "manifest.json").read_text()))
    kept = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard_*.safetensors")}
    second = dump(assets, tmp_path, 3, cache, shard_size=8)
    shards = sorted(p.name for p in cache.glob("shard_*.safetensors"))
    assert second["complete"] and second["shards_written"] == len(shards) - 2
    assert all(cache.joinpath(n).stat().st_mtime_ns == t for n, t in kept.items())  # not rewritten
    assert not list(cache.glob(".*tmp"))
    whole = dump(assets, tmp_path, 3, tmp_path / "whole", shard_size=8)
    assert whole["bytes"] == second["bytes"]
    a = FeatureCache(str(cache), json.loads((cache / "manifest.json").read_text()))
    b = FeatureCache(str(tmp_path / "whole"), json.loads((cache / "manifest.json").read_text()))
    for i in range(0, 40, 7):
        assert all(torch.equal(x, y) for x, y in zip(a.get(i), b.get(i)))


def test_cli_refuses_other_drafter_kinds(tmp_path):
    with pytest.raises(SystemExit):
        main(["--config", str(REPO / "configs" / "medusa_tiny.yaml"), "--output", str(tmp_path)])
