"""The plan of a `train-many` run: a YAML file naming the model repository, a work folder and the jobs.

    repo: models             # the model repository the bundles go to (relative paths: to the plan's folder)
    work: runs/fleet         # each job's training and export folder, and its done-marker
    defaults:                # merged under every job (a job's own keys win; `set` and `export` merge key by key)
      cpus: 1
      set: {train.epochs: 20}
    jobs:
      - name: bottle           # the model's name in the repository
        recipe: recipes/mvtec_bottle.yaml   # a recipe file, or the recipe itself as a mapping
        data: /data/bottle     # optional: data.path
        set: {train.seed: 1}   # optional: recipe overrides, as `train --set`
        export: {int8: true, calibration_size: 64, thresholds: {source: normal}}   # optional: as `export`'s flags
        precision: int8        # optional: the precision the repository gets (default: int8 if exported, else fp32)
        cpus: 2                # Ray CPUs for this job (torch threads too)

Everything is checked when the plan is read, before any Ray task starts: a bad recipe key fails the run at
once, naming the plan, the job and the key. A job's identity (`digest`) is the hash of its resolved recipe, its
export options and its precision: a finished job whose identity is unchanged is kept on the next run; a
changed one trains again (a new version). The data's contents are not hashed: new images under the same path
need `--force NAME` or a changed entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssn_edge.config import RecipeError, apply_overrides, load_recipe, read_yaml, recipe_from_dict
from ssn_edge.serve.repository import check_name

# ExportOptions fields, plus calibration_size/defects (its CalibrationSpec) and thresholds (a mapping of its
# ThresholdChoice: source, max_false_alarm, max_false_alarm_pixel, review_false_alarm)
EXPORT_KEYS = ("fp16", "int8", "int8_acc", "max_drop", "acc_metric", "map_gate", "threshold_data", "weights",
               "dynamic_batch", "calibration_size", "calibration_defects", "thresholds")
JOB_KEYS = ("name", "recipe", "data", "set", "export", "precision", "cpus")
PRECISIONS = ("fp32", "fp16", "int8", "int8_acc")


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class PlanJob:
    name: str
    recipe: dict[str, Any]  # resolved: the recipe file (or mapping) with `data` and `set` applied
    export: dict[str, Any] = field(default_factory=dict)
    precision: str | None = None
    cpus: float = 1.0

    @property
    def digest(self) -> str:
        ident = {"recipe": self.recipe, "export": self.export, "precision": self.precision}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Plan:
    path: Path
    repo: Path
    work: Path
    jobs: tuple[PlanJob, ...]


def _merged(defaults: dict, entry: dict) -> dict:
    out = {**defaults, **entry}
    for key in ("set", "export"):
        out[key] = {**(defaults.get(key) or {}), **(entry.get(key) or {})}
    return out


def _recipe(entry: dict, base: Path, where: str) -> dict[str, Any]:
    raw = entry.get("recipe")
    overrides = dict(entry.get("set") or {})
    if entry.get("data") is not None:
        data = Path(str(entry["data"]))
        overrides["data.path"] = str(data if data.is_absolute() else base / data)
    if isinstance(raw, dict):
        recipe = apply_overrides(recipe_from_dict(raw), overrides)
    elif isinstance(raw, str):
        path = Path(raw) if Path(raw).is_absolute() else base / raw
        recipe = load_recipe(path, overrides)
    else:
        raise PlanError(f"{where}: recipe must be a recipe file or a mapping")
    if not recipe.data.path:
        raise PlanError(f"{where}: no data (set data or the recipe's data.path)")
    return recipe.to_dict()


def _job(entry: Any, defaults: dict, base: Path, where: str) -> PlanJob:
    if not isinstance(entry, dict):
        raise PlanError(f"{where}: a job must be a mapping with name and recipe")
    unknown = sorted(set(entry) - set(JOB_KEYS))
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(JOB_KEYS)})")
    merged = _merged(defaults, entry)
    try:
        name = check_name(str(merged.get("name") or ""))
    except ValueError as exc:
        raise PlanError(f"{where}: {exc}") from None
    where = f"{where} ({name})"
    export = dict(merged["export"])
    bad = sorted(set(export) - set(EXPORT_KEYS))
    if bad:
        raise PlanError(f"{where}: unknown export option(s) {', '.join(bad)} (known: {', '.join(EXPORT_KEYS)})")
    precision = merged.get("precision")
    if precision is not None and precision not in PRECISIONS:
        raise PlanError(f"{where}: precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    cpus = merged.get("cpus", 1)
    if not isinstance(cpus, (int, float)) or isinstance(cpus, bool) or cpus <= 0:
        raise PlanError(f"{where}: cpus must be a number > 0, got {cpus!r}")
    try:
        recipe = _recipe(merged, base, where)
    except RecipeError as exc:
        raise PlanError(f"{where}: {exc}") from None
    return PlanJob(name, recipe, export, precision, float(cpus))


def load_plan(path: str | Path, repo: str | Path | None = None) -> Plan:
    """Read and check a plan file; repo overrides the plan's repo."""
    path = Path(path)
    doc = read_yaml(path, "plan file", PlanError)
    if not isinstance(doc, dict) or not isinstance(doc.get("jobs"), list) or not doc["jobs"]:
        raise PlanError(f"{path}: a plan needs a non-empty 'jobs' list")
    unknown = sorted(set(doc) - {"repo", "work", "defaults", "jobs"})
    if unknown:
        raise PlanError(f"{path}: unknown key(s) {', '.join(unknown)} (known: repo, work, defaults, jobs)")
    base = path.resolve().parent
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise PlanError(f"{path}: defaults must be a mapping")
    jobs = tuple(_job(e, defaults, base, f"{path}: jobs[{i}]") for i, e in enumerate(doc["jobs"]))
    names = [j.name for j in jobs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PlanError(f"{path}: job name(s) given twice: {', '.join(twice)}")
    repo_dir = Path(repo) if repo is not None else base / str(doc.get("repo") or "models")
    work = base / str(doc.get("work") or "runs/fleet")
    return Plan(path, repo_dir, work, jobs)
