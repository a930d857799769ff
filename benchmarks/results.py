"""Writing measurements to benchmarks/results/*.json: flat records, one per measurement (see DEVELOPERS.md).

A record re-measured replaces the old one with the same identity, so results files hold the latest run.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import shlex
import sys
from pathlib import Path
from typing import Any, Iterable

from ssn_edge.runtime.atomic import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"
# "recipe": a benchmark whose dataset moved to a new recipe keeps the earlier recipe's records beside the new ones;
# "defect": one run's metrics restricted to one defect type (weak_bench by-defect) are records of their own;
# "code": the same measurement of an earlier commit's code (before / after a speed change) is kept beside it;
# "int8_variant": an INT8 export with other quantization options than the defaults, kept beside the default's
IDENTITY = ("dataset", "backbone", "setting", "variant", "runtime", "precision", "seed", "ratio_of", "recipe", "defect",
            "code", "int8_variant")


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def mean_sd(values: Iterable[float | None]) -> str:
    """A table cell: the mean ± sample sd of the values (None left out); the value alone for one, "-" for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{m:.2f}" + (f" ± {sd:.2f}" if len(values) > 1 else "")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def record_results(name: str, records: Iterable[dict[str, Any]]) -> Path:
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # benchmark jobs run side by side: read-modify-write under a lock so no job's records are lost
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _merge(path, records)


def _merge(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    existing: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    new = list(records)
    keys = {tuple(r.get(k) for k in IDENTITY) for r in new}
    kept = [r for r in existing if tuple(r.get(k) for k in IDENTITY) not in keys]
    return atomic_write(path, json.dumps(kept + new, indent=2))
