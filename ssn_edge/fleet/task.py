"""One train-many job, as Ray tasks run it: train the recipe, export the bundle, return where it is; a tiled
ensemble's locations first, one task each (`train_locations`), then the job's task assembles and exports.

Runs in a Ray worker process (on any node of the cluster; the work folder must be one every node and the
driver see, e.g. a shared mount). Torch uses as many threads as the job's CPUs, so jobs placed side by side by
Ray do not oversubscribe the cores. The job's folder is named by its identity hash: an attempt interrupted
before trains again into it (an ensemble keeps its finished locations); a half-written bundle is removed.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ssn_edge.fleet.plan import PlanJob


@dataclass(frozen=True)
class JobResult:
    name: str
    digest: str
    bundle: str
    train_s: float
    export_s: float
    locations: tuple[str, ...] = ()  # an ensemble's locations, each trained by a task of its own


def job_folder(work: Path, job: PlanJob) -> Path:
    return work / job.name / job.digest[:12]


def _export_options(export: dict):
    from ssn_edge.export.calibration import CalibrationSpec
    from ssn_edge.export.exporter import ExportOptions

    opts = dict(export)
    if "thresholds" in opts:
        from ssn_edge.export.thresholds import ThresholdChoice

        opts["thresholds"] = ThresholdChoice(**opts["thresholds"])
    size, defects = opts.pop("calibration_size", None), opts.pop("calibration_defects", None)
    calibration = None
    if size is not None or defects is not None:
        calibration = CalibrationSpec()
        if size is not None:
            calibration = dataclasses.replace(calibration, size=int(size))
        if defects is not None:
            calibration = dataclasses.replace(calibration, defects=float(defects))
    return ExportOptions(calibration=calibration, **opts)


def ensemble_locations(job: PlanJob) -> list[str]:
    """The location folders of a tiled-ensemble job (each a task of its own); [] for any other job."""
    tiling = job.recipe.get("tiling") or {}
    if tiling.get("mode") != "ensemble":
        return []
    from ssn_edge.config import recipe_from_dict
    from ssn_edge.train.tiled import location_groups

    return list(location_groups(recipe_from_dict(job.recipe)))


def train_locations(job: PlanJob, work: str, names: list[str]) -> list[str]:
    """Train these locations of an ensemble job into its folder; train_and_export keeps them."""
    import torch

    from ssn_edge.config import recipe_from_dict
    from ssn_edge.train.job import train_job

    torch.set_num_threads(max(1, int(job.cpus)))
    train_job(recipe_from_dict(job.recipe), job_folder(Path(work), job) / "train", progress=False, evaluate=False,
              locations=names)
    return names


def train_and_export(job: PlanJob, work: str, *_locations_done: list[str]) -> JobResult:
    """The job: train (an ensemble's locations trained by earlier tasks are kept), then export. The trailing
    arguments are those tasks' results: passing them makes Ray start this task only after them."""
    import torch

    from ssn_edge.config import recipe_from_dict
    from ssn_edge.export.exporter import export_bundle
    from ssn_edge.train.job import train_job

    torch.set_num_threads(max(1, int(job.cpus)))
    folder = job_folder(Path(work), job)
    shutil.rmtree(folder / "bundle", ignore_errors=True)
    options = _export_options(job.export)  # refused before training, not after
    t0 = time.perf_counter()
    result = train_job(recipe_from_dict(job.recipe), folder / "train", progress=False, evaluate=False)
    t1 = time.perf_counter()
    bundle = export_bundle(result.checkpoint, folder / "bundle", options)
    done = tuple(name for names in _locations_done for name in names)
    return JobResult(job.name, job.digest, str(bundle.path), t1 - t0, time.perf_counter() - t1, done)
