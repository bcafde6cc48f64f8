"""Imports run one way: every module of the package sits in a layer and imports only from its own layer or
those below it (issue 11, part 5).  The build looks records up and never loads the tuner; the tuner, which
uses everything, sits on top, under the CLI alone.

The imports are read from the source (every ``import`` statement, those inside functions included), so a
late import that dodges a cycle at load time still counts.  The lazy names of ``tvmlayers/__init__.py``
(``tl.tune``) are strings, not imports: the package itself sits in the top layer with the CLI.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "tvmlayers"

# Lowest first; names relative to the package, each naming a module or a whole subpackage.  A new module
# goes in the lowest layer whose modules it needs; a module that needs a higher layer than its own means
# the code is in the wrong place, not that the table needs a new exception.
LAYERS: tuple[tuple[str, list[str]], ...] = (
    # what a kernel is and how files look: specs, targets, formats, op definitions, schedules, references
    (
        "foundation",
        "spec targets formats locks private_dirs published ops schedules fingerprint layer_specs layouts reference "
        "verify workloads progress emulation tuning_logs".split(),
    ),
    ("records", ["records"]),  # the record store and its lookup
    ("build", "build cache kernel omp_pool threads nvcc".split()),
    ("layers", "functional autograd torch_ops nn convert graph executor aot extract".split()),
    ("applications", "bundle bundle_run bundle_harness cuda_call_check runtime_pack benchmark model_bench".split()),
    ("tuner", ["tuning"]),
    ("entry points", ["cli", ""]),  # "": the package's __init__, which loads the tuner lazily by name
)


def _package_dirs() -> dict[str, Path]:
    """The package and the folders pyproject maps into it (schedules/ is tvmlayers.schedules)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {PACKAGE: REPO / PACKAGE, **{name: REPO / path for name, path in setuptools["package-dir"].items()}}


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name."""
    modules = {}
    for root_name, root in _package_dirs().items():
        for source in root.rglob("*.py"):
            parts = source.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((root_name, *parts))] = source
    return modules


MODULES = _modules()


def imported_modules(name: str, source: str, is_package: bool = False) -> set[str]:
    """The package's modules that the source of module ``name`` imports, wherever the statement is."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            # `from pkg import name`: the submodule pkg.name where there is one, else pkg itself
            found.update(f"{origin}.{a.name}" if f"{origin}.{a.name}" in MODULES else origin for a in node.names)
    return {module for module in found if module == PACKAGE or module.startswith(PACKAGE + ".")}


def layer_of(module: str) -> int | None:
    relative = module.removeprefix(PACKAGE).removeprefix(".")
    for index, (_, members) in enumerate(LAYERS):
        if any(relative == m or (m and relative.startswith(m + ".")) for m in members):
            return index
    return None


def upward_imports(name: str, imported: set[str]) -> list[str]:
    """The imports of ``name`` that reach a layer above its own."""
    own = layer_of(name)
    return [
        f"{name} ({LAYERS[own][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for target in sorted(imported)
        # the package itself runs before any of its modules: `from tvmlayers import __version__` adds nothing
        if target != PACKAGE and layer_of(target) is not None and layer_of(target) > own
    ]


def _graph() -> dict[str, set[str]]:
    return {
        name: imported_modules(name, path.read_text(), is_package=path.name == "__init__.py")
        for name, path in MODULES.items()
    }


GRAPH = _graph()


def test_every_package_folder_is_installed() -> None:
    """A subpackage missing from pyproject's list works in an editable install and is absent from a wheel."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert folders <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(folders - listed)}"


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(name for name in MODULES if layer_of(name) is None)
    assert not unplaced, f"put these modules in a layer of tests/test_layering.py's LAYERS: {unplaced}"


def test_imports_run_down_the_layers() -> None:
    upward = [line for name, imported in GRAPH.items() for line in upward_imports(name, imported)]
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in GRAPH.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.mark.parametrize(
    ("start", "never"),
    [
        ("tvmlayers.build", ("tvmlayers.tuning",)),
        ("tvmlayers.records", ("tvmlayers.build", "tvmlayers.nn", "tvmlayers.functional", "tvmlayers.tuning")),
        ("tvmlayers.functional", ("tvmlayers.tuning", "tvmlayers.cli", "tvmlayers.bundle")),
    ],
)
def test_what_a_module_loads_stays_below_it(start: str, never: tuple[str, ...]) -> None:
    """Whatever loading ``start`` (and each module under it) pulls in, directly or not."""
    starts = [name for name in MODULES if name == start or name.startswith(start + ".")]
    loaded = set().union(*(_reachable(name) for name in starts))
    reached = sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in never))
    assert not reached, f"loading {start} loads {reached}"
    assert loaded, f"found no imports of {start}: the import reader is broken"


def test_only_the_cli_and_the_package_import_the_tuner() -> None:
    tuner = layer_of("tvmlayers.tuning")
    importers = {
        name
        for name, imported in GRAPH.items()
        if layer_of(name) != tuner and any(layer_of(module) == tuner for module in imported)
    }
    assert importers <= {"tvmlayers.cli", PACKAGE}, sorted(importers)


def test_the_import_reader_sees_every_form_of_import() -> None:
    source = """
from ..build import kernel_for
from . import database
from .. import nn, __version__
import tvmlayers.cli
import torch
if TYPE_CHECKING:
    from ..functional import Plan

def late():
    from ..tuning.tuner import tune
"""
    imported = imported_modules("tvmlayers.records.example", source)
    assert imported == {
        "tvmlayers.build",
        "tvmlayers.records.database",
        "tvmlayers.nn",
        "tvmlayers",
        "tvmlayers.cli",
        "tvmlayers.functional",
        "tvmlayers.tuning.tuner",
    }
    assert len(upward_imports("tvmlayers.records.example", imported)) == 5  # all but database and the package
