"""The house's picture, checked from the source (ast): the pure core imports nothing of the package but the
errors and the runtime helpers, no module imports a layer above its own, nothing imports the benchmark or the
tests, and there is no import cycle (imports inside functions count too)."""
from __future__ import annotations

import ast
from pathlib import Path

import fst_plugin

PACKAGE = Path(fst_plugin.__file__).resolve().parent
# lowest first; a module may import its own layer and the layers below it
LAYERS = [
    {"fst_plugin", "errors", "io_utils", "runtime", "distributed", "options"},  # fst_plugin = __init__ (the version only)
    {"core"},                                              # pure PyTorch
    {"models", "data", "record"},                          # formats and building blocks
    {"attacks", "plugins", "probes", "demo_config"},       # probes: the retuning attack and QRA
    {"defense"},                                           # a tuning defense, whoever calls it: config, runner
    {"adapter"},                                           # adapter: BackdoorBench's face
    {"api", "export"},
    {"demo", "cli", "__main__"},
]
CORE_MAY_IMPORT = {"core", "errors", "runtime", "distributed"}


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package (the yaml folder is data, not code)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "defense_configs":
            continue
        parts = ["fst_plugin", *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The package's modules that ``path`` imports (``from pkg import submodule`` resolves to the submodule)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                     for alias in node.names]
        else:
            names = []
        found.update(n for n in names if n.split(".")[0] in ("fst_plugin", "bench_scripts", "tests"))
    return found


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _unit(module: str) -> str:
    """The layer unit of a module: its sub-package (core, data, ...) or its top-level module name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _layer(module: str) -> int:
    unit = _unit(module)
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"{module} is in no layer of this test's picture: place it")


def test_every_module_has_a_place_in_the_picture() -> None:
    assert {_layer(m) for m in MODULES} == set(range(len(LAYERS)))


def test_the_core_imports_only_the_errors_and_the_runtime_helpers() -> None:
    leaks = {m: sorted(i for i in GRAPH[m] if _unit(i) not in CORE_MAY_IMPORT)
             for m in MODULES if _unit(m) == "core"}
    assert {m: i for m, i in leaks.items() if i} == {}


def test_no_module_imports_upward_or_the_benchmark_or_the_tests() -> None:
    upward = {m: sorted(i for i in GRAPH[m] if not i.startswith("fst_plugin") or _layer(i) > _layer(m))
              for m in MODULES}
    assert {m: i for m, i in upward.items() if i} == {}


def test_there_is_no_import_cycle() -> None:
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(GRAPH.get(module, ())):
            if target in MODULES and target != module:
                visit(target, path + [module])
        done.add(module)

    for module in MODULES:
        visit(module, [])


def test_the_checks_see_imports_inside_functions() -> None:
    """cli imports the demo lazily (inside a function): the graph still has that edge."""
    assert "fst_plugin.demo" in GRAPH["fst_plugin.cli"]
