"""Fitness tests of the package's shape: small modules, short functions, few parameters,
and every name one module uses from another in that module's ``__all__``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "relu_dask"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60  # its body, less the docstring
MAX_PARAMETERS = 8
#: argparse tables: one long list of options, read top to bottom.
LONG_BY_DESIGN = {("commandline", "build_parser"), ("commandline", "_add_job_options")}


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def _functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def _body_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return 0 if not body else (body[-1].end_lineno or 0) - body[0].lineno + 1


def _parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = function.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    return len([n for n in names if n.arg not in ("self", "cls")]) + bool(a.vararg) + bool(a.kwarg)


def test_no_module_is_over_its_line_limit() -> None:
    long = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_long_or_takes_many_parameters() -> None:
    found = []
    for module, tree in _modules().items():
        for function in _functions(tree):
            if (module, function.name) not in LONG_BY_DESIGN and _body_lines(function) > MAX_FUNCTION_LINES:
                found.append(f"{module}.{function.name}: {_body_lines(function)} lines")
            if _parameters(function) > MAX_PARAMETERS:
                found.append(f"{module}.{function.name}: {_parameters(function)} parameters")
    assert found == []


def _exported(tree: ast.Module) -> set[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return None


def _used_from_other_modules(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Per module of the package, the names the others take from it: ``from relu_dask.m import
    name`` and ``m.name`` after ``from relu_dask import m``."""
    used: dict[str, set[str]] = {m: set() for m in modules}
    for module, tree in modules.items():
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "relu_dask":
                    aliases.update({a.asname or a.name: a.name for a in node.names if a.name in modules})
                elif node.module.startswith("relu_dask.") and node.module.count(".") == 1:
                    home = node.module.split(".")[1]
                    if home in used and home != module:
                        used[home].update(a.name for a in node.names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                home = aliases[node.value.id]
                if home != module:
                    used[home].add(node.attr)
    return used


def test_every_name_used_from_another_module_is_in_its_all() -> None:
    modules = {m: t for m, t in _modules().items() if m not in ("__init__", "__main__")}
    missing = []
    for module, names in sorted(_used_from_other_modules(modules).items()):
        exported = _exported(modules[module])
        if exported is None:
            missing.append(f"{module} has no __all__")
            continue
        missing.extend(f"{module}.{name}" for name in sorted(names - exported))
    assert missing == []


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__main__",)))
def test_every_name_in_all_is_defined(module: str) -> None:
    import importlib

    imported = importlib.import_module(f"relu_dask.{module}" if module != "__init__" else "relu_dask")
    assert [name for name in getattr(imported, "__all__", []) if not hasattr(imported, name)] == []
