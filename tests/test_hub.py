"""Hub ids go through huggingface_hub; tested at its boundary (no server accepts uploads here)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from conftest import LLAMA_TARGETS, assert_state_equal, snapshot
from helpers import random_patch

import hf_edit_patch as hep
from hf_edit_patch.hub import push as hub_push
from hf_edit_patch.hub import resolve as hub


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """`hf_hub_download` served from tmp_path/hub/<repo>/<revision>/<subfolder>/<file>; records each call."""
    root = tmp_path / "hub"
    calls = []

    def fake_download(repo_id, filename, subfolder=None, revision=None, **kwargs):
        calls.append(
            {"repo_id": repo_id, "filename": filename, "subfolder": subfolder, "revision": revision, **kwargs}
        )
        path = root / repo_id / (revision or "main") / (subfolder or "") / filename
        if not (root / repo_id).is_dir():
            response = SimpleNamespace(headers={}, status_code=404, url=f"https://hub.invalid/{repo_id}", request=None)
            raise hub.RepositoryNotFoundError(f"{repo_id} not found", response=response)
        if not path.is_file():
            raise hub.EntryNotFoundError(f"{filename} not found")
        return str(path)

    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    return root, calls


def test_hub_id_download_passes_options_and_loads(llama, fake_hub):
    root, calls = fake_hub
    patch = random_patch(llama, LLAMA_TARGETS)
    patch.save_pretrained(root / "user/edit-patch" / "v1" / "sub")
    loaded = hep.EditPatch.from_pretrained(
        "user/edit-patch", revision="v1", subfolder="sub", cache_dir="/c", token="t", local_files_only=False
    )
    assert all(loaded.deltas[n].equal(patch.deltas[n]) for n in patch.deltas)
    assert {c["filename"] for c in calls} == {"patch_config.json", "patch_model.safetensors"}
    assert all(
        c["revision"] == "v1" and c["subfolder"] == "sub" and c["cache_dir"] == "/c" and c["token"] == "t"
        for c in calls
    )


def test_patched_model_loads_a_stack_from_the_hub(llama, fake_hub, tmp_path):
    root, _ = fake_hub
    base = snapshot(llama)
    pm = hep.PatchedModel.from_pretrained(llama, random_patch(llama, LLAMA_TARGETS, seed=1), patch_name="a")
    pm.add_patch(random_patch(pm, LLAMA_TARGETS[:1], seed=2), "b")
    patched = snapshot(llama)
    pm.save_pretrained(root / "user/stack" / "main")
    pm.unload()
    pm2 = hep.PatchedModel.from_pretrained(llama, "user/stack")
    assert pm2.active_patches == ["a", "b"]
    assert_state_equal(llama, patched)
    pm2.unload()
    assert_state_equal(llama, base)


def test_missing_repo_and_missing_file_name_what_was_expected(llama, fake_hub):
    root, _ = fake_hub
    with pytest.raises(hep.PatchNotFoundError, match="'user/none' is not a local folder and no Hub repo"):
        hep.EditPatch.from_pretrained("user/none")
    os.makedirs(root / "user/empty" / "main")
    with pytest.raises(hep.PatchNotFoundError, match="'user/empty' has no file 'sub/patch_config.json'") as info:
        hep.EditPatch.from_pretrained("user/empty", subfolder="sub")
    assert isinstance(info.value.__cause__, hub.EntryNotFoundError)
    with pytest.raises(hep.PatchNotFoundError, match="patch_stack.json"):
        hep.PatchedModel.from_pretrained(llama, "user/empty")


def test_offline_without_cache_fails_fast_with_a_clear_message(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(hep.PatchNotFoundError, match=r"'patch_config.json'.*not in the local cache"):
        hep.EditPatch.from_pretrained("user/never-downloaded", cache_dir=tmp_path)


def test_invalid_id_that_is_no_folder_either(tmp_path):
    with pytest.raises(hep.PatchNotFoundError, match="neither an existing local folder nor a valid Hub repo id"):
        hep.EditPatch.from_pretrained(str(tmp_path / "no" / "such" / "folder"))


class FakeApi:
    def __init__(self):
        self.calls = []
        self.uploaded = None

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        self.uploaded = {
            os.path.relpath(os.path.join(d, f), folder_path) for d, _, files in os.walk(folder_path) for f in files
        }
        return "commit-info"


def test_push_creates_repo_and_uploads_one_commit(llama, monkeypatch):
    api = FakeApi()
    monkeypatch.setattr(hub_push, "HfApi", lambda token=None: api)
    patch = random_patch(llama, LLAMA_TARGETS)
    out = patch.push_to_hub("user/p", private=True, revision="dev", commit_message="add edit", token="tok")
    assert out == "commit-info"
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][2]["private"] is True and api.calls[0][2]["exist_ok"] is True
    upload = api.calls[2][2]
    assert upload["revision"] == "dev" and upload["commit_message"] == "add edit" and upload["create_pr"] is False
    assert api.uploaded == {"README.md", "patch_config.json", "patch_model.safetensors"}

    api2 = FakeApi()
    monkeypatch.setattr(hub_push, "HfApi", lambda token=None: api2)
    pm = hep.PatchedModel.from_pretrained(llama, patch)
    pm.push_to_hub("user/stack", create_pr=True)
    assert [c[0] for c in api2.calls] == ["create_repo", "upload_folder"]
    assert api2.uploaded == {
        "README.md",
        "patch_stack.json",
        "default/README.md",
        "default/patch_config.json",
        "default/patch_model.safetensors",
    }


def test_card_is_written_but_a_user_edited_card_is_kept(llama, tmp_path, caplog):
    patch = random_patch(llama, LLAMA_TARGETS)
    patch.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: hf-edit-patch\n") and "model-editing" in card and "rect" in card
    patch.save_pretrained(tmp_path)  # an unedited generated card is refreshed
    (tmp_path / "README.md").write_text(card.replace("# Edit patch", "# My notes"))
    patch.save_pretrained(tmp_path)
    assert "# My notes" in (tmp_path / "README.md").read_text()
    assert "Keeping the existing" in caplog.text
    patch.save_pretrained(tmp_path, overwrite_card=True)
    assert "# My notes" not in (tmp_path / "README.md").read_text()
