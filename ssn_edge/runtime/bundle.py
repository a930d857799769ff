"""The deployment bundle: one self-describing directory per export (IR files per precision + metadata.json).

metadata.json (its fields: ``ssn_edge.runtime.schema``) says everything the runtime needs to reproduce
training-time pre/post-processing and decisions, and the sha256 of every file: a tampered, truncated or
half-copied bundle is refused at load, not discovered as wrong scores on the line.

metadata.json is covered too: its ``metadata_sha256`` is the sha256 of the metadata's canonical form (the
parsed JSON without that field, keys sorted, no whitespace: re-indenting the file changes nothing), so a
threshold edited by hand (0.289 -> 0.689) is refused at load, after the field checks (a field that does not
even read gets its own message). Bundles written before the digest existed (schema v1, and v2 before this
field) load with a one-line warning that their metadata is not protected; re-exporting adds it.

A bundle is staged in ``.<name>.<pid>.<random>.partial`` beside its directory and renamed into place (a
replaced one goes through ``.<name>.<pid>.old``): a killed export leaves no half bundle, and
`sweep_partials` removes what it leaves once its process is gone. Folders are 0755 and files 0644 (narrowed
by the umask).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ssn_edge.runtime.atomic import describe_os_error, os_error_message, pid_alive, share_tree, sweep_stale
from ssn_edge.runtime.schema import SCHEMA_VERSION, BundleError, BundleMetadata, ModelEntry, read_metadata
from ssn_edge.runtime.tiling import TilingConfig

__all__ = ["METADATA", "METADATA_DIGEST", "Bundle", "BundleError", "load_bundle", "metadata_digest", "sha256_file",
           "sweep_partials", "write_bundle"]

log = logging.getLogger("ssn_edge")

METADATA = "metadata.json"
METADATA_DIGEST = "metadata_sha256"  # beside the schema's fields: the digest of all the others
_warned_unsealed: set[str] = set()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def metadata_digest(data: Mapping[str, Any]) -> str:
    """sha256 of the canonical form of parsed metadata (its METADATA_DIGEST field left out): sorted keys, compact
    separators, ASCII. Floats print as Python's shortest round-trip repr, so parse -> dump is stable."""
    body = {k: v for k, v in data.items() if k != METADATA_DIGEST}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Bundle:
    """An opened, checked bundle: its directory and its typed metadata (``ssn_edge.runtime.schema``)."""

    path: Path
    metadata: BundleMetadata
    schema_version: int = SCHEMA_VERSION  # as written on disk (a v1 bundle is read migrated)
    sealed: bool = True  # metadata.json carries its digest (False: written before ssn-edge had one)

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
    except OSError as exc:
        raise BundleError(os_error_message(exc, "read the bundle's metadata")) from None


def _check_digest(raw: dict[str, Any], digest: Any, meta_file: Path, version: int) -> bool:
    """Refuse metadata edited since export; warn (once per file) about metadata that has no digest."""
    if digest is None:
        if str(meta_file) not in _warned_unsealed:
            _warned_unsealed.add(str(meta_file))
            written = "schema v1 (migrated on load)" if version == 1 else "before ssn-edge sealed metadata"
            log.warning("%s: written by %s: its metadata has no checksum, so a hand edit (a threshold) cannot be "
                        "detected; re-export the bundle to add one", meta_file, written)
        return False
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise BundleError(f"{meta_file}: field '{METADATA_DIGEST}' is {digest!r}, expected a sha256 hex digest")
    if metadata_digest(raw) != digest:
        raise BundleError(f"{meta_file}: the metadata was edited after export (its {METADATA_DIGEST} does not match "
                          "its content, e.g. a threshold changed by hand); re-export the bundle, or restore the "
                          "metadata.json it was written with")
    return True


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle, checking every metadata field, the metadata's own digest and (by default) the sha256 of
    every file it lists."""
    path = Path(path)
    meta_file = path / METADATA
    if not path.is_dir():
        raise BundleError(f"{path}: bundle directory not found")
    if not meta_file.is_file():
        raise BundleError(f"{path}: no {METADATA} (not a bundle, or an export that did not finish)")
    raw = _read_json(meta_file)
    digest = raw.pop(METADATA_DIGEST, None) if isinstance(raw, dict) else None
    meta = read_metadata(raw, str(meta_file))
    sealed = _check_digest(raw, digest, meta_file, raw["schema_version"])
    if verify:
        for name, digest in meta.files.items():
            f = path / name
            if not f.is_file():
                raise BundleError(f"{f}: listed in the bundle but missing")
            try:
                actual = sha256_file(f)
            except OSError as exc:
                raise BundleError(os_error_message(exc, "read this bundle file")) from None
            if actual != digest:
                raise BundleError(f"{f}: checksum mismatch (file modified or truncated since export)")
    return Bundle(path, meta, raw["schema_version"], sealed)


def _partial_pattern(name: str | None = None) -> re.Pattern[str]:
    """Staging folders of write_bundle: '.<name>.<pid>.<mkdtemp's 8 characters>.partial', and the replaced
    bundle '.<name>.<pid>.old' (any name when name is None)."""
    n = re.escape(name) if name is not None else ".+"
    return re.compile(rf"\.(?P<name>{n})\.(?P<pid>\d+)\.(?:[a-z0-9_]{{8}}\.partial|old)")


def sweep_partials(out_dir: str | Path) -> list[Path]:
    """Remove the staging folders beside out_dir (any bundle name) that killed exports left, once their process
    is gone (those of ssn-edge versions that did not name the process: untouched for an hour). A bundle that a
    killed --overwrite had moved aside, with nothing in its place, is put back first."""
    out_dir = Path(out_dir)
    _restore_moved_aside(out_dir.parent)
    legacy = re.compile(rf"\.{re.escape(out_dir.name)}\.(?:[a-z0-9_]{{8}}\.partial|old)")
    return sweep_stale(out_dir.parent, _partial_pattern(), legacy)


def _restore_moved_aside(parent: Path) -> None:
    pattern = _partial_pattern()
    try:
        names = [n for n in os.listdir(parent) if n.endswith(".old")]
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or int(match["pid"]) == os.getpid() or pid_alive(int(match["pid"])):
            continue
        target = parent / match["name"]
        if not target.exists() and (parent / name / METADATA).is_file():
            try:
                os.replace(parent / name, target)
            except OSError:
                continue
            log.warning("%s: put back the bundle an interrupted --overwrite export had moved aside", target)


def write_bundle(
    out_dir: str | Path,
    metadata: BundleMetadata,
    files: Mapping[str, Path],
    overwrite: bool = False,
) -> Bundle:
    """Assemble a bundle atomically: files are copied into a staging directory beside out_dir, checksummed,
    metadata.json is written last (read back through the schema, and sealed with its digest), modes set to
    0755/0644, then the directory is renamed into place. A full disk or a folder that cannot be written is a
    one-line BundleError, and leaves nothing behind.

    files: bundle-relative name -> source file; metadata.files is replaced by their checksums.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BundleError(f"{out_dir}: already exists (choose another --out or remove it)")
    tmp: Path | None = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", suffix=".partial", dir=out_dir.parent))
        digests: dict[str, str] = {}
        for name, src in files.items():
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            digests[name] = sha256_file(dst)
        data = json.loads(json.dumps(dataclasses.replace(metadata, files=digests).to_dict()))
        read_metadata(data, str(tmp / METADATA))  # what is written must read back
        sealed = {"schema": data["schema"], "schema_version": data["schema_version"],
                  METADATA_DIGEST: metadata_digest(data), **data}
        with open(tmp / METADATA, "w") as fh:
            json.dump(sealed, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        share_tree(tmp)
        _move_into_place(tmp, out_dir)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        at = f" ({os.fsdecode(exc.filename)})" if exc.filename is not None else ""
        raise BundleError(f"{out_dir}: cannot write the bundle: {describe_os_error(exc)}{at}; nothing was written") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_bundle(out_dir)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)  # a kill between the two renames: sweep_partials puts the old bundle back
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
