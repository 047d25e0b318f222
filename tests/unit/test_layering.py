"""The dependency direction omni -> training -> {modeling, data}, and modeling/'s import whitelist.

The folders data/, training/ and modeling/ install as `omni_moe.data`, `omni_moe.training`, `omni_moe.modeling`
(pyproject.toml's package-dir): every import names them so, never by the bare folder name, which the repository root
on sys.path would load a second time as a different module.

modeling/ ships next to exported weights (trust_remote_code), so it may import only torch, transformers, safetensors,
numpy, the standard library, and its own files through relative imports.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELING_ALLOWED = {"torch", "transformers", "safetensors", "numpy"} | set(sys.stdlib_module_names) | {"__future__"}
NS = "omni_moe"
BARE = {"data", "training", "modeling"}  # the folders' own names: never imported as such
FORBIDDEN = {
    "modeling": {f"{NS}.training", "omni", f"{NS}.data", "deepspeed", "peft", "webdataset", "accelerate"},
    "data": {f"{NS}.training", "omni"},
    "training": {"omni"},
}


def imports_of(path: Path):
    """(top-level module, level, line) for every import statement in a file; `omni_moe.<package>` counts as one
    top-level name."""
    tree = ast.parse(path.read_text(), filename=str(path))

    def top(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] == NS else parts[0]

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield top(alias.name), 0, node.lineno
        elif isinstance(node, ast.ImportFrom):
            yield top(node.module or ""), node.level, node.lineno


def python_files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {mod}"
        for path in python_files(package)
        for mod, level, line in imports_of(path)
        if level == 0 and mod in FORBIDDEN[package]
    ]
    assert not bad, "imports against the layering omni -> training -> {modeling, data}:\n" + "\n".join(bad)


def test_no_bare_package_names():
    """`import data...` / `from training...` anywhere (tests included) would be a second copy of the package."""
    files = [p for folder in ("omni", "data", "training", "modeling", "tests", "launch") for p in python_files(folder)]
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {mod}"
        for path in files
        for mod, level, line in imports_of(path)
        if level == 0 and mod in BARE
    ]
    assert not bad, f"import these as {NS}.<package>:\n" + "\n".join(bad)


def test_modeling_imports_only_whitelist_and_relative():
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {mod or '.'}"
        for path in python_files("modeling")
        for mod, level, line in imports_of(path)
        if level == 0 and mod not in MODELING_ALLOWED
    ]
    assert not bad, "modeling/ may import only torch, transformers, safetensors, numpy, stdlib and itself:\n" + "\n".join(bad)


def test_modeling_is_flat():
    """Exported folders are flat: modeling/ has no sub-packages, and relative imports go one level only."""
    nested = [p for p in python_files("modeling") if p.parent != ROOT / "modeling"]
    assert not nested, f"modeling/ must stay flat for trust_remote_code export: {nested}"
    deep = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in python_files("modeling")
        for mod, level, line in imports_of(path)
        if level > 1
    ]
    assert not deep, f"relative imports beyond the modeling/ folder: {deep}"


def test_checker_sees_a_violation(tmp_path):
    """The checker itself must flag a bad import (guards against a parser that silently finds nothing)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import deepspeed\nfrom omni_moe.training.loop import x\nfrom . import sibling\nimport data.schema\n")
    found = {(mod, level) for mod, level, _ in imports_of(bad)}
    assert ("deepspeed", 0) in found and ("omni_moe.training", 0) in found and ("", 1) in found
    assert ("data", 0) in found




INSTALLED_AS = {"omni": "omni", "training": "omni_moe.training", "data": "omni_moe.data"}


def module_graph(packages=("omni", "training", "data")) -> dict[str, set[str]]:
    """module (its installed name) -> the modules of ours it imports, wherever the import statement sits (a
    function-level import is still a dependency: hiding a cycle inside a function does not remove it)."""
    names = {".".join((INSTALLED_AS[pkg], *p.relative_to(ROOT / pkg).with_suffix("").parts)): p
             for pkg in packages for p in python_files(pkg)}
    names = {n.removesuffix(".__init__"): p for n, p in names.items()}
    graph = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            found |= {t for t in targets if t in names and t != name}
        graph[name] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles_in_omni_training_and_data():
    graph = module_graph()
    assert "omni_moe.training.pipeline" in graph["omni.train"] and graph["omni.cli"], "the graph finder found nothing"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle (function-level imports count): " + " -> ".join(cycle)


def test_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
