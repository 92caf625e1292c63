"""Real HTTP downloads through huggingface_hub from a local Hub-compatible server.

The PyPI package `olah` serves local git repositories as a read-only Hub endpoint (its "mirrors" in offline mode).
A module-scoped fixture starts it on a free loopback port and stops it after the tests. No local server accepts
uploads, so pushes go through `GitHubApi`, a stand-in for `HfApi` that commits what `upload_folder` would send into
the git repos olah serves: everything on the download side (`hf_hub_download`, the cache, revisions, subfolders,
`HF_ENDPOINT`, offline mode, error messages) is the real thing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import LLAMA_TARGETS, assert_state_equal, make_llama, snapshot
from helpers import random_patch

import hf_edit_patch as hep
from hf_edit_patch.editing.statistics import get_second_moments
from hf_edit_patch.hub import push as hub_push
from hf_edit_patch.hub import resolve as hub
from hf_edit_patch.hub.stats_cache import StatsCache
from hf_edit_patch.hub.stats_sharing import load_stats_from_hub, push_stats_to_hub

pytest.importorskip("olah", reason="the local Hub server needs the `olah` package (pip install olah)")
if shutil.which("git") is None:
    pytest.skip("olah serves git repositories: the `git` command is needed", allow_module_level=True)

GIT = ["git", "-c", "user.name=hf-edit-patch tests", "-c", "user.email=tests@invalid", "-c", "commit.gpgsign=false"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and avoids contention with anything else running."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True)
    return out.stdout.strip()


class GitHubApi:
    """The upload side of `HfApi` (create_repo, create_branch, upload_folder), committing into olah's git repos."""

    def __init__(self, mirrors: Path, url: str) -> None:
        self.mirrors, self.url = mirrors, url
        self.commits: list[dict] = []

    def repo(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def create_repo(self, repo_id, *, private=None, exist_ok=False, token=None, **_):
        path = self.repo(repo_id)
        if path.is_dir():
            assert exist_ok
            return SimpleNamespace(repo_id=repo_id)
        path.mkdir(parents=True)
        _git(path, "init", "-q", "-b", "main")
        (path / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
        _git(path, "add", "-A")
        _git(path, "commit", "-q", "-m", "initial commit")  # as the Hub does: a new repo has one commit
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, *, branch, exist_ok=False, token=None, **_):
        if branch not in _git(self.repo(repo_id), "branch", "--list", branch):
            _git(self.repo(repo_id), "branch", branch, "main")

    def upload_folder(self, *, repo_id, folder_path, commit_message, revision=None, create_pr=False, token=None, **_):
        assert not create_pr, "the git stand-in commits to branches only"
        path = self.repo(repo_id)
        _git(path, "checkout", "-q", revision or "main")
        shutil.copytree(folder_path, path, dirs_exist_ok=True)
        _git(path, "add", "-A")
        _git(path, "commit", "-q", "--allow-empty", "-m", commit_message)
        oid = _git(path, "rev-parse", "HEAD")
        _git(path, "checkout", "-q", "main")
        self.commits.append({"repo_id": repo_id, "revision": revision, "message": commit_message, "oid": oid})
        return SimpleNamespace(oid=oid, commit_url=f"{self.url}/{repo_id}/commit/{oid}", pr_url=None)


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory):
    """olah serving `<root>/mirrors/models/<org>/<name>` git repos at http://127.0.0.1:<port>, offline."""
    root = tmp_path_factory.mktemp("olah")
    mirrors = root / "mirrors"
    (mirrors / "models").mkdir(parents=True)
    port = _free_port()
    config = root / "olah.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f"repos-path = {json.dumps(str(root / 'cache'))}\nmirrors-path = [{json.dumps(str(mirrors))}]\n"
        "metadata-cache-ttl = 0\n"
        "[accessibility]\noffline = true\n"
    )
    log = open(root / "server.log", "wb")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [sys.executable, "-m", "olah.server", "-c", str(config), "--log-path", str(root / "logs")],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/models/none/none/revision/main", timeout=2)
            break
        except urllib.error.HTTPError:  # any HTTP answer: the server is up
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.close()
                pytest.fail(f"olah did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
    yield SimpleNamespace(url=url, mirrors=mirrors, api=GitHubApi(mirrors, url))
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture
def online(hub_server, monkeypatch, tmp_path):
    """huggingface_hub pointed at the local server (it reads HF_ENDPOINT and HF_HUB_OFFLINE at import, so its
    constants are set too); pushes go through `GitHubApi`. Returns the cache folder to pass as `cache_dir`."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")  # never send a real token to the test server
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HfApi", _api_factory(hub_server))
    monkeypatch.setattr(hub_push, "HfApi", _api_factory(hub_server))
    return tmp_path / "hf-cache"


def _api_factory(server):
    """`HfApi(...)` as hf_edit_patch.hub.resolve calls it: downloads and metadata from the client, uploads via git."""
    from huggingface_hub import HfApi

    class Api(HfApi):
        def create_repo(self, repo_id, **kwargs):
            return server.api.create_repo(repo_id, **kwargs)

        def create_branch(self, repo_id, **kwargs):
            return server.api.create_branch(repo_id, **kwargs)

        def upload_folder(self, **kwargs):
            return server.api.upload_folder(**kwargs)

    return lambda token=None: Api(token=token)


def go_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_push_then_download_over_http_gives_the_same_patch(online, hub_server, llama, monkeypatch):
    patch = random_patch(llama, LLAMA_TARGETS)
    info = patch.push_to_hub("user/eiffel", commit_message="add the eiffel edit")
    assert hub_server.api.commits[-1] == {
        "repo_id": "user/eiffel", "revision": None, "message": "add the eiffel edit", "oid": info.oid
    }  # fmt: skip
    loaded = hep.EditPatch.from_pretrained("user/eiffel", cache_dir=online)
    assert loaded.config.content_hash == patch.config.content_hash
    assert all(loaded.deltas[n].equal(patch.deltas[n]) for n in patch.deltas)
    snapshot_dir = online / "models--user--eiffel" / "snapshots" / info.oid
    assert {p.name for p in snapshot_dir.iterdir()} == {"patch_config.json", "patch_model.safetensors"}

    go_offline(monkeypatch)  # from the cache now: no request reaches the server
    again = hep.EditPatch.from_pretrained("user/eiffel", cache_dir=online)
    assert again.config.content_hash == patch.config.content_hash
    with pytest.raises(hep.PatchNotFoundError, match="not in the local cache"):
        hep.EditPatch.from_pretrained("user/eiffel", cache_dir=online / "elsewhere")


def test_revision_and_subfolder_select_what_is_downloaded(online, hub_server, llama):
    first = random_patch(llama, LLAMA_TARGETS, seed=1)
    second = random_patch(llama, LLAMA_TARGETS[:1], seed=2)
    api = hub.HfApi()
    api.create_repo("user/versions", exist_ok=True)
    hub_push.push_folder(lambda d: first.save_pretrained(os.path.join(d, "sub")), "user/versions")
    hub_push.push_folder(
        lambda d: second.save_pretrained(os.path.join(d, "sub")), "user/versions", hub_push.PushOptions(revision="v2")
    )
    main = hep.EditPatch.from_pretrained("user/versions", subfolder="sub", cache_dir=online)
    v2 = hep.EditPatch.from_pretrained("user/versions", subfolder="sub", revision="v2", cache_dir=online)
    assert main.config.content_hash == first.config.content_hash
    assert v2.config.content_hash == second.config.content_hash
    pm = hep.PatchedModel.from_pretrained(llama, "user/versions", subfolder="sub", revision="v2", cache_dir=online)
    assert pm.patches["default"].config.content_hash == second.config.content_hash
    pm.unload()


def test_a_stack_downloads_and_then_loads_from_the_cache_alone(online, llama, monkeypatch):
    base = snapshot(llama)
    pm = hep.PatchedModel.from_pretrained(llama, random_patch(llama, LLAMA_TARGETS, seed=3), patch_name="a")
    pm.add_patch(random_patch(pm, LLAMA_TARGETS[1:], seed=4), "b")
    patched = snapshot(llama)
    pm.push_to_hub("user/stack")
    pm.unload()

    pm = hep.PatchedModel.from_pretrained(llama, "user/stack", cache_dir=online)
    assert pm.active_patches == ["a", "b"]
    assert_state_equal(llama, patched)
    pm.unload()
    go_offline(monkeypatch)  # the stack has no patch_config.json at its root: the cache must know that too
    pm = hep.PatchedModel.from_pretrained(llama, "user/stack", cache_dir=online, local_files_only=True)
    assert pm.active_patches == ["a", "b"]
    pm.unload()
    assert_state_equal(llama, base)


def test_errors_name_the_repo_and_the_missing_file(online, hub_server):
    hub.HfApi().create_repo("user/empty")
    with pytest.raises(hep.PatchNotFoundError, match=r"the Hub repo 'user/empty' has no file 'patch_config.json'"):
        hep.EditPatch.from_pretrained("user/empty", cache_dir=online)
    with pytest.raises(hep.PatchNotFoundError, match=r"'user/empty' has no file 'sub/patch_config.json'") as info:
        hep.EditPatch.from_pretrained("user/empty", subfolder="sub", cache_dir=online)
    assert isinstance(info.value.__cause__, hub.RepositoryNotFoundError | hub.EntryNotFoundError)
    with pytest.raises(hep.PatchNotFoundError, match=r"revision 'v9' does not exist in the Hub repo 'user/empty'"):
        hep.EditPatch.from_pretrained("user/empty", revision="v9", cache_dir=online)
    with pytest.raises(hep.PatchNotFoundError, match=r"'patch_config.json'.*'user/none' is not a local folder and no"):
        hep.EditPatch.from_pretrained("user/none", cache_dir=online)
    with pytest.raises(hep.PatchNotFoundError, match=r"'user/empty' has neither patch_config.json .* nor patch_stack"):
        hep.PatchedModel.from_pretrained(make_llama(), "user/empty", cache_dir=online)


def test_key_statistics_round_trip_through_the_server(online, tmp_path):
    from test_editors import tiny_tokenizer

    tok = tiny_tokenizer()
    model = make_llama()  # its 64-token vocabulary covers the tiny tokenizer's
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the eiffel tower is in paris .\nthe capital of japan is tokyo .\n")
    cache = StatsCache(tmp_path / "stats")
    modules = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    moments = get_second_moments(
        model, tok, modules, stats_dataset=corpus, sample_count=2, max_length=16, cache=cache, model_id="tiny/llama"
    )
    push_stats_to_hub(cache, cache.entries(), "user/stats")
    other = StatsCache(tmp_path / "other")
    entries = load_stats_from_hub("user/stats", cache=other)
    assert sorted(e.key.module for e in entries) == modules
    for e in entries:
        assert torch.equal(other.get(e.key), moments[e.key.module])


def test_the_command_line_reads_hf_endpoint_from_the_environment(online, hub_server, llama, tmp_path):
    """No monkeypatching in the child: HF_ENDPOINT and HF_HUB_OFFLINE=0 in its environment are all it gets."""
    random_patch(llama, LLAMA_TARGETS).push_to_hub("user/cli-patch")
    env = {**os.environ, "HF_ENDPOINT": hub_server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "c")}
    env["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
    run = subprocess.run(
        [sys.executable, "-m", "hf_edit_patch.cli", "inspect", "user/cli-patch", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert [m["name"] for m in info["modules"]] == list(LLAMA_TARGETS)
    assert (tmp_path / "c" / "models--user--cli-patch").is_dir()
    missing = subprocess.run(
        [sys.executable, "-m", "hf_edit_patch.cli", "inspect", "user/not-there"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 2
    assert "'patch_config.json'" in missing.stderr and "'user/not-there'" in missing.stderr
