"""The deployment bundle: one self-describing directory per export (IR files per precision + metadata.json).

metadata.json (its fields: ``ssn_edge.runtime.schema``) says everything the runtime needs to reproduce
training-time pre/post-processing and decisions, and the sha256 of every file: a tampered, truncated or
half-copied bundle is refused at load, not discovered as wrong scores on the line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ssn_edge.runtime.schema import SCHEMA_VERSION, BundleError, BundleMetadata, ModelEntry, read_metadata
from ssn_edge.runtime.tiling import TilingConfig

__all__ = ["METADATA", "Bundle", "BundleError", "load_bundle", "sha256_file", "write_bundle"]

METADATA = "metadata.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """An opened, checked bundle: its directory and its typed metadata (``ssn_edge.runtime.schema``)."""

    path: Path
    metadata: BundleMetadata
    schema_version: int = SCHEMA_VERSION  # as written on disk (a v1 bundle is read migrated)

    @property
    def precisions(self) -> list[str]:
        return self.metadata.precisions

    def model(self, precision: str) -> ModelEntry:
        entry = self.metadata.models.get(precision)
        if entry is None:
            raise BundleError(f"{self.path}: no {precision} model in this bundle (has: {', '.join(self.precisions)})")
        return entry

    def model_path(self, precision: str) -> Path:
        return self.path / self.model(precision).xml

    def weights_path(self, precision: str) -> Path:
        return self.path / self.model(precision).bin

    @property
    def input_size(self) -> tuple[int, int]:
        return self.metadata.input.size

    @property
    def image_threshold(self) -> float:
        return self.metadata.thresholds.image

    @property
    def pixel_threshold(self) -> float:
        return self.metadata.thresholds.pixel

    @property
    def tiling(self) -> TilingConfig | None:
        return self.metadata.tiling.config if self.metadata.tiling is not None else None

    @property
    def map_gate(self) -> str:
        """model.map_gate of the exported graph."""
        return self.metadata.outputs.map.gate


def _read_json(meta_file: Path) -> Any:
    try:
        return json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{meta_file}: unreadable metadata ({exc})") from None


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle, checking every metadata field and (by default) the sha256 of every file it lists."""
    path = Path(path)
    meta_file = path / METADATA
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory not found")
    if not meta_file.is_file():
        raise BundleError(f"{path}: no {METADATA} (not a bundle, or an export that did not finish)")
    raw = _read_json(meta_file)
    meta = read_metadata(raw, str(meta_file))
    if verify:
        for name, digest in meta.files.items():
            f = path / name
            if not f.is_file():
                raise BundleError(f"{f}: listed in the bundle but missing")
            if sha256_file(f) != digest:
                raise BundleError(f"{f}: checksum mismatch (file modified or truncated since export)")
    return Bundle(path, meta, raw["schema_version"])


def write_bundle(
    out_dir: str | Path,
    metadata: BundleMetadata,
    files: Mapping[str, Path],
    overwrite: bool = False,
) -> Bundle:
    """Assemble a bundle atomically: files are copied into a temporary directory beside out_dir, checksummed,
    metadata.json is written last (and read back through the schema), then the directory is renamed into place.

    files: bundle-relative name -> source file; metadata.files is replaced by their checksums.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"{out_dir}: already exists (choose another --out or remove it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        digests: dict[str, str] = {}
        for name, src in files.items():
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            digests[name] = sha256_file(dst)
        data = dataclasses.replace(metadata, files=digests).to_dict()
        read_metadata(json.loads(json.dumps(data)), str(tmp / METADATA))  # what is written must read back
        with open(tmp / METADATA, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_bundle(out_dir)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
