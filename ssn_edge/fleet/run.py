"""The train-many driver: Ray runs the jobs, this process keeps the books.

Ray places each job as a task asking for its CPUs (Ray's scheduler, not ours): a local Ray by default, started
for the run and stopped after it (nothing to install or start), or the cluster at `address`. As each task
finishes, the driver adds its bundle to the model repository (the only writer, so versions are numbered in one
place) and writes the job's done-marker, WORK/<name>/done.json, with the job's identity hash and repository
version. A job whose marker matches its identity and whose version is still in the repository is kept without
running: an interrupted or extended plan reruns only what is missing. A failed job is reported with its error
and the others go on.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from ssn_edge.fleet.plan import Plan, PlanJob
from ssn_edge.fleet.task import JobResult, ensemble_locations, train_and_export, train_locations
from ssn_edge.runtime.atomic import atomic_write
from ssn_edge.runtime.bundle import load_bundle
from ssn_edge.serve import repository

log = logging.getLogger("ssn_edge.fleet")
DONE = "done.json"


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str  # trained | kept | failed
    version: int | None = None
    cpus: float = 1.0
    train_s: float | None = None
    export_s: float | None = None
    image_auroc: float | None = None
    error: str | None = None


def _marker(plan: Plan, job: PlanJob) -> Path:
    return plan.work / job.name / DONE


def finished(plan: Plan, job: PlanJob) -> Outcome | None:
    """The kept outcome of a job finished earlier with this identity, or None when it must run."""
    try:
        done = json.loads(_marker(plan, job).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    version = done.get("version")
    if done.get("digest") != job.digest or not isinstance(version, int):
        return None
    if not (plan.repo / job.name / str(version) / "metadata.json").is_file():
        return None
    return Outcome(job.name, "kept", version, job.cpus, done.get("train_s"), done.get("export_s"), done.get("image_auroc"))


def _auroc(bundle_path: Path) -> float | None:
    meta = load_bundle(bundle_path, verify=False).metadata
    entry = next(iter(meta.models.values()))
    return entry.metrics.get("image_auroc")


def _publish(plan: Plan, job: PlanJob, result: JobResult) -> Outcome:
    added = repository.add_bundle(plan.repo, result.bundle, job.name, job.precision)
    outcome = Outcome(job.name, "trained", added.version, job.cpus, round(result.train_s, 2), round(result.export_s, 2),
                      _auroc(added.path))
    record = {"digest": job.digest, **{k: v for k, v in asdict(outcome).items() if k not in ("name", "status", "error")},
              "bundle": result.bundle, "locations": list(result.locations), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(_marker(plan, job), json.dumps(record, indent=2) + "\n")
    return outcome


def _failure(exc: BaseException) -> str:
    """The job's own error, without Ray's wrapping of it."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:300]


def _start_ray(address: str | None, num_cpus: int | None) -> bool:
    """Start (or join) Ray unless this process already has it; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def train_many(plan: Plan, address: str | None = None, num_cpus: int | None = None, force: Iterable[str] = (),
               on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run the plan's jobs that are not finished; one Outcome per job, in plan order."""
    forced = set(force)
    unknown = forced - {j.name for j in plan.jobs}
    if unknown:
        raise ValueError(f"--force {', '.join(sorted(unknown))}: no such job in {plan.path}")
    outcomes: dict[str, Outcome] = {}
    todo = []
    for job in plan.jobs:
        kept = None if job.name in forced else finished(plan, job)
        if kept is not None:
            outcomes[job.name] = kept
            if on_outcome:
                on_outcome(kept)
        else:
            todo.append(job)
    if todo:
        _run_jobs(plan, todo, address, num_cpus, outcomes, on_outcome)
    return [outcomes[j.name] for j in plan.jobs]


def _run_jobs(plan: Plan, todo: list[PlanJob], address: str | None, num_cpus: int | None,
              outcomes: dict[str, Outcome], on_outcome: Callable[[Outcome], None] | None) -> None:
    import ray

    started = _start_ray(address, num_cpus)
    try:
        pending = {_submit(job, str(plan.work)): job for job in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                outcome = _publish(plan, job, ray.get(ready[0]))
            except Exception as exc:  # one job's failure (its task, or adding its bundle) is reported, not fatal
                log.error("job %s failed: %s", job.name, _failure(exc))
                outcome = Outcome(job.name, "failed", cpus=job.cpus, error=_failure(exc))
            outcomes[job.name] = outcome
            if on_outcome:
                on_outcome(outcome)
    finally:
        if started:
            ray.shutdown()


def _submit(job: PlanJob, work: str):
    """The job's task; for a tiled ensemble, after one task per location (Ray runs them side by side and starts
    the job's task once their results, its arguments, exist)."""
    import ray

    task = ray.remote(train_and_export)
    locations = ray.remote(train_locations)
    done = [locations.options(num_cpus=job.cpus, name=f"train-many:{job.name}:{name}", max_retries=0).remote(job, work, [name])
            for name in ensemble_locations(job)]
    return task.options(num_cpus=job.cpus, name=f"train-many:{job.name}", max_retries=0).remote(job, work, *done)


def summary_table(outcomes: list[Outcome]) -> str:
    rows = [f"{'model':<24} {'status':<8} {'version':>7} {'cpus':>5} {'train s':>8} {'export s':>8} {'img AUROC':>9}"]
    for o in outcomes:
        def num(v, fmt):
            return format(v, fmt) if v is not None else "-"
        rows.append(f"{o.name:<24} {o.status:<8} {num(o.version, 'd'):>7} {o.cpus:>5g} {num(o.train_s, '.1f'):>8} "
                    f"{num(o.export_s, '.1f'):>8} {num(o.image_auroc, '.2f'):>9}" + (f"  {o.error}" if o.error else ""))
    return "\n".join(rows)
