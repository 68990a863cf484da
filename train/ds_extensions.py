"""DeepSpeed's just-in-time C++ extensions: skip the one training never uses, and never wait silently on a build.

On CPU, DeepSpeed's communication backend compiles `deepspeed_shm_comm` (a shared-memory all-reduce, a minute or
two, printing nothing) when the process group starts. Only DeepSpeed's tensor-parallel inference calls it
(`inference_all_reduce`); training's collectives go through gloo. So `skip_unused_extensions` marks it unusable
and no run compiles it.

torch builds an extension under a `lock` file (`torch.utils.file_baton.FileBaton`); every other process waits while
that file exists. A build that was interrupted (Ctrl-C, kill) leaves the file behind, and every later run waits on
it forever. `watch_build_locks` watches the build folders while DeepSpeed starts: it says who is compiling what,
and deletes a lock that no live process holds (the builder keeps the lock file open while it builds).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

UNUSED_EXTENSIONS = ("deepspeed_shm_comm",)  # serves DeepSpeed's tensor-parallel inference only
POLL_SECONDS = 2.0


def skip_unused_extensions() -> None:
    """Mark the extensions training never calls as incompatible, so DeepSpeed does not compile them."""
    import deepspeed.ops

    for name in UNUSED_EXTENSIONS:
        deepspeed.ops.__compatible_ops__[name] = False


def extensions_root() -> Path:
    """Where torch builds extensions: $TORCH_EXTENSIONS_DIR, else its per-user cache folder."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def build_locks(root: Path) -> list[Path]:
    """The build lock files under `root` (`<root>/<name>/lock` or `<root>/<py_accelerator>/<name>/lock`)."""
    if not root.is_dir():
        return []
    return sorted([*root.glob("*/lock"), *root.glob("*/*/lock")])


def lock_holders(lock: Path) -> list[int] | None:
    """Pids of the processes that have `lock` open; None when some process's files could not be read (another
    user's) and the lock file is not ours, so its holder cannot be known."""
    try:
        st = os.stat(lock)
    except FileNotFoundError:
        return []
    holders, unreadable = [], False
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except PermissionError:
            unreadable = True
            continue
        except OSError:  # the process ended meanwhile
            continue
        for fd in fds:
            try:
                fst = os.stat(fd)
            except OSError:
                continue
            if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
                holders.append(int(proc.name))
                break
    if not holders and unreadable and st.st_uid != os.geteuid():
        return None
    return holders


class LockWatch:
    """One look at the build locks per `check()`: says once who builds what, deletes a lock that no live
    process has held for two looks in a row (its builder is gone)."""

    def __init__(self, root: Path, out=None):
        self.root = root
        self.out = out or sys.stderr
        self.said: set[tuple[Path, str]] = set()
        self.unheld: dict[Path, int] = {}  # lock -> inode seen unheld at the previous look

    def _say(self, lock: Path, key: str, message: str) -> None:
        if (lock, key) not in self.said:
            self.said.add((lock, key))
            print(message, file=self.out, flush=True)

    def check(self) -> None:
        for lock in build_locks(self.root):
            name = lock.parent.name
            holders = lock_holders(lock)
            if holders is None:
                self._say(lock, "unknown", f"DeepSpeed waits for the build lock {lock}, held by another user's "
                          f"process or left over; if no compile of {name} is running, delete that file")
            elif os.getpid() in holders:
                self._say(lock, "self", f"compiling DeepSpeed's C++ extension {name} in {lock.parent} (once per "
                          "machine; a minute or two)")
            elif holders:
                self._say(lock, f"wait{holders[0]}", f"waiting for process {holders[0]}, which is compiling "
                          f"DeepSpeed's C++ extension {name} in {lock.parent}")
            else:
                self._remove_if_stale(lock, name)

    def _remove_if_stale(self, lock: Path, name: str) -> None:
        try:
            inode = lock.stat().st_ino
        except FileNotFoundError:
            return
        if self.unheld.get(lock) != inode:  # a builder closes and deletes its lock in one go: look again first
            self.unheld[lock] = inode
            return
        try:
            lock.unlink()
        except FileNotFoundError:
            return
        print(f"removed the stale build lock {lock}: the compile of {name} that left it was interrupted",
              file=self.out, flush=True)


@contextmanager
def watch_build_locks(out=None, poll_seconds: float = POLL_SECONDS) -> Iterator[LockWatch]:
    """Remove stale build locks, then run a LockWatch every `poll_seconds` in a background thread while the block
    runs. (A lock removed while a process already waits on it lets that process import a half-built extension, which
    fails loudly; removed before, the process builds it itself.)"""
    watch, stop = LockWatch(extensions_root(), out), threading.Event()
    watch.check()
    if watch.unheld:  # a lock nobody holds: look again in a moment, then it goes
        time.sleep(0.2)
        watch.check()

    def loop():
        while True:
            watch.check()
            if stop.wait(poll_seconds):
                return

    thread = threading.Thread(target=loop, name="build-lock-watch", daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        stop.set()
        thread.join()
