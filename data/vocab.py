"""Counting a frequency-ranked draft vocabulary (FR-Spec; see drafters/vocab.py) from training data.

    python -m data.vocab --drafter runs/x/drafter --target smollm2-135m-instruct --data sharegpt \
        --limit 2000 --size 8192          # add one to an already trained drafter
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cli.errors import ArgumentParser, run_main
from data.embedded import resolve_data
from data.tokenize import build_token_dataset
from target.model import load_target


def frequent_tokens(token_rows, vocab_size: int, n: int) -> list[int]:
    """The n most frequent token ids in `token_rows` (an iterable of 1D id tensors), sorted by id. FR-Spec (Zhao
    et al., 2025) drafts over such a set to shrink the draft's LM head; draftsmith records it in the draft's config
    (`draftsmith.draft_vocab`) and its proposer drafts over it."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in token_rows:
        counts += torch.bincount(ids.reshape(-1).long(), minlength=vocab_size)[:vocab_size]
    if counts.sum() == 0:
        raise ValueError("no tokens to count: the draft vocabulary needs training data")
    return counts.topk(min(n, vocab_size)).indices.sort().values.tolist()


def token_coverage(vocab: list[int], token_rows) -> float:
    """Share of the tokens in `token_rows` (1D id tensors) that lie in `vocab`."""
    vocab = torch.tensor(vocab)
    hit = total = 0
    for ids in token_rows:
        hit += int(torch.isin(ids.reshape(-1), vocab).sum())
        total += ids.numel()
    return hit / max(total, 1)


def draft_vocab_entry(ds, num_train: int, holdout: list[int], vocab_size: int, size: int) -> dict:
    """From a token dataset (input_ids, loss_mask rows): the `size` most frequent tokens of its first num_train
    conversations (all their tokens), and the share of the held-out conversations' assistant tokens they cover,
    as the entries to merge into `config.draftsmith`."""
    vocab = frequent_tokens((torch.tensor(r) for r in ds.select(range(num_train))["input_ids"]), vocab_size, size)
    held = ds.select(holdout)
    coverage = token_coverage(vocab, (torch.tensor(i)[torch.tensor(m, dtype=torch.bool)]
                                      for i, m in zip(held["input_ids"], held["loss_mask"])))
    return {"draft_vocab": vocab, "draft_vocab_heldout_coverage": coverage}


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--drafter", required=True, help="a saved drafter folder (its config.json is updated)")
    p.add_argument("--target", required=True, help="the target whose tokenizer renders the data")
    p.add_argument("--data", required=True, help="conversations the drafter was trained on (as data.train)")
    p.add_argument("--limit", type=int, help="the first N conversations")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--size", type=int, default=8192, help="tokens in the draft vocabulary")
    p.add_argument("--holdout", type=int, default=16, help="last N conversations: coverage is measured on them")
    args = p.parse_args(argv)
    config_path = Path(args.drafter) / "config.json"
    if not config_path.is_file():
        p.error(f"{config_path} does not exist: give a drafter folder saved by draftsmith")
    target, tokenizer = load_target(args.target)
    ds, _ = build_token_dataset(resolve_data(args.data), tokenizer, args.max_length, None, args.limit)
    n = len(ds) - args.holdout
    if n < 1:
        p.error(f"{args.data}: {len(ds)} conversations leave none for counting after --holdout {args.holdout}")
    entry = draft_vocab_entry(ds, n, list(range(n, len(ds))), target.config.get_text_config().vocab_size, args.size)
    config = json.loads(config_path.read_text())
    config["draftsmith"] = {**config.get("draftsmith", {}), **entry}
    tmp = config_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(config_path)
    print(f"{args.drafter}: draft vocabulary of {len(entry['draft_vocab']):,} tokens, covering "
          f"{entry['draft_vocab_heldout_coverage']:.1%} of the held-out assistant tokens")


if __name__ == "__main__":
    run_main(main)
