"""The house as ARCHITECTURE.md draws it, read from the source: no import cycles, no private names across
modules, no module too big to hold in one's head, and Lightning only where the callback lives."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lighter_sink"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` of every import of the package in module ``name``, wherever it is
    (at the top, in a function, under ``TYPE_CHECKING``): a deferred import is a cycle all the same."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, str | None, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("lighter_sink")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if not base.startswith("lighter_sink"):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:  # `from lighter_sink.formats import _zarr` imports a module
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((base, alias.name, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {module for module, _, _ in _imports(name) if module != name} for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_modules_import_each_other_one_way() -> None:
    assert _cycles(_graph()) == []


def test_a_cycle_is_found_when_there_is_one() -> None:
    # (the check itself can fail)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_a_private_name_of_another() -> None:
    private = [
        f"{name}:{line} imports {imported} from {module}"
        for name in MODULES
        for module, imported, line in _imports(name)
        if imported is not None and imported.startswith("_") and not imported.startswith("__")
    ]
    assert private == []


def test_no_module_reaches_into_another_modules_private_attributes() -> None:
    """``import lighter_sink._x as x; x._y`` is a private name across rooms too."""
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {
            alias.asname or alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
            if alias.name.startswith("lighter_sink")
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                found.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert found == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_fits_in_one_head(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines; split it by concern (at most {MAX_LINES})"


def test_only_the_callback_the_lighter_classes_and_the_demo_know_lightning() -> None:
    """The sink, the stores and the formats serve plain loops too; the demo job is a Lightning job on purpose."""
    knowing = set()
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            modules = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(m == "lightning" or m.startswith(("lightning.", "pytorch_lightning")) for m in modules):
                knowing.add(name)
    assert knowing <= {"lighter_sink._callback", "lighter_sink.lighter", "lighter_sink._demo", "lighter_sink.cli"}


def test_the_ground_floor_imports_nothing_of_the_package() -> None:
    assert _imports("lighter_sink._types") == []
