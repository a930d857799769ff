"""Datasets: discovery (MVTec AD folders, CSV manifests) and decoding into arrays. Torch-free."""

from .arrays import ArraySet, concat_arrays, has_pixel_truth, load_arrays
from .samples import (
    SPLITS,
    DatasetError,
    Sample,
    ValidationSplit,
    load_dataset,
    load_manifest,
    load_mvtec,
    require_nonempty,
    select,
    split_validation,
    summary,
)

__all__ = [
    "SPLITS",
    "ArraySet",
    "concat_arrays",
    "DatasetError",
    "has_pixel_truth",
    "Sample",
    "load_arrays",
    "load_dataset",
    "load_manifest",
    "load_mvtec",
    "require_nonempty",
    "select",
    "split_validation",
    "summary",
    "ValidationSplit",
]
