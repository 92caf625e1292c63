"""The results kept under docs/data are experiment results, and docs/results.md reports what they hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hf_edit_patch.evaluation.experiment.results import read_results

DOCS = Path(__file__).resolve().parents[1] / "docs"
KEPT = sorted((DOCS / "data").glob("*/results.json"))
# the row label docs/results.md gives each kept run
LABELS = {"lifelong-alphaedit-b100": "AlphaEdit"}


def test_every_kept_run_has_a_label():
    assert KEPT, "docs/data holds no results"
    assert {p.parent.name for p in KEPT} == set(LABELS)


@pytest.mark.parametrize("path", KEPT, ids=lambda p: p.parent.name)
def test_kept_results_match_the_table_in_results_md(path):
    results = read_results(path)
    text = (DOCS / "results.md").read_text(encoding="utf-8")
    label = LABELS[path.parent.name]
    (run,) = results["runs"].values()
    checkpoints = sorted(run["checkpoints"].items(), key=lambda kv: int(kv[0]))
    assert checkpoints
    for n, point in checkpoints:
        row = re.search(rf"^\| {re.escape(label)} \| {n} \| (.+)$", text, flags=re.MULTILINE)
        assert row, f"results.md has no row for {label} at {n} edits"
        cells = [c.strip() for c in row.group(1).split("|")]
        reliability, first, generalization, locality, kl, ppl = cells[:6]
        assert float(reliability) == pytest.approx(point["editing"]["reliability"], abs=5e-4)
        assert float(first) == pytest.approx(point["first_edits"]["reliability"], abs=5e-4)
        assert float(generalization) == pytest.approx(point["editing"]["generalization"], abs=5e-4)
        assert float(locality) == pytest.approx(point["editing"]["locality"], abs=5e-4)
        assert float(kl) == pytest.approx(point["drift"]["kl"], abs=5e-5)
        assert float(ppl) == pytest.approx(point["drift"]["ppl_edited"], abs=5e-3)
