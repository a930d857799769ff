"""Atomic file writes: a reader (or a crash) never sees half a file. Torch-free, shared by every writer."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write in steps (a large result streamed out): on leaving the block it is fsynced and
    renamed to path; on an error it is removed and path is untouched. Permissions follow the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write to a temporary file beside path, fsync, then rename into place; permissions follow the umask."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_open(path) as fh:
        fh.write(payload)
    return Path(path)
