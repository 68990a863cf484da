"""Dump an EAGLE config's target features to an offline cache (data/features.py), so training reads them
instead of running the target:

    python -m train.features --config configs/eagle3_smollm2.yaml --output runs/features_e3 [--dtype bfloat16]
"""
from __future__ import annotations


from cli.errors import ArgumentParser, run_main
from data.embedded import resolve_data
from data.features import dump_features, manifest_for
from data.tokenize import build_token_dataset
from drafters.dflash import default_feature_layers as dflash_feature_layers
from drafters.eagle import default_feature_layers
from target.model import load_target
from train.config import load_config


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="an EAGLE training config (target, data, drafter sections)")
    p.add_argument("--output", help="the cache folder (default: the config's drafter.features)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shard-size", type=int, default=64, help="conversations per shard")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.drafter.kind not in ("eagle", "dflash"):
        p.error(f"{args.config}: drafter.kind is {cfg.drafter.kind!r}; feature caches are for EAGLE and DFlash drafters")
    out = args.output or cfg.drafter.features
    if not out:
        p.error("give --output (or set drafter.features in the config)")
    target, tokenizer = load_target(cfg.target, dtype=cfg.training.target_dtype)
    source = resolve_data(cfg.data.train)
    ds, _ = build_token_dataset(source, tokenizer, cfg.data.max_length, cfg.data.cache_dir, cfg.data.limit)
    manifest = manifest_for(target, tokenizer, source, cfg.data.max_length, cfg.data.limit,
                            feature_layers_of(cfg, target), args.dtype, len(ds), args.shard_size)
    report = dump_features(target, ds, out, manifest)
    print(f"{out}: {report['tokens']:,} tokens, {report['bytes'] / 2**20:,.1f} MiB, "
          f"{report['bytes_per_token']:,.0f} bytes per token ({report['shards_written']} shards written now)")


def feature_layers_of(cfg, target) -> list[int] | None:
    """The target layers an EAGLE or DFlash config's drafter reads (None for EAGLE-1: the last hidden state only)."""
    L = target.config.get_text_config().num_hidden_layers
    if cfg.drafter.kind == "dflash":
        return cfg.drafter.feature_layers or dflash_feature_layers(L, cfg.drafter.num_layers)
    if cfg.drafter.version == 1:
        return None
    return cfg.drafter.feature_layers or default_feature_layers(L)


if __name__ == "__main__":
    run_main(main)
