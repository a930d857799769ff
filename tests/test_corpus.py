"""Runs the bad-input corpus (tests/corpus.py) through the CLI: every case must end as a clear error or the
right result; no traceback, no crash, no silent wrong answer. The totals are printed by the last test."""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

pytest.importorskip("openvino")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
from test_runtime import tiny_bundle  # noqa: E402,F401  (the fixture: a hand-built fp32/fp16/int8 bundle)

OUTCOMES: dict[str, str] = {}


@pytest.mark.parametrize("case", corpus.CASES, ids=[c.id for c in corpus.CASES])
def test_corpus_case(case: corpus.Case, tiny_bundle, tmp_path):  # noqa: F811
    outcome = corpus.run_case(case, tmp_path / "case", corpus.Fixtures(bundle=tiny_bundle))
    verdict, why = corpus.verdict(case, outcome)
    OUTCOMES[case.id] = verdict
    assert verdict in ("clear_error", "correct"), f"{verdict}: {why}"


def test_corpus_totals():
    """Per command: how many cases ended as a clear error, a correct result, or something that must not be."""
    if len(OUTCOMES) < len(corpus.CASES):
        pytest.skip("only part of the corpus ran (a -k selection)")
    totals: dict[str, Counter] = defaultdict(Counter)
    for case in corpus.CASES:
        totals[case.command][OUTCOMES[case.id]] += 1
    lines = [f"{'command':<10}" + "".join(f"{v:>15}" for v in corpus.VERDICTS)]
    for command, counts in totals.items():
        lines.append(f"{command:<10}" + "".join(f"{counts[v]:>15}" for v in corpus.VERDICTS))
    print("\n" + "\n".join(lines))
    bad = {v: sum(c[v] for c in totals.values()) for v in ("traceback", "segfault", "silent_wrong", "unclear_error")}
    assert not any(bad.values()), bad
    assert len(corpus.CASES) >= 100
