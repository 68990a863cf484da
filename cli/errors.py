"""How every entry point ends on a mistake: one line that says what went wrong, where, and what to do.

    if __name__ == "__main__":
        run_main(main)          # main(argv) raises; run_main prints

A user error (bad input, a busy, read-only or full folder, a damaged file) prints `error: <message>` on one line
and exits with status 1; a usage error of `ArgumentParser` prints one line and exits with status 2. A traceback is printed for a bug (any other exception), or for everything with `--debug`
anywhere on the command line (or DRAFTSMITH_DEBUG=1). User errors are: `UserError`, operating-system errors
(`OSError`: missing, unwritable or full paths), collective timeouts between ranks, and `ValueError`s raised by
draftsmith's own code (its input checks); a `ValueError` from inside a library is a bug until a caller wraps it.
This package imports nothing in-house, so that every layer can use it.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OWN_CODE = tuple(str(REPO / package) + os.sep for package in ("cli", "data", "drafters", "inference", "target", "train"))


class UserError(Exception):
    """A problem the user can fix; the message says what, where and what to do."""


class NoSpaceLeft(UserError, OSError):
    """A write failed because the disk (or quota) is full: NoSpaceLeft(errno.ENOSPC, message)."""

    def __str__(self) -> str:
        return self.strerror


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with a one-line usage error (`prog: error: ... (see --help)`, exit status 2) instead of the
    usage block, and --debug listed (run_main acts on it)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def error(self, message: str):
        print(f"{self.prog}: error: {' '.join(message.split())} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def run_main(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Call main(argv) (argv: the command line without `--debug`); print a user error as one line and exit 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DRAFTSMITH_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{_rank_prefix()}interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as err:
        if debug or not is_user_error(err):
            raise
        print(f"{_rank_prefix()}error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(1)


def is_user_error(err: BaseException) -> bool:
    if isinstance(err, (UserError, OSError)):
        return True
    if any(c.__name__ == "DistError" and c.__module__.startswith("torch.distributed") for c in type(err).__mro__):
        return True  # a peer rank died or stopped answering: its own output says why
    return isinstance(err, ValueError) and _raised_by_own_code(err)


def _raised_by_own_code(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(OWN_CODE)


def one_line(err: BaseException) -> str:
    """The error's message on one line; an OSError without its own words gets them (`[Errno 28] ...: 'path'`)."""
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and not isinstance(err, UserError) and err.strerror and err.filename:
        text = f"{err.strerror}: {err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
    return text or type(err).__name__


def _rank_prefix() -> str:
    return f"rank {os.environ.get('RANK', '?')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
