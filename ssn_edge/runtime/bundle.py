"""The deployment bundle: one self-describing directory per export (IR files per precision + metadata.json).

metadata.json says everything the runtime needs to reproduce training-time pre/post-processing and
decisions, and the sha256 of every file: a tampered, truncated or half-copied bundle is refused at load,
not discovered as wrong scores on the line.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

SCHEMA = "ssn-edge-bundle"
SCHEMA_VERSION = 1
METADATA = "metadata.json"
PRECISIONS = ("fp32", "fp16", "int8", "int8_acc")


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the bundle (or file) and the problem."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: Path
    metadata: dict[str, Any]

    @property
    def precisions(self) -> list[str]:
        return [p for p in PRECISIONS if p in self.metadata["models"]]

    def model_path(self, precision: str) -> Path:
        models = self.metadata["models"]
        if precision not in models:
            raise BundleError(f"{self.path}: no {precision} model in this bundle (has: {', '.join(self.precisions)})")
        return self.path / models[precision]["xml"]

    @property
    def input_size(self) -> tuple[int, int]:
        inp = self.metadata["input"]
        return int(inp["height"]), int(inp["width"])

    @property
    def image_threshold(self) -> float:
        return float(self.metadata["thresholds"]["image"])

    @property
    def pixel_threshold(self) -> float:
        return float(self.metadata["thresholds"]["pixel"])

    @property
    def tiling(self) -> dict[str, Any] | None:
        return self.metadata.get("tiling")

    @property
    def map_gate(self) -> str:
        """model.map_gate of the exported graph ("none" for bundles from before the option)."""
        return self.metadata.get("outputs", {}).get("map", {}).get("gate", "none")


def _check_metadata(meta: Any, where: Path) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise BundleError(f"{where}: not an ssn-edge bundle (metadata 'schema' is not '{SCHEMA}')")
    version = meta.get("schema_version")
    if not isinstance(version, int):
        raise BundleError(f"{where}: metadata has no integer 'schema_version'")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{where}: bundle schema version {version} was written by a newer ssn-edge; "
            f"this version reads schema {SCHEMA_VERSION} or older: upgrade ssn-edge on this machine"
        )
    for key in ("input", "postprocess", "thresholds", "models", "files"):
        if key not in meta:
            raise BundleError(f"{where}: metadata lacks '{key}'")
    if not meta["models"]:
        raise BundleError(f"{where}: bundle holds no model")
    return meta


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle, checking schema and (by default) the sha256 of every file it lists."""
    path = Path(path)
    meta_file = path / METADATA
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory not found")
    if not meta_file.is_file():
        raise BundleError(f"{path}: no {METADATA} (not a bundle, or an export that did not finish)")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{meta_file}: unreadable metadata ({exc})") from None
    meta = _check_metadata(meta, meta_file)
    for precision, entry in meta["models"].items():
        for key in ("xml", "bin"):
            if entry.get(key) not in meta["files"]:
                raise BundleError(f"{meta_file}: {precision} model file {entry.get(key)!r} has no checksum")
    if verify:
        for name, digest in meta["files"].items():
            f = path / name
            if not f.is_file():
                raise BundleError(f"{f}: listed in the bundle but missing")
            if sha256_file(f) != digest:
                raise BundleError(f"{f}: checksum mismatch (file modified or truncated since export)")
    return Bundle(path, meta)


def write_bundle(
    out_dir: str | Path,
    metadata: Mapping[str, Any],
    files: Mapping[str, Path],
    overwrite: bool = False,
) -> Bundle:
    """Assemble a bundle atomically: files are copied into a temporary directory beside out_dir, checksummed,
    metadata.json is written last, then the directory is renamed into place.

    files: bundle-relative name -> source file. metadata must not hold 'files' (computed here).
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
        meta = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **{k: v for k, v in metadata.items() if k not in ("schema", "schema_version", "files")},
            "files": digests,
        }
        _check_metadata(meta, tmp / METADATA)
        with open(tmp / METADATA, "w") as fh:
            json.dump(meta, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_bundle(out_dir)
