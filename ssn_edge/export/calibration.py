"""Calibration sets for INT8 export: which images NNCF sees when it measures SSN's activation ranges.

A calibration set is defined by a :class:`CalibrationSpec` (usually a YAML file under ``calibration/``):

* ``source: recipe``   -- the normal (label 0) images of the training split of a dataset: ``path`` if given,
  else the recipe's ``data.path`` (the data the model was trained on: the best match for what the line sees);
* ``source: folder``   -- every image under ``path``, recursively (e.g. a folder of recent good parts);
* ``source: manifest`` -- the ``train`` rows with label 0 of the CSV manifest at ``path``.

Selection is deterministic: candidates are sorted, shuffled with a NumPy generator seeded by ``seed`` and
taken without replacement until ``size`` readable images are found (unreadable files are skipped with a
warning). The same spec on the same files gives the same list on any machine, and the list ends up in the
bundle's ``calibration.json`` with each file's sha256, so an INT8 model can be traced back to its pixels.

Why 128 by default: NNCF's post-training quantization estimates a min/max (weights) and a histogram-based
range (activations) per quantizer. On SSN's activations (ResNet layer2/3 features, adaptor, 1x1 heads) those
estimates stop moving after roughly 100 normal images; past that, export time grows linearly with the count
and buys nothing measurable. 128 leaves margin; fewer than 32 is allowed but warned about (ranges from a
handful of images clip the tails of unseen parts). The hard bounds are 1..1000.

Torch-free on purpose.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ssn_edge.config import read_yaml
from ssn_edge.data import load_dataset, load_manifest, select
from ssn_edge.runtime.bundle import sha256_file
from ssn_edge.runtime.inputs import IMAGE_EXTENSIONS
from ssn_edge.runtime.preprocess import ImageError, read_image

if TYPE_CHECKING:  # pragma: no cover
    from ssn_edge.config import Recipe

log = logging.getLogger("ssn_edge")

SOURCES = ("recipe", "folder", "manifest")
DEFAULT_SIZE = 128  # see the module docstring: NNCF's statistics of SSN's activations settle at ~100 images
MIN_SIZE = 1
MAX_SIZE = 1000
WARN_BELOW = 32
CALIBRATION_FILE = "calibration.json"


class CalibrationError(ValueError):
    """A calibration definition or set that cannot be used; the message names the file or folder."""


@dataclass
class CalibrationSpec:
    source: str = "recipe"
    path: str | None = None
    size: int = DEFAULT_SIZE
    seed: int = 0
    # fraction of the calibration images that get a synthetic defect painted in before NNCF sees them, so the
    # activation ranges cover what defects do (ssn_edge.export.quantize); 0 calibrates on the images as they are
    defects: float = 1.0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise CalibrationError(f"calibration source {self.source!r} is not one of {', '.join(SOURCES)}")
        if self.source in ("folder", "manifest") and not self.path:
            raise CalibrationError(f"calibration source '{self.source}' needs a path")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not MIN_SIZE <= self.size <= MAX_SIZE:
            raise CalibrationError(f"calibration size must be an integer in {MIN_SIZE}..{MAX_SIZE}, got {self.size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise CalibrationError(f"calibration seed must be a non-negative integer, got {self.seed!r}")
        if isinstance(self.defects, bool) or not isinstance(self.defects, (int, float)) or not 0 <= self.defects <= 1:
            raise CalibrationError(f"calibration defects must be a fraction in [0, 1], got {self.defects!r}")
        self.defects = float(self.defects)
        if self.path is not None:
            self.path = str(self.path)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_calibration_spec(yaml_path: str | Path) -> CalibrationSpec:
    """Read a calibration definition (keys: source, path, size, seed). A relative ``path`` is taken relative to
    the current directory, as the recipes' ``data.path`` is."""
    yaml_path = Path(yaml_path)
    values = read_yaml(yaml_path, "calibration definition", CalibrationError)
    if not isinstance(values, dict):
        raise CalibrationError(f"{yaml_path}: a calibration definition must be a YAML mapping")
    known = {f.name for f in fields(CalibrationSpec)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CalibrationError(
            f"{yaml_path}: unknown calibration key '{unknown[0]}' (known: {', '.join(sorted(known))})"
        )
    try:
        return CalibrationSpec(**values)
    except CalibrationError as exc:
        raise CalibrationError(f"{yaml_path}: {exc}") from None


def _dataset_path(spec: CalibrationSpec, recipe: Recipe | None) -> str:
    path = spec.path or (recipe.data.path if recipe is not None else "")
    if not path:
        raise CalibrationError(
            "calibration source 'recipe' has no dataset: the recipe has no data.path; "
            "give a path in the calibration definition or use a folder/manifest source"
        )
    return str(path)


def calibration_root(spec: CalibrationSpec, recipe: Recipe | None = None) -> Path:
    """The folder that calibration image paths are recorded relative to."""
    if spec.source == "folder":
        return Path(spec.path)
    path = Path(spec.path) if spec.source == "manifest" else Path(_dataset_path(spec, recipe))
    return path.parent if path.is_file() else path


def _candidates(spec: CalibrationSpec, recipe: Recipe | None) -> tuple[list[Path], str]:
    """Sorted candidate images and a description of where they came from (for messages)."""
    if spec.source == "folder":
        folder = Path(spec.path)
        if not folder.is_dir():
            raise CalibrationError(f"{folder}: calibration folder not found")
        files = [
            p
            for p in folder.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        ]
        return sorted(files), f"calibration folder {folder}"
    if spec.source == "manifest":
        samples = load_manifest(spec.path)
        where = f"calibration manifest {spec.path}"
    else:
        path = _dataset_path(spec, recipe)
        samples = load_dataset(path)
        where = f"training split of {path}"
    return sorted({s.image for s in select(samples, "train") if s.label == 0}), where


def select_calibration(spec: CalibrationSpec, recipe: Recipe | None = None) -> list[Path]:
    """The calibration images for ``spec``, sorted; deterministic for a given spec and set of files."""
    candidates, where = _candidates(spec, recipe)
    if not candidates:
        if spec.source == "folder":
            raise CalibrationError(f"{spec.path}: calibration folder has no readable image ({', '.join(IMAGE_EXTENSIONS)})")
        raise CalibrationError(f"{where}: no normal (label 0) training images to calibrate with")
    order = np.random.default_rng(spec.seed).permutation(len(candidates))
    chosen: list[Path] = []
    unreadable: list[str] = []
    for i in order:
        if len(chosen) == spec.size:
            break
        path = candidates[int(i)]
        try:
            read_image(path)
        except ImageError as exc:
            unreadable.append(str(exc))
            continue
        chosen.append(path)
    if unreadable:
        log.warning("calibration: skipped %d unreadable images; first: %s", len(unreadable), unreadable[0])
    if not chosen:
        if spec.source == "folder":
            raise CalibrationError(f"{spec.path}: calibration folder has no readable image ({unreadable[0]})")
        raise CalibrationError(f"{where}: no readable calibration image ({unreadable[0]})")
    if len(chosen) < spec.size:
        log.warning(
            "calibration: %d images asked for, only %d readable ones in the %s; using %d",
            spec.size,
            len(chosen),
            where,
            len(chosen),
        )
    if len(chosen) < WARN_BELOW:
        log.warning(
            "calibration: only %d images; INT8 activation ranges from fewer than %d images may clip unseen parts "
            "(about 100 is enough for SSN)",
            len(chosen),
            WARN_BELOW,
        )
    return sorted(chosen)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def calibration_record(spec: CalibrationSpec, images: list[Path], recipe: Recipe | None = None) -> dict[str, Any]:
    """What ``calibration.json`` holds: the spec, the root, the count, each image's relative path and sha256."""
    root = calibration_root(spec, recipe)
    return {
        "spec": spec.to_dict(),
        "root": str(root),
        "count": len(images),
        "images": [{"path": _relative(p, root), "sha256": sha256_file(p)} for p in images],
    }
