"""The result files of a predict run, written as it goes, and never a stale one that looks current.

In the output folder:

* ``predictions.jsonl``: one JSON object per input, in input order, appended (and flushed) as each image is
  done. Scored: ``{"path", "status": "ok", "score", "decision", "result", "latency_ms", "map_max", "bit_depth"}``
  (result: ok | review | defect) (+
  ``overlay`` / ``map`` when written, ``same_file_as`` when an earlier input is the same file). Failed:
  ``{"path", "status": "error", "error", "kind"}``: the reason in words and as a short code.
* ``predictions.csv``: the same rows, columns CSV_FIELDS (score, decision, latency_ms and map_max empty on a
  failed row; decision is 0/1).
* ``predictions.json``: written last, when the run finished: the run's header (bundle, precision, thresholds,
  counts: ``inputs``, ``count`` scored, ``defective``, ``failed``, ``skipped``, ``same_file``,
  ``bit_depths``) with ``"complete": true``, every scored record under ``predictions`` and every failure
  under ``failures``.

Staleness: at the start of a run, before the bundle is even read, the previous run's result files are
removed (the three above, their partial versions, and the ``.png`` / ``.npy`` files in ``overlays/`` and
``maps/``). While the run goes, the JSONL and CSV files are named ``*.partial``; they are renamed when it
finishes and ``predictions.json`` is written after them. So a run that fails, or is killed (out of memory),
leaves only ``*.partial`` files with what was scored so far: nothing in the folder passes for a finished run.
A run that cannot write (a full disk, no permission) removes what it wrote and says so in one line
(`ResultsError`). Torch-free.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from ssn_edge.runtime.atomic import atomic_open, describe_os_error

JSONL = "predictions.jsonl"
CSV = "predictions.csv"
SUMMARY = "predictions.json"
PARTIAL = ".partial"
CSV_FIELDS = ("path", "score", "decision", "result", "latency_ms", "map_max", "status", "error")
# Sub-folders the run writes, and the kind of file it writes there (only those are removed at the start).
OUTPUT_DIRS = {"overlays": ".png", "maps": ".npy"}


@dataclass
class ResultRecord:
    """One input's outcome. path: the display name (see decode.display_path). error: the reason, without the
    path; kind: its short code (ImageError.kind)."""

    path: str
    status: str  # "ok" | "error"
    score: float | None = None
    decision: bool | None = None
    result: str | None = None  # "ok" | "review" | "defect" (review: in the bundle's review band, if it has one)
    latency_ms: float | None = None
    map_max: float | None = None
    bit_depth: int | None = None
    overlay: str | None = None
    map: str | None = None
    same_file_as: str | None = None
    error: str | None = None
    kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        keep_none = {"bit_depth"} if self.ok else set()
        return {k: v for k, v in asdict(self).items() if v is not None or k in keep_none}

    def csv_row(self) -> dict[str, Any]:
        if not self.ok:
            return {"path": self.path, "status": self.status, "error": self.error}
        return {
            "path": self.path,
            "score": f"{self.score:.6f}",
            "decision": int(bool(self.decision)),
            "result": self.result or "",
            "latency_ms": f"{self.latency_ms:.3f}",
            "map_max": f"{self.map_max:.6f}",
            "status": self.status,
        }


class ResultsError(ValueError):
    """The result files cannot be written (a full disk, a folder without write permission); one line."""


def write_error(out_dir: Path, exc: OSError) -> ResultsError:
    """The one-line error for an OSError while writing out_dir's results (whatever this run wrote is removed)."""
    at = f" ({os.fsdecode(exc.filename)})" if exc.filename is not None else ""
    return ResultsError(f"{out_dir}: cannot write the results: {describe_os_error(exc)}{at}; "
                        "no results of this run were kept")


def clear_previous(out_dir: Path) -> None:
    """Remove what an earlier run wrote to out_dir (see the module docstring); other files are left alone."""
    if not out_dir.is_dir():
        return
    for name in (SUMMARY, JSONL, CSV, JSONL + PARTIAL, CSV + PARTIAL):
        (out_dir / name).unlink(missing_ok=True)
    for stale in out_dir.glob(f".{SUMMARY}.*.tmp"):
        stale.unlink(missing_ok=True)
    for sub, suffix in OUTPUT_DIRS.items():
        folder = out_dir / sub
        if not folder.is_dir() or folder.is_symlink():
            continue
        for f in folder.iterdir():
            if f.name.endswith((suffix, ".tmp", ".partial")) and (f.is_file() or f.is_symlink()):
                f.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()


class ResultWriter:
    """Appends records to the partial JSONL and CSV files; `finish` renames them and writes the summary."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_partial = out_dir / (JSONL + PARTIAL)
        self.csv_partial = out_dir / (CSV + PARTIAL)
        self._jsonl = open(self.jsonl_partial, "w", encoding="utf-8")
        self._csv_file = open(self.csv_partial, "w", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, lineterminator="\n")
        self._csv.writeheader()
        self.scored = self.defective = self.failed = 0
        self.bit_depths: dict[str, int] = {}

    def add(self, record: ResultRecord) -> None:
        self._jsonl.write(json.dumps(record.to_dict()) + "\n")
        self._csv.writerow(record.csv_row())
        self._jsonl.flush()
        self._csv_file.flush()
        if record.ok:
            self.scored += 1
            self.defective += int(bool(record.decision))
            key = "float" if record.bit_depth is None else str(record.bit_depth)
            self.bit_depths[key] = self.bit_depths.get(key, 0) + 1
        else:
            self.failed += 1

    def close(self) -> None:
        """Close the partial files without finishing (a run that stopped): they stay as *.partial."""
        for fh in (self._jsonl, self._csv_file):
            if not fh.closed:
                fh.close()

    def _records(self, path: Path, ok: bool) -> Iterator[str]:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if (json.loads(line).get("status") == "ok") == ok:
                    yield line.rstrip("\n")

    def finish(self, header: dict[str, Any]) -> tuple[Path, Path, Path]:
        """Rename the partial files into place, then write predictions.json (streamed from the JSONL file: the
        records are never all in memory). Returns (summary, jsonl, csv) paths."""
        self.close()
        jsonl, csv_path = self.out_dir / JSONL, self.out_dir / CSV
        os.replace(self.jsonl_partial, jsonl)
        os.replace(self.csv_partial, csv_path)
        summary = self.out_dir / SUMMARY
        head = {**header, "count": self.scored, "defective": self.defective, "failed": self.failed,
                "bit_depths": self.bit_depths, "complete": True}
        with atomic_open(summary) as fh:
            text = json.dumps(head, indent=2)[:-2]  # without the closing "\n}"
            fh.write(text.encode())
            for key, ok in (("predictions", True), ("failures", False)):
                fh.write(f',\n  "{key}": ['.encode())
                first = True
                for line in self._records(jsonl, ok):
                    fh.write((("\n" if first else ",\n") + "    " + line).encode())
                    first = False
                fh.write(("]" if first else "\n  ]").encode())
            fh.write(b"\n}\n")
        return summary, jsonl, csv_path
