"""A model repository in OpenVINO Model Server's layout, written from bundles and served from as it is.

    REPO/config.json                  OVMS config: model_config_list, one entry per model, every version served
    REPO/<name>/<version>/model.xml   one precision's IR (OVMS: any .xml + .bin in a numbered folder)
    REPO/<name>/<version>/model.bin
    REPO/<name>/<version>/metadata.json  the bundle's metadata (thresholds, input spec, checksums), so the folder
                                         is itself a one-precision bundle that `load_bundle` opens

Versions are positive integers; a new one is the highest + 1 and is written atomically (a temporary folder
renamed into place: OVMS, watching the repository, only ever sees whole versions; a name that is not a number
is not a version to it). config.json's base_path is relative to config.json (OVMS's documented rule), so the
folder can be mounted anywhere. Adding takes a lock on the repository: two writers never pick one version.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ssn_edge.runtime.atomic import atomic_write
from ssn_edge.runtime.bundle import METADATA, Bundle, BundleError, load_bundle, write_bundle

CONFIG = "config.json"
LOCK = ".ssn-edge-repo.lock"
MODEL_XML, MODEL_BIN = "model.xml", "model.bin"
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
# What OVMS is told for every model: run every version, at the precision the bundle was checked at (OpenVINO
# would run an FP32 IR in bf16 on a BF16-capable CPU otherwise; int8/fp16 IRs run their other layers in f32).
PLUGIN_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


@dataclass(frozen=True)
class RepoVersion:
    name: str
    version: int
    path: Path


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '.', '-' (not starting with '.' or '-'), at most 128")
    return name


def versions(repo: Path, name: str) -> list[RepoVersion]:
    """The finished versions of one model, oldest first (folders named by a positive integer, with metadata)."""
    folder = Path(repo) / name
    if not folder.is_dir():
        return []
    found = [RepoVersion(name, int(p.name), p) for p in folder.iterdir()
             if p.is_dir() and p.name.isdigit() and int(p.name) > 0 and (p / METADATA).is_file()]
    return sorted(found, key=lambda v: v.version)


def models(repo: Path) -> dict[str, list[RepoVersion]]:
    """Every model in the repository with at least one version, by name."""
    repo = Path(repo)
    if not repo.is_dir():
        raise BundleError(f"{repo}: model repository not found")
    out = {}
    for p in sorted(repo.iterdir()):
        if p.is_dir() and NAME.match(p.name):
            found = versions(repo, p.name)
            if found:
                out[p.name] = found
    return out


def ovms_config(repo: Path) -> dict:
    """The OVMS config.json for the repository as it is on disk."""
    return {"model_config_list": [
        {"config": {"name": name, "base_path": name, "model_version_policy": {"all": {}}, "plugin_config": dict(PLUGIN_CONFIG)}}
        for name in models(repo)
    ]}


@contextmanager
def _locked(repo: Path) -> Iterator[None]:
    repo.mkdir(parents=True, exist_ok=True)
    with open(repo / LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def default_precision(bundle: Bundle) -> str:
    """int8 when the bundle has it (what a line runs), else fp32."""
    return "int8" if "int8" in bundle.metadata.models else "fp32"


def _version_metadata(bundle: Bundle, precision: str):
    entry = bundle.model(precision)
    meta = bundle.metadata
    ir_files = {m.xml for m in meta.models.values()} | {m.bin for m in meta.models.values()}
    files = {name: bundle.path / name for name in meta.files if name not in ir_files and name != METADATA}
    files[MODEL_XML], files[MODEL_BIN] = bundle.path / entry.xml, bundle.path / entry.bin
    models = {precision: dataclasses.replace(entry, xml=MODEL_XML, bin=MODEL_BIN)}
    return dataclasses.replace(meta, models=models), files


def add_bundle(repo: str | Path, bundle: Bundle | str | Path, name: str, precision: str | None = None) -> RepoVersion:
    """Copy one precision of a bundle into repo/name/<next version>/ and rewrite config.json."""
    repo = Path(repo)
    check_name(name)
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    precision = precision or default_precision(bundle)
    bundle.model(precision)  # a one-line error naming what the bundle has
    metadata, files = _version_metadata(bundle, precision)
    with _locked(repo):
        existing = versions(repo, name)
        number = existing[-1].version + 1 if existing else 1
        target = repo / name / str(number)
        if target.exists():  # a folder without metadata (an interrupted copy by another tool): never overwritten
            raise BundleError(f"{target}: exists but is not a finished version; remove it")
        write_bundle(target, metadata, files)
        write_config(repo)
    return RepoVersion(name, number, target)


def write_config(repo: Path) -> Path:
    return atomic_write(Path(repo) / CONFIG, json.dumps(ovms_config(repo), indent=2) + "\n")
