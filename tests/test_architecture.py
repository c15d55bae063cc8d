"""The house rules that keep cellclf easy to change: no import cycles between its modules, project
imports at module top level (inside functions only where the module imported pulls a heavy library),
modules of at most 400 lines, and a CLI whose every command answers ``--help``."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import cellclf
from cellclf.cli import app

PACKAGE = Path(cellclf.__file__).resolve().parent
MAX_MODULE_LINES = 400
# third-party libraries slow to import or optional: a project module importing one at top level
# may itself be imported inside a function (keeps `cellclf --help` and torch-free installs working)
HEAVY = {"torch", "torchvision", "onnxruntime", "lightning", "matplotlib", "fastapi", "ray",
         "onnx", "uvicorn", "albumentations", "timm"}


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = f
    return mods


def _imported(node: ast.AST, mods: dict[str, Path]) -> list[str]:
    """Project modules an import statement names (``from pkg import module`` included)."""
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        found = [node.module] if node.module in mods else []
        return found + [f"{node.module}.{a.name}" for a in node.names
                        if f"{node.module}.{a.name}" in mods]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in mods]
    return []


def _type_checking(tree: ast.Module) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (never run)."""
    return {id(n) for node in tree.body
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body for n in ast.walk(stmt)}


def _top_level(tree: ast.Module) -> list[ast.stmt]:
    """Statements run at import (module body, also inside if/try blocks; TYPE_CHECKING aside)."""
    out: list[ast.stmt] = []
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.If | ast.Try):
            todo += [*node.body, *node.orelse, *getattr(node, "finalbody", [])]
            for h in getattr(node, "handlers", []):
                todo += h.body
            continue
        out.append(node)
    return out


def _graphs() -> tuple[dict[str, Path], dict[str, set[str]], dict[str, set[str]], set[str]]:
    """(modules, every import anywhere, imports at module level, modules that import a heavy lib
    at module level, directly or through project modules)."""
    mods = _modules()
    every: dict[str, set[str]] = {m: set() for m in mods}
    top: dict[str, set[str]] = {m: set() for m in mods}
    heavy = set()
    for m, f in mods.items():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            every[m].update(t for t in _imported(node, mods) if t != m)
        for node in _top_level(tree):
            top[m].update(t for t in _imported(node, mods) if t != m)
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [])
            if any(n.split(".")[0] in HEAVY for n in names):
                heavy.add(m)
    changed = True
    while changed:
        changed = False
        for m in mods:
            if m not in heavy and top[m] & heavy:
                heavy.add(m)
                changed = True
    return mods, every, top, heavy


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules() -> None:
    """Counting imports anywhere (inside functions too): a cycle hidden in a function is a cycle."""
    _, every, _, _ = _graphs()
    assert _cycles(every) == []


def test_project_imports_at_module_top_level() -> None:
    """Inside a function, a project module may be imported only when it pulls a heavy library
    (torch, onnxruntime, ...); the thin CLI layer (cli.py, commands/) imports lazily by design."""
    mods, _, _, heavy = _graphs()
    late = []
    for m, f in mods.items():
        if m == "cellclf.cli" or m.startswith("cellclf.commands"):
            continue
        tree = ast.parse(f.read_text(encoding="utf-8"))
        skip = set(map(id, _top_level(tree))) | _type_checking(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            late += [f"{f.relative_to(PACKAGE.parent)}:{node.lineno} imports {t}"
                     for t in _imported(node, mods) if t not in heavy and t != m]
    assert late == []


def test_modules_are_at_most_400_lines() -> None:
    long = {str(f.relative_to(PACKAGE.parent)): n for f in PACKAGE.rglob("*.py")
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def _command_paths(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and group of the typer app, walked (not listed by hand)."""
    paths = [prefix]
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click)
            paths += _command_paths(cmd, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


COMMANDS = _command_paths(typer.main.get_command(app))


def test_the_cli_has_its_commands() -> None:
    names = {" ".join(p) for p in COMMANDS}
    assert {"infer", "train", "calibrate", "evaluate", "review", "review export",
            "review finalize"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "cellclf")
def test_every_command_answers_help(path: tuple[str, ...]) -> None:
    res = CliRunner().invoke(app, [*path, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_version_option_prints_the_version() -> None:
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.split() == ["cellclf", cellclf.__version__]


def test_docs_tree_lists_every_module() -> None:
    """docs/architecture.md's tree names every module under its package (and no module that is
    gone), so the map of the code stays the code."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("## The tree", 1)[1].split("```")[1]
    listed, pkg = set(), ""
    for line in block.splitlines():
        if line.startswith("cellclf/"):
            head = line.split()[0]
            if head.endswith("/"):
                pkg = head.removeprefix("cellclf/")
            else:
                pkg = ""
                listed.add(head.removeprefix("cellclf/"))
        elif line.startswith("  ") and line.split():
            listed.add(pkg + line.split()[0])
    actual = {str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py") if f.name != "__init__.py"}
    assert actual - listed == set(), "modules missing from docs/architecture.md's tree"
    assert listed - actual == set(), "docs/architecture.md's tree lists modules that are gone"
