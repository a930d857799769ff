"""Runs the bad-input corpus (tests/corpus.py) through the CLI: every case must end as a clear error or the
right result; no traceback, no crash, no silent wrong answer. The totals are printed by the last test."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

pytest.importorskip("openvino")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus  # noqa: E402
from test_runtime import tiny_bundle  # noqa: E402,F401  (the fixture: a hand-built fp32/fp16/int8 bundle)

OUTCOMES: dict[str, str] = {}
TOTALS_FILE = "SSN_EDGE_CORPUS_TOTALS"  # benchmarks/corpus_bench.py: where test_corpus_totals writes the totals


@pytest.fixture(scope="session")
def corpus_fixtures(tiny_bundle, tiny_checkpoint, tiny_dataset, tmp_path_factory) -> corpus.Fixtures:  # noqa: F811
    """The hand-built bundle (predict, bench), and for train/eval/export/report: the tiny recipe as YAML, its
    dataset, a checkpoint trained on it and an FP32 bundle exported from that."""
    import yaml

    from conftest import tiny_recipe_dict
    from ssn_edge.export.exporter import export_bundle

    root = tmp_path_factory.mktemp("corpus_fixtures")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tiny_dataset)))
    exported = export_bundle(tiny_checkpoint, root / "exported").path
    return corpus.Fixtures(bundle=tiny_bundle, more={"recipe": recipe, "dataset": tiny_dataset,
                                                     "checkpoint": tiny_checkpoint, "exported": exported})


@pytest.mark.parametrize("case", corpus.CASES, ids=[c.id for c in corpus.CASES])
def test_corpus_case(case: corpus.Case, corpus_fixtures, tmp_path):
    outcome = corpus.run_case(case, tmp_path / "case", corpus_fixtures)
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
    if os.environ.get(TOTALS_FILE):
        Path(os.environ[TOTALS_FILE]).write_text(json.dumps(
            {command: {v: counts[v] for v in corpus.VERDICTS} for command, counts in totals.items()}, indent=2))
    bad = {v: sum(c[v] for c in totals.values()) for v in ("traceback", "segfault", "silent_wrong", "unclear_error")}
    assert not any(bad.values()), bad
    assert set(totals) == {"predict", "bench", "train", "eval", "export", "report"}
    assert len(corpus.CASES) >= 150
