"""Writes that fail loudly and folders that can prove they are intact.

A full disk surfaces from torch.save or safetensors as an opaque C++/Rust error; `reporting_full_disk` turns it into
"no space left on device while writing <what> to <folder>". `file_record` / `record_problem` list a folder's files
with their sizes and CRC-32s when it is written, and find what changed when it is read back (a damaged checkpoint or
cache is then passed over or rebuilt instead of loaded).
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cli.errors import NoSpaceLeft

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def disk_is_full(err: BaseException, folder: Path) -> bool:
    """Did `err`, raised while writing into `folder`, come from a full disk? Libraries that write through C++ or
    Rust (torch.save, safetensors) lose the errno, so a failed write is also checked by writing a little more."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL_DISK or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return _probe_full(folder)


def _probe_full(folder: Path, size: int = 1 << 16) -> bool:
    folder = next((p for p in (folder, *folder.parents) if p.is_dir()), None)
    if folder is None:
        return False
    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
    except OSError as probe:
        return probe.errno in FULL_DISK
    return False


@contextmanager
def reporting_full_disk(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a failed write of `what` into `folder` caused by a full disk into NoSpaceLeft naming the folder."""
    try:
        yield
    except Exception as err:
        folder = Path(folder)
        if isinstance(err, NoSpaceLeft) or not disk_is_full(err, folder):
            raise
        try:
            free = f"{shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.is_dir())).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        raise NoSpaceLeft(errno.ENOSPC, f"no space left on device while writing {what} to {folder} ({free}); free "
                          "some space there or write to another disk") from err


def crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def file_record(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, list]:
    """{relative path: [bytes, crc32]} of every file under `folder` except those named in `skip`."""
    return {str(f.relative_to(folder)): [f.stat().st_size, crc32(f)]
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name not in skip}


def record_problem(folder: Path, record: dict[str, list]) -> str | None:
    """What differs between `folder` and its `file_record` (None: every file is as written)."""
    for name, (size, crc) in record.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size:,} bytes, {size:,} were written"
        if crc32(f) != crc:
            return f"{name} is not what was written (checksum)"
    return None
