"""Each DVC stage's ``deps`` cover the code the stage runs, and name no code it does not run.

A stage's code is the import closure of its entry module (``python -m pipeline.<x>`` in its ``cmd``): every
``import`` and ``from ... import`` of ``pipeline/`` and ``src/ddpm/``, at module level and inside functions,
followed transitively, with the ``__init__.py`` of every package on the way and the C++ sources that
``ddpm.kernels`` compiles. Imports under ``if TYPE_CHECKING:`` never run and are not followed. A name that a
package resolves lazily (a module-level ``__getattr__``) would hide an edge, so importing one is an error.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"pipeline": ROOT / "pipeline", "ddpm": ROOT / "src" / "ddpm"}
NATIVE = {"ddpm.kernels": ROOT / "src" / "ddpm" / "kernels" / "csrc"}  # a package -> the sources its build compiles
CODE_ROOTS = ("src/", "pipeline/")  # deps under these are code, and must be in the closure
ENTRY = re.compile(r"python -m (pipeline(?:\.\w+)+)")


def module_path(name: str) -> Path | None:
    """The file of module ``name`` of the project (``pkg/__init__.py`` for a package), None for any other."""
    top, *rest = name.split(".")
    if top not in PACKAGES:
        return None
    path = PACKAGES[top].joinpath(*rest)
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def is_package(name: str) -> bool:
    path = module_path(name)
    return path is not None and path.name == "__init__.py"


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def files_under(folder: Path) -> set[str]:
    """The files of ``folder`` that DVC hashes for a folder dep (.dvcignore: bytecode and atomic-write temps)."""
    return {
        rel(f) for f in folder.rglob("*") if f.is_file() and "__pycache__" not in f.parts and not f.name.startswith(".")
    }


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


@cache
def bound_names(package: str) -> frozenset[str]:
    """Names a package's ``__init__.py`` binds at module level (defs, classes, assignments, imports)."""
    tree = ast.parse(module_path(package).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return frozenset(names)


def is_lazy(package: str) -> bool:
    """True for a project package that resolves attributes lazily (a module-level ``__getattr__``)."""
    return is_package(package) and "__getattr__" in bound_names(package)


def parse_imports(name: str, source: str) -> tuple[set[str], list[str]]:
    """(the modules that module ``name`` imports, anywhere but under ``if TYPE_CHECKING:``; errors).

    ``from p import n`` imports ``p`` and, where ``p.n`` is a module, ``p.n``. An error names a project module
    that does not exist, or a ``from p import n`` or ``p.n`` where ``p`` is lazy and ``n`` neither a submodule
    nor a name that ``p`` binds.
    """
    package = name if is_package(name) else name.rpartition(".")[0]
    modules: set[str] = set()
    errors: list[str] = []
    aliases: dict[str, str] = {}  # local name -> a lazy package it stands for (`import ddpm`)

    def check(base: str, attr: str, lineno: int) -> None:
        if is_lazy(base) and module_path(f"{base}.{attr}") is None and attr not in bound_names(base):
            errors.append(f"{name}:{lineno}: {base}.{attr} is neither a submodule nor a name {base} binds (lazy?)")

    def missing(module: str, lineno: int) -> None:
        if module.split(".")[0] in PACKAGES and module_path(module) is None:
            errors.append(f"{name}:{lineno}: {module} is not a module of the project")

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules.add(alias.name)
                missing(alias.name, node.lineno)
                bound = alias.name if alias.asname else alias.name.split(".")[0]  # `import a.b` binds `a`
                if is_lazy(bound):
                    aliases[alias.asname or bound] = bound
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                up = parts[: len(parts) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = node.module
            modules.add(base)
            missing(base, node.lineno)
            for alias in node.names:
                if alias.name == "*":
                    continue
                if module_path(f"{base}.{alias.name}") is not None:
                    modules.add(f"{base}.{alias.name}")
                else:
                    check(base, alias.name, node.lineno)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and isinstance(node.ctx, ast.Load)
        ):
            check(aliases[node.value.id], node.attr, node.lineno)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            modules.add(node.args[0].value)  # importlib.import_module("ddpm.x")
            missing(node.args[0].value, node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return modules, errors


@cache
def imports(name: str) -> frozenset[str]:
    """The project modules that module ``name`` imports, each with its parent packages."""
    modules, _ = parse_imports(name, module_path(name).read_text(encoding="utf-8"))
    found = set()
    for module in modules:
        parts = module.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(m for m in found if module_path(m) is not None)


def closure(entry: str) -> set[str]:
    """The files (relative to the project root) that running module ``entry`` executes or compiles."""
    parts = entry.split(".")
    todo = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imports(module))
    files = {rel(module_path(m)) for m in seen}
    for package, folder in NATIVE.items():
        if any(m == package or m.startswith(package + ".") for m in seen):
            files.update(files_under(folder))
    return files


def covers(dep: str, file: str) -> bool:
    return file == dep or file.startswith(dep.rstrip("/") + "/")


def uncovered(files: Iterable[str], deps: Iterable[str]) -> list[str]:
    """The files that no dep covers (a dep folder covers the files below it)."""
    deps = list(deps)
    return sorted(f for f in files if not any(covers(d, f) for d in deps))


def stale(files: Iterable[str], deps: Iterable[str]) -> list[str]:
    """The code deps (under src/ or pipeline/) that the closure does not need: a file outside it, or a folder
    with a file outside it (DVC hashes every file of a folder dep but bytecode and temp files)."""
    files = set(files)
    extra = []
    for dep in deps:
        if not dep.startswith(CODE_ROOTS):
            continue
        path = ROOT / dep
        if path.is_dir():
            members = files_under(path)
            if not members or not members <= files:
                extra.append(dep)
        elif dep not in files:
            extra.append(dep)
    return extra


def derived_deps(files: Iterable[str]) -> list[str]:
    """The code deps that cover ``files`` exactly: a folder where the closure holds every file of it, else files."""
    files = set(files)
    deps = set(files)
    for file in files:
        for folder in Path(file).parents:
            path = ROOT / folder
            if folder == Path(".") or path in PACKAGES.values():
                break
            members = files_under(path)
            if members <= files:
                deps -= members
                deps.add(folder.as_posix())
    return sorted(d for d in deps if not any(covers(e, d) for e in deps if e != d))


def stages() -> dict[str, dict]:
    """dvc.yaml's stages as written (a ``matrix``/``foreach`` stage is one entry: its deps do not vary)."""
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def entry_module(stage: dict) -> str:
    cmd = stage["do"]["cmd"] if "foreach" in stage else stage["cmd"]
    match = ENTRY.search(cmd if isinstance(cmd, str) else " ".join(cmd))
    assert match, f"no `python -m pipeline.<module>` in {cmd!r}"
    return match.group(1)


def deps_of(stage: dict) -> list[str]:
    return list((stage["do"] if "foreach" in stage else stage).get("deps", []))


STAGES = stages()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_deps_cover_the_stage_code(name):
    stage = STAGES[name]
    entry = entry_module(stage)
    assert module_path(entry) is not None, f"{name}: {entry} is not a module of the project"
    files = closure(entry)
    missing = uncovered(files, deps_of(stage))
    assert not missing, f"dvc.yaml stage {name!r} runs code its deps omit: {missing}; its code: {derived_deps(files)}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_deps_name_no_code_the_stage_does_not_run(name):
    stage = STAGES[name]
    files = closure(entry_module(stage))
    extra = stale(files, deps_of(stage))
    assert not extra, (
        f"dvc.yaml stage {name!r} depends on code it does not run (reruns for nothing): {extra}; "
        f"its code: {derived_deps(files)}"
    )


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_dropped_dep_is_reported(name):
    stage = STAGES[name]
    files, deps = closure(entry_module(stage)), deps_of(stage)
    for dep in (d for d in deps if any(covers(d, f) for f in files)):
        missing = uncovered(files, [d for d in deps if d != dep])
        assert missing and all(covers(dep, f) for f in missing), f"dropping {dep} went unnoticed: {missing}"
    extra = "src/ddpm/__never__.py"
    assert set(stale(files, [*deps, extra])) - set(stale(files, deps)) == {extra}


def test_every_import_resolves_and_no_lazy_name_hides_one():
    errors = []
    for top, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((top, *parts[:-1]) if parts[-1] == "__init__" else (top, *parts))
            errors += parse_imports(name, path.read_text(encoding="utf-8"))[1]
    assert not errors, "\n".join(errors)


def test_the_analysis_follows_every_import_that_runs():
    source = """
from importlib import import_module
from typing import TYPE_CHECKING
import numpy
from . import params
from ddpm import io
from ddpm.config import SampleConfig
if TYPE_CHECKING:
    from ddpm import module
else:
    from ddpm import data

def late():
    import ddpm.generate
    from ddpm.kernels.ops import attention
    return ddpm.generate, import_module("ddpm.noise")
"""
    modules, errors = parse_imports("pipeline.sample", source)
    assert {"pipeline.params", "ddpm.io", "ddpm.config", "ddpm.data", "ddpm.generate", "ddpm.kernels.ops"} <= modules
    assert "ddpm.noise" in modules
    assert "ddpm.module" not in modules and not errors
    assert is_lazy("ddpm")
    errors = parse_imports("pipeline.x", "from ddpm import DDPMConfig, io\nimport ddpm.io\nddpm.UNet, ddpm.io")[1]
    assert len(errors) == 2 and "ddpm.DDPMConfig" in errors[0] and "ddpm.UNet" in errors[1]
    assert parse_imports("pipeline.x", "from ddpm import fitting")[1], "a missing module is an error"
    assert {"src/ddpm/__init__.py", "src/ddpm/config/__init__.py"} <= closure("ddpm.config.sample")
    assert "src/ddpm/kernels/csrc/winograd.cpp" in closure("ddpm.kernels")


def test_the_kernel_build_compiles_the_sources_of_its_folder():
    """The closure adds ``csrc/`` for ``ddpm.kernels``: the build must compile exactly the sources kept there."""
    build = ast.parse((ROOT / "src" / "ddpm" / "kernels" / "build.py").read_text(encoding="utf-8"))
    named = {n.value for n in ast.walk(build) if isinstance(n, ast.Constant) and str(n.value).endswith(".cpp")}
    for package, folder in NATIVE.items():
        assert module_path(package) is not None and folder.is_dir()
        assert {Path(f).name for f in files_under(folder)} == named
