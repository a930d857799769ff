"""Dataset discovery: turn an MVTec-style folder or a CSV manifest into a list of `Sample`s.

Nothing here decodes an image; files are only checked for existence. Decoding (and the errors that
come with corrupt files) happens in `ssn_edge.data.arrays`. Torch-free on purpose.
"""

from __future__ import annotations

import csv
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ssn_edge.runtime.inputs import IMAGE_EXTENSIONS  # one list of image names, the runtime's (decoded by content)

SPLITS = ("train", "val", "test")
MANIFEST_NAME = "manifest.csv"
REQUIRED_COLUMNS = ("image", "label", "split")
OPTIONAL_COLUMNS = ("mask", "defect")


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the path (and row) and the problem."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    label: 0 = good, 1 = defective. A defective sample with ``mask=None`` carries an image-level
    label only (no pixel truth).
    """

    image: Path
    mask: Path | None
    label: int
    split: str
    defect: str = ""

    @property
    def has_mask(self) -> bool:
        return self.mask is not None


# --------------------------------------------------------------------------------------------------
# MVTec AD layout
# --------------------------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _mvtec_eval_split(root: Path, folder_name: str, split: str) -> list[Sample]:
    folder = root / folder_name
    if not folder.is_dir():
        return []
    samples: list[Sample] = []
    for type_dir in _subdirs(folder):
        kind = type_dir.name
        for image in _image_files(type_dir):
            if kind == "good":
                samples.append(Sample(image=image, mask=None, label=0, split=split, defect="good"))
                continue
            mask = root / "ground_truth" / kind / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise DatasetError(f"{image}: defective {split} image has no mask (expected {mask})")
            samples.append(Sample(image=image, mask=mask, label=1, split=split, defect=kind))
    return samples


def load_mvtec(root: str | Path) -> list[Sample]:
    """Read an MVTec AD category folder.

    ``train/good/*`` -> train, label 0; ``test/<type>/*`` -> test, label 0 for ``good`` else 1 with the
    mask ``ground_truth/<type>/<stem>_mask.png`` (required); an optional ``validation/<type>/*``
    folder is read like ``test`` into split ``val``. Order is sorted and deterministic.
    """
    root = Path(root)
    train_dir = root / "train" / "good"
    if not train_dir.is_dir():
        raise DatasetError(f"{root}: not an MVTec AD category folder (no train/good folder)")
    samples = [Sample(image=p, mask=None, label=0, split="train", defect="good") for p in _image_files(train_dir)]
    test = _mvtec_eval_split(root, "test", "test")
    val = _mvtec_eval_split(root, "validation", "val")
    # test and validation share ground_truth/<type>/: two defective images with the same type and
    # stem would silently get the same mask.
    test_masks = {s.mask: s.image for s in test if s.mask is not None}
    for s in val:
        if s.mask is not None and s.mask in test_masks:
            raise DatasetError(
                f"{s.image}: validation image shares its mask {s.mask} with test image {test_masks[s.mask]}; "
                "give validation and test defect images distinct file names"
            )
    return samples + val + test


# --------------------------------------------------------------------------------------------------
# CSV manifest
# --------------------------------------------------------------------------------------------------


def load_manifest(csv_path: str | Path) -> list[Sample]:
    """Read a CSV manifest with columns ``image,label,split`` and optionally ``mask,defect``.

    Columns may come in any order; extra columns are ignored. Paths are relative to the CSV's folder
    (absolute paths are kept). An empty ``mask`` means no pixel truth. Image and mask files are
    checked for existence, not decoded.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: manifest not found")
    base = csv_path.parent
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{csv_path}: manifest is empty (no header row)")
            columns = [c.strip().lower() for c in header]
            for name in REQUIRED_COLUMNS:
                if name not in columns:
                    raise DatasetError(
                        f"{csv_path}: manifest has no '{name}' column "
                        f"(header: {','.join(header)}; required: {','.join(REQUIRED_COLUMNS)})"
                    )
            index = {name: columns.index(name) for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if name in columns}
            samples = []
            for row_number, row in enumerate(reader, start=1):
                if not any(cell.strip() for cell in row):
                    continue  # blank line
                samples.append(_parse_row(row, row_number, reader.line_num, index, csv_path, base))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{csv_path}: manifest is not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise DatasetError(f"{csv_path}: malformed CSV ({e})") from None
    if not samples:
        raise DatasetError(f"{csv_path}: manifest has a header but no rows")
    return samples


def _parse_row(
    row: Sequence[str], row_number: int, line: int, index: dict[str, int], csv_path: Path, base: Path
) -> Sample:
    where = f"{csv_path}, row {row_number} (line {line})"

    def cell(name: str) -> str:
        i = index.get(name)
        return row[i].strip() if i is not None and i < len(row) else ""

    image_rel = cell("image")
    if not image_rel:
        raise DatasetError(f"{where}: empty 'image'")
    label_text = cell("label")
    if label_text not in ("0", "1"):
        raise DatasetError(f"{where}: label {label_text!r} is not 0 (good) or 1 (defective)")
    split = cell("split").lower()
    if split not in SPLITS:
        raise DatasetError(f"{where}: split {cell('split')!r} is not one of {', '.join(SPLITS)}")
    image = base / image_rel
    if not image.is_file():
        raise DatasetError(f"{where}: image file not found: {image}")
    mask_rel = cell("mask")
    mask = None
    if mask_rel:
        mask = base / mask_rel
        if not mask.is_file():
            raise DatasetError(f"{where}: mask file not found: {mask}")
    return Sample(image=image, mask=mask, label=int(label_text), split=split, defect=cell("defect"))


# --------------------------------------------------------------------------------------------------
# Dispatch, selection, summary
# --------------------------------------------------------------------------------------------------


def load_dataset(path: str | Path) -> list[Sample]:
    """A ``.csv`` file -> manifest; a folder holding ``manifest.csv`` -> that manifest; a folder
    holding ``train/good`` -> MVTec AD category."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: dataset not found")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return load_manifest(path)
    elif (path / MANIFEST_NAME).is_file():
        return load_manifest(path / MANIFEST_NAME)
    elif (path / "train" / "good").is_dir():
        return load_mvtec(path)
    raise DatasetError(
        f"{path}: unrecognised dataset layout; expected a .csv manifest (columns image,label,split[,mask,defect]), "
        f"a folder containing {MANIFEST_NAME}, or an MVTec AD category folder (train/good, test/<type>, ground_truth/<type>)"
    )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def select(samples: Iterable[Sample], split: str) -> list[Sample]:
    """The samples of one split, in their original order."""
    _check_split(split)
    return [s for s in samples if s.split == split]


def require_nonempty(samples: Iterable[Sample], split: str, source: str | Path) -> list[Sample]:
    """The samples of ``split``; DatasetError naming ``source`` when there are none."""
    chosen = select(samples, split)
    if not chosen:
        raise DatasetError(f"split '{split}' is empty in {source}")
    return chosen


@dataclass(frozen=True)
class ValidationSplit:
    """The training split with some normal images held out: ``train`` is what training uses, ``held_out`` the
    normal training images it never sees (thresholds are set on them: `ssn-edge export`)."""

    train: list[Sample]
    held_out: list[Sample]


def held_out_count(normal: int, fraction: float, minimum: int) -> int:
    """How many of ``normal`` images are held out: fraction of them, at least ``minimum``, at most half (training
    keeps the larger part); 0 when fraction is 0."""
    if fraction <= 0 or normal < 2:
        return 0
    return min(max(minimum, int(round(fraction * normal))), normal // 2)


def split_validation(samples: Iterable[Sample], fraction: float, minimum: int, seed: int) -> ValidationSplit:
    """The one split of the normal training images into trained-on and held out, used by `train` (which leaves
    ``held_out`` out) and `export` (which sets thresholds on it): a seeded random choice over the normal training
    samples in dataset order, so the same data and (fraction, minimum, seed) always give the same images."""
    train = select(samples, "train")
    normal = [i for i, s in enumerate(train) if s.label == 0]
    count = held_out_count(len(normal), fraction, minimum)
    chosen = set(random.Random(seed).sample(normal, count)) if count else set()
    return ValidationSplit([s for i, s in enumerate(train) if i not in chosen],
                           [s for i, s in enumerate(train) if i in chosen])


def summary(samples: Iterable[Sample]) -> str:
    """One line per split present: good, defective with mask, defective without mask."""
    counts: dict[str, Counter] = {}
    for s in samples:
        kind = "good" if s.label == 0 else ("masked" if s.has_mask else "unmasked")
        counts.setdefault(s.split, Counter())[kind] += 1
    if not counts:
        return "no samples"
    order = [sp for sp in SPLITS if sp in counts] + sorted(sp for sp in counts if sp not in SPLITS)
    lines = []
    for sp in order:
        c = counts[sp]
        total = sum(c.values())
        lines.append(
            f"{sp}: {total} images: {c['good']} good, {c['masked']} defective with mask, "
            f"{c['unmasked']} defective without mask"
        )
    return "\n".join(lines)
