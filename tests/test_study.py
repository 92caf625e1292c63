"""Reading many experiment folders together: rows, seed statistics, ratios against the whole update, the table,
the plots and the command line, on small synthetic results."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from hf_edit_patch.evaluation import study

PNG = b"\x89PNG\r\n\x1a\n"
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "study.py"


def point(rel, gen, loc, kl, ppl, nnz=None, probes=None):
    p = {
        "editing": {"reliability": rel, "generalization": gen, "locality": loc},
        "drift": {"kl": kl, "ppl_base": 20.0, "ppl_edited": ppl},
        "tasks": {},
    }
    if nnz is not None:
        p["nnz"] = nnz
        p["weights"] = {"manhattan": 1.0, "frac_rel_change_gt": {"0.077": 0.1}}
    if probes is not None:
        p["probes"] = probes
    return p


def probes(sst, boolq):
    return {
        "sentiment": {"adherence": sst[0], "auc": sst[1], "label_mass": 0.5, "n": 32},
        "closed_qa": {"adherence": boolq[0], "auc": boolq[1], "label_mass": 0.4, "n": 32},
    }


def write(folder: Path, seed: int, runs: dict, method="rome", setting="sequential", unit="instance", base=True):
    folder.mkdir(parents=True)
    results = {
        "config": {"method": method, "setting": setting, "unit": unit, "seed": seed, "regularizers": list(runs)},
        "base": None,
        "runs": {
            f"{method}-{spec}-seed{seed}": {"regularizer": spec, "checkpoints": {str(n): p for n, p in cps.items()}}
            for spec, cps in runs.items()
        },
    }
    if base:
        results["base"] = {
            "editing": {"reliability": 0.2 + seed / 10, "generalization": 0.1, "locality": 1.0},
            "drift": {"kl": 0.0, "ppl_base": 20.0, "ppl_edited": 20.0},
            "tasks": {},
            "probes": probes((0.9, 0.8), (0.85, 0.7)),
        }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def folders(tmp_path):
    s0 = write(
        tmp_path / "s0",
        0,
        {
            "none": {
                10: point(0.8, 0.6, 0.95, 0.02, 21.0, 1_000_000, probes((0.9, 0.8), (0.8, 0.6))),
                20: point(0.7, 0.5, 0.9, 0.04, 22.0, 2_000_000, probes((0.8, 0.7), (0.7, 0.5))),
            },
            "rect:0.4": {
                10: point(0.76, 0.57, 0.96, 0.01, 20.5, 400_000, {}),  # probes measured as nothing
                20: point(0.63, 0.5, 0.92, 0.018, 21.0, 800_000),  # no probes at all
            },
            "rect:0.1": {10: point(0.4, 0.3, 0.97, 0.005, 20.2, 100_000, probes((0.9, 0.75), (0.8, 0.65)))},
            "random:0.4": {10: point(0.1, 0.1, 0.99, 0.004, 20.1, 400_000, probes((0.9, 0.8), (0.85, 0.7)))},
            "norm:0.9": {10: point(0.7, 0.5, 0.96, 0.012, 20.6, 300_000, probes((0.9, 0.8), (0.8, 0.6)))},
            "stack:0.4": {10: point(0.3, 0.2, 0.98, 0.01, 20.4, 40_000, probes((0.9, 0.8), (0.8, 0.6)))},
        },
    )
    s1 = write(
        tmp_path / "s1",
        1,
        {
            "none": {10: point(0.5, 0.4, 0.9, 0.03, 21.5, 1_000_000, probes((1.0, 0.9), (0.6, 0.5)))},
            "rect:0.4": {
                10: point(0.45, 0.44, 0.95, 0.012, 20.8, 400_000, probes((0.95, 0.85), (0.7, 0.55))),
                20: point(0.4, 0.3, 0.9, 0.02, 21.0, 800_000),  # seed 1 has no "none" at 20 edits
            },
        },
    )
    return s0, s1


def group(agg, regularizer, edits):
    found = [g for g in agg if g["regularizer"] == regularizer and g["edits"] == edits]
    assert len(found) == 1, found
    return found[0]


def test_load_points_rows(folders):
    rows = study.load_points(folders)
    assert len(rows) == (1 + 8) + (1 + 3)  # a base row and the checkpoints of each folder
    keys = {"method", "setting", "unit", "seed", "regularizer", "edits", "reliability", "generalization"}
    keys |= {"locality", "kl", "ppl", "nnz", "sentiment_adherence", "sentiment_auc", "closed_qa_adherence"}
    keys |= {"closed_qa_auc"}
    assert all(keys <= set(r) for r in rows)
    assert not any("nli_auc" in r for r in rows)  # no folder measured RTE

    base = [r for r in rows if r["regularizer"] == "base"]
    assert [(r["seed"], r["edits"], r["kl"], r["ppl"], r["nnz"]) for r in base] == [
        (0, 0, 0.0, 20.0, 0),
        (1, 0, 0.0, 20.0, 0),
    ]
    assert base[1]["reliability"] == pytest.approx(0.3)
    assert base[0]["sentiment_auc"] == 0.8

    (rect,) = [r for r in rows if r["seed"] == 0 and r["regularizer"] == "rect:0.4" and r["edits"] == 10]
    assert (rect["method"], rect["setting"], rect["unit"]) == ("rome", "sequential", "instance")
    assert (rect["reliability"], rect["kl"], rect["ppl"], rect["nnz"]) == (0.76, 0.01, 20.5, 400_000)
    assert rect["sentiment_adherence"] is None and rect["closed_qa_auc"] is None  # probes {}: missing, not invented
    (rect20,) = [r for r in rows if r["seed"] == 0 and r["regularizer"] == "rect:0.4" and r["edits"] == 20]
    assert rect20["sentiment_auc"] is None
    assert all(isinstance(r["edits"], int) for r in rows)


def test_load_points_without_results_names_the_folder(tmp_path, folders):
    empty = tmp_path / "not-started"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="not-started.*results.json"):
        study.load_points([folders[0], empty])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        study.load_points(tmp_path / "nowhere")
    (empty / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        study.load_points(empty)


def test_load_points_checkpoints_without_nnz_and_base(tmp_path):
    folder = write(tmp_path / "x", 3, {"none": {5: point(0.5, 0.5, 0.9, 0.1, 25.0)}}, base=False)
    (row,) = study.load_points(str(folder))
    assert row["nnz"] is None and row["seed"] == 3 and row["edits"] == 5
    assert "sentiment_auc" not in row  # no probe task anywhere


def test_aggregate_means_and_stds(folders):
    agg = study.aggregate(study.load_points(folders))
    rect = group(agg, "rect:0.4", 10)
    assert rect["seeds"] == [0, 1] and rect["family"] == "rect" and rect["keep"] == 0.4
    assert rect["reliability"]["mean"] == pytest.approx((0.76 + 0.45) / 2)
    assert rect["reliability"]["std"] == pytest.approx(statistics.stdev([0.76, 0.45]))
    assert rect["reliability"]["count"] == 2
    assert rect["kl"]["std"] == pytest.approx(0.002 / 2**0.5)
    # seed 0 measured no probes at this point: one value, no std
    assert rect["sentiment_auc"] == {"mean": 0.85, "std": None, "count": 1}
    assert group(agg, "rect:0.4", 20)["sentiment_auc"] == {"mean": None, "std": None, "count": 0}
    base = group(agg, "base", 0)
    assert base["reliability"]["mean"] == pytest.approx(0.25)
    assert base["kl"] == {"mean": 0.0, "std": 0.0, "count": 2}
    assert group(agg, "rect:0.1", 10)["reliability"] == {"mean": 0.4, "std": None, "count": 1}


def test_aggregate_ratios_are_per_seed(folders):
    agg = study.aggregate(study.load_points(folders))
    rect = group(agg, "rect:0.4", 10)
    # seed 0: 0.76 / 0.8 = 95%, seed 1: 0.45 / 0.5 = 90%; the ratio of the means (0.605 / 0.65) would be 93.1%
    assert rect["rel_reliability"]["mean"] == pytest.approx(0.925)
    assert rect["rel_reliability"]["std"] == pytest.approx(statistics.stdev([0.95, 0.9]))
    assert rect["rel_reliability"]["count"] == 2
    assert rect["rel_kl"]["mean"] == pytest.approx((0.01 / 0.02 + 0.012 / 0.03) / 2)
    assert rect["rel_generalization"]["mean"] == pytest.approx((0.57 / 0.6 + 0.44 / 0.4) / 2)
    assert rect["rel_nnz"] == {"mean": pytest.approx(0.4), "std": pytest.approx(0.0), "count": 2}
    # at 20 edits only seed 0 has "none": seed 1's rect value is left out of the ratio
    rect20 = group(agg, "rect:0.4", 20)
    assert rect20["reliability"]["count"] == 2
    assert rect20["rel_reliability"] == {"mean": pytest.approx(0.9), "std": None, "count": 1}
    assert group(agg, "none", 10)["rel_kl"]["mean"] == pytest.approx(1.0)
    assert group(agg, "stack:0.4", 10)["rel_nnz"]["mean"] == pytest.approx(0.04)
    assert group(agg, "base", 0)["rel_reliability"]["count"] == 0  # no "none" at 0 edits


def test_aggregate_counts_a_seed_once(folders, tmp_path):
    again = tmp_path / "s0-copy"
    again.mkdir()
    (again / "results.json").write_text((folders[0] / "results.json").read_text())
    agg = study.aggregate(study.load_points([*folders, again]))
    rect = group(agg, "rect:0.4", 10)
    assert rect["seeds"] == [0, 1]
    assert rect["reliability"]["count"] == 2
    assert rect["reliability"]["mean"] == pytest.approx((0.76 + 0.45) / 2)


def test_study_table(folders):
    agg = study.aggregate(study.load_points(folders))
    table = study.study_table(agg, metrics=("reliability", "kl", "ppl", "nnz", "sentiment_auc", "rel_reliability"))
    lines = table.splitlines()
    assert lines[0] == (
        "| method | setting | unit | regularizer | edits | seeds | reliability | KL | perplexity | stored entries "
        "| SST-2 AUC | reliability vs none |"
    )
    assert lines[1] == "|---|---|---|---|---|---|---|---|---|---|---|---|"
    rect = next(line for line in lines if "| rect:0.4 | 10 |" in line)
    assert rect == (
        "| rome | sequential | instance | rect:0.4 | 10 | 2 | 0.605 ± 0.219 | 0.0110 ± 0.0014 | 20.65 ± 0.21 "
        "| 400,000 ± 0 | 0.850 | 92.5% ± 3.5% |"
    )
    rect20 = next(line for line in lines if "| rect:0.4 | 20 |" in line)
    assert rect20.endswith("| 800,000 ± 0 | – | 90.0% |")
    order = [line.split(" | ")[3] + "@" + line.split(" | ")[4] for line in lines[2:]]
    assert order == [
        "base@0",
        "none@10",
        "none@20",
        "rect:0.4@10",
        "rect:0.4@20",
        "rect:0.1@10",
        "random:0.4@10",
        "norm:0.9@10",
        "stack:0.4@10",
    ]
    only = study.study_table(agg, edits=20).splitlines()
    assert len(only) == 4 and all("| 20 |" in line for line in only[2:])


def test_plots_write_png(folders, tmp_path):
    pytest.importorskip("matplotlib")
    agg = study.aggregate(study.load_points(folders))
    path = study.plot_drift_vs_edits(agg, tmp_path / "plots" / "drift.png")
    assert path == str(tmp_path / "plots" / "drift.png")
    assert Path(path).read_bytes()[:8] == PNG
    path = study.plot_success_vs_budget(agg, tmp_path / "budget.png", edits=10)
    assert Path(path).read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match=r"at 50 edits; edits present: \[10, 20\]"):
        study.plot_success_vs_budget(agg, tmp_path / "none.png", edits=50)
    assert not (tmp_path / "none.png").exists()


def test_plots_with_missing_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    # no probes, no stored entries, no base, one seed: the plots still come out
    folder = write(
        tmp_path / "bare",
        0,
        {
            "none": {5: point(0.5, 0.5, 0.9, 0.1, 25.0), 10: point(0.4, None, 0.9, 0.2, 26.0)},
            "pca:0.2": {10: point(0.3, None, 0.9, 0.1, 25.0)},
            "auto": {10: point(0.35, 0.3, 0.9, 0.1, 25.0)},
        },
        base=False,
    )
    agg = study.aggregate(study.load_points(folder))
    assert Path(study.plot_drift_vs_edits(agg, tmp_path / "d.png")).read_bytes()[:8] == PNG
    assert Path(study.plot_success_vs_budget(agg, tmp_path / "b.png", 10)).read_bytes()[:8] == PNG


def test_plots_pick_one_method(folders, tmp_path):
    pytest.importorskip("matplotlib")
    memit = write(
        tmp_path / "memit", 0, {"none": {50: point(0.9, 0.8, 0.9, 0.1, 25.0, 10)}}, "memit", "single", "batch"
    )
    agg = study.aggregate(study.load_points([*folders, memit]))
    with pytest.raises(ValueError, match="method= to pick one"):
        study.plot_drift_vs_edits(agg, tmp_path / "x.png")
    path = study.plot_drift_vs_edits(agg, tmp_path / "x.png", method="memit")
    assert Path(path).read_bytes()[:8] == PNG


def load_script():
    spec = importlib.util.spec_from_file_location("study_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line(folders, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    memit = write(
        tmp_path / "memit", 0, {"none": {50: point(0.9, 0.8, 0.9, 0.1, 25.0, 10)}}, "memit", "single", "batch"
    )
    out = tmp_path / "study"
    assert load_script().main([*map(str, folders), str(memit), "--output-dir", str(out), "--edits", "10"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == [
        "drift_vs_edits_memit_single.png",
        "drift_vs_edits_rome_sequential.png",
        "study.md",
        "success_vs_budget_rome_sequential_10.png",
    ]
    assert (out / "drift_vs_edits_rome_sequential.png").read_bytes()[:8] == PNG
    captured = capsys.readouterr()
    assert "at 10 edits; edits present: [50]" in captured.err  # memit has no checkpoint at 10
    md = (out / "study.md").read_text()
    assert md in captured.out
    assert "## Budgets at 10 edits" in md
    assert "| rome | sequential | instance | rect:0.4 | 10 | 2 | 92.5% ± 3.5% |" in md


def test_command_line_missing_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert load_script().main([str(tmp_path / "empty"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_command_line_selects_regularizers_and_tags_the_files(folders, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "study"
    argv = [*map(str, folders), "--output-dir", str(out), "--edits", "10", "--regularizers", "rect:*", "--tag=-r"]
    assert load_script().main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "drift_vs_edits_rome_sequential-r.png",
        "study-r.md",
        "success_vs_budget_rome_sequential-r_10.png",
    ]
    md = (out / "study-r.md").read_text()
    rows = [line.split(" | ")[3] for line in md.splitlines() if line.startswith("| rome |")]
    assert set(rows) == {"base", "none", "rect:0.4", "rect:0.1"}  # random, norm and stack left out
