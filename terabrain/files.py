"""Writing files so that a kill at any moment leaves either the old or the new version."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ordinary_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 usually)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


ORDINARY_MODE = _ordinary_mode()


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary)`` then rename over ``path`` (atomic on POSIX file systems). The
    file gets the ordinary mode whatever wrote it (safetensors creates files 0600), so all
    files of a run have the same permissions."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.chmod(temporary, ORDINARY_MODE)
    with open(temporary, "rb+") as stream:
        os.fsync(stream.fileno())
    os.replace(temporary, path)
    fsync_dir(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    replace_atomically(path, lambda temporary: temporary.write_text(text))
