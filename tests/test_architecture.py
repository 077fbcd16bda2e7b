"""Import rules of the package layout (README, Development): the domain packages know
neither Hydra nor OmegaConf, only the entry points (cli/) and the build layer (build/) do,
and the top-level modules of tailtune import each other without a cycle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "src" / "tailtune"
HYDRA_FREE = ("data", "models", "imbalance", "features")
CONFIG_LIBRARIES = ("hydra", "omegaconf")


def _sources(under: Path = PACKAGE) -> list[Path]:
    return sorted(p for p in under.rglob("*.py") if "configs" not in p.parts)


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    """Every module a source file imports, at module level or inside functions (a lazy
    import is still a dependency); ``from tailtune import x`` counts as ``tailtune.x``."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                package = _module(path).split(".")
                if path.name != "__init__.py":
                    package = package[:-1]
                base = ".".join(package[: len(package) - node.level + 1] +
                                ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


def _unit(module: str) -> str | None:
    """The top-level module of tailtune a module belongs to (``tailtune.build.models`` ->
    ``build``), or None outside tailtune (or for the package root itself)."""
    parts = module.split(".")
    if parts[0] != "tailtune" or len(parts) < 2:
        return None
    unit = parts[1]
    return unit if (PACKAGE / unit).is_dir() or (PACKAGE / f"{unit}.py").is_file() else None


@pytest.mark.parametrize("package", HYDRA_FREE)
def test_domain_packages_import_neither_hydra_nor_omegaconf_in_their_source(package):
    offenders = [f"{path.relative_to(PACKAGE)} imports {name}"
                 for path in _sources(PACKAGE / package) for name in _imports(path)
                 if name.split(".")[0] in CONFIG_LIBRARIES]
    assert not offenders, offenders


def test_only_the_entry_points_and_the_build_layer_know_hydra():
    allowed = {"cli", "build"}
    offenders = sorted({str(path.relative_to(PACKAGE)) for path in _sources()
                        for name in _imports(path)
                        if name.split(".")[0] in CONFIG_LIBRARIES
                        and _unit(_module(path)) not in allowed})
    assert not offenders, offenders


def test_importing_every_domain_module_loads_neither_hydra_nor_omegaconf():
    modules = sorted(_module(p) for package in HYDRA_FREE for p in _sources(PACKAGE / package))
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        f"{CONFIG_LIBRARIES!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(modules) > 20  # every data/, models/, imbalance/, features/ module
    assert json.loads(result.stdout.splitlines()[-1]) == []


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _sources():
        source = _unit(_module(path))
        if source is None:
            continue
        targets = {_unit(name) for name in _imports(path)}
        graph.setdefault(source, set()).update(t for t in targets if t and t != source)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_top_level_modules_import_each_other_without_a_cycle():
    graph = _graph()
    assert {"build", "cli", "data", "features", "imbalance", "models"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    # The layers of the README, bottom up: nothing below imports what is above it.
    assert not graph["imbalance"] & {"data", "features", "models", "build", "cli"}
    assert not graph["features"] & {"models", "build", "cli"}
    assert not graph["models"] & {"build", "cli"}
    assert "cli" not in graph["build"]


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_build_modules_import_only_those_listed_before_them():
    """tailtune/build/__init__.py lists its modules in dependency order."""
    order = ["config", "checkpoints", "data", "trainer", "models", "results", "ensemble"]
    assert sorted(order) == sorted(p.stem for p in (PACKAGE / "build").glob("*.py")
                                   if p.stem != "__init__")
    for i, name in enumerate(order):
        imported = {n.split(".")[2] for n in _imports(PACKAGE / "build" / f"{name}.py")
                    if n.startswith("tailtune.build.")}
        assert imported <= set(order[:i]), (name, imported - set(order[:i]))
