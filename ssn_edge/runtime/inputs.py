"""What a predict run is asked to score: the files named, and the image files in the folders named.

Every name is kept, in order, so each gets a result line: a missing file, a dangling symlink or a FIFO
becomes an input with its problem (reported as a failure), never a silent omission, and several names for one
file (symlinks, hard links, a file named twice) are each scored and marked as the same file. Folders are
scanned for image file names (IMAGE_EXTENSIONS, any case), sorted by the bytes of the name; files with other
names are counted as skipped. A recursive scan follows symlinked folders once each (a link loop is not
followed twice). Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ssn_edge.runtime.decode import ImageError, display_path, file_problem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".gif", ".jp2", ".j2k",
                    ".pbm", ".pgm", ".ppm", ".pnm", ".pfm", ".hdr", ".avif")


@dataclass(frozen=True)
class InputItem:
    """One name to score. problem: why it cannot be read, when that is known from the file system alone.
    same_as: the display name of an earlier input that is the same file (same device and inode)."""

    path: Path
    problem: ImageError | None = None
    same_as: str | None = None

    @property
    def name(self) -> str:
        return display_path(self.path)


@dataclass
class Inputs:
    items: list[InputItem] = field(default_factory=list)
    skipped: int = 0  # files in scanned folders without an image name

    @property
    def aliases(self) -> int:
        return sum(item.same_as is not None for item in self.items)


def _has_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _scan(folder: Path, recursive: bool, seen_dirs: set[tuple[int, int]], out: list[Path]) -> int:
    """Image names under folder (sorted by bytes) into out; returns how many other files were skipped."""
    skipped = 0
    try:
        entries = sorted(os.scandir(folder), key=lambda e: os.fsencode(e.name))
    except OSError as exc:
        raise ImageError(f"{display_path(folder)}: cannot list folder: {exc.strerror}", "unreadable") from None
    subdirs = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()  # follows symlinks; False for a dangling one
        except OSError:
            is_dir = False
        if is_dir:
            if recursive:
                subdirs.append(Path(entry.path))
            continue
        if _has_image_name(entry.name):
            out.append(Path(entry.path))
        else:
            skipped += 1
    for sub in subdirs:
        try:
            st = os.stat(sub)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key not in seen_dirs:
            seen_dirs.add(key)
            skipped += _scan(sub, recursive, seen_dirs, out)
    return skipped


def collect_inputs(inputs: Iterable[str | os.PathLike], recursive: bool = False) -> Inputs:
    """Files as given (any name: decoded by content), folders scanned for image names; see the module doc."""
    result = Inputs()
    given = [Path(p) for p in inputs]
    if not given:
        raise ValueError("no input images given")
    for item in given:
        if item.is_dir():
            st = os.stat(item)
            found: list[Path] = []
            result.skipped += _scan(item, recursive, {(st.st_dev, st.st_ino)}, found)
            if not found:
                what = ", ".join(IMAGE_EXTENSIONS)
                result.items.append(InputItem(item, ImageError(f"{display_path(item)}: folder holds no image files ({what})", "missing")))
                continue
            result.items.extend(InputItem(p) for p in found)
        else:
            result.items.append(InputItem(item))
    first_name: dict[tuple[int, int], str] = {}
    for k, item in enumerate(result.items):
        if item.problem is not None:
            continue
        problem = file_problem(item.path)
        if problem is not None and problem.kind == "missing":
            problem = ImageError(f"{item.name}: file or folder not found", "missing")
        if problem is not None:
            result.items[k] = InputItem(item.path, problem)
            continue
        st = os.stat(item.path)
        key = (st.st_dev, st.st_ino)
        if key in first_name:
            result.items[k] = InputItem(item.path, None, first_name[key])
        else:
            first_name[key] = item.name
    return result
