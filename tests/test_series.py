"""A stack as a series on the Hub: one manifest with content hashes, one card listing every edit, loading at a
revision, and appending one patch as one commit on top of the commit that was read."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import httpx
import pytest
from conftest import LLAMA_TARGETS, assert_state_equal, make_llama, snapshot
from helpers import random_patch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError

import hf_edit_patch as hep
from hf_edit_patch.errors import PatchError, PatchFormatError
from hf_edit_patch.hub import commits as hub_commits
from hf_edit_patch.hub import push as hub_push
from hf_edit_patch.hub import resolve as hub
from hf_edit_patch.hub.cards import card_with_marker
from hf_edit_patch.hub.commits import SeriesChangedError, snapshot_commit

try:  # the local Hub server of the download tests (olah serving git repositories), when it can run here
    from test_hub_download import _api_factory, _git, hub_server, online  # noqa: F401  (fixtures)
except pytest.skip.Exception:
    online = None

DOWN0 = LLAMA_TARGETS[0]


def edit_patch(model, seed, subject, target):
    patch = random_patch(model, LLAMA_TARGETS[: 1 + seed % 3], seed=seed)
    req = hep.EditRequest(prompt="{} is located in the city of", subject=subject, target_new=target)
    patch.config.requests = [req.to_dict()]
    return patch


def series(model, n):
    pm = hep.PatchedModel(model)
    for i in range(n):
        pm.add_patch(edit_patch(pm, i, f"Landmark {i}", f"City {i}"), f"e{i}")
    return pm


def test_a_saved_stack_has_one_card_listing_every_edit_and_a_manifest_with_hashes(tmp_path):
    model = make_llama()
    pm = series(model, 3)
    pm.save_pretrained(tmp_path / "s", license="mit")
    manifest = json.loads((tmp_path / "s" / "patch_stack.json").read_text())
    assert manifest == {
        "patches": ["e0", "e1", "e2"],
        "content_hashes": [pm.patches[n].config.content_hash for n in ("e0", "e1", "e2")],
    }
    card = ModelCard.load(tmp_path / "s" / "README.md")
    assert card.data.library_name == "hf-edit-patch" and card.data.license == "mit"
    assert "patch-series" in card.data.tags
    for i in range(3):
        assert f"| {i + 1} | `e{i}` | **Landmark {i}** is located in the city of | City {i} |" in card.text
    assert "3 knowledge edits" in card.text and "append=True" in card.text
    (tmp_path / "s" / "README.md").write_text("# my notes\n")
    pm.save_pretrained(tmp_path / "s")
    assert (tmp_path / "s" / "README.md").read_text() == "# my notes\n"  # a card a person edited is kept
    pm.unload()


def test_loading_checks_each_patch_against_the_manifest(tmp_path):
    model = make_llama()
    pm = series(model, 2)
    pm.save_pretrained(tmp_path / "s")
    pm.unload()
    path = tmp_path / "s" / "patch_stack.json"
    manifest = json.loads(path.read_text())
    manifest["content_hashes"][1] = manifest["content_hashes"][0]
    path.write_text(json.dumps(manifest))
    base = snapshot(model)
    with pytest.raises(PatchFormatError, match=r"patch 'e1' of .* has content hash .* but the manifest lists"):
        hep.PatchedModel.from_pretrained(model, tmp_path / "s")
    assert_state_equal(model, base)
    manifest["content_hashes"] = manifest["content_hashes"][:1]
    path.write_text(json.dumps(manifest))
    with pytest.raises(PatchFormatError, match="2 patch names but 1 content_hashes"):
        hep.PatchedModel.from_pretrained(model, tmp_path / "s")
    del manifest["content_hashes"]  # a manifest written before hashes were recorded still loads
    path.write_text(json.dumps(manifest))
    assert hep.PatchedModel.from_pretrained(model, tmp_path / "s").active_patches == ["e0", "e1"]


class FakeRemote:
    """A Hub repo at the `HfApi` boundary: commits are folders, `create_commit` checks its parent like the Hub."""

    def __init__(self, root):
        self.root = root
        self.commits: list[str] = []
        self.calls: list[tuple[str, dict]] = []

    def folder(self, commit):
        return self.root / commit

    def add_commit(self, files_from=None):
        commit = f"{len(self.commits) + 1:040x}"
        target = self.folder(commit)
        if self.commits:
            shutil.copytree(self.folder(self.commits[-1]), target)
        target.mkdir(parents=True, exist_ok=True)
        if files_from is not None:
            shutil.copytree(files_from, target, dirs_exist_ok=True)
        self.commits.append(commit)
        return commit

    # the HfApi methods hf_edit_patch calls
    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", kwargs))
        if not self.commits:
            self.add_commit()

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def repo_info(self, repo_id, revision=None, **kwargs):
        return SimpleNamespace(sha=self.commits[-1])

    def create_commit(self, repo_id, operations, *, commit_message, parent_commit=None, **kwargs):
        self.calls.append(("create_commit", {"operations": operations, "parent_commit": parent_commit, **kwargs}))
        if parent_commit != self.commits[-1]:
            request = httpx.Request("POST", "https://hub.invalid/commit")
            raise HfHubHTTPError("412 precondition failed", response=httpx.Response(412, request=request))
        new = self.add_commit()
        for op in operations:
            dst = self.folder(new) / op.path_in_repo
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, dst)
        return SimpleNamespace(oid=new, message=commit_message)

    def download(self, repo_id, filename, subfolder=None, revision=None, **kwargs):
        path = self.folder(revision or self.commits[-1]) / (subfolder or "") / filename
        if not path.is_file():
            raise hub.EntryNotFoundError(f"{filename} not found")
        return str(path)


@pytest.fixture
def remote(tmp_path, monkeypatch):
    fake = FakeRemote(tmp_path / "remote")
    monkeypatch.setattr(hub_commits, "HfApi", lambda token=None: fake)
    monkeypatch.setattr(hub, "hf_hub_download", fake.download)
    return fake


def test_appending_one_patch_is_one_commit_on_top_of_the_series_read(remote, tmp_path):
    model = make_llama()
    pm = series(model, 2)
    first = pm.push_to_hub("user/series", append=True)  # no series there yet: the whole stack
    assert first.oid == remote.commits[-1]
    pm.add_patch(edit_patch(pm, 7, "Big Ben", "Oslo"), "e2")
    info = pm.push_to_hub("user/series", append=True, commit_message="add e2")
    commit = remote.calls[-1][1]
    assert commit["parent_commit"] == first.oid and info.message == "add e2"
    assert sorted(op.path_in_repo for op in commit["operations"]) == [
        "README.md", "e2/README.md", "e2/patch_config.json", "e2/patch_model.safetensors", "patch_stack.json"
    ]  # fmt: skip
    head = remote.folder(info.oid)
    assert json.loads((head / "patch_stack.json").read_text())["patches"] == ["e0", "e1", "e2"]
    assert "**Big Ben** is located in the city of | Oslo" in (head / "README.md").read_text()
    stacked = snapshot(model)
    pm.unload()

    again = hep.PatchedModel.from_pretrained(model, "user/series")
    assert again.active_patches == ["e0", "e1", "e2"]
    assert_state_equal(model, stacked)
    assert again.push_to_hub("user/series", append=True) is None  # nothing new: no commit
    assert [c[0] for c in remote.calls].count("create_commit") == 2
    again.unload()
    before = hep.PatchedModel.from_pretrained(model, "user/series", revision=first.oid)  # the series as it was
    assert before.active_patches == ["e0", "e1"]
    before.unload()


def test_appending_refuses_a_series_that_is_not_the_start_of_the_stack(remote):
    model = make_llama()
    pm = series(model, 2)
    pm.push_to_hub("user/series", append=True)
    pm.unload()
    other = hep.PatchedModel(model)
    other.add_patch(edit_patch(other, 5, "Landmark 0", "Elsewhere"), "e0")
    with pytest.raises(PatchError, match=r"holds the series \['e0', 'e1'\], which is not the start of this stack"):
        other.push_to_hub("user/series", append=True)
    other.unload()


def test_a_concurrent_push_makes_the_append_fail_instead_of_overwriting(remote, monkeypatch):
    model = make_llama()
    pm = series(model, 1)
    pm.push_to_hub("user/series", append=True)
    pm.add_patch(edit_patch(pm, 3, "Big Ben", "Oslo"), "e1")
    read = hub_commits.head_commit

    def someone_pushes_meanwhile(*args, **kwargs):
        sha = read(*args, **kwargs)
        remote.add_commit()
        return sha

    monkeypatch.setattr("hf_edit_patch.patched_model.persistence.head_commit", someone_pushes_meanwhile)
    with pytest.raises(SeriesChangedError, match="changed after it was read"):
        pm.push_to_hub("user/series", append=True)
    pm.unload()


def test_an_edited_card_on_the_hub_is_kept_when_appending(remote):
    model = make_llama()
    pm = series(model, 1)
    pm.push_to_hub("user/series", append=True)
    head = remote.folder(remote.commits[-1])
    (head / "README.md").write_text("# our own card\n")
    pm.add_patch(edit_patch(pm, 4, "Big Ben", "Oslo"), "e1")
    pm.push_to_hub("user/series", append=True)
    ops = {op.path_in_repo for op in remote.calls[-1][1]["operations"]}
    assert "README.md" not in ops and "patch_stack.json" in ops
    assert (remote.folder(remote.commits[-1]) / "README.md").read_text() == "# our own card\n"
    (remote.folder(remote.commits[-1]) / "README.md").write_text(card_with_marker("# generated"))
    pm.add_patch(edit_patch(pm, 5, "The Louvre", "Madrid"), "e2")
    pm.push_to_hub("user/series", append=True)  # a generated card nobody edited is brought up to date
    assert "**The Louvre**" in (remote.folder(remote.commits[-1]) / "README.md").read_text()
    pm.unload()


def test_a_whole_push_uploads_the_card_and_manifest(monkeypatch):
    uploaded = {}

    class Api:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            pass

        def upload_folder(self, *, folder_path, **kwargs):
            uploaded.update({os.path.relpath(os.path.join(d, f), folder_path): kwargs for d, _, fs in
                             os.walk(folder_path) for f in fs})  # fmt: skip
            return "commit"

    monkeypatch.setattr(hub_push, "HfApi", Api)
    model = make_llama()
    pm = series(model, 2)
    assert pm.push_to_hub("user/series") == "commit"
    assert sorted(uploaded) == [
        "README.md", "e0/README.md", "e0/patch_config.json", "e0/patch_model.safetensors", "e1/README.md",
        "e1/patch_config.json", "e1/patch_model.safetensors", "patch_stack.json",
    ]  # fmt: skip
    pm.unload()


def test_snapshot_commit_reads_the_cache_layout():
    sha = "a" * 40
    assert snapshot_commit(f"/c/models--u--s/snapshots/{sha}/e0/patch_config.json") == sha
    assert snapshot_commit("/data/snapshots/main/patch_stack.json") is None
    assert snapshot_commit("out/series/patch_stack.json") is None


def _olah_api(server):
    """`HfApi` for the local server, with `create_commit` committing into its git repos as the Hub would."""
    base = type(_api_factory(server)())

    class Api(base):
        def create_commit(self, repo_id, operations, *, commit_message, revision=None, parent_commit=None, **_):
            path, branch = server.api.repo(repo_id), revision or "main"
            if parent_commit is not None and _git(path, "rev-parse", branch) != parent_commit:
                request = httpx.Request("POST", f"{server.url}/api/models/{repo_id}/commit/{branch}")
                raise HfHubHTTPError("412", response=httpx.Response(412, request=request))
            _git(path, "checkout", "-q", branch)
            for op in operations:
                (path / op.path_in_repo).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(op.path_or_fileobj, path / op.path_in_repo)
            _git(path, "add", "-A")
            _git(path, "commit", "-q", "-m", commit_message)
            oid = _git(path, "rev-parse", "HEAD")
            _git(path, "checkout", "-q", "main")
            return SimpleNamespace(oid=oid)

    return lambda token=None: Api(token=token)


@pytest.mark.skipif(online is None, reason="the local Hub server needs olah and git")
def test_a_series_grows_over_http_and_loads_at_each_revision(online, hub_server, monkeypatch):
    monkeypatch.setattr(hub_commits, "HfApi", _olah_api(hub_server))
    model = make_llama()
    base = snapshot(model)
    pm = series(model, 2)
    two = snapshot(model)
    first = pm.push_to_hub("user/olah-series")
    pm.add_patch(edit_patch(pm, 4, "Big Ben", "Oslo"), "e2")
    three = snapshot(model)
    second = pm.push_to_hub("user/olah-series", append=True)
    assert len(hub_server.api.commits) == 1  # the append is a commit of its own, not a folder upload
    pm.unload()

    loaded = hep.PatchedModel.from_pretrained(model, "user/olah-series", cache_dir=online)
    assert loaded.active_patches == ["e0", "e1", "e2"]
    assert_state_equal(model, three)
    loaded.unload()
    snapshots = online / "models--user--olah-series" / "snapshots"
    assert (snapshots / second.oid / "e0" / "patch_config.json").is_file()  # every file read from one commit
    older = hep.PatchedModel.from_pretrained(model, "user/olah-series", revision=first.oid, cache_dir=online)
    assert older.active_patches == ["e0", "e1"]
    assert_state_equal(model, two)
    older.unload()
    assert_state_equal(model, base)
