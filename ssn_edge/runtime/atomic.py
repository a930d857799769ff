"""Writing that survives interruption: atomic file writes (a reader, or a crash, never sees half a file),
shared permissions, work folders swept once their process is gone, SIGTERM/SIGINT as an exception that lets
clean-up run, and OS errors (full disk, permissions) in one line. Torch-free, shared by every writer."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

log = logging.getLogger("ssn_edge")


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
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; results are for sharing
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


# --------------------------------------------------------------------------------------------------------------
# Permissions: what a bundle or a result folder is created with
# --------------------------------------------------------------------------------------------------------------

SHARED_DIR_MODE = 0o755
SHARED_FILE_MODE = 0o644


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def share_tree(root: Path) -> None:
    """Folders 0755 and files 0644 under root (root included), narrowed by the umask: readable by the service
    account that runs the line (mkdtemp makes 0700) unless the user's umask says otherwise (027: 0750/0640)."""
    umask = current_umask()
    os.chmod(root, SHARED_DIR_MODE & ~umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), SHARED_DIR_MODE & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), SHARED_FILE_MODE & ~umask)


# --------------------------------------------------------------------------------------------------------------
# Work folders of a process that may be killed: named after their owner, swept when the owner is gone
# --------------------------------------------------------------------------------------------------------------

LEGACY_MAX_AGE_S = 3600.0  # work folders of ssn-edge versions that did not name their process


def pid_alive(pid: int) -> bool:
    """Whether process pid still runs on this machine (a zombie does not). Where that cannot be asked
    (Windows), every pid counts as alive and only the age rule sweeps."""
    if pid <= 0 or os.name != "posix":
        return pid > 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def sweep_stale(folder: Path, owned: re.Pattern[str], legacy: re.Pattern[str] | None = None,
                max_age_s: float = LEGACY_MAX_AGE_S) -> list[Path]:
    """Remove the work folders in folder that a killed process left: names matching ``owned`` (a group
    ``pid``) whose process is gone, and names matching ``legacy`` (no pid) untouched for max_age_s. Returns
    what was removed; a folder that cannot be removed is left, with a warning."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = owned.fullmatch(entry.name)
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if match is not None:
                stale = int(match["pid"]) != os.getpid() and not pid_alive(int(match["pid"]))
            else:
                stale = legacy is not None and legacy.fullmatch(entry.name) is not None and \
                    now - entry.stat(follow_symlinks=False).st_mtime > max_age_s
            if stale:
                shutil.rmtree(entry.path)
                removed.append(Path(entry.path))
        except OSError as exc:
            log.warning("%s: could not remove this leftover of an interrupted run (%s)", entry.path, describe_os_error(exc))
    if removed:
        log.info("removed %d leftover(s) of interrupted runs: %s", len(removed), ", ".join(str(p) for p in removed))
    return removed


# --------------------------------------------------------------------------------------------------------------
# Signals and OS errors as one line
# --------------------------------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: raised where the program was, so every `finally` and cleanup runs; the CLI
    then exits 128 + signum. A BaseException, as KeyboardInterrupt is: `except Exception` does not stop it."""

    def __init__(self, signum: int, what: str = ""):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"{what + ' ' if what else ''}interrupted by {name}" + ("; nothing was written" if what else ""))


@contextmanager
def signals_raise(what: str = "", signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise Interrupted (what: the work, for its message); the previous
    handlers come back after it. Only the main thread can take signals: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum: int, _frame) -> None:
        for s in signums:  # a second signal during the clean-up must not cut it short
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum, what)

    previous = {s: signal.signal(s, raise_interrupted) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_OS_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
              errno.EROFS: "read-only file system", errno.ENOENT: "no such file or folder",
              errno.ENOTDIR: "a part of the path is a file, not a folder", errno.EISDIR: "is a folder"}


def describe_os_error(exc: OSError) -> str:
    """An OSError in words, without Python's '[Errno 28]' decoration: 'no space left on device'."""
    return _OS_ERRORS.get(exc.errno or -1) or (exc.strerror or str(exc)).lower()


def os_error_message(exc: OSError, what: str) -> str:
    """'<file>: cannot <what>: no space left on device' (the file the error names, when it names one)."""
    where = os.fsdecode(exc.filename) if exc.filename is not None else None
    return f"{where + ': ' if where else ''}cannot {what}: {describe_os_error(exc)}"
