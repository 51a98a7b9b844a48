"""Which process is writing a partial directory: a "host pid" file inside it.

Commands that build into a hidden partial directory and rename it into place (``convert``,
``models fetch``) claim it with :func:`claim`; the next start removes only partials whose owner
is gone (:func:`alive`), never one a live process on this or another host is still writing.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

OWNER = ".scalebio-owner"


def claim(partial: Path, name: str = OWNER) -> None:
    (Path(partial) / name).write_text(f"{socket.gethostname()} {os.getpid()}\n")


def release(partial: Path, name: str = OWNER) -> None:
    (Path(partial) / name).unlink()


def alive(partial: Path, name: str = OWNER) -> bool:
    """Whether the process that claimed ``partial`` may still be writing it."""
    try:
        host, pid = (Path(partial) / name).read_text().split()
    except (OSError, ValueError):
        return False  # killed before it wrote its owner, or by a scalebio that wrote none
    if host != socket.gethostname():
        return True  # a process on another machine sharing this file system: not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True
