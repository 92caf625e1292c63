"""The experiment runner on a tiny model: what a run records, resuming from saved patches, single vs sequential
settings, configuration checks, plots and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_state_equal, snapshot
from test_editors import llama4, tiny_tokenizer

from hf_edit_patch.cli import main
from hf_edit_patch.evaluation import experiment as ex
from hf_edit_patch.evaluation.experiment import inputs, runner
from hf_edit_patch.evaluation.experiment.measures import HEATMAP_SIZE, Measures
from hf_edit_patch.evaluation.experiment.results import add_missing
from hf_edit_patch.evaluation.experiment.runner import ExperimentRunner
from hf_edit_patch.evaluation.scoring import LocalityReference

SUBJECTS = ["the eiffel tower", "the louvre", "big ben", "the colosseum", "tokyo", "berlin"]
TARGETS = ["rome", "london", "paris", "japan", "italy", "france"]
FT = {"norm_constraint": 0.2, "lr": 0.02}


def zsre_records() -> list[dict]:
    records = [
        {
            "subject": s,
            "src": f"where is {s} ? in",
            "rephrase": f"{s} is in the city of",
            "alt": t,
            "answers": ["berlin"],
            "loc": "nq question: the capital of germany is",
            "loc_ans": "berlin",
        }
        for s, t in zip(SUBJECTS, TARGETS, strict=True)
    ]
    records.insert(2, dict(records[0], alt="tokyo"))  # a repeated subject is skipped
    return records


@pytest.fixture
def files(tmp_path):
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps(zsre_records()))
    texts = tmp_path / "neutral.txt"
    texts.write_text(
        "\n".join(["the river is blue and green .", "one two three four five six .", "he was in a city ."])
    )
    return data, texts


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def config(files, **kw):
    data, texts = files
    base = {
        "data": str(data),
        "method": "ft",
        "hparams": FT,
        "regularizers": ["none", "rect:0.4"],
        "checkpoints": [2, 4],
        "tasks": [],
        "drift_texts": str(texts),
        "drift_n": 3,
        "task_checkpoints": None,
    }
    return ex.ExperimentConfig(**{**base, **kw})


def test_load_zsre_skips_repeated_subjects_and_shuffles_by_seed(files):
    reqs = ex.load_zsre(files[0], 6)
    assert [r.subject for r in reqs] == SUBJECTS
    assert reqs[0].target_new == "rome"  # the first record of a subject wins
    shuffled = ex.load_zsre(files[0], 6, seed=3)
    assert sorted(r.subject for r in shuffled) == sorted(SUBJECTS)
    with pytest.raises(ValueError, match="only 6 usable"):
        ex.load_zsre(files[0], 7)


def test_sequential_run_records_every_checkpoint_and_restores_the_model(files, tok, tmp_path):
    model = llama4(tok)
    before = snapshot(model)
    out = tmp_path / "out"
    results = ex.run_experiment(config(files), out, model=model, tokenizer=tok, show_progress=False)
    assert_state_equal(model, before)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["base"]["drift"]["kl"] == 0.0
    assert results["base"]["editing"]["locality"] == 1.0
    runs = results["runs"]
    assert set(runs) == {"ft-sequential-instance-none-seed0", "ft-sequential-instance-rect0.4-seed0"}
    for run in runs.values():
        assert list(run["checkpoints"]) == ["2", "4"]
        for point in run["checkpoints"].values():
            assert point["editing"]["reliability"] > results["base"]["editing"]["reliability"]
            assert point["drift"]["kl"] > 0.0
            assert point["weights"]["n_matrices"] == 1
            assert len(point["heatmap"]["abs_delta"]) == min(HEATMAP_SIZE, 48)
            assert point["nnz"] > 0
        assert len(list((out / "patches").glob("*/*/patch_config.json"))) == 8
    none, rect = (runs[k]["checkpoints"]["4"] for k in sorted(runs))
    # RECT keeps 40% of each update: fewer entries change, and by less in total.
    assert rect["nnz"] < none["nnz"]
    assert rect["weights"]["manhattan"] < none["weights"]["manhattan"]
    # More sequential edits, more weight change.
    first, last = (runs["ft-sequential-instance-none-seed0"]["checkpoints"][n] for n in ("2", "4"))
    assert last["weights"]["manhattan"] > first["weights"]["manhattan"]
    table = ex.summary_table(results).splitlines()
    assert len(table) == 2 + 1 + 4  # header, base, two runs × two checkpoints
    assert table[2].startswith("| base | 0 |") and any(r.startswith("| rect:0.4 | 4 | ") for r in table)
    assert ex.tasks_table(results) == ""  # no tasks ran
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["heatmap.png", "scores.png"]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_resume_reuses_saved_patches_and_finished_checkpoints(files, tok, tmp_path, monkeypatch):
    model = llama4(tok)
    out = tmp_path / "out"
    first = ex.run_experiment(
        config(files, checkpoints=[2], regularizers=["rect:0.4"]), out, model=model, tokenizer=tok, plots=False
    )
    calls = []
    real = runner.edit
    monkeypatch.setattr(runner, "edit", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = ex.run_experiment(
        config(files, checkpoints=[2, 4], regularizers=["rect:0.4"]), out, model=model, tokenizer=tok, plots=False
    )
    assert len(calls) == 2  # edits 3 and 4 only; 1 and 2 come back from their saved patches
    name = "ft-sequential-instance-rect0.4-seed0"
    assert second["runs"][name]["checkpoints"]["2"] == first["runs"][name]["checkpoints"]["2"]
    # The resumed checkpoint equals a run from scratch: re-attached patches are exact.
    fresh = ex.run_experiment(
        config(files, checkpoints=[2, 4], regularizers=["rect:0.4"]),
        tmp_path / "fresh",
        model=model,
        tokenizer=tok,
        plots=False,
    )
    for key in ("editing", "drift", "weights", "nnz"):
        assert second["runs"][name]["checkpoints"]["4"][key] == fresh["runs"][name]["checkpoints"]["4"][key]
    # The editing time of a resumed checkpoint counts the reloaded patches' own times, kept in the results.
    seconds = second["runs"][name]["patch_seconds"]
    assert sorted(seconds) == ["00001", "00002", "00003", "00004"]
    assert seconds["00001"] > 0
    assert second["runs"][name]["checkpoints"]["2"]["edit_seconds"] == pytest.approx(
        seconds["00001"] + seconds["00002"], rel=1e-12
    )
    assert second["runs"][name]["checkpoints"]["4"]["edit_seconds"] == pytest.approx(sum(seconds.values()), rel=1e-12)


def test_a_checkpoint_after_patches_of_unknown_time_has_no_editing_time(files, tok, tmp_path):
    model = llama4(tok)
    out = tmp_path / "out"
    name = "ft-sequential-instance-none-seed0"
    ex.run_experiment(
        config(files, checkpoints=[2], regularizers=["none"]), out, model=model, tokenizer=tok, plots=False
    )
    results = json.loads((out / "results.json").read_text())
    del results["runs"][name]["patch_seconds"]["00001"]  # as a run saved before patch times were kept
    (out / "results.json").write_text(json.dumps(results))
    again = ex.run_experiment(
        config(files, checkpoints=[2, 4], regularizers=["none"]), out, model=model, tokenizer=tok, plots=False
    )
    points = again["runs"][name]["checkpoints"]
    assert points["4"]["edit_seconds"] is None  # patch 1's time is unknown: no partial sum is reported
    assert points["2"]["edit_seconds"] > 0  # measured before, kept


def test_a_different_configuration_is_refused(files, tok, tmp_path):
    model = llama4(tok)
    out = tmp_path / "out"
    ex.run_experiment(
        config(files, checkpoints=[2], regularizers=["none"]), out, model=model, tokenizer=tok, plots=False
    )
    saved = (out / "results.json").read_text()
    with pytest.raises(ValueError, match=r"different configuration \(differs in \['seed'\]\)"):
        ex.run_experiment(config(files, checkpoints=[2], seed=1), out, model=model, tokenizer=tok, plots=False)
    assert (out / "results.json").read_text() == saved


def test_single_batch_edits_each_checkpoint_from_the_base(files, tok, tmp_path):
    model = llama4(tok)
    before = snapshot(model)
    results = ex.run_experiment(
        config(files, setting="single", unit="batch", checkpoints=[1, 3], regularizers=["none"]),
        tmp_path / "out",
        model=model,
        tokenizer=tok,
        plots=False,
    )
    assert_state_equal(model, before)
    points = results["runs"]["ft-single-batch-none-seed0"]["checkpoints"]
    assert points["1"]["n_edits_averaged"] == 1 and points["3"]["n_edits_averaged"] == 1
    assert not (tmp_path / "out" / "patches").exists()


def test_single_instance_averages_its_edits(files, tok, tmp_path):
    model = llama4(tok)
    results = ex.run_experiment(
        config(files, setting="single", checkpoints=[3], regularizers=["rect:0.4"], single_task_edits=2),
        tmp_path / "out",
        model=model,
        tokenizer=tok,
        plots=False,
    )
    point = results["runs"]["ft-single-instance-rect0.4-seed0"]["checkpoints"]["3"]
    assert point["n_edits_averaged"] == 3
    assert 0.0 <= point["editing"]["reliability"] <= 1.0
    assert "drift" in point and "weights" in point


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"regularizers": ["rect"]}, "needs a keep ratio"),
        ({"regularizers": ["topk:0.3"]}, "unknown regularizer"),
        ({"regularizers": ["rect:1.5"]}, r"\(0, 1\]"),
        ({"regularizers": ["none:0.3"]}, "takes no keep ratio"),
        ({"setting": "parallel"}, "unknown setting"),
        ({"unit": "batch", "batch_size": 3, "checkpoints": [2, 4]}, "multiple of batch_size"),
        ({"tasks": ["chess"]}, "unknown tasks"),
        ({"checkpoints": [0]}, "positive integers"),
    ],
)
def test_bad_configurations_are_clear(files, kw, match):
    with pytest.raises(ValueError, match=match):
        config(files, **kw)


def test_command_line_errors_exit_2(files, tmp_path, capsys):
    data, texts = files
    argv = ["--data", str(tmp_path / "missing.json"), "--output-dir", str(tmp_path / "o"), "--drift-texts", str(texts)]
    assert main(["experiment", *argv]) == 2
    assert "--data: no such file" in capsys.readouterr().err
    argv = ["--data", str(data), "--output-dir", str(tmp_path / "o"), "--drift-texts", str(texts), "--hparams", "{"]
    assert main(["experiment", *argv]) == 2
    assert "--hparams is not valid JSON" in capsys.readouterr().err


def test_tasks_run_only_at_the_task_checkpoints(files, tok, tmp_path, monkeypatch):
    seen = []

    def fake_tasks(self, model):
        seen.append(model)
        return {"sentiment": 0.5}

    monkeypatch.setattr(Measures, "tasks", fake_tasks)
    model = llama4(tok)
    results = ex.run_experiment(
        config(files, regularizers=["none"], tasks=["sentiment"], task_checkpoints=[4]),
        tmp_path / "out",
        model=model,
        tokenizer=tok,
        plots=False,
    )
    points = results["runs"]["ft-sequential-instance-none-seed0"]["checkpoints"]
    assert points["2"]["tasks"] == {} and points["4"]["tasks"] == {"sentiment": 0.5}
    assert ex.tasks_table(results).splitlines()[2:] == ["| base | 0 | 0.500 | 0.500 |", "| none | 4 | 0.500 | 0.500 |"]
    assert results["base"]["tasks"] == {"sentiment": 0.5}
    assert len(seen) == 2
    with pytest.raises(ValueError, match=r"task_checkpoints \[3\] are not checkpoints"):
        config(files, task_checkpoints=[3])


def test_budget_variants_run_and_the_stack_stays_bounded(files, tok, tmp_path):
    model = llama4(tok)
    before = snapshot(model)
    results = ex.run_experiment(
        config(files, regularizers=["none", "norm:0.5", "auto", "stack:0.05"], checkpoints=[2, 4]),
        tmp_path / "out",
        model=model,
        tokenizer=tok,
        plots=False,
    )
    assert_state_equal(model, before)
    runs = {r["regularizer"]: r["checkpoints"] for r in results["runs"].values()}
    numel = model.get_submodule("model.layers.3.mlp.down_proj").weight.numel()
    # The stack is re-sparsified after every edit: its entries stay within the budget however many edits.
    assert all(p["nnz"] <= round(0.05 * numel) for p in runs["stack:0.05"].values())
    assert runs["none"]["4"]["nnz"] > 3 * round(0.05 * numel)
    assert runs["norm:0.5"]["4"]["nnz"] < runs["none"]["4"]["nnz"]
    # "auto" checks each edit alone when it is made; later edits may still interfere with it.
    assert runs["auto"]["4"]["nnz"] < runs["none"]["4"]["nnz"]
    assert runs["auto"]["2"]["editing"]["reliability"] > results["base"]["editing"]["reliability"]
    with pytest.raises(ValueError, match="needs setting='sequential'"):
        config(files, setting="single", regularizers=["stack:0.4"])
    with pytest.raises(ValueError, match="takes no keep ratio"):
        config(files, regularizers=["auto:0.3"])


def test_every_editor_is_a_method_of_the_runner(files):
    from hf_edit_patch.editing import METHODS

    for method in METHODS:
        assert config(files, method=method).method == method
    with pytest.raises(ValueError, match="unknown method"):
        config(files, method="grace")


def test_a_rerun_adds_probes_to_finished_checkpoints_without_editing_again(files, tok, tmp_path, monkeypatch):
    seen = []

    def fake_probes(self, model, only=None):
        tasks = [t for t in self.config.probe_tasks if only is None or t in only]
        if tasks:
            seen.append((getattr(model, "active_patches", None), tuple(tasks)))
        return {t: {"adherence": 0.5, "auc": 0.5, "label_mass": 0.1, "n": 3} for t in tasks}

    monkeypatch.setattr(Measures, "probes", fake_probes)
    model = llama4(tok)
    before = snapshot(model)
    out = tmp_path / "out"
    first = ex.run_experiment(config(files, regularizers=["rect:0.4"]), out, model=model, tokenizer=tok, plots=False)
    name = "ft-sequential-instance-rect0.4-seed0"
    assert all(not p["probes"] for p in first["runs"][name]["checkpoints"].values()) and not seen
    calls = []
    real = runner.edit
    monkeypatch.setattr(runner, "edit", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = ex.run_experiment(
        config(files, regularizers=["rect:0.4"], probe_tasks=["sentiment", "nli"]),
        out,
        model=model,
        tokenizer=tok,
        plots=False,
    )
    assert calls == []  # the saved patches are re-attached
    assert_state_equal(model, before)
    # base, then each checkpoint with exactly the edits made by then
    assert [len(active or []) for active, _ in seen] == [0, 2, 4]
    assert all(only == ("sentiment", "nli") for _, only in seen)
    points = second["runs"][name]["checkpoints"]
    for n in ("2", "4"):
        assert set(points[n]["probes"]) == {"sentiment", "nli"}
        for key in ("editing", "drift", "weights", "nnz", "edit_seconds"):
            assert points[n][key] == first["runs"][name]["checkpoints"][n][key]
    assert set(second["base"]["probes"]) == {"sentiment", "nli"}
    assert "SST-2 format / AUC" in ex.summary_table(second)
    # nothing left to add: a third run measures nothing
    seen.clear()
    ex.run_experiment(
        config(files, regularizers=["rect:0.4"], probe_tasks=["nli"]), out, model=model, tokenizer=tok, plots=False
    )
    assert seen == []


def test_single_runs_compute_each_update_once_for_every_regularizer(files, tok, tmp_path, monkeypatch):
    calls = []
    real = runner.compute_update
    monkeypatch.setattr(runner, "compute_update", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    model = llama4(tok)
    before = snapshot(model)
    specs = ["none", "rect:0.4", "random:0.4", "norm:0.9"]
    results = ex.run_experiment(
        config(files, setting="single", unit="batch", checkpoints=[3], regularizers=specs),
        tmp_path / "out",
        model=model,
        tokenizer=tok,
        plots=False,
    )
    assert calls == [3]  # one update of the 3-request batch, sparsified four ways
    assert_state_equal(model, before)
    points = {r["regularizer"]: r["checkpoints"]["3"] for r in results["runs"].values()}
    numel = model.get_submodule("model.layers.3.mlp.down_proj").weight.numel()
    assert points["none"]["nnz"] == numel
    assert points["rect:0.4"]["nnz"] == points["random:0.4"]["nnz"] == round(0.4 * numel)
    assert points["norm:0.9"]["nnz"] < numel
    # the same ΔW: RECT keeps the entries of largest relative change of the whole update, so it moves the
    # weights further than random-k at the same budget
    assert points["rect:0.4"]["weights"]["manhattan"] > points["random:0.4"]["weights"]["manhattan"]
    # and equals a run of that regularizer alone
    alone = ex.run_experiment(
        config(files, setting="single", unit="batch", checkpoints=[3], regularizers=["rect:0.4"]),
        tmp_path / "alone",
        model=model,
        tokenizer=tok,
        plots=False,
    )
    point = alone["runs"]["ft-single-batch-rect0.4-seed0"]["checkpoints"]["3"]
    for key in ("editing", "drift", "weights", "nnz"):
        assert point[key] == points["rect:0.4"][key]


def test_runners_sharing_a_folder_keep_each_others_results(files, tok, tmp_path):
    model = llama4(tok)
    out = tmp_path / "out"
    # two runners load the same (empty) folder, then each saves its own regularizer
    first = ExperimentRunner(config(files, regularizers=["none"], checkpoints=[2]), out, False, model, tok)
    second = ExperimentRunner(config(files, regularizers=["rect:0.4"], checkpoints=[2]), out, False, model, tok)
    first.run()
    second.run()  # its results were loaded before `first` saved
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk["runs"]) == {"ft-sequential-instance-none-seed0", "ft-sequential-instance-rect0.4-seed0"}
    # measures added by one are kept when the other saves a point of its own
    on_disk["runs"]["ft-sequential-instance-none-seed0"]["checkpoints"]["2"]["tasks"] = {"sentiment": 0.25}
    (out / "results.json").write_text(json.dumps(on_disk))
    second.results["runs"]["ft-sequential-instance-rect0.4-seed0"]["note"] = "x"
    second.save()
    merged = json.loads((out / "results.json").read_text())
    assert merged["runs"]["ft-sequential-instance-none-seed0"]["checkpoints"]["2"]["tasks"] == {"sentiment": 0.25}
    assert merged["runs"]["ft-sequential-instance-rect0.4-seed0"]["note"] == "x"


def test_a_resumed_run_reads_its_requests_and_locality_reference_back(files, tok, tmp_path, monkeypatch):
    model = llama4(tok)
    out = tmp_path / "out"
    first = ex.run_experiment(
        config(files, checkpoints=[2], regularizers=["none"]), out, model=model, tokenizer=tok, plots=False
    )
    kept = {name: (out / name).read_text() for name in (inputs.REQUESTS_FILE, inputs.REFERENCE_FILE)}

    def fail(*args, **kwargs):
        raise AssertionError("computed again")

    monkeypatch.setattr(runner, "load_zsre", fail)
    monkeypatch.setattr(runner, "locality_reference", fail)
    second = ex.run_experiment(
        config(files, checkpoints=[2], regularizers=["none", "rect:0.4"]), out, model=model, tokenizer=tok, plots=False
    )
    assert second["base"] == first["base"] and {n: (out / n).read_text() for n in kept} == kept
    monkeypatch.undo()
    # More requests are another key: computed again, and the saved patches of the first two still match them.
    third = ex.run_experiment(
        config(files, checkpoints=[2, 3], regularizers=["none"]), out, model=model, tokenizer=tok, plots=False
    )
    assert set(third["runs"]["ft-sequential-instance-none-seed0"]["checkpoints"]) == {"2", "3"}
    assert json.loads((out / inputs.REQUESTS_FILE).read_text())["key"]["n"] == 3


def test_kept_inputs_are_used_only_under_their_key(tmp_path, caplog):
    from hf_edit_patch.requests import EditRequest

    made = []

    def make(subject="big ben"):
        made.append(subject)
        return [EditRequest("{} is in", subject, "paris", neighborhood=["the capital of france is"])]

    key = {"n": 1, "data_sha256": inputs.data_sha256(None), "seed": 0}
    first = inputs.kept_requests(tmp_path, key, make)
    assert inputs.kept_requests(tmp_path, dict(key), lambda: make("other")) == first and made == ["big ben"]
    assert inputs.kept_requests(tmp_path, {**key, "seed": 1}, lambda: make("tokyo"))[0].subject == "tokyo"
    assert inputs.kept_requests(tmp_path, {**key, "seed": 1}, make)[0].subject == "tokyo" and len(made) == 2
    (tmp_path / inputs.REQUESTS_FILE).write_text('{"key": {}, "value": [')  # a torn or foreign file
    with caplog.at_level("WARNING"):
        assert inputs.kept_requests(tmp_path, key, make) == first and len(made) == 3
    assert "ignoring" in caplog.text and "requests.json" in caplog.text
    reference = LocalityReference({"the capital of france is": (5, 7)})
    assert inputs.kept_reference(tmp_path, first, None, lambda: reference) == reference
    assert inputs.kept_reference(tmp_path, first, None, fail_if_called) == reference
    other = LocalityReference({"the capital of france is": (1,)})
    assert inputs.kept_reference(tmp_path, first, "another/model", lambda: other) == other
    assert inputs.kept_reference(tmp_path, make("tokyo"), "another/model", lambda: reference) == reference


def fail_if_called():
    raise AssertionError("computed again")


def test_add_missing_keeps_mine_and_adds_theirs_in_place():
    mine = {"a": {"y": {"k": 2, "j": 0}}, "b": [2]}
    inner = mine["a"]
    add_missing(mine, {"a": {"x": 1, "y": {"k": 1}}, "b": [1], "c": 3})
    assert mine == {"a": {"x": 1, "y": {"k": 2, "j": 0}}, "b": [2], "c": 3}
    assert mine["a"] is inner  # references held by a running runner stay valid


def test_stack_table_and_plots_show_forgetting_and_the_accumulated_update(tmp_path):
    def point(rel, first, fro, spectral, cond):
        return {
            "editing": {"reliability": rel, "generalization": rel / 2, "locality": 0.9},
            "drift": {"kl": rel / 10, "ppl_edited": 23.0, "ppl_base": 22.0},
            "first_edits": {"n": 5, "reliability": first} if first is not None else None,
            "accumulated": {
                f"model.layers.{layer}.mlp.down_proj.weight": {
                    "rel_fro": fro * layer,
                    "rel_spectral": spectral,
                    "cond_before": 20.0,
                    "cond_edited": cond,
                }
                for layer in (4, 10)
            },
            "weights": {"frac_rel_change_gt": {"0.077": 0.5}},
            "tasks": {},
        }

    results = {
        "config": {"method": "rome", "setting": "sequential", "unit": "instance"},
        "base": None,
        "runs": {
            "a": {"regularizer": "none", "checkpoints": {"10": point(0.9, None, 0.2, 0.8, 18.0)}},
            "b": {"regularizer": "prune:0.5", "checkpoints": {"50": point(0.5, 0.25, 0.4, 0.7, 30.0)}},
        },
    }
    rows = ex.stack_table(results).splitlines()
    assert "| first 5 |" in rows[0] and "σmax(ΣΔW)/σmax(W)" in rows[0]
    assert len(rows) == 2 + 2 * 2  # two checkpoints × two matrices
    assert rows[2].startswith("| none | 10 | 0.900 | – |") and rows[2].endswith(
        "| model.layers.4.mlp.down_proj | 0.80 | 0.80 | 0.90 |"
    )
    assert rows[3].endswith("| model.layers.10.mlp.down_proj | 2.00 | 0.80 | 0.90 |")
    assert rows[4].startswith("| prune:0.5 | 50 | 0.500 | 0.250 |") and rows[4].endswith("| 1.60 | 0.70 | 1.50 |")
    without = {**results, "runs": {"a": {"regularizer": "none", "checkpoints": {"10": {"accumulated": None}}}}}
    assert ex.stack_table(without) == ""
    pytest.importorskip("matplotlib")
    paths = ex.plot_results(results, tmp_path)
    assert Path(paths[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
