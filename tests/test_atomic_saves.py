"""Saves are atomic as a whole: a writer killed after any write, fsync or rename leaves the old content or the new one.

A child process saves new content over an old save and SIGKILLs itself right after its N-th `os.fsync`,
`os.replace` or `os.unlink`, for N = 1, 2, ... until a save runs to the end. After every kill the folder must load
exactly as the old content or the new one, and the next save must leave no temporary file or journal behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import hf_edit_patch as hep
from hf_edit_patch.hub.files import JOURNAL_NAME, atomic_write_files, committed_path

CHILD_PRELUDE = textwrap.dedent(
    """
    import os, signal, sys

    def kill_after(n):
        count = [0]
        def step(fn):
            def wrapped(*args, **kwargs):
                out = fn(*args, **kwargs)
                count[0] += 1
                if count[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
                return out
            return wrapped
        os.fsync, os.replace, os.unlink = step(os.fsync), step(os.replace), step(os.unlink)

    def tiny():
        import torch
        from torch import nn

        torch.manual_seed(0)
        m = nn.Module()
        m.fc, m.up = nn.Linear(48, 32), nn.Linear(32, 48)
        return m
    """
)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.fc, m.up = nn.Linear(48, 32), nn.Linear(32, 48)
    return m


def _patch(model: nn.Module, seed: int, targets=("fc", "up")) -> hep.EditPatch:
    gen = torch.Generator().manual_seed(seed)
    deltas = {t: torch.randn(model.get_submodule(t).weight.shape, generator=gen) for t in targets}
    return hep.EditPatch.from_deltas(deltas, model, keep_ratio=0.5, regularizer="rect")


def _same_patch(a: hep.EditPatch, b: hep.EditPatch) -> bool:
    return (
        a.config.content_hash == b.config.content_hash
        and all(
            torch.equal(a.deltas[n].indices, b.deltas[n].indices)
            and torch.equal(a.deltas[n].values, b.deltas[n].values)
            for n in a.deltas
        )
        and set(a.deltas) == set(b.deltas)
    )


def _leftovers(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name == JOURNAL_NAME]


def _kill_loop(tmp_path: Path, old: Path, child_code: str, check, resave) -> int:
    """Runs the child for N = 1, 2, ... over a fresh copy of `old`; returns how many kills were checked."""
    for n in range(1, 200):
        kills = n - 1
        target = tmp_path / f"kill{n}"
        shutil.copytree(old, target)
        code = CHILD_PRELUDE + textwrap.dedent(child_code).replace("TARGET", repr(str(target))).replace("STEP", str(n))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            check(target, finished=True)
            return kills
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        check(target, finished=False)
        resave(target)
        assert _leftovers(target) == [], f"after kill {n}, the next save left {_leftovers(target)}"
        check(target, finished=True)
    raise AssertionError("the save never finished")


@pytest.mark.slow  # ~12 child processes that each import torch
@pytest.mark.filterwarnings("ignore:the weights of")
def test_patch_save_killed_at_every_step_leaves_old_or_new(tmp_path):
    model = _tiny()
    old, new = _patch(model, 1), _patch(model, 2)
    old.save_pretrained(tmp_path / "old")
    new.save_pretrained(tmp_path / "new")
    seen = set()

    def check(target, finished):
        got = hep.EditPatch.from_pretrained(target)
        is_new = _same_patch(got, new)
        assert is_new or (not finished and _same_patch(got, old)), "loads as neither the old nor the new patch"
        seen.add(is_new)

    child = f"""
        from hf_edit_patch.patch.edit_patch import EditPatch
        patch = EditPatch.from_pretrained({str(tmp_path / "new")!r})
        kill_after(STEP)
        patch.save_pretrained(TARGET)
    """
    kills = _kill_loop(tmp_path, tmp_path / "old", child, check, lambda t: new.save_pretrained(t))
    assert kills >= 8  # three files written and fsynced, a journal, three renames, ...
    assert seen == {False, True}  # kills before the commit point kept the old patch, later ones gave the new


@pytest.mark.slow  # ~20 child processes that each import torch
@pytest.mark.filterwarnings("ignore:the weights of")
def test_stack_save_killed_at_every_step_leaves_old_or_new(tmp_path):
    model = _tiny()
    a, b, a2, c = (
        _patch(model, s, targets) for s, targets in [(1, ("fc",)), (2, ("up",)), (3, ("fc",)), (4, ("up",))]
    )
    hep.PatchedModel(_tiny()).add_patch(a, "a").add_patch(b, "b").save_pretrained(tmp_path / "old")
    new_pm = hep.PatchedModel(_tiny()).add_patch(a2, "a").add_patch(c, "c")
    new_pm.save_pretrained(tmp_path / "new")
    expected = {"old": {"a": a, "b": b}, "new": {"a": a2, "c": c}}

    def check(target, finished):
        pm = hep.PatchedModel.from_pretrained(_tiny(), target)
        matches = [
            k
            for k, want in expected.items()
            if pm.active_patches == list(want) and all(_same_patch(pm.patches[n], want[n]) for n in want)
        ]
        assert matches == ["new"] or (not finished and matches == ["old"]), f"loads as {pm.active_patches}"

    child = f"""
        from hf_edit_patch.patched_model import PatchedModel
        pm = PatchedModel.from_pretrained(tiny(), {str(tmp_path / "new")!r})
        kill_after(STEP)
        pm.save_pretrained(TARGET)
    """
    kills = _kill_loop(tmp_path, tmp_path / "old", child, check, lambda t: new_pm.save_pretrained(t))
    assert kills >= 15


def test_a_set_of_files_in_nested_folders_is_replaced_whole(tmp_path):
    old = tmp_path / "old"
    files = {"x.json": "old x", "sub/y.bin": "old y", "sub/deeper/z.txt": "old z"}
    for rel, text in files.items():
        (old / rel).parent.mkdir(parents=True, exist_ok=True)
        (old / rel).write_text(text)

    def read(target):
        return {rel: Path(committed_path(target, rel)).read_text() for rel in files}

    def check(target, finished):
        got = read(target)
        assert got == {r: "new" + t[3:] for r, t in files.items()} or (not finished and got == files), (
            f"a mixed set: {got}"
        )

    def resave(target):
        atomic_write_files({str(target / r): "new" + t[3:] for r, t in files.items()})

    child = f"""
        from hf_edit_patch.hub.files import atomic_write_files
        files = {files!r}
        kill_after(STEP)
        atomic_write_files({{os.path.join(TARGET, r): "new" + t[3:] for r, t in files.items()}})
    """
    assert _kill_loop(tmp_path, old, child, check, resave) >= 10


def test_a_damaged_journal_is_a_format_error_naming_it(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    (tmp_path / JOURNAL_NAME).write_text(json.dumps({"renames": [["../../etc/passwd", "x.json"]]}))
    with pytest.raises(hep.PatchFormatError, match="renames"):
        committed_path(tmp_path, "x.json")


def test_temporary_files_of_running_writers_are_kept(tmp_path):
    mine = tmp_path / f".x.json.pid{os.getpid()}.abc.tmp"
    dead = tmp_path / ".x.json.pid999999999.abc.tmp"
    mine.write_text("in progress")
    dead.write_text("left by a killed writer")
    atomic_write_files({str(tmp_path / "x.json"): "{}"})
    assert mine.exists() and not dead.exists()
