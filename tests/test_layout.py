"""The shape of the package, kept as it was reshaped (issue 15): short functions, one error base the CLI
catches, and an import graph without cycles, so each module sits on a floor above the ones it imports."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

import click
from conftest import ROOT

import vaedec
from vaedec.errors import VaedecError

PACKAGE = ROOT / "vaedec"
MAX_FUNCTION_LINES = 80  # from `def` to the last line, docstring included


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def vaedec_imports(tree: ast.Module) -> set[str]:
    """The vaedec modules a module imports anywhere (function-local imports too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vaedec."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "vaedec":
            found |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").is_file()}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vaedec.")}
    return found


def test_no_function_is_longer_than_80_lines() -> None:
    long = [
        f"vaedec/{name}.py:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "split these into functions that each do one thing: " + "; ".join(long)


def test_every_user_error_is_a_vaedec_error() -> None:
    """cli.py catches VaedecError alone: an error class outside it would reach the user as a traceback
    (cli.py's own UserError is click's, what a VaedecError becomes)."""
    errors = {}
    for info in pkgutil.iter_modules(vaedec.__path__):
        module = importlib.import_module(f"vaedec.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if (cls.__module__ == module.__name__ and issubclass(cls, Exception) and name.endswith("Error")
                    and not issubclass(cls, click.ClickException)):
                errors[f"{module.__name__}.{name}"] = cls
    assert len(errors) >= 12  # ConfigError, ShardError, TrainError, CheckpointError, VAELoadError, ...
    outside = sorted(name for name, cls in errors.items() if not issubclass(cls, VaedecError))
    assert not outside, f"subclass VaedecError (vaedec/errors.py): {outside}"


def test_the_import_graph_has_no_cycles() -> None:
    graph = {name: vaedec_imports(tree) - {name} for name, tree in modules().items()}
    assert graph["errors"] == set()  # the ground floor: anything may raise its errors
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import cycle: " + " -> ".join((*path, name))
        if name in done:
            return
        for dep in sorted(graph.get(name, ())):
            visit(dep, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())
