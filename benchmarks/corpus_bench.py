"""Bad-input corpus totals by command (issue 30): runs tests/test_corpus.py (every case of tests/corpus.py through
the CLI) and records, per command, how many cases ended as a clear one-line error, a correct result, a traceback,
a segfault, a silent wrong result or an unclear error, in benchmarks/results/corpus.json (variant corpus_<command>).

    python benchmarks/corpus_bench.py            # ~2 min on 2 cores; prints the table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results import command_line, record_results  # noqa: E402

VERDICTS = ("clear_error", "correct", "traceback", "segfault", "silent_wrong", "unclear_error")


def run_corpus() -> tuple[dict[str, dict[str, int]], int]:
    """(totals per command, pytest's exit status): the totals test_corpus_totals writes."""
    with tempfile.TemporaryDirectory(prefix="ssn-edge-corpus-") as tmp:
        totals_file = Path(tmp) / "totals.json"
        env = {**os.environ, "SSN_EDGE_CORPUS_TOTALS": str(totals_file)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                               "tests/test_corpus.py"], cwd=ROOT, env=env)
        if not totals_file.exists():
            raise SystemExit(f"the corpus did not finish (pytest exit {proc.returncode}): no totals written")
        return json.loads(totals_file.read_text()), proc.returncode


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    totals, status = run_corpus()
    records = []
    for command, counts in totals.items():
        records.append({"variant": f"corpus_{command}", "cases": sum(counts[v] for v in VERDICTS),
                        **{v: counts[v] for v in VERDICTS}, "command": command_line()})
    all_counts = {v: sum(c[v] for c in totals.values()) for v in VERDICTS}
    records.append({"variant": "corpus_all", "cases": sum(all_counts.values()), **all_counts, "command": command_line()})
    path = record_results("corpus", records)
    print(f"{'command':<10}{'cases':>7}" + "".join(f"{v:>14}" for v in VERDICTS))
    for r in records:
        print(f"{r['variant'][7:]:<10}{r['cases']:>7}" + "".join(f"{r[v]:>14}" for v in VERDICTS))
    print(f"results: {path}")
    if status != 0:
        raise SystemExit(f"pytest exit status {status}: some cases did not end as a clear error or a correct result")


if __name__ == "__main__":
    main()
