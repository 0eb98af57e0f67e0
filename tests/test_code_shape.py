"""The code's shape (ARCHITECTURE.md), checked on the source with ``ast`` (a second, fast): no
function in src/ is longer than 80 lines; no module imports a private name (``_x``) from another
module, nor a private module from outside the package that holds it; Optuna's private API is used
only in ``tightfit/optuna_compat.py``. The layer order itself is import-linter's contract
(``.importlinter``, run by ``.ci/run``)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 80
#: Optuna internals (attributes) that only the compatibility module may touch
OPTUNA_PRIVATE = {"_storage", "_trial_id", "_get_trials", "_heartbeat", "_backend"}


def _modules() -> list[tuple[str, bool, Path, ast.Module]]:
    found = []
    for path in sorted((SRC / "tightfit").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        found.append((name, is_package, path, ast.parse(path.read_text(), str(path))))
    return found


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _imports(name: str, is_package: bool, tree: ast.Module) -> list[tuple[int, str, str | None]]:
    """(line, absolute module, imported name or None) of every tightfit import in the module."""
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(node.lineno, target, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
    return [f for f in found if f[1] == "tightfit" or f[1].startswith("tightfit.")]


def _is_module(dotted: str) -> bool:
    path = SRC.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_no_function_in_src_is_longer_than_80_lines():
    long = [
        f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for _, _, path, tree in _modules()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES
    ]
    assert not long, "split these into smaller functions:\n" + "\n".join(long)


def test_no_module_imports_a_private_name_from_another_package():
    bad = []
    for name, is_package, path, tree in _modules():
        importer_package = name if is_package else name.rpartition(".")[0]
        for line, target, imported in _imports(name, is_package, tree):
            full = f"{target}.{imported}" if imported is not None and _is_module(f"{target}.{imported}") else target
            parts = full.split(".")
            # a private module (tightfit.recovery._base) belongs to its package and the packages inside it
            for i, part in enumerate(parts):
                owner = ".".join(parts[:i])
                if _private(part) and not (importer_package == owner or importer_package.startswith(owner + ".")):
                    bad.append(f"{path.relative_to(SRC)}:{line} imports {full} (private to {owner})")
            # a private name of a module (from tightfit.x import _helper): never from outside that module
            if imported is not None and _private(imported) and not _is_module(f"{target}.{imported}"):
                bad.append(f"{path.relative_to(SRC)}:{line} imports {imported} from {target}")
    assert not bad, "make these public (or move them to the module that uses them):\n" + "\n".join(bad)


def test_optuna_private_api_is_used_only_in_the_compatibility_module():
    bad = [
        f"{path.relative_to(SRC)}:{node.lineno} .{node.attr}"
        for name, _, path, tree in _modules()
        if name != "tightfit.optuna_compat"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in OPTUNA_PRIVATE
    ]
    assert not bad, "go through tightfit.optuna_compat:\n" + "\n".join(bad)


def test_the_checks_catch_what_they_look_for(tmp_path):
    # the private-name rule on a made-up module: a helper of another module and a private module
    # of another package are caught; a private module of an enclosing package is not
    tree = ast.parse(
        "from ..evaluation.metrics import _logits\nfrom ..recovery._base import sites\nfrom .._io import write_atomic\n"
    )
    imports = _imports("tightfit.run.example", False, tree)
    assert [(t, n) for _, t, n in imports] == [
        ("tightfit.evaluation.metrics", "_logits"),
        ("tightfit.recovery._base", "sites"),
        ("tightfit._io", "write_atomic"),
    ]
    assert _private("_logits") and not _private("__init__")
