"""The `hf-edit-patch` command, run in-process (`cli.main(argv)` returns the exit code) on a tiny Llama saved to a
folder: every subcommand, its files, and its exit codes (0 success, 1 failure or failed check, 2 bad input)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from test_editors import llama4, tiny_tokenizer
from transformers import AutoModelForCausalLM

import hf_edit_patch as hep
from hf_edit_patch.cli import main
from hf_edit_patch.hub import push as hub_push
from hf_edit_patch.hub import resolve as hub
from hf_edit_patch.hub.default_model import load_default_model

EIFFEL = [
    "--prompt", "{} is located in the city of", "--subject", "the eiffel tower", "--target-new", "rome",
    "--target-true", "paris", "--paraphrase", "where is the eiffel tower ? in the city of",
    "--neighborhood", "the capital of japan is",
]  # fmt: skip
FT_FAST = ["--method", "ft", "--hparams", '{"num_steps": 5, "norm_constraint": 0.05}', "--keep-ratio", "0.5"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and avoids contention with anything else running."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a model folder, and a patch made from it by `edit`."""
    root = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer()
    llama4(tok).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    llama4(tok, seed=1).save_pretrained(root / "other-model")
    tok.save_pretrained(root / "other-model")
    assert main(["edit", "--model", str(root / "model"), *EIFFEL, *FT_FAST, "-o", str(root / "patch")]) == 0
    return SimpleNamespace(root=root, model=str(root / "model"), patch=str(root / "patch"))


def test_help_lists_every_command_and_the_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("edit", "apply", "inspect", "consolidate", "eval", "push", "stats", "demo", "experiment"):
        assert command in out
    assert "exit codes:" in out and "2    a usage or input error" in out
    for command in ("edit", "apply", "inspect", "consolidate", "eval", "push", "stats", "experiment"):
        assert main([command, "--help"]) == 0
    assert main(["stats", "compute", "--help"]) == 0
    assert main(["no-such-command"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_edit_writes_a_patch_folder_from_flags(work, capsys):
    assert sorted(os.listdir(work.patch)) == ["README.md", "patch_config.json", "patch_model.safetensors"]
    patch = hep.EditPatch.from_pretrained(work.patch)
    assert patch.config.editor == "ft" and patch.config.keep_ratio == 0.5
    assert patch.config.editor_hparams["num_steps"] == 5
    assert patch.config.requests[0]["neighborhood"] == ["the capital of japan is"]
    card = ModelCard.load(os.path.join(work.patch, "README.md"))
    assert card.data.library_name == "hf-edit-patch" and "ft" in card.data.tags


def test_edit_reads_request_files_and_rejects_bad_input(work, tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    lines = [
        {"prompt": "the capital of {} is", "subject": "japan", "target_new": "berlin"},
        {"subject": "france", "src": "what is the capital of france ?", "alt": "rome", "answers": ["paris"]},  # ZsRE
    ]
    requests.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = tmp_path / "two"
    assert main(["edit", "--model", work.model, "--requests", str(requests), *FT_FAST, "-o", str(out)]) == 0
    assert [r["subject"] for r in hep.EditPatch.from_pretrained(out).config.requests] == ["japan", "france"]
    assert "Saved a ft patch of 2 request(s)" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n{not json\n")
    cases = [
        (["--requests", str(bad)], "line 2 is not valid JSON"),
        (["--requests", str(tmp_path / "missing.json")], "No such file"),
        (["--prompt", "no placeholder", "--subject", "x", "--target-new", "y"], "exactly one '{}'"),
        (["--prompt", "{} is"], "missing ['--subject', '--target-new']"),
        ([*EIFFEL[:6], "--hparams", "{bad"], "--hparams is not valid JSON"),
        ([*EIFFEL[:6], "--model", str(tmp_path / "no-model")], "cannot load the model"),
        ([*EIFFEL[:6], "--model", "nobody/no-such-model"], "cannot load the model 'nobody/no-such-model'"),
    ]
    for args, message in cases:
        argv = ["edit", *(["--model", work.model] if "--model" not in args else []), *args, "-o", str(tmp_path / "x")]
        assert main(argv) == 2, args
        assert message in capsys.readouterr().err, args
    assert main(["edit", *EIFFEL, "--keep-ratio", "1.5", "-o", str(tmp_path / "x")]) == 2
    assert "must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_apply_saves_the_merged_model_and_generates(work, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["apply", work.patch, "--model", work.model, "--prompt", "the eiffel tower is located in the city of"]
    assert main([*argv, "--max-new-tokens", "2", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Attached 1 patch(es): patch" in text and "base:" in text and "patched:" in text
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(work.model)
    pm = hep.PatchedModel.from_pretrained(base, work.patch)
    for name, param in merged.state_dict().items():
        assert torch.equal(param, pm.base_model.state_dict()[name]), name
    record = json.loads((out / "hf_edit_patch_merged.json").read_text())
    assert record["patches"][0]["content_hash"] == pm.patches["default"].config.content_hash

    assert main(["apply", work.patch, "--model", work.model]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert main(["apply", str(tmp_path / "none"), "--model", work.model, "-o", str(out)]) == 2
    assert "neither an existing local folder nor a valid Hub repo id" in capsys.readouterr().err


def test_inspect_shows_the_patch_and_checks_fingerprints(work, capsys):
    assert main(["inspect", work.patch]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and any(f" {enc} " in text for enc in ("bitmask", "coo", "csr"))
    assert "editor:       ft" in text and "'the eiffel tower is located in the city of' -> 'rome'" in text

    assert main(["inspect", work.patch, "--json", "--model", work.model]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["provenance"]["editor"] == "ft" and info["nnz"] == sum(m["nnz"] for m in info["modules"])
    assert {c["status"] for c in info["fingerprint_check"]} == {"match"}

    other = str(work.root / "other-model")
    assert main(["inspect", work.patch, "--model", other]) == 1  # the check failed: exit 1
    text = capsys.readouterr().out
    assert ": differs" in text and "Fingerprint check failed" in text
    assert main(["inspect", str(work.root / "no-such-patch")]) == 2


@pytest.fixture(scope="module")
def evaluated(work):
    """`eval` of the patch with one general task on a two-example file, into PATCH/evaluation."""
    data = work.root / "tasks"
    data.mkdir()
    (data / "sst2_dev.tsv").write_text("sentence\tlabel\nit was a red river .\t1\nthe tower was big .\t0\n")
    argv = ["eval", work.patch, "--model", work.model, "--tasks", "sentiment", "--task-limit", "2"]
    assert main([*argv, "--task-data-dir", str(data)]) == 0
    return os.path.join(work.patch, "evaluation")


def test_eval_writes_results_plot_and_a_card_with_model_index(work, evaluated, capsys):
    assert sorted(os.listdir(evaluated)) == ["README.md", "eval.json", "scores.png"]
    with open(os.path.join(evaluated, "eval.json")) as f:
        results = json.load(f)
    assert set(results["editing"]["base"]) == {"reliability", "generalization", "locality"}
    assert results["editing"]["base"]["locality"] == 1.0  # the base model agrees with itself
    assert set(results["tasks"]["base"]) == set(results["tasks"]["patched"]) == {"sentiment"}
    card = ModelCard.load(os.path.join(evaluated, "README.md"))
    by_config = {(r.metric_type, r.metric_config): r.metric_value for r in card.data.eval_results}
    assert by_config[("reliability", "base")] == round(results["editing"]["base"]["reliability"], 4)
    assert by_config[("accuracy", "patched")] == round(results["tasks"]["patched"]["sentiment"], 4)
    assert "![Scores without and with the patch](scores.png)" in card.text

    assert main(["eval", work.patch, "--model", work.model, "--tasks", "chess"]) == 2
    assert "unknown task(s) ['chess']" in capsys.readouterr().err
    assert main(["eval", "user/some-patch", "--model", work.model]) == 2
    assert "give --output-dir" in capsys.readouterr().err


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class FakeApi:
    """`HfApi` at its boundary: records the calls and the exact files of the commit."""

    calls: list = []
    files: dict = {}

    def __init__(self, token=None):
        FakeApi.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        FakeApi.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
        FakeApi.files = {
            os.path.relpath(os.path.join(d, f), folder_path): _read(os.path.join(d, f))
            for d, _, files in os.walk(folder_path)
            for f in files
        }
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1", pr_url=None)


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls, FakeApi.files = [], {}
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub_push, "HfApi", FakeApi)

    def no_file(repo_id, filename, **kwargs):
        raise hub.EntryNotFoundError(f"{filename} not found")

    monkeypatch.setattr(hub, "hf_hub_download", no_file)
    return FakeApi


def test_push_sends_patch_evaluation_and_card_in_one_commit(work, evaluated, fake_api, tmp_path, capsys):
    argv = ["push", work.patch, "user/eiffel", "--private", "--revision", "dev", "--commit-message", "eiffel"]
    assert main([*argv, "--token", "tok", "--license", "mit"]) == 0
    assert "Pushed" in capsys.readouterr().out
    assert [c[0] for c in fake_api.calls if c[0] != "init"] == ["create_repo", "create_branch", "upload_folder"]
    create = dict(fake_api.calls)["create_repo"]
    assert create["repo_id"] == "user/eiffel" and create["private"] is True and create["token"] == "tok"
    upload = dict(fake_api.calls)["upload_folder"]
    assert upload["revision"] == "dev" and upload["commit_message"] == "eiffel" and upload["create_pr"] is False
    assert sorted(fake_api.files) == [
        "README.md", "evaluation/README.md", "evaluation/eval.json", "evaluation/scores.png", "patch_config.json",
        "patch_model.safetensors",
    ]  # fmt: skip
    assert fake_api.files["patch_model.safetensors"] == _read(os.path.join(work.patch, "patch_model.safetensors"))
    card = ModelCard(fake_api.files["README.md"].decode())
    assert card.data.license == "mit" and card.data.model_name == "user/eiffel"
    assert {r.metric_type for r in card.data.eval_results} >= {"reliability", "locality", "accuracy"}
    assert "(evaluation/scores.png)" in card.text and 'PatchedModel.from_pretrained(base, "user/eiffel")' in card.text

    assert main(["push", work.patch, "user/eiffel", "--dry-run", str(tmp_path / "staged")]) == 0
    assert "6 file(s) would be uploaded" in capsys.readouterr().out
    assert main(["push", str(tmp_path / "nothing"), "user/eiffel"]) == 2
    assert main(["push", work.patch, "user/eiffel", "--evaluation", str(tmp_path / "nothing")]) == 2


def test_stats_compute_list_push_and_pull(work, fake_api, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the eiffel tower is in paris .\nthe capital of japan is tokyo .\nrome is in italy .\n")
    cache = str(tmp_path / "stats")
    argv = ["stats", "compute", "--model", work.model, "--stats-dataset", str(corpus), "--cache-dir", cache]
    assert main([*argv, "--method", "memit", "--layers", "1", "2", "--samples", "3", "--max-length", "16"]) == 0
    assert "Key statistics of 2 module(s)" in capsys.readouterr().out
    assert main(["stats", "list", "--cache-dir", cache, "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["module"] for e in entries] == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    assert all(e["sample_count"] == 3 and e["max_length"] == 16 for e in entries)

    assert main(["stats", "push", "user/stats", "--cache-dir", cache, "--model", work.model]) == 0
    assert sorted(fake_api.files) == sorted(
        ["README.md", "index.json", *(os.path.basename(e["path"]) for e in entries)]
    )
    shared = tmp_path / "shared"  # what was uploaded, as a folder `stats pull` reads like a repo
    shared.mkdir()
    for name, data in fake_api.files.items():
        (shared / name).write_bytes(data)
    assert main(["stats", "pull", str(shared), "--cache-dir", str(tmp_path / "pulled")]) == 0
    assert "Loaded 2 statistics file(s)" in capsys.readouterr().out

    assert main(["stats", "compute", "--model", work.model, "--cache-dir", cache]) == 2
    assert "--stats-dataset" in capsys.readouterr().err
    assert main(["stats", "push", "user/stats", "--cache-dir", str(tmp_path / "empty")]) == 2
    assert main(["stats", "compute", "--model", work.model, "--stats-dataset", str(tmp_path / "nope.txt")]) == 2


def test_demo_runs_on_a_tiny_model(work, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_EDIT_PATCH_CACHE", str(tmp_path / "cache"))  # its key statistics are cached there
    argv = ["demo", "--model", work.model, "--output-dir", str(tmp_path / "demo"), "--stats-samples", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "bit-identical to the base model: True" in out and "weights identical to before saving: True" in out


def test_runtime_failures_exit_1_and_verbose_shows_the_traceback(work, monkeypatch, capsys):
    import hf_edit_patch.editing.entry

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(hf_edit_patch.editing.entry, "edit", broken)
    argv = ["edit", "--model", work.model, *EIFFEL, "-o", str(work.root / "never")]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip().endswith("error: RuntimeError: out of memory")
    assert main([*argv, "-vv"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_edit_with_a_searched_ratio_or_a_norm_budget(work, tmp_path):
    ft = ["--method", "ft", "--hparams", '{"num_steps": 5, "norm_constraint": 0.2, "lr": 0.02}']
    assert main(["edit", "--model", work.model, *EIFFEL, *ft, "--keep-ratio", "auto", "-o", str(tmp_path / "a")]) == 0
    auto = hep.EditPatch.from_pretrained(tmp_path / "a").config
    assert auto.keep_ratio == auto.editor_hparams["keep_ratio_auto"]["chosen"]
    assert main(["edit", "--model", work.model, *EIFFEL, *ft, "--norm-budget", "0.9", "-o", str(tmp_path / "n")]) == 0
    assert hep.EditPatch.from_pretrained(tmp_path / "n").config.regularizer_kwargs == {"norm_budget": 0.9}
    assert main(["edit", "--model", work.model, *EIFFEL, *ft, "--keep-ratio", "most", "-o", str(tmp_path / "x")]) == 2


def test_help_names_every_method_the_default_budget_and_the_command(capsys):
    from hf_edit_patch import editing
    from hf_edit_patch.cli import patches
    from hf_edit_patch.patch.stack_regularizers import registered_stack_regularizers

    assert set(patches.METHODS) == set(editing.METHODS)
    assert registered_stack_regularizers() == patches.STACK_REGULARIZERS
    assert patches.DEFAULT_KEEP_RATIO == editing.DEFAULT_KEEP_RATIO
    assert main(["edit", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "ROME, MEMIT, FT, AlphaEdit, knowledge neurons (KN) or a trained MEND editor" in text
    assert f"editing method: {', '.join(patches.METHODS)}" in text
    assert "(default: 0.4, the same as hf_edit_patch.edit)" in text and "--no-progress" in text
    assert main(["demo", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: hf-edit-patch demo ")
    assert main(["demo", "--no-such-option"]) == 2
    assert "usage: hf-edit-patch demo" in capsys.readouterr().err


def test_edit_keeps_forty_percent_by_default_as_the_library_does(work, tmp_path, capsys):
    ft = ["--method", "ft", "--hparams", '{"num_steps": 2}', "--no-progress"]
    assert main(["edit", "--model", work.model, *EIFFEL, *ft, "-o", str(tmp_path / "d")]) == 0
    config = hep.EditPatch.from_pretrained(tmp_path / "d").config
    assert config.regularizer == "rect" and config.keep_ratio == 0.4
    both = ["--keep-ratio", "0.4", "--norm-budget", "0.9"]
    assert main(["edit", "--model", work.model, *EIFFEL, *ft, *both, "-o", str(tmp_path / "x")]) == 2
    assert "give --keep-ratio or --norm-budget, not both" in capsys.readouterr().err


def test_statistics_errors_name_the_flags_of_the_command(work, tmp_path, capsys):
    argv = ["edit", "--model", work.model, *EIFFEL, "--method", "rome", "-o", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--stats-dataset wikitext" in err and "--stats-text-field passage" in err and "--model-sampled-stats" in err
    assert "allow_model_sampled" not in err and "text_field=" not in err
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"passage": "the eiffel tower is in paris ."}) + "\n")
    assert main([*argv, "--stats-dataset", str(corpus)]) == 2
    assert "has no field 'text'" in (err := capsys.readouterr().err) and "pass --stats-text-field passage" in err
    compute = ["stats", "compute", "--model", work.model, "--stats-dataset", str(corpus), "--cache-dir", str(tmp_path)]
    assert main(compute) == 2
    assert "pass --stats-text-field passage" in capsys.readouterr().err


def test_apply_checks_every_patch_before_loading_the_model(work, tmp_path, monkeypatch, capsys):
    from hf_edit_patch.cli import patches

    loads = []
    monkeypatch.setattr(patches, "load_model", lambda args: loads.append(args) or pytest.fail("model loaded"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(work.patch):
        if os.path.isfile(os.path.join(work.patch, name)):
            (broken / name).write_bytes(_read(os.path.join(work.patch, name)))
    (broken / "patch_config.json").write_text("{not json")
    for source, message in [(tmp_path / "none", "neither an existing local folder"), (broken, "patch_config.json")]:
        assert main(["apply", work.patch, str(source), "--model", work.model, "--prompt", "the tower"]) == 2
        assert message in capsys.readouterr().err
    assert loads == []


def test_apply_records_the_base_model_and_every_patch_and_writes_readable_files(work, tmp_path, capsys):
    out = tmp_path / "merged"
    with pytest.warns(UserWarning, match="differ from those the patch was computed on"):  # the second on the first
        assert main(["apply", work.patch, work.patch, "--model", work.model, "-o", str(out)]) == 0
    record = json.loads((out / "hf_edit_patch_merged.json").read_text())
    content_hash = hep.EditPatch.from_pretrained(work.patch).config.content_hash
    assert record["base_model"] == work.model and record["base_model_weights"] is None
    assert [(p["name"], p["source"], p["content_hash"]) for p in record["patches"]] == [
        ("patch", work.patch, content_hash),
        ("patch1", work.patch, content_hash),
    ]
    assert record["patches"][0]["editor"] == "ft" and record["patches"][0]["requests"] == 1
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~mask}, modes


def test_no_progress_hides_the_libraries_bars_only_while_the_command_runs():
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    from hf_edit_patch.cli.common import library_bars_off, show_progress

    before = (hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled())
    with library_bars_off(True):
        assert not hf_logging.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
    assert (hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()) == before
    assert show_progress(SimpleNamespace(no_progress=True)) is False
    assert show_progress(SimpleNamespace(no_progress=False)) is None


def test_edit_a_model_spread_by_a_device_map_with_a_layer_on_disk(work, tmp_path, capsys, caplog):
    layout = {f"model.layers.{i}": "cpu" for i in range(4)}
    layout.update({"model.layers.1": "disk", "model.embed_tokens": "cpu", "model.norm": "cpu"})
    layout.update({"model.rotary_emb": "cpu", "lm_head": "cpu"})
    (tmp_path / "map.json").write_text(json.dumps(layout))
    out, offload = tmp_path / "spread", tmp_path / "offload"
    spread = ["--device-map", f"@{tmp_path / 'map.json'}", "--offload-folder", str(offload)]
    argv = ["edit", "--model", work.model, *EIFFEL, *FT_FAST, *spread, "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    offloaded = [r.getMessage() for r in caplog.records if "offloaded to the" in r.getMessage()]
    assert offloaded and "disk" in offloaded[0]  # layer 1, the one FT edits, stayed on disk
    ours, reference = hep.EditPatch.from_pretrained(out), hep.EditPatch.from_pretrained(work.patch)
    assert ours.deltas.keys() == reference.deltas.keys()
    for name, delta in reference.deltas.items():
        assert torch.equal(ours.deltas[name].to_dense(), delta.to_dense()), name

    cases = [
        (["--device-map", ""], "--device-map is empty"),
        (["--device-map", "{bad"], "--device-map is not valid JSON"),
        (["--offload-folder", str(offload)], "offload_folder applies only with a device_map"),
        (["--device-map", "nowhere"], "cannot load the model"),
    ]
    for args, message in cases:
        argv = ["edit", "--model", work.model, *EIFFEL, *FT_FAST, *args, "-o", str(tmp_path / "x")]
        assert main(argv) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="either device='cpu'"):
        load_default_model(work.model, device="cpu", device_map="auto")


def test_edit_on_a_stack_records_it_as_parents_and_keeps_the_stack_bound(work, tmp_path, capsys):
    out = tmp_path / "on"
    bound = ["--stack-regularizer", "norm_anchor", "--stack-regularizer-kwargs", '{"alpha": 0.001}']
    assert main(["edit", "--model", work.model, *EIFFEL, *FT_FAST, "--on", work.patch, *bound, "-o", str(out)]) == 0
    assert "Editing on top of 1 patch(es): patch" in capsys.readouterr().out
    below, new = hep.EditPatch.from_pretrained(work.patch), hep.EditPatch.from_pretrained(out)
    assert [p["content_hash"] for p in new.config.parent_patches] == [below.config.content_hash]
    assert new.config.stack_regularizer == {"name": "norm_anchor", "alpha": 0.001}
    base = AutoModelForCausalLM.from_pretrained(work.model)
    module = "model.layers.1.mlp.down_proj"
    weight = base.get_submodule(module).weight.detach().clone()
    pm = hep.PatchedModel(base).add_patch(below, "below").add_patch(new, "new", strict=True)
    accumulated = float((pm.base_model.get_submodule(module).weight.detach() - weight).norm())
    assert 0 < accumulated <= 0.001 * float(weight.norm()) * 1.001  # the bound holds for the stack, not the patch
    assert float(below.deltas[module].to_dense().norm()) > 0.0015 * float(weight.norm())  # so the bound was binding

    cases = [
        (["--stack-regularizer-kwargs", '{"alpha": 0.1}'], "--stack-regularizer-kwargs needs --stack-regularizer"),
        (["--stack-regularizer", "prune", "--stack-regularizer-kwargs", '{"alpha": 0.1}'], "takes the settings"),
        (["--stack-regularizer", "svd"], "invalid choice"),
        (["--on", str(tmp_path / "no-such-patch")], "neither an existing local folder"),
    ]
    for args, message in cases:
        assert main(["edit", "--model", work.model, *EIFFEL, *FT_FAST, *args, "-o", str(tmp_path / "x")]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "x").exists()


def test_consolidate_saves_the_stack_with_the_run_as_one_patch(work, tmp_path, capsys):
    second = tmp_path / "second"
    assert main(["edit", "--model", work.model, *EIFFEL, *FT_FAST, "--on", work.patch, "-o", str(second)]) == 0
    out, pruned = tmp_path / "one", tmp_path / "pruned"
    assert main(["consolidate", work.patch, str(second), "--model", work.model, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Replaced 2 patch(es) (patch, second) by 'patch-second'" in text and "stack of 1 patch(es)" in text
    patches = [hep.EditPatch.from_pretrained(p) for p in (work.patch, second)]
    pm = hep.PatchedModel(AutoModelForCausalLM.from_pretrained(work.model))
    for name, patch in zip(("patch", "second"), patches, strict=True):
        pm.add_patch(patch, name)
    expected = pm.consolidate()
    saved = hep.PatchedModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work.model), out)
    assert saved.active_patches == ["patch-second"]
    ours = saved.patches["patch-second"]
    assert ours.config.content_hash == expected.config.content_hash  # the library's consolidation, exactly
    assert [c["content_hash"] for c in ours.config.consolidates] == [p.config.content_hash for p in patches]

    args = ["--regularizer", "prune", "--regularizer-kwargs", '{"threshold": 0.0001}', "--name", "c"]
    assert main(["consolidate", str(out), "--model", work.model, *args, "-o", str(pruned)]) == 0
    restrained = hep.PatchedModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work.model), pruned)
    assert restrained.active_patches == ["c"]
    assert restrained.patches["c"].config.stack_regularizer == {"name": "prune", "threshold": 0.0001}
    module = "model.layers.1.mlp.down_proj"
    whole, bounded = (p.deltas[module].to_dense() for p in (ours, restrained.patches["c"]))
    assert float(torch.linalg.matrix_norm(bounded, ord=2)) < float(torch.linalg.matrix_norm(whole, ord=2))

    cases = [
        (["--patches", "second", "third"], "--patches names ['third'], which the stack does not hold"),
        (["--regularizer-kwargs", '{"threshold": 1}'], "--regularizer-kwargs needs --regularizer"),
        (["--regularizer", "norm_anchor", "--regularizer-kwargs", '{"threshold": 1}'], "takes the settings"),
    ]
    for extra, message in cases:
        argv = ["consolidate", work.patch, str(second), "--model", work.model, *extra, "-o", str(tmp_path / "x")]
        assert main(argv) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "x").exists()
    assert main(["consolidate", str(out), "--model", work.model, "-o", str(out)]) == 2
    assert "is one of the patches read" in capsys.readouterr().err
    assert hep.PatchedModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work.model), out).active_patches == [
        "patch-second"
    ]


def test_inspect_a_stack_against_the_model_reports_its_accumulated_update(work, tmp_path, capsys):
    second = tmp_path / "second"
    assert main(["edit", "--model", work.model, *EIFFEL, *FT_FAST, "--on", work.patch, "-o", str(second)]) == 0
    base = AutoModelForCausalLM.from_pretrained(work.model)
    module = "model.layers.1.mlp.down_proj"
    weight = base.get_submodule(module).weight.detach().double().clone()
    pm = hep.PatchedModel(base)
    for name in ("patch", "second"):
        pm.add_patch(hep.EditPatch.from_pretrained(work.patch if name == "patch" else second), name)
    pm.save_pretrained(tmp_path / "stack")
    total = sum(p.deltas[module].to_dense(torch.float64) for p in pm.patches.values())
    capsys.readouterr()

    assert main(["inspect", str(tmp_path / "stack"), "--model", work.model, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    checks = [c["status"] for p in info["patches"] for c in p["fingerprint_check"]]
    assert checks == ["match", "match"]  # the second patch is checked on the weights with the first one attached
    assert list(info["accumulated"]) == [module]
    assert info["accumulated"][module]["rel_fro"] == pytest.approx(float(total.norm() / weight.norm()), rel=1e-5)
    assert main(["inspect", str(tmp_path / "stack"), "--model", work.model]) == 0
    text = capsys.readouterr().out
    assert "The stack's accumulated update ΣΔW against the model's weights W" in text and "‖ΣΔW‖/‖W‖" in text
    assert main(["inspect", str(tmp_path / "stack")]) == 0
    assert "ΣΔW" not in capsys.readouterr().out  # without --model there is no weight to measure against
    assert main(["inspect", str(tmp_path / "stack"), "--model", str(work.root / "other-model"), "--json"]) == 1
    out = capsys.readouterr()
    assert "accumulated" not in json.loads(out.out)  # computed on other weights: not measured
    assert "Fingerprint check failed" in out.err
