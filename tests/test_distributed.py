"""Several processes with torch.distributed (gloo on the CPU): key statistics, the eight tasks and the editing metrics
split over the processes give what one process gives.

The two-process runs start `torchrun` in a subprocess (this file is also the worker script it runs); both they and the
one-process reference use one thread, so that a batch is computed the same way everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import random_patch
from test_editors import REQ, WORDS, llama4, tiny_tokenizer

import hf_edit_patch as hep
from hf_edit_patch.distributed import current_processes, gather_owned, init_from_environment
from hf_edit_patch.editing.statistics import get_second_moments
from hf_edit_patch.errors import PatchError
from hf_edit_patch.evaluation import locality_reference, run_general_tasks, score_edits
from hf_edit_patch.evaluation.edit_runs import evaluate_edits
from hf_edit_patch.evaluation.tasks.prompts import TASKS
from hf_edit_patch.hub.stats_cache import StatsCache

ROOT = Path(__file__).resolve().parents[1]
SHARED_TASKS = ROOT.parent / "shared" / "data" / "tasks"
MODULES = ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
SHORT = {"reasoning": 6, "nli": 3, "open_qa": 4, "closed_qa": 3, "summarization": 6, "ner": 4, "sentiment": 3}
FEW_STEPS = {"v_num_grad_steps": 3, "n_context_templates": 0, "mom2_adjustment": False}
REQUESTS = [
    hep.EditRequest(
        prompt=REQ.prompt,
        subject=REQ.subject,
        target_new=REQ.target_new,
        target_true=REQ.target_true,
        paraphrases=["where is the eiffel tower ? it is in the city of"],
        neighborhood=["the louvre is located in the city of", "big ben is in the city of"],
    ),
    hep.EditRequest(
        prompt="the capital of {} is",
        subject="japan",
        target_new="berlin",
        target_true="tokyo",
        paraphrases=["which city is the capital of japan ? it is"],
        neighborhood=["the capital of france is"],
    ),
    hep.EditRequest(prompt="{} is in the country of", subject="the colosseum", target_new="france"),
]


def _corpus(path: Path, n: int = 24) -> Path:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 15, (n,), generator=gen)  # several lengths: batches of different widths
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=gen)) for k in lengths]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    env |= {
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_EDIT_PATCH_KERNELS": "reference",
        "CUDA_VISIBLE_DEVICES": "",
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def _run(processes: list[subprocess.Popen]) -> list[str]:
    """Waits for the processes; their standard outputs."""
    outputs = []
    for proc in processes:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{proc.args} failed:\n{out}\n{err[-4000:]}"
        outputs.append(out)
    return outputs


# ------------------------------------------------------------------------------------------------- one process


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process, destroyed after the test."""
    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        yield current_processes()
    finally:
        dist.destroy_process_group()


def test_distributed_without_a_process_group_says_how_to_start_one(tmp_path):
    tok = tiny_tokenizer()
    model = llama4(tok)
    with pytest.raises(
        PatchError, match=r"needs an initialized torch.distributed process group: launch with `torchrun"
    ):
        get_second_moments(model, tok, MODULES[:1], stats_dataset=str(_corpus(tmp_path / "c.txt")), distributed=True)
    assert init_from_environment() is None  # not launched by torchrun: nothing to start


def test_a_group_of_one_gives_what_no_group_gives(one_process_group, tmp_path):
    assert (one_process_group.rank, one_process_group.world) == (0, 1)
    assert gather_owned({0: "a", 1: "b"}, 2, one_process_group) == ["a", "b"]
    with pytest.raises(PatchError, match=r"no process computed item\(s\) \[2\] of 3"):
        gather_owned({0: "a", 1: "b"}, 3, one_process_group)
    tok = tiny_tokenizer()
    model = llama4(tok)
    corpus = str(_corpus(tmp_path / "c.txt"))
    options = {"stats_dataset": corpus, "sample_count": 24, "max_length": 16, "batch_size": 2, "model_id": "tiny"}
    alone = get_second_moments(model, tok, MODULES, cache=StatsCache(tmp_path / "a"), **options)
    grouped = get_second_moments(model, tok, MODULES, cache=StatsCache(tmp_path / "b"), distributed=True, **options)
    assert all(torch.equal(alone[m], grouped[m]) for m in MODULES)
    assert [e.key for e in StatsCache(tmp_path / "a").entries()] == [
        e.key for e in StatsCache(tmp_path / "b").entries()
    ]
    tasks = {"tasks": ["dialogue", "sentiment"], "data_dir": SHARED_TASKS, "limit": 2, "batch_size": 2}
    assert run_general_tasks(model, tok, **tasks, return_details=True, show_progress=False) == run_general_tasks(
        model, tok, **tasks, return_details=True, show_progress=False, distributed=True
    )


# ----------------------------------------------------------------------------------------------- two processes


def _cache_contents(folder: Path) -> dict[str, tuple[int, torch.Tensor]]:
    cache = StatsCache(folder)
    return {json.dumps(e.key.to_dict(), sort_keys=True): (e.count, cache.get(e.key)) for e in cache.entries()}


@pytest.mark.slow
def test_torchrun_stats_compute_equals_one_process(tmp_path):
    tok = tiny_tokenizer()
    model_dir = tmp_path / "model"
    llama4(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus = _corpus(tmp_path / "corpus.txt")
    command = [
        "-m",
        "hf_edit_patch.cli",
        "stats",
        "compute",
        "--no-progress",
        "--model",
        str(model_dir),
        "--stats-dataset",
        str(corpus),
        "--method",
        "memit",
        "--layers",
        "1",
        "2",
        "--samples",
        "24",
        "--max-length",
        "16",
        "--batch-size",
        "2",
        "--cache-dir",
    ]
    runs = [
        subprocess.Popen(
            [*launcher, *command, str(tmp_path / name)],
            cwd=tmp_path,
            env=_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for launcher, name in (([sys.executable], "one"), (_torchrun(2), "two"))
    ]
    alone, shared = _run(runs)
    assert "(2 processes)" in shared and "processes" not in alone  # rank 0 reports, once
    assert shared.count("Key statistics of 2 module(s)") == 1
    one, two = _cache_contents(tmp_path / "one"), _cache_contents(tmp_path / "two")
    assert len(one) == 2 and one.keys() == two.keys()  # the same cache keys
    for key, (count, matrix) in one.items():
        other_count, other = two[key]
        assert other_count == count
        # float64 sums of the same float32 batch products, added in another order: at most one float32 rounding apart
        scale = float(matrix.abs().max())
        torch.testing.assert_close(other, matrix, rtol=2**-23, atol=1e-12 * scale)


@pytest.mark.slow
def test_tasks_and_editing_metrics_over_two_processes_equal_one_process(tmp_path):
    proc = subprocess.Popen(
        [*_torchrun(2), __file__, str(tmp_path)],
        cwd=tmp_path,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _run([proc])
    results = torch.load(tmp_path / "results.pt", weights_only=False)
    for what in ("tasks", "scores", "evaluate_edits"):
        assert results["two"][what] == results["one"][what], what
    scores, details = results["two"]["tasks"]
    assert list(scores) == list(TASKS) and all(len(d) == 3 for d in details.values())


def _evaluation(model, tok, distributed: bool) -> dict:
    """The tasks, the metrics of a patch and an editing run, each split over the processes or not."""
    tasks = run_general_tasks(
        model,
        tok,
        TASKS,
        data_dir=SHARED_TASKS,
        limit=3,
        batch_size=2,
        max_new_tokens=SHORT,
        return_details=True,
        show_progress=False,
        distributed=distributed,
    )
    reference = locality_reference(model, tok, REQUESTS, batch_size=2, distributed=distributed)
    pm = hep.PatchedModel.from_pretrained(model, random_patch(model, MODULES, seed=3, scale=0.5))
    scores = score_edits(
        pm, tok, REQUESTS, reference=reference, batch_size=2, return_details=True, distributed=distributed
    )
    pm.unload()
    runs = evaluate_edits(
        model,
        tok,
        REQUESTS[:2],
        method="rome",
        hparams=FEW_STEPS,
        keep_ratio=0.5,
        eval_batch_size=2,
        return_details=True,
        show_progress=False,
        distributed=distributed,
    )
    return {"tasks": tasks, "scores": scores, "evaluate_edits": runs}


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    procs = init_from_environment()
    assert procs is not None and procs.world == 2
    tok = tiny_tokenizer()
    model = llama4(tok)
    two = _evaluation(model, tok, distributed=True)
    if procs.is_main:
        torch.save({"two": two, "one": _evaluation(model, tok, distributed=False)}, out / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
