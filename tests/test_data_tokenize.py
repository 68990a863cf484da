"""data/tokenize.py: golden loss masks on ChatML, Llama-3 and plain-text templates, errors, the token cache.

The tokenizers are built here: a `tokenizers` WordLevel model over the words these tests use, split by a
GPT-style regex (` word`, runs of newlines, single punctuation), with the templates' special tokens.
"""
import json
import os
import re

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import data.tokenize as tokenize_module
from data.tokenize import ChatTemplateError, build_token_dataset, tokenize_conversation

CHATML = (  # SmolLM2-Instruct's template
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (  # Llama-3-Instruct's template
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PLAIN = (  # no special tokens and no end-of-turn token at all
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)
SPLIT = r" ?[A-Za-z0-9']+|\n+|[^\sA-Za-z0-9']| +"
WORDS = ("system\nuser\nassistant\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\n"
         "Be brief. Hi Hello! Bye Goodbye. What is 2+2? And 3+3? It 4 6 Type to stop OK <|im_end|> Use here: ")


def make_tokenizer(template, eos, specials, bos=None):
    words = {m.group().strip(" ") for m in re.finditer(SPLIT, WORDS)} - {""}
    pieces = sorted(words | {" " + w for w in words if not w.startswith("\n")} | {" ", "\n\n", "\n\n\n"})
    vocab = {"[UNK]": 0, **{p: i + 1 for i, p in enumerate(pieces)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token=eos, bos_token=bos,
                                  additional_special_tokens=specials)
    tok.chat_template = template
    return tok


@pytest.fixture
def chatml():
    return make_tokenizer(CHATML, eos="<|im_end|>", specials=["<|im_start|>"])


@pytest.fixture
def llama3():
    return make_tokenizer(LLAMA3, eos="<|eot_id|>", bos="<|begin_of_text|>",
                          specials=["<|start_header_id|>", "<|end_header_id|>"])


@pytest.fixture
def plain():
    return make_tokenizer(PLAIN, eos="</s>", specials=[])


def system(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


TWO_TURNS = [system("Be brief."), user("Hi"), assistant("Hello!"), user("Bye"), assistant("Goodbye.")]
MATH = [user("What is 2+2?"), assistant("2+2 is 4."), user("And 3+3?"), assistant("It is 6.")]


def tokens(tok, example):
    return tok.convert_ids_to_tokens(example["input_ids"])


def masked_runs(tok, example):
    """The runs of consecutive target tokens, as token strings."""
    runs, run = [], []
    for t, m in zip(tokens(tok, example), example["loss_mask"]):
        if m:
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    return runs + [run] if run else runs


def test_chatml_golden_tokens_and_mask(chatml):
    ex = tokenize_conversation(chatml, TWO_TURNS, max_length=100)
    assert list(zip(tokens(chatml, ex), ex["loss_mask"])) == [
        ("<|im_start|>", 0), ("system", 0), ("\n", 0), ("Be", 0), (" brief", 0), (".", 0), ("<|im_end|>", 0),
        ("\n", 0), ("<|im_start|>", 0), ("user", 0), ("\n", 0), ("Hi", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant", 0), ("\n", 0),
        ("Hello", 1), ("!", 1), ("<|im_end|>", 1),
        ("\n", 0), ("<|im_start|>", 0), ("user", 0), ("\n", 0), ("Bye", 0), ("<|im_end|>", 0), ("\n", 0),
        ("<|im_start|>", 0), ("assistant", 0), ("\n", 0),
        ("Goodbye", 1), (".", 1), ("<|im_end|>", 1),
        ("\n", 0),
    ]
    assert ex["input_ids"] == chatml.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=False)


def test_chatml_default_system_prompt_is_not_a_target(chatml):
    ex = tokenize_conversation(chatml, MATH, max_length=100)
    assert tokens(chatml, ex)[:6] == ["<|im_start|>", "system", "\n", "You", " are", " a"]
    assert masked_runs(chatml, ex) == [["2", "+", "2", " is", " 4", ".", "<|im_end|>"],
                                       ["It", " is", " 6", ".", "<|im_end|>"]]
    assert ex["input_ids"] == chatml.apply_chat_template(MATH, tokenize=True, return_dict=False)


def test_llama3_golden_tokens_and_mask(llama3):
    ex = tokenize_conversation(llama3, TWO_TURNS, max_length=100)
    assert list(zip(tokens(llama3, ex), ex["loss_mask"])) == [
        ("<|begin_of_text|>", 0),
        ("<|start_header_id|>", 0), ("system", 0), ("<|end_header_id|>", 0), ("\n\n", 0),
        ("Be", 0), (" brief", 0), (".", 0), ("<|eot_id|>", 0),
        ("<|start_header_id|>", 0), ("user", 0), ("<|end_header_id|>", 0), ("\n\n", 0), ("Hi", 0), ("<|eot_id|>", 0),
        ("<|start_header_id|>", 0), ("assistant", 0), ("<|end_header_id|>", 0), ("\n\n", 0),
        ("Hello", 1), ("!", 1), ("<|eot_id|>", 1),
        ("<|start_header_id|>", 0), ("user", 0), ("<|end_header_id|>", 0), ("\n\n", 0), ("Bye", 0), ("<|eot_id|>", 0),
        ("<|start_header_id|>", 0), ("assistant", 0), ("<|end_header_id|>", 0), ("\n\n", 0),
        ("Goodbye", 1), (".", 1), ("<|eot_id|>", 1),
    ]
    assert masked_runs(llama3, tokenize_conversation(llama3, MATH, 100)) == [
        ["2", "+", "2", " is", " 4", ".", "<|eot_id|>"], ["It", " is", " 6", ".", "<|eot_id|>"]]


def test_plain_template_without_special_tokens(plain):
    ex = tokenize_conversation(plain, MATH, max_length=100)
    # No EOS in the span, so the template's newline after the answer is the turn's end and a target.
    assert masked_runs(plain, ex) == [[" 2", "+", "2", " is", " 4", ".", "\n"], [" It", " is", " 6", ".", "\n"]]
    assert tokens(plain, ex)[:3] == ["user", ":", " What"]


def test_token_merged_across_a_turn_boundary(chatml):
    """`assistant\\n` + an answer starting with `\\n\\n` tokenizes as one `\\n\\n\\n` token: it is a target."""
    ex = tokenize_conversation(chatml, [user("Hi"), assistant("\n\nHello"), user("Bye"), assistant("OK")], 100)
    assert masked_runs(chatml, ex) == [["\n\n\n", "Hello", "<|im_end|>"], ["OK", "<|im_end|>"]]
    assert ex["input_ids"] == chatml.apply_chat_template(
        [user("Hi"), assistant("\n\nHello"), user("Bye"), assistant("OK")], tokenize=True, return_dict=False)


def test_control_token_text_in_messages_is_plain_text(chatml):
    ex = tokenize_conversation(chatml, [user("Type <|im_end|> to stop"), assistant("Use <|im_end|> here")], 100)
    assert tokens(chatml, ex)[21:33] == ["Type", " ", "<", "|", "im", "_", "end", "|", ">", " to", " stop",
                                         "<|im_end|>"]
    assert masked_runs(chatml, ex) == [["Use", " ", "<", "|", "im", "_", "end", "|", ">", " here", "<|im_end|>"]]


def make_sentencepiece_style_tokenizer():
    """Metaspace (`▁word`) with a `▁` prepended to the start of the text, as Llama-2/Mistral tokenizers do:
    a turn tokenized on its own starts differently from the same turn inside the conversation."""
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    words = {w for text in ("[INST] Hi Bye [/INST] Hello! Goodbye.",) for w, _ in pre.pre_tokenize_str(text)}
    words |= {w.lstrip("▁") for w in words}
    backend = Tokenizer(models.WordLevel({"<unk>": 0, **{w: i + 1 for i, w in enumerate(sorted(words))}}, "<unk>"))
    backend.pre_tokenizer = pre
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                         "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}"
                         "{% endif %}{% endfor %}")
    return tok


def test_sentencepiece_style_prefix_space_uses_the_exact_path():
    tok = make_sentencepiece_style_tokenizer()
    msgs = [user("Hi"), assistant("Hello!"), user("Bye"), assistant("Goodbye.")]
    ex = tokenize_conversation(tok, msgs, 100)
    assert list(zip(tokens(tok, ex), ex["loss_mask"])) == [
        ("<s>", 0), ("[INST]", 0), ("▁Hi", 0), ("▁[/INST]", 0), ("▁Hello!", 1), ("</s>", 1),
        ("[INST]", 0), ("▁Bye", 0), ("▁[/INST]", 0), ("▁Goodbye.", 1), ("</s>", 1)]
    assert ex["input_ids"] == tok.apply_chat_template(msgs, tokenize=True, return_dict=False)


@pytest.mark.parametrize("template", ["chatml", "llama3", "plain"])
def test_fast_and_exact_paths_agree(template, request, monkeypatch):
    tok = request.getfixturevalue(template)
    fast = [tokenize_conversation(tok, m, 100) for m in (TWO_TURNS, MATH)]
    monkeypatch.setattr(tokenize_module, "_bounds_by_segments", lambda *args: None)
    assert [tokenize_conversation(tok, m, 100) for m in (TWO_TURNS, MATH)] == fast


def test_truncation_keeps_the_prefix(chatml):
    full = tokenize_conversation(chatml, TWO_TURNS, max_length=100)
    cut = tokenize_conversation(chatml, TWO_TURNS, max_length=32)  # ends inside "Goodbye."'s span
    assert cut["input_ids"] == full["input_ids"][:32] and cut["loss_mask"] == full["loss_mask"][:32]
    assert sum(cut["loss_mask"]) == 3 + 2
    early = tokenize_conversation(chatml, TWO_TURNS, max_length=17)  # ends just before "Hello"
    assert len(early["input_ids"]) == 17 and sum(early["loss_mask"]) == 0


def test_missing_chat_template_is_a_clear_error(chatml):
    chatml.chat_template = None
    with pytest.raises(ChatTemplateError, match=r"tokenizer \w+\('\?'\) has no chat template.*"
                                                r"tokenizer.chat_template = "):
        tokenize_conversation(chatml, MATH, 100)


def test_template_that_rewrites_earlier_turns_is_rejected(chatml):
    chatml.chat_template = (  # drops the text of every assistant turn but the last, like reasoning-stripping
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ 'assistant: ...\n' }}"
        "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match=r"is not prefix-stable: rendering messages\[:2\] is not a prefix of "
                                                r"rendering messages\[:3\] \+ generation prompt \(they differ at char 30: '2\+2 is 4.\\n' vs '...\\nuser"):
        tokenize_conversation(chatml, MATH, 100)


def test_leading_assistant_turn_is_an_error(chatml):
    with pytest.raises(ValueError, match="messages must start with a system or user turn"):
        tokenize_conversation(chatml, [assistant("Hi"), user("Q"), assistant("A")], 100)


# ----------------------------------------------------------------------------------------------------------
# build_token_dataset and its cache
# ----------------------------------------------------------------------------------------------------------

def write_source(tmp_path, conversations):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n" for i, m in enumerate(conversations)))
    return str(path)


def test_build_token_dataset_columns_and_report(tmp_path, llama3):
    src = write_source(tmp_path, [TWO_TURNS, MATH, [user("Hi")]])
    ds, report = build_token_dataset(src, llama3, max_length=100)
    assert ds.column_names == ["input_ids", "loss_mask", "length"] and len(ds) == 2
    assert ds[0]["input_ids"] == tokenize_conversation(llama3, TWO_TURNS, 100)["input_ids"]
    assert ds["length"] == [len(ds[0]["input_ids"]), len(ds[1]["input_ids"])] == [35, 42]
    assert [sum(m) for m in ds["loss_mask"]] == [6, 12]
    assert (report.records, report.kept, report.tokenized) == (3, 2, 2)
    assert report.skipped == {"no assistant turn": 1}
    assert re.match(r"tokenized 2 conversations in \d+\.\d s: 77 tokens, 18 assistant tokens \(23\.4%\)$",
                    report.notes[0])


def test_examples_without_assistant_tokens_after_truncation_are_counted(tmp_path, chatml):
    long_prompt = [user(" ".join(["Hello"] * 30)), assistant("OK")]
    src = write_source(tmp_path, [TWO_TURNS, long_prompt])
    ds, report = build_token_dataset(src, chatml, max_length=20)
    assert len(ds) == 1 and report.kept == 1 and report.tokenized == 2
    assert report.skipped == {"no assistant tokens within max_length=20": 1}
    assert report.examples["no assistant tokens within max_length=20"] == ["train.jsonl:2 (id 'c1')"]


def test_second_call_loads_the_cache_without_tokenizing(tmp_path, chatml, monkeypatch):
    src, cache = write_source(tmp_path, [TWO_TURNS, MATH]), str(tmp_path / "cache")
    first, first_report = build_token_dataset(src, chatml, 64, cache_dir=cache)
    assert first_report.tokenized == 2 and first_report.notes[-1].startswith("saved token cache ")

    def fail(*args, **kwargs):
        raise AssertionError("tokenize_conversation was called on a cache hit")

    monkeypatch.setattr(tokenize_module, "tokenize_conversation", fail)
    second, second_report = build_token_dataset(src, chatml, 64, cache_dir=cache)
    assert second.to_dict() == first.to_dict()
    assert second_report.tokenized == 0 and second_report.kept == 2
    assert second_report.notes[-1].startswith("loaded from token cache ")
    assert len(os.listdir(cache)) == 1  # one finished entry, no temporary directories left
    with pytest.raises(AssertionError, match="was called on a cache hit"):  # a new max_length is a new key
        build_token_dataset(src, chatml, 65, cache_dir=cache)


def test_cache_key_follows_source_content_template_and_limit(tmp_path, chatml):
    src, cache = write_source(tmp_path, [TWO_TURNS, MATH]), str(tmp_path / "cache")
    key = tokenize_module.cache_key(src, chatml, 64, None)
    assert tokenize_module.cache_key(src, chatml, 64, 1) != key
    _, report = build_token_dataset(src, chatml, 64, cache_dir=cache)
    write_source(tmp_path, [MATH, TWO_TURNS])  # same size, new content
    assert tokenize_module.cache_key(src, chatml, 64, None) != key
    ds, report = build_token_dataset(src, chatml, 64, cache_dir=cache)
    assert report.tokenized == 2 and sum(ds[0]["loss_mask"]) == 12
    chatml.chat_template = LLAMA3
    assert tokenize_module.cache_key(src, chatml, 64, None) not in (key, tokenize_module.cache_key(src, chatml, 63, None))
    assert sorted(os.listdir(cache)) == sorted([key, tokenize_module.cache_key(src, make_tokenizer(
        CHATML, eos="<|im_end|>", specials=["<|im_start|>"]), 64, None)])
