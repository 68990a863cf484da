"""Loading the frozen target and `target_forward`, checked against the model's own forward on tiny targets."""
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DynamicCache, PreTrainedTokenizerFast

from conftest import VOCAB, make_tiny_target
from target import model as target_module
from target.model import load_target, target_forward, to_torch_dtype


def reference(model, input_ids, **kwargs):
    """The model's own forward: logits [B, T, V] and the last hidden state [B, T, H] (after the final norm)."""
    out = model(input_ids=input_ids, output_hidden_states=True, **kwargs)
    return out.logits, out.hidden_states[-1]


def random_ids(batch=2, seq=7, seed=1):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_all_positions_match_model_forward(tiny_target):
    ids = random_ids()
    logits, hidden = reference(tiny_target, ids)
    out = target_forward(tiny_target, ids)
    assert torch.equal(out.hidden_states, hidden)
    assert torch.equal(out.logits, logits)


def test_last_k_and_index_positions(tiny_target):
    ids = random_ids()
    logits, _ = reference(tiny_target, ids)
    out = target_forward(tiny_target, ids, logits_at=3)
    assert out.logits.shape == (2, 3, VOCAB)
    torch.testing.assert_close(out.logits, logits[:, -3:], rtol=1e-6, atol=1e-6)

    positions = torch.tensor([0, 4, 6])
    torch.testing.assert_close(target_forward(tiny_target, ids, logits_at=positions).logits, logits[:, positions],
                               rtol=1e-6, atol=1e-6)
    per_row = torch.tensor([[1, 2], [5, 0]])  # [B, K]
    expected = torch.stack([logits[0, [1, 2]], logits[1, [5, 0]]])
    torch.testing.assert_close(target_forward(tiny_target, ids, logits_at=per_row).logits, expected,
                               rtol=1e-6, atol=1e-6)
    mask = torch.tensor([True, False, False, True, False, False, True])
    torch.testing.assert_close(target_forward(tiny_target, ids, logits_at=mask).logits, logits[:, mask],
                               rtol=1e-6, atol=1e-6)
    assert target_forward(tiny_target, ids, logits_at=0).logits is None


def test_bad_logits_at(tiny_target):
    ids = random_ids(seq=4)
    with pytest.raises(ValueError, match="between 0 .* and the chunk length 4"):
        target_forward(tiny_target, ids, logits_at=5)
    with pytest.raises(ValueError, match="batch has 2"):
        target_forward(tiny_target, ids, logits_at=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="1D .* or 2D integer"):
        target_forward(tiny_target, ids, logits_at=torch.zeros(2, 1, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="got float"):
        target_forward(tiny_target, ids, logits_at=1.0)


def test_cache_continuation_with_padding(tiny_target):
    """Prefill with a left-padded batch, then append a chunk: equals one full forward over the whole sequence."""
    ids = random_ids(seq=9)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # row 1 is left-padded
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    full_logits, full_hidden = reference(tiny_target, ids, attention_mask=mask, position_ids=position_ids)

    prefill = target_forward(tiny_target, ids[:, :6], attention_mask=mask[:, :6], position_ids=position_ids[:, :6],
                             past_key_values=DynamicCache(config=tiny_target.config), logits_at=1)
    assert prefill.past_key_values.get_seq_length() == 6
    step = target_forward(tiny_target, ids[:, 6:], attention_mask=mask, position_ids=position_ids[:, 6:],
                          past_key_values=prefill.past_key_values)
    assert step.past_key_values is prefill.past_key_values and step.past_key_values.get_seq_length() == 9
    torch.testing.assert_close(step.hidden_states, full_hidden[:, 6:], rtol=0, atol=1e-5)
    torch.testing.assert_close(step.logits, full_logits[:, 6:], rtol=0, atol=1e-5)
    torch.testing.assert_close(prefill.logits, full_logits[:, 5:6], rtol=0, atol=1e-5)


def test_use_cache_false_returns_no_cache(tiny_target):
    assert target_forward(tiny_target, random_ids(), use_cache=False).past_key_values is None


# --- load_target -------------------------------------------------------------------------------------------------


def save_tiny_checkpoint(directory, arch="llama"):
    """A tiny target + a word-level tokenizer saved like any Hub checkpoint."""
    model = make_tiny_target(arch)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_word_level(vocab), unk_token="t3", bos_token="t1", eos_token="t2", pad_token="t0"
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def _word_level(vocab):
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def test_load_local_checkpoint_frozen(tmp_path):
    reference_model = save_tiny_checkpoint(tmp_path / "tiny")
    model, tokenizer = load_target(str(tmp_path / "tiny"))
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    assert model.name_or_path == str(tmp_path / "tiny")
    assert tokenizer("t5 t9")["input_ids"] == [5, 9]
    ids = random_ids()
    assert torch.equal(target_forward(model, ids).logits, reference_model(ids).logits)


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), (torch.float16, torch.float16)])
def test_load_dtype(tmp_path, dtype, expected):
    save_tiny_checkpoint(tmp_path / "tiny", arch="qwen2")
    model, _ = load_target(str(tmp_path / "tiny"), dtype=dtype)
    assert model.dtype == expected


def test_bad_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; use one of float32, bfloat16, float16"):
        to_torch_dtype("fp8")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an embedded name"):
        load_target(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(FileNotFoundError, match="check the path"):
        load_target("./relative/missing")


def test_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file; give a checkpoint directory"):
        load_target(str(tmp_path / "model.gguf"))


def test_embedded_name_resolves_to_cache_and_records_name(tmp_path, monkeypatch):
    save_tiny_checkpoint(tmp_path / "cached")
    monkeypatch.setattr(target_module, "embedded_target", lambda name: tmp_path / "cached")
    assert "smollm2-135m-instruct" in target_module.EMBEDDED_TARGETS
    model, tokenizer = load_target("smollm2-135m-instruct")
    assert model.name_or_path == "smollm2-135m-instruct"
    assert model.config.name_or_path == "smollm2-135m-instruct"
    assert model.config.to_dict()["_name_or_path"] == "smollm2-135m-instruct"
    assert tokenizer.name_or_path == "smollm2-135m-instruct"
    with pytest.raises(ValueError, match="has no revisions"):
        load_target("smollm2-135m-instruct", revision="main")


@pytest.mark.slow
def test_smollm2_target_forward_matches_model():
    """The real embedded target (built into the user's draftsmith cache on first use)."""
    model, tokenizer = load_target("smollm2-135m-instruct")
    assert model.name_or_path == "smollm2-135m-instruct"
    assert tokenizer.chat_template and tokenizer.eos_token_id == model.config.eos_token_id == 2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Name a prime number."}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    logits, hidden = reference(model, ids)
    out = target_forward(model, ids, logits_at=1)
    assert torch.equal(out.hidden_states, hidden)
    torch.testing.assert_close(out.logits, logits[:, -1:], rtol=0, atol=1e-4)
