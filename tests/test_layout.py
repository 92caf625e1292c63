"""The package's layout keeps its promises: one-way imports between layers, no cycles, no borrowed private names,
no module too long to read in one sitting, and nothing at the repository root that shadows an installed package.

Imports are read from the source (every `import` and `from ... import`, inside functions too; only
`if TYPE_CHECKING:` blocks are skipped, since they never run).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_edit_patch"
MAX_LINES = 600

# layer -> the layers it must never import (a module's layer is its first folder under hf_edit_patch/, or its own
# name for the modules at the package root; a layer may always import itself)
UPPER = {"patch", "patched_model", "regularizers", "editors", "editing", "hub", "interop", "evaluation", "cli"}
FORBIDDEN = {
    # the foundations import no layer
    "errors": UPPER,
    "requests": UPPER,
    "batching": UPPER,
    "lazy": UPPER,
    "progress": UPPER,
    "schema": UPPER,
    "offload": UPPER,
    "distributed": UPPER,
    "counterfactuals": UPPER,
    "kernels": UPPER,
    "modules": UPPER - {"patch"},  # module layouts are the patch format's
    # pure computation: editors return ΔW and touch no file
    "editors": UPPER,
    # folder and Hub I/O knows nothing of patches, models with patches, editing or evaluation
    "hub": UPPER - {"hub", "editors"},
    "patch": UPPER - {"patch", "hub", "interop"},
    "regularizers": UPPER - {"regularizers", "patch"},
    "interop": UPPER - {"interop", "patch", "hub"},
    "patched_model": UPPER - {"patched_model", "patch", "hub", "interop"},
    "editing": {"cli"},
    "evaluation": {"cli"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """`(imported module, imported name or None, line)` for every package-internal import of `module`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith("hf_edit_patch")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("hf_edit_patch"):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    out.append((sub, None, node.lineno) if sub in MODULES else (target, alias.name, node.lineno))
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (package `__init__` files excluded as targets: they only re-export)."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        targets = set()
        for target, _, _ in _imports(module):
            if target in MODULES and target != module and MODULES[target].name != "__init__.py":
                targets.add(target)
        graph[module] = targets
    return graph


def test_no_top_level_folder_shadows_an_installed_package():
    packages = [p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert packages == ["hf_edit_patch"], f"regular packages at the repository root: {packages}"


def test_import_kernels_from_the_repository_root_finds_the_installed_package():
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("the PyPI package `kernels` is not installed")
    code = "import kernels, sys; print(kernels.__file__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    origin = Path(out.stdout.strip()).resolve()
    assert ROOT not in origin.parents or ".venv" in origin.parts, f"`import kernels` found {origin}"


def test_no_import_cycles_between_modules():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layers_import_one_way():
    wrong = []
    for module in MODULES:
        forbidden = FORBIDDEN.get(_layer(module), set())
        for target, _, line in _imports(module):
            if _layer(target) in forbidden and _layer(target) != _layer(module):
                wrong.append(f"{module}:{line} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    wrong = []
    for module in MODULES:
        for target, name, line in _imports(module):
            if target != module and name is not None and name.startswith("_") and not name.startswith("__"):
                wrong.append(f"{module}:{line} imports {name} from {target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_reaches_into_another_modules_private_attributes():
    wrong = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("hf_edit_patch"))
            for alias in node.names
            if f"{module.rsplit('.', 1)[0]}.{alias.name}" in MODULES or alias.name in {"hub", "storage"}
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in imported
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                wrong.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_no_source_module_is_too_long_to_read_in_one_sitting():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_argument_parsing_lives_in_the_cli():
    wrong = [
        module
        for module, path in MODULES.items()
        if _layer(module) != "cli" and "argparse" in {t for t, _, _ in _imports_stdlib(path)}
    ]
    assert not wrong, f"argparse outside hf_edit_patch/cli/: {wrong}"


def _imports_stdlib(path: Path) -> list[tuple[str, None, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name.split(".")[0], None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.append((node.module.split(".")[0], None, node.lineno))
    return out


def test_editors_never_touch_files_or_the_hub():
    io_modules = {"huggingface_hub", "safetensors", "shutil", "tempfile", "datasets", "filelock"}
    wrong = []
    for module, path in MODULES.items():
        if _layer(module) != "editors":
            continue
        used = {t for t, _, _ in _imports_stdlib(path)} & io_modules
        source = path.read_text(encoding="utf-8")
        if used or "open(" in source.replace("_open(", ""):
            wrong.append(f"{module}: {sorted(used) or 'open()'}")
    assert not wrong, "file or Hub access in editors:\n" + "\n".join(wrong)
