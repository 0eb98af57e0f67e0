"""The optional packages each search method and operator imports, checked before any work.

Installed without extras (``pip install tightfit``), ``search="olmp"`` used to run every trial into
``ModuleNotFoundError: cma`` and answer with the original model. :func:`check_requirements` refuses
such a run up front, naming the packages and the ``pip install`` line that brings them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .samplers import check_search


@dataclass(frozen=True)
class Requirement:
    """Modules a feature imports, and the command that installs them."""

    modules: tuple[str, ...]
    pip: str


#: search method -> what it imports (the others use optuna, botorch and scipy: core dependencies)
SEARCH_REQUIREMENTS: dict[str, Requirement] = {
    "olmp": Requirement(("cma",), "pip install 'tightfit[search]'  (or: pip install cma)"),
    "mads": Requirement(("PyNomad",), "pip install 'tightfit[search]'  (or: pip install PyNomadBBO)"),
    "cmaes": Requirement(("cmaes",), "pip install 'tightfit[search]'  (or: pip install cmaes)"),
}

#: operator name -> what it imports
OPERATOR_REQUIREMENTS: dict[str, Requirement] = {
    "structured_prune": Requirement(
        ("torch_pruning",), "pip install 'tightfit[speed]'  (or: pip install torch-pruning)"
    ),
}

#: Latency(runtime=...) -> what timing in that runtime imports (it exports each trial to ONNX)
RUNTIME_REQUIREMENTS: dict[str, Requirement] = {
    "onnxruntime": Requirement(("onnx", "onnxruntime"), "pip install 'tightfit[speed]'"),
}


def missing_modules(modules: Iterable[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported (absent, or broken on import)."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:  # ModuleNotFoundError included; also a module set to None in sys.modules
            missing.append(name)
    return missing


def check_requirements(search: str, strategy: Any = None, latency: Any = None) -> None:
    """Raise :class:`ConfigError` if ``search``, an operator of ``strategy`` or the ``latency``
    meter's runtime needs a package that is not installed; the message has the ``pip install`` line.
    Also checks that ``search`` is a known method."""
    check_search(search)
    needs: list[tuple[str, Requirement]] = []
    if search in SEARCH_REQUIREMENTS:
        needs.append((f"search={search!r}", SEARCH_REQUIREMENTS[search]))
    operators = list(strategy) if strategy is not None and hasattr(strategy, "__iter__") else [strategy]
    for op in operators:
        name = getattr(op, "name", None)
        if name in OPERATOR_REQUIREMENTS:
            needs.append((type(op).__name__, OPERATOR_REQUIREMENTS[name]))
    runtime = getattr(latency, "runtime", None)
    if runtime in RUNTIME_REQUIREMENTS:
        needs.append((f"Latency(runtime={runtime!r})", RUNTIME_REQUIREMENTS[runtime]))
    problems = []
    for what, requirement in needs:
        missing = missing_modules(requirement.modules)
        if missing:
            problems.append(f"{what} needs {', '.join(missing)}, which is not installed: {requirement.pip}")
    if problems:
        raise ConfigError("; ".join(problems) + ". Install it and run again (nothing was started).")
