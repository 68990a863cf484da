"""Tiny stand-ins for the real assets, written into a test's tmp directory: a tiny target checkpoint with a
byte-level BPE tokenizer and a ChatML chat template, a conversations JSONL and a Spec-Bench-format questions
JSONL. Deterministic: the same call writes the same files."""
from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import make_tiny_target

VOCAB = 320  # 256 byte symbols, 3 special tokens, the rest BPE merges
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0 (pad), 1, 2 (eos), as make_tiny_target expects
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' "
    "+ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = ("the cat dog sat on a mat and ran to house big small red blue one two three what is why how "
         "tell me about please answer yes no maybe good bad day night sun moon tree river").split()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def tiny_conversations(n: int = 48, seed: int = 0) -> list[dict]:
    """OpenAI-style records: {id, messages: [user, assistant]} (a few with two rounds)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        messages = [{"role": "user", "content": _sentence(rng, 3, 10)},
                    {"role": "assistant", "content": _sentence(rng, 4, 24)}]
        if i % 5 == 0:
            messages += [{"role": "user", "content": _sentence(rng, 2, 6)},
                         {"role": "assistant", "content": _sentence(rng, 3, 12)}]
        records.append({"id": f"tiny-{i}", "messages": messages})
    return records


def write_conversations(path: Path, n: int = 48, seed: int = 0) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in tiny_conversations(n, seed)))
    return str(path)


def write_questions(path: Path) -> str:
    """Spec-Bench format: question_id, category, turns; two categories, two questions each."""
    rng = random.Random(1)
    rows = [{"question_id": i, "category": ["writing", "qa"][i % 2],
             "turns": [_sentence(rng, 3, 8)] + ([_sentence(rng, 2, 5)] if i == 0 else [])} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) with ChatML special tokens and template; eos = <|im_end|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [m["content"] for r in tiny_conversations(200, seed=7) for m in r["messages"]]
    tok.train_from_iterator(corpus + ["user assistant system"] * 20, trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB and [tok.token_to_id(s) for s in SPECIAL] == [0, 1, 2]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML
    return fast


def write_tiny_target(directory: Path, arch: str = "llama") -> str:
    """Save a tiny target (hidden 64, 2 layers, vocab 320) + tokenizer like a Hub checkpoint; returns the path."""
    model = make_tiny_target(arch, vocab_size=VOCAB)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


def write_tiny_assets(root: Path) -> dict[str, str]:
    """Target, conversations and questions under `root`; returns the config overrides that point at them."""
    root.mkdir(parents=True, exist_ok=True)
    return {
        "target": write_tiny_target(root / "target"),
        "data.train": write_conversations(root / "conversations.jsonl"),
        "eval.questions": write_questions(root / "questions.jsonl"),
    }


METRICS_COMPARED = ("step", "lr", "tokens", "loss", "head_loss", "head_acc", "padding_fraction")  # must not drift on resume


def tiny_overrides(assets: dict, output_dir: Path, *overrides: str) -> list[str]:
    """Overrides that run a tiny config on the tiny assets, without evaluation, into `output_dir`."""
    return [f"{k}={v}" for k, v in assets.items()] + [
        f"output_dir={output_dir}", "data.limit=null", "data.max_length=128", "data.max_tokens=512",
        "eval.questions=null", "logging.progress_bar=false", *overrides]


def metric_rows(output_dir: Path) -> list[dict]:
    """The metrics.jsonl rows of a run, restricted to the fields a resumed run must reproduce exactly."""
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in METRICS_COMPARED} for r in rows]
