"""The foundation's rules for src/ddpm_ood (issue 25), read with ``ast``: short functions,
short CLI functions but for the parser builders, no module named like a standard-library one, and checkpoint.py
(our file format) free of upstream compatibility and of the diffusion code. Each test lists every violation."""

from __future__ import annotations

import ast
import fnmatch
import sys
from collections.abc import Iterator
from pathlib import Path

from tiny_run import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "ddpm_ood"
MAX_FUNCTION_LINES = 60
# (module, function): the batched reconstruction engine keeps its loop in one piece.
LONG_FUNCTIONS_ALLOWED = {("reconstruction/engine.py", "reconstruct_batched")}
MAX_CLI_FUNCTION_LINES = 40
CLI_PARSER_BUILDERS = ("build_parser", "add_*_options", "*_parser")
CHECKPOINT_MAY_NOT_IMPORT = ("ddpm_ood.upstream", "ddpm_ood.diffusion")


def modules(package: Path | None = None) -> list[Path]:
    """The .py files of ``package`` (default: all of src/ddpm_ood)."""
    return sorted(p for p in (package or PACKAGE).rglob("*.py") if "__pycache__" not in p.parts)


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function and method, nested ones included (``outer.inner``)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def lines(node: ast.AST) -> int:
    """Lines from ``def`` to the function's last line (docstring, comments and blank lines included)."""
    return node.end_lineno - node.lineno + 1


def long_functions(package: Path, limit: int, allowed=lambda module, name: False) -> list[str]:
    """``module:function (N lines)`` for every function of ``package`` over ``limit`` lines but the allowed."""
    out = []
    for path in modules(package):
        module = path.relative_to(PACKAGE).as_posix()
        for name, node in functions(ast.parse(path.read_text(), str(path))):
            if lines(node) > limit and not allowed(module, name):
                out.append(f"{module}:{name} ({lines(node)} lines)")
    return out


def imported_modules(tree: ast.AST, module: str) -> set[str]:
    """Every module ``module``'s code imports, anywhere (inside functions too): ``import a.b``, ``from a import b``
    (as a and a.b), relative imports resolved, and ``importlib.import_module``/``__import__`` of a constant name."""
    package = module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) in
                   ("import_module", "__import__"))):
            out.add(node.args[0].value)
    return out


def test_no_function_is_over_60_lines_but_the_batched_engine():
    for module, name in LONG_FUNCTIONS_ALLOWED:  # an exemption names a real function
        tree = ast.parse((PACKAGE / module).read_text())
        assert name in dict(functions(tree)), f"{module}:{name} is gone: drop its exemption"
    violations = long_functions(PACKAGE, MAX_FUNCTION_LINES, lambda module, name: (module, name) in
                                LONG_FUNCTIONS_ALLOWED)
    assert not violations, f"functions over {MAX_FUNCTION_LINES} lines: {violations}"


def test_no_cli_function_is_over_40_lines_but_the_parser_builders():
    def parser_builder(module: str, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern) for pattern in CLI_PARSER_BUILDERS)

    violations = long_functions(PACKAGE / "cli", MAX_CLI_FUNCTION_LINES, parser_builder)
    assert not violations, f"cli/ functions over {MAX_CLI_FUNCTION_LINES} lines: {violations}"


def test_no_module_or_package_is_named_like_a_standard_library_module():
    names = {}
    for path in modules():
        rel = path.relative_to(PACKAGE.parent)
        for part in rel.parts[:-1]:  # the packages above the module
            names.setdefault(part, str(rel.parent))
        if path.stem not in ("__init__", "__main__"):
            names[path.stem] = str(rel)
    clashes = sorted(f"{where} ({name})" for name, where in names.items() if name in sys.stdlib_module_names)
    assert not clashes, f"named like a standard-library module: {clashes}"


def test_checkpoint_imports_nothing_from_upstream_or_diffusion():
    tree = ast.parse((PACKAGE / "checkpoint.py").read_text())
    forbidden = sorted(name for name in imported_modules(tree, "ddpm_ood.checkpoint")
                       if any(name == f or name.startswith(f + ".") for f in CHECKPOINT_MAY_NOT_IMPORT))
    assert not forbidden, f"checkpoint.py (our file format only) imports {forbidden}"


def test_the_checks_see_what_they_look_for():
    # The readers themselves, on made-up code: nested and method functions, relative and dynamic imports.
    code = ast.parse("class A:\n    def m(self):\n        def inner():\n            pass\n\n"
                     "async def f():\n    from . import upstream\n    from ..diffusion import unet\n"
                     "    import importlib\n    importlib.import_module('ddpm_ood.upstream.flags')\n")
    assert [name for name, _ in functions(code)] == ["A.m", "A.m.inner", "f"]
    assert lines(dict(functions(code))["A.m"]) == 3
    imports = imported_modules(code, "ddpm_ood.checkpoint")
    assert {"ddpm_ood.upstream", "ddpm_ood.upstream.flags", "importlib"} <= imports
    assert "ddpm_ood.diffusion.unet" in imported_modules(code, "ddpm_ood.sub.checkpoint")
