"""The package's own source, pasted into a standalone script: what keeps an exported defense from drifting.

:func:`paste` takes the objects a script calls (``find_head``, ``tune``, ...) and returns their source as
:func:`inspect.getsource` reads it, together with every package-level definition they reach (helpers, classes,
constants, the errors), dependencies first. Names that come from outside the package (``torch``, ``nn``,
``Optional``) are listed as ``needs``: the script's own imports must provide them, and :func:`check_script`
refuses a script that does not, so a core function that starts using a new helper or import changes the
exported script or stops the export with the name to add, never silently.
"""
from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable

PACKAGE = "fst_plugin"


class PasteError(RuntimeError):
    """The core cannot be pasted as it is written (a bug of this package, not of the user's input)."""


@dataclass
class PastedSource:
    """Pasted definitions (name → source, in paste order) and the outside names they use."""

    pieces: dict[str, str] = field(default_factory=dict)
    needs: set[str] = field(default_factory=set)

    @property
    def text(self) -> str:
        return "\n\n".join(self.pieces.values())


@lru_cache(maxsize=None)
def _module_source(module: str) -> tuple[str, ast.Module]:
    source = inspect.getsource(sys.modules[module])
    return source, ast.parse(source)


def _assigned(node: ast.stmt) -> list[str]:
    """The names an assignment statement binds (none for any other statement)."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return [t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name)]


def _top_level_assignment(module: str, name: str) -> str | None:
    """The source of the module-level ``name = ...`` of ``module`` (a constant such as ``SINGLE = World()``)."""
    source, tree = _module_source(module)
    for node in tree.body:
        bound = _assigned(node)
        if name in bound:
            if len(bound) > 1:
                raise PasteError(f"{module}.{name} is bound together with {bound} in one statement; "
                                 f"give {name} a statement of its own to export it")
            return ast.get_source_segment(source, node)
    return None


def _package_import(module: str, name: str) -> str | None:
    """The package module ``module`` imports ``name`` from (``from fst_plugin.x import name``), if any."""
    for node in _module_source(module)[1].body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE:
            if any((alias.asname or alias.name) == name for alias in node.names):
                return node.module
    return None


def _referenced(source: str) -> list[str]:
    """Every name the source mentions, in order of first appearance."""
    nodes = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)]
    return list(dict.fromkeys(n.id for n in sorted(nodes, key=lambda n: (n.lineno, n.col_offset))))


def _definition(module: str, name: str) -> tuple[str, str] | None:
    """(defining module, source) of the package-level ``name`` as ``module`` sees it; None when ``name`` comes
    from outside the package (or is local to a function and merely shares a global's name)."""
    value = vars(sys.modules[module])[name]
    if (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__.split(".")[0] == PACKAGE:
        if value.__name__ != name:
            raise PasteError(f"{module} uses {value.__module__}.{value.__name__} under the name {name}; "
                             "import it under its own name to export it")
        return value.__module__, textwrap.dedent(inspect.getsource(value)).rstrip() + "\n"
    assigned = _top_level_assignment(module, name)
    if assigned is not None:
        return module, assigned + "\n"
    origin = _package_import(module, name)
    return None if origin is None else _definition(origin, name)


def paste(roots: Iterable[object]) -> PastedSource:
    """The source of ``roots`` (package functions and classes) and of everything of the package they reach."""
    pasted = PastedSource()
    origins: dict[str, str] = {}
    visiting: set[str] = set()

    def visit(name: str, module: str, source: str) -> None:
        if name in pasted.pieces or name in visiting:
            return
        visiting.add(name)
        for used in _referenced(source):
            if used == name or used.startswith("__") or used not in vars(sys.modules[module]):
                continue  # itself, a module attribute such as __name__, a builtin or a local name
            found = _definition(module, used)
            if found is None:
                pasted.needs.add(used)
                continue
            origin, text = found
            if used in pasted.pieces and pasted.pieces[used] != text:
                raise PasteError(f"two package definitions are named {used} ({origins[used]} and {origin}); "
                                 "rename one of them")
            origins.setdefault(used, origin)
            visit(used, origin, text)
        visiting.discard(name)
        pasted.pieces[name] = source
        origins.setdefault(name, module)

    for root in roots:
        module = root.__module__
        visit(root.__name__, module, textwrap.dedent(inspect.getsource(root)).rstrip() + "\n")
    return pasted


def _bound_names(tree: ast.Module) -> tuple[set[str], list[str]]:
    """(names the module's imports bind, names its definitions and assignments bind, repeats included)."""
    imported: set[str] = set()
    defined: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imported.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.append(node.name)
        else:
            defined.extend(_assigned(node))
    return imported, defined


def check_script(script: str, pasted: PastedSource) -> None:
    """Refuse a rendered script that lacks a name the pasted source needs, or binds a module-level name twice
    (the template's own definitions must not shadow the pasted ones)."""
    imported, defined = _bound_names(ast.parse(script))
    missing = sorted(pasted.needs - imported - set(defined))
    if missing:
        raise PasteError(f"the pasted core uses {', '.join(missing)}, which the defense template does not import; "
                         "add the import to fst_plugin/export/defense.py.tmpl")
    twice = sorted({name for name in defined if defined.count(name) > 1})
    if twice:
        raise PasteError(f"the defense template defines {', '.join(twice)} as the pasted core does; "
                         "rename the template's definition")
